//! A thin layer over rtnetlink: sockets bound to a namespace, and the few queries and
//! changes the plugin makes. Policy (what to create) lives in `pod.rs`.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
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

    /// Add `ip/prefix`. An IPv6 address skips duplicate address detection: it is a host
    /// address from the node's own prefix on a point-to-point veth, and waiting for DAD would
    /// hold the pod's first packets back by a second or more.
    pub async fn add_addr(&self, index: u32, ip: IpAddr, prefix: u8) -> NlResult<()> {
        let mut req = self.handle.address().add(index, ip, prefix);
        if ip.is_ipv6() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match req.execute().await {
            Err(e) if is(&e, Errno::EEXIST as i32) => Ok(()),
            r => r,
        }
    }

    /// Addresses of either family on `index`.
    pub async fn addrs(&self, index: u32) -> NlResult<Vec<(IpAddr, u8)>> {
        let msgs = cni_common::netlink::link_addresses(&self.handle, index).await?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some((*ip, m.header.prefix_len)),
                    _ => None,
                })
            })
            .collect())
    }

    pub async fn replace_route(&self, route: RouteMessage) -> NlResult<()> {
        self.handle.route().add(route).replace().execute().await
    }

    /// Routes of `ip`'s family.
    pub async fn routes_like(&self, ip: IpAddr) -> NlResult<Vec<Route>> {
        let query = match ip {
            IpAddr::V4(_) => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            IpAddr::V6(_) => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let msgs: Vec<_> = self
            .handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await?;
        Ok(msgs.iter().map(Route::from_msg).collect())
    }

    pub async fn replace_neighbour(&self, index: u32, ip: IpAddr, mac: &[u8]) -> NlResult<()> {
        self.handle
            .neighbours()
            .add(index, ip)
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
        ip: IpAddr,
    ) -> NlResult<Option<(NeighbourState, Vec<u8>)>> {
        let msgs: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(if ip.is_ipv6() {
                AddressFamily::Inet6
            } else {
                AddressFamily::Inet
            })
            .execute()
            .try_collect()
            .await?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.ifindex == index)
            .find(|m| {
                m.attributes.iter().any(|a| match (a, ip) {
                    (
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(d)),
                        IpAddr::V4(ip),
                    ) => *d == ip,
                    (
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(d)),
                        IpAddr::V6(ip),
                    ) => *d == ip,
                    _ => false,
                })
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

    /// Policy rules of `ip`'s family.
    pub async fn rules_like(&self, ip: IpAddr) -> NlResult<Vec<Rule>> {
        cni_common::netlink::rules(&self.handle, ip.is_ipv6()).await
    }

    /// Add a `lookup <table>` rule; a rule already there is fine (idempotent ADD).
    pub async fn add_rule(&self, r: &Rule) -> NlResult<()> {
        cni_common::netlink::add_rule(&self.handle, r).await
    }

    pub async fn del_rule(&self, r: &Rule) -> NlResult<()> {
        cni_common::netlink::del_rule(&self.handle, r).await
    }
}

/// The parts of a route the plugin looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub table: u32,
    pub dst: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
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
                    r.dst = Some(((*d).into(), m.header.destination_prefix_length))
                }
                RouteAttribute::Destination(RouteAddress::Inet6(d)) => {
                    r.dst = Some(((*d).into(), m.header.destination_prefix_length))
                }
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some((*g).into()),
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => r.gateway = Some((*g).into()),
                RouteAttribute::Oif(i) => r.oif = Some(*i),
                _ => {}
            }
        }
        if r.dst.is_none() && m.header.destination_prefix_length == 0 {
            let any: IpAddr = if m.header.address_family == AddressFamily::Inet6 {
                Ipv6Addr::UNSPECIFIED.into()
            } else {
                Ipv4Addr::UNSPECIFIED.into()
            };
            r.dst = Some((any, 0));
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

/// Route to `ip` (a host prefix) out of `index`, scope link, in `table`.
pub fn host_route(ip: IpAddr, index: u32, table: u32) -> RouteMessage {
    match ip {
        IpAddr::V4(v4) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(v4, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .table_id(table)
            .build(),
        IpAddr::V6(v6) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(v6, 128)
            .output_interface(index)
            .scope(RouteScope::Link)
            .table_id(table)
            .build(),
    }
}

/// The default route of `gw`'s family through `gw` on `index`.
pub fn gateway_route(gw: IpAddr, index: u32) -> RouteMessage {
    match gw {
        IpAddr::V4(v4) => RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(v4)
            .output_interface(index)
            .build(),
        IpAddr::V6(v6) => RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(v6)
            .output_interface(index)
            .build(),
    }
}

/// Write `/proc/sys/<path>` values inside the namespace `ns` (the files show the namespace of
/// the thread that opens them), on a throwaway thread as `Netlink::in_netns` does.
pub async fn sysctls_in_netns(ns: &File, writes: Vec<(String, &'static str)>) -> io::Result<()> {
    let ns = ns.try_clone()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let done = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(io::Error::from)
            .and_then(|()| {
                for (path, value) in &writes {
                    std::fs::write(format!("/proc/sys/{path}"), value)
                        .map_err(|e| io::Error::new(e.kind(), format!("/proc/sys/{path}: {e}")))?;
                }
                Ok(())
            });
        let _ = tx.send(done);
    });
    rx.await
        .map_err(|_| io::Error::other("netns thread ended without an answer"))?
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
