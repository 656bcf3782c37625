//! The Kubernetes API, for the features that need it: the node's ENIConfig (custom
//! networking), the pod IP annotation and Events an operator must see. Everything here is
//! background work: a watch that breaks, an API server that is away or a permission that is
//! missing is named (log, Event once it can be posted, introspection) and retried with backoff,
//! while the address pool keeps serving what it has.

pub mod annotate;
pub mod eniconfig;
pub mod events;
pub mod watch;

use std::sync::{Arc, Mutex};

use anyhow::Context;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Settings from upstream's variables.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    /// `AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG`.
    pub custom_networking: bool,
    /// `ENI_CONFIG_LABEL_DEF` / `ENI_CONFIG_ANNOTATION_DEF`.
    pub keys: eniconfig::Keys,
    /// `ENABLE_SUBNET_DISCOVERY` (upstream default true).
    pub subnet_discovery: bool,
    /// `ANNOTATE_POD_IP`.
    pub annotate_pod_ip: bool,
    /// `MY_NODE_NAME` (downward API).
    pub node_name: Option<String>,
    /// `MY_POD_NAME` (downward API): aws-node's own pod in kube-system, which upstream's
    /// Events name; ours are on the Node and name the pod as their related object.
    pub pod_name: Option<String>,
    /// `CLUSTER_ENDPOINT`: the API server's URL instead of the one in the config.
    pub cluster_endpoint: Option<String>,
}

impl Settings {
    /// Does any enabled feature need the API? (Events alone do not: they are best effort.)
    pub fn needed(&self) -> bool {
        self.custom_networking || self.annotate_pod_ip
    }
}

/// The client configuration as upstream's aws-node finds it: `KUBECONFIG`, else the
/// in-cluster service account (`KUBERNETES_SERVICE_HOST/PORT`), else `~/.kube/config`;
/// `CLUSTER_ENDPOINT` replaces the server URL.
pub async fn client_config(s: &Settings) -> anyhow::Result<kube::Config> {
    let mut cfg = if let Some(path) = std::env::var_os("KUBECONFIG").filter(|p| !p.is_empty()) {
        let kc = Kubeconfig::read_from(&path)
            .with_context(|| format!("read KUBECONFIG {}", path.to_string_lossy()))?;
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("use KUBECONFIG {}", path.to_string_lossy()))?
    } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        kube::Config::incluster()
            .context("in-cluster config (the service account's token and CA)")?
    } else {
        kube::Config::from_kubeconfig(&KubeConfigOptions::default())
            .await
            .context("no KUBECONFIG, no KUBERNETES_SERVICE_HOST and no usable ~/.kube/config")?
    };
    if let Some(url) = &s.cluster_endpoint {
        cfg.cluster_url = url
            .parse()
            .with_context(|| format!("CLUSTER_ENDPOINT={url:?} is not a URL"))?;
    }
    cfg.connect_timeout = Some(std::time::Duration::from_secs(5));
    Ok(cfg)
}

/// What the rest of ipamd holds of the Kubernetes side.
#[derive(Clone)]
pub struct Kube {
    pub view: tokio::sync::watch::Receiver<eniconfig::View>,
    pub events: events::Recorder,
    pub annotator: Option<annotate::Annotator>,
    /// The API's condition in one line, for introspection.
    pub condition: Arc<Mutex<String>>,
}

impl Kube {
    pub fn condition(&self) -> String {
        self.condition.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// Start the watches, the event recorder and (with `ANNOTATE_POD_IP`) the annotator. Returns
/// at once: nothing here waits for the API server.
/// `watch_node`: the Node is watched for its cordon too (AWS_MANAGE_ENIS_NON_SCHEDULABLE false:
/// a cordoned node's pool is held, as upstream's).
pub fn start(
    client: kube::Client,
    s: &Settings,
    watch_node: bool,
    tasks: &mut crate::supervise::Supervisor,
) -> Kube {
    let node_name = s.node_name.clone().unwrap_or_default();
    let condition = Arc::new(Mutex::new("connecting".to_string()));
    let events =
        events::Recorder::start(client.clone(), node_name.clone(), s.pod_name.clone(), tasks);
    let view = watch::start(
        client.clone(),
        node_name,
        s.custom_networking,
        watch_node,
        events.clone(),
        condition.clone(),
        tasks,
    );
    let annotator = s
        .annotate_pod_ip
        .then(|| annotate::Annotator::start(client, tasks));
    Kube {
        view,
        events,
        annotator,
        condition,
    }
}
