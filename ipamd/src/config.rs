//! ipamd's settings from the environment, with upstream's variable names and defaults.
//! Pure: takes a lookup function, so every rule is unit-tested.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::hostnet::iptables::Randomize;
use crate::hostnet::NetConfig;
use crate::pool::warm::Targets;

/// How often the pool manager does what. Upstream hard-codes these; ipamd reads them from
/// `IPAMD_*` variables (seconds, fractions allowed) so tests and unusual clusters can tune them.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// Periodic pool check, besides the checks every ADD/DEL triggers (upstream: 5 s).
    pub pool_check: Duration,
    /// Least time between two releases of surplus addresses (upstream: 30 s).
    pub decrease: Duration,
    /// Compare IMDS with the pool, confirming differences with EC2 (upstream: 60 s).
    pub reconcile: Duration,
    /// An ENI younger than this is not freed (upstream: 1 min).
    pub min_eni_age: Duration,
    /// Leaked-ENI sweep (upstream: 1 h).
    pub leak_cleanup: Duration,
    /// Pause in growth after the subnet ran out of addresses (upstream: 120 s).
    pub subnet_full_backoff: Duration,
    /// Longest pause in growth after growth calls that EC2 throttled (past the per-call
    /// retries) or accepted without the pool growing (ours; the pause doubles from 1 s per
    /// such call in a row).
    pub growth_backoff_max: Duration,
    /// An allocation this young is kept even without its pod's host veth: the plugin may still
    /// be wiring it. Older ones without a veth are released (at start and periodically).
    pub allocation_grace: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            pool_check: Duration::from_secs(5),
            decrease: Duration::from_secs(30),
            reconcile: Duration::from_secs(60),
            min_eni_age: Duration::from_secs(60),
            leak_cleanup: Duration::from_secs(3600),
            subnet_full_backoff: Duration::from_secs(120),
            growth_backoff_max: Duration::from_secs(300),
            allocation_grace: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub socket: PathBuf,
    pub backing_store: PathBuf,
    pub cooldown: Duration,
    pub veth_prefix: String,
    pub external_snat: bool,
    pub max_eni: Option<u32>,
    pub prefix_delegation: bool,
    /// Standalone mode: the node's ENIs come from this JSON file instead of IMDS/EC2.
    pub node_file: Option<PathBuf>,
    pub log_file: String,
    pub log_level: String,
    pub cluster_name: String,
    pub targets: Targets,
    /// Upstream's `AWS_EC2_ENDPOINT` (the SDK's `AWS_ENDPOINT_URL_EC2` also works).
    pub ec2_endpoint: Option<String>,
    pub disable_leaked_eni_cleanup: bool,
    /// `ADDITIONAL_ENI_TAGS`, a JSON object.
    pub additional_eni_tags: BTreeMap<String, String>,
    pub timing: Timing,
    /// This node's EC2 token bucket (ours: `IPAMD_EC2_BURST` calls at once, then
    /// `IPAMD_EC2_RATE` per second).
    pub ec2_burst: u32,
    pub ec2_rate: f64,
    pub net: NetConfig,
    /// INTROSPECTION_BIND_ADDRESS (127.0.0.1:61679); None with DISABLE_INTROSPECTION=true.
    pub introspection: Option<std::net::SocketAddr>,
    /// Metrics on :61678 (ours: IPAMD_METRICS_BIND_ADDRESS); None with DISABLE_METRICS=true.
    pub metrics: Option<std::net::SocketAddr>,
    /// The plugin's state directory (`AWS_CNI_STATE_DIR`, as the plugin reads it): its
    /// per-attachment records name each pod's host veth, and DELs that found ipamd down leave
    /// their release records there.
    pub cni_state_dir: PathBuf,
    /// Custom networking, subnet discovery, the pod IP annotation and the API client.
    pub kube: crate::k8s::Settings,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value:?}: {why}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub why: String,
}

