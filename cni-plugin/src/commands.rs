//! The CNI commands: each turns (environment, config) into stdout or a `CniError`.

use std::collections::HashSet;
use std::fs::File;
use std::net::IpAddr;

use crate::sandbox::{host_netlink, open_netns, pod_netlink, refuse_own_netns};

use serde_json::Value;
use tracing::{info, warn};

use crate::config::{Attachment, CniEnv, NetConf};
use crate::error::{CniError, Code, Result};
use crate::ipam::IpamClient;
use crate::naming::host_veth_name;
use crate::netlink::{link_mac, mac_string, Netlink};
use crate::pod::{self, PodNet};
use crate::result::{AddResult, PrevResult};
use crate::state::{SandboxState, StateStore};
use crate::version::Version;

/// Run one command; `Ok(Some(json))` is printed on stdout.
pub async fn run(env: &CniEnv, conf: &NetConf) -> Result<Option<String>> {
    match env.command.as_str() {
        "ADD" | "DEL" | "CHECK" => {
            env.require(env.command != "DEL")?;
            let store = StateStore::new(&conf.state_dir, &conf.name);
            // Commands on one attachment never interleave (ADD against DEL of the same
            // container): the outcome is that of one order or the other.
            let lock = lock(&store, env)?;
            let out = match env.command.as_str() {
                "ADD" => add(env, conf, &store).await.map(|v| Some(v.to_string())),
                "DEL" => del(env, conf, &store).await.map(|_| None),
                _ => check(env, conf, &store).await.map(|_| None),
            };
            // The lock file lives as long as the attachment's record: a failed ADD or a DEL
            // leaves neither behind. A successful ADD has just written the record and a
            // successful DEL removed it; only the other outcomes need a look.
            let record_left = match (env.command.as_str(), out.is_ok()) {
                ("ADD", true) => true,
                ("DEL", true) => false,
                _ => store.load(&env.container_id, &env.ifname).is_some(),
            };
            if !record_left {
                if let Err(e) = lock.remove() {
                    warn!(error = %e, "remove attachment lock file");
                }
            }
            out
        }
        "STATUS" => status(conf).await.map(|_| None),
        "GC" => gc(conf).await.map(|_| None),
        other => Err(CniError::new(
            Code::InvalidEnv,
            format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"),
        )),
    }
}

fn lock(store: &StateStore, env: &CniEnv) -> Result<cni_common::fsio::FileLock> {
    store.lock(&env.container_id, &env.ifname).map_err(|e| {
        CniError::new(
            Code::Io,
            format!("lock attachment {}/{}: {e}", env.container_id, env.ifname),
        )
    })
}

/// The table for the address: ipamd's `RouteTableId` for a secondary ENI, upstream's rule
/// when an older ipamd left it unset; the primary ENI (device 0) routes through main.
fn route_table(ip: &cni_proto::IpAllocationMetadata) -> u32 {
    if ip.device_number > 0 && ip.route_table_id > 0 {
        ip.route_table_id as u32
    } else {
        cni_common::netlink::route_table_for_device(ip.device_number.max(0) as u32)
    }
}

/// The pod's address in ipamd's reply: IPv4 when there is one, else IPv6 (an IPv6 node).
fn address(a: &cni_proto::IpAllocationMetadata) -> Option<IpAddr> {
    let parse = |s: &str| s.split('/').next()?.parse::<IpAddr>().ok();
    parse(&a.i_pv4_addr)
        .filter(IpAddr::is_ipv4)
        .or_else(|| parse(&a.i_pv6_addr).filter(IpAddr::is_ipv6))
}

