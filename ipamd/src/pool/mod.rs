//! The address pool as the rest of ipamd sees it: one owner for the datastore, the
//! checkpoint, readiness and the pool manager's growth notes.

pub mod checkpoint;
pub mod datastore;
pub mod lifecycle;
pub mod manager;
pub mod placement;
pub mod sweep;
pub mod warm;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cni_proto::FailureReason;
use tokio::sync::{Mutex, Notify};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::pool::checkpoint::{CommitError, Committer};
use crate::pool::datastore::{Allocation, AssignError, Datastore, Key, PodMeta};

/// The address pool: the datastore, its checkpoint, readiness and what the pool manager says
/// about growth. The gRPC and HTTP servers use it through the operations below (assign and
/// wait, release, collect, status, inspect); the pool manager and the sweeper, which are part
/// of the pool, use its fields.
pub struct Pool {
    pub ds: Arc<Mutex<Datastore>>,
    pub committer: Arc<Committer>,
    /// The VPC's CIDRs, refreshed by the reconcile when the VPC gains or loses one.
    pub vpc_cidrs: std::sync::RwLock<Vec<ipnet::Ipv4Net>>,
    /// The VPC's IPv6 CIDRs (IPv6 nodes), for replies' VPCv6CIDRs.
    pub vpc_v6_cidrs: Vec<ipnet::Ipv6Net>,
    pub external_snat: bool,
    /// Words for "the instance's limit", e.g. "t3.medium: 3 ENIs x 5 IPv4 addresses".
    pub capacity: String,
    /// Set once the node's ENIs are loaded and the checkpoint restored.
    pub initialised: AtomicBool,
    pub health: HealthReporter,
    /// A pool manager runs (EC2 mode): ADD may wait for a refill under way.
    pub managed: bool,
    /// Wakes the pool manager: an allocation changed.
    pub pool_changed: Notify,
    /// The pool manager added addresses (or gave up for now).
    pub pool_grew: Notify,
    /// The pool manager is adding addresses right now.
    pub growing: AtomicBool,
    /// Why the pool cannot grow at the moment (subnet full, throttled...), for ADD replies.
    pub pool_note: std::sync::Mutex<Option<(FailureReason, String)>>,
    /// The pool is at its ceiling (max pods or every ENI full), in words.
    pub ceiling: std::sync::Mutex<Option<String>>,
    /// The Kubernetes side, once started (watches, Events, the pod IP annotation).
    pub kube: std::sync::OnceLock<crate::k8s::Kube>,
    /// Where new ENIs go, for introspection (`/v1/eni-configs`).
    pub placement: std::sync::OnceLock<Arc<placement::Placement>>,
}

impl Pool {
    pub fn new(
        ds: Arc<Mutex<Datastore>>,
        committer: Arc<Committer>,
        vpc_cidrs: Vec<ipnet::Ipv4Net>,
        external_snat: bool,
        capacity: String,
        managed: bool,
    ) -> Pool {
        let (health, _) = tonic_health::server::health_reporter();
        Pool {
            ds,
            committer,
            vpc_cidrs: std::sync::RwLock::new(vpc_cidrs),
            vpc_v6_cidrs: Vec::new(),
            external_snat,
            capacity,
            initialised: AtomicBool::new(false),
            health,
            managed,
            pool_changed: Notify::new(),
            pool_grew: Notify::new(),
            growing: AtomicBool::new(false),
            pool_note: Default::default(),
            ceiling: Default::default(),
            kube: Default::default(),
            placement: Default::default(),
        }
    }

    /// Why an ADD finds the pool empty, in the words and code the plugin reports.
    pub fn empty_pool_reason(&self, err: &AssignError) -> (FailureReason, String) {
        if let Some((reason, note)) = self.pool_note.lock().ok().and_then(|g| g.clone()) {
            return (reason, format!("{err}: {note}"));
        }
        let ceiling = self.ceiling.lock().ok().and_then(|g| g.clone());
        match ceiling {
            Some(c) if self.managed => (
                FailureReason::PoolEmpty,
                format!("{err}; instance limit {}: {c}", self.capacity),
            ),
            _ => (
                FailureReason::PoolEmpty,
                format!("{err}; instance limit {}", self.capacity),
            ),
        }
    }