fn bool_var(
    env: &dyn Fn(&str) -> Option<String>,
    var: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    // Go's strconv.ParseBool spellings, which upstream's variables accept.
    match env(var).map(|v| v.trim().to_string()).as_deref() {
        None | Some("") => Ok(default),
        Some("1" | "t" | "T" | "TRUE" | "true" | "True") => Ok(true),
        Some("0" | "f" | "F" | "FALSE" | "false" | "False") => Ok(false),
        Some(v) => Err(ConfigError {
            var,
            value: v.to_string(),
            why: "must be true or false (or 1, t, T, TRUE, True, 0, f, F, FALSE, False)".into(),
        }),
    }
}

fn int_var(
    env: &dyn Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<Option<i64>, ConfigError> {
    match env(var).map(|v| v.trim().to_string()) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v.parse::<i64>().map(Some).map_err(|_| ConfigError {
            var,
            value: v,
            why: "must be an integer".into(),
        }),
    }
}

/// A week: longer than any interval an operator means, short enough for every timer.
const MAX_SECS: f64 = 7.0 * 24.0 * 3600.0;

fn secs_var(
    env: &dyn Fn(&str) -> Option<String>,
    var: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match env(var).map(|v| v.trim().to_string()) {
        None => Ok(default),
        Some(v) if v.is_empty() => Ok(default),
        Some(v) => match v.parse::<f64>() {
            Ok(n) if n.is_finite() && (0.0..=MAX_SECS).contains(&n) => {
                Ok(Duration::from_secs_f64(n))
            }
            _ => Err(ConfigError {
                var,
                value: v,
                why: format!("must be a number of seconds from 0 to {MAX_SECS}"),
            }),
        },
    }
}

fn count_var(
    env: &dyn Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<Option<u32>, ConfigError> {
    match int_var(env, var)? {
        None => Ok(None),
        Some(n) if (0..=u32::MAX as i64).contains(&n) => Ok(Some(n as u32)),
        Some(n) => Err(ConfigError {
            var,
            value: n.to_string(),
            why: "must be 0 or more".into(),
        }),
    }
}

fn cidr_list(
    env: &dyn Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<Vec<String>, ConfigError> {
    let Some(v) = env(var) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for c in v.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        // Upstream accepts IPv6 entries here (they only matter to its IPv6 rules): so do we,
        // and the IPv4 rules leave them out with a warning.
        if c.contains(':') && c.parse::<ipnet::IpNet>().is_ok() {
            out.push(c.to_string());
            continue;
        }
        match crate::cidr::normalise(c).filter(|_| c.contains('/')) {
            Some(n) => out.push(n),
            None => {
                return Err(ConfigError {
                    var,
                    value: v.clone(),
                    why: format!("{c:?} is not a CIDR"),
                })
            }
        }
    }
    Ok(out)
}

fn net_config(
    env: &dyn Fn(&str) -> Option<String>,
    veth_prefix: &str,
    external_snat: bool,
) -> Result<NetConfig, ConfigError> {
    let d = NetConfig::default();
    let mtu = match int_var(env, "AWS_VPC_ENI_MTU")? {
        None => d.mtu,
        Some(m) if (576..=9001).contains(&m) => m as u32,
        Some(m) => {
            return Err(ConfigError {
                var: "AWS_VPC_ENI_MTU",
                value: m.to_string(),
                why: "must be between 576 and 9001".into(),
            })
        }
    };
    let mark = match env("AWS_VPC_K8S_CNI_CONNMARK").map(|v| v.trim().to_string()) {
        None => d.mark,
        Some(v) if v.is_empty() => d.mark,
        Some(v) => {
            let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => v.parse::<u32>().ok(),
            };
            match parsed {
                Some(m) if m != 0 => m,
                _ => {
                    return Err(ConfigError {
                        var: "AWS_VPC_K8S_CNI_CONNMARK",
                        value: v,
                        why: "must be a non-zero 32-bit mark, e.g. 0x80".into(),
                    })
                }
            }
        }
    };
    let randomize = match env("AWS_VPC_K8S_CNI_RANDOMIZESNAT")
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") | Some("prng") => Randomize::Fully,
        Some("hashrandom") => Randomize::Hash,
        Some("none") => Randomize::None,
        Some(other) => {
            return Err(ConfigError {
                var: "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
                value: other.to_string(),
                why: "must be prng, hashrandom or none".into(),
            })
        }
    };
    Ok(NetConfig {
        mtu,
        mark,
        node_port_support: bool_var(env, "AWS_VPC_CNI_NODE_PORT_SUPPORT", true)?,
        external_snat,
        exclude_snat_cidrs: cidr_list(env, "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS")?,
        external_service_cidrs: cidr_list(env, "AWS_EXTERNAL_SERVICE_CIDRS")?,
        randomize,
        veth_prefix: veth_prefix.to_string(),
    })
}

