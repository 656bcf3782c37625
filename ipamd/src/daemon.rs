//! Start-up and the long-running tasks: load the node, restore the checkpoint, serve.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use tokio::sync::Mutex;
use tracing::{error, info, warn};

use crate::api::grpc as server;
use crate::cloud::guard::{Bucket, Guarded, RetryPolicy};
use crate::cloud::imds::Imds;
use crate::cloud::sdk::SdkEc2;
use crate::cloud::{Ec2, EniFilter};
use crate::config::Config;
use crate::hostnet::links::Links;
use crate::hostnet::NodeNetwork;
use crate::instance::maxpods;
use crate::instance::node_file::{self as node, NodeInfo};
use crate::instance::types as instance_types;
use crate::instance::types::InstanceLimits;
use crate::pool::checkpoint::{self, Committer};
use crate::pool::datastore::Datastore;
use crate::pool::datastore::Eni;
use crate::pool::manager::{CloudNode, Limits, Manager};
use crate::pool::placement::{Mode, Placement, Target};
use crate::pool::sweep;
use crate::pool::Pool;
use crate::supervise::Supervisor;

/// Put the checkpoint's allocations and cooldowns back. (Pods the host shows no trace of are
/// released by the first sweep, before ipamd serves.) Returns what was dropped and why.
pub fn restore(ds: &mut Datastore, loaded: &checkpoint::Loaded, now: SystemTime) -> Vec<String> {
    let mut dropped = Vec::new();
    for e in &loaded.entries {
        let Some((key, ip, pod, at)) = checkpoint::entry_key(e) else {
            // `checkpoint::parse` refuses such files; nothing to do here.
            continue;
        };
        if ds.address_state(ip).is_none() {
            dropped.push(format!(
                "{} ({}/{}) uses {ip}, which no ENI of this node holds any more; dropped",
                key.container_id, pod.namespace, pod.name
            ));
            continue;
        }
        if !ds.restore(key.clone(), ip, pod, at) {
            dropped.push(format!(
                "{} on {ip}: address already taken by another entry; dropped",
                key.container_id
            ));
        }
    }
    for c in &loaded.cooldowns {
        let Some(ip) = c.address() else {
            continue;
        };
        let at = checkpoint::from_nanos(c.released_at);
        if now.duration_since(at).unwrap_or_default() < ds.cooldown_period() {
            ds.restore_cooldown(ip, at);
        }
    }
    dropped
}

/// What an operator reads when the checkpoint cannot be used.
fn unusable_checkpoint(e: &checkpoint::LoadError, cfg: &Config) -> anyhow::Error {
    anyhow::anyhow!(
        "{e}. ipamd will not start: every address in that file may belong to a running pod, and \
         starting without it would give those addresses to new pods. The file is left as it is. \
         To recover, run `ipamd --recover` with the same environment: it rebuilds the allocations \
         from this node's host routes and the plugin's records under {}, keeps the old file as \
         {}.unusable-<time>, and writes a new one; then start ipamd again. On a node with no pods, \
         moving the file away is enough.",
        cfg.cni_state_dir.display(),
        cfg.backing_store.display()
    )
}

