//! Making, checking and removing a `crate::plan::Plan` through rtnetlink: the veth pair (each
//! end created in its own namespace, by aws-cni's `add_veth_into`), addresses, routes and the
//! few sysctls.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aws_cni::error::{netlink as nl_err, CniError, Code, Result};
use aws_cni::netlink::{errno, link_is_up, link_mac, mac_string, Netlink};
use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use nix::errno::Errno;
use rtnetlink::RouteMessageBuilder;

use crate::config::Family;
use crate::plan::{AddrSpec, Plan, RouteSpec};

pub struct Wired {
    pub host_mac: String,
    pub pod_mac: String,
}

/// Write `/proc/sys/<key>` inside the namespace `ns`. On a throwaway thread: `/proc/sys/net`
/// shows the namespace of the thread that opens it, and no runtime thread may switch.
pub fn sysctl_in(ns: &File, key: &str, value: &str) -> std::io::Result<()> {
    let ns = ns.try_clone()?;
    let path = format!("/proc/sys/{key}");
    let value = value.to_string();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        std::fs::write(&path, value)
    })
    .join()
    .map_err(|_| std::io::Error::other("sysctl thread panicked"))?
}

/// Write `/proc/sys/<key>` in this process's namespace (the node's) unless it holds `value`.
fn sysctl_here(key: &str, value: &str) -> std::io::Result<()> {
    let path = format!("/proc/sys/{key}");
    if std::fs::read_to_string(&path)?.trim() == value {
        return Ok(());
    }
    std::fs::write(&path, value)
}

/// Whether the node forwards IPv6 (`net.ipv6.conf.all.forwarding`). Upstream's init container
/// turns it on for IPv6 egress, and the plugin leaves it alone: turning it on also stops the
/// node's interfaces from taking router advertisements, which may be how the node itself has
/// its IPv6 default route.
pub fn ipv6_forwarding() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").is_ok_and(|v| v.trim() == "1")
}

fn link_name(l: &LinkMessage) -> &str {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.as_str()),
            _ => None,
        })
        .unwrap_or("")
}

