//! The CNI commands: each turns (environment, config) into stdout or a `CniError`.

use std::collections::HashSet;
use std::fs::File;
use std::net::IpAddr;

use aws_cni::config::{Attachment, CniEnv};
use aws_cni::error::{CniError, Code, Result};
use aws_cni::netlink::Netlink;
use aws_cni::sandbox::{host_netlink, open_netns, pod_netlink, refuse_own_netns};
use aws_cni::version::Version;
use cni_common::fsio::FileLock;
use serde_json::Value;

use crate::config::{Family, Ipam, NetConf};
use crate::plan::Plan;
use crate::result::Interface;
use crate::snat::{chain_name, host_veth_name, Snat};
use crate::store::{AllocError, Allocation, Store};
use crate::{info, iptables, plan, result, snat, warn, wire};

/// Run one command; `Ok(Some(json))` is printed on stdout.
pub async fn run(env: &CniEnv, conf: &NetConf) -> Result<Option<String>> {
    match env.command.as_str() {
        "ADD" => add(env, conf).await.map(|v| Some(v.to_string())),
        "DEL" => del(env, conf).await.map(|()| None),
        "CHECK" => check(env, conf).await.map(|()| None),
        "STATUS" => status(conf).map(|()| None),
        "GC" => gc(conf).await.map(|()| None),
        other => Err(CniError::new(
            Code::InvalidEnv,
            format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"),
        )),
    }
}

/// ADD, DEL, CHECK and GC of one attachment never interleave: a DEL racing the ADD of the same
/// container ends as one order or the other, never with a chain whose address was released.
fn attachment_lock(ipam: &Ipam, network: &str, cid: &str, ifname: &str) -> Result<FileLock> {
    let path = cni_common::state::lock_file(&ipam.data_dir, network, cid, ifname);
    FileLock::acquire(&path).map_err(|e| {
        CniError::new(
            Code::Io,
            format!("lock attachment {cid}/{ifname} ({}): {e}", path.display()),
        )
    })
}

fn drop_lock(lock: FileLock) {
    if let Err(e) = lock.remove() {
        warn!(error = %e, "remove attachment lock file");
    }
}

fn alloc_error(e: AllocError) -> CniError {
    let code = match e {
        AllocError::Exhausted { .. } => Code::TryAgainLater,
        AllocError::Io { .. } => Code::Io,
    };
    CniError::new(code, format!("egress address: {e}"))
}

/// Failures of a teardown, all of them, under the first one's code.
fn combined(what: &str, failures: Vec<CniError>) -> Result<()> {
    let Some(code) = failures.first().map(|e| e.code) else {
        return Ok(());
    };
    let msgs: Vec<String> = failures.into_iter().map(|e| e.msg).collect();
    Err(CniError::new(
        code,
        format!("{what} incomplete: {}", msgs.join("; ")),
    ))
}

async fn add(env: &CniEnv, conf: &NetConf) -> Result<Value> {
    // Upstream's order: a plugin not chained is refused even when disabled.
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "egress-cni must be chained after another plugin: the config has no prevResult",
        )
    })?;
    if !conf.enabled {
        return result::pass_through(prev, &conf.cni_version);
    }
    let egress = conf.egress()?;
    env.require(true)?;
    let ns = open_netns(&env.netns)?;
    refuse_own_netns(&ns, &env.netns)?;
    let (cid, ifname) = (env.container_id.as_str(), env.ifname.as_str());
    let lock = attachment_lock(&egress.ipam, &conf.name, cid, ifname)?;

    let store = Store::new(&egress.ipam.data_dir, &conf.name);
    let alloc = store
        .allocate(&egress.ipam.range, cid, ifname)
        .map_err(alloc_error)?;
    let ip = alloc.ip();
    info!(%ip, again = matches!(alloc, Allocation::Existing(_)), "egress address reserved");
    let plan = plan::plan(&egress, &conf.name, cid, ip);
    let snat = Snat::new(
        egress.family,
        &conf.name,
        cid,
        egress.node_ip,
        ip,
        egress.randomize,
    );
    match wire_and_snat(env, &ns, &plan, &snat).await {
        Ok(added) => {
            info!(%ip, host_veth = %plan.host_veth, chain = %snat.chain, "egress wired");
            result::with_interfaces(prev, &conf.cni_version, &added)
        }
        Err(e) => {
            warn!(error = %e.msg, "egress wiring failed; undoing");
            if let Err(u) = undo(env, &ns, &plan, &snat, &store).await {
                warn!(error = %u.msg, "undo after failed ADD was incomplete");
            }
            drop_lock(lock);
            Err(e)
        }
    }
}

