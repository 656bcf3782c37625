//! The plugin's entry of the conflist, as upstream's entrypoint writes it:
//!
//! ```json
//! { "name": "egress-cni", "type": "egress-cni", "mtu": "9001", "enabled": "true",
//!   "randomizeSNAT": "prng", "nodeIP": "192.0.2.1",
//!   "ipam": { "type": "host-local", "ranges": [[{"subnet": "169.254.172.0/22"}]],
//!             "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "/run/cni/v6pd/egress-v4-ipam" },
//!   "pluginLogFile": "...", "pluginLogLevel": "DEBUG" }
//! ```
//!
//! Decoding is separate from validation: DEL and a disabled plugin need little of the config,
//! and must not fail on parts they do not use. Pure: no I/O.

use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;

use aws_cni::config::Attachment;
use aws_cni::error::{CniError, Code, Result};
use aws_cni::version::{Version, SUPPORTED};
use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

use crate::range::Range;
use crate::store::DEFAULT_DATA_DIR;

/// The family of the egress traffic (not of the pod's own address, which is the other one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 egress for a pod of an IPv6 cluster: `v4if0`, SNAT to the node's IPv4 address.
    V4,
    /// IPv6 egress for a pod of an IPv4 cluster: `v6if0`, SNAT to the node's IPv6 address.
    V6,
}

impl Family {
    /// The pod's end of the egress veth pair (upstream's names).
    pub fn pod_ifname(self) -> &'static str {
        match self {
            Family::V4 => "v4if0",
            Family::V6 => "v6if0",
        }
    }

    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

/// Upstream's `randomizeSNAT` (from `AWS_VPC_K8S_CNI_RANDOMIZESNAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomizeSnat {
    /// `--random-fully`: upstream's default and its reading of any value but the two below.
    Prng,
    /// `hashrandom`: `--random`.
    HashRandom,
    /// `none`: neither.
    None,
}

impl RandomizeSnat {
    pub fn parse(s: &str) -> RandomizeSnat {
        match s {
            "none" => RandomizeSnat::None,
            "hashrandom" => RandomizeSnat::HashRandom,
            _ => RandomizeSnat::Prng,
        }
    }
}

/// The `cniVersion`s we answer in, as aws-cni.
pub fn check_version(s: &str) -> Result<Version> {
    let bad = || {
        CniError::new(
            Code::IncompatibleVersion,
            format!(
                "incompatible CNI version {s:?}: egress-cni supports {}",
                SUPPORTED.join(", ")
            ),
        )
    };
    if !SUPPORTED.contains(&s) {
        return Err(bad());
    }
    Version::parse(s).ok_or_else(bad)
}

#[derive(Deserialize)]
struct RawConf {
    #[serde(rename = "cniVersion", default)]
    cni_version: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    mtu: Option<Value>,
    #[serde(default)]
    enabled: Option<Value>,
    #[serde(rename = "randomizeSNAT", default)]
    randomize_snat: Option<String>,
    #[serde(rename = "nodeIP", default)]
    node_ip: Option<String>,
    #[serde(default)]
    ipam: Option<Value>,
    #[serde(rename = "pluginLogFile", default)]
    plugin_log_file: Option<String>,
    #[serde(rename = "pluginLogLevel", default)]
    plugin_log_level: Option<String>,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    valid_attachments: Option<Vec<Attachment>>,
}

/// The decoded entry; [`NetConf::egress`] and [`NetConf::ipam`] validate the rest on demand.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub version: Version,
    pub name: String,
    /// Upstream enables the plugin only for the exact string "true"; a JSON `true` is taken too.
    pub enabled: bool,
    pub plugin_log_file: String,
    pub plugin_log_level: String,
    pub prev_result: Option<Value>,
    pub valid_attachments: Option<Vec<Attachment>>,
    mtu: Option<Value>,
    randomize_snat: String,
    node_ip: Option<String>,
    ipam: Option<Value>,
}

/// One route of `ipam.routes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConf {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
}

/// The `ipam` section: host-local's configuration, of which egress-cni honours one range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipam {
    pub range: Range,
    pub routes: Vec<RouteConf>,
    pub data_dir: PathBuf,
}

