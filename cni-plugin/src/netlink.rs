//! A thin layer over rtnetlink: sockets bound to a namespace, and the few queries and
//! changes the plugin makes. Policy (what to create) lives in `pod.rs`.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage,
};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use netlink_packet_route::AddressFamily;
use nix::errno::Errno;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

pub use cni_common::netlink::{errno, Rule, MAIN_TABLE};

pub type NlResult<T> = Result<T, rtnetlink::Error>;

fn is(e: &rtnetlink::Error, code: i32) -> bool {
    errno(e) == Some(code)
}

/// A netlink socket bound to one network namespace.
pub struct Netlink {
    pub handle: Handle,
}

impl Netlink {
    /// A socket in the namespace this process runs in.
    pub fn current() -> io::Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// A socket in the namespace `ns`. The switch happens on a throwaway thread: a socket stays
    /// bound to the namespace it was opened in, while a runtime thread must never change its own.
    /// The caller's task goes on meanwhile (ADD opens the pod's socket while ipamd assigns).
    pub async fn in_netns(ns: &File) -> io::Result<Netlink> {
        let ns = ns.try_clone()?;
        let rt = tokio::runtime::Handle::current();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let opened = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)
                .and_then(|()| {
                    let _guard = rt.enter();
                    rtnetlink::new_connection()
                });
            let _ = tx.send(opened);
        });
        let (conn, handle, _) = rx
            .await
            .map_err(|_| io::Error::other("netns thread ended without a socket"))??;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub async fn link_by_name(&self, name: &str) -> NlResult<Option<LinkMessage>> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(l) => Ok(l),
            Err(e) if is(&e, Errno::ENODEV as i32) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn del_link(&self, index: u32) -> NlResult<()> {
        match self.handle.link().del(index).execute().await {
            Err(e) if is(&e, Errno::ENODEV as i32) => Ok(()),
            r => r,
        }
    }

    /// Create a veth pair with each end directly in its final namespace: create-then-move
    /// serialises concurrent pod creation in the kernel.
    pub async fn add_veth_into(
        &self,
        host: &str,
        peer: &str,
        mtu: u32,
        peer_ns: &File,
    ) -> NlResult<()> {
        use std::os::fd::AsRawFd;
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .mtu(mtu)
            .setns_by_fd(peer_ns.as_raw_fd())
            .build();
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host.to_string())
            .mtu(mtu)
            .address(cni_common::naming::host_veth_mac(host).to_vec())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.handle.link().add(msg).execute().await
    }

    /// Bring a link up and label it with `alias` in the same request.
    pub async fn set_up_with_alias(&self, index: u32, alias: &str) -> NlResult<()> {
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .up()
                    .alias(alias.to_string())
                    .build(),
            )
            .execute()
            .await
    }

    /// Down and labelled (one request), then renamed: a down link can be renamed, an up one
    /// cannot. Going down also takes the link's routes away.
    pub async fn retire(&self, index: u32, alias: &str, name: &str) -> NlResult<()> {
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .down()
                    .alias(alias.to_string())
                    .build(),
            )
            .execute()
            .await?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .name(name.to_string())
                    .build(),
            )
            .execute()
            .await
    }

    pub async fn set_up(&self, index: u32) -> NlResult<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
    }

    pub async fn add_addr(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> NlResult<()> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(ip), prefix)
            .execute()
            .await
        {
            Err(e) if is(&e, Errno::EEXIST as i32) => Ok(()),
            r => r,
        }
    }

    pub async fn addrs_v4(&self, index: u32) -> NlResult<Vec<(Ipv4Addr, u8)>> {
        let msgs = cni_common::netlink::link_addresses(&self.handle, index).await?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V4(v4)) => Some((*v4, m.header.prefix_len)),
                    _ => None,
                })
            })
            .collect())
    }

    pub async fn replace_route(&self, route: RouteMessage) -> NlResult<()> {
        self.handle.route().add(route).replace().execute().await
    }

    pub async fn routes_v4(&self) -> NlResult<Vec<Route>> {
        let msgs: Vec<_> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await?;
        Ok(msgs.iter().map(Route::from_msg).collect())
    }

    pub async fn replace_neighbour(&self, index: u32, ip: Ipv4Addr, mac: &[u8]) -> NlResult<()> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
    }

    /// (state, lladdr) of the neighbour entry for `ip` on `index`.
    pub async fn neighbour(
        &self,
        index: u32,
        ip: Ipv4Addr,
    ) -> NlResult<Option<(NeighbourState, Vec<u8>)>> {
        let msgs: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.ifindex == index)
            .find(|m| {
                m.attributes
                    .iter()
                    .any(|a| matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) if *d == ip))
            })
            .map(|m| {
                let mac = m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        NeighbourAttribute::LinkLayerAddress(l) => Some(l.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                (m.header.state, mac)
            }))
    }

    pub async fn rules_v4(&self) -> NlResult<Vec<Rule>> {
        cni_common::netlink::rules_v4(&self.handle).await
    }

    /// Add a `lookup <table>` rule; a rule already there is fine (idempotent ADD).
    pub async fn add_rule(&self, r: &Rule) -> NlResult<()> {
        cni_common::netlink::add_rule(&self.handle, r).await
    }

    pub async fn del_rule(&self, r: &Rule) -> NlResult<()> {
        cni_common::netlink::del_rule(&self.handle, r).await
    }
}

/// The parts of an IPv4 route the plugin looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub table: u32,
    pub dst: Option<(Ipv4Addr, u8)>,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub scope: RouteScope,
}

impl Route {
    fn from_msg(m: &RouteMessage) -> Route {
        let mut r = Route {
            table: m.header.table as u32,
            dst: None,
            gateway: None,
            oif: None,
            scope: m.header.scope,
        };
        for a in &m.attributes {
            match a {
                RouteAttribute::Table(t) => r.table = *t,
                RouteAttribute::Destination(RouteAddress::Inet(d)) => {
                    r.dst = Some((*d, m.header.destination_prefix_length))
                }
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(*g),
                RouteAttribute::Oif(i) => r.oif = Some(*i),
                _ => {}
            }
        }
        if r.dst.is_none() && m.header.destination_prefix_length == 0 {
            r.dst = Some((Ipv4Addr::UNSPECIFIED, 0));
        }
        r
    }
}

pub fn link_mac(l: &LinkMessage) -> Vec<u8> {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(m) => Some(m.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

pub fn link_alias(l: &LinkMessage) -> &str {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfAlias(s) => Some(s.as_str()),
            _ => None,
        })
        .unwrap_or("")
}

pub fn link_is_up(l: &LinkMessage) -> bool {
    l.header.flags.contains(LinkFlags::Up)
}

pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Route to `ip/32` out of `index`, scope link, in `table`.
pub fn host_route(ip: Ipv4Addr, index: u32, table: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .table_id(table)
        .build()
}

pub fn gateway_route(gw: Ipv4Addr, index: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gw)
        .output_interface(index)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_formats() {
        assert_eq!(
            mac_string(&[0xaa, 0x01, 0, 0xff, 0x10, 0x2]),
            "aa:01:00:ff:10:02"
        );
    }
}