async fn wire_and_snat(
    env: &CniEnv,
    ns: &File,
    plan: &Plan,
    snat: &Snat,
) -> Result<Vec<Interface>> {
    let host = host_netlink()?;
    let pod = pod_netlink(ns, &env.netns).await?;
    if plan.family == Family::V6 && !wire::ipv6_forwarding() {
        warn!("IPv6 forwarding is off on this node: the pod's IPv6 egress will not be routed until net.ipv6.conf.all.forwarding=1");
    }
    let w = wire::setup(&host, &pod, ns, plan, &env.ifname).await?;
    iptables::ensure(snat).map_err(|e| {
        CniError::new(
            Code::Netlink,
            format!("install SNAT chain {}: {e}", snat.chain),
        )
    })?;
    Ok(vec![
        Interface {
            name: plan.host_veth.clone(),
            mac: w.host_mac,
            sandbox: None,
        },
        Interface {
            name: plan.pod_ifname.to_string(),
            mac: w.pod_mac,
            sandbox: Some(env.netns.clone()),
        },
    ])
}

/// Everything a failed ADD may have made.
async fn undo(env: &CniEnv, ns: &File, plan: &Plan, snat: &Snat, store: &Store) -> Result<()> {
    let mut failures = Vec::new();
    if let Err(e) = iptables::remove(snat.family, &snat.chain) {
        failures.push(CniError::new(
            Code::Netlink,
            format!("remove SNAT chain {}: {e}", snat.chain),
        ));
    }
    match (host_netlink(), pod_netlink(ns, &env.netns).await) {
        (Ok(h), Ok(p)) => {
            if let Err(e) = wire::remove(&h, Some(&p), &plan.host_veth, plan.pod_ifname).await {
                failures.push(e);
            }
        }
        (Err(e), _) | (_, Err(e)) => failures.push(e),
    }
    if let Err(e) = store.release(&env.container_id, &env.ifname) {
        failures.push(CniError::new(
            Code::Io,
            format!("release egress address {}: {e}", plan.pod_ip),
        ));
    }
    combined("undo", failures)
}

async fn del(env: &CniEnv, conf: &NetConf) -> Result<()> {
    env.require(false)?;
    let ipam = match conf.ipam() {
        Ok(i) => i,
        // Disabled: the section may well be a placeholder, and there is nothing to undo.
        Err(_) if !conf.enabled => return Ok(()),
        Err(e) => return Err(e),
    };
    if !conf.enabled {
        // Enabled at ADD and disabled since (the conflist is rewritten when aws-node
        // restarts): what ADD made is still to be removed, and a reservation says it was made.
        // Without one, DEL costs no more than reading the directory.
        let store = Store::new(&ipam.data_dir, &conf.name);
        match store.find(&env.container_id, &env.ifname) {
            Ok(ips) if ips.is_empty() => return Ok(()),
            Ok(_) => info!("egress disabled, but this attachment has a reservation: removing it"),
            Err(e) => {
                warn!(error = %e, "egress disabled and its store unreadable: nothing removed");
                return Ok(());
            }
        }
    }
    let netns = (!env.netns.is_empty()).then_some(env.netns.as_str());
    teardown(&conf.name, &ipam, &env.container_id, &env.ifname, netns).await
}

/// Remove one attachment's egress: its reservation, its SNAT chain and jumps, its veth pair.
/// Each step runs whatever the others did; all failures are reported together. Whatever is
/// already gone (the namespace, the pair, the chain) is fine.
async fn teardown(
    network: &str,
    ipam: &Ipam,
    cid: &str,
    ifname: &str,
    netns: Option<&str>,
) -> Result<()> {
    let family = ipam.family();
    let lock = attachment_lock(ipam, network, cid, ifname)?;
    let mut failures = Vec::new();

    let store = Store::new(&ipam.data_dir, network);
    match store.release(cid, ifname) {
        Ok(ips) if !ips.is_empty() => info!(?ips, "egress address released"),
        Ok(_) => {}
        Err(e) => failures.push(CniError::new(
            Code::Io,
            format!(
                "release egress address of {cid}/{ifname} in {}: {e}",
                store.dir().display()
            ),
        )),
    }

    // The chain is named after the container, and jumps to it are found by its name: the
    // pod's address is not needed (nor its namespace).
    let chain = chain_name(family, network, cid);
    match iptables::remove(family, &chain) {
        Ok(true) => info!(%chain, "SNAT chain removed"),
        Ok(false) => {}
        Err(e) => failures.push(CniError::new(
            Code::Netlink,
            format!("remove SNAT chain {chain}: {e}"),
        )),
    }

    let host_veth = host_veth_name(network, cid);
    let pod = match netns.map(File::open) {
        Some(Ok(ns)) if !cni_common::netns::is_own_netns(&ns).unwrap_or(true) => {
            Netlink::in_netns(&ns).await.ok()
        }
        // Gone with the pod: so is the pair, unless its host end outlives it by name.
        _ => None,
    };
    match host_netlink() {
        Ok(host) => {
            match wire::remove(&host, pod.as_ref(), &host_veth, family.pod_ifname()).await {
                Ok(true) => info!(%host_veth, "egress veth pair deleted"),
                Ok(false) => {}
                Err(e) => failures.push(e),
            }
        }
        Err(e) => failures.push(e),
    }

    if failures.is_empty() {
        drop_lock(lock);
    }
    combined("egress teardown", failures)
}