impl Ipam {
    pub fn family(&self) -> Family {
        if self.range.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

/// Everything ADD needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    pub family: Family,
    pub node_ip: IpAddr,
    pub mtu: u32,
    pub randomize: RandomizeSnat,
    pub ipam: Ipam,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(Code::InvalidConfig, msg)
}

/// Go's `net.IP.IsGlobalUnicast` for an IPv6 address (upstream's test of the node's address):
/// anything but unspecified, loopback, multicast and link-local, unique-local included.
fn is_global_unicast_v6(ip: Ipv6Addr) -> bool {
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (ip.segments()[0] & 0xffc0) == 0xfe80)
}

/// Go's `net.ParseIP`: an IPv4-mapped IPv6 address is the IPv4 address.
fn parse_ip(s: &str) -> Option<IpAddr> {
    match s.trim().parse::<IpAddr>().ok()? {
        IpAddr::V6(v6) => Some(
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
        ),
        v4 => Some(v4),
    }
}

#[derive(Deserialize)]
struct RawRange {
    subnet: Option<String>,
    #[serde(rename = "rangeStart")]
    range_start: Option<String>,
    #[serde(rename = "rangeEnd")]
    range_end: Option<String>,
    gateway: Option<String>,
}

#[derive(Deserialize)]
struct RawRoute {
    dst: Option<String>,
    gw: Option<String>,
}

#[derive(Deserialize)]
struct RawIpam {
    #[serde(rename = "type")]
    kind: Option<String>,
    ranges: Option<Vec<Vec<RawRange>>>,
    // host-local's older single-range form.
    subnet: Option<String>,
    #[serde(rename = "rangeStart")]
    range_start: Option<String>,
    #[serde(rename = "rangeEnd")]
    range_end: Option<String>,
    gateway: Option<String>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(rename = "dataDir")]
    data_dir: Option<String>,
}

fn ip_field(what: &str, s: Option<&String>) -> Result<Option<IpAddr>> {
    s.filter(|s| !s.is_empty())
        .map(|s| {
            parse_ip(s).ok_or_else(|| invalid(format!("ipam: {what} {s:?} is not an IP address")))
        })
        .transpose()
}

fn parse_ipam(v: &Value) -> Result<Ipam> {
    let raw: RawIpam = serde_json::from_value(v.clone())
        .map_err(|e| invalid(format!("ipam section cannot be read: {e}")))?;
    match raw.kind.as_deref() {
        Some("host-local") => {}
        Some(other) => {
            return Err(invalid(format!(
                "ipam type {other:?} is not supported: egress-cni allocates egress addresses itself, in host-local's layout, and takes only \"host-local\""
            )))
        }
        None => return Err(invalid("ipam has no type (\"host-local\" expected)")),
    }
    let one = match (raw.ranges, raw.subnet) {
        (Some(mut sets), None) => {
            if sets.len() != 1 || sets[0].len() != 1 {
                return Err(invalid(format!(
                    "ipam.ranges must hold exactly one range set of one range (the egress subnet), found {} set(s)",
                    sets.len()
                )));
            }
            sets.swap_remove(0).swap_remove(0)
        }
        (None, Some(subnet)) => RawRange {
            subnet: Some(subnet),
            range_start: raw.range_start,
            range_end: raw.range_end,
            gateway: raw.gateway,
        },
        (Some(_), Some(_)) => {
            return Err(invalid(
                "ipam has both ranges and subnet: egress-cni takes one range",
            ))
        }
        (None, None) => return Err(invalid("ipam has no ranges (the egress subnet)")),
    };
    let subnet_text = one
        .subnet
        .ok_or_else(|| invalid("ipam range has no subnet"))?;
    let subnet: IpNet = subnet_text
        .trim()
        .parse()
        .map_err(|_| invalid(format!("ipam subnet {subnet_text:?} is not a CIDR")))?;
    let range = Range::new(
        subnet,
        ip_field("rangeStart", one.range_start.as_ref())?,
        ip_field("rangeEnd", one.range_end.as_ref())?,
        ip_field("gateway", one.gateway.as_ref())?,
    )
    .map_err(|e| invalid(format!("ipam: {e}")))?;
    let mut routes = Vec::new();
    for r in raw.routes {
        let dst_text = r.dst.ok_or_else(|| invalid("ipam route has no dst"))?;
        let dst: IpNet = dst_text
            .trim()
            .parse()
            .map_err(|_| invalid(format!("ipam route dst {dst_text:?} is not a CIDR")))?;
        let gw = ip_field("route gw", r.gw.as_ref())?;
        if dst.addr().is_ipv4() != range.is_ipv4()
            || gw.is_some_and(|g| g.is_ipv4() != range.is_ipv4())
        {
            return Err(invalid(format!(
                "ipam route {dst_text} is not of the subnet's family ({})",
                range.subnet()
            )));
        }
        routes.push(RouteConf {
            dst: dst.trunc(),
            gw,
        });
    }
    let data_dir = raw
        .data_dir
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| DEFAULT_DATA_DIR.to_string());
    Ok(Ipam {
        range,
        routes,
        data_dir: PathBuf::from(data_dir),
    })
}

