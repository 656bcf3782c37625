//! What a pod's egress wiring consists of, as data: `crate::wire` makes, checks and removes
//! it. Upstream's layout:
//!
//! IPv4 egress (IPv6 pod), pod `v4if0`:
//! ```text
//! pod:  169.254.172.X/22 (no subnet route)          host end: 169.254.172.1/32 scope link
//!       169.254.172.1 dev v4if0 scope link src X           169.254.172.X dev <host> scope link
//!       169.254.172.0/22 via 169.254.172.1 src X
//!       <each ipam route> via 169.254.172.1 (0.0.0.0/0 in upstream's conflist)
//! ```
//! IPv6 egress (IPv4 pod), pod `v6if0`, IPv6 off on the pod's own interface:
//! ```text
//! pod:  fd00::ac:X/118 (no DAD)                      host end: fe80::1/64 (no DAD)
//!       ::/0 via fe80::1 dev v6if0                             fd00::ac:X dev <host>
//!       <each other ipam route> via fe80::1
//! ```
//! Upstream routes IPv6 via the host end's kernel-made link-local address, which exists only
//! once the link is up and is unusable until duplicate address detection ends (about a
//! second). The host end here makes no address of its own and carries `fe80::1` instead, the
//! same on every host end (link-local addresses are per link): usable at once, and known
//! without a look at the host. DAD is skipped on the pod's address too: the store hands each
//! address to one pod only, and a veth has one peer.
//! Pure: no I/O.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;

use crate::config::{Egress, Family};
use crate::snat::host_veth_name;