/// The ifindex, in the other namespace, of a veth end's peer.
fn peer_index(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

async fn link_by_index(
    nl: &Netlink,
    index: u32,
) -> aws_cni::netlink::NlResult<Option<LinkMessage>> {
    match nl
        .handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
    {
        Err(e) if errno(&e) == Some(Errno::ENODEV as i32) => Ok(None),
        r => r,
    }
}

async fn add_addr(nl: &Netlink, index: u32, a: &AddrSpec) -> aws_cni::netlink::NlResult<()> {
    let mut req = nl.handle.address().add(index, a.ip, a.prefix);
    let msg = req.message_mut();
    if a.scope_link {
        msg.header.scope = AddressScope::Link;
    }
    let mut flags = AddressFlags::empty();
    if a.nodad {
        flags |= AddressFlags::Nodad;
    }
    if a.noprefixroute {
        flags |= AddressFlags::Noprefixroute;
    }
    if !flags.is_empty() {
        msg.attributes.push(AddressAttribute::Flags(flags));
    }
    match req.execute().await {
        // A repeated ADD over a host end that survived (fe80::1 or the gateway are the same).
        Err(e) if errno(&e) == Some(Errno::EEXIST as i32) => Ok(()),
        r => r,
    }
}

fn route_msg(r: &RouteSpec, index: u32) -> Result<RouteMessage> {
    let bad =
        |e: &dyn std::fmt::Display| CniError::new(Code::Netlink, format!("route {}: {e}", r.dst));
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(r.dst.addr(), r.dst.prefix_len())
        .map_err(|e| bad(&e))?
        .output_interface(index);
    if let Some(gw) = r.gw {
        b = b.gateway(gw).map_err(|e| bad(&e))?;
    }
    if let Some(src) = r.src {
        b = b.pref_source(src).map_err(|e| bad(&e))?;
    }
    if r.scope_link {
        b = b.scope(RouteScope::Link);
    }
    Ok(b.build())
}

async fn replace_route(nl: &Netlink, r: &RouteSpec, index: u32, side: &str) -> Result<()> {
    let msg = route_msg(r, index)?;
    nl.handle
        .route()
        .add(msg)
        .replace()
        .execute()
        .await
        .map_err(|e| nl_err(&format!("add {side} route {}", show_route(r)), e))
}

pub fn show_route(r: &RouteSpec) -> String {
    let mut s = r.dst.to_string();
    if let Some(g) = r.gw {
        s.push_str(&format!(" via {g}"));
    }
    if let Some(src) = r.src {
        s.push_str(&format!(" src {src}"));
    }
    s
}

/// Delete a link by name if it is there.
async fn del_named(nl: &Netlink, name: &str) -> aws_cni::netlink::NlResult<bool> {
    match nl.link_by_name(name).await? {
        Some(l) => {
            nl.del_link(l.header.index).await?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Wire the pod's egress. `cni_ifname` is the pod's main interface, which loses IPv6 for
/// IPv6 egress (upstream: the pod's IPv6 traffic must take `v6if0`). On error the caller
/// runs [`remove`].
pub async fn setup(
    host: &Netlink,
    pod: &Netlink,
    ns: &File,
    plan: &Plan,
    cni_ifname: &str,
) -> Result<Wired> {
    // Left by an earlier ADD of this container (repeated, or failed before its undo): the pair
    // is made anew rather than patched.
    del_named(host, &plan.host_veth)
        .await
        .map_err(|e| nl_err(&format!("remove old host veth {}", plan.host_veth), e))?;
    del_named(pod, plan.pod_ifname)
        .await
        .map_err(|e| nl_err(&format!("remove old pod interface {}", plan.pod_ifname), e))?;

    if plan.family == Family::V6 {
        sysctl_in(ns, &format!("net/ipv6/conf/{cni_ifname}/disable_ipv6"), "1").map_err(|e| {
            CniError::new(
                Code::Netlink,
                format!("disable IPv6 on the pod's {cni_ifname}: {e}"),
            )
        })?;
    }
    host.add_veth_into(&plan.host_veth, plan.pod_ifname, plan.mtu, ns)
        .await
        .map_err(|e| {
            nl_err(
                &format!("create veth pair {} / {}", plan.host_veth, plan.pod_ifname),
                e,
            )
        })?;
    if plan.family == Family::V6 {
        // Before the link is up, or the kernel makes its own link-local address (mode 1: none).
        sysctl_here(
            &format!("net/ipv6/conf/{}/addr_gen_mode", plan.host_veth),
            "1",
        )
        .map_err(|e| {
            CniError::new(
                Code::Netlink,
                format!("stop {} making a link-local address: {e}", plan.host_veth),
            )
        })?;
    }

    let pod_link = pod
        .link_by_name(plan.pod_ifname)
        .await
        .map_err(|e| nl_err(&format!("look up pod {}", plan.pod_ifname), e))?
        .ok_or_else(|| {
            CniError::new(
                Code::Netlink,
                format!("pod {} missing right after it was created", plan.pod_ifname),
            )
        })?;
    let host_link = host
        .link_by_name(&plan.host_veth)
        .await
        .map_err(|e| nl_err(&format!("look up host veth {}", plan.host_veth), e))?
        .ok_or_else(|| {
            CniError::new(
                Code::Netlink,
                format!(
                    "host veth {} missing right after it was created",
                    plan.host_veth
                ),
            )
        })?;
    let (pi, hi) = (pod_link.header.index, host_link.header.index);

    pod.set_up(pi)
        .await
        .map_err(|e| nl_err(&format!("bring up pod {}", plan.pod_ifname), e))?;
    add_addr(pod, pi, &plan.pod_addr).await.map_err(|e| {
        nl_err(
            &format!(
                "add {}/{} to pod {}",
                plan.pod_addr.ip, plan.pod_addr.prefix, plan.pod_ifname
            ),
            e,
        )
    })?;
    add_addr(host, hi, &plan.host_addr).await.map_err(|e| {
        nl_err(
            &format!(
                "add {}/{} to host veth {}",
                plan.host_addr.ip, plan.host_addr.prefix, plan.host_veth
            ),
            e,
        )
    })?;
    host.set_up(hi)
        .await
        .map_err(|e| nl_err(&format!("bring up host veth {}", plan.host_veth), e))?;
    for r in &plan.pod_routes {
        replace_route(pod, r, pi, "pod").await?;
    }
    // Replace, not add: a route to this address left by a dead pod's veth moves here.
    replace_route(host, &plan.host_route, hi, "host").await?;
    if plan.family == Family::V4 {
        sysctl_here("net/ipv4/ip_forward", "1")
            .map_err(|e| CniError::new(Code::Netlink, format!("enable IPv4 forwarding: {e}")))?;
    }
    Ok(Wired {
        host_mac: mac_string(&link_mac(&host_link)),
        pod_mac: mac_string(&link_mac(&pod_link)),
    })
}

/// Delete the pair: by the host end's name, which needs no pod namespace; else (a pair made
/// by upstream's plugin, whose host end has a random name) by the pod's end, when the pod's
/// namespace is still there. Whether a link was deleted.
pub async fn remove(
    host: &Netlink,
    pod: Option<&Netlink>,
    host_veth: &str,
    pod_ifname: &str,
) -> Result<bool> {
    if del_named(host, host_veth)
        .await
        .map_err(|e| nl_err(&format!("delete host veth {host_veth}"), e))?
    {
        return Ok(true);
    }
    match pod {
        Some(p) => del_named(p, pod_ifname)
            .await
            .map_err(|e| nl_err(&format!("delete pod interface {pod_ifname}"), e)),
        None => Ok(false),
    }
}

/// One route as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KernelRoute {
    dst: IpNet,
    gw: Option<IpAddr>,
    oif: Option<u32>,
}

fn route_from_msg(m: &RouteMessage) -> Option<KernelRoute> {
    let mut dst = None;
    let mut gw = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(IpAddr::V4(*d)),
            RouteAttribute::Destination(RouteAddress::Inet6(d)) => dst = Some(IpAddr::V6(*d)),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(IpAddr::V4(*g)),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gw = Some(IpAddr::V6(*g)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let len = m.header.destination_prefix_length;
    let dst = match dst {
        Some(d) => IpNet::new(d, len).ok()?,
        None if m.header.address_family == netlink_packet_route::AddressFamily::Inet6 => {
            IpNet::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), len).ok()?
        }
        None => IpNet::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), len).ok()?,
    };
    Some(KernelRoute { dst, gw, oif })
}

