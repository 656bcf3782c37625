//! ipamd's settings from the environment, with upstream's variable names and defaults.
//! Pure: takes a lookup function, so every rule is unit-tested.

use std::path::PathBuf;
use std::time::Duration;

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
    match env(var).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if v.is_empty() => Ok(default),
        Some(v) if v == "true" || v == "1" => Ok(true),
        Some(v) if v == "false" || v == "0" => Ok(false),
        Some(v) => Err(ConfigError {
            var,
            value: v,
            why: "must be true or false".into(),
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
        let max_eni = match int_var(env, "MAX_ENI")? {
            None => None,
            Some(n) if n < 0 => None,
            Some(0) => {
                return Err(ConfigError {
                    var: "MAX_ENI",
                    value: "0".into(),
                    why: "must be at least 1 (or -1 for the instance type's limit)".into(),
                })
            }
            Some(n) => Some(n as u32),
        };
        let veth_prefix = env("AWS_VPC_K8S_CNI_VETHPREFIX").unwrap_or_else(|| "eni".into());
        if veth_prefix.is_empty()
            || veth_prefix.len() > 4
            || matches!(veth_prefix.as_str(), "eth" | "lo" | "vlan")
        {
            return Err(ConfigError {
                var: "AWS_VPC_K8S_CNI_VETHPREFIX",
                value: veth_prefix,
                why: "must be 1 to 4 characters and not eth, lo or vlan".into(),
            });
        }
        Ok(Config {
            socket: env("IPAMD_SOCKET_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(cni_proto::DEFAULT_SOCKET)),
            backing_store: env("AWS_VPC_K8S_CNI_BACKING_STORE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/run/aws-node/ipam.json")),
            cooldown: Duration::from_secs(cooldown),
            veth_prefix,
            external_snat: bool_var(env, "AWS_VPC_K8S_CNI_EXTERNALSNAT", false)?,
            max_eni,
            prefix_delegation: bool_var(env, "ENABLE_PREFIX_DELEGATION", false)?,
            node_file: env("IPAMD_NODE_FILE")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            log_file: env("AWS_VPC_K8S_CNI_LOG_FILE")
                .unwrap_or_else(|| "/host/var/log/aws-routed-eni/ipamd.log".into()),
            log_level: env("AWS_VPC_K8S_CNI_LOGLEVEL").unwrap_or_else(|| "DEBUG".into()),
            cluster_name: env("CLUSTER_NAME").unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
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
}
