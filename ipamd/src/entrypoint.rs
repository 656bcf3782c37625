//! What upstream's `aws-vpc-cni` (the aws-node container's entrypoint) and `aws-vpc-cni-init`
//! (its init container) do: validate the environment, install the plugins on the host, start
//! ipamd, and only once ipamd can hand out an address, write `10-aws.conflist` - the moment the
//! kubelet considers the node's network ready. Upstream writes it as soon as gRPC answers, so
//! pods are scheduled onto a node that cannot give them an address yet (issues #330, #1724).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::config::{Config, ConfigError};

/// The conflist template shipped in the image (`config/10-aws.conflist`).
pub const CONFLIST_TEMPLATE: &str = include_str!("../../config/10-aws.conflist");
pub const CONFLIST_NAME: &str = "10-aws.conflist";

/// The entrypoint's own settings (ipamd's are validated by `Config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryConfig {
    pub host_cni_bin: PathBuf,
    pub host_cni_conf: PathBuf,
    pub veth_prefix: String,
    pub pod_mtu: u32,
    pub sg_mode: String,
    pub plugin_log_file: String,
    pub plugin_log_level: String,
    pub randomize_snat: String,
    /// ENABLE_BANDWIDTH_PLUGIN: `bandwidth` chained last (pods' bandwidth annotations).
    pub bandwidth: bool,
    /// DISABLE_POD_V6: `tuning` chained last, turning IPv6 off in the pod's namespace.
    pub disable_pod_v6: bool,
    pub egress: Egress,
}

/// egress-cni's entry, as upstream's entrypoint fills it: an IPv6 node gives its pods IPv4
/// egress (ENABLE_V4_EGRESS, on by default), an IPv4 node IPv6 egress (ENABLE_V6_EGRESS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    pub enabled: bool,
    /// The egress addresses are IPv6 (an IPv4 node's pods reaching IPv6).
    pub v6: bool,
    /// The node's primary address of the egress family (from IMDS), the SNAT source.
    pub node_ip: String,
    pub log_file: String,
}

impl Egress {
    /// (range, route destination, host-local data dir): upstream's values.
    pub fn ipam(&self) -> (&'static str, &'static str, &'static str) {
        if self.v6 {
            ("fd00::ac:00/118", "::/0", "/run/cni/v4pd/egress-v6-ipam")
        } else {
            (
                "169.254.172.0/22",
                "0.0.0.0/0",
                "/run/cni/v6pd/egress-v4-ipam",
            )
        }
    }
}

fn err(var: &'static str, value: &str, why: &str) -> ConfigError {
    ConfigError {
        var,
        value: value.to_string(),
        why: why.to_string(),
    }
}

