//! The ADD result, rendered in the version the config asks for, and read back from
//! `prevResult` for CHECK and DEL.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{json, Value};

use crate::version::Version;

/// Gateway every IPv4 pod routes through; the host answers for it with the veth MAC.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// An IPv6 pod's gateway (upstream's), answered the same way.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The gateway of a pod holding `ip`.
pub fn gateway(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => GATEWAY.into(),
        IpAddr::V6(_) => GATEWAY_V6.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddResult {
    pub host_veth: String,
    pub host_mac: String,
    pub ifname: String,
    pub pod_mac: String,
    pub sandbox: String,
    pub ip: IpAddr,
}

impl AddResult {
    /// Interfaces: 0 the host veth, 1 the pod's interface (the one the IP lives on).
    pub fn render(&self, cni_version: &str, v: Version) -> Value {
        let gw = gateway(self.ip);
        let (len, family, any) = match self.ip {
            IpAddr::V4(_) => (32, "4", "0.0.0.0/0"),
            IpAddr::V6(_) => (128, "6", "::/0"),
        };
        let mut ip = json!({
            "address": format!("{}/{len}", self.ip),
            "gateway": gw.to_string(),
            "interface": 1,
        });
        if v.is_legacy() {
            ip["version"] = json!(family);
        }
        json!({
            "cniVersion": cni_version,
            "interfaces": [
                { "name": self.host_veth, "mac": self.host_mac },
                { "name": self.ifname, "mac": self.pod_mac, "sandbox": self.sandbox },
            ],
            "ips": [ip],
            "routes": [ { "dst": any, "gw": gw.to_string() } ],
            "dns": {},
        })
    }
}

/// What CHECK needs from `prevResult`: the pod address and the interface names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrevResult {
    pub ip: IpAddr,
    pub host_veth: Option<String>,
    pub pod_ifname: Option<String>,
}

impl PrevResult {
    /// Finds our address entry (either family); other plugins in the chain may have added interfaces after ours.
    pub fn from_value(v: &Value) -> Option<PrevResult> {
        let ips = v.get("ips")?.as_array()?;
        let ifaces = v
            .get("interfaces")
            .and_then(|i| i.as_array())
            .cloned()
            .unwrap_or_default();
        for entry in ips {
            let addr = entry.get("address")?.as_str()?;
            let ip_str = addr.split('/').next()?;
            let Ok(ip) = ip_str.parse::<IpAddr>() else {
                continue;
            };
            let pod_ifname = entry
                .get("interface")
                .and_then(|i| i.as_u64())
                .and_then(|i| ifaces.get(i as usize))
                .and_then(|i| i.get("name"))
                .and_then(|n| n.as_str())
                .map(str::to_string);
            let host_veth = ifaces
                .iter()
                .find(|i| i.get("sandbox").is_none_or(|s| s.as_str() == Some("")))
                .and_then(|i| i.get("name"))
                .and_then(|n| n.as_str())
                .map(str::to_string);
            return Some(PrevResult {
                ip,
                host_veth,
                pod_ifname,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AddResult {
        AddResult {
            host_veth: "eni0123456789a".into(),
            host_mac: "aa:bb:cc:dd:ee:01".into(),
            ifname: "eth0".into(),
            pod_mac: "aa:bb:cc:dd:ee:02".into(),
            sandbox: "/var/run/netns/p".into(),
            ip: Ipv4Addr::new(10, 0, 1, 5).into(),
        }
    }

    #[test]
    fn renders_ipv6_as_upstream() {
        let mut r = sample();
        r.ip = "2600:1f14::1:0:0:5".parse().unwrap();
        let v = r.render("0.4.0", Version::parse("0.4.0").unwrap());
        assert_eq!(v["ips"][0]["address"], "2600:1f14::1:0:0:5/128");
        assert_eq!(v["ips"][0]["version"], "6");
        assert_eq!(v["ips"][0]["gateway"], "fe80::1");
        assert_eq!(v["routes"][0]["dst"], "::/0");
        let back = PrevResult::from_value(&v).unwrap();
        assert_eq!(back.ip, r.ip);
    }

    #[test]
    fn renders_v1_without_ip_version() {
        let v = sample().render("1.0.0", Version(1, 0, 0));
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["ips"][0]["address"], "10.0.1.5/32");
        assert!(v["ips"][0].get("version").is_none());
        assert_eq!(v["interfaces"][1]["sandbox"], "/var/run/netns/p");
        assert_eq!(v["routes"][0]["gw"], "169.254.1.1");
    }

    #[test]
    fn renders_legacy_with_ip_version() {
        for ver in ["0.3.0", "0.3.1", "0.4.0"] {
            let v = sample().render(ver, Version::parse(ver).unwrap());
            assert_eq!(v["ips"][0]["version"], "4");
            assert_eq!(v["cniVersion"], ver);
        }
    }

    #[test]
    fn prev_result_round_trip() {
        let v = sample().render("1.1.0", Version(1, 1, 0));
        let p = PrevResult::from_value(&v).unwrap();
        assert_eq!(p.ip, Ipv4Addr::new(10, 0, 1, 5));
        assert_eq!(p.host_veth.as_deref(), Some("eni0123456789a"));
        assert_eq!(p.pod_ifname.as_deref(), Some("eth0"));
        assert_eq!(PrevResult::from_value(&json!({"ips": []})), None);
    }
}
