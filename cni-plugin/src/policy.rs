//! The network policy agent's part of a pod, as upstream's plugin does it: when ipamd's reply
//! names a `NetworkPolicyMode`, the agent (`NPBackend` on its own socket) is asked to attach
//! the pod's policy once the pod is wired, and to drop it at DEL.

use std::path::Path;
use std::time::Duration;

use cni_proto::np_backend_client::NpBackendClient;
use tracing::{info, warn};

use crate::error::{CniError, Code, Result};

/// Upstream's wait for the agent's socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Upstream sets no deadline on the call itself; a hung agent must not hang the runtime.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

async fn client(socket: &Path) -> Result<NpBackendClient<tonic::transport::Channel>> {
    let channel = cni_common::grpc::connect(socket, CONNECT_TIMEOUT, REQUEST_TIMEOUT)
        .await
        .map_err(|e| {
            CniError::new(
                Code::TryAgainLater,
                format!(
                    "network policy agent unreachable at {} (ipamd asks for policy mode enforcement): {e}",
                    socket.display()
                ),
            )
        })?;
    Ok(NpBackendClient::new(channel))
}

/// `EnforceNpToPod`: the ADD fails unless the agent says it attached the pod's policy.
pub async fn enforce(
    socket: &Path,
    pod_namespace: &str,
    pod_name: &str,
    mode: &str,
    interfaces: i32,
) -> Result<()> {
    let mut c = client(socket).await?;
    let req = cni_proto::EnforceNpRequest {
        k8s_pod_name: pod_name.to_string(),
        k8s_pod_namespace: pod_namespace.to_string(),
        network_policy_mode: mode.to_string(),
        interface_count: interfaces,
    };
    let failed = |why: String| {
        CniError::new(
            Code::TryAgainLater,
            format!(
                "network policy agent did not set up policy for {pod_namespace}/{pod_name}: {why}"
            ),
        )
    };
    match c.enforce_np_to_pod(req).await {
        Ok(r) if r.get_ref().success => {
            info!(mode, "network policy agent attached the pod's policy");
            Ok(())
        }
        Ok(_) => Err(failed("it answered Success=false".into())),
        Err(s) => Err(failed(format!("{} ({:?})", s.message(), s.code()))),
    }
}

/// `DeletePodNp`: as upstream, an agent that cannot be reached fails the DEL (the runtime's
/// retry reaches it later); an error from the agent itself is only logged.
pub async fn delete(socket: &Path, pod_namespace: &str, pod_name: &str) -> Result<()> {
    let mut c = client(socket).await?;
    let req = cni_proto::DeleteNpRequest {
        k8s_pod_name: pod_name.to_string(),
        k8s_pod_namespace: pod_namespace.to_string(),
    };
    match c.delete_pod_np(req).await {
        Ok(r) if r.get_ref().success => info!("network policy agent dropped the pod's policy"),
        Ok(_) => warn!("network policy agent answered Success=false to DeletePodNp"),
        Err(s) => {
            warn!(error = %s.message(), code = ?s.code(), "network policy agent failed DeletePodNp")
        }
    }
    Ok(())
}