/// The link-local address of every IPv6 egress host end, the pods' IPv6 gateway.
pub const HOST_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrSpec {
    pub ip: IpAddr,
    pub prefix: u8,
    pub scope_link: bool,
    /// Skip duplicate address detection (IPv6).
    pub nodad: bool,
    /// Leave out the subnet route the kernel would add with the address.
    pub noprefixroute: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
    pub src: Option<IpAddr>,
    pub scope_link: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub family: Family,
    pub host_veth: String,
    pub pod_ifname: &'static str,
    pub mtu: u32,
    pub pod_ip: IpAddr,
    pub pod_addr: AddrSpec,
    pub pod_routes: Vec<RouteSpec>,
    pub host_addr: AddrSpec,
    pub host_route: RouteSpec,
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

pub fn plan(egress: &Egress, network: &str, container_id: &str, pod_ip: IpAddr) -> Plan {
    let range = &egress.ipam.range;
    let subnet = range.subnet();
    let (pod_addr, pod_routes, host_addr) = match egress.family {
        Family::V4 => {
            let gw = range.gateway();
            let mut routes = vec![
                RouteSpec {
                    dst: host_net(gw),
                    gw: None,
                    src: Some(pod_ip),
                    scope_link: true,
                },
                RouteSpec {
                    dst: subnet,
                    gw: Some(gw),
                    src: Some(pod_ip),
                    scope_link: false,
                },
            ];
            routes.extend(egress.ipam.routes.iter().map(|r| RouteSpec {
                dst: r.dst,
                gw: Some(r.gw.unwrap_or(gw)),
                src: None,
                scope_link: false,
            }));
            (
                AddrSpec {
                    ip: pod_ip,
                    prefix: subnet.prefix_len(),
                    scope_link: false,
                    nodad: false,
                    noprefixroute: true,
                },
                routes,
                AddrSpec {
                    ip: gw,
                    prefix: 32,
                    scope_link: true,
                    nodad: false,
                    noprefixroute: false,
                },
            )
        }
        Family::V6 => {
            let ll = IpAddr::V6(HOST_LINK_LOCAL);
            let default = IpNet::V6(ipnet::Ipv6Net::default());
            let mut routes = vec![RouteSpec {
                dst: default,
                gw: Some(ll),
                src: None,
                scope_link: false,
            }];
            routes.extend(
                egress
                    .ipam
                    .routes
                    .iter()
                    .filter(|r| r.dst != default)
                    .map(|r| RouteSpec {
                        dst: r.dst,
                        gw: Some(r.gw.unwrap_or(ll)),
                        src: None,
                        scope_link: false,
                    }),
            );
            (
                AddrSpec {
                    ip: pod_ip,
                    prefix: subnet.prefix_len(),
                    scope_link: false,
                    nodad: true,
                    noprefixroute: false,
                },
                routes,
                AddrSpec {
                    ip: ll,
                    prefix: 64,
                    scope_link: true,
                    nodad: true,
                    noprefixroute: false,
                },
            )
        }
    };
    Plan {
        family: egress.family,
        host_veth: host_veth_name(network, container_id),
        pod_ifname: egress.family.pod_ifname(),
        mtu: egress.mtu,
        pod_ip,
        pod_addr,
        pod_routes,
        host_addr,
        host_route: RouteSpec {
            dst: host_net(pod_ip),
            gw: None,
            src: None,
            scope_link: egress.family == Family::V4,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetConf;

    fn egress(v6: bool) -> Egress {
        let conf = if v6 {
            r#"{"cniVersion":"1.0.0","name":"aws-cni","enabled":"true","nodeIP":"2001:db8::1","mtu":"9001",
            "ipam":{"type":"host-local","ranges":[[{"subnet":"fd00::ac:00/118"}]],"routes":[{"dst":"::/0"},{"dst":"64:ff9b::/96"}]}}"#
        } else {
            r#"{"cniVersion":"1.0.0","name":"aws-cni","enabled":"true","nodeIP":"192.0.2.1","mtu":"9001",
            "ipam":{"type":"host-local","ranges":[[{"subnet":"169.254.172.0/22"}]],"routes":[{"dst":"0.0.0.0/0"}]}}"#
        };
        NetConf::parse(conf.as_bytes()).unwrap().egress().unwrap()
    }

    fn show(r: &RouteSpec) -> String {
        let mut s = r.dst.to_string();
        if let Some(g) = r.gw {
            s.push_str(&format!(" via {g}"));
        }
        if r.scope_link {
            s.push_str(" scope link");
        }
        if let Some(src) = r.src {
            s.push_str(&format!(" src {src}"));
        }
        s
    }

    #[test]
    fn ipv4_egress_as_upstream() {
        let p = plan(
            &egress(false),
            "aws-cni",
            "containerId-123",
            "169.254.172.5".parse().unwrap(),
        );
        assert_eq!(p.pod_ifname, "v4if0");
        assert_eq!(p.host_veth, "veth5740307710e");
        assert_eq!(
            (
                p.pod_addr.ip.to_string(),
                p.pod_addr.prefix,
                p.pod_addr.noprefixroute
            ),
            ("169.254.172.5".to_string(), 22, true)
        );
        let routes: Vec<String> = p.pod_routes.iter().map(show).collect();
        assert_eq!(
            routes,
            [
                "169.254.172.1/32 scope link src 169.254.172.5",
                "169.254.172.0/22 via 169.254.172.1 src 169.254.172.5",
                "0.0.0.0/0 via 169.254.172.1",
            ]
        );
        assert_eq!(
            (
                p.host_addr.ip.to_string(),
                p.host_addr.prefix,
                p.host_addr.scope_link
            ),
            ("169.254.172.1".to_string(), 32, true)
        );
        assert_eq!(show(&p.host_route), "169.254.172.5/32 scope link");
    }

    #[test]
    fn ipv6_egress_via_fixed_link_local() {
        let p = plan(&egress(true), "aws-cni", "c", "fd00::ac:2".parse().unwrap());
        assert_eq!(p.pod_ifname, "v6if0");
        assert!(p.pod_addr.nodad && !p.pod_addr.noprefixroute);
        assert_eq!(p.pod_addr.prefix, 118);
        let routes: Vec<String> = p.pod_routes.iter().map(show).collect();
        assert_eq!(routes, ["::/0 via fe80::1", "64:ff9b::/96 via fe80::1"]);
        assert_eq!(
            (
                p.host_addr.ip.to_string(),
                p.host_addr.prefix,
                p.host_addr.nodad
            ),
            ("fe80::1".to_string(), 64, true)
        );
        assert_eq!(show(&p.host_route), "fd00::ac:2/128");
    }

    #[test]
    fn ipv6_default_route_even_without_ipam_routes() {
        let mut e = egress(true);
        e.ipam.routes.clear();
        let p = plan(&e, "n", "c", "fd00::ac:2".parse().unwrap());
        assert_eq!(p.pod_routes.len(), 1);
        assert_eq!(show(&p.pod_routes[0]), "::/0 via fe80::1");
    }
}
