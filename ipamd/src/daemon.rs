//! Start-up and the long-running tasks: load the node, restore the checkpoint, serve.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::checkpoint::{self, Committer};
use crate::cloud::guard::{Bucket, Guarded, RetryPolicy};
use crate::cloud::imds::Imds;
use crate::cloud::sdk::SdkEc2;
use crate::cloud::{Ec2, EniFilter};
use crate::config::Config;
use crate::datastore::Datastore;
use crate::datastore::Eni;
use crate::instance_types;
use crate::instance_types::InstanceLimits;
use crate::manager::{CloudNode, Limits, Manager};
use crate::maxpods;
use crate::netconf::NodeNetwork;
use crate::node::{self, NodeInfo};
use crate::server::{self, Shared};

/// Allocations whose pod's host veth is gone and which are older than `grace`: the plugin's
/// DEL never reached ipamd (it was down or unreachable; the plugin still cleaned the host).
pub fn orphaned(
    ds: &Datastore,
    veth_prefix: &str,
    now: SystemTime,
    grace: Duration,
    veth_exists: &dyn Fn(&str) -> bool,
) -> Vec<crate::datastore::Key> {
    ds.allocations()
        .filter(|a| !a.pod.name.is_empty())
        .filter(|a| now.duration_since(a.allocated_at).unwrap_or_default() >= grace)
        .filter(|a| {
            !veth_exists(&cni_proto::naming::host_veth_name(
                veth_prefix,
                &a.pod.namespace,
                &a.pod.name,
            ))
        })
        .map(|a| a.key.clone())
        .collect()
}

/// Does a host interface with this name exist in our network namespace?
pub fn link_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Put the checkpoint's allocations and cooldowns back. Returns what was dropped and why.
pub fn restore(
    ds: &mut Datastore,
    loaded: &checkpoint::Loaded,
    veth_prefix: &str,
    now: SystemTime,
    grace: Duration,
    veth_exists: &dyn Fn(&str) -> bool,
) -> Vec<String> {
    let mut dropped = loaded.problems.clone();
    for e in &loaded.entries {
        let Some((key, ip, pod, at)) = checkpoint::entry_key(e) else {
            dropped.push(format!(
                "entry for {} has no usable IPv4 address {:?}",
                e.container_id, e.ipv4
            ));
            continue;
        };
        if ds.address_state(ip).is_none() {
            dropped.push(format!(
                "{} ({}/{}) uses {ip}, which no ENI of this node holds; dropped",
                key.container_id, pod.namespace, pod.name
            ));
            continue;
        }
        let old = now.duration_since(at).unwrap_or_default() >= grace;
        if old && !pod.name.is_empty() {
            let veth = cni_proto::naming::host_veth_name(veth_prefix, &pod.namespace, &pod.name);
            if !veth_exists(&veth) {
                dropped.push(format!(
                    "{} ({}/{}) on {ip}: host veth {veth} is gone; dropped",
                    key.container_id, pod.namespace, pod.name
                ));
                continue;
            }
        }
        if !ds.restore(key.clone(), ip, pod, at) {
            dropped.push(format!(
                "{} on {ip}: address already taken by another entry; dropped",
                key.container_id
            ));
        }
    }
    for c in &loaded.cooldowns {
        let Ok(ip) = c.ipv4.parse::<Ipv4Addr>() else {
            continue;
        };
        let at = checkpoint::from_nanos(c.released_at);
        if now.duration_since(at).unwrap_or_default() < ds.cooldown_period() {
            ds.restore_cooldown(ip, at);
        }
    }
    dropped
}

/// The EC2 side of a node: the client, IMDS and what the pool manager needs.
pub struct CloudSetup {
    pub primary_mac: String,
    pub primary_ip: Ipv4Addr,
    pub ec2: Arc<Guarded<SdkEc2>>,
    pub imds: Arc<Imds>,
    pub node: CloudNode,
}