impl NetConf {
    /// Decode stdin: code 6 for what is not a JSON object of the right shape, 1 for an
    /// unsupported version, 7 for a missing or unusable name.
    pub fn parse(stdin: &[u8]) -> Result<NetConf> {
        let raw: RawConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                Code::Decode,
                format!("cannot decode network config from stdin: {e}"),
            )
        })?;
        let cni_version = raw
            .cni_version
            .ok_or_else(|| invalid("network config has no cniVersion"))?;
        let version = check_version(&cni_version)?;
        let name = raw
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| invalid("network config has no name"))?;
        // The name is a directory of the address store.
        cni_common::validate::network_name(&name).map_err(|why| invalid(why.to_string()))?;
        let enabled = match &raw.enabled {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) => s == "true",
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(invalid(format!(
                    "enabled is {other}: \"true\" or \"false\" expected"
                )))
            }
        };
        Ok(NetConf {
            cni_version,
            version,
            name,
            enabled,
            plugin_log_file: raw.plugin_log_file.unwrap_or_default(),
            plugin_log_level: raw.plugin_log_level.unwrap_or_else(|| "INFO".into()),
            prev_result: raw.prev_result,
            valid_attachments: raw.valid_attachments,
            mtu: raw.mtu,
            randomize_snat: raw.randomize_snat.unwrap_or_default(),
            node_ip: raw.node_ip,
            ipam: raw.ipam,
        })
    }

    /// The `ipam` section alone (what DEL needs).
    pub fn ipam(&self) -> Result<Ipam> {
        let v = self
            .ipam
            .as_ref()
            .ok_or_else(|| invalid("network config has no ipam section (the egress subnet)"))?;
        parse_ipam(v)
    }

    /// Everything ADD needs; code 7 naming the field for anything unusable.
    pub fn egress(&self) -> Result<Egress> {
        let ipam = self.ipam()?;
        let family = ipam.family();
        let text = self
            .node_ip
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| {
                invalid("nodeIP is missing: the node address to SNAT egress traffic to")
            })?;
        let node_ip = parse_ip(text)
            .ok_or_else(|| invalid(format!("nodeIP {text:?} is not an IP address")))?;
        match (family, node_ip) {
            (Family::V4, IpAddr::V4(v4)) if v4.is_unspecified() => {
                return Err(invalid(format!("nodeIP {v4} is not a usable address")))
            }
            (Family::V6, IpAddr::V6(v6)) if !is_global_unicast_v6(v6) => {
                return Err(invalid(format!(
                    "nodeIP {v6} is not a global unicast IPv6 address, which IPv6 egress needs on the node's primary interface"
                )))
            }
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_)) => {}
            _ => {
                return Err(invalid(format!(
                    "nodeIP {node_ip} and the egress subnet {} are of different families",
                    ipam.range.subnet()
                )))
            }
        }
        let mtu = aws_cni::config::parse_mtu(self.mtu.as_ref())?;
        // The kernel turns IPv6 off on a link below 1280.
        if family == Family::V6 && mtu < 1280 {
            return Err(invalid(format!(
                "mtu {mtu} is below 1280, the least IPv6 egress can use"
            )));
        }
        Ok(Egress {
            family,
            node_ip,
            mtu,
            randomize: RandomizeSnat::parse(&self.randomize_snat),
            ipam,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream_v4(extra: &str) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"aws-cni","type":"egress-cni","mtu":"9001","enabled":"true",
            "randomizeSNAT":"prng","nodeIP":"192.0.2.1",
            "ipam":{{"type":"host-local","ranges":[[{{"subnet":"169.254.172.0/22"}}]],"routes":[{{"dst":"0.0.0.0/0"}}],"dataDir":"/run/cni/v6pd/egress-v4-ipam"}},
            "pluginLogFile":"/var/log/aws-routed-eni/egress-v4-plugin.log","pluginLogLevel":"DEBUG"{extra}}}"#
        )
    }

    fn code(s: &str) -> Code {
        match NetConf::parse(s.as_bytes()).and_then(|c| c.egress()) {
            Ok(_) => panic!("accepted: {s}"),
            Err(e) => e.code,
        }
    }

    #[test]
    fn upstream_v4_entry() {
        let c = NetConf::parse(upstream_v4("").as_bytes()).unwrap();
        assert!(c.enabled);
        assert_eq!(c.plugin_log_level, "DEBUG");
        let e = c.egress().unwrap();
        assert_eq!(e.family, Family::V4);
        assert_eq!(e.node_ip, "192.0.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(e.mtu, 9001);
        assert_eq!(e.randomize, RandomizeSnat::Prng);
        assert_eq!(e.ipam.range.subnet().to_string(), "169.254.172.0/22");
        assert_eq!(
            e.ipam.routes,
            [RouteConf {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: None
            }]
        );
        assert_eq!(
            e.ipam.data_dir,
            PathBuf::from("/run/cni/v6pd/egress-v4-ipam")
        );
    }

    #[test]
    fn upstream_v6_entry() {
        let s = upstream_v4("")
            .replace("192.0.2.1", "2001:db8:1::1")
            .replace("169.254.172.0/22", "fd00::ac:00/118")
            .replace("0.0.0.0/0", "::/0")
            .replace("v6pd/egress-v4-ipam", "v4pd/egress-v6-ipam")
            .replace("prng", "hashrandom");
        let e = NetConf::parse(s.as_bytes()).unwrap().egress().unwrap();
        assert_eq!(e.family, Family::V6);
        assert_eq!(e.family.pod_ifname(), "v6if0");
        assert_eq!(e.randomize, RandomizeSnat::HashRandom);
        // A unique-local node address is "global unicast" to Go, so upstream takes it.
        let ula = s.replace("2001:db8:1::1", "fd12::1");
        assert!(NetConf::parse(ula.as_bytes()).unwrap().egress().is_ok());
        for bad in ["fe80::1", "::1", "::", "ff02::1"] {
            let t = s.replace("2001:db8:1::1", bad);
            let e = NetConf::parse(t.as_bytes()).unwrap().egress().unwrap_err();
            assert_eq!(e.code, Code::InvalidConfig);
            assert!(e.msg.contains("not a global unicast"), "{}", e.msg);
        }
        let small = s.replace("\"mtu\":\"9001\"", "\"mtu\":\"1200\"");
        assert_eq!(code(&small), Code::InvalidConfig);
    }

    #[test]
    fn disabled_and_sparse_configs_decode() {
        let c = NetConf::parse(br#"{"cniVersion":"0.4.0","name":"aws-cni","enabled":"false"}"#)
            .unwrap();
        assert!(!c.enabled);
        assert_eq!(c.ipam().unwrap_err().code, Code::InvalidConfig);
        let c = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","enabled":true}"#).unwrap();
        assert!(c.enabled);
        let c = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","enabled":"TRUE"}"#).unwrap();
        assert!(!c.enabled, "upstream compares with \"true\" exactly");
        assert_eq!(RandomizeSnat::parse("none"), RandomizeSnat::None);
        assert_eq!(RandomizeSnat::parse(""), RandomizeSnat::Prng);
        assert_eq!(RandomizeSnat::parse("bogus"), RandomizeSnat::Prng);
    }

    #[test]
    fn bad_configs_have_the_specs_codes() {
        assert_eq!(code("not json"), Code::Decode);
        assert_eq!(code("[1,2]"), Code::Decode);
        assert_eq!(code(r#"{"cniVersion":"1.0.0","name":5}"#), Code::Decode);
        assert_eq!(code(r#"{"name":"n"}"#), Code::InvalidConfig);
        assert_eq!(
            code(r#"{"cniVersion":"9.9.9","name":"n"}"#),
            Code::IncompatibleVersion
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"a/b"}"#),
            Code::InvalidConfig
        );
        let v4 = upstream_v4("");
        let cases = [
            v4.replace("\"nodeIP\":\"192.0.2.1\",", ""),
            v4.replace("192.0.2.1", "not-an-ip"),
            v4.replace("192.0.2.1", "2001:db8::1"),
            v4.replace("192.0.2.1", "0.0.0.0"),
            v4.replace("169.254.172.0/22", "169.254.172.1/22"),
            v4.replace("169.254.172.0/22", "169.254.172.0/31"),
            v4.replace("169.254.172.0/22", "garbage"),
            v4.replace("\"host-local\"", "\"dhcp\""),
            v4.replace("0.0.0.0/0", "::/0"),
            v4.replace("\"9001\"", "\"abc\""),
            v4.replace("\"enabled\":\"true\"", "\"enabled\":7"),
            v4.replace(
                "[[{\"subnet\":\"169.254.172.0/22\"}]]",
                "[[{\"subnet\":\"169.254.172.0/22\"}],[{\"subnet\":\"169.254.176.0/22\"}]]",
            ),
            v4.replace("[[{\"subnet\":\"169.254.172.0/22\"}]]", "[]"),
        ];
        for c in cases {
            assert_eq!(code(&c), Code::InvalidConfig, "{c}");
        }
    }

    #[test]
    fn older_single_range_form_and_defaults() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","enabled":"true","nodeIP":"192.0.2.1",
            "ipam":{"type":"host-local","subnet":"10.9.0.0/24","gateway":"10.9.0.254"}}"#,
        )
        .unwrap();
        let e = c.egress().unwrap();
        assert_eq!(e.ipam.range.gateway().to_string(), "10.9.0.254");
        assert_eq!(e.ipam.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert!(e.ipam.routes.is_empty());
        assert_eq!(e.mtu, 9001);
    }

    #[test]
    fn ipv4_mapped_node_ip_is_ipv4_as_in_go() {
        let s = upstream_v4("").replace("192.0.2.1", "::ffff:192.0.2.1");
        let e = NetConf::parse(s.as_bytes()).unwrap().egress().unwrap();
        assert_eq!(e.node_ip, "192.0.2.1".parse::<IpAddr>().unwrap());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Whatever a runtime pipes in: a config or an error with one of the spec's codes for
        /// bad input, never a panic.
        #[test]
        fn stdin_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            match NetConf::parse(&data).and_then(|c| c.egress()) {
                Ok(_) => {}
                Err(e) => proptest::prop_assert!(matches!(e.code, Code::Decode | Code::InvalidConfig | Code::IncompatibleVersion)),
            }
        }

        #[test]
        fn fields_of_any_shape(
            node in proptest::prop_oneof!["192.0.2.1", "fd00::1", "::", ".*"],
            subnet in proptest::prop_oneof!["169.254.172.0/22", "fd00::ac:00/118", "10.0.0.0/32", ".*"],
            dst in proptest::prop_oneof!["0.0.0.0/0", "::/0", ".*"],
            mtu in proptest::prop_oneof!["\"9001\"", "1500", "-1", "null", "\"x\""],
        ) {
            let conf = serde_json::json!({
                "cniVersion": "1.0.0", "name": "aws-cni", "enabled": "true", "nodeIP": node,
                "mtu": serde_json::from_str::<Value>(&mtu).unwrap_or(Value::Null),
                "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "routes": [{"dst": dst}]},
            });
            if let Ok(e) = NetConf::parse(conf.to_string().as_bytes()).and_then(|c| c.egress()) {
                proptest::prop_assert_eq!(e.node_ip.is_ipv4(), e.ipam.range.is_ipv4());
                proptest::prop_assert!(e.ipam.routes.iter().all(|r| r.dst.addr().is_ipv4() == e.node_ip.is_ipv4()));
            }
        }
    }
}
