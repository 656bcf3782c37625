//! Parsing what the runtime hands us: the network config on stdin, the `CNI_*` environment
//! and the `K8S_*` pod identity in `CNI_ARGS`. Pure: no I/O here, so it is unit-tested.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{CniError, Code, Result};
use crate::version::{self, Version};

pub const DEFAULT_VETH_PREFIX: &str = "eni";
pub const DEFAULT_MTU: u32 = 9001;
pub const MIN_MTU: u32 = 576;
pub const MAX_MTU: u32 = 9001;
pub use cni_common::state::DEFAULT_STATE_DIR;

/// The plugin's entry of the conflist, as the runtime passes it on stdin.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub version: Version,
    pub name: String,
    pub veth_prefix: String,
    pub mtu: u32,
    pub pod_sg_enforcing_mode: String,
    pub plugin_log_file: String,
    pub plugin_log_level: String,
    /// Where ipamd listens; upstream hard-codes it, tests point it elsewhere.
    pub ipamd_socket: PathBuf,
    /// Where per-sandbox state for DEL is kept.
    pub state_dir: PathBuf,
    /// The network policy agent's socket (ours: `networkPolicyAgentSocket`; upstream
    /// hard-codes the default).
    pub np_agent_socket: PathBuf,
    pub prev_result: Option<serde_json::Value>,
    /// CNI 1.1 GC: attachments the runtime still knows.
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(rename = "ifname")]
    pub ifname: String,
}

#[derive(Deserialize)]
struct RawConf {
    #[serde(rename = "cniVersion", default)]
    cni_version: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(rename = "vethPrefix", default)]
    veth_prefix: Option<String>,
    #[serde(default)]
    mtu: Option<serde_json::Value>,
    #[serde(rename = "podSGEnforcingMode", default)]
    pod_sg_enforcing_mode: Option<String>,
    #[serde(rename = "pluginLogFile", default)]
    plugin_log_file: Option<String>,
    #[serde(rename = "pluginLogLevel", default)]
    plugin_log_level: Option<String>,
    #[serde(rename = "ipamdSocket", default)]
    ipamd_socket: Option<String>,
    #[serde(rename = "stateDir", default)]
    state_dir: Option<String>,
    #[serde(rename = "networkPolicyAgentSocket", default)]
    np_agent_socket: Option<String>,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    valid_attachments: Option<Vec<Attachment>>,
}

/// GC's list of attachments to keep, as a set. GC exists from CNI 1.1.0, and its whole meaning
/// is that list: a config without it (an older runtime, a hand-written call) must not read as
/// "keep none". Shared by both plugins.
pub fn gc_keep(
    version: Version,
    cni_version: &str,
    valid: &Option<Vec<Attachment>>,
) -> Result<std::collections::HashSet<Attachment>> {
    if version < Version(1, 1, 0) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!("GC needs cniVersion 1.1.0 or later, config has {cni_version}"),
        ));
    }
    let Some(valid) = valid else {
        return Err(CniError::new(
            Code::InvalidConfig,
            "GC needs cni.dev/valid-attachments (the attachments to keep); refusing to collect everything",
        ));
    };
    Ok(valid.iter().cloned().collect())
}

/// Only the version, for VERSION where the rest of the config may be absent.
pub fn requested_version(stdin: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct V {
        #[serde(rename = "cniVersion")]
        cni_version: Option<String>,
    }
    serde_json::from_slice::<V>(stdin).ok()?.cni_version
}

