//! Start-up and the long-running tasks: load the node, restore the checkpoint, serve.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::checkpoint::{self, Committer};
use crate::config::Config;
use crate::datastore::Datastore;
use crate::instance_types;
use crate::maxpods;
use crate::node::{self, NodeInfo};
use crate::server::{self, Shared};

/// An allocation this young is kept at restart even without a host veth: the plugin may
/// still be wiring it (ipamd answered, then restarted before the veth existed).
pub const RESTORE_GRACE: Duration = Duration::from_secs(60);

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
        let old = now.duration_since(at).unwrap_or_default() >= RESTORE_GRACE;
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

fn describe_node(cfg: &Config) -> anyhow::Result<NodeInfo> {
    match &cfg.node_file {
        Some(p) => Ok(node::load_node_file(p)?),
        None => bail!("no node source: set IPAMD_NODE_FILE (standalone mode); the EC2/IMDS source is not built yet"),
    }
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let node = describe_node(&cfg)?;
    let limits = instance_types::lookup(&node.instance_type).with_context(|| {
        format!(
            "instance type {:?} is not in the built-in table",
            node.instance_type
        )
    })?;
    let max_pods = maxpods::node_max_pods(limits, cfg.max_eni, cfg.prefix_delegation) as usize;
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

    let (health, _) = tonic_health::server::health_reporter();
    let shared = Arc::new(Shared {
        ds,
        committer,
        vpc_cidrs: node.vpc_cidrs.clone(),
        external_snat: cfg.external_snat,
        capacity,
        initialised: Default::default(),
        health,
    });
    shared.initialised.store(true, Ordering::Release);
    shared.update_health().await;

    // Cooldowns expire on their own; health must follow them without a request.
    let ticker = shared.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(1));
        loop {
            t.tick().await;
            ticker.update_health().await;
        }
    });

    server::serve(&cfg.socket, shared, shutdown_signal()).await
}

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
