//! Which ENIConfig a node uses, as upstream decides it. Pure: the watches feed it a view of the
//! node and the ENIConfigs, and the pool manager asks it where the next ENI goes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Upstream's default for both `ENI_CONFIG_LABEL_DEF` and `ENI_CONFIG_ANNOTATION_DEF`.
pub const DEFAULT_KEY: &str = "k8s.amazonaws.com/eniConfig";
/// A label set outside the cluster's tooling that names the ENIConfig and wins over the others.
pub const EXTERNAL_LABEL: &str = "vpc.amazonaws.com/externalEniConfig";
/// The ENIConfig a node without any of the keys uses.
pub const DEFAULT_NAME: &str = "default";

/// An ENIConfig's spec (`crd.k8s.amazonaws.com/v1alpha1`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EniConfigSpec {
    #[serde(default)]
    pub subnet: String,
    #[serde(default)]
    pub security_groups: Vec<String>,
}

/// The node's labels and annotations, as the node watch last saw them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeMeta {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Cordoned: the `node.kubernetes.io/unschedulable:NoSchedule` taint (upstream's test).
    pub unschedulable: bool,
}

/// Where the keys are looked up (`ENI_CONFIG_LABEL_DEF`, `ENI_CONFIG_ANNOTATION_DEF`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub label: String,
    pub annotation: String,
}

impl Default for Keys {
    fn default() -> Self {
        Keys {
            label: DEFAULT_KEY.into(),
            annotation: DEFAULT_KEY.into(),
        }
    }
}

/// The ENIConfig name for a node: the external label, then the annotation, then the label,
/// then "default". A key that is present counts even with an empty value (as upstream).
pub fn name_for(node: &NodeMeta, keys: &Keys) -> (String, &'static str) {
    if let Some(v) = node.labels.get(EXTERNAL_LABEL) {
        return (v.clone(), "label vpc.amazonaws.com/externalEniConfig");
    }
    if let Some(v) = node.annotations.get(&keys.annotation) {
        return (v.clone(), "annotation");
    }
    if let Some(v) = node.labels.get(&keys.label) {
        return (v.clone(), "label");
    }
    (DEFAULT_NAME.into(), "default name")
}

/// What the watches know: the node, every ENIConfig, and whether each watch has listed once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub node: Option<NodeMeta>,
    pub node_synced: bool,
    pub eniconfigs: BTreeMap<String, EniConfigSpec>,
    pub eniconfigs_synced: bool,
    /// The last failure of each watch (by name), cleared when that watch delivers again.
    pub errors: BTreeMap<&'static str, String>,
}

/// The ENIConfig this node's next ENI follows, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    Found {
        name: String,
        spec: EniConfigSpec,
    },
    /// The node names an ENIConfig that does not exist (or has no subnet).
    Missing {
        name: String,
        why: String,
    },
    /// The watches have not listed yet (API unreachable, no permission...): unknown.
    Unknown(String),
}

pub fn select(view: &View, keys: &Keys, node_name: &str) -> Selection {
    if !view.node_synced || !view.eniconfigs_synced {
        let what = match (view.node_synced, view.eniconfigs_synced) {
            (false, false) => "the node and the ENIConfigs",
            (false, true) => "the node",
            _ => "the ENIConfigs",
        };
        let mut why = format!("{what} not read from the Kubernetes API yet");
        if !view.errors.is_empty() {
            let errs: Vec<&str> = view.errors.values().map(String::as_str).collect();
            why.push_str(&format!(" ({})", errs.join("; ")));
        }
        return Selection::Unknown(why);
    }
    let Some(node) = &view.node else {
        return Selection::Unknown(format!(
            "node {node_name:?} (MY_NODE_NAME) does not exist in the Kubernetes API"
        ));
    };
    let (name, from) = name_for(node, keys);
    match view.eniconfigs.get(&name) {
        Some(spec) if spec.subnet.trim().is_empty() => Selection::Missing {
            why: format!("ENIConfig {name:?} (from the node's {from}) has no spec.subnet"),
            name,
        },
        Some(spec) => Selection::Found {
            name,
            spec: spec.clone(),
        },
        None => Selection::Missing {
            why: format!(
                "no ENIConfig named {name:?} (from the node's {from}); custom networking creates no ENI until it exists"
            ),
            name,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> NodeMeta {
        let m = |p: &[(&str, &str)]| {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        NodeMeta {
            labels: m(labels),
            annotations: m(annotations),
            unschedulable: false,
        }
    }

    #[test]
    fn name_order_is_external_label_annotation_label_default() {
        let k = Keys::default();
        assert_eq!(name_for(&node(&[], &[]), &k).0, "default");
        assert_eq!(name_for(&node(&[(DEFAULT_KEY, "l")], &[]), &k).0, "l");
        assert_eq!(
            name_for(&node(&[(DEFAULT_KEY, "l")], &[(DEFAULT_KEY, "a")]), &k).0,
            "a"
        );
        assert_eq!(
            name_for(
                &node(
                    &[(DEFAULT_KEY, "l"), (EXTERNAL_LABEL, "x")],
                    &[(DEFAULT_KEY, "a")]
                ),
                &k
            )
            .0,
            "x"
        );
        // Present but empty still counts, as upstream.
        assert_eq!(name_for(&node(&[(DEFAULT_KEY, "")], &[]), &k).0, "");
        let zone = Keys {
            label: "topology.kubernetes.io/zone".into(),
            annotation: DEFAULT_KEY.into(),
        };
        assert_eq!(
            name_for(
                &node(&[("topology.kubernetes.io/zone", "us-west-2a")], &[]),
                &zone
            )
            .0,
            "us-west-2a"
        );
    }

    #[test]
    fn selection_names_what_is_missing() {
        let k = Keys::default();
        let mut v = View::default();
        assert!(matches!(select(&v, &k, "n"), Selection::Unknown(_)));
        v.node_synced = true;
        v.eniconfigs_synced = true;
        match select(&v, &k, "n1") {
            Selection::Unknown(w) => assert!(w.contains("n1"), "{w}"),
            other => panic!("{other:?}"),
        }
        v.node = Some(node(&[(DEFAULT_KEY, "az1")], &[]));
        match select(&v, &k, "n1") {
            Selection::Missing { name, why } => {
                assert_eq!(name, "az1");
                assert!(why.contains("no ENIConfig named \"az1\""), "{why}");
            }
            other => panic!("{other:?}"),
        }
        v.eniconfigs.insert(
            "az1".into(),
            EniConfigSpec {
                subnet: "subnet-1".into(),
                security_groups: vec!["sg-1".into()],
            },
        );
        assert!(matches!(
            select(&v, &k, "n1"),
            Selection::Found { ref name, .. } if name == "az1"
        ));
        v.eniconfigs.insert("az1".into(), EniConfigSpec::default());
        assert!(matches!(select(&v, &k, "n1"), Selection::Missing { .. }));
    }
}
