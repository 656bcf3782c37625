//! The gRPC contract between `aws-cni` and `ipamd`.
//!
//! `rpc.proto` keeps upstream's package, service, message and field names and numbers so
//! that an upstream plugin can talk to our ipamd and the other way round. Everything we add
//! uses field numbers from 100 up, which upstream has never used.

// Generated code: lints are prost's and tonic's business.
#[allow(clippy::all)]
pub mod rpc {
    tonic::include_proto!("rpc");
}

pub use rpc::*;

/// Protocol revision of this contract; plugin and ipamd compare the major part.
pub const PROTOCOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Default unix socket path of ipamd, as upstream.
pub const DEFAULT_SOCKET: &str = "/var/run/aws-node/ipamd.sock";

/// The network policy agent's socket (it serves `NPBackend` there), as upstream.
pub const DEFAULT_NP_AGENT_SOCKET: &str = "/var/run/aws-node/npa.sock";

/// gRPC health service names on ipamd's socket.
pub mod health {
    /// Up and initialised: what upstream's probes ask for ("", with no `-service`) and the
    /// name upstream registers. An empty pool leaves these SERVING.
    pub const LIVE: [&str; 2] = ["", "grpc.health.v1.aws-node"];
    /// An ADD now would get an address (ours; readiness and the entrypoint's conflist wait).
    pub const READY: &str = "rpc.CNIBackend";
}

/// Major component of a semver-ish version string ("1.2.3" -> "1", "v1.19" -> "1").
pub fn major(version: &str) -> &str {
    let v = version.trim_start_matches('v');
    v.split('.').next().unwrap_or(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majors() {
        assert_eq!(major("v1.19.2"), "1");
        assert_eq!(major("2.3.0"), "2");
    }
}
