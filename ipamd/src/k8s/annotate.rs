//! `ANNOTATE_POD_IP`: the pod's address as the annotation `vpc.amazonaws.com/pod-ips`, set
//! after its ADD and emptied after its DEL (only while it still names the released address).
//!
//! Upstream patches inside the ADD and fails the ADD when the API server does not answer; here
//! one worker patches in the background, in order, retrying for a while, so a pod's network
//! never waits on the API server.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

pub const ANNOTATION: &str = "vpc.amazonaws.com/pod-ips";
/// How long one change is retried while the API server is away.
const GIVE_UP: Duration = Duration::from_secs(300);
const QUEUE: usize = 1024;

#[derive(Debug, Clone)]
enum Op {
    Set(String, String, IpAddr),
    Clear(String, String, IpAddr),
}

#[derive(Clone)]
pub struct Annotator {
    tx: mpsc::Sender<Op>,
}

impl Annotator {
    pub fn start(client: kube::Client, tasks: &mut crate::supervise::Supervisor) -> Annotator {
        let (tx, rx) = mpsc::channel(QUEUE);
        tasks.spawn("pod annotator", work(client, rx));
        Annotator { tx }
    }

    pub fn assigned(&self, namespace: &str, name: &str, ip: IpAddr) {
        self.send(Op::Set(namespace.into(), name.into(), ip));
    }

    pub fn released(&self, namespace: &str, name: &str, ip: IpAddr) {
        self.send(Op::Clear(namespace.into(), name.into(), ip));
    }

    fn send(&self, op: Op) {
        let (ns, name) = match &op {
            Op::Set(ns, n, _) | Op::Clear(ns, n, _) => (ns, n),
        };
        if ns.is_empty() || name.is_empty() {
            return;
        }
        if self.tx.try_send(op.clone()).is_err() {
            warn!(
                ?op,
                "pod IP annotation queue full; this change is not written"
            );
        }
    }
}

fn patch(value: &str) -> Patch<serde_json::Value> {
    Patch::Merge(json!({"metadata": {"annotations": {ANNOTATION: value}}}))
}

/// One change; Ok(false) when it is moot (the pod is gone, the annotation names another IP).
async fn apply(client: &kube::Client, op: &Op) -> Result<bool, kube::Error> {
    let pp = PatchParams::default();
    match op {
        Op::Set(ns, name, ip) => {
            let api: Api<Pod> = Api::namespaced(client.clone(), ns);
            api.patch(name, &pp, &patch(&ip.to_string())).await?;
            Ok(true)
        }
        Op::Clear(ns, name, ip) => {
            let api: Api<Pod> = Api::namespaced(client.clone(), ns);
            let Some(pod) = api.get_opt(name).await? else {
                return Ok(false);
            };
            let current = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION).cloned());
            // A newer ADD of the same pod may have written another address since.
            if current.as_deref() != Some(ip.to_string().as_str()) {
                return Ok(false);
            }
            api.patch(name, &pp, &patch("")).await?;
            Ok(true)
        }
    }
}

async fn work(client: kube::Client, mut rx: mpsc::Receiver<Op>) {
    while let Some(op) = rx.recv().await {
        let started = Instant::now();
        let mut pause = Duration::from_millis(500);
        loop {
            match apply(&client, &op).await {
                Ok(done) => {
                    debug!(?op, done, "pod IP annotation");
                    break;
                }
                Err(kube::Error::Api(s)) if s.code == 404 => break,
                Err(kube::Error::Api(s)) if s.code == 403 => {
                    warn!(?op, error = %s.message, "pod IP annotation refused (aws-node's ClusterRole needs get and patch on pods)");
                    break;
                }
                Err(e) if started.elapsed() < GIVE_UP => {
                    if pause == Duration::from_millis(500) {
                        info!(?op, error = %e, "pod IP annotation waits for the Kubernetes API");
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(15));
                }
                Err(e) => {
                    warn!(?op, error = %e, "pod IP annotation not written: the Kubernetes API did not answer for {}s", GIVE_UP.as_secs());
                    break;
                }
            }
        }
    }
}
