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
    /// ENABLE_IPv6 (false): pods get IPv6 addresses from one /80 on the primary ENI.
    pub ipv6: bool,
    /// ENABLE_V6_EGRESS (false): IPv4 pods reach IPv6 through egress-cni (IPv4 clusters).
    pub v6_egress: bool,
    /// ENABLE_V4_EGRESS (true): IPv6 pods reach IPv4 through egress-cni (IPv6 clusters).
    pub v4_egress: bool,
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
    pub introspection: Option<Bind>,
    /// Metrics on :61678 (ours: IPAMD_METRICS_BIND_ADDRESS); None with DISABLE_METRICS=true.
    pub metrics: Option<Bind>,
    /// The plugin's state directory (`AWS_CNI_STATE_DIR`, as the plugin reads it): its
    /// per-attachment records name each pod's host veth, and DELs that found ipamd down leave
    /// their release records there.
    pub cni_state_dir: PathBuf,
    /// Custom networking, subnet discovery, the pod IP annotation and the API client.
    pub kube: crate::k8s::Settings,
    /// `NETWORK_POLICY_ENFORCING_MODE` as given (`none`, `strict`, `standard`; empty when
    /// unset): passed in every reply to the plugin, which then calls the network policy agent,
    /// and to the agent itself (GetNetworkPolicyConfigs).
    pub network_policy_mode: String,
    /// False with `DISABLE_NETWORK_RESOURCE_PROVISIONING` (or `ENABLE_IMDS_ONLY_MODE`): ENIs,
    /// addresses and prefixes are someone else's to attach and assign; ipamd uses what it
    /// finds, adopts what appears, and never calls EC2 to grow, shrink or clean up.
    pub provisioning: bool,
    /// `ENABLE_IMDS_ONLY_MODE`: the node's ENIs come from IMDS alone (no tags, so no
    /// `no_manage`); implies no provisioning.
    pub imds_only: bool,
    /// `MANAGE_UNTAGGED_ENI` (default true): false leaves alone every ENI but the primary that
    /// does not carry this instance's `node.k8s.amazonaws.com/instance_id` tag.
    pub manage_untagged_enis: bool,
    /// `AWS_MANAGE_ENIS_NON_SCHEDULABLE` (default false): on a cordoned node (read from the
    /// Kubernetes API) the pool is left as it is unless this is true.
    pub manage_enis_non_schedulable: bool,
    /// `HTTP_TIMEOUT`: each EC2 request's timeout (upstream: seconds, 10 or more, else 10).
    pub http_timeout: Duration,
    /// `VPC_CNI_VERSION`: in the EC2 user agent, as upstream's.
    pub vpc_cni_version: Option<String>,
    /// Bad values replaced by upstream's fallback, for ipamd to log at start.
    pub warnings: Vec<ConfigError>,
}

/// Where an HTTP endpoint listens, in the forms upstream's Go listeners take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    Tcp(std::net::SocketAddr),
    /// `:port`: every address, IPv6 and IPv4 (Go's meaning).
    AnyPort(u16),
    /// `unix:/path`.
    Unix(PathBuf),
}

impl std::fmt::Display for Bind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bind::Tcp(a) => write!(f, "{a}"),
            Bind::AnyPort(p) => write!(f, ":{p}"),
            Bind::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// `host:port` (a name is resolved now, as Go's listener does at start), `:port` or
/// `unix:/path`.
fn bind_addr(var: &'static str, v: &str) -> Result<Bind, ConfigError> {
    use std::net::ToSocketAddrs;
    let bad = |why: &str| ConfigError {
        var,
        value: v.to_string(),
        why: why.to_string(),
    };
    if let Some(path) = v.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if !path.starts_with('/') {
            return Err(bad(
                "a unix socket needs an absolute path, e.g. unix:/var/run/aws-node/introspect.sock",
            ));
        }
        return Ok(Bind::Unix(PathBuf::from(path)));
    }
    if let Some(port) = v.strip_prefix(':') {
        return port
            .parse()
            .map(Bind::AnyPort)
            .map_err(|_| bad("must be host:port, :port or unix:/path"));
    }
    if let Ok(a) = v.parse() {
        return Ok(Bind::Tcp(a));
    }
    match v.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => Ok(Bind::Tcp(a)),
        _ => Err(bad(
            "must be host:port (a name that resolves), :port or unix:/path",
        )),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value:?}: {why}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub why: String,
}

