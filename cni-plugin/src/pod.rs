//! What a pod's network looks like, and how to make, undo and verify it.
//!
//! Pod side: `<ifname>` with `<ip>/32`, `169.254.1.1/32 scope link`, `default via 169.254.1.1`
//! and a permanent neighbour entry for the gateway pointing at the host veth's MAC, so the pod
//! never ARPs for it. Host side: `<ip>/32 dev <veth> scope link` in main, `to <ip> lookup main`
//! at 512 and, for an address on a secondary ENI, `from <ip> lookup <ENI table>` at 1536 so
//! its replies leave by the ENI that owns the address.
//!
//! An IPv6 pod is wired the same way with upstream's IPv6 values: `<ip>/128` (no DAD),
//! `fe80::1` as the gateway with the host veth's MAC, `<ip>/128` routed to the host veth, and
//! on the host veth upstream's sysctls (no router advertisements, redirects accepted).

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::RouteScope;

use crate::error::{netlink, CniError, Code, Result};
use nix::errno::Errno;

use crate::netlink::{
    errno, gateway_route, host_route, link_alias, link_is_up, link_mac, mac_string, Netlink, Rule,
    MAIN_TABLE,
};
use crate::result::gateway;

pub use cni_common::netlink::{FROM_POD_RULE_PRIORITY, TO_POD_RULE_PRIORITY};

#[derive(Debug, Clone)]
pub struct PodNet {
    pub host_veth: String,
    /// Which attachment made the veth (see [`owner`]); set as the host veth's alias.
    pub owner: String,
    pub ifname: String,
    pub mtu: u32,
    pub ip: IpAddr,
    /// Table of the owning ENI; `MAIN_TABLE` for the primary ENI.
    pub route_table: u32,
}

impl PodNet {
    fn rule_to_pod(&self) -> Rule {
        Rule::host(TO_POD_RULE_PRIORITY, MAIN_TABLE, Some(self.ip), None)
    }

    fn rule_from_pod(&self) -> Option<Rule> {
        (self.route_table != MAIN_TABLE).then_some(Rule::host(
            FROM_POD_RULE_PRIORITY,
            self.route_table,
            None,
            Some(self.ip),
        ))
    }
}

pub struct Wired {
    pub host_mac: String,
    pub pod_mac: String,
}