impl NetConf {
    /// `env` supplies overrides a test harness may set (`AWS_CNI_IPAMD_SOCKET`, `AWS_CNI_STATE_DIR`).
    pub fn parse(stdin: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<NetConf> {
        let raw: RawConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                Code::Decode,
                format!("cannot decode network config from stdin: {e}"),
            )
        })?;
        let cni_version = raw.cni_version.ok_or_else(|| {
            CniError::new(Code::InvalidConfig, "network config has no cniVersion")
        })?;
        let version = version::check(&cni_version)?;
        let name = raw
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| CniError::new(Code::InvalidConfig, "network config has no name"))?;
        cni_common::validate::network_name(&name)
            .map_err(|why| CniError::new(Code::InvalidConfig, why.to_string()))?;

        let veth_prefix = raw
            .veth_prefix
            .unwrap_or_else(|| DEFAULT_VETH_PREFIX.to_string());
        validate_veth_prefix(&veth_prefix)?;
        let mtu = parse_mtu(raw.mtu.as_ref())?;

        let ipamd_socket = raw
            .ipamd_socket
            .or_else(|| env("AWS_CNI_IPAMD_SOCKET"))
            .unwrap_or_else(|| cni_proto::DEFAULT_SOCKET.to_string());
        let state_dir = raw
            .state_dir
            .or_else(|| env(cni_common::state::STATE_DIR_ENV))
            .unwrap_or_else(|| DEFAULT_STATE_DIR.to_string());

        Ok(NetConf {
            cni_version,
            version,
            name,
            veth_prefix,
            mtu,
            pod_sg_enforcing_mode: raw.pod_sg_enforcing_mode.unwrap_or_default(),
            plugin_log_file: raw.plugin_log_file.unwrap_or_default(),
            plugin_log_level: raw.plugin_log_level.unwrap_or_else(|| "INFO".into()),
            ipamd_socket: PathBuf::from(ipamd_socket),
            state_dir: PathBuf::from(state_dir),
            np_agent_socket: PathBuf::from(
                raw.np_agent_socket
                    .unwrap_or_else(|| cni_proto::DEFAULT_NP_AGENT_SOCKET.to_string()),
            ),
            prev_result: raw.prev_result,
            valid_attachments: raw.valid_attachments,
        })
    }
}

pub fn validate_veth_prefix(p: &str) -> Result<()> {
    cni_common::naming::validate_veth_prefix(p)
        .map_err(|why| CniError::new(Code::InvalidConfig, format!("vethPrefix: {why}")))
}

/// `mtu` comes as a string in upstream's conflist template and as a number elsewhere.
pub fn parse_mtu(v: Option<&serde_json::Value>) -> Result<u32> {
    let bad = |what: String| {
        CniError::new(
            Code::InvalidConfig,
            format!("mtu {what} is invalid: must be an integer from {MIN_MTU} to {MAX_MTU}"),
        )
    };
    let mtu = match v {
        None | Some(serde_json::Value::Null) => return Ok(DEFAULT_MTU),
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => return Ok(DEFAULT_MTU),
        Some(serde_json::Value::String(s)) => {
            s.trim().parse::<u32>().map_err(|_| bad(format!("{s:?}")))?
        }
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(n.to_string()))?,
        Some(other) => return Err(bad(other.to_string())),
    };
    if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
        return Err(bad(mtu.to_string()));
    }
    Ok(mtu)
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: PodArgs,
}

/// Pod identity from `CNI_ARGS` (`K8S_POD_NAME=x;K8S_POD_NAMESPACE=y;...`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub pod_name: String,
    pub pod_namespace: String,
    pub infra_container_id: String,
    pub pod_uid: String,
}

impl PodArgs {
    pub fn parse(s: &str) -> Result<PodArgs> {
        let mut map = HashMap::new();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                CniError::new(
                    Code::InvalidEnv,
                    format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"),
                )
            })?;
            map.insert(k, v);
        }
        use cni_common::validate::{bounded, MAX_CONTAINER_ID, MAX_K8S_NAME, MAX_UID};
        for (k, max) in [
            ("K8S_POD_NAME", MAX_K8S_NAME),
            ("K8S_POD_NAMESPACE", MAX_K8S_NAME),
            ("K8S_POD_INFRA_CONTAINER_ID", MAX_CONTAINER_ID),
            ("K8S_POD_UID", MAX_UID),
        ] {
            if let Some(v) = map.get(k) {
                bounded(k, v, max)
                    .map_err(|why| CniError::new(Code::InvalidEnv, format!("CNI_ARGS: {why}")))?;
            }
        }
        let get = |k: &str| map.get(k).map(|v| v.to_string()).unwrap_or_default();
        Ok(PodArgs {
            pod_name: get("K8S_POD_NAME"),
            pod_namespace: get("K8S_POD_NAMESPACE"),
            infra_container_id: get("K8S_POD_INFRA_CONTAINER_ID"),
            pod_uid: get("K8S_POD_UID"),
        })
    }
}

impl CniEnv {
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<CniEnv> {
        let command = env("CNI_COMMAND")
            .filter(|c| !c.is_empty())
            .ok_or_else(|| CniError::new(Code::InvalidEnv, "CNI_COMMAND is not set"))?;
        Ok(CniEnv {
            command,
            container_id: env("CNI_CONTAINERID").unwrap_or_default(),
            netns: env("CNI_NETNS").unwrap_or_default(),
            ifname: env("CNI_IFNAME").unwrap_or_default(),
            args: PodArgs::parse(&env("CNI_ARGS").unwrap_or_default())?,
        })
    }