fn eni_tags(env: &dyn Fn(&str) -> Option<String>) -> Result<BTreeMap<String, String>, ConfigError> {
    const VAR: &str = "ADDITIONAL_ENI_TAGS";
    let Some(v) = env(VAR).filter(|v| !v.trim().is_empty()) else {
        return Ok(BTreeMap::new());
    };
    let tags: BTreeMap<String, String> = serde_json::from_str(&v).map_err(|e| ConfigError {
        var: VAR,
        value: v.clone(),
        why: format!("must be a JSON object of string values: {e}"),
    })?;
    // The k8s.amazonaws.com namespace is ipamd's own (instance id, createdAt, no_manage).
    if let Some(k) = tags.keys().find(|k| k.contains("k8s.amazonaws.com")) {
        return Err(ConfigError {
            var: VAR,
            value: v.clone(),
            why: format!("tag key {k:?} is reserved (k8s.amazonaws.com keys are set by ipamd)"),
        });
    }
    Ok(tags)
}

fn kube_settings(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<crate::k8s::Settings, ConfigError> {
    let key = |var: &str| {
        env(var)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| crate::k8s::eniconfig::DEFAULT_KEY.to_string())
    };
    let s = crate::k8s::Settings {
        custom_networking: bool_var(env, "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", false)?,
        keys: crate::k8s::eniconfig::Keys {
            label: key("ENI_CONFIG_LABEL_DEF"),
            annotation: key("ENI_CONFIG_ANNOTATION_DEF"),
        },
        subnet_discovery: bool_var(env, "ENABLE_SUBNET_DISCOVERY", true)?,
        annotate_pod_ip: bool_var(env, "ANNOTATE_POD_IP", false)?,
        node_name: env("MY_NODE_NAME")
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty()),
        pod_name: env("MY_POD_NAME")
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty()),
        cluster_endpoint: env("CLUSTER_ENDPOINT")
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty()),
    };
    if s.custom_networking && s.node_name.is_none() {
        return Err(ConfigError {
            var: "MY_NODE_NAME",
            value: String::new(),
            why: "custom networking reads the node's ENIConfig label: set MY_NODE_NAME from the downward API (spec.nodeName)".into(),
        });
    }
    Ok(s)
}

