//! The gRPC side, on one unix socket as upstream: `CNIBackend` for the plugin,
//! `ConfigServerBackend` for the network policy agent and `grpc.health.v1` for probes.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use cni_proto::cni_backend_server::{CniBackend, CniBackendServer};
use cni_proto::config_server_backend_server::{ConfigServerBackend, ConfigServerBackendServer};
use cni_proto::*;
use tokio::net::UnixListener;
use tonic::{Request, Response, Status};
use tracing::{info, info_span, warn, Instrument};

use crate::pool::datastore::{Key, PodMeta};
use crate::pool::Pool;
use cni_common::validate::Invalid;

/// What the network policy agent and the plugin are told about policy, fixed at start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyConfig {
    /// `NETWORK_POLICY_ENFORCING_MODE` as given; empty: the plugin does not call the agent.
    pub mode: String,
    pub node_ipv4: String,
    /// The primary ENI's IPv6 address (IPv6 nodes), for the network policy agent.
    pub node_ipv6: String,
    pub instance_id: String,
    pub region: String,
}

pub struct Backend {
    pool: Arc<Pool>,
    policy_mode: String,
}

/// `GetNetworkPolicyConfigs`: the agent asks once at its start and exits when it gets no
/// answer, so this is served from the moment the socket listens.
pub struct ConfigServer(PolicyConfig);

#[tonic::async_trait]
impl ConfigServerBackend for ConfigServer {
    async fn get_network_policy_configs(
        &self,
        _req: Request<()>,
    ) -> Result<Response<NetworkPolicyAgentConfigReply>, Status> {
        let p = &self.0;
        Ok(Response::new(NetworkPolicyAgentConfigReply {
            network_policy_mode: p.mode.clone(),
            // ENABLE_MULTI_NIC=true is refused at start.
            multi_nic_enabled: false,
            node_i_pv4: p.node_ipv4.clone(),
            node_i_pv6: p.node_ipv6.clone(),
            instance_id: p.instance_id.clone(),
            region: p.region.clone(),
        }))
    }
}

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

fn ip_msg(a: &crate::pool::datastore::Allocation) -> IpAllocationMetadata {
    let (v4, v6) = crate::pool::checkpoint::address_fields(a.ip);
    IpAllocationMetadata {
        i_pv4_addr: v4,
        i_pv6_addr: v6,
        device_number: a.device_number as i32,
        route_table_id: a.route_table as i32,
    }
}

/// Reject what no plugin of ours sends: ids and names outside CNI's rules, fields longer than
/// anything real. Stored strings are bounded, so no request can bloat the checkpoint.
fn validate_key(container_id: &str, if_name: &str, network_name: &str) -> Result<(), Invalid> {
    use cni_common::validate;
    validate::container_id(container_id)?;
    validate::ifname(if_name)?;
    // Upstream's ipamd takes a request without a network name; when there is one, it is a
    // CNI network name.
    if !network_name.is_empty() {
        validate::network_name(network_name)?;
    }
    Ok(())
}

