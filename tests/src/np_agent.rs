//! A stand-in for aws-network-policy-agent's gRPC side: `NPBackend` (as rpc.proto defines it,
//! upstream's service text) on a unix socket, recording each call and whether the pod's host
//! veth existed when it came (the real agent attaches its programs to that veth by name).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cni_proto::np_backend_server::{NpBackend, NpBackendServer};
use cni_proto::{DeleteNpReply, DeleteNpRequest, EnforceNpReply, EnforceNpRequest};
use tonic::{Request, Response, Status};

#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Enforce {
        namespace: String,
        name: String,
        mode: String,
        interfaces: i32,
        /// The pod's host veth was in the node's namespace at the time of the call.
        veth_present: bool,
    },
    Delete {
        namespace: String,
        name: String,
    },
}

#[derive(Debug, Default)]
pub struct State {
    pub calls: Vec<Call>,
    /// Answer Success=false to EnforceNpToPod.
    pub refuse: bool,
}

struct Svc {
    state: Arc<Mutex<State>>,
    node: String,
    veth_prefix: String,
}

#[tonic::async_trait]
impl NpBackend for Svc {
    async fn enforce_np_to_pod(
        &self,
        req: Request<EnforceNpRequest>,
    ) -> Result<Response<EnforceNpReply>, Status> {
        let r = req.into_inner();
        let veth = cni_common::naming::host_veth_name(
            &self.veth_prefix,
            &r.k8s_pod_namespace,
            &r.k8s_pod_name,
        );
        let present = std::process::Command::new("ip")
            .args(["-n", &self.node, "link", "show", &veth])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        let mut st = self.state.lock().unwrap();
        st.calls.push(Call::Enforce {
            namespace: r.k8s_pod_namespace,
            name: r.k8s_pod_name,
            mode: r.network_policy_mode,
            interfaces: r.interface_count,
            veth_present: present,
        });
        Ok(Response::new(EnforceNpReply {
            success: !st.refuse,
        }))
    }

    async fn delete_pod_np(
        &self,
        req: Request<DeleteNpRequest>,
    ) -> Result<Response<DeleteNpReply>, Status> {
        let r = req.into_inner();
        self.state.lock().unwrap().calls.push(Call::Delete {
            namespace: r.k8s_pod_namespace,
            name: r.k8s_pod_name,
        });
        Ok(Response::new(DeleteNpReply { success: true }))
    }
}

/// A running agent; stops (and removes its socket) when dropped.
pub struct FakeNpAgent {
    pub socket: PathBuf,
    pub state: Arc<Mutex<State>>,
    server: crate::UnixServer,
}

impl FakeNpAgent {
    /// Serve at `socket`; host veths are looked up in network namespace `node`.
    pub fn start(socket: &Path, node: &str) -> FakeNpAgent {
        let state = Arc::new(Mutex::new(State::default()));
        let svc = Svc {
            state: state.clone(),
            node: node.to_string(),
            veth_prefix: "eni".into(),
        };
        let server = crate::UnixServer::start(socket, |incoming, stop| async move {
            tonic::transport::Server::builder()
                .add_service(NpBackendServer::new(svc))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop.await;
                })
                .await
                .expect("stand-in agent");
        });
        FakeNpAgent {
            socket: socket.to_path_buf(),
            state,
            server,
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn stop(&mut self) {
        self.server.stop();
    }
}