/// Release what DELs recorded while ipamd was unreachable, and what the host shows no trace
/// of; make it durable; then delete the records applied. One pass of the sweeper.
async fn sweep_once(shared: &Pool, links: &Links, cfg: &Config, at_start: bool) {
    let (pending, problems) = sweep::pending_releases(&cfg.cni_state_dir);
    for p in &problems {
        warn!("{p}; left in place");
    }
    let host = match links.host_view().await {
        Ok(h) => Some(h),
        Err(e) => {
            warn!(error = %e, "cannot read the host's links and routes; no address is released on the host's account this time");
            None
        }
    };
    let grace = cfg.timing.allocation_grace;
    let (from_records, candidates) = {
        let mut ds = shared.ds.lock().await;
        let now = SystemTime::now();
        let from_records = sweep::apply_releases(&mut ds, &pending, now);
        let candidates = host
            .as_ref()
            .map(|h| sweep::candidates(&ds, h, &cfg.veth_prefix, now, grace))
            .unwrap_or_default();
        (from_records, candidates)
    };
    // The plugin's records are read without holding the pool: ADDs go on meanwhile.
    let gone = match &host {
        Some(h) if !candidates.is_empty() => {
            sweep::confirm(candidates, h, &sweep::state_reader(&cfg.cni_state_dir))
        }
        _ => Vec::new(),
    };
    let (orphans, gen) = {
        let mut ds = shared.ds.lock().await;
        let now = SystemTime::now();
        let mut orphans = Vec::new();
        for (k, ip) in gone {
            // Only the allocation that was looked at: not one made since for the same key.
            if ds.allocation(&k).map(|a| a.ip) == Some(ip) {
                orphans.extend(ds.release(&k, now));
            }
        }
        (orphans, ds.generation())
    };
    if pending.is_empty() && orphans.is_empty() {
        return;
    }
    if let Err(e) = shared.committer.commit(gen).await {
        // The records stay: the next pass applies them again (a no-op in memory) and retries.
        warn!(error = %e, "checkpoint after releasing addresses; release records kept");
        return;
    }
    for a in &from_records {
        info!(container = %a.key.container_id, pod = %format!("{}/{}", a.pod.namespace, a.pod.name), ip = %a.ip, at_start, "released by a DEL recorded while ipamd was unreachable");
    }
    for a in &orphans {
        warn!(container = %a.key.container_id, pod = %format!("{}/{}", a.pod.namespace, a.pod.name), ip = %a.ip, at_start, "{} ({}/{}) on {}: no host route and no host veth; released into cooldown (no DEL came)", a.key.container_id, a.pod.namespace, a.pod.name, a.ip);
    }
    for p in &pending {
        if let Err(e) = cni_common::fsio::remove_if_exists(&p.path) {
            warn!(record = %p.path.display(), error = %e, "cannot remove an applied release record");
        }
    }
    shared.pool_changed.notify_one();
    shared.update_health().await;
}

/// `ipamd --recover`: the checkpoint is lost or unusable. Rebuild the allocations from what
/// the node itself shows: every plugin record whose host route or veth exists, and every
/// host route to a veth of ours that no record explains (kept under a placeholder key until
/// the sweeper sees its route gone). Releases recorded by DELs are honoured. The old file is
/// kept beside the new one. Returns a report.
pub async fn recover(cfg: &Config) -> anyhow::Result<String> {
    let links = Links::new().context("open a netlink socket")?;
    let host = links
        .host_view()
        .await
        .context("read the host's links and routes (recovery needs a successful look)")?;
    let (pending, problems) = sweep::pending_releases(&cfg.cni_state_dir);
    if !problems.is_empty() {
        bail!("cannot read release records: {}", problems.join("; "));
    }
    let released: std::collections::HashSet<(String, String, String)> = pending
        .iter()
        .map(|p| {
            (
                p.record.network_name.clone(),
                p.record.container_id.clone(),
                p.record.if_name.clone(),
            )
        })
        .collect();
    let records = cni_common::state::list_attachments(&cfg.cni_state_dir).with_context(|| {
        format!(
            "read the plugin's records under {}",
            cfg.cni_state_dir.display()
        )
    })?;
    let now = checkpoint::to_nanos(SystemTime::now());
    let mut report = Vec::new();
    let mut entries = Vec::new();
    let mut covered = std::collections::HashSet::new();
    for st in records {
        let key = (
            st.network_name.clone(),
            st.container_id.clone(),
            st.ifname.clone(),
        );
        let live = host.host_routes.contains_key(&st.ip) || host.links.contains(&st.host_veth);
        if released.contains(&key) || !live || !covered.insert(st.ip) {
            report.push(format!(
                "skipped {} ({}/{}) {}: {}",
                st.container_id,
                st.pod_namespace,
                st.pod_name,
                st.ip,
                if released.contains(&key) {
                    "its DEL was recorded"
                } else if !live {
                    "no host route or veth"
                } else {
                    "address already recovered"
                }
            ));
            continue;
        }
        report.push(format!(
            "recovered {} ({}/{}) {}",
            st.container_id, st.pod_namespace, st.pod_name, st.ip
        ));
        entries.push(checkpoint::Entry {
            network_name: st.network_name,
            container_id: st.container_id,
            if_name: st.ifname,
            ipv4: checkpoint::address_fields(st.ip).0,
            ipv6: checkpoint::address_fields(st.ip).1,
            allocation_timestamp: now,
            metadata: checkpoint::Metadata {
                k8s_pod_namespace: st.pod_namespace,
                k8s_pod_name: st.pod_name,
                interfaces_count: 1,
                k8s_pod_uid: String::new(),
            },
        });
    }
    let mut unexplained: Vec<_> = host
        .host_routes
        .iter()
        .filter(|(ip, link)| link.starts_with(&cfg.veth_prefix) && !covered.contains(*ip))
        .collect();
    unexplained.sort();
    for (ip, link) in unexplained {
        report.push(format!(
            "recovered {ip} (host route via {link}, no plugin record: held as recovered-{ip} until its route goes)"
        ));
        entries.push(checkpoint::Entry {
            network_name: "aws-cni".into(),
            container_id: format!("recovered-{ip}"),
            if_name: "eth0".into(),
            ipv4: checkpoint::address_fields(*ip).0,
            ipv6: checkpoint::address_fields(*ip).1,
            allocation_timestamp: now,
            metadata: checkpoint::Metadata::default(),
        });
    }
    entries.sort_by(|a, b| (&a.ipv4, &a.ipv6).cmp(&(&b.ipv4, &b.ipv6)));
    let path = &cfg.backing_store;
    if path.exists() {
        let kept = std::path::PathBuf::from(format!(
            "{}.unusable-{}",
            path.display(),
            now / 1_000_000_000
        ));
        std::fs::rename(path, &kept)
            .with_context(|| format!("keep the old checkpoint as {}", kept.display()))?;
        report.push(format!("old checkpoint kept as {}", kept.display()));
    }
    let n = entries.len();
    checkpoint::write_atomic(
        path,
        &checkpoint::Checkpoint {
            version: checkpoint::FORMAT_VERSION.into(),
            allocations: entries,
            cooldowns: Vec::new(),
        },
    )
    .with_context(|| format!("write {}", path.display()))?;
    report.push(format!("wrote {} with {n} allocation(s)", path.display()));
    Ok(report.join("\n"))
}