impl Config {
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let cooldown = match int_var(env, "IP_COOLDOWN_PERIOD")? {
            None => 30,
            Some(n) if n >= 0 => n as u64,
            Some(n) => {
                return Err(ConfigError {
                    var: "IP_COOLDOWN_PERIOD",
                    value: n.to_string(),
                    why: "must be 0 or more seconds".into(),
                })
            }
        };
        // Upstream: below 1 means the instance type's limit.
        let max_eni = match int_var(env, "MAX_ENI")? {
            None => None,
            Some(n) if n < 1 => None,
            // Upstream reads an int: anything above what an instance can have means "no limit".
            Some(n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
        };
        let veth_prefix = env("AWS_VPC_K8S_CNI_VETHPREFIX").unwrap_or_else(|| "eni".into());
        // The plugin's rule, with its words: the prefix also reaches iptables rules.
        if let Err(why) = cni_common::naming::validate_veth_prefix(&veth_prefix) {
            return Err(ConfigError {
                var: "AWS_VPC_K8S_CNI_VETHPREFIX",
                value: veth_prefix,
                why: why.to_string(),
            });
        }
        let prefix_delegation = bool_var(env, "ENABLE_PREFIX_DELEGATION", false)?;
        let warm_ip = count_var(env, "WARM_IP_TARGET")?.filter(|n| *n > 0);
        let minimum_ip = count_var(env, "MINIMUM_IP_TARGET")?.filter(|n| *n > 0);
        // The default is the shipped manifest's value; upstream's code default is 0, which with
        // prefix delegation and no IP targets its entrypoint refuses anyway.
        let warm_prefix = count_var(env, "WARM_PREFIX_TARGET")?.unwrap_or(1);
        if prefix_delegation && warm_prefix == 0 && warm_ip.is_none() && minimum_ip.is_none() {
            return Err(ConfigError {
                var: "WARM_PREFIX_TARGET",
                value: "0".into(),
                why: "with ENABLE_PREFIX_DELEGATION=true, set WARM_PREFIX_TARGET, WARM_IP_TARGET or MINIMUM_IP_TARGET above 0".into(),
            });
        }
        let targets = Targets {
            warm_eni: count_var(env, "WARM_ENI_TARGET")?.unwrap_or(1),
            warm_ip,
            minimum_ip,
            warm_prefix,
            prefix_delegation,
        };
        let d = Timing::default();
        let timing = Timing {
            pool_check: secs_var(env, "IPAMD_POOL_CHECK_INTERVAL", d.pool_check)?,
            decrease: secs_var(env, "IPAMD_DECREASE_INTERVAL", d.decrease)?,
            reconcile: secs_var(env, "IPAMD_RECONCILE_INTERVAL", d.reconcile)?,
            min_eni_age: secs_var(env, "IPAMD_MIN_ENI_AGE", d.min_eni_age)?,
            leak_cleanup: secs_var(env, "IPAMD_LEAKED_ENI_CLEANUP_INTERVAL", d.leak_cleanup)?,
            subnet_full_backoff: secs_var(env, "IPAMD_SUBNET_FULL_BACKOFF", d.subnet_full_backoff)?,
            growth_backoff_max: secs_var(env, "IPAMD_GROWTH_BACKOFF_MAX", d.growth_backoff_max)?,
            allocation_grace: secs_var(env, "IPAMD_ALLOCATION_GRACE", d.allocation_grace)?,
        };
        // Each of these drives a periodic task, which a zero period would stop or spin.
        for (var, d) in [
            ("IPAMD_POOL_CHECK_INTERVAL", timing.pool_check),
            ("IPAMD_RECONCILE_INTERVAL", timing.reconcile),
            ("IPAMD_LEAKED_ENI_CLEANUP_INTERVAL", timing.leak_cleanup),
        ] {
            if d < Duration::from_millis(10) {
                return Err(ConfigError {
                    var,
                    value: format!("{}", d.as_secs_f64()),
                    why: "must be at least 0.01 seconds".into(),
                });
            }
        }
        let external_snat = bool_var(env, "AWS_VPC_K8S_CNI_EXTERNALSNAT", false)?;
        let net = net_config(env, &veth_prefix, external_snat)?;
        let addr =
            |var: &'static str, default: &str| -> Result<std::net::SocketAddr, ConfigError> {
                let v = env(var)
                    .filter(|v| !v.trim().is_empty())
                    .unwrap_or_else(|| default.into());
                // Go's ":61678" means every address.
                let v2 = if v.starts_with(':') {
                    format!("0.0.0.0{v}")
                } else {
                    v.clone()
                };
                v2.parse().map_err(|_| ConfigError {
                    var,
                    value: v,
                    why: "must be host:port, e.g. 127.0.0.1:61679".into(),
                })
            };
        let introspection = if bool_var(env, "DISABLE_INTROSPECTION", false)? {
            None
        } else {
            Some(addr("INTROSPECTION_BIND_ADDRESS", "127.0.0.1:61679")?)
        };
        let metrics = if bool_var(env, "DISABLE_METRICS", false)? {
            None
        } else {
            Some(addr("IPAMD_METRICS_BIND_ADDRESS", ":61678")?)
        };
        let ec2_burst = count_var(env, "IPAMD_EC2_BURST")?.unwrap_or(20);
        if ec2_burst == 0 {
            return Err(ConfigError {
                var: "IPAMD_EC2_BURST",
                value: "0".into(),
                why: "must be at least 1 EC2 call".into(),
            });
        }
        let ec2_rate = match env("IPAMD_EC2_RATE").map(|v| v.trim().to_string()) {
            None => 10.0,
            Some(v) if v.is_empty() => 10.0,
            Some(v) => match v.parse::<f64>() {
                Ok(r) if r.is_finite() && (0.001..=1000.0).contains(&r) => r,
                _ => {
                    return Err(ConfigError {
                        var: "IPAMD_EC2_RATE",
                        value: v,
                        why: "must be EC2 calls per second, from 0.001 to 1000".into(),
                    })
                }
            },
        };
        Ok(Config {
            ec2_burst,
            ec2_rate,
            introspection,
            metrics,
            net,
            targets,
            ec2_endpoint: env("AWS_EC2_ENDPOINT").filter(|s| !s.trim().is_empty()),
            disable_leaked_eni_cleanup: bool_var(env, "DISABLE_LEAKED_ENI_CLEANUP", false)?,
            additional_eni_tags: eni_tags(env)?,
            timing,
            socket: env("IPAMD_SOCKET_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(cni_proto::DEFAULT_SOCKET)),
            backing_store: env("AWS_VPC_K8S_CNI_BACKING_STORE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/run/aws-node/ipam.json")),
            cooldown: Duration::from_secs(cooldown),
            veth_prefix,
            external_snat,
            max_eni,
            prefix_delegation,
            node_file: env("IPAMD_NODE_FILE")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            log_file: env("AWS_VPC_K8S_CNI_LOG_FILE")
                .unwrap_or_else(|| "/host/var/log/aws-routed-eni/ipamd.log".into()),
            // Upstream defaults to DEBUG; ours logs every allocation and release at INFO already,
            // and DEBUG adds per-request detail an operator asks for when they need it.
            log_level: env("AWS_VPC_K8S_CNI_LOGLEVEL")
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(|| "INFO".into()),
            cni_state_dir: env(cni_common::state::STATE_DIR_ENV)
                .filter(|v| !v.trim().is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(cni_common::state::DEFAULT_STATE_DIR)),
            cluster_name: env("CLUSTER_NAME").unwrap_or_default(),
            kube: kube_settings(env)?,
        })
    }
}

