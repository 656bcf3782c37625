//! The gRPC side: `CNIBackend` for the plugin and `grpc.health.v1` for probes, on a unix socket.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use cni_proto::cni_backend_server::{CniBackend, CniBackendServer};
use cni_proto::*;
use tokio::net::UnixListener;
use tokio::sync::{Mutex, Notify};
use tonic::{Request, Response, Status};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::{info, info_span, warn, Instrument};

use crate::checkpoint::Committer;
use crate::datastore::{AssignError, Datastore, Key, PodMeta};

/// State shared by the gRPC handlers and the rest of the daemon.
pub struct Shared {
    pub ds: Arc<Mutex<Datastore>>,
    pub committer: Arc<Committer>,
    /// The VPC's CIDRs, refreshed by the reconcile when the VPC gains or loses one.
    pub vpc_cidrs: std::sync::RwLock<Vec<String>>,
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
}

impl Shared {
    pub fn new(
        ds: Arc<Mutex<Datastore>>,
        committer: Arc<Committer>,
        vpc_cidrs: Vec<String>,
        external_snat: bool,
        capacity: String,
        managed: bool,
    ) -> Shared {
        let (health, _) = tonic_health::server::health_reporter();
        Shared {
            ds,
            committer,
            vpc_cidrs: std::sync::RwLock::new(vpc_cidrs),
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

    /// Re-evaluate readiness: SERVING only while an ADD would get an address.
    pub async fn update_health(&self) {
        let ok = self.initialised.load(Ordering::Acquire)
            && self.ds.lock().await.can_allocate(SystemTime::now());
        let status = if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.health.set_service_status("", status).await;
        self.health
            .set_service_status("rpc.CNIBackend", status)
            .await;
    }
}

pub struct Backend(pub Arc<Shared>);

fn check_client(version: &str, rpc: &str) {
    if !version.is_empty()
        && cni_proto::major(version) != cni_proto::major(cni_proto::PROTOCOL_VERSION)
    {
        warn!(
            client = version,
            ours = cni_proto::PROTOCOL_VERSION,
            rpc,
            "plugin from another major version; serving it anyway"
        );
    }
}

fn ip_msg(a: &crate::datastore::Allocation) -> IpAddress {
    IpAddress {
        i_pv4_addr: a.ip.to_string(),
        i_pv6_addr: String::new(),
        device_number: a.device_number as i32,
        route_table_id: a.route_table as i32,
    }
}

fn add_refusal(reason: FailureReason, message: String) -> Response<AddNetworkReply> {
    Response::new(AddNetworkReply {
        success: false,
        reason: reason as i32,
        message,
        ..Default::default()
    })
}

#[tonic::async_trait]
impl CniBackend for Backend {
    async fn add_network(
        &self,
        req: Request<AddNetworkRequest>,
    ) -> Result<Response<AddNetworkReply>, Status> {
        let r = req.into_inner();
        let span = info_span!("AddNetwork", pod = %format!("{}/{}", r.k8s_pod_namespace, r.k8s_pod_name), container = %r.container_id, ifname = %r.if_name);
        async move {
            let m = crate::metrics::global();
            m.add_ip_req_count.inc();
            let _timer = m.add_network_seconds.start_timer();
            check_client(&r.client_version, "AddNetwork");
            let s = &self.0;
            if r.container_id.is_empty() || r.if_name.is_empty() {
                return Ok(add_refusal(
                    FailureReason::InvalidRequest,
                    "ContainerID and IfName are required".into(),
                ));
            }
            if !s.initialised.load(Ordering::Acquire) {
                return Ok(add_refusal(
                    FailureReason::NotReady,
                    "ipamd is still initialising: no ENI addresses loaded yet".into(),
                ));
            }
            let key = Key {
                network_name: r.network_name.clone(),
                container_id: r.container_id.clone(),
                ifname: r.if_name.clone(),
            };
            let pod = PodMeta {
                namespace: r.k8s_pod_namespace.clone(),
                name: r.k8s_pod_name.clone(),
                uid: r.k8s_pod_uid.clone(),
            };
            let deadline = tokio::time::Instant::now() + crate::manager::ADD_WAIT;
            let (res, gen) = loop {
                let grew = s.pool_grew.notified();
                tokio::pin!(grew);
                grew.as_mut().enable();
                let (res, gen) = {
                    let mut ds = s.ds.lock().await;
                    let res = ds.assign(key.clone(), pod.clone(), SystemTime::now());
                    (res, ds.generation())
                };
                s.pool_changed.notify_one();
                // An empty pool that the manager is refilling is worth a short wait: the
                // alternative is a failed sandbox and kubelet's retry seconds later.
                let refilling = s.managed
                    && (s.growing.load(Ordering::Acquire)
                        || (s.ceiling.lock().is_ok_and(|c| c.is_none())
                            && s.pool_note.lock().is_ok_and(|n| n.is_none())));
                if !matches!(res, Err(AssignError::PoolEmpty { .. })) || !refilling {
                    break (res, gen);
                }
                if tokio::time::timeout_at(deadline, grew).await.is_err() {
                    break (res, gen);
                }
            };
            let alloc = match res {
                Ok(a) => a,
                Err(e @ AssignError::MaxPods(_)) => {
                    m.no_available_ip_addresses.inc();
                    warn!(error = %e, "refused");
                    return Ok(add_refusal(FailureReason::MaxPodsReached, e.to_string()));
                }
                Err(e @ AssignError::PoolEmpty { .. }) => {
                    m.no_available_ip_addresses.inc();
                    let (reason, msg) = s.empty_pool_reason(&e);
                    warn!(error = %msg, "refused");
                    s.update_health().await;
                    return Ok(add_refusal(reason, msg));
                }
            };
            if let Err(e) = s.committer.commit(gen).await {
                return Ok(add_refusal(FailureReason::Internal, e));
            }
            info!(ip = %alloc.ip, eni = %alloc.eni_id, "assigned");
            s.update_health().await;
            Ok(Response::new(AddNetworkReply {
                success: true,
                ip_address: vec![ip_msg(&alloc)],
                use_external_snat: s.external_snat,
                vp_cv4_cid_rs: s.vpc_cidrs.read().map(|v| v.clone()).unwrap_or_default(),
                ..Default::default()
            }))
        }
        .instrument(span)
        .await
    }

    async fn del_network(
        &self,
        req: Request<DelNetworkRequest>,
    ) -> Result<Response<DelNetworkReply>, Status> {
        let r = req.into_inner();
        let span = info_span!("DelNetwork", pod = %format!("{}/{}", r.k8s_pod_namespace, r.k8s_pod_name), container = %r.container_id, ifname = %r.if_name, reason = %r.reason);
        async move {
            let m = crate::metrics::global();
            m.del_ip_req_count
                .with_label_values(&[if r.reason.is_empty() {
                    "PodDeleted"
                } else {
                    r.reason.as_str()
                }])
                .inc();
            let _timer = m.del_network_seconds.start_timer();
            check_client(&r.client_version, "DelNetwork");
            let s = &self.0;
            let key = Key {
                network_name: r.network_name.clone(),
                container_id: r.container_id.clone(),
                ifname: r.if_name.clone(),
            };
            let (released, gen) = {
                let mut ds = s.ds.lock().await;
                let a = ds.release(&key, SystemTime::now());
                (a, ds.generation())
            };
            let Some(a) = released else {
                info!("no allocation for this attachment; nothing to release");
                return Ok(Response::new(DelNetworkReply {
                    success: true,
                    ..Default::default()
                }));
            };
            if let Err(e) = s.committer.commit(gen).await {
                return Ok(Response::new(DelNetworkReply {
                    success: false,
                    failure_reason: FailureReason::Internal as i32,
                    message: e,
                    ..Default::default()
                }));
            }
            info!(ip = %a.ip, "released into cooldown");
            s.pool_changed.notify_one();
            s.update_health().await;
            Ok(Response::new(DelNetworkReply {
                success: true,
                ip_address: vec![ip_msg(&a)],
                ..Default::default()
            }))
        }
        .instrument(span)
        .await
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let s = &self.0;
        if !s.initialised.load(Ordering::Acquire) {
            return Ok(Response::new(StatusReply {
                ready: false,
                reason: FailureReason::NotReady as i32,
                message: "ipamd is still initialising".into(),
                available_addresses: 0,
            }));
        }
        let mut ds = s.ds.lock().await;
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
                    st.assigned, st.cooldown, s.capacity
                ),
            )
        };
        Ok(Response::new(StatusReply {
            ready,
            reason: reason as i32,
            message,
            available_addresses: st.available as i32,
        }))
    }

    async fn garbage_collect(&self, req: Request<GcRequest>) -> Result<Response<GcReply>, Status> {
        let r = req.into_inner();
        let s = &self.0;
        let valid: HashSet<(String, String)> = r
            .valid_attachments
            .iter()
            .map(|a| (a.container_id.clone(), a.if_name.clone()))
            .collect();
        let (released, gen) = {
            let mut ds = s.ds.lock().await;
            let stale: Vec<Key> = ds
                .allocations()
                .filter(|a| a.key.network_name == r.network_name)
                .filter(|a| !valid.contains(&(a.key.container_id.clone(), a.key.ifname.clone())))
                .map(|a| a.key.clone())
                .collect();
            let now = SystemTime::now();
            let released: Vec<_> = stale.iter().filter_map(|k| ds.release(k, now)).collect();
            (released, ds.generation())
        };
        if released.is_empty() {
            return Ok(Response::new(GcReply {
                success: true,
                ..Default::default()
            }));
        }
        let res = s.committer.commit(gen).await;
        for a in &released {
            info!(container = %a.key.container_id, ip = %a.ip, "GC released stale allocation");
        }
        s.update_health().await;
        Ok(Response::new(GcReply {
            success: res.is_ok(),
            message: res.err().unwrap_or_default(),
            released: released
                .iter()
                .map(|a| ReleasedAttachment {
                    container_id: a.key.container_id.clone(),
                    if_name: a.key.ifname.clone(),
                    ip_address: Some(ip_msg(a)),
                })
                .collect(),
        }))
    }
}

/// Bind the socket (replacing a stale file, mode 0660) and serve until `shutdown` resolves.
pub async fn serve(
    socket: &Path,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("remove stale socket {}", socket.display()))
        }
        _ => {}
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("bind {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", socket.display()))?;
    info!(socket = %socket.display(), "serving CNIBackend and health");
    let health_svc = health_service(&shared);
    tonic::transport::Server::builder()
        .add_service(health_svc)
        .add_service(CniBackendServer::new(Backend(shared)))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
        .context("gRPC server")
}

fn health_service(
    shared: &Shared,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(shared.health.clone()),
    )
}