async fn add(env: &CniEnv, conf: &NetConf, store: &StateStore) -> Result<Value> {
    env.require_pod()?;
    let ns = open_netns(&env.netns)?;
    refuse_own_netns(&ns, &env.netns)?;
    let veth = host_veth_name(
        &conf.veth_prefix,
        &env.args.pod_namespace,
        &env.args.pod_name,
    );

    // A repeated ADD for an attachment that is already fully wired answers the same result.
    if let Some(st) = store.load(&env.container_id, &env.ifname) {
        if st.netns == env.netns && st.host_veth == veth {
            let host = host_netlink()?;
            let podnl = pod_netlink(&ns, &env.netns).await?;
            let p = pod_net(&st, conf.mtu);
            if pod::check(&host, &podnl, &p).await.is_ok() {
                info!(ip = %st.ip, "attachment already wired; returning it again");
                return rendered(&host, &podnl, &st, conf).await;
            }
        }
    }

    // The pod's netlink socket needs a thread that enters the namespace: it opens while ipamd
    // works on the address.
    let request = cni_proto::AddNetworkRequest {
        client_version: cni_proto::PROTOCOL_VERSION.into(),
        k8s_pod_name: env.args.pod_name.clone(),
        k8s_pod_namespace: env.args.pod_namespace.clone(),
        k8s_pod_infra_container_id: env.args.infra_container_id.clone(),
        container_id: env.container_id.clone(),
        if_name: env.ifname.clone(),
        network_name: conf.name.clone(),
        netns: env.netns.clone(),
        k8s_pod_uid: env.args.pod_uid.clone(),
        ..Default::default()
    };
    let (podnl, assigned) = tokio::join!(pod_netlink(&ns, &env.netns), async {
        let mut client = IpamClient::connect(&conf.ipamd_socket).await?;
        let reply = client.add(request).await?;
        Ok::<_, CniError>((client, reply))
    });
    let (mut client, reply) = assigned?;
    let addr = reply
        .ip_allocation_metadata
        .iter()
        .find_map(|a| Some((a.clone(), address(a)?)));
    let Some((addr, ip)) = addr else {
        let e = CniError::new(
            Code::IpamRefused,
            "ipamd replied without an IPv4 or IPv6 address",
        );
        release(&mut client, env, conf).await;
        return Err(e);
    };
    let st = SandboxState {
        network_name: conf.name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        host_veth: veth,
        ip,
        route_table: route_table(&addr),
        device_number: addr.device_number,
        netns: env.netns.clone(),
        pod_namespace: env.args.pod_namespace.clone(),
        pod_name: env.args.pod_name.clone(),
    };
    info!(%ip, device = addr.device_number, table = st.route_table, "ipamd assigned address");

    let wired = match podnl {
        Ok(podnl) => wire(&ns, &podnl, conf, store, &st).await,
        Err(e) => Err(e),
    };
    // The agent attaches its programs to the host veth, so only once the pod is wired; a pod
    // it cannot cover is undone like one that could not be wired.
    let mode = &reply.network_policy_mode;
    let wired = match wired {
        Ok(v) if !mode.is_empty() => {
            let interfaces = reply.ip_allocation_metadata.len() as i32;
            crate::policy::enforce(
                &conf.np_agent_socket,
                &env.args.pod_namespace,
                &env.args.pod_name,
                mode,
                interfaces,
            )
            .await
            .map(|()| v)
        }
        other => other,
    };
    match wired {
        Ok(v) => Ok(v),
        Err(e) => {
            warn!(error = %e, "wiring failed; undoing");
            if let Ok(host) = host_netlink() {
                let owner = pod::owner(&st.container_id, &st.ifname);
                if let Err(te) =
                    pod::teardown(&host, Some(&st.host_veth), Some(ip), &owner, false).await
                {
                    warn!(error = %te, "undo after failed ADD was incomplete");
                }
            }
            release(&mut client, env, conf).await;
            if let Err(re) = store.remove(&env.container_id, &env.ifname) {
                warn!(error = %re, "cannot remove sandbox state");
            }
            Err(e)
        }
    }
}

