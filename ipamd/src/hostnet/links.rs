//! The kernel side of node networking, through rtnetlink: ENI links, their per-ENI route
//! tables and source rules, and the node-wide rules. Every operation converges (replace, or
//! delete what differs), so running it again after a restart changes nothing.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

pub use cni_common::netlink::MAIN_TABLE;

use super::link_dump::{DumpError as LinkDumpError, LinkBrief, LinkDumper};

pub use cni_common::netlink::{
    errno, Rule as NodeRule, ENI_RULE_PRIORITY, EXTERNAL_SERVICE_RULE_PRIORITY,
    FWMARK_RULE_PRIORITY,
};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("netlink {what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("netlink list links: {0}")]
    Dump(#[from] LinkDumpError),
    #[error("no link with MAC {0}")]
    NoLink(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let what = what.into();
    move |source| LinkError::Netlink { what, source }
}

/// What an ENI needs on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniNet {
    pub mac: String,
    pub primary_ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub table: u32,
    pub mtu: u32,
}

pub use crate::cidr::gateway_of;

pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Clones share the one socket (rtnetlink's handle).
#[derive(Clone)]
pub struct Links {
    handle: Handle,
    dumper: LinkDumper,
    /// The kernel runs one dump at a time on a socket and refuses another meanwhile (EBUSY):
    /// the route, rule and address dumps of the clones sharing `handle` take turns.
    dumps: std::sync::Arc<tokio::sync::Mutex<()>>,
}

fn link_mtu(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

impl Links {
    /// A netlink socket in ipamd's own network namespace (the node's).
    pub fn new() -> std::io::Result<Links> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Links {
            handle,
            dumper: LinkDumper::new()?,
            dumps: Default::default(),
        })
    }

    async fn all_links(&self) -> Result<Vec<LinkBrief>, LinkError> {
        Ok(self.dumper.links().await?)
    }

    /// (index, name) of the link with this MAC.
    pub async fn link_by_mac(&self, mac: &str) -> Result<Option<(u32, String)>, LinkError> {
        let mac = mac.to_ascii_lowercase();
        Ok(self
            .all_links()
            .await?
            .into_iter()
            .find(|l| mac_string(&l.mac) == mac)
            .map(|l| (l.index, l.name)))
    }

    async fn link(&self, index: u32) -> Result<LinkMessage, LinkError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl("get link"))?;
        links
            .into_iter()
            .next()
            .ok_or_else(|| LinkError::NoLink(format!("index {index}")))
    }

    /// Every link name and every host route (/32, /128) of the main table, in one look. Any
    /// error is returned as such: the caller must not read a failed look as an empty host.
    pub async fn host_view(&self) -> Result<crate::pool::sweep::HostView, LinkError> {
        let names: std::collections::HashMap<u32, String> = self
            .all_links()
            .await?
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect();
        let mut view = crate::pool::sweep::HostView {
            links: names.values().cloned().collect(),
            ..Default::default()
        };
        // Routes are reduced one by one, not collected: only the main table's host routes are
        // kept. (rtnetlink parses them, but a route message is small.)
        let mut host_route = |r: RouteMessage| {
            if cni_common::netlink::route_table(&r) != MAIN_TABLE {
                return;
            }
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip))
                    if r.header.destination_prefix_length == 32 =>
                {
                    Some(IpAddr::V4(*ip))
                }
                RouteAttribute::Destination(RouteAddress::Inet6(ip))
                    if r.header.destination_prefix_length == 128 =>
                {
                    Some(IpAddr::V6(*ip))
                }
                _ => None,
            });
            if let (Some(ip), Some(oif)) = (dst, oif) {
                let name = names.get(&oif).cloned().unwrap_or_default();
                view.host_routes.insert(ip, name);
            }
        };
        let _turn = self.dumps.lock().await;
        let v4 = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut v4 = std::pin::pin!(v4);
        while let Some(r) = v4.try_next().await.map_err(nl("list routes"))? {
            host_route(r);
        }
        let v6 = self
            .handle
            .route()
            .get(RouteMessageBuilder::<std::net::Ipv6Addr>::new().build())
            .execute();
        let mut v6 = std::pin::pin!(v6);
        while let Some(r) = v6.try_next().await.map_err(nl("list IPv6 routes"))? {
            host_route(r);
        }
        Ok(view)
    }

    /// Delete host veths the plugin retired at least `grace_secs` ago (the runtime's
    /// namespace teardown usually takes them first). Returns the names deleted; a link that
    /// vanished meanwhile is not an error.
    pub async fn reap_retired(
        &self,
        now_secs: u64,
        grace_secs: u64,
    ) -> Result<Vec<String>, LinkError> {
        let mut gone = Vec::new();
        for l in self.all_links().await? {
            let Some(at) = l.alias.as_deref().and_then(cni_common::naming::retired_at) else {
                continue;
            };
            if now_secs.saturating_sub(at) < grace_secs {
                continue;
            }
            match self.handle.link().del(l.index).execute().await {
                Ok(()) => gone.push(l.name),
                Err(e) if errno(&e) == Some(libc::ENODEV) => {}
                Err(e) => return Err(nl("delete a retired host veth")(e)),
            }
        }
        Ok(gone)
    }

    /// MTU and up, only if they differ.
    pub async fn set_mtu_up(&self, index: u32, mtu: u32) -> Result<(), LinkError> {
        let l = self.link(index).await?;
        let up = l.header.flags.contains(LinkFlags::Up);
        if link_mtu(&l) == Some(mtu) && up {
            return Ok(());
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(nl(format!("set mtu {mtu} and up on link {index}")))
    }

    /// Make `ip/len` the link's only global IPv4 address, without a subnet route in main.
    pub async fn set_only_address(
        &self,
        index: u32,
        ip: Ipv4Addr,
        len: u8,
    ) -> Result<(), LinkError> {
        let msgs = {
            let _turn = self.dumps.lock().await;
            cni_common::netlink::link_addresses(&self.handle, index)
                .await
                .map_err(nl("list addresses"))?
        };
        let mut present = false;
        for m in msgs.into_iter().filter(|m| {
            m.header.index == index
                && m.header.family == AddressFamily::Inet
                && m.header.scope == AddressScope::Universe
        }) {
            let addr = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(v)) => Some(*v),
                _ => None,
            });
            let noprefix = m.attributes.iter().any(|a| {
                matches!(a, AddressAttribute::Flags(f) if f.contains(AddressFlags::Noprefixroute))
            });
            if addr == Some(ip) && m.header.prefix_len == len && noprefix {
                present = true;
                continue;
            }
            self.handle
                .address()
                .del(m)
                .execute()
                .await
                .map_err(nl("delete stale address"))?;
        }
        if present {
            return Ok(());
        }
        let mut req = self.handle.address().add(index, IpAddr::V4(ip), len);
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Noprefixroute));
        match req.execute().await {
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            r => r.map_err(nl(format!("add {ip}/{len} noprefixroute"))),
        }
    }

    /// `<gw>/32 dev <link> scope link` and `default via <gw> dev <link>` in `table`.
    pub async fn set_table(&self, index: u32, gw: Ipv4Addr, table: u32) -> Result<(), LinkError> {
        let host = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(gw, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .table_id(table)
            .build();
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gw)
            .output_interface(index)
            .table_id(table)
            .build();
        for r in [host, default] {
            self.handle
                .route()
                .add(r)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("route in table {table}")))?;
        }
        Ok(())
    }

    /// Every route in `table` goes (ENI removed).
    pub async fn flush_table(&self, table: u32) -> Result<(), LinkError> {
        let turn = self.dumps.lock().await;
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .table_id(table)
                    .build(),
            )
            .execute()
            // The kernel does not filter a dump by table unless asked strictly: every route
            // of the node comes back, and only this table's are kept.
            .try_filter(|r| std::future::ready(cni_common::netlink::route_table(r) == table))
            .try_collect()
            .await
            .map_err(nl("list routes"))?;
        drop(turn);
        for r in routes {
            match self.handle.route().del(r).execute().await {
                Err(e) if errno(&e) == Some(libc::ESRCH) => {}
                r => r.map_err(nl(format!("flush table {table}")))?,
            }
        }
        Ok(())
    }

    pub async fn rules(&self) -> Result<Vec<NodeRule>, LinkError> {
        let _turn = self.dumps.lock().await;
        cni_common::netlink::rules_v4(&self.handle)
            .await
            .map_err(nl("list rules"))
    }

    pub async fn add_rule(&self, r: &NodeRule) -> Result<(), LinkError> {
        cni_common::netlink::add_rule(&self.handle, r)
            .await
            .map_err(nl(format!("add rule {r:?}")))
    }

    pub async fn del_rule(&self, r: &NodeRule) -> Result<(), LinkError> {
        cni_common::netlink::del_rule(&self.handle, r)
            .await
            .map_err(nl("delete rule"))
    }

    /// Make the rules at `priority` exactly `want` (those at other priorities are not ours).
    pub async fn converge_rules(&self, priority: u32, want: &[NodeRule]) -> Result<(), LinkError> {
        let have: Vec<NodeRule> = self
            .rules()
            .await?
            .into_iter()
            .filter(|r| r.priority == priority)
            .collect();
        let mut kept = Vec::new();
        for r in &have {
            if want.contains(r) && !kept.contains(r) {
                kept.push(*r);
            } else {
                self.del_rule(r).await?;
            }
        }
        for r in want.iter().filter(|r| !kept.contains(r)) {
            self.add_rule(r).await?;
        }
        Ok(())
    }

    /// Configure a secondary ENI's link, table and rule.
    pub async fn setup_eni(&self, e: &EniNet) -> Result<String, LinkError> {
        let (index, name) = self
            .link_by_mac(&e.mac)
            .await?
            .ok_or_else(|| LinkError::NoLink(e.mac.clone()))?;
        self.set_mtu_up(index, e.mtu).await?;
        self.set_only_address(index, e.primary_ip, e.prefix_len)
            .await?;
        self.set_table(index, e.gateway, e.table).await?;
        // Replies to traffic for the ENI's own address leave by the ENI.
        let rule = NodeRule {
            priority: ENI_RULE_PRIORITY,
            table: e.table,
            dst: None,
            src: Some((IpAddr::V4(e.primary_ip), 32)),
            fwmark: None,
        };
        for r in self.rules().await? {
            if r.priority == ENI_RULE_PRIORITY && r.src == rule.src && r != rule {
                self.del_rule(&r).await?;
            }
        }
        self.add_rule(&rule).await?;
        // Loose reverse-path filtering: the router's replies to pods come in by this ENI while
        // the main table would route them elsewhere.
        set_rp_filter(&name, 2)?;
        Ok(name)
    }

    /// Undo `setup_eni`: the ENI's rule and table (the link goes with the detach).
    pub async fn teardown_eni(&self, primary_ip: Ipv4Addr, table: u32) -> Result<(), LinkError> {
        for r in self.rules().await? {
            if r.priority == ENI_RULE_PRIORITY && r.src == Some((IpAddr::V4(primary_ip), 32)) {
                self.del_rule(&r).await?;
            }
        }
        self.flush_table(table).await
    }
}

pub fn set_rp_filter(ifname: &str, value: u8) -> std::io::Result<()> {
    std::fs::write(
        format!("/proc/sys/net/ipv4/conf/{ifname}/rp_filter"),
        value.to_string(),
    )
}