/// Wire the pod. On error the caller runs `teardown`, which removes whatever was made.
pub async fn setup(host: &Netlink, pod: &Netlink, ns: &File, p: &PodNet) -> Result<Wired> {
    // The common case has nothing in the way, so try first and clean up only when the kernel
    // says a name is taken: leftovers of an earlier sandbox of the same pod (same veth name)
    // or of an ADD that died half-way.
    let create = || host.add_veth_into(&p.host_veth, &p.ifname, p.mtu, ns);
    let created = match create().await {
        Err(e) if errno(&e) == Some(Errno::EEXIST as i32) => {
            remove_stale(host, pod, p).await?;
            create().await
        }
        r => r,
    };
    created.map_err(|e| netlink(&format!("create veth {} <-> {}", p.host_veth, p.ifname), e))?;

    // From here the host side and the pod side are independent until the end: each goes
    // through its own socket, concurrently (the kernel serves both namespaces at once).
    let (hlink, plink) = tokio::join!(host.link_by_name(&p.host_veth), pod.link_by_name(&p.ifname));
    let hlink = hlink
        .map_err(|e| netlink("look up new host veth", e))?
        .ok_or_else(|| {
            CniError::new(Code::Netlink, format!("host veth {} vanished", p.host_veth))
        })?;
    let plink = plink
        .map_err(|e| netlink("look up new pod interface", e))?
        .ok_or_else(|| {
            CniError::new(
                Code::Netlink,
                format!("{} did not appear in the pod netns", p.ifname),
            )
        })?;
    let (hidx, pidx) = (hlink.header.index, plink.header.index);
    let host_mac = link_mac(&hlink);

    // A veth end cannot be created up (ENOTCONN), so both come up afterwards.
    let host_side = async {
        if p.ip.is_ipv6() {
            host_veth_ipv6_sysctls(&p.host_veth)?;
        }
        host.set_up_with_alias(hidx, &p.owner)
            .await
            .map_err(|e| netlink("set host veth up", e))?;
        host.replace_route(host_route(p.ip, hidx, MAIN_TABLE))
            .await
            .map_err(|e| netlink(&format!("add host route to {}", p.ip), e))?;
        host.add_rule(&p.rule_to_pod())
            .await
            .map_err(|e| netlink(&format!("add rule to {} lookup main", p.ip), e))?;
        if let Some(r) = p.rule_from_pod() {
            host.add_rule(&r)
                .await
                .map_err(|e| netlink(&format!("add rule from {} lookup {}", p.ip, r.table), e))?;
        }
        Ok::<(), CniError>(())
    };
    let gw = gateway(p.ip);
    let len = cni_common::netlink::host_len(p.ip);
    let pod_side = async {
        if p.ip.is_ipv6() {
            // As upstream: a runtime may create namespaces with IPv6 off. And no duplicate
            // address detection on the interface's link-local address (the host veth's is off
            // too): only the two ends are on the link, and while it runs, for a second, the
            // pod's first packets wait.
            crate::netlink::sysctls_in_netns(
                ns,
                vec![
                    (format!("net/ipv6/conf/{}/disable_ipv6", p.ifname), "0"),
                    (format!("net/ipv6/conf/{}/accept_dad", p.ifname), "0"),
                    ("net/ipv6/conf/lo/disable_ipv6".to_string(), "0"),
                ],
            )
            .await
            .map_err(|e| CniError::new(Code::Io, format!("enable IPv6 in the pod: {e}")))?;
        }
        pod.set_up(pidx)
            .await
            .map_err(|e| netlink("set pod interface up", e))?;
        pod.add_addr(pidx, p.ip, len)
            .await
            .map_err(|e| netlink(&format!("add {}/{len} to pod", p.ip), e))?;
        pod.replace_route(host_route(gw, pidx, MAIN_TABLE))
            .await
            .map_err(|e| netlink(&format!("add pod route to {gw}"), e))?;
        pod.replace_route(gateway_route(gw, pidx))
            .await
            .map_err(|e| netlink("add pod default route", e))?;
        pod.replace_neighbour(pidx, gw, &host_mac)
            .await
            .map_err(|e| netlink(&format!("add pod neighbour for {gw}"), e))?;
        Ok::<(), CniError>(())
    };
    let (h, q) = tokio::join!(host_side, pod_side);
    h?;
    q?;

    Ok(Wired {
        host_mac: mac_string(&host_mac),
        pod_mac: mac_string(&link_mac(&plink)),
    })
}

/// Upstream's host veth settings for an IPv6 pod: the veth takes no router advertisements
/// (the pod is not a router), accepts redirects, and does not act as a router itself. Ours
/// besides: no duplicate address detection on the veth's link-local address, set before it
/// comes up: until DAD ends (a second) the node cannot resolve the pod, and nothing else is on
/// a veth to collide with.
fn host_veth_ipv6_sysctls(veth: &str) -> Result<()> {
    for (key, value) in [
        ("accept_dad", "0"),
        ("accept_ra", "0"),
        ("accept_redirects", "1"),
        ("forwarding", "0"),
    ] {
        let path = format!("/proc/sys/net/ipv6/conf/{veth}/{key}");
        match std::fs::write(&path, value) {
            Ok(()) => {}
            // A kernel without IPv6 has no such files; nothing to set.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CniError::new(Code::Io, format!("write {path}: {e}"))),
        }
    }
    Ok(())
}

async fn remove_stale(host: &Netlink, pod: &Netlink, p: &PodNet) -> Result<()> {
    if let Some(old) = host
        .link_by_name(&p.host_veth)
        .await
        .map_err(|e| netlink("look up host veth", e))?
    {
        host.del_link(old.header.index)
            .await
            .map_err(|e| netlink("remove stale host veth", e))?;
    }
    if let Some(old) = pod
        .link_by_name(&p.ifname)
        .await
        .map_err(|e| netlink("look up pod interface", e))?
    {
        pod.del_link(old.header.index)
            .await
            .map_err(|e| netlink("remove stale pod interface", e))?;
    }
    Ok(())
}