/// A lookup over fixed pairs, for tests of the environment parsers.
#[cfg(test)]
pub(crate) fn with<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |k| {
        pairs
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_defaults() {
        let c = Config::from_env(&with(&[])).unwrap();
        assert_eq!(c.socket, PathBuf::from("/var/run/aws-node/ipamd.sock"));
        assert_eq!(
            c.backing_store,
            PathBuf::from("/var/run/aws-node/ipam.json")
        );
        assert_eq!(c.cooldown, Duration::from_secs(30));
        assert_eq!(c.veth_prefix, "eni");
        assert!(!c.external_snat);
        assert_eq!(c.max_eni, None);
        assert_eq!(c.targets, Targets::default());
        assert_eq!(c.targets.warm_eni, 1);
        assert!(!c.disable_leaked_eni_cleanup);
        assert_eq!(c.timing, Timing::default());
        assert_eq!(c.net, NetConfig::default());
        assert!(!c.kube.custom_networking);
        assert!(c.kube.subnet_discovery, "upstream's default");
        assert!(!c.kube.annotate_pod_ip);
        assert_eq!(c.kube.keys, crate::k8s::eniconfig::Keys::default());
    }

    #[test]
    fn kubernetes_settings() {
        let c = Config::from_env(&with(&[
            ("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true"),
            ("ENI_CONFIG_LABEL_DEF", "topology.kubernetes.io/zone"),
            ("ENABLE_SUBNET_DISCOVERY", "false"),
            ("ANNOTATE_POD_IP", "true"),
            ("MY_NODE_NAME", "ip-10-0-1-10"),
            ("CLUSTER_ENDPOINT", "https://127.0.0.1:6443"),
        ]))
        .unwrap();
        assert!(c.kube.custom_networking && c.kube.annotate_pod_ip);
        assert!(!c.kube.subnet_discovery);
        assert_eq!(c.kube.keys.label, "topology.kubernetes.io/zone");
        assert_eq!(c.kube.keys.annotation, "k8s.amazonaws.com/eniConfig");
        assert_eq!(c.kube.node_name.as_deref(), Some("ip-10-0-1-10"));
        let e =
            Config::from_env(&with(&[("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true")])).unwrap_err();
        assert_eq!(e.var, "MY_NODE_NAME");
    }

    #[test]
    fn node_network_settings() {
        let c = Config::from_env(&with(&[
            ("AWS_VPC_ENI_MTU", "1500"),
            ("AWS_VPC_K8S_CNI_CONNMARK", "0x4000"),
            ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "hashrandom"),
            (
                "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
                "172.16.0.0/12, 192.168.0.0/16",
            ),
            ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "true"),
        ]))
        .unwrap();
        assert_eq!(c.net.mtu, 1500);
        assert_eq!(c.net.mark, 0x4000);
        assert_eq!(c.net.randomize, Randomize::Hash);
        assert_eq!(c.net.exclude_snat_cidrs.len(), 2);
        assert!(c.net.external_snat);
        for (var, val) in [
            ("AWS_VPC_ENI_MTU", "65000"),
            ("AWS_VPC_K8S_CNI_CONNMARK", "mark"),
            ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "yes"),
            ("AWS_EXTERNAL_SERVICE_CIDRS", "10.0.0.0"),
        ] {
            let pairs = [(var, val)];
            assert_eq!(Config::from_env(&with(&pairs)).unwrap_err().var, var);
        }
    }

    #[test]
    fn pool_targets_and_tags() {
        let c = Config::from_env(&with(&[
            ("WARM_IP_TARGET", "5"),
            ("MINIMUM_IP_TARGET", "0"),
            ("ADDITIONAL_ENI_TAGS", r#"{"team":"net"}"#),
            ("IPAMD_MIN_ENI_AGE", "0.5"),
        ]))
        .unwrap();
        assert_eq!(c.targets.warm_ip, Some(5));
        assert_eq!(c.targets.minimum_ip, None);
        assert!(c.targets.ip_targets());
        assert_eq!(c.additional_eni_tags["team"], "net");
        assert_eq!(c.timing.min_eni_age, Duration::from_millis(500));
        let e = Config::from_env(&with(&[("ADDITIONAL_ENI_TAGS", "team=net")])).unwrap_err();
        assert_eq!(e.var, "ADDITIONAL_ENI_TAGS");
        let e = Config::from_env(&with(&[(
            "ADDITIONAL_ENI_TAGS",
            r#"{"node.k8s.amazonaws.com/no_manage":"true"}"#,
        )]))
        .unwrap_err();
        assert!(e.why.contains("reserved"));
        let e = Config::from_env(&with(&[
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("WARM_PREFIX_TARGET", "0"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "WARM_PREFIX_TARGET");
        let e = Config::from_env(&with(&[("WARM_ENI_TARGET", "-1")])).unwrap_err();
        assert_eq!(e.var, "WARM_ENI_TARGET");
    }

    #[test]
    fn go_boolean_spellings_and_max_eni_below_one() {
        for (v, want) in [
            ("t", true),
            ("T", true),
            ("TRUE", true),
            ("True", true),
            ("1", true),
        ] {
            let pairs = [("AWS_VPC_K8S_CNI_EXTERNALSNAT", v)];
            assert_eq!(
                Config::from_env(&with(&pairs)).unwrap().external_snat,
                want,
                "{v}"
            );
        }
        for v in ["f", "F", "FALSE", "False", "0", "false"] {
            let pairs = [("AWS_VPC_K8S_CNI_EXTERNALSNAT", v)];
            assert!(
                !Config::from_env(&with(&pairs)).unwrap().external_snat,
                "{v}"
            );
        }
        // Go refuses these; so do we (naming the variable).
        for v in ["yes", "tRUE", "on"] {
            let pairs = [("AWS_VPC_K8S_CNI_EXTERNALSNAT", v)];
            assert_eq!(
                Config::from_env(&with(&pairs)).unwrap_err().var,
                "AWS_VPC_K8S_CNI_EXTERNALSNAT"
            );
        }
        assert_eq!(
            Config::from_env(&with(&[("MAX_ENI", "0")]))
                .unwrap()
                .max_eni,
            None
        );
    }

    #[test]
    fn errors_name_the_variable() {
        let e = Config::from_env(&with(&[("IP_COOLDOWN_PERIOD", "soon")])).unwrap_err();
        assert_eq!(e.var, "IP_COOLDOWN_PERIOD");
        let e = Config::from_env(&with(&[("AWS_VPC_K8S_CNI_VETHPREFIX", "vlan")])).unwrap_err();
        assert_eq!(e.var, "AWS_VPC_K8S_CNI_VETHPREFIX");
        let e = Config::from_env(&with(&[("ENABLE_PREFIX_DELEGATION", "yes")])).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("ENABLE_PREFIX_DELEGATION=\"yes\""));
        assert_eq!(
            Config::from_env(&with(&[("MAX_ENI", "-1")]))
                .unwrap()
                .max_eni,
            None
        );
        assert_eq!(
            Config::from_env(&with(&[("MAX_ENI", "2")]))
                .unwrap()
                .max_eni,
            Some(2)
        );
    }

    #[test]
    fn ranges_are_checked() {
        for (var, val) in [
            ("IPAMD_RECONCILE_INTERVAL", "0"),
            ("IPAMD_POOL_CHECK_INTERVAL", "0"),
            ("IPAMD_RECONCILE_INTERVAL", "1e30"),
            ("IPAMD_ALLOCATION_GRACE", "inf"),
            ("IPAMD_ALLOCATION_GRACE", "-1"),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "e\nx"),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "e x"),
        ] {
            let pairs = [(var, val)];
            let e = Config::from_env(&with(&pairs)).unwrap_err();
            assert_eq!(e.var, var, "{val:?}");
        }
        for (var, val) in [
            ("IPAMD_EC2_RATE", "0"),
            ("IPAMD_EC2_RATE", "fast"),
            ("IPAMD_EC2_BURST", "0"),
        ] {
            let pairs = [(var, val)];
            let e = Config::from_env(&with(&pairs)).unwrap_err();
            assert_eq!(e.var, var, "{val:?}");
        }
        let c = Config::from_env(&with(&[("IPAMD_EC2_RATE", "0.5")])).unwrap();
        assert_eq!(c.ec2_rate, 0.5);
        // Above 2^32 means "no limit", not 0 after wrapping.
        let c = Config::from_env(&with(&[("MAX_ENI", "8589934593")])).unwrap();
        assert_eq!(c.max_eni, Some(u32::MAX));
        assert_eq!(Config::from_env(&with(&[])).unwrap().log_level, "INFO");
    }
}