/// The EC2 side of a node: the client, IMDS and what the pool manager needs.
pub struct CloudSetup {
    pub primary_mac: String,
    pub primary_ip: Ipv4Addr,
    /// An IPv6 node's (ENABLE_IPv6) IPv6 side.
    pub ipv6: Option<NodeIpv6>,
    pub ec2: Arc<Guarded<SdkEc2>>,
    pub imds: Arc<Imds>,
    pub node: CloudNode,
    pub az: String,
}

/// An IPv6 node: the primary ENI's address and its one /80, the VPC's IPv6 CIDRs.
#[derive(Debug, Clone)]
pub struct NodeIpv6 {
    pub primary_ip: Option<std::net::Ipv6Addr>,
    pub prefix: ipnet::Ipv6Net,
    pub vpc_cidrs: Vec<ipnet::Ipv6Net>,
}

/// The primary ENI's IPv6 /80: the one EC2 lists, else one assigned now (with provisioning
/// on), as upstream. More than one listed: the first serves, the others are left alone.
async fn ipv6_prefix(
    cfg: &Config,
    ec2: &Guarded<SdkEc2>,
    primary: &crate::cloud::EniInfo,
) -> anyhow::Result<ipnet::Ipv6Net> {
    if let Some(p) = primary.ipv6_prefixes.first() {
        if primary.ipv6_prefixes.len() > 1 {
            info!(eni = %primary.id, prefixes = ?primary.ipv6_prefixes, using = %p, "primary ENI has several IPv6 prefixes; pods get addresses from the first");
        }
        return Ok(*p);
    }
    if !cfg.provisioning {
        bail!(
            "the primary ENI {} has no IPv6 prefix and ipamd may not assign one (DISABLE_NETWORK_RESOURCE_PROVISIONING or ENABLE_IMDS_ONLY_MODE): assign an IPv6 /80 prefix to it",
            primary.id
        );
    }
    let got = patiently("AssignIpv6Addresses", || {
        ec2.assign_ipv6_prefixes(&primary.id, 1)
    })
    .await
    .with_context(|| {
        format!(
            "assign an IPv6 /80 prefix to the primary ENI {} (its subnet needs an IPv6 CIDR)",
            primary.id
        )
    })?;
    let p = got.first().copied().with_context(|| {
        format!(
            "AssignIpv6Addresses on {} succeeded but returned no prefix",
            primary.id
        )
    })?;
    info!(eni = %primary.id, prefix = %p, "IPv6 prefix assigned to the primary ENI");
    Ok(p)
}

/// How long start-up keeps retrying an EC2 call that is throttled or fails transiently. A fleet
/// started together meets the account's limits; exiting (and being restarted by the DaemonSet
/// to try again at once) would only add to the storm.
const INIT_PATIENCE: Duration = Duration::from_secs(600);

