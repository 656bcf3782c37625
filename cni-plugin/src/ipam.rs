//! The gRPC client side of the contract with ipamd, over its unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cni_proto::cni_backend_client::CniBackendClient;
use cni_proto::FailureReason;
use tonic::transport::Channel;

use crate::error::{CniError, Code, Result};

/// Upstream's plugin waits this long for ipamd; kubelet retries the whole ADD anyway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct IpamClient {
    inner: CniBackendClient<Channel>,
    socket: PathBuf,
}

impl IpamClient {
    pub async fn connect(socket: &Path) -> Result<IpamClient> {
        let channel = cni_common::grpc::connect(socket, CONNECT_TIMEOUT, REQUEST_TIMEOUT)
            .await
            .map_err(|e| {
                CniError::new(
                    Code::TryAgainLater,
                    format!("ipamd unreachable at {}: {e}", socket.display()),
                )
            })?;
        Ok(IpamClient {
            inner: CniBackendClient::new(channel),
            socket: socket.to_path_buf(),
        })
    }

    fn rpc_error(&self, what: &str, status: tonic::Status) -> CniError {
        CniError::new(
            Code::TryAgainLater,
            format!(
                "ipamd at {} failed {what}: {} ({:?})",
                self.socket.display(),
                status.message(),
                status.code()
            ),
        )
    }

    pub async fn add(
        &mut self,
        req: cni_proto::AddNetworkRequest,
    ) -> Result<cni_proto::AddNetworkReply> {
        let reply = self
            .inner
            .add_network(req)
            .await
            .map_err(|s| self.rpc_error("AddNetwork", s))?
            .into_inner();
        if !reply.success {
            return Err(refusal(reply.reason(), &reply.message));
        }
        Ok(reply)
    }

    pub async fn del(
        &mut self,
        req: cni_proto::DelNetworkRequest,
    ) -> Result<cni_proto::DelNetworkReply> {
        let reply = self
            .inner
            .del_network(req)
            .await
            .map_err(|s| self.rpc_error("DelNetwork", s))?
            .into_inner();
        if !reply.success {
            return Err(refusal(reply.failure_reason(), &reply.message));
        }
        Ok(reply)
    }

    pub async fn status(&mut self) -> Result<cni_proto::StatusReply> {
        Ok(self
            .inner
            .status(cni_proto::StatusRequest {
                client_version: cni_proto::PROTOCOL_VERSION.into(),
            })
            .await
            .map_err(|s| self.rpc_error("Status", s))?
            .into_inner())
    }

    pub async fn gc(&mut self, req: cni_proto::GcRequest) -> Result<cni_proto::GcReply> {
        Ok(self
            .inner
            .garbage_collect(req)
            .await
            .map_err(|s| self.rpc_error("GarbageCollect", s))?
            .into_inner())
    }
}

/// Turn ipamd's machine-readable reason into a CNI error an operator can act on.
pub fn refusal(reason: FailureReason, message: &str) -> CniError {
    let (code, what) = match reason {
        FailureReason::PoolEmpty => (Code::TryAgainLater, "no IP address available: pool empty"),
        FailureReason::MaxPodsReached => (Code::TryAgainLater, "max pods reached"),
        FailureReason::NotReady => (Code::TryAgainLater, "ipamd is not ready yet"),
        FailureReason::SubnetFull => (Code::TryAgainLater, "subnet full"),
        FailureReason::Throttled => (Code::TryAgainLater, "EC2 API throttled"),
        FailureReason::InvalidRequest => (Code::IpamRefused, "ipamd rejected the request"),
        FailureReason::Internal => (Code::TryAgainLater, "ipamd internal error"),
        FailureReason::Unspecified => (Code::TryAgainLater, "ipamd refused the request"),
    };
    let msg = if message.is_empty() {
        what.to_string()
    } else if message.starts_with(what) {
        message.to_string()
    } else {
        format!("{what}: {message}")
    };
    CniError::new(code, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_cause() {
        let e = refusal(FailureReason::MaxPodsReached, "max pods reached (17)");
        assert_eq!(e.code, Code::TryAgainLater);
        assert_eq!(e.msg, "max pods reached (17)");
        let e = refusal(FailureReason::PoolEmpty, "");
        assert!(e.msg.contains("pool empty"));
        let e = refusal(FailureReason::SubnetFull, "subnet-1 has no free addresses");
        assert_eq!(e.msg, "subnet full: subnet-1 has no free addresses");
        assert_eq!(
            refusal(FailureReason::InvalidRequest, "x").code,
            Code::IpamRefused
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unreachable_names_socket() {
        let e = match IpamClient::connect(Path::new("/nonexistent/ipamd.sock")).await {
            Err(e) => e,
            Ok(_) => panic!("connected to nothing"),
        };
        assert_eq!(e.code, Code::TryAgainLater);
        assert!(
            e.msg
                .contains("ipamd unreachable at /nonexistent/ipamd.sock"),
            "{}",
            e.msg
        );
    }
}