/// The label a host veth carries: the attachment it was made for. The veth name only says
/// which pod, and a pod's sandbox can be recreated while the old one still awaits its DEL.
pub fn owner(container_id: &str, ifname: &str) -> String {
    format!("{container_id}/{ifname}")
}

/// Remove the host side of an attachment: its veth (the pod end goes with it) and the rules
/// for its address. A veth of the same name made for another attachment (a newer sandbox of
/// the same pod) is left alone, and so are the rules when the address is already routed to
/// another pod. A veth without a label (made by upstream's plugin) counts as ours.
///
/// `retire`: ipamd deletes retired veths in the background, so the veth is only brought down
/// and renamed (see `cni_common::naming::RETIRED_ALIAS_PREFIX`); when that fails it is deleted
/// here after all.
pub async fn teardown(
    host: &Netlink,
    host_veth: Option<&str>,
    ip: Option<IpAddr>,
    owner: &str,
    retire: bool,
) -> Result<()> {
    // Best effort that carries on: a failed step does not stop the others, and every failure
    // is reported together, so one stuck rule never leaves the veth or the other rule behind.
    let mut failed: Vec<String> = Vec::new();
    let mut ours = None;
    if let Some(name) = host_veth {
        match host.link_by_name(name).await {
            Ok(Some(l)) => match link_alias(&l) {
                "" => ours = Some(l.header.index),
                a if a == owner => ours = Some(l.header.index),
                other => tracing::info!(
                    veth = name,
                    owner = other,
                    "host veth belongs to another attachment; keeping it"
                ),
            },
            Ok(None) => {}
            Err(e) => failed.push(netlink("look up host veth", e).msg),
        }
    }
    // Whether another pod's route now points at this address. Unknown (the dump failed) is
    // treated as "taken": removing another pod's rules would cut it off.
    let taken_by_other = match ip {
        Some(ip) => match host.routes_like(ip).await {
            Ok(routes) => routes.iter().any(|r| {
                r.table == MAIN_TABLE
                    && r.dst == Some((ip, cni_common::netlink::host_len(ip)))
                    && r.oif.is_some()
                    && r.oif != ours
            }),
            Err(e) => {
                failed.push(netlink("list routes", e).msg);
                true
            }
        },
        None => false,
    };
    if let Some(idx) = ours {
        let retired = retire && {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let alias = cni_common::naming::retired_alias(now, owner);
            let name = cni_common::naming::retired_name(idx);
            match host.retire(idx, &alias, &name).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::info!(error = %e, "host veth not retired; deleting it now");
                    false
                }
            }
        };
        if !retired {
            if let Err(e) = host.del_link(idx).await {
                failed.push(netlink("delete host veth", e).msg);
            }
        }
    }
    if let Some(ip) = ip {
        if taken_by_other {
            tracing::info!(%ip, "address routed to another pod (or routes unreadable); keeping its rules");
        } else {
            match host.rules_like(ip).await {
                Err(e) => failed.push(netlink("list rules", e).msg),
                Ok(rules) => {
                    let host_ip = Some((ip, cni_common::netlink::host_len(ip)));
                    for r in rules {
                        let mine = (r.priority == TO_POD_RULE_PRIORITY && r.dst == host_ip)
                            || (r.priority == FROM_POD_RULE_PRIORITY && r.src == host_ip);
                        if mine {
                            if let Err(e) = host.del_rule(&r).await {
                                failed.push(
                                    netlink(&format!("delete rule for {ip} at {}", r.priority), e)
                                        .msg,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(Code::Netlink, failed.join("; ")))
    }
}

fn check_failed(msg: String) -> CniError {
    CniError::new(Code::CheckFailed, msg)
}

/// CHECK: everything `setup` made is still there.
pub async fn check(host: &Netlink, pod: &Netlink, p: &PodNet) -> Result<()> {
    let hlink = host
        .link_by_name(&p.host_veth)
        .await
        .map_err(|e| netlink("look up host veth", e))?
        .ok_or_else(|| check_failed(format!("host veth {} is missing", p.host_veth)))?;
    let plink = pod
        .link_by_name(&p.ifname)
        .await
        .map_err(|e| netlink("look up pod interface", e))?
        .ok_or_else(|| check_failed(format!("pod interface {} is missing", p.ifname)))?;
    if !link_is_up(&plink) {
        return Err(check_failed(format!("pod interface {} is down", p.ifname)));
    }
    if link_alias(&hlink) != p.owner {
        return Err(check_failed(format!(
            "host veth {} belongs to attachment {:?}, not {}",
            p.host_veth,
            link_alias(&hlink),
            p.owner
        )));
    }
    if !link_is_up(&hlink) {
        return Err(check_failed(format!("host veth {} is down", p.host_veth)));
    }
    let (hidx, pidx) = (hlink.header.index, plink.header.index);

    let len = cni_common::netlink::host_len(p.ip);
    let gw = gateway(p.ip);
    let addrs = pod
        .addrs(pidx)
        .await
        .map_err(|e| netlink("list pod addresses", e))?;
    if !addrs.contains(&(p.ip, len)) {
        return Err(check_failed(format!(
            "pod address {}/{len} is missing on {}",
            p.ip, p.ifname
        )));
    }
    let proutes = pod
        .routes_like(p.ip)
        .await
        .map_err(|e| netlink("list pod routes", e))?;
    // The kernel keeps no scope on IPv6 routes (they all read as universe).
    let has_gw_link = proutes.iter().any(|r| {
        r.dst == Some((gw, len))
            && r.oif == Some(pidx)
            && (p.ip.is_ipv6() || r.scope == RouteScope::Link)
    });
    if !has_gw_link {
        return Err(check_failed(format!(
            "pod route {gw}/{len} scope link is missing"
        )));
    }
    let any: IpAddr = if p.ip.is_ipv6() {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let has_default = proutes.iter().any(|r| {
        r.table == MAIN_TABLE
            && r.dst == Some((any, 0))
            && r.gateway == Some(gw)
            && r.oif == Some(pidx)
    });
    if !has_default {
        return Err(check_failed(format!(
            "pod default route via {gw} is missing"
        )));
    }
    let host_mac = link_mac(&hlink);
    match pod
        .neighbour(pidx, gw)
        .await
        .map_err(|e| netlink("list pod neighbours", e))?
    {
        Some((state, mac)) if state == NeighbourState::Permanent && mac == host_mac => {}
        Some((state, mac)) => {
            return Err(check_failed(format!(
                "pod neighbour {gw} is {state:?} {} instead of permanent {}",
                mac_string(&mac),
                mac_string(&host_mac)
            )))
        }
        None => return Err(check_failed(format!("pod neighbour {gw} is missing"))),
    }

    let hroutes = host
        .routes_like(p.ip)
        .await
        .map_err(|e| netlink("list host routes", e))?;
    if !hroutes
        .iter()
        .any(|r| r.table == MAIN_TABLE && r.dst == Some((p.ip, len)) && r.oif == Some(hidx))
    {
        return Err(check_failed(format!(
            "host route {}/{len} dev {} is missing",
            p.ip, p.host_veth
        )));
    }
    let rules = host
        .rules_like(p.ip)
        .await
        .map_err(|e| netlink("list host rules", e))?;
    if !rules.contains(&p.rule_to_pod()) {
        return Err(check_failed(format!(
            "host rule 'to {} lookup main' at priority {TO_POD_RULE_PRIORITY} is missing",
            p.ip
        )));
    }
    if let Some(r) = p.rule_from_pod() {
        if !rules.contains(&r) {
            return Err(check_failed(format!(
                "host rule 'from {} lookup {}' at priority {FROM_POD_RULE_PRIORITY} is missing",
                p.ip, r.table
            )));
        }
    }
    Ok(())
}
