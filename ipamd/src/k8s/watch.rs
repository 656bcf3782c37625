//! Watches of this node and of the ENIConfigs, folded into one `eniconfig::View` that the
//! ENI placement reads. kube-runtime's watcher lists, then watches from the list's
//! resourceVersion and re-lists when the watch expires; the stream backs off between failures.
//! What the watches last saw stays in the view while the API is away.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;
use tracing::{info, warn};

use super::eniconfig::{EniConfigSpec, NodeMeta, View};
use super::events::Recorder;

/// The ENIConfig custom resource (cluster-scoped).
pub fn eniconfig_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("crd.k8s.amazonaws.com", "v1alpha1", "ENIConfig"),
        "eniconfigs",
    )
}

fn spec_of(o: &DynamicObject) -> EniConfigSpec {
    o.data
        .get("spec")
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok())
        .unwrap_or_default()
}

fn meta_of(n: &Node) -> NodeMeta {
    let unschedulable = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| {
            t.iter()
                .any(|t| t.key == "node.kubernetes.io/unschedulable" && t.effect == "NoSchedule")
        });
    NodeMeta {
        labels: n.metadata.labels.clone().unwrap_or_default(),
        annotations: n.metadata.annotations.clone().unwrap_or_default(),
        unschedulable,
    }
}

/// Why a watch failed, in an operator's words; a 403 says which permission is missing.
fn describe(what: &str, e: &watcher::Error) -> (String, bool) {
    let api = match e {
        watcher::Error::InitialListFailed(k)
        | watcher::Error::WatchStartFailed(k)
        | watcher::Error::WatchFailed(k) => match k {
            kube::Error::Api(s) => Some((s.code, s.message.clone())),
            _ => None,
        },
        watcher::Error::WatchError(s) => Some((s.code, s.message.clone())),
        _ => None,
    };
    match api {
        Some((403, m)) => (
            format!("watch {what}: permission denied (check aws-node's ClusterRole): {m}"),
            true,
        ),
        Some((code, m)) => (format!("watch {what}: API error {code}: {m}"), false),
        None => (format!("watch {what}: {e}"), false),
    }
}

struct Shared {
    tx: watch::Sender<View>,
    condition: Arc<Mutex<String>>,
    events: Recorder,
}

impl Shared {
    /// The condition in one line: "watching", or every watch's failure.
    fn set_condition(&self, v: &View) {
        if let Ok(mut c) = self.condition.lock() {
            *c = if v.errors.is_empty() {
                "watching".into()
            } else {
                v.errors.values().cloned().collect::<Vec<_>>().join("; ")
            };
        }
    }

    fn failed(&self, what: &'static str, e: &watcher::Error) {
        let (msg, forbidden) = describe(what, e);
        warn!("{msg}; the pool keeps serving, the watch retries with backoff");
        self.tx.send_modify(|v| {
            v.errors.insert(what, msg.clone());
            self.set_condition(v);
        });
        let reason = if forbidden {
            "KubernetesAPIForbidden"
        } else {
            "KubernetesAPIUnavailable"
        };
        self.events.warn(reason, msg);
    }

    fn delivered(&self, what: &'static str) {
        let first = self
            .condition
            .lock()
            .map(|c| *c == "connecting")
            .unwrap_or(false);
        self.tx.send_if_modified(|v| {
            let had = v.errors.remove(what).is_some();
            if had {
                info!(watch = what, "Kubernetes API watch delivering again");
            }
            if had || first {
                self.set_condition(v);
            }
            had
        });
    }
}

/// Start the watches (only custom networking needs them today). The receiver's view says
/// whether each has listed once.
pub fn start(
    client: kube::Client,
    node_name: String,
    custom_networking: bool,
    watch_node: bool,
    events: Recorder,
    condition: Arc<Mutex<String>>,
    tasks: &mut crate::supervise::Supervisor,
) -> watch::Receiver<View> {
    let (tx, rx) = watch::channel(View::default());
    if !custom_networking && !watch_node {
        if let Ok(mut c) = condition.lock() {
            *c = "no watches (custom networking is off, AWS_MANAGE_ENIS_NON_SCHEDULABLE is true)"
                .into();
        }
        return rx;
    }
    let shared = Arc::new(Shared {
        tx,
        condition,
        events,
    });

    let nodes: Api<Node> = Api::all(client.clone());
    let cfg = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let s = shared.clone();
    tasks.spawn("node watch", async move {
        let mut stream = watcher::watcher(nodes, cfg).default_backoff().boxed();
        let mut buffered: Option<NodeMeta> = None;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    s.delivered("node");
                    match ev {
                        Event::Init => buffered = None,
                        Event::InitApply(n) => buffered = Some(meta_of(&n)),
                        Event::InitDone => {
                            let n = buffered.take();
                            s.tx.send_if_modified(|v| {
                                let changed = v.node != n || !v.node_synced;
                                v.node = n.clone();
                                v.node_synced = true;
                                changed
                            });
                        }
                        Event::Apply(n) => {
                            let m = Some(meta_of(&n));
                            s.tx.send_if_modified(|v| {
                                let changed = v.node != m;
                                v.node = m.clone();
                                changed
                            });
                        }
                        Event::Delete(_) => {
                            s.tx.send_modify(|v| v.node = None);
                        }
                    }
                }
                Err(e) => s.failed("node", &e),
            }
        }
    });

    // ENIConfigs matter to custom networking only.
    if !custom_networking {
        return rx;
    }
    let ar = eniconfig_resource();
    let configs: Api<DynamicObject> = Api::all_with(client, &ar);
    let s = shared;
    tasks.spawn("ENIConfig watch", async move {
        let mut stream = watcher::watcher(configs, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut buffered = BTreeMap::new();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    s.delivered("ENIConfigs");
                    match ev {
                        Event::Init => buffered.clear(),
                        Event::InitApply(o) => {
                            if let Some(n) = o.metadata.name.clone() {
                                buffered.insert(n, spec_of(&o));
                            }
                        }
                        Event::InitDone => {
                            let all = std::mem::take(&mut buffered);
                            s.tx.send_if_modified(|v| {
                                let changed = v.eniconfigs != all || !v.eniconfigs_synced;
                                v.eniconfigs = all.clone();
                                v.eniconfigs_synced = true;
                                changed
                            });
                        }
                        Event::Apply(o) => {
                            if let Some(n) = o.metadata.name.clone() {
                                let spec = spec_of(&o);
                                s.tx.send_if_modified(|v| {
                                    v.eniconfigs.insert(n.clone(), spec.clone()) != Some(spec)
                                });
                            }
                        }
                        Event::Delete(o) => {
                            if let Some(n) = o.metadata.name.clone() {
                                s.tx.send_if_modified(|v| v.eniconfigs.remove(&n).is_some());
                            }
                        }
                    }
                }
                Err(e) => s.failed("ENIConfigs", &e),
            }
        }
    });
    rx
}