async fn check(env: &CniEnv, conf: &NetConf) -> Result<()> {
    if conf.version < Version(0, 4, 0) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, config has {}",
                conf.cni_version
            ),
        ));
    }
    if !conf.enabled {
        return Ok(());
    }
    let egress = conf.egress()?;
    env.require(true)?;
    let ns = open_netns(&env.netns)?;
    let (cid, ifname) = (env.container_id.as_str(), env.ifname.as_str());
    let _lock = attachment_lock(&egress.ipam, &conf.name, cid, ifname)?;
    let store = Store::new(&egress.ipam.data_dir, &conf.name);
    let held = store.find(cid, ifname).map_err(|e| {
        CniError::new(
            Code::Io,
            format!("read egress reservations in {}: {e}", store.dir().display()),
        )
    })?;
    let ip: IpAddr = held
        .into_iter()
        .find(|ip| egress.ipam.range.contains(*ip))
        .ok_or_else(|| {
            CniError::new(
                Code::CheckFailed,
                format!(
                    "no egress address reserved for {cid}/{ifname} in {} ({})",
                    store.dir().display(),
                    egress.ipam.range.subnet()
                ),
            )
        })?;
    let plan = plan::plan(&egress, &conf.name, cid, ip);
    let want = Snat::new(
        egress.family,
        &conf.name,
        cid,
        egress.node_ip,
        ip,
        egress.randomize,
    );
    let host = host_netlink()?;
    let pod = pod_netlink(&ns, &env.netns).await?;
    let mut missing = wire::check(&host, &pod, &plan).await;
    match iptables::saved(egress.family, &want.chain) {
        Ok(saved) => missing.extend(snat::differences(&saved, &want)),
        Err(e) => missing.push(format!("read the nat table: {e}")),
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(CniError::new(
        Code::CheckFailed,
        format!("egress of {cid}/{ifname} ({ip}): {}", missing.join("; ")),
    ))
}

/// Ready when enabled with a usable configuration (or disabled: nothing to do).
fn status(conf: &NetConf) -> Result<()> {
    if conf.enabled {
        conf.egress()?;
    }
    Ok(())
}

/// Reservations, chains and pairs of attachments the runtime no longer knows.
async fn gc(conf: &NetConf) -> Result<()> {
    let valid = aws_cni::config::gc_keep(conf.version, &conf.cni_version, &conf.valid_attachments)?;
    let ipam = match conf.ipam() {
        Ok(i) => i,
        Err(_) if !conf.enabled => return Ok(()),
        Err(e) => return Err(e),
    };
    let valid_ids: HashSet<&str> = valid.iter().map(|a| a.container_id.as_str()).collect();
    let store = Store::new(&ipam.data_dir, &conf.name);
    let all = store.list().map_err(|e| {
        CniError::new(
            Code::Io,
            format!("read egress reservations in {}: {e}", store.dir().display()),
        )
    })?;
    let mut stale: Vec<(String, String)> = all
        .iter()
        .map(|r| r.attachment())
        .filter(|(cid, ifname)| {
            if ifname.is_empty() {
                // An older host-local's file names only the container.
                !valid_ids.contains(cid)
            } else {
                !valid.contains(&Attachment {
                    container_id: cid.to_string(),
                    ifname: ifname.to_string(),
                })
            }
        })
        .map(|(c, i)| (c.to_string(), i.to_string()))
        .collect();
    stale.sort();
    stale.dedup();
    let mut failures = Vec::new();
    for (cid, ifname) in &stale {
        match teardown(&conf.name, &ipam, cid, ifname, None).await {
            Ok(()) => info!(container = %cid, %ifname, "garbage-collected stale egress attachment"),
            Err(e) => failures.push(e),
        }
    }
    combined("GC", failures)
}