impl EntryConfig {
    /// Validate everything the entrypoint and ipamd read, naming the first bad variable.
    pub fn from_env(
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(EntryConfig, Config), ConfigError> {
        let mut cfg = Config::from_env(env)?;
        let lenient = crate::config::Env::new(env);
        let get = |k: &str, d: &str| {
            env(k)
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(|| d.to_string())
        };
        let pod_mtu = match env("POD_MTU").filter(|v| !v.trim().is_empty()) {
            None => cfg.net.mtu,
            Some(v) => match v.trim().parse::<u32>() {
                Ok(m) if (576..=9001).contains(&m) => m,
                _ => return Err(err("POD_MTU", &v, "must be between 576 and 9001")),
            },
        };
        // Upstream checks it only with ENABLE_POD_ENI=true (refused here) and otherwise writes
        // it to the conflist as given; so does this.
        let sg_mode = get("POD_SECURITY_GROUP_ENFORCING_MODE", "strict");
        // Upstream takes any text here and its plugin logs at Debug for a name it does not
        // know; so does ours, and this says so at start.
        let plugin_log_level = get("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "Debug");
        let known = ["fatal", "panic", "dpanic"]
            .contains(&plugin_log_level.to_ascii_lowercase().as_str())
            || plugin_log_level
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_ok();
        if !known {
            eprintln!(
                "aws-vpc-cni: AWS_VPC_K8S_PLUGIN_LOG_LEVEL={plugin_log_level:?} is not a log level; the plugin logs at Debug, as upstream's"
            );
        }
        let randomize_snat = get("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "prng");
        let bandwidth = crate::config::bool_var(&lenient, "ENABLE_BANDWIDTH_PLUGIN", false)?;
        let disable_pod_v6 = crate::config::bool_var(&lenient, "DISABLE_POD_V6", false)?;
        let egress = if cfg.ipv6 {
            Egress {
                enabled: cfg.v4_egress,
                v6: false,
                node_ip: String::new(),
                log_file: get(
                    "AWS_VPC_K8S_EGRESS_V4_PLUGIN_LOG_FILE",
                    "/var/log/aws-routed-eni/egress-v4-plugin.log",
                ),
            }
        } else {
            Egress {
                enabled: cfg.v6_egress,
                v6: true,
                node_ip: String::new(),
                log_file: get(
                    "AWS_VPC_K8S_EGRESS_V6_PLUGIN_LOG_FILE",
                    "/var/log/aws-routed-eni/egress-v6-plugin.log",
                ),
            }
        };
        cfg.warnings.extend(lenient.warnings());
        Ok((
            EntryConfig {
                host_cni_bin: PathBuf::from(get("HOST_CNI_BIN_PATH", "/host/opt/cni/bin")),
                host_cni_conf: PathBuf::from(get("HOST_CNI_CONFDIR_PATH", "/host/etc/cni/net.d")),
                veth_prefix: cfg.veth_prefix.clone(),
                pod_mtu,
                sg_mode,
                plugin_log_file: get(
                    "AWS_VPC_K8S_PLUGIN_LOG_FILE",
                    "/var/log/aws-routed-eni/plugin.log",
                ),
                plugin_log_level,
                randomize_snat,
                bandwidth,
                disable_pod_v6,
                egress,
            },
            cfg,
        ))
    }

    /// The conflist with upstream's substitutions, checked to be JSON, from the built-in
    /// template.
    pub fn render_conflist(&self) -> anyhow::Result<String> {
        self.render_conflist_from(CONFLIST_TEMPLATE)
    }

    /// The conflist from the template beside this executable (see `conflist_template`).
    pub fn render_installed_conflist(&self) -> anyhow::Result<String> {
        let template = conflist_template(&exe_dir()?)?;
        self.render_conflist_from(&template)
    }

    /// The same from `template` (upstream's chart can mount its own at /app/10-aws.conflist).
    pub fn render_conflist_from(&self, template: &str) -> anyhow::Result<String> {
        let (subnet, dst, data_dir) = self.egress.ipam();
        let out = template
            .replace("__VETHPREFIX__", &self.veth_prefix)
            .replace("__MTU__", &self.pod_mtu.to_string())
            .replace("__PODSGENFORCINGMODE__", &self.sg_mode)
            .replace("__PLUGINLOGFILE__", &self.plugin_log_file)
            .replace("__PLUGINLOGLEVEL__", &self.plugin_log_level)
            .replace("__RANDOMIZESNAT__", &self.randomize_snat)
            .replace("__EGRESSPLUGINENABLED__", &self.egress.enabled.to_string())
            .replace("__EGRESSPLUGINIPAMSUBNET__", subnet)
            .replace("__EGRESSPLUGINIPAMDST__", dst)
            .replace("__EGRESSPLUGINIPAMDATADIR__", data_dir)
            .replace("__EGRESSPLUGINLOGFILE__", &self.egress.log_file)
            .replace("__NODEIP__", &self.egress.node_ip);
        let mut v: serde_json::Value =
            serde_json::from_str(&out).context("rendered conflist is not JSON")?;
        let has_egress = out.contains("\"egress-cni\"");
        if !self.bandwidth && !self.disable_pod_v6 && (self.egress.enabled || !has_egress) {
            return Ok(out);
        }
        let plugins = v
            .get_mut("plugins")
            .and_then(|p| p.as_array_mut())
            .context("conflist template has no plugins list")?;
        // Upstream chains egress-cni switched off ("enabled": "false"); left out instead, it
        // costs no exec at every ADD and DEL and does the same (nothing).
        if !self.egress.enabled {
            plugins.retain(|p| p.get("type").and_then(|t| t.as_str()) != Some("egress-cni"));
        }
        // Upstream's chaining: appended after portmap, bandwidth first.
        if self.bandwidth {
            plugins.push(
                serde_json::json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}),
            );
        }
        if self.disable_pod_v6 {
            plugins.push(serde_json::json!({"type": "tuning", "sysctl": {
                "net.ipv6.conf.all.disable_ipv6": "1",
                "net.ipv6.conf.default.disable_ipv6": "1",
                "net.ipv6.conf.lo.disable_ipv6": "1",
            }}));
        }
        serde_json::to_string_pretty(&v).context("serialise the conflist")
    }
}

/// The conflist template: `10-aws.conflist` beside the executable when there is one (the
/// image ships it; upstream's chart mounts its `cniConfig` there), else the built-in copy.
pub fn conflist_template(dir: &Path) -> anyhow::Result<String> {
    let p = dir.join(CONFLIST_NAME);
    match std::fs::read_to_string(&p) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CONFLIST_TEMPLATE.to_string()),
        Err(e) => Err(e).with_context(|| format!("read {}", p.display())),
    }
}

/// Write `data` to `dir/name` so readers see the old file or the whole new one.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let path = dir.join(name);
    cni_common::fsio::write_atomic(
        &path,
        data,
        cni_common::fsio::WriteOptions { mode, sync: true },
    )
    .with_context(|| format!("write {}", path.display()))
}

/// Copy the plugin binaries found next to this executable into the host's CNI bin directory.
pub fn install_plugins(
    from: &Path,
    to: &Path,
    names: &[&str],
    required: &[&str],
) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    for name in names {
        let src = from.join(name);
        if !src.exists() {
            if required.contains(name) {
                bail!("{} is missing from the image", src.display());
            }
            continue;
        }
        let data = std::fs::read(&src).with_context(|| format!("read {}", src.display()))?;
        write_atomic(to, name, &data, 0o755)?;
        done.push(name.to_string());
    }
    Ok(done)
}

