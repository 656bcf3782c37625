//! Kubernetes Events on this node for conditions an operator must see (`kubectl describe node`
//! shows them). Best effort and never in the way: callers drop a note into a bounded queue; a
//! repeat of the same note within `REPEAT` is not posted again; notes that cannot be posted
//! (API away) wait and go out once it answers.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, PostParams};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// The same reason and message are posted at most once in this long.
pub const REPEAT: Duration = Duration::from_secs(600);
/// Notes kept while the API is away; older ones are dropped first.
const PENDING_MAX: usize = 32;
/// Upstream's reporting component name.
const COMPONENT: &str = "aws-node";

#[derive(Debug, Clone)]
pub struct Note {
    pub kind: &'static str,
    pub reason: &'static str,
    pub message: String,
}

#[derive(Clone)]
pub struct Recorder {
    tx: Option<mpsc::Sender<Note>>,
}

impl Recorder {
    /// A recorder that drops everything (no API, no node name).
    pub fn none() -> Recorder {
        Recorder { tx: None }
    }

    pub fn start(
        client: kube::Client,
        node_name: String,
        pod_name: Option<String>,
        tasks: &mut crate::supervise::Supervisor,
    ) -> Recorder {
        if node_name.is_empty() {
            return Recorder::none();
        }
        let (tx, rx) = mpsc::channel(64);
        tasks.spawn("event recorder", post_loop(client, node_name, pod_name, rx));
        Recorder { tx: Some(tx) }
    }

    pub fn warn(&self, reason: &'static str, message: impl Into<String>) {
        self.send("Warning", reason, message.into());
    }

    pub fn normal(&self, reason: &'static str, message: impl Into<String>) {
        self.send("Normal", reason, message.into());
    }

    fn send(&self, kind: &'static str, reason: &'static str, message: String) {
        if let Some(tx) = &self.tx {
            // A full queue means the API has been away a long while: this note waits its turn
            // in the log instead.
            let _ = tx.try_send(Note {
                kind,
                reason,
                message,
            });
        }
    }
}

fn event_for(node: &str, pod: Option<&str>, n: &Note) -> Event {
    let now = jiff_now();
    Event {
        metadata: ObjectMeta {
            // The API server names it: unique per post, like kubelet's node events.
            generate_name: Some(format!("{node}.")),
            namespace: Some("default".into()),
            ..Default::default()
        },
        // kubelet's convention for node events (uid = the node's name), which
        // `kubectl describe node` finds.
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.into()),
            uid: Some(node.into()),
            ..Default::default()
        },
        reason: Some(n.reason.into()),
        message: Some(n.message.chars().take(1024).collect()),
        type_: Some(n.kind.into()),
        count: Some(1),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        source: Some(EventSource {
            component: Some(COMPONENT.into()),
            host: Some(node.into()),
        }),
        reporting_component: Some(COMPONENT.into()),
        reporting_instance: Some(node.into()),
        action: Some(n.reason.into()),
        related: pod.map(|p| ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some("kube-system".into()),
            name: Some(p.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

async fn post_loop(
    client: kube::Client,
    node: String,
    pod: Option<String>,
    mut rx: mpsc::Receiver<Note>,
) {
    let api: Api<Event> = Api::namespaced(client, "default");
    let mut last: HashMap<(&'static str, String), Instant> = HashMap::new();
    let mut pending: VecDeque<Note> = VecDeque::new();
    let mut retry = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            n = rx.recv() => {
                let Some(n) = n else { return std::future::pending().await };
                let key = (n.reason, n.message.clone());
                if last.get(&key).is_some_and(|t| t.elapsed() < REPEAT) {
                    continue;
                }
                last.insert(key, Instant::now());
                last.retain(|_, t| t.elapsed() < REPEAT);
                if pending.len() >= PENDING_MAX {
                    pending.pop_front();
                }
                pending.push_back(n);
            }
            _ = retry.tick() => {}
        }
        while let Some(n) = pending.front() {
            match api
                .create(&PostParams::default(), &event_for(&node, pod.as_deref(), n))
                .await
            {
                Ok(_) => {
                    debug!(reason = n.reason, "event posted");
                    pending.pop_front();
                }
                Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => {
                    warn!(reason = n.reason, error = %s.message, "event refused by the API server; dropped");
                    pending.pop_front();
                }
                // Away: the note waits for the next try.
                Err(_) => break,
            }
        }
    }
}