    /// Fail with code 4 naming the first missing variable.
    pub fn require(&self, netns: bool) -> Result<()> {
        let missing = |v: &str| {
            CniError::new(
                Code::InvalidEnv,
                format!("{v} is required for {}", self.command),
            )
        };
        if self.container_id.is_empty() {
            return Err(missing("CNI_CONTAINERID"));
        }
        if self.ifname.is_empty() {
            return Err(missing("CNI_IFNAME"));
        }
        if netns && self.netns.is_empty() {
            return Err(missing("CNI_NETNS"));
        }
        let invalid = |v: &str, why: cni_common::validate::Invalid| {
            CniError::new(Code::InvalidEnv, format!("{v}: {why}"))
        };
        cni_common::validate::container_id(&self.container_id)
            .map_err(|w| invalid("CNI_CONTAINERID", w))?;
        cni_common::validate::ifname(&self.ifname).map_err(|w| invalid("CNI_IFNAME", w))?;
        cni_common::validate::bounded("path", &self.netns, cni_common::validate::MAX_PATH)
            .map_err(|w| invalid("CNI_NETNS", w))?;
        Ok(())
    }

    /// Kubernetes pods always carry a name and namespace; the veth name depends on them.
    pub fn require_pod(&self) -> Result<()> {
        if self.args.pod_name.is_empty() || self.args.pod_namespace.is_empty() {
            return Err(CniError::new(
                Code::InvalidEnv,
                "CNI_ARGS must carry K8S_POD_NAME and K8S_POD_NAMESPACE",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn upstream_conflist_entry_parses() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"aws-cni","type":"aws-cni","vethPrefix":"eni",
            "mtu":"9001","podSGEnforcingMode":"strict","pluginLogFile":"/var/log/aws-routed-eni/plugin.log",
            "pluginLogLevel":"DEBUG","capabilities":{"io.kubernetes.cri.pod-annotations":true},"whatever":1}"#,
            &no_env,
        )
        .unwrap();
        assert_eq!(c.mtu, 9001);
        assert_eq!(c.veth_prefix, "eni");
        assert_eq!(c.pod_sg_enforcing_mode, "strict");
        assert_eq!(c.plugin_log_level, "DEBUG");
        assert_eq!(
            c.ipamd_socket,
            PathBuf::from("/var/run/aws-node/ipamd.sock")
        );
    }

    #[test]
    fn defaults_and_overrides() {
        let env = |k: &str| (k == "AWS_CNI_IPAMD_SOCKET").then(|| "/tmp/x.sock".to_string());
        let c = NetConf::parse(br#"{"cniVersion":"0.4.0","name":"n","mtu":1500}"#, &env).unwrap();
        assert_eq!(c.mtu, 1500);
        assert_eq!(c.veth_prefix, "eni");
        assert_eq!(c.ipamd_socket, PathBuf::from("/tmp/x.sock"));
        let c = NetConf::parse(br#"{"cniVersion":"0.4.0","name":"n"}"#, &no_env).unwrap();
        assert_eq!(c.mtu, 9001);
    }

    #[test]
    fn bad_configs_have_codes() {
        let code = |s: &[u8]| NetConf::parse(s, &no_env).unwrap_err().code;
        assert_eq!(code(b"not json"), Code::Decode);
        assert_eq!(code(br#"{"name":"n"}"#), Code::InvalidConfig);
        assert_eq!(
            code(br#"{"cniVersion":"0.1.0","name":"n"}"#),
            Code::IncompatibleVersion
        );
        assert_eq!(
            code(br#"{"cniVersion":"1.0.0","name":"n","mtu":"9002"}"#),
            Code::InvalidConfig
        );
        assert_eq!(
            code(br#"{"cniVersion":"1.0.0","name":"n","mtu":"abc"}"#),
            Code::InvalidConfig
        );
        assert_eq!(
            code(br#"{"cniVersion":"1.0.0","name":"n","mtu":575}"#),
            Code::InvalidConfig
        );
        assert_eq!(
            code(br#"{"cniVersion":"1.0.0","name":"n","vethPrefix":"toolong"}"#),
            Code::InvalidConfig
        );
        assert_eq!(
            code(br#"{"cniVersion":"1.0.0","name":"n","vethPrefix":"eth"}"#),
            Code::InvalidConfig
        );
        assert_eq!(code(br#"{"cniVersion":"1.0.0"}"#), Code::InvalidConfig);
    }

    #[test]
    fn valid_attachments_parse() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
            &no_env,
        )
        .unwrap();
        assert_eq!(
            c.valid_attachments.unwrap(),
            vec![Attachment {
                container_id: "a".into(),
                ifname: "eth0".into()
            }]
        );
    }

    #[test]
    fn cni_args() {
        let a = PodArgs::parse("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1").unwrap();
        assert_eq!(a.pod_name, "web-0");
        assert_eq!(a.pod_namespace, "default");
        assert_eq!(a.infra_container_id, "abc");
        assert_eq!(a.pod_uid, "u-1");
        assert_eq!(
            PodArgs::parse("garbage").unwrap_err().code,
            Code::InvalidEnv
        );
        assert_eq!(PodArgs::parse("").unwrap(), PodArgs::default());
    }

    #[test]
    fn env_requirements() {
        let env = |k: &str| match k {
            "CNI_COMMAND" => Some("ADD".to_string()),
            "CNI_IFNAME" => Some("eth0".to_string()),
            _ => None,
        };
        let e = CniEnv::from_env(&env).unwrap();
        let err = e.require(true).unwrap_err();
        assert_eq!(err.code, Code::InvalidEnv);
        assert!(err.msg.contains("CNI_CONTAINERID"));
        assert_eq!(
            CniEnv::from_env(&no_env).unwrap_err().code,
            Code::InvalidEnv
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

        /// Whatever a runtime pipes in: a config or an error with one of the spec's codes for
        /// bad input, never a panic.
        #[test]
        fn stdin_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            if let Err(e) = NetConf::parse(&data, &no_env) {
                proptest::prop_assert!(matches!(e.code, Code::Decode | Code::InvalidConfig | Code::IncompatibleVersion), "{:?}", e.code);
            }
        }

        /// Configs that are JSON objects with fields of any JSON type.
        #[test]
        fn json_fields_of_any_type(
            version in proptest::prop_oneof!["0.3.1", "1.0.0", "1.1.0", "2.0.0", ".*"],
            name in ".*",
            mtu in proptest::prop_oneof!["\"9001\"", "1500", "-1", "\"x\"", "null", "1e9", "\\[\\]"],
            prefix in ".{0,6}",
        ) {
            let conf = format!(
                r#"{{"cniVersion":{},"name":{},"mtu":{mtu},"vethPrefix":{}}}"#,
                serde_json::Value::String(version),
                serde_json::Value::String(name),
                serde_json::Value::String(prefix),
            );
            if let Ok(c) = NetConf::parse(conf.as_bytes(), &no_env) {
                proptest::prop_assert!((MIN_MTU..=MAX_MTU).contains(&c.mtu));
                proptest::prop_assert!(cni_common::validate::network_name(&c.name).is_ok());
                proptest::prop_assert!(cni_common::naming::validate_veth_prefix(&c.veth_prefix).is_ok());
            }
        }

        /// Any CNI_* environment: accepted values obey the rules, the rest get code 4.
        #[test]
        fn env_never_panics(
            cmd in proptest::prop_oneof!["ADD", "DEL", "CHECK", "", ".*"],
            cid in ".{0,80}",
            ifname in ".{0,20}",
            netns in ".{0,40}",
            args in ".{0,120}",
        ) {
            let env = |k: &str| match k {
                "CNI_COMMAND" => Some(cmd.clone()),
                "CNI_CONTAINERID" => Some(cid.clone()),
                "CNI_IFNAME" => Some(ifname.clone()),
                "CNI_NETNS" => Some(netns.clone()),
                "CNI_ARGS" => Some(args.clone()),
                _ => None,
            };
            match CniEnv::from_env(&env) {
                Err(e) => proptest::prop_assert_eq!(e.code, Code::InvalidEnv),
                Ok(e) => match e.require(true) {
                    Err(err) => proptest::prop_assert_eq!(err.code, Code::InvalidEnv),
                    Ok(()) => {
                        proptest::prop_assert!(cni_common::validate::container_id(&e.container_id).is_ok());
                        proptest::prop_assert!(cni_common::validate::ifname(&e.ifname).is_ok());
                    }
                },
            }
        }
    }
}