/// Run a start-up EC2 call until it succeeds, fails for good, or `INIT_PATIENCE` runs out,
/// backing off (jittered, 1 s doubling to 30 s) between the guard's own retries.
async fn patiently<T, F, Fut>(what: &str, mut f: F) -> Result<T, crate::cloud::CloudError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::cloud::CloudError>>,
{
    let started = std::time::Instant::now();
    let mut attempt = 0u32;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.retryable() && started.elapsed() < INIT_PATIENCE => {
                attempt += 1;
                let pause = crate::cloud::guard::backoff(
                    attempt,
                    Duration::from_secs(1),
                    Duration::from_secs(30),
                    rand::random::<f64>(),
                );
                warn!(what, error = %e, attempt, pause_s = pause.as_secs_f64(), "start-up waits for EC2");
                tokio::time::sleep(pause).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Read the instance from IMDS, then confirm its ENIs with one DescribeNetworkInterfaces: EC2
/// decides what each ENI holds, IMDS may lag behind it.
async fn cloud_node(cfg: &Config) -> anyhow::Result<(NodeInfo, InstanceLimits, CloudSetup)> {
    let imds = Imds::new();
    let meta = imds
        .instance()
        .await
        .context("read the instance from IMDS (AWS_EC2_METADATA_SERVICE_ENDPOINT)")?;
    let primary = meta
        .primary()
        .with_context(|| {
            format!(
                "IMDS lists no interface for the primary MAC {}",
                meta.primary_mac
            )
        })?
        .clone();
    let ec2 = Arc::new(Guarded::new(
        SdkEc2::new(
            &meta.region,
            cfg.ec2_endpoint.as_deref(),
            cfg.http_timeout,
            cfg.vpc_cni_version.as_deref(),
        )
        .await,
        Bucket::new(cfg.ec2_burst, cfg.ec2_rate),
        RetryPolicy::default(),
    ));
    let limits = match instance_types::lookup(&meta.instance_type) {
        Some(l) => *l,
        None => patiently("DescribeInstanceTypes", || {
            ec2.describe_instance_type(&meta.instance_type)
        })
        .await
        .context("DescribeInstanceTypes for a type missing from the built-in table")?
        .with_context(|| format!("EC2 does not know instance type {:?}", meta.instance_type))?,
    };
    let described = if cfg.imds_only {
        info!("ENABLE_IMDS_ONLY_MODE: the node's ENIs as IMDS lists them, no EC2 call");
        meta.interfaces
            .iter()
            .map(|i| i.as_eni_info(&meta.instance_id))
            .collect()
    } else {
        patiently("DescribeNetworkInterfaces", || {
            ec2.describe_enis(EniFilter::AttachedTo(meta.instance_id.clone()))
        })
        .await
        .context("DescribeNetworkInterfaces for this instance's ENIs")?
    };
    let mut cloud = CloudNode {
        instance_id: meta.instance_id.clone(),
        primary_mac: meta.primary_mac.clone(),
        vpc_id: primary.vpc_id.clone(),
        subnet_id: primary.subnet_id.clone(),
        subnet_cidr: primary.subnet_cidr,
        security_groups: primary.security_groups.clone(),
        ..Default::default()
    };
    let mut enis = Vec::new();
    for info in &described {
        let Some(att) = &info.attachment else {
            continue;
        };
        // IMDS shows no tags: upstream's IMDS-only mode manages every ENI on the first card.
        if let Some(why) = info.left_alone(cfg.manage_untagged_enis || cfg.imds_only) {
            info!(eni = %info.id, device = att.device_index, "ENI left alone: {why}");
            cloud.unmanaged.insert(att.device_index, info.id.clone());
            continue;
        }
        let from_imds = meta.interfaces.iter().find(|i| i.id == info.id);
        match from_imds {
            None => info!(eni = %info.id, "attached in EC2, not yet in IMDS; using EC2's view"),
            Some(i)
                if i.ips.len() != info.secondary_ips.len() + 1 || i.prefixes != info.prefixes =>
            {
                info!(eni = %info.id, imds_ips = i.ips.len(), ec2_ips = info.secondary_ips.len() + 1, "IMDS lags EC2; using EC2's view")
            }
            _ => {}
        }
        let subnet_cidr = match from_imds {
            Some(i) => i.subnet_cidr,
            None if info.subnet_id == primary.subnet_id => primary.subnet_cidr,
            // Custom networking or discovery put it in another subnet, and IMDS has not
            // caught up: EC2 knows the subnet's CIDR.
            None => {
                let id = info.subnet_id.clone();
                let listed = patiently("DescribeSubnets", || {
                    ec2.describe_subnets(crate::cloud::SubnetFilter::Ids(vec![id.clone()]))
                })
                .await
                .with_context(|| format!("DescribeSubnets for ENI {}'s subnet {id}", info.id))?;
                listed
                    .iter()
                    .find_map(|s| s.cidr.filter(|_| s.id == id))
                    .with_context(|| format!("EC2 does not list subnet {id} of ENI {}", info.id))?
            }
        };
        if let Some(e) = crate::pool::lifecycle::from_ec2(info, att.device_index, subnet_cidr) {
            cloud.attachments.insert(info.id.clone(), att.id.clone());
            enis.push(e);
        }
    }
    let Some(primary_ip) = enis.iter().find(|e| e.primary).map(|e| e.primary_ip) else {
        bail!(
            "EC2 lists no primary ENI (device 0) attached to {}",
            meta.instance_id
        );
    };
    let ipv6 = if cfg.ipv6 {
        let primary_info = described
            .iter()
            .find(|i| {
                i.attachment
                    .as_ref()
                    .is_some_and(|a| a.device_index == 0 && a.network_card == 0)
            })
            .context("EC2 lists no primary ENI")?;
        let v6 = imds
            .ipv6_of(&meta.primary_mac)
            .await
            .context("read the primary ENI's IPv6 keys from IMDS")?;
        let mut primary_info = primary_info.clone();
        if cfg.imds_only {
            // No EC2 call in this mode: IMDS's view of the prefix is all there is.
            primary_info.ipv6_prefixes = v6.prefixes.clone();
        }
        let prefix = ipv6_prefix(cfg, &ec2, &primary_info).await?;
        // Upstream: in IPv6 only the primary ENI serves pods, from its one /80, and ipamd
        // attaches no other ENI; the IPv4 addresses ENIs hold are not the pods'.
        enis.retain(|e| e.primary);
        for e in &mut enis {
            e.ips.clear();
            e.prefixes.clear();
            e.ipv6_prefixes = vec![prefix];
            e.primary_ipv6 = e.primary_ipv6.or(v6.addresses.first().copied());
        }
        Some(NodeIpv6 {
            primary_ip: enis.first().and_then(|e| e.primary_ipv6),
            prefix,
            vpc_cidrs: v6.vpc_cidrs,
        })
    } else {
        None
    };
    let node = NodeInfo {
        instance_id: meta.instance_id.clone(),
        region: meta.region.clone(),
        instance_type: meta.instance_type.clone(),
        vpc_cidrs: primary.vpc_cidrs.clone(),
        enis,
    };
    Ok((
        node,
        limits,
        CloudSetup {
            primary_mac: meta.primary_mac.clone(),
            primary_ip,
            ipv6,
            ec2,
            imds: Arc::new(imds),
            node: cloud,
            az: meta.availability_zone.clone(),
        },
    ))
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    if cfg.ipv6 && cfg.node_file.is_some() {
        bail!("IPAMD_NODE_FILE describes IPv4 ENIs only: unset it or ENABLE_IPv6");
    }
    let started = std::time::Instant::now();
    let init = crate::metrics::InProgress::start("nodeInit");
    // The node's iptables back-end (two saves) is looked up while IMDS and EC2 answer.
    let iptables = cfg
        .node_file
        .is_none()
        .then(|| tokio::task::spawn_blocking(crate::hostnet::iptables::Iptables::detect));
    let found = match &cfg.node_file {
        Some(p) => node::load_node_file(p)
            .map_err(anyhow::Error::from)
            .and_then(|node| {
                let limits = *instance_types::lookup(&node.instance_type).with_context(|| {
                    format!(
                        "instance type {:?} is not in the built-in table",
                        node.instance_type
                    )
                })?;
                Ok((node, limits, None))
            }),
        None => cloud_node(&cfg).await.map(|(n, l, c)| (n, l, Some(c))),
    };
    let m = crate::metrics::global();
    m.ipamd_node_initialization_duration_seconds
        .with_label_values(&[if found.is_ok() { "true" } else { "false" }])
        .observe(started.elapsed().as_secs_f64());
    let (node, limits, cloud) = found?;
    let limits = &limits;
    let prefix_delegation = cfg.prefix_delegation && limits.is_nitro();
    if cfg.prefix_delegation && !prefix_delegation {
        warn!(r#type = %node.instance_type, "prefix delegation needs a Nitro instance; using secondary IPs");
    }
    let custom = cfg.kube.custom_networking;
    // IPv6: upstream's prefix-delegation figure (the /80 itself is never the limit).
    let max_pods = if cfg.ipv6 {
        maxpods::node_max_pods(limits, cfg.max_eni, true, false) as usize
    } else {
        maxpods::node_max_pods(limits, cfg.max_eni, prefix_delegation, custom) as usize
    };
    // Every ENI the node may have: under custom networking the primary is one of them even
    // though it hosts no pods.
    let enis_allowed = maxpods::pod_enis(limits, cfg.max_eni, false);
    let capacity = format!(
        "{}: {} ENIs x {} IPv4 addresses ({} for pods), max pods {}",
        node.instance_type,
        enis_allowed,
        limits.ipv4_per_eni,
        enis_allowed * limits.ipv4_per_eni.saturating_sub(1),
        max_pods
    );
    info!(instance = %node.instance_id, r#type = %node.instance_type, %capacity, "node");

    let mut ds = Datastore::new(cfg.cooldown, max_pods);
    let mut enis = node.enis.clone();
    enis.sort_by_key(|e| e.device_number);
    for eni in enis.into_iter().take(enis_allowed as usize) {
        let id = eni.id.clone();
        if let Err(e) = ds.add_eni(eni) {
            warn!(eni = %id, error = %e, "ENI skipped");
        }
    }
    let loaded = checkpoint::load(&cfg.backing_store).map_err(|e| unusable_checkpoint(&e, &cfg))?;
    let links = Links::new().context("open a netlink socket")?;
    for d in restore(&mut ds, &loaded, SystemTime::now()) {
        warn!("checkpoint: {d}");
    }
    let st = ds.stats();
    info!(
        total = st.total,
        assigned = st.assigned,
        cooldown = st.cooldown,
        "pool restored"
    );

    let ds = Arc::new(Mutex::new(ds));
    let committer = Committer::start(cfg.backing_store.clone(), ds.clone());
    // Persist what restore dropped, so the file agrees with memory before the first reply.
    let gen = ds.lock().await.generation();
    committer.commit(gen).await?;

    let node_ipv6 = cloud.as_ref().and_then(|c| c.ipv6.clone());
    let mut pool = Pool::new(
        ds,
        committer,
        node.vpc_cidrs.clone(),
        cfg.external_snat,
        capacity,
        // IPv6 keeps no warm pool: nothing refills, an ADD never waits for a refill.
        cloud.is_some() && !cfg.ipv6,
    );
    pool.vpc_v6_cidrs = node_ipv6
        .as_ref()
        .map(|v| v.vpc_cidrs.clone())
        .unwrap_or_default();
    let shared = Arc::new(pool);
    // Before the first request: releases DELs recorded while ipamd was away, and pods the host
    // shows no trace of.
    sweep_once(&shared, &links, &cfg, true).await;
    shared.initialised.store(true, Ordering::Release);
    shared.update_health().await;

    let m = crate::metrics::global();
    m.eni_max.set(enis_allowed as i64);
    m.ip_max.set(
        (enis_allowed as i64)
            * (limits.ipv4_per_eni.saturating_sub(1) as i64)
            * if prefix_delegation { 16 } else { 1 },
    );
    let mut tasks = Supervisor::default();
    let kube = start_kube(&cfg, &mut tasks).await?;
    drop(init);
    m.ipamd_startup_duration_seconds
        .with_label_values(&["true", if kube.is_some() { "true" } else { "false" }, ""])
        .observe(started.elapsed().as_secs_f64());
    if let Some(k) = &kube {
        let _ = shared.kube.set(k.clone());
    }
    let info = Arc::new(crate::api::http::Introspect {
        ipamd_env: cfg.ipamd_debug_json(),
        network_env: cfg.network_debug_json(),
        settings: cfg.settings_json(),
        eniconfig_keys: cfg.kube.keys.clone(),
    });
    if let Some(a) = cfg.metrics.clone() {
        tasks.spawn(
            "metrics server",
            crate::api::http::serve(a, shared.clone(), true, info.clone()),
        );
    }
    if let Some(a) = cfg.introspection.clone() {
        tasks.spawn(
            "introspection server",
            crate::api::http::serve(a, shared.clone(), false, info.clone()),
        );
    }

    // Addresses of pods whose DEL never arrived, or arrived while ipamd was away, go back.
    let reaper = links.clone();
    let sweeper = shared.clone();
    let sweep_cfg = cfg.clone();
    let fault = std::env::var("IPAMD_TEST_FAULT").unwrap_or_default();
    tasks.spawn("sweeper", async move {
        let mut t = tokio::time::interval(sweep_cfg.timing.reconcile);
        t.tick().await;
        loop {
            t.tick().await;
            if fault == "sweeper-stops" {
                // Test-only: shows that a background task ending is noticed.
                return;
            }
            sweep_once(&sweeper, &links, &sweep_cfg, false).await;
        }
    });

    // Host veths the plugin retired at DEL (instead of waiting for their deletion) go here
    // when the runtime's namespace teardown did not take them already.
    tasks.spawn("veth reaper", async move {
        let mut t = tokio::time::interval(VETH_REAP_PERIOD);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            t.tick().await;
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            match reaper.reap_retired(now, VETH_REAP_GRACE.as_secs()).await {
                Ok(gone) if !gone.is_empty() => {
                    tracing::debug!(count = gone.len(), links = ?gone, "retired host veths deleted")
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "retired host veths not deleted; next pass retries"),
            }
        }
    });

    // Cooldowns expire on their own; health must follow them without a request.
    let ticker = shared.clone();
    tasks.spawn("readiness ticker", async move {
        let mut t = tokio::time::interval(Duration::from_secs(1));
        loop {
            t.tick().await;
            ticker.committer.retry();
            ticker.update_health().await;
        }
    });

    if let Some(c) = cloud {
        // The node's networking comes before the first pod: host rules and SNAT, then every
        // secondary ENI already attached (a restart finds them in place and changes nothing).
        let net = Arc::new(
            NodeNetwork::new(
                cfg.net.clone(),
                &c.primary_mac,
                c.primary_ip,
                match iptables {
                    Some(d) => d.await.unwrap_or_default(),
                    None => Default::default(),
                },
            )
            .await
            .with_context(|| format!("find the primary ENI's link (MAC {})", c.primary_mac))?,
        );
        if cfg.ipv6 {
            net.setup_host_ipv6()
                .await
                .context("set up node networking (IPv6 node)")?;
        } else {
            net.setup_host(&node.vpc_cidrs)
                .await
                .context("set up node networking (rules, SNAT)")?;
            if cfg.v6_egress {
                net.ipv6_forwarding()
                    .await
                    .context("IPv6 forwarding for IPv6 egress (ENABLE_V6_EGRESS)")?;
                net.block_node_local(true)
                    .await
                    .context("block pods' node-local IPv6 egress addresses (ENABLE_V6_EGRESS)")?;
            }
        }
        let secondary: Vec<Eni> = shared
            .ds
            .lock()
            .await
            .enis()
            .filter(|e| !e.primary)
            .cloned()
            .collect();
        for e in &secondary {
            if let Err(err) = net.setup_eni(e, Duration::from_secs(5)).await {
                warn!(eni = %e.id, error = %err, "ENI networking not set up; pods on it will not work");
            }
        }
        let mut targets = cfg.targets.clone();
        targets.prefix_delegation = prefix_delegation;
        let unmanaged = c.node.unmanaged.len();
        let node_subnet = (
            c.node.subnet_id.clone(),
            c.node.subnet_cidr,
            c.node.security_groups.clone(),
        );
        let node_vpc = c.node.vpc_id.clone();
        let mgr = Manager::new(
            c.ec2.clone(),
            shared.clone(),
            Some(c.imds.clone()),
            c.node,
            Limits {
                max_enis: (enis_allowed as usize).max(unmanaged + 1),
                slots_per_eni: limits.ipv4_per_eni.saturating_sub(1) as usize,
                primary_hosts_pods: !custom,
            },
            targets,
            cfg.timing.clone(),
            cfg.cluster_name.clone(),
            cfg.additional_eni_tags.clone(),
            !cfg.disable_leaked_eni_cleanup,
        );
        let mut mgr = mgr;
        let net: Arc<dyn crate::pool::lifecycle::NodeNetworking> = net;
        mgr.net = Some(net);
        let node_target = Target {
            subnet_id: node_subnet.0,
            subnet_cidr: node_subnet.1,
            security_groups: node_subnet.2,
            why: "the node's subnet".into(),
        };
        let mode = match &kube {
            Some(k) if cfg.kube.custom_networking => Mode::Custom {
                keys: cfg.kube.keys.clone(),
                node_name: cfg.kube.node_name.clone().unwrap_or_default(),
                view: k.view.clone(),
            },
            _ if cfg.kube.subnet_discovery => Mode::Discovery {
                cluster: cfg.cluster_name.clone(),
            },
            _ => Mode::NodeSubnet,
        };
        let placement = Arc::new(Placement::new(mode, node_target, node_vpc, c.az.clone()));
        let _ = shared.placement.set(placement.clone());
        mgr.placement = placement;
        if let Some(k) = &kube {
            mgr.events = k.events.clone();
            mgr.node_view = Some(k.view.clone());
        }
        mgr.provisioning = cfg.provisioning;
        mgr.manage_cordoned = cfg.manage_enis_non_schedulable;
        mgr.manage_untagged = cfg.manage_untagged_enis || cfg.imds_only;
        mgr.imds_only = cfg.imds_only;
        if let Some(v6) = &node_ipv6 {
            // Upstream attaches no ENI and keeps no warm pool in IPv6: the /80 is the pool.
            info!(prefix = %v6.prefix, "IPv6 pods: addresses from the primary ENI's prefix; no pool manager");
        } else {
            tasks.spawn("pool manager", mgr.run());
        }
    }

    // On SIGTERM the server stops taking connections and finishes what is in flight; a client
    // that keeps an idle connection open must not hold the node's daemon up, so the wait is
    // bounded.
    let stopping = Arc::new(tokio::sync::Notify::new());
    let s2 = stopping.clone();
    let signalled = async move {
        shutdown_signal().await;
        s2.notify_one();
    };
    let policy = server::PolicyConfig {
        mode: cfg.network_policy_mode.clone(),
        node_ipv4: node
            .enis
            .iter()
            .find(|e| e.primary)
            .map(|e| e.primary_ip.to_string())
            .unwrap_or_default(),
        node_ipv6: node_ipv6
            .as_ref()
            .and_then(|v| v.primary_ip)
            .map(|ip| ip.to_string())
            .unwrap_or_default(),
        instance_id: node.instance_id.clone(),
        region: node.region.clone(),
    };
    if !policy.mode.is_empty() {
        info!(mode = %policy.mode, "NETWORK_POLICY_ENFORCING_MODE: the plugin asks the network policy agent at every ADD and DEL");
    }
    let health = shared.clone();
    tokio::select! {
        r = server::serve(&cfg.socket, shared, policy, signalled) => r,
        (task, how) = tasks.ended() => {
            // Serving on without it would look healthy while addresses go unmanaged.
            error!(task, how = %how, "background task stopped; exiting so that ipamd is restarted");
            health.initialised.store(false, Ordering::Release);
            health.update_health().await;
            Err(anyhow::anyhow!("background task {task} {how}"))
        }
        _ = async {
            stopping.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            warn!("connections still open {}s after SIGTERM; exiting", SHUTDOWN_GRACE.as_secs());
            Ok(())
        }
    }
}

/// The Kubernetes client and its background work, when a feature needs it or the API is
/// configured (Events are then posted too). A feature that needs the API without any way to
/// reach it configured stops the start, naming both; an API server that does not answer does
/// not (the watches retry).
async fn start_kube(
    cfg: &Config,
    tasks: &mut Supervisor,
) -> anyhow::Result<Option<crate::k8s::Kube>> {
    if cfg.node_file.is_some() {
        return Ok(None);
    }
    let client_cfg = match crate::k8s::client_config(&cfg.kube).await {
        Ok(c) => c,
        Err(e) if cfg.kube.needed() => {
            let what = if cfg.kube.custom_networking {
                "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=true"
            } else {
                "ANNOTATE_POD_IP=true"
            };
            return Err(e.context(format!("{what} needs the Kubernetes API")));
        }
        Err(e) => {
            info!(error = %format!("{e:#}"), "no Kubernetes API configured; running without it (no Events)");
            return Ok(None);
        }
    };
    let url = client_cfg.cluster_url.to_string();
    let client = kube::Client::try_from(client_cfg).context("build the Kubernetes client")?;
    // The cordon is read from the Node (its name from MY_NODE_NAME, as upstream).
    let watch_node = !cfg.manage_enis_non_schedulable && cfg.kube.node_name.is_some();
    let k = crate::k8s::start(client, &cfg.kube, watch_node, tasks);
    info!(%url, custom_networking = cfg.kube.custom_networking, annotate_pod_ip = cfg.kube.annotate_pod_ip, "Kubernetes API client started");
    Ok(Some(k))
}

/// How often retired host veths are looked for, and how old one must be (the runtime's own
/// namespace teardown usually deletes the pair first): none outlives its DEL by 10 s.
const VETH_REAP_PERIOD: Duration = Duration::from_secs(5);
const VETH_REAP_GRACE: Duration = Duration::from_secs(4);

/// How long in-flight requests get after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!("shutting down");
}