async fn routes(nl: &Netlink, family: Family) -> aws_cni::netlink::NlResult<Vec<KernelRoute>> {
    let filter = match family {
        Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
        Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
    };
    let msgs: Vec<RouteMessage> = nl
        .handle
        .route()
        .get(filter)
        .execute()
        .try_collect()
        .await?;
    Ok(msgs.iter().filter_map(route_from_msg).collect())
}

async fn has_addr(nl: &Netlink, index: u32, a: &AddrSpec) -> aws_cni::netlink::NlResult<bool> {
    let msgs = cni_common::netlink::link_addresses(&nl.handle, index).await?;
    Ok(msgs.iter().any(|m| {
        m.header.prefix_len == a.prefix
            && m.attributes
                .iter()
                .any(|x| matches!(x, AddressAttribute::Address(ip) if *ip == a.ip))
    }))
}

fn has_route(table: &[KernelRoute], r: &RouteSpec, index: u32) -> bool {
    table
        .iter()
        .any(|k| k.dst == r.dst && k.gw == r.gw && k.oif == Some(index))
}

/// What is missing or wrong, in words; empty when the wiring is whole.
pub async fn check(host: &Netlink, pod: &Netlink, plan: &Plan) -> Vec<String> {
    let mut out = Vec::new();
    let fail = |what: &str, e: rtnetlink::Error| format!("{what}: {e}");
    let pod_link = match pod.link_by_name(plan.pod_ifname).await {
        Ok(Some(l)) => l,
        Ok(None) => {
            out.push(format!("pod interface {} is missing", plan.pod_ifname));
            return out;
        }
        Err(e) => {
            out.push(fail(&format!("look up pod {}", plan.pod_ifname), e));
            return out;
        }
    };
    let pi = pod_link.header.index;
    if !link_is_up(&pod_link) {
        out.push(format!("pod interface {} is down", plan.pod_ifname));
    }
    match has_addr(pod, pi, &plan.pod_addr).await {
        Ok(true) => {}
        Ok(false) => out.push(format!(
            "pod interface {} lacks {}/{}",
            plan.pod_ifname, plan.pod_addr.ip, plan.pod_addr.prefix
        )),
        Err(e) => out.push(fail("list pod addresses", e)),
    }
    match routes(pod, plan.family).await {
        Ok(table) => {
            for r in &plan.pod_routes {
                if !has_route(&table, r, pi) {
                    out.push(format!(
                        "pod route {} dev {} is missing",
                        show_route(r),
                        plan.pod_ifname
                    ));
                }
            }
        }
        Err(e) => out.push(fail("list pod routes", e)),
    }
    // The peer, whatever its name (upstream's host ends have random ones).
    let host_link = match peer_index(&pod_link) {
        Some(i) => link_by_index(host, i).await.ok().flatten(),
        None => None,
    };
    let Some(host_link) = host_link else {
        out.push(format!(
            "host end of pod interface {} is missing (expected {})",
            plan.pod_ifname, plan.host_veth
        ));
        return out;
    };
    let hi = host_link.header.index;
    let hname = link_name(&host_link).to_string();
    if !link_is_up(&host_link) {
        out.push(format!("host veth {hname} is down"));
    }
    match has_addr(host, hi, &plan.host_addr).await {
        Ok(true) => {}
        Ok(false) => out.push(format!(
            "host veth {hname} lacks {}/{}",
            plan.host_addr.ip, plan.host_addr.prefix
        )),
        Err(e) => out.push(fail("list host veth addresses", e)),
    }
    match routes(host, plan.family).await {
        Ok(table) if has_route(&table, &plan.host_route, hi) => {}
        Ok(_) => out.push(format!(
            "host route {} dev {hname} is missing",
            plan.host_route.dst
        )),
        Err(e) => out.push(fail("list host routes", e)),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_routes_parse() {
        let spec = RouteSpec {
            dst: "0.0.0.0/0".parse().unwrap(),
            gw: Some("169.254.172.1".parse().unwrap()),
            src: None,
            scope_link: false,
        };
        let msg = route_msg(&spec, 7).unwrap();
        let k = route_from_msg(&msg).unwrap();
        assert!(has_route(std::slice::from_ref(&k), &spec, 7));
        assert!(!has_route(&[k], &spec, 8));
        let v6 = RouteSpec {
            dst: "::/0".parse().unwrap(),
            gw: Some("fe80::1".parse().unwrap()),
            src: None,
            scope_link: false,
        };
        let k = route_from_msg(&route_msg(&v6, 3).unwrap()).unwrap();
        assert_eq!(k.dst, v6.dst);
        assert_eq!(k.gw, v6.gw);
    }
}