/// The environment being read, and what was wrong with it but did not stop the start.
pub(crate) struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    warnings: std::cell::RefCell<Vec<ConfigError>>,
}

impl<'a> Env<'a> {
    pub(crate) fn new(lookup: &'a dyn Fn(&str) -> Option<String>) -> Env<'a> {
        Env {
            lookup,
            warnings: Default::default(),
        }
    }

    pub(crate) fn var(&self, k: &str) -> Option<String> {
        (self.lookup)(k)
    }

    /// A bad value replaced by upstream's fallback: said, not fatal.
    fn fallback(&self, var: &'static str, value: &str, why: impl Into<String>) {
        self.warnings.borrow_mut().push(ConfigError {
            var,
            value: value.to_string(),
            why: why.into(),
        });
    }

    pub(crate) fn warnings(&self) -> Vec<ConfigError> {
        self.warnings.borrow().clone()
    }
}

/// A boolean as upstream reads it: Go's spellings; anything else is the default, said.
pub(crate) fn bool_var(env: &Env, var: &'static str, default: bool) -> Result<bool, ConfigError> {
    match bool_from(var, env.var(var), default) {
        Ok(b) => Ok(b),
        Err(e) => {
            env.fallback(
                var,
                &e.value,
                format!("{}; using {default}, as upstream", e.why),
            );
            Ok(default)
        }
    }
}

/// One boolean variable's value: Go's strconv.ParseBool spellings, which upstream's variables
/// accept; unset or empty is the default.
pub fn bool_from(
    var: &'static str,
    value: Option<String>,
    default: bool,
) -> Result<bool, ConfigError> {
    match value.map(|v| v.trim().to_string()).as_deref() {
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

fn int_var(env: &Env, var: &'static str) -> Result<Option<i64>, ConfigError> {
    match env.var(var).map(|v| v.trim().to_string()) {
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

fn secs_var(env: &Env, var: &'static str, default: Duration) -> Result<Duration, ConfigError> {
    match env.var(var).map(|v| v.trim().to_string()) {
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

/// A count upstream reads leniently (the warm targets, MAX_ENI): not an integer, or below
/// zero, is `fallback`, said.
fn lenient_count(env: &Env, var: &'static str, fallback: Option<u32>) -> Option<u32> {
    let v = env.var(var).map(|v| v.trim().to_string())?;
    if v.is_empty() {
        return fallback;
    }
    match v.parse::<i64>() {
        Ok(n) if n >= 0 => Some(u32::try_from(n).unwrap_or(u32::MAX)),
        _ => {
            let dflt = fallback.map_or("unset".to_string(), |n| n.to_string());
            env.fallback(
                var,
                &v,
                format!("not a count of 0 or more; using {dflt}, as upstream"),
            );
            fallback
        }
    }
}

/// An integer in Go's base-0 syntax (upstream parses the connmark with it): 0x hex, 0o or a
/// leading 0 octal, 0b binary, else decimal.
fn go_uint(v: &str) -> Option<u64> {
    let (digits, radix) = if let Some(h) = v.strip_prefix("0x").or(v.strip_prefix("0X")) {
        (h, 16)
    } else if let Some(b) = v.strip_prefix("0b").or(v.strip_prefix("0B")) {
        (b, 2)
    } else if let Some(o) = v.strip_prefix("0o").or(v.strip_prefix("0O")) {
        (o, 8)
    } else if v.len() > 1 && v.starts_with('0') {
        (&v[1..], 8)
    } else {
        (v, 10)
    };
    u64::from_str_radix(&digits.replace('_', ""), radix).ok()
}

fn count_var(env: &Env, var: &'static str) -> Result<Option<u32>, ConfigError> {
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

fn cidr_list(env: &Env, var: &'static str) -> Result<Vec<String>, ConfigError> {
    let Some(v) = env.var(var) else {
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
            // Upstream skips an entry it cannot parse; so do we, saying so.
            None => env.fallback(
                var,
                &v,
                format!("{c:?} is not a CIDR; left out, as upstream"),
            ),
        }
    }
    Ok(out)
}

fn net_config(env: &Env, veth_prefix: &str, external_snat: bool) -> Result<NetConfig, ConfigError> {
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
    let mark = match env
        .var("AWS_VPC_K8S_CNI_CONNMARK")
        .map(|v| v.trim().to_string())
    {
        None => d.mark,
        Some(v) if v.is_empty() => d.mark,
        Some(v) => match go_uint(&v).and_then(|m| u32::try_from(m).ok()) {
            Some(m) if m != 0 => m,
            _ => {
                env.fallback(
                    "AWS_VPC_K8S_CNI_CONNMARK",
                    &v,
                    "not a non-zero 32-bit mark; using 0x80, as upstream",
                );
                d.mark
            }
        },
    };
    // Upstream's three values, as spelt there; anything else is prng, said.
    let randomize = match env
        .var("AWS_VPC_K8S_CNI_RANDOMIZESNAT")
        .map(|v| v.trim().to_string())
        .as_deref()
    {
        None | Some("") | Some("prng") => Randomize::Fully,
        Some("hashrandom") => Randomize::Hash,
        Some("none") => Randomize::None,
        Some(other) => {
            env.fallback(
                "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
                other,
                "not prng, hashrandom or none; using prng, as upstream",
            );
            Randomize::Fully
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

fn eni_tags(env: &Env) -> Result<BTreeMap<String, String>, ConfigError> {
    const VAR: &str = "ADDITIONAL_ENI_TAGS";
    let Some(v) = env.var(VAR).filter(|v| !v.trim().is_empty()) else {
        return Ok(BTreeMap::new());
    };
    let mut tags: BTreeMap<String, String> = match serde_json::from_str(&v) {
        Ok(t) => t,
        Err(e) => {
            env.fallback(
                VAR,
                &v,
                format!("not a JSON object of string values ({e}); no extra tags, as upstream"),
            );
            return Ok(BTreeMap::new());
        }
    };
    // The k8s.amazonaws.com namespace is ipamd's own (instance id, createdAt, no_manage):
    // upstream drops such keys, and so do we, saying so.
    let reserved: Vec<String> = tags
        .keys()
        .filter(|k| k.contains("k8s.amazonaws.com"))
        .cloned()
        .collect();
    for k in reserved {
        tags.remove(&k);
        env.fallback(
            VAR,
            &v,
            format!("tag key {k:?} is reserved (k8s.amazonaws.com keys are ipamd's); dropped"),
        );
    }
    Ok(tags)
}

/// Upstream's variables that ask for what this ipamd does not do. Each refusal names the
/// variable and what to set instead; the values upstream's own manifest and chart ship
/// (`ENABLE_IPv4=true`, `ENABLE_IPv6=false`, ...) are accepted, so they can be kept.
fn refuse_unsupported(env: &Env) -> Result<(), ConfigError> {
    // (variable, upstream's default, what setting it to the other value asks for)
    const MODES: [(&str, bool, &str); 2] = [
        ("ENABLE_POD_ENI", false, "security groups for pods (trunk and branch ENIs) are not supported; unset it or set it to false"),
        ("ENABLE_MULTI_NIC", false, "pods on network cards other than the first are not supported; unset it or set it to false"),
    ];
    for (var, default, why) in MODES {
        let asked = bool_var(env, var, default)?;
        if asked != default {
            return Err(ConfigError {
                var,
                value: asked.to_string(),
                why: why.to_string(),
            });
        }
    }
    Ok(())
}

/// The address family of the node's pods: exactly one of ENABLE_IPv4 and ENABLE_IPv6, and
/// IPv6 only with prefix delegation and without custom networking, as upstream requires.
/// Returns whether pods get IPv6.
fn pod_family(env: &Env, prefix_delegation: bool, custom: bool) -> Result<bool, ConfigError> {
    let v4 = bool_var(env, "ENABLE_IPv4", true)?;
    let v6 = bool_var(env, "ENABLE_IPv6", false)?;
    let refuse = |var: &'static str, value: bool, why: &str| ConfigError {
        var,
        value: value.to_string(),
        why: why.to_string(),
    };
    match (v4, v6) {
        (true, true) => Err(refuse(
            "ENABLE_IPv6",
            true,
            "with ENABLE_IPv4=true too: pods get one family (no AWS VPC CNI offers dual-stack pods); an IPv6 cluster sets ENABLE_IPv4=false",
        )),
        (false, false) => Err(refuse(
            "ENABLE_IPv4",
            false,
            "with ENABLE_IPv6 false too: one of them must be true",
        )),
        (false, true) if !prefix_delegation => Err(refuse(
            "ENABLE_PREFIX_DELEGATION",
            false,
            "ENABLE_IPv6=true needs prefix delegation (pods get addresses from an IPv6 /80): set it to true",
        )),
        (false, true) if custom => Err(refuse(
            "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG",
            true,
            "custom networking is not supported with ENABLE_IPv6=true (upstream neither): set it to false",
        )),
        _ => Ok(v6),
    }
}

/// `NETWORK_POLICY_ENFORCING_MODE`: upstream's three values in any case, kept as given; an
/// unknown one stops the start, as upstream's does.
fn network_policy_mode(env: &Env) -> Result<String, ConfigError> {
    const VAR: &str = "NETWORK_POLICY_ENFORCING_MODE";
    let v = env
        .var(VAR)
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    match v.to_ascii_lowercase().as_str() {
        "" | "none" | "strict" | "standard" => Ok(v),
        _ => Err(ConfigError {
            var: VAR,
            value: v,
            why: "must be none, strict or standard".into(),
        }),
    }
}

/// `HTTP_TIMEOUT`: upstream takes whole seconds of 10 or more and uses 10 for anything else;
/// so do we, saying so.
fn http_timeout(env: &Env) -> Duration {
    const DEFAULT: Duration = Duration::from_secs(10);
    match env.var("HTTP_TIMEOUT").map(|v| v.trim().to_string()) {
        None => DEFAULT,
        Some(v) if v.is_empty() => DEFAULT,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n >= 10 => Duration::from_secs(n),
            _ => {
                env.fallback(
                    "HTTP_TIMEOUT",
                    &v,
                    "not whole seconds of 10 or more; using 10, as upstream",
                );
                DEFAULT
            }
        },
    }
}

fn kube_settings(env: &Env) -> Result<crate::k8s::Settings, ConfigError> {
    let key = |var: &str| {
        env.var(var)
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
        node_name: env
            .var("MY_NODE_NAME")
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty()),
        pod_name: env
            .var("MY_POD_NAME")
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty()),
        cluster_endpoint: env
            .var("CLUSTER_ENDPOINT")
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
    /// Every setting, or the first that stops the start. Bad values upstream falls back from
    /// fall back the same way and are listed in `warnings`, for ipamd to log.
    pub fn from_env(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let env = &Env::new(lookup);
        refuse_unsupported(env)?;
        let imds_only = bool_var(env, "ENABLE_IMDS_ONLY_MODE", false)?;
        let provisioning =
            !bool_var(env, "DISABLE_NETWORK_RESOURCE_PROVISIONING", false)? && !imds_only;
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
        // Upstream: not an integer, or below 1, means the instance type's limit; anything
        // above what an instance can have means no limit either.
        let max_eni = match env.var("MAX_ENI").map(|v| v.trim().to_string()) {
            Some(v) if v.parse::<i64>().is_err() && !v.is_empty() => {
                env.fallback(
                    "MAX_ENI",
                    &v,
                    "not an integer; using the instance type's limit, as upstream",
                );
                None
            }
            Some(v) => v
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 1)
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            None => None,
        };
        let veth_prefix = env
            .var("AWS_VPC_K8S_CNI_VETHPREFIX")
            .unwrap_or_else(|| "eni".into());
        // The plugin's rule, with its words: the prefix also reaches iptables rules.
        if let Err(why) = cni_common::naming::validate_veth_prefix(&veth_prefix) {
            return Err(ConfigError {
                var: "AWS_VPC_K8S_CNI_VETHPREFIX",
                value: veth_prefix,
                why: why.to_string(),
            });
        }
        let prefix_delegation = bool_var(env, "ENABLE_PREFIX_DELEGATION", false)?;
        let ipv6 = pod_family(
            env,
            prefix_delegation,
            bool_var(env, "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", false)?,
        )?;
        let warm_ip = lenient_count(env, "WARM_IP_TARGET", None).filter(|n| *n > 0);
        let minimum_ip = lenient_count(env, "MINIMUM_IP_TARGET", None).filter(|n| *n > 0);
        // Upstream's code default is 0 (its manifests set 1): prefix delegation with no
        // target set at all is refused below, as upstream's entrypoint does.
        let warm_prefix = lenient_count(env, "WARM_PREFIX_TARGET", Some(0)).unwrap_or(0);
        // IPv6 keeps no warm pool: upstream ignores the targets there.
        if prefix_delegation
            && !ipv6
            && warm_prefix == 0
            && warm_ip.is_none()
            && minimum_ip.is_none()
        {
            return Err(ConfigError {
                var: "WARM_PREFIX_TARGET",
                value: "0".into(),
                why: "with ENABLE_PREFIX_DELEGATION=true, set WARM_PREFIX_TARGET, WARM_IP_TARGET or MINIMUM_IP_TARGET above 0".into(),
            });
        }
        let targets = Targets {
            warm_eni: lenient_count(env, "WARM_ENI_TARGET", Some(1)).unwrap_or(1),
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
        let addr = |var: &'static str, default: &str| -> Result<Bind, ConfigError> {
            let v = env
                .var(var)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.into());
            bind_addr(var, &v)
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
        let ec2_rate = match env.var("IPAMD_EC2_RATE").map(|v| v.trim().to_string()) {
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
            ec2_endpoint: env.var("AWS_EC2_ENDPOINT").filter(|s| !s.trim().is_empty()),
            // Upstream: no leaked-ENI sweep when ipamd does not provision.
            disable_leaked_eni_cleanup: bool_var(env, "DISABLE_LEAKED_ENI_CLEANUP", false)?
                || !provisioning,
            additional_eni_tags: eni_tags(env)?,
            timing,
            socket: env
                .var("IPAMD_SOCKET_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(cni_proto::DEFAULT_SOCKET)),
            // Empty is the default, as upstream's.
            backing_store: env
                .var("AWS_VPC_K8S_CNI_BACKING_STORE")
                .filter(|v| !v.trim().is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/run/aws-node/ipam.json")),
            cooldown: Duration::from_secs(cooldown),
            veth_prefix,
            external_snat,
            max_eni,
            prefix_delegation,
            ipv6,
            v6_egress: bool_var(env, "ENABLE_V6_EGRESS", false)?,
            v4_egress: bool_var(env, "ENABLE_V4_EGRESS", true)?,
            node_file: env
                .var("IPAMD_NODE_FILE")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            log_file: env
                .var("AWS_VPC_K8S_CNI_LOG_FILE")
                .unwrap_or_else(|| "/host/var/log/aws-routed-eni/ipamd.log".into()),
            // Upstream's default (and its manifests' value) is DEBUG.
            log_level: env
                .var("AWS_VPC_K8S_CNI_LOGLEVEL")
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(|| "DEBUG".into()),
            cni_state_dir: env
                .var(cni_common::state::STATE_DIR_ENV)
                .filter(|v| !v.trim().is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(cni_common::state::DEFAULT_STATE_DIR)),
            cluster_name: env.var("CLUSTER_NAME").unwrap_or_default(),
            kube: kube_settings(env)?,
            network_policy_mode: network_policy_mode(env)?,
            provisioning,
            imds_only,
            manage_untagged_enis: bool_var(env, "MANAGE_UNTAGGED_ENI", true)?,
            manage_enis_non_schedulable: bool_var(env, "AWS_MANAGE_ENIS_NON_SCHEDULABLE", false)?,
            http_timeout: http_timeout(env),
            vpc_cni_version: env
                .var("VPC_CNI_VERSION")
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty()),
            // Last: every reader above may have added one.
            warnings: env.warnings(),
        })
    }
}

impl Config {
    /// Upstream's `/v1/ipamd-env-settings`: its five keys, typed, defaults applied.
    pub fn ipamd_debug_json(&self) -> serde_json::Value {
        serde_json::json!({
            "AWS_MANAGE_ENIS_NON_SCHEDULABLE": self.manage_enis_non_schedulable,
            "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": self.kube.custom_networking,
            "ENABLE_SUBNET_DISCOVERY": self.kube.subnet_discovery,
            "WARM_ENI_TARGET": self.targets.warm_eni,
            "WARM_IP_TARGET": self.targets.warm_ip.unwrap_or(0),
        })
    }

    /// Upstream's `/v1/networkutils-env-settings`: typed as its Go struct marshals (CIDR lists
    /// of IPv4 entries or null, the connmark as a number, the SNAT mode as its enum number).
    pub fn network_debug_json(&self) -> serde_json::Value {
        let v4 = |l: &[String]| {
            let v: Vec<&String> = l.iter().filter(|c| !c.contains(':')).collect();
            if v.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::json!(v)
            }
        };
        let n = &self.net;
        serde_json::json!({
            "AWS_EXTERNAL_SERVICE_CIDRS": v4(&n.external_service_cidrs),
            "AWS_VPC_CNI_NODE_PORT_SUPPORT": n.node_port_support,
            "AWS_VPC_ENI_MTU": n.mtu,
            "AWS_VPC_K8S_CNI_CONNMARK": n.mark,
            "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS": v4(&n.exclude_snat_cidrs),
            "AWS_VPC_K8S_CNI_EXTERNALSNAT": n.external_snat,
            "AWS_VPC_K8S_CNI_RANDOMIZESNAT": match n.randomize {
                Randomize::None => 0,
                Randomize::Hash => 1,
                Randomize::Fully => 2,
            },
            "AWS_VPC_K8S_CNI_VETHPREFIX": n.veth_prefix,
        })
    }

    /// Ours, `/v1/settings`: every variable ipamd reads, under its name, as ipamd took it
    /// (defaults applied, fallbacks made), and the fallbacks it said.
    pub fn settings_json(&self) -> serde_json::Value {
        let t = &self.targets;
        let secs = |d: Duration| d.as_secs_f64();
        let mut v = self.network_debug_json();
        let more = serde_json::json!({
            "ADDITIONAL_ENI_TAGS": self.additional_eni_tags,
            "ANNOTATE_POD_IP": self.kube.annotate_pod_ip,
            "AWS_EC2_ENDPOINT": self.ec2_endpoint,
            "AWS_MANAGE_ENIS_NON_SCHEDULABLE": self.manage_enis_non_schedulable,
            "AWS_VPC_K8S_CNI_BACKING_STORE": self.backing_store,
            "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": self.kube.custom_networking,
            "AWS_VPC_K8S_CNI_LOGLEVEL": self.log_level,
            "AWS_VPC_K8S_CNI_LOG_FILE": self.log_file,
            "CLUSTER_ENDPOINT": self.kube.cluster_endpoint,
            "CLUSTER_NAME": self.cluster_name,
            "DISABLE_INTROSPECTION": self.introspection.is_none(),
            "DISABLE_LEAKED_ENI_CLEANUP": self.disable_leaked_eni_cleanup,
            "DISABLE_METRICS": self.metrics.is_none(),
            "DISABLE_NETWORK_RESOURCE_PROVISIONING": !self.provisioning && !self.imds_only,
            "ENABLE_IMDS_ONLY_MODE": self.imds_only,
            "ENABLE_IPv4": !self.ipv6,
            "ENABLE_IPv6": self.ipv6,
            "ENABLE_PREFIX_DELEGATION": t.prefix_delegation,
            "ENABLE_SUBNET_DISCOVERY": self.kube.subnet_discovery,
            "ENABLE_V4_EGRESS": self.v4_egress,
            "ENABLE_V6_EGRESS": self.v6_egress,
            "ENI_CONFIG_ANNOTATION_DEF": self.kube.keys.annotation,
            "ENI_CONFIG_LABEL_DEF": self.kube.keys.label,
            "HTTP_TIMEOUT": self.http_timeout.as_secs(),
            "INTROSPECTION_BIND_ADDRESS": self.introspection.as_ref().map(|b| b.to_string()),
            "IP_COOLDOWN_PERIOD": self.cooldown.as_secs(),
            "MANAGE_UNTAGGED_ENI": self.manage_untagged_enis,
            "MAX_ENI": self.max_eni.map_or(-1, i64::from),
            "MINIMUM_IP_TARGET": t.minimum_ip.unwrap_or(0),
            "MY_NODE_NAME": self.kube.node_name,
            "MY_POD_NAME": self.kube.pod_name,
            "NETWORK_POLICY_ENFORCING_MODE": self.network_policy_mode,
            "WARM_ENI_TARGET": t.warm_eni,
            "WARM_IP_TARGET": t.warm_ip.unwrap_or(0),
            "WARM_PREFIX_TARGET": t.warm_prefix,
            "VPC_CNI_VERSION": self.vpc_cni_version,
        });
        let ours = serde_json::json!({
            "AWS_CNI_STATE_DIR": self.cni_state_dir,
            "IPAMD_ALLOCATION_GRACE": secs(self.timing.allocation_grace),
            "IPAMD_DECREASE_INTERVAL": secs(self.timing.decrease),
            "IPAMD_EC2_BURST": self.ec2_burst,
            "IPAMD_EC2_RATE": self.ec2_rate,
            "IPAMD_GROWTH_BACKOFF_MAX": secs(self.timing.growth_backoff_max),
            "IPAMD_LEAKED_ENI_CLEANUP_INTERVAL": secs(self.timing.leak_cleanup),
            "IPAMD_METRICS_BIND_ADDRESS": self.metrics.as_ref().map(|b| b.to_string()),
            "IPAMD_MIN_ENI_AGE": secs(self.timing.min_eni_age),
            "IPAMD_NODE_FILE": self.node_file,
            "IPAMD_POOL_CHECK_INTERVAL": secs(self.timing.pool_check),
            "IPAMD_RECONCILE_INTERVAL": secs(self.timing.reconcile),
            "IPAMD_SOCKET_PATH": self.socket,
            "IPAMD_SUBNET_FULL_BACKOFF": secs(self.timing.subnet_full_backoff),
            "warnings": self.warnings.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
        });
        if let Some(o) = v.as_object_mut() {
            for part in [more, ours] {
                if let serde_json::Value::Object(m) = part {
                    o.extend(m);
                }
            }
        }
        v
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

    /// The variable `var` set to `val` starts, with upstream's fallback said once.
    fn falls_back(var: &str, val: &str) -> Config {
        let pairs = [(var, val)];
        let c = Config::from_env(&with(&pairs)).unwrap_or_else(|e| panic!("{var}={val}: {e}"));
        assert_eq!(
            c.warnings.iter().map(|w| w.var).collect::<Vec<_>>(),
            [var],
            "{val}"
        );
        c
    }

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
        assert_eq!(
            c.targets,
            Targets {
                warm_prefix: 0,
                ..Targets::default()
            },
            "upstream's code defaults"
        );
        assert_eq!(c.targets.warm_eni, 1);
        assert!(c.warnings.is_empty());
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
        let e = Config::from_env(&with(&[("AWS_VPC_ENI_MTU", "65000")])).unwrap_err();
        assert_eq!(
            e.var, "AWS_VPC_ENI_MTU",
            "upstream's entrypoint refuses it too"
        );
        // Upstream falls back from these; so do we, saying so.
        assert_eq!(
            falls_back("AWS_VPC_K8S_CNI_CONNMARK", "mark").net.mark,
            0x80
        );
        assert_eq!(
            falls_back("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "NONE")
                .net
                .randomize,
            Randomize::Fully
        );
        let c = falls_back("AWS_EXTERNAL_SERVICE_CIDRS", "10.0.0.0, 10.1.0.0/16");
        assert_eq!(c.net.external_service_cidrs, ["10.1.0.0/16"]);
        // Go's base-0 integers: a leading 0 is octal.
        let c = Config::from_env(&with(&[("AWS_VPC_K8S_CNI_CONNMARK", "0100")])).unwrap();
        assert_eq!(c.net.mark, 64);
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
        assert!(falls_back("ADDITIONAL_ENI_TAGS", "team=net")
            .additional_eni_tags
            .is_empty());
        let c = falls_back(
            "ADDITIONAL_ENI_TAGS",
            r#"{"node.k8s.amazonaws.com/no_manage":"true","team":"net"}"#,
        );
        assert!(c.warnings[0].why.contains("reserved"));
        assert_eq!(c.additional_eni_tags.len(), 1, "the reserved key dropped");
        let e = Config::from_env(&with(&[
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("WARM_PREFIX_TARGET", "0"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "WARM_PREFIX_TARGET");
        assert_eq!(falls_back("WARM_ENI_TARGET", "-1").targets.warm_eni, 1);
        assert_eq!(falls_back("WARM_IP_TARGET", "many").targets.warm_ip, None);
        let e = Config::from_env(&with(&[("ENABLE_PREFIX_DELEGATION", "true")])).unwrap_err();
        assert_eq!(e.var, "WARM_PREFIX_TARGET", "as upstream's entrypoint");
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
        // Go cannot parse these: upstream uses the default and logs; so do we.
        for v in ["yes", "tRUE", "on"] {
            assert!(!falls_back("AWS_VPC_K8S_CNI_EXTERNALSNAT", v).external_snat);
        }
        assert_eq!(falls_back("MAX_ENI", "two").max_eni, None);
        assert_eq!(
            Config::from_env(&with(&[("MAX_ENI", "0")]))
                .unwrap()
                .max_eni,
            None
        );
    }

    #[test]
    fn upstream_modes_refused_or_honoured() {
        // What this ipamd does not do stops the start, naming the variable...
        for (var, val) in [
            ("ENABLE_IPv6", "true"),
            ("ENABLE_IPv4", "false"),
            ("ENABLE_POD_ENI", "true"),
            ("ENABLE_MULTI_NIC", "true"),
            ("NETWORK_POLICY_ENFORCING_MODE", "audit"),
        ] {
            let pairs = [(var, val)];
            assert_eq!(
                Config::from_env(&with(&pairs)).unwrap_err().var,
                var,
                "{val}"
            );
        }
        // The family: one of the two, IPv6 only with prefix delegation, as upstream.
        let v6 = [("ENABLE_IPv4", "false"), ("ENABLE_IPv6", "true")];
        assert_eq!(
            Config::from_env(&with(&v6)).unwrap_err().var,
            "ENABLE_PREFIX_DELEGATION"
        );
        let pd = [v6[0], v6[1], ("ENABLE_PREFIX_DELEGATION", "true")];
        let c = Config::from_env(&with(&pd)).unwrap();
        assert!(c.ipv6 && c.v4_egress && !c.v6_egress);
        let custom = [
            pd[0],
            pd[1],
            pd[2],
            ("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true"),
            ("MY_NODE_NAME", "n"),
        ];
        assert_eq!(
            Config::from_env(&with(&custom)).unwrap_err().var,
            "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG"
        );
        let c = Config::from_env(&with(&[("ENABLE_V6_EGRESS", "true")])).unwrap();
        assert!(!c.ipv6 && c.v6_egress);
        // ... while upstream's manifest values are accepted as they are.
        let c = Config::from_env(&with(&[
            ("ENABLE_IPv4", "true"),
            ("ENABLE_IPv6", "false"),
            ("ENABLE_POD_ENI", "false"),
            ("ENABLE_MULTI_NIC", "false"),
            ("ENABLE_V6_EGRESS", "false"),
            ("ENABLE_V4_EGRESS", "true"),
            ("NETWORK_POLICY_ENFORCING_MODE", "Standard"),
            ("DISABLE_NETWORK_RESOURCE_PROVISIONING", "false"),
            ("ENABLE_IMDS_ONLY_MODE", "false"),
        ]))
        .unwrap();
        assert_eq!(c.network_policy_mode, "Standard");
        assert!(c.provisioning && !c.imds_only && c.manage_untagged_enis);
        assert!(!c.manage_enis_non_schedulable);
        assert_eq!(c.http_timeout, Duration::from_secs(10));
        let c = Config::from_env(&with(&[("ENABLE_IMDS_ONLY_MODE", "true")])).unwrap();
        assert!(!c.provisioning && c.imds_only && c.disable_leaked_eni_cleanup);
        let c = Config::from_env(&with(&[
            ("DISABLE_NETWORK_RESOURCE_PROVISIONING", "true"),
            ("MANAGE_UNTAGGED_ENI", "false"),
            ("AWS_MANAGE_ENIS_NON_SCHEDULABLE", "true"),
            ("HTTP_TIMEOUT", "30"),
        ]))
        .unwrap();
        assert!(!c.provisioning && !c.imds_only && c.disable_leaked_eni_cleanup);
        assert!(!c.manage_untagged_enis && c.manage_enis_non_schedulable);
        assert_eq!(c.http_timeout, Duration::from_secs(30));
        // Upstream: below 10 or not a number means 10.
        for v in ["5", "soon"] {
            let pairs = [("HTTP_TIMEOUT", v)];
            assert_eq!(
                Config::from_env(&with(&pairs)).unwrap().http_timeout,
                Duration::from_secs(10)
            );
        }
    }

    #[test]
    fn errors_name_the_variable() {
        let e = Config::from_env(&with(&[("IP_COOLDOWN_PERIOD", "soon")])).unwrap_err();
        assert_eq!(e.var, "IP_COOLDOWN_PERIOD");
        let e = Config::from_env(&with(&[("AWS_VPC_K8S_CNI_VETHPREFIX", "vlan")])).unwrap_err();
        assert_eq!(e.var, "AWS_VPC_K8S_CNI_VETHPREFIX");
        let c = falls_back("ENABLE_PREFIX_DELEGATION", "yes");
        assert!(c.warnings[0]
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
        assert_eq!(Config::from_env(&with(&[])).unwrap().log_level, "DEBUG");
    }
}