/// Requests per second to EC2 once the burst is spent, per node.
const EC2_BURST: u32 = 20;
const EC2_RATE: f64 = 10.0;

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
        SdkEc2::new(&meta.region, cfg.ec2_endpoint.as_deref()).await,
        Bucket::new(EC2_BURST, EC2_RATE),
        RetryPolicy::default(),
    ));
    let limits = match instance_types::lookup(&meta.instance_type) {
        Some(l) => *l,
        None => ec2
            .describe_instance_type(&meta.instance_type)
            .await
            .context("DescribeInstanceTypes for a type missing from the built-in table")?
            .with_context(|| format!("EC2 does not know instance type {:?}", meta.instance_type))?,
    };
    let described = ec2
        .describe_enis(EniFilter::AttachedTo(meta.instance_id.clone()))
        .await
        .context("DescribeNetworkInterfaces for this instance's ENIs")?;
    let mut cloud = CloudNode {
        instance_id: meta.instance_id.clone(),
        vpc_id: primary.vpc_id.clone(),
        subnet_id: primary.subnet_id.clone(),
        subnet_cidr: primary.subnet_cidr.clone(),
        security_groups: primary.security_groups.clone(),
        ..Default::default()
    };
    let mut enis = Vec::new();
    for info in &described {
        let Some(att) = &info.attachment else {
            continue;
        };
        let is_primary = att.device_index == 0 && att.network_card == 0;
        if !is_primary && (att.network_card != 0 || info.no_manage()) {
            info!(eni = %info.id, device = att.device_index, "ENI not managed by ipamd (no_manage tag or another network card)");
            cloud.unmanaged.insert(att.device_index, info.id.clone());
            continue;
        }
        let Some(primary_ip) = info.primary_ip else {
            continue;
        };
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
        cloud.attachments.insert(info.id.clone(), att.id.clone());
        enis.push(Eni {
            id: info.id.clone(),
            device_number: att.device_index,
            primary: is_primary,
            mac: info.mac.clone(),
            subnet_cidr: from_imds
                .map(|i| i.subnet_cidr.clone())
                .unwrap_or_else(|| primary.subnet_cidr.clone()),
            primary_ip,
            ips: info.secondary_ips.clone(),
            prefixes: info.prefixes.clone(),
            attached_at: SystemTime::now(),
        });
    }
    let Some(primary_ip) = enis.iter().find(|e| e.primary).map(|e| e.primary_ip) else {
        bail!(
            "EC2 lists no primary ENI (device 0) attached to {}",
            meta.instance_id
        );
    };
    let node = NodeInfo {
        instance_id: meta.instance_id.clone(),
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
            ec2,
            imds: Arc::new(imds),
            node: cloud,
        },
    ))
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let (node, limits, cloud) = match &cfg.node_file {
        Some(p) => {
            let node = node::load_node_file(p)?;
            let limits = *instance_types::lookup(&node.instance_type).with_context(|| {
                format!(
                    "instance type {:?} is not in the built-in table",
                    node.instance_type
                )
            })?;
            (node, limits, None)
        }
        None => {
            let (n, l, c) = cloud_node(&cfg).await?;
            (n, l, Some(c))
        }
    };
    let limits = &limits;
    let prefix_delegation = cfg.prefix_delegation && limits.is_nitro();
    if cfg.prefix_delegation && !prefix_delegation {
        warn!(r#type = %node.instance_type, "prefix delegation needs a Nitro instance; using secondary IPs");
    }
    let max_pods = maxpods::node_max_pods(limits, cfg.max_eni, prefix_delegation) as usize;
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
    let loaded = checkpoint::load(&cfg.backing_store).with_context(|| {
        format!(
            "cannot read checkpoint {}; refusing to start without knowing which addresses pods hold",
            cfg.backing_store.display()
        )
    })?;
    for d in restore(
        &mut ds,
        &loaded,
        &cfg.veth_prefix,
        SystemTime::now(),
        cfg.timing.allocation_grace,
        &link_exists,
    ) {
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
    committer.commit(gen).await.map_err(anyhow::Error::msg)?;

    let shared = Arc::new(Shared::new(
        ds,
        committer,
        node.vpc_cidrs.clone(),
        cfg.external_snat,
        capacity,
        cloud.is_some(),
    ));
    shared.initialised.store(true, Ordering::Release);
    shared.update_health().await;

    let m = crate::metrics::global();
    m.eni_max.set(enis_allowed as i64);
    m.ip_max.set(
        (enis_allowed as i64)
            * (limits.ipv4_per_eni.saturating_sub(1) as i64)
            * if prefix_delegation { 16 } else { 1 },
    );
    if let Some(a) = cfg.metrics {
        tokio::spawn(crate::http::serve(a, shared.clone(), true));
    }
    if let Some(a) = cfg.introspection {
        tokio::spawn(crate::http::serve(a, shared.clone(), false));
    }

    // Addresses of pods whose DEL never arrived go back to the pool.
    let sweeper = shared.clone();
    let (veth_prefix, grace, every) = (
        cfg.veth_prefix.clone(),
        cfg.timing.allocation_grace,
        cfg.timing.reconcile,
    );
    tokio::spawn(async move {
        let mut t = tokio::time::interval(every);
        t.tick().await;
        loop {
            t.tick().await;
            let (released, gen) = {
                let mut ds = sweeper.ds.lock().await;
                let now = SystemTime::now();
                let stale = orphaned(&ds, &veth_prefix, now, grace, &link_exists);
                let released: Vec<_> = stale.iter().filter_map(|k| ds.release(k, now)).collect();
                (released, ds.generation())
            };
            if released.is_empty() {
                continue;
            }
            for a in &released {
                warn!(container = %a.key.container_id, pod = %format!("{}/{}", a.pod.namespace, a.pod.name), ip = %a.ip, "pod's host veth is gone and no DEL came; address released");
            }
            if let Err(e) = sweeper.committer.commit(gen).await {
                warn!(error = %e, "checkpoint after releasing orphaned allocations");
            }
            sweeper.pool_changed.notify_one();
            sweeper.update_health().await;
        }
    });

    // Cooldowns expire on their own; health must follow them without a request.
    let ticker = shared.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(1));
        loop {
            t.tick().await;
            ticker.update_health().await;
        }
    });

    if let Some(c) = cloud {
        // The node's networking comes before the first pod: host rules and SNAT, then every
        // secondary ENI already attached (a restart finds them in place and changes nothing).
        let net = Arc::new(
            NodeNetwork::new(cfg.net.clone(), &c.primary_mac, c.primary_ip)
                .await
                .with_context(|| format!("find the primary ENI's link (MAC {})", c.primary_mac))?,
        );
        net.setup_host(&node.vpc_cidrs)
            .await
            .context("set up node networking (rules, SNAT)")?;
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
        let mgr = Manager::new(
            c.ec2.clone(),
            shared.clone(),
            Some(c.imds.clone()),
            c.node,
            Limits {
                max_enis: (enis_allowed as usize).max(unmanaged + 1),
                slots_per_eni: limits.ipv4_per_eni.saturating_sub(1) as usize,
            },
            targets,
            cfg.timing.clone(),
            cfg.cluster_name.clone(),
            cfg.additional_eni_tags.clone(),
            !cfg.disable_leaked_eni_cleanup,
        );
        let mut mgr = mgr;
        mgr.net = Some(net);
        tokio::spawn(mgr.run());
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
    tokio::select! {
        r = server::serve(&cfg.socket, shared, signalled) => r,
        _ = async {
            stopping.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            warn!("connections still open {}s after SIGTERM; exiting", SHUTDOWN_GRACE.as_secs());
            Ok(())
        }
    }
}

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