    /// Re-evaluate health. Upstream's probes (liveness and readiness alike) ask for service
    /// "" and upstream names "grpc.health.v1.aws-node": both say ipamd is up, so an empty pool
    /// never gets aws-node restarted. "rpc.CNIBackend" says an ADD would get an address now:
    /// our readiness probe and the entrypoint (before it writes the conflist) ask for it.
    pub async fn update_health(&self) {
        let alive = self.initialised.load(Ordering::Acquire);
        // An ADD also needs its allocation on disk: a checkpoint that cannot be written makes
        // every ADD fail, so the node is not ready then either.
        let ready = alive
            && self.committer.healthy()
            && self.ds.lock().await.can_allocate(SystemTime::now());
        let status = |ok| {
            if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        for name in cni_proto::health::LIVE {
            self.health.set_service_status(name, status(alive)).await;
        }
        self.health
            .set_service_status(cni_proto::health::READY, status(ready))
            .await;
    }

    /// Give `key` an address, waiting (up to `ADD_WAIT`) for a refill under way or for the
    /// first address to leave cooldown; durable before it returns. A refusal carries the
    /// reason and the words the plugin reports.
    pub async fn assign(
        &self,
        key: Key,
        pod: PodMeta,
    ) -> Result<Allocation, (FailureReason, String)> {
        if !self.initialised.load(Ordering::Acquire) {
            return Err((
                FailureReason::NotReady,
                "ipamd is still initialising: no ENI addresses loaded yet".into(),
            ));
        }
        let m = crate::metrics::global();
        let deadline = tokio::time::Instant::now() + crate::pool::manager::ADD_WAIT;
        let (res, gen) = loop {
            let grew = self.pool_grew.notified();
            tokio::pin!(grew);
            grew.as_mut().enable();
            let (res, gen, cooled) = {
                let mut ds = self.ds.lock().await;
                let res = ds.assign(key.clone(), pod.clone(), SystemTime::now());
                (res, ds.generation(), ds.next_cooldown_end())
            };
            self.pool_changed.notify_one();
            if !matches!(res, Err(AssignError::PoolEmpty { .. })) {
                break (res, gen);
            }
            // An empty pool that the manager is refilling is worth a short wait: the
            // alternative is a failed sandbox and kubelet's retry seconds later.
            let refilling = self.managed
                && (self.growing.load(Ordering::Acquire)
                    || (self.ceiling.lock().is_ok_and(|c| c.is_none())
                        && self.pool_note.lock().is_ok_and(|n| n.is_none())));
            // Only cooldown stands in the way: an address comes free at a known time. Wait
            // for it when that is within the bound, rather than fail the sandbox.
            let cooled = cooled
                .map(|t| {
                    let left = t.duration_since(SystemTime::now()).unwrap_or_default();
                    tokio::time::Instant::now() + left + Duration::from_millis(5)
                })
                .filter(|at| *at <= deadline);
            match (cooled, refilling) {
                (None, false) => break (res, gen),
                (Some(at), _) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = grew.as_mut() => {}
                    }
                }
                (None, true) => {
                    if tokio::time::timeout_at(deadline, grew).await.is_err() {
                        break (res, gen);
                    }
                }
            }
        };
        let alloc = match res {
            Ok(a) => a,
            Err(e @ AssignError::MaxPods(_)) => {
                m.no_available_ip_addresses.inc();
                return Err((FailureReason::MaxPodsReached, e.to_string()));
            }
            Err(e @ AssignError::PoolEmpty { .. }) => {
                m.no_available_ip_addresses.inc();
                let (reason, mut msg) = self.empty_pool_reason(&e);
                if let Some(t) = self.ds.lock().await.next_cooldown_end() {
                    let left = t.duration_since(SystemTime::now()).unwrap_or_default();
                    msg.push_str(&format!(
                        "; the next address leaves cooldown in {:.1}s",
                        left.as_secs_f64()
                    ));
                }
                self.update_health().await;
                return Err((reason, msg));
            }
        };
        if let Err(e) = self.committer.commit(gen).await {
            return Err((FailureReason::Internal, e.to_string()));
        }
        self.update_health().await;
        Ok(alloc)
    }

    /// Release `key`'s address into cooldown, durably. `None`: it held none.
    pub async fn release(&self, key: &Key) -> Result<Option<Allocation>, CommitError> {
        let (released, gen) = {
            let mut ds = self.ds.lock().await;
            let a = ds.release(key, SystemTime::now());
            (a, ds.generation())
        };
        if released.is_none() {
            return Ok(None);
        }
        self.committer.commit(gen).await?;
        self.pool_changed.notify_one();
        self.update_health().await;
        Ok(released)
    }

    /// Runtime GC: release every allocation of `network` whose attachment is not in `valid`.
    pub async fn collect(
        &self,
        network: &str,
        valid: &HashSet<(String, String)>,
    ) -> (Vec<Allocation>, Result<(), CommitError>) {
        let (released, gen) = {
            let mut ds = self.ds.lock().await;
            let stale: Vec<Key> = ds
                .allocations()
                .filter(|a| a.key.network_name == network)
                .filter(|a| !valid.contains(&(a.key.container_id.clone(), a.key.ifname.clone())))
                .map(|a| a.key.clone())
                .collect();
            let now = SystemTime::now();
            let released: Vec<_> = stale.iter().filter_map(|k| ds.release(k, now)).collect();
            (released, ds.generation())
        };
        if released.is_empty() {
            return (released, Ok(()));
        }
        let res = self.committer.commit(gen).await;
        self.pool_changed.notify_one();
        self.update_health().await;
        (released, res)
    }

    /// Can an ADD get an address now, and if not, why (STATUS).
    pub async fn status(&self) -> PoolStatus {
        if !self.initialised.load(Ordering::Acquire) {
            return PoolStatus {
                ready: false,
                reason: FailureReason::NotReady,
                message: "ipamd is still initialising".into(),
                available: 0,
            };
        }
        let mut ds = self.ds.lock().await;
        let ready = ds.can_allocate(SystemTime::now());
        let st = ds.stats();
        let (reason, message) = if ready {
            (FailureReason::Unspecified, String::new())
        } else if st.assigned >= ds.max_pods() {
            (
                FailureReason::MaxPodsReached,
                format!("max pods reached ({})", ds.max_pods()),
            )
        } else {
            (
                FailureReason::PoolEmpty,
                format!(
                    "no IP address available: pool empty ({} assigned, {} in cooldown); instance limit {}",
                    st.assigned, st.cooldown, self.capacity
                ),
            )
        };
        PoolStatus {
            ready,
            reason,
            message,
            available: st.available,
        }
    }

    /// Read the pool (introspection, metrics): `f` runs with the datastore, expired cooldowns
    /// already freed.
    pub async fn inspect<R>(&self, f: impl FnOnce(&Datastore) -> R) -> R {
        let mut ds = self.ds.lock().await;
        ds.expire_cooldowns(SystemTime::now());
        f(&ds)
    }

    /// Why the pool cannot grow right now, when the pool manager knows (subnet full,
    /// throttled, EC2 accepting calls that change nothing...).
    pub fn growth_note(&self) -> Option<String> {
        self.pool_note
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|(_, m)| m.clone()))
    }

    /// The pod IP annotation's writer, when `ANNOTATE_POD_IP` is on.
    pub fn annotator(&self) -> Option<&crate::k8s::annotate::Annotator> {
        self.kube.get().and_then(|k| k.annotator.as_ref())
    }

    pub fn vpc_cidrs(&self) -> Vec<ipnet::Ipv4Net> {
        self.vpc_cidrs.read().map(|v| v.clone()).unwrap_or_default()
    }
}

/// What STATUS reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    pub ready: bool,
    pub reason: FailureReason,
    pub message: String,
    pub available: usize,
}