/// Everything after the allocation; any error here is undone by the caller.
async fn wire(
    ns: &File,
    podnl: &Netlink,
    conf: &NetConf,
    store: &StateStore,
    st: &SandboxState,
) -> Result<Value> {
    // Recorded before touching the kernel, so a DEL after a crash mid-ADD finds what to undo.
    store
        .save(st)
        .map_err(|e| CniError::new(Code::Io, format!("write sandbox state: {e}")))?;
    let host = host_netlink()?;
    let w = pod::setup(&host, podnl, ns, &pod_net(st, conf.mtu)).await?;
    Ok(AddResult {
        host_veth: st.host_veth.clone(),
        host_mac: w.host_mac,
        ifname: st.ifname.clone(),
        pod_mac: w.pod_mac,
        sandbox: st.netns.clone(),
        ip: st.ip,
    }
    .render(&conf.cni_version, conf.version))
}

async fn rendered(
    host: &Netlink,
    podnl: &Netlink,
    st: &SandboxState,
    conf: &NetConf,
) -> Result<Value> {
    let mac = |l: Option<netlink_packet_route::link::LinkMessage>| {
        l.map(|l| mac_string(&link_mac(&l))).unwrap_or_default()
    };
    let hmac = mac(host.link_by_name(&st.host_veth).await.ok().flatten());
    let pmac = mac(podnl.link_by_name(&st.ifname).await.ok().flatten());
    Ok(AddResult {
        host_veth: st.host_veth.clone(),
        host_mac: hmac,
        ifname: st.ifname.clone(),
        pod_mac: pmac,
        sandbox: st.netns.clone(),
        ip: st.ip,
    }
    .render(&conf.cni_version, conf.version))
}

fn pod_net(st: &SandboxState, mtu: u32) -> PodNet {
    PodNet {
        host_veth: st.host_veth.clone(),
        owner: pod::owner(&st.container_id, &st.ifname),
        ifname: st.ifname.clone(),
        mtu,
        ip: st.ip,
        route_table: st.route_table,
    }
}

fn del_request(env: &CniEnv, conf: &NetConf, reason: &str) -> cni_proto::DelNetworkRequest {
    cni_proto::DelNetworkRequest {
        client_version: cni_proto::PROTOCOL_VERSION.into(),
        k8s_pod_name: env.args.pod_name.clone(),
        k8s_pod_namespace: env.args.pod_namespace.clone(),
        k8s_pod_infra_container_id: env.args.infra_container_id.clone(),
        reason: reason.into(),
        container_id: env.container_id.clone(),
        if_name: env.ifname.clone(),
        network_name: conf.name.clone(),
        k8s_pod_uid: env.args.pod_uid.clone(),
    }
}

/// Give an address back after a failed ADD; failure here is logged, the ADD error wins.
async fn release(client: &mut IpamClient, env: &CniEnv, conf: &NetConf) {
    if let Err(e) = client.del(del_request(env, conf, "PodSetupFailed")).await {
        warn!(error = %e, "could not return the address to ipamd");
    }
}