/// The directory holding this executable (the image's binaries live together).
pub fn exe_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("find own executable")?;
    Ok(exe
        .parent()
        .context("executable has no directory")?
        .to_path_buf())
}

/// gRPC health of `service` on ipamd's socket: Some(true) SERVING, Some(false) answering but
/// not serving, None when it does not answer.
pub async fn health(socket: &Path, service: &str) -> Option<bool> {
    let o = crate::probe::Options {
        target: crate::probe::Target::Unix(socket.to_path_buf()),
        service: service.to_string(),
        user_agent: "aws-vpc-cni".into(),
        connect_timeout: Duration::from_secs(2),
        rpc_timeout: Duration::from_secs(2),
        verbose: false,
    };
    match crate::probe::check(&o).await.0 {
        0 => Some(true),
        crate::probe::EXIT_UNHEALTHY => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::with;

    #[test]
    fn renders_upstream_substitutions() {
        let (e, _) = EntryConfig::from_env(&with(&[
            ("POD_MTU", "1500"),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "abc"),
        ]))
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&e.render_conflist().unwrap()).unwrap();
        let p = &v["plugins"][0];
        assert_eq!(p["type"], "aws-cni");
        assert_eq!(p["vethPrefix"], "abc");
        assert_eq!(p["mtu"], "1500");
        assert_eq!(p["podSGEnforcingMode"], "strict");
        assert_eq!(p["pluginLogLevel"], "Debug");
        assert_eq!(v["plugins"][1]["type"], "portmap");
        assert!(!e.render_conflist().unwrap().contains("__"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, val) in [
            ("POD_MTU", "100"),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "eth"),
            ("AWS_VPC_ENI_MTU", "20000"),
        ] {
            let pairs = [(var, val)];
            assert_eq!(EntryConfig::from_env(&with(&pairs)).unwrap_err().var, var);
        }
        // Upstream takes any plugin log level (its plugin logs at Debug for unknown ones).
        for v in ["chatty", "Fatal"] {
            let pairs = [("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", v)];
            assert_eq!(
                EntryConfig::from_env(&with(&pairs))
                    .unwrap()
                    .0
                    .plugin_log_level,
                v
            );
        }
    }

    #[test]
    fn chained_plugins_as_upstream() {
        let (e, _) = EntryConfig::from_env(&with(&[
            ("ENABLE_BANDWIDTH_PLUGIN", "true"),
            ("DISABLE_POD_V6", "true"),
        ]))
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&e.render_conflist().unwrap()).unwrap();
        let types: Vec<&str> = v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["aws-cni", "portmap", "bandwidth", "tuning"]);
        assert_eq!(v["plugins"][2]["capabilities"]["bandwidth"], true);
        assert_eq!(
            v["plugins"][3]["sysctl"]["net.ipv6.conf.all.disable_ipv6"],
            "1"
        );
    }

    #[test]
    fn egress_entry_as_upstream_fills_it() {
        // IPv6 node: IPv4 egress on by default, upstream's range and data dir, SNAT to the
        // node's IPv4.
        let (mut e, _) = EntryConfig::from_env(&with(&[
            ("ENABLE_IPv4", "false"),
            ("ENABLE_IPv6", "true"),
            ("ENABLE_PREFIX_DELEGATION", "true"),
        ]))
        .unwrap();
        assert!(e.egress.enabled && !e.egress.v6);
        e.egress.node_ip = "10.0.1.4".into();
        let v: serde_json::Value = serde_json::from_str(&e.render_conflist().unwrap()).unwrap();
        let p = &v["plugins"][1];
        assert_eq!(p["type"], "egress-cni");
        assert_eq!(p["enabled"], "true");
        assert_eq!(p["nodeIP"], "10.0.1.4");
        assert_eq!(p["ipam"]["ranges"][0][0]["subnet"], "169.254.172.0/22");
        assert_eq!(p["ipam"]["dataDir"], "/run/cni/v6pd/egress-v4-ipam");
        assert_eq!(
            p["pluginLogFile"],
            "/var/log/aws-routed-eni/egress-v4-plugin.log"
        );
        // IPv4 node with ENABLE_V6_EGRESS: the IPv6 range.
        let (e, _) = EntryConfig::from_env(&with(&[("ENABLE_V6_EGRESS", "true")])).unwrap();
        assert!(e.egress.enabled && e.egress.v6);
        let v: serde_json::Value = serde_json::from_str(&e.render_conflist().unwrap()).unwrap();
        assert_eq!(
            v["plugins"][1]["ipam"]["ranges"][0][0]["subnet"],
            "fd00::ac:00/118"
        );
        assert_eq!(v["plugins"][1]["ipam"]["routes"][0]["dst"], "::/0");
        // Off (an IPv4 node's default): left out of the chain.
        let (plain, _) = EntryConfig::from_env(&with(&[])).unwrap();
        let v: serde_json::Value = serde_json::from_str(&plain.render_conflist().unwrap()).unwrap();
        assert_eq!(v["plugins"].as_array().unwrap().len(), 2);
    }
}
