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
        // An ADD also needs its allocation on disk: a checkpoint that cannot be written makes
        // every ADD fail, so the node is not ready then either.
        let ok = self.initialised.load(Ordering::Acquire)
            && self.committer.healthy()
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

/// Reject what no plugin of ours sends: ids and names outside CNI's rules, fields longer than
/// anything real. Stored strings are bounded, so no request can bloat the checkpoint.
fn validate_key(container_id: &str, if_name: &str, network_name: &str) -> Result<(), String> {
    use cni_common::validate;
    validate::container_id(container_id)?;
    validate::ifname(if_name)?;
    validate::network_name(network_name)?;
    Ok(())
}

fn validate_add(r: &AddNetworkRequest) -> Result<(), String> {
    use cni_common::validate::{
        bounded, MAX_CONTAINER_ID, MAX_K8S_NAME, MAX_PATH, MAX_SHORT, MAX_UID,
    };
    validate_key(&r.container_id, &r.if_name, &r.network_name)?;
    bounded("pod name", &r.k8s_pod_name, MAX_K8S_NAME)?;
    bounded("pod namespace", &r.k8s_pod_namespace, MAX_K8S_NAME)?;
    bounded("pod uid", &r.k8s_pod_uid, MAX_UID)?;
    bounded(
        "infra container id",
        &r.k8s_pod_infra_container_id,
        MAX_CONTAINER_ID,
    )?;
    bounded("netns", &r.netns, MAX_PATH)?;
    bounded("client version", &r.client_version, MAX_SHORT)?;
    Ok(())
}

/// DelNetwork's free-text reason as a metric label: a fixed set, so clients cannot mint
/// series. Upstream's plugin sends the first two.
pub fn reason_label(reason: &str) -> &'static str {
    match reason {
        "" | "PodDeleted" => "PodDeleted",
        "SetupNSFailed" => "SetupNSFailed",
        "PodSetupFailed" => "PodSetupFailed",
        _ => "other",
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
            if let Err(why) = validate_add(&r) {
                return Ok(add_refusal(FailureReason::InvalidRequest, why));
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
                if !matches!(res, Err(AssignError::PoolEmpty { .. })) {
                    break (res, gen);
                }
                // Only cooldown stands in the way: an address comes free at a known time. Wait
                // for it when that is within the bound, rather than fail the sandbox.
                let cooled =
                    s.ds.lock()
                        .await
                        .next_cooldown_end()
                        .map(|t| {
                            let left = t.duration_since(SystemTime::now()).unwrap_or_default();
                            tokio::time::Instant::now() + left + std::time::Duration::from_millis(5)
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
                    warn!(error = %e, "refused");
                    return Ok(add_refusal(FailureReason::MaxPodsReached, e.to_string()));
                }
                Err(e @ AssignError::PoolEmpty { .. }) => {
                    m.no_available_ip_addresses.inc();
                    let (reason, mut msg) = s.empty_pool_reason(&e);
                    if let Some(t) = s.ds.lock().await.next_cooldown_end() {
                        let left = t.duration_since(SystemTime::now()).unwrap_or_default();
                        msg.push_str(&format!(
                            "; the next address leaves cooldown in {:.1}s",
                            left.as_secs_f64()
                        ));
                    }
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
        let span = info_span!("DelNetwork", pod = %format!("{}/{}", r.k8s_pod_namespace, r.k8s_pod_name), container = %r.container_id, ifname = %r.if_name, reason = %reason_label(&r.reason));
        async move {
            let m = crate::metrics::global();
            m.del_ip_req_count
                .with_label_values(&[reason_label(&r.reason)])
                .inc();
            let _timer = m.del_network_seconds.start_timer();
            check_client(&r.client_version, "DelNetwork");
            let s = &self.0;
            if let Err(why) = validate_key(&r.container_id, &r.if_name, &r.network_name) {
                return Ok(Response::new(DelNetworkReply {
                    success: false,
                    failure_reason: FailureReason::InvalidRequest as i32,
                    message: why,
                    ..Default::default()
                }));
            }
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

/// Largest request accepted: a few kilobytes is all a real one takes (tonic's default is 4 MB).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

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
    // Only a stale socket is ours to remove: a file or directory there is someone else's
    // (or a misconfigured IPAMD_SOCKET_PATH) and is reported, not deleted.
    match std::fs::symlink_metadata(socket) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(socket)
                .with_context(|| format!("remove stale socket {}", socket.display()))?;
        }
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; refusing to replace it (check IPAMD_SOCKET_PATH)",
            socket.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("inspect {}", socket.display())),
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("bind {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", socket.display()))?;
    info!(socket = %socket.display(), "serving CNIBackend and health");
    let health_svc = health_service(&shared);
    tonic::transport::Server::builder()
        .add_service(health_svc)
        .add_service(
            CniBackendServer::new(Backend(shared)).max_decoding_message_size(MAX_REQUEST_BYTES),
        )
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