async fn del(env: &CniEnv, conf: &NetConf, store: &StateStore) -> Result<()> {
    let st = store.load(&env.container_id, &env.ifname);
    let prev = conf.prev_result.as_ref().and_then(PrevResult::from_value);

    // ipamd first: it knows the address even if our state file was lost. Unreachable ipamd
    // must not block DEL, or kubelet retries forever while the host keeps stale routes; the
    // release is then recorded for ipamd to apply when it is back.
    let mut refused = None;
    // Our ipamd deletes retired host veths in the background; otherwise DEL deletes its own.
    let mut reaped = false;
    let mut policy_mode = String::new();
    let ipamd_ip = match IpamClient::connect(&conf.ipamd_socket).await {
        Ok(mut c) => match c.del(del_request(env, conf, "PodDeleted")).await {
            Ok(r) => {
                reaped = r.retired_veths_reaped;
                policy_mode = r.network_policy_mode.clone();
                r.ip_allocation_metadata.iter().find_map(address)
            }
            Err(e) => {
                warn!(error = %e, "ipamd did not release the address");
                refused = Some(e);
                None
            }
        },
        Err(e) => {
            warn!(error = %e, "ipamd unreachable; cleaning the host from local state and recording the release");
            let rec = cni_common::state::ReleaseRecord {
                network_name: conf.name.clone(),
                container_id: env.container_id.clone(),
                if_name: env.ifname.clone(),
                ip: st.as_ref().map(|s| s.ip).or(prev.as_ref().map(|p| p.ip)),
                recorded_at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as i64)
                    .unwrap_or(0),
            };
            // Without the record the address would stay assigned until ipamd's sweeper sees
            // the host empty; failing DEL instead makes the runtime retry until one is written.
            let path = store.record_release(&rec).map_err(|we| {
                CniError::new(
                    Code::Io,
                    format!(
                        "{}; and recording the release for later failed: {we}",
                        e.msg
                    ),
                )
            })?;
            info!(record = %path.display(), "release recorded for ipamd");
            None
        }
    };
    let ip = ipamd_ip
        .or(st.as_ref().map(|s| s.ip))
        .or(prev.as_ref().map(|p| p.ip));
    let veth = st
        .as_ref()
        .map(|s| s.host_veth.clone())
        .or_else(|| {
            (!env.args.pod_name.is_empty()).then(|| {
                host_veth_name(
                    &conf.veth_prefix,
                    &env.args.pod_namespace,
                    &env.args.pod_name,
                )
            })
        })
        .or(prev.and_then(|p| p.host_veth));

    if ip.is_some() || veth.is_some() {
        let host = host_netlink()?;
        let owner = pod::owner(&env.container_id, &env.ifname);
        if reaped {
            // The pair outlives this DEL until ipamd deletes it (or the runtime the
            // namespace): the pod's end gives up its name so that a new ADD into the same
            // namespace finds the name free.
            retire_pod_end(env).await;
        }
        pod::teardown(&host, veth.as_deref(), ip, &owner, reaped).await?;
        info!(ip = ?ip, veth = veth.as_deref().unwrap_or(""), "host side removed");
    }
    if let Some(e) = refused {
        // Keep the state so the runtime's retry can finish the release.
        return Err(e);
    }
    if !policy_mode.is_empty() && !env.args.pod_name.is_empty() {
        // State kept on failure too: the retry finds the host clean and asks the agent again.
        crate::policy::delete(
            &conf.np_agent_socket,
            &env.args.pod_namespace,
            &env.args.pod_name,
        )
        .await?;
    }
    store
        .remove(&env.container_id, &env.ifname)
        .map_err(|e| CniError::new(Code::Io, format!("remove sandbox state: {e}")))?;
    Ok(())
}

/// Down and renamed, the pod's end of the pair, if the namespace is still there. Failures are
/// only logged: the host end is what DEL must take care of.
async fn retire_pod_end(env: &CniEnv) {
    if env.netns.is_empty() {
        return;
    }
    let Ok(ns) = File::open(&env.netns) else {
        return;
    };
    let Ok(podnl) = Netlink::in_netns(&ns).await else {
        return;
    };
    match podnl.link_by_name(&env.ifname).await {
        Ok(Some(l)) => {
            let idx = l.header.index;
            let name = cni_common::naming::retired_name(idx);
            if let Err(e) = podnl.retire(idx, "", &name).await {
                info!(error = %e, "pod end of the veth not retired");
            }
        }
        Ok(None) => {}
        Err(e) => info!(error = %e, "pod end of the veth not looked up"),
    }
}

async fn check(env: &CniEnv, conf: &NetConf, store: &StateStore) -> Result<()> {
    if conf.version < Version(0, 4, 0) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, config has {}",
                conf.cni_version
            ),
        ));
    }
    env.require_pod()?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(Code::InvalidConfig, "CHECK needs prevResult"))?;
    let prev = PrevResult::from_value(prev)
        .ok_or_else(|| CniError::new(Code::InvalidConfig, "prevResult carries no IPv4 address"))?;
    let ns = open_netns(&env.netns)?;
    let st = store.load(&env.container_id, &env.ifname).ok_or_else(|| {
        CniError::new(
            Code::CheckFailed,
            format!(
                "no record of attachment {}/{}: was ADD run by this plugin?",
                env.container_id, env.ifname
            ),
        )
    })?;
    if st.ip != prev.ip {
        return Err(CniError::new(
            Code::CheckFailed,
            format!("prevResult has {} but the pod was given {}", prev.ip, st.ip),
        ));
    }
    let host = host_netlink()?;
    let podnl = pod_netlink(&ns, &env.netns).await?;
    pod::check(&host, &podnl, &pod_net(&st, conf.mtu)).await
}

