//! A stand-in for ipamd speaking the real gRPC contract over a unix socket, for tests of the
//! plugin alone. It hands out addresses from a fixed list and can be told to refuse.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cni_proto::cni_backend_server::{CniBackend, CniBackendServer};
use cni_proto::*;
use tonic::{Request, Response, Status};

#[derive(Default)]
pub struct State {
    /// (address, device number) not handed out yet.
    pub free: Vec<(IpAddr, i32)>,
    pub assigned: HashMap<(String, String), (IpAddr, i32)>,
    /// Replace the address text of every reply (a malformed ipamd).
    pub garble: Option<String>,
    pub refuse: Option<(FailureReason, String)>,
    pub add_calls: u32,
    pub del_calls: u32,
    pub gc_calls: u32,
    pub last_add: Option<AddNetworkRequest>,
}

#[derive(Clone)]
struct Svc(Arc<Mutex<State>>);

fn ip_msg(ip: IpAddr, dev: i32) -> IpAllocationMetadata {
    let (v4, v6) = match ip {
        IpAddr::V4(_) => (ip.to_string(), String::new()),
        IpAddr::V6(_) => (String::new(), ip.to_string()),
    };
    IpAllocationMetadata {
        i_pv4_addr: v4,
        i_pv6_addr: v6,
        device_number: dev,
        route_table_id: dev + 1,
    }
}

#[tonic::async_trait]
impl CniBackend for Svc {
    async fn add_network(
        &self,
        req: Request<AddNetworkRequest>,
    ) -> Result<Response<AddNetworkReply>, Status> {
        let req = req.into_inner();
        let mut s = self.0.lock().unwrap();
        s.add_calls += 1;
        s.last_add = Some(req.clone());
        if let Some((reason, msg)) = s.refuse.clone() {
            return Ok(Response::new(AddNetworkReply {
                success: false,
                reason: reason as i32,
                message: msg,
                ..Default::default()
            }));
        }
        let key = (req.container_id, req.if_name);
        let (ip, dev) = match s.assigned.get(&key) {
            Some(a) => *a,
            None => {
                if s.free.is_empty() {
                    return Ok(Response::new(AddNetworkReply {
                        success: false,
                        reason: FailureReason::PoolEmpty as i32,
                        message: "no IP address available: pool empty".into(),
                        ..Default::default()
                    }));
                }
                let a = s.free.remove(0);
                s.assigned.insert(key, a);
                a
            }
        };
        let mut meta = ip_msg(ip, dev);
        if let Some(g) = &s.garble {
            for f in [&mut meta.i_pv4_addr, &mut meta.i_pv6_addr] {
                if !f.is_empty() {
                    *f = g.clone();
                }
            }
        }
        Ok(Response::new(AddNetworkReply {
            success: true,
            ip_allocation_metadata: vec![meta],
            vp_cv4_cid_rs: vec!["10.0.0.0/16".into()],
            ..Default::default()
        }))
    }

    async fn del_network(
        &self,
        req: Request<DelNetworkRequest>,
    ) -> Result<Response<DelNetworkReply>, Status> {
        let req = req.into_inner();
        let mut s = self.0.lock().unwrap();
        s.del_calls += 1;
        let ip = s.assigned.remove(&(req.container_id, req.if_name));
        if let Some(a) = ip {
            s.free.push(a);
        }
        Ok(Response::new(DelNetworkReply {
            success: true,
            ip_allocation_metadata: ip.map(|(ip, d)| ip_msg(ip, d)).into_iter().collect(),
            ..Default::default()
        }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let s = self.0.lock().unwrap();
        Ok(Response::new(match &s.refuse {
            Some((r, m)) => StatusReply {
                ready: false,
                reason: *r as i32,
                message: m.clone(),
                available_addresses: 0,
            },
            None => StatusReply {
                ready: !s.free.is_empty(),
                reason: if s.free.is_empty() {
                    FailureReason::PoolEmpty as i32
                } else {
                    0
                },
                message: String::new(),
                available_addresses: s.free.len() as i32,
            },
        }))
    }

    async fn garbage_collect(&self, req: Request<GcRequest>) -> Result<Response<GcReply>, Status> {
        let req = req.into_inner();
        let mut s = self.0.lock().unwrap();
        s.gc_calls += 1;
        let keep: Vec<(String, String)> = req
            .valid_attachments
            .iter()
            .map(|a| (a.container_id.clone(), a.if_name.clone()))
            .collect();
        let stale: Vec<_> = s
            .assigned
            .keys()
            .filter(|k| !keep.contains(k))
            .cloned()
            .collect();
        let mut released = Vec::new();
        for k in stale {
            if let Some((ip, d)) = s.assigned.remove(&k) {
                s.free.push((ip, d));
                released.push(ReleasedAttachment {
                    container_id: k.0,
                    if_name: k.1,
                    ip_allocation_metadata: Some(ip_msg(ip, d)),
                });
            }
        }
        Ok(Response::new(GcReply {
            success: true,
            released,
            message: String::new(),
        }))
    }
}

/// A running fake; stops when dropped.
pub struct FakeIpamd {
    pub socket: PathBuf,
    pub state: Arc<Mutex<State>>,
    server: crate::UnixServer,
}

impl FakeIpamd {
    pub fn start(dir: &Path, pool: &[(Ipv4Addr, i32)]) -> FakeIpamd {
        let any: Vec<(IpAddr, i32)> = pool.iter().map(|(ip, d)| ((*ip).into(), *d)).collect();
        Self::start_any(dir, &any)
    }

    /// As `start`, with addresses of either family.
    pub fn start_any(dir: &Path, pool: &[(IpAddr, i32)]) -> FakeIpamd {
        let socket = dir.join("ipamd.sock");
        let state = Arc::new(Mutex::new(State {
            free: pool.to_vec(),
            ..Default::default()
        }));
        let svc = Svc(state.clone());
        let server = crate::UnixServer::start(&socket, |incoming, stop| async move {
            tonic::transport::Server::builder()
                .add_service(CniBackendServer::new(svc))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop.await;
                })
                .await
                .expect("fake ipamd");
        });
        FakeIpamd {
            socket,
            state,
            server,
        }
    }

    pub fn stop(&mut self) {
        self.server.stop();
    }
}