fn validate_add(r: &AddNetworkRequest) -> Result<(), Invalid> {
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

fn validate_del(r: &DelNetworkRequest) -> Result<(), Invalid> {
    use cni_common::validate::{bounded, MAX_K8S_NAME, MAX_SHORT, MAX_UID};
    validate_key(&r.container_id, &r.if_name, &r.network_name)?;
    bounded("pod name", &r.k8s_pod_name, MAX_K8S_NAME)?;
    bounded("pod namespace", &r.k8s_pod_namespace, MAX_K8S_NAME)?;
    bounded("pod uid", &r.k8s_pod_uid, MAX_UID)?;
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
            let s = &self.pool;
            if let Err(why) = validate_add(&r) {
                return Ok(add_refusal(FailureReason::InvalidRequest, why.to_string()));
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
            let alloc = match s.assign(key, pod).await {
                Ok(a) => a,
                Err((reason, msg)) => {
                    warn!(error = %msg, "refused");
                    return Ok(add_refusal(reason, msg));
                }
            };
            info!(ip = %alloc.ip, eni = %alloc.eni_id, "assigned");
            if let Some(a) = s.annotator() {
                a.assigned(&r.k8s_pod_namespace, &r.k8s_pod_name, alloc.ip);
            }
            Ok(Response::new(AddNetworkReply {
                success: true,
                ip_allocation_metadata: vec![ip_msg(&alloc)],
                use_external_snat: s.external_snat,
                vp_cv4_cid_rs: s.vpc_cidrs().iter().map(|c| c.to_string()).collect(),
                vp_cv6_cid_rs: s.vpc_v6_cidrs.iter().map(|c| c.to_string()).collect(),
                network_policy_mode: self.policy_mode.clone(),
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
            let s = &self.pool;
            if let Err(why) = validate_del(&r) {
                return Ok(Response::new(DelNetworkReply {
                    success: false,
                    failure_reason: FailureReason::InvalidRequest as i32,
                    message: why.to_string(),
                    ..Default::default()
                }));
            }
            let key = Key {
                network_name: r.network_name.clone(),
                container_id: r.container_id.clone(),
                ifname: r.if_name.clone(),
            };
            let released = match s.release(&key).await {
                Ok(r) => r,
                Err(e) => {
                    return Ok(Response::new(DelNetworkReply {
                        success: false,
                        failure_reason: FailureReason::Internal as i32,
                        message: e.to_string(),
                        ..Default::default()
                    }))
                }
            };
            let Some(a) = released else {
                info!("no allocation for this attachment; nothing to release");
                // The mode even here, unlike upstream: a DEL retried after the agent could not be
                // reached must still reach it.
                return Ok(Response::new(DelNetworkReply {
                    success: true,
                    retired_veths_reaped: true,
                    network_policy_mode: self.policy_mode.clone(),
                    ..Default::default()
                }));
            };
            info!(ip = %a.ip, "released into cooldown");
            if let Some(an) = s.annotator() {
                an.released(&a.pod.namespace, &a.pod.name, a.ip);
            }
            Ok(Response::new(DelNetworkReply {
                success: true,
                ip_allocation_metadata: vec![ip_msg(&a)],
                retired_veths_reaped: true,
                network_policy_mode: self.policy_mode.clone(),
                ..Default::default()
            }))
        }
        .instrument(span)
        .await
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let st = self.pool.status().await;
        Ok(Response::new(StatusReply {
            ready: st.ready,
            reason: st.reason as i32,
            message: st.message,
            available_addresses: i32::try_from(st.available).unwrap_or(i32::MAX),
        }))
    }

    async fn garbage_collect(&self, req: Request<GcRequest>) -> Result<Response<GcReply>, Status> {
        let r = req.into_inner();
        let s = &self.pool;
        let valid: HashSet<(String, String)> = r
            .valid_attachments
            .iter()
            .map(|a| (a.container_id.clone(), a.if_name.clone()))
            .collect();
        let (released, res) = s.collect(&r.network_name, &valid).await;
        if released.is_empty() && res.is_ok() {
            return Ok(Response::new(GcReply {
                success: true,
                ..Default::default()
            }));
        }
        for a in &released {
            info!(container = %a.key.container_id, ip = %a.ip, "GC released stale allocation");
        }
        Ok(Response::new(GcReply {
            success: res.is_ok(),
            message: res.err().map(|e| e.to_string()).unwrap_or_default(),
            released: released
                .iter()
                .map(|a| ReleasedAttachment {
                    container_id: a.key.container_id.clone(),
                    if_name: a.key.ifname.clone(),
                    ip_allocation_metadata: Some(ip_msg(a)),
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
    shared: Arc<Pool>,
    policy: PolicyConfig,
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
    info!(socket = %socket.display(), "serving CNIBackend, ConfigServerBackend and health");
    let health_svc = health_service(&shared);
    let backend = Backend {
        pool: shared,
        policy_mode: policy.mode.clone(),
    };
    tonic::transport::Server::builder()
        .add_service(health_svc)
        .add_service(CniBackendServer::new(backend).max_decoding_message_size(MAX_REQUEST_BYTES))
        .add_service(
            ConfigServerBackendServer::new(ConfigServer(policy))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
        .context("gRPC server")
}

fn health_service(
    shared: &Pool,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(shared.health.clone()),
    )
}