async fn status(conf: &NetConf) -> Result<()> {
    let not_available = |msg: String| CniError::new(Code::NotAvailable, msg);
    let mut client = IpamClient::connect(&conf.ipamd_socket)
        .await
        .map_err(|e| not_available(e.msg))?;
    let s = client.status().await.map_err(|e| not_available(e.msg))?;
    if !s.ready {
        let e = crate::ipam::refusal(s.reason(), &s.message);
        return Err(not_available(format!("ipamd cannot allocate: {}", e.msg)));
    }
    Ok(())
}

async fn gc(conf: &NetConf) -> Result<()> {
    let valid = crate::config::gc_keep(conf.version, &conf.cni_version, &conf.valid_attachments)?;
    let store = StateStore::new(&conf.state_dir, &conf.name);
    let host = host_netlink()?;
    let mut cleaned = HashSet::new();
    let mut failed = Vec::new();
    for st in store.list() {
        let a = Attachment {
            container_id: st.container_id.clone(),
            ifname: st.ifname.clone(),
        };
        if valid.contains(&a) {
            continue;
        }
        let lock = match store.lock(&st.container_id, &st.ifname) {
            Ok(l) => l,
            Err(e) => {
                failed.push(format!("lock {}/{}: {e}", st.container_id, st.ifname));
                continue;
            }
        };
        let owner = pod::owner(&st.container_id, &st.ifname);
        if let Err(e) = pod::teardown(&host, Some(&st.host_veth), Some(st.ip), &owner, false).await
        {
            failed.push(format!("{}/{}: {}", st.container_id, st.ifname, e.msg));
            continue;
        }
        if let Err(e) = store.remove(&st.container_id, &st.ifname) {
            failed.push(format!(
                "remove state of {}/{}: {e}",
                st.container_id, st.ifname
            ));
            continue;
        }
        let _ = lock.remove();
        info!(container = %st.container_id, ip = %st.ip, "garbage-collected stale attachment");
        cleaned.insert(st.ip);
    }

    let mut client = IpamClient::connect(&conf.ipamd_socket).await?;
    let reply = client
        .gc(cni_proto::GcRequest {
            client_version: cni_proto::PROTOCOL_VERSION.into(),
            network_name: conf.name.clone(),
            valid_attachments: valid
                .iter()
                .map(|a| cni_proto::Attachment {
                    container_id: a.container_id.clone(),
                    if_name: a.ifname.clone(),
                })
                .collect(),
        })
        .await?;
    for r in &reply.released {
        let Some(ip) = r.ip_allocation_metadata.as_ref().and_then(address) else {
            continue;
        };
        if !cleaned.contains(&ip) {
            if let Err(e) = pod::teardown(&host, None, Some(ip), "", false).await {
                failed.push(format!("rules of {ip}: {}", e.msg));
            }
        }
        info!(container = %r.container_id, %ip, "ipamd released stale allocation");
    }
    if !reply.success {
        failed.push(format!(
            "ipamd garbage collection failed: {}",
            reply.message
        ));
    }
    if !failed.is_empty() {
        return Err(CniError::new(
            Code::TryAgainLater,
            format!("GC incomplete: {}", failed.join("; ")),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::MAIN_TABLE;

    #[test]
    fn primary_eni_routes_via_main() {
        let a = |d, t| cni_proto::IpAllocationMetadata {
            device_number: d,
            route_table_id: t,
            ..Default::default()
        };
        assert_eq!(route_table(&a(0, 1)), MAIN_TABLE);
        assert_eq!(route_table(&a(2, 3)), 3);
        assert_eq!(route_table(&a(2, 0)), 3);
    }
}
