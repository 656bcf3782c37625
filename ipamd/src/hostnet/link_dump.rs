//! Link dumps reduced as they are decoded. rtnetlink's handle turns every link of a dump into a
//! full message (every attribute: statistics, per-family configuration, about 20 kB parsed)
//! and its socket task queues the whole dump before the caller reads the first link: on a
//! node with a hundred veths each look left about 3 MB in the allocator of whichever thread
//! decoded it (measured with heaptrack: ipamd's own memory went 3 -> 10 MB while it warmed
//! up). This connection keeps, of each link, only what ipamd reads.
//!
//! It is also stricter than rtnetlink's: the socket task drops a message it cannot decode
//! (logged, not returned), which would make an unreadable link look absent. Here a link is
//! decoded whatever its other attributes hold, and one that cannot be read fails the dump.

use futures::StreamExt;
use netlink_packet_core::{
    DecodeError, Emitable, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable, NlasIterator, ParseableParametrized, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::link::{LinkAttribute, LinkExtentMask, LinkHeader, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, SocketAddr};

// The three link attributes read (linux/if_link.h; kernel ABI, never renumbered). Only these
// are parsed, so an attribute this crate version cannot parse does not hide a link.
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_IFALIAS: u16 = 20;

/// What ipamd reads of a link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkBrief {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub alias: Option<String>,
}

/// The connection's message type: requests go out as rtnetlink messages, links come back
/// reduced.
#[derive(Debug, Clone)]
pub enum Brief {
    Request(RouteNetlinkMessage),
    Link(LinkBrief),
    /// A reply that could not be read, and why.
    Unreadable(String),
}

impl NetlinkSerializable for Brief {
    fn message_type(&self) -> u16 {
        match self {
            Brief::Request(m) => NetlinkSerializable::message_type(m),
            // Replies are never sent.
            Brief::Link(_) | Brief::Unreadable(_) => 0,
        }
    }

    fn buffer_len(&self) -> usize {
        match self {
            Brief::Request(m) => NetlinkSerializable::buffer_len(m),
            Brief::Link(_) | Brief::Unreadable(_) => 0,
        }
    }

    fn serialize(&self, buffer: &mut [u8]) {
        if let Brief::Request(m) = self {
            NetlinkSerializable::serialize(m, buffer)
        }
    }
}

impl NetlinkDeserializable for Brief {
    type Error = DecodeError;

    fn deserialize(_: &NetlinkHeader, payload: &[u8]) -> Result<Brief, DecodeError> {
        Ok(match decode(payload) {
            Ok(l) => Brief::Link(l),
            Err(e) => Brief::Unreadable(e.to_string()),
        })
    }
}

fn decode(payload: &[u8]) -> Result<LinkBrief, DecodeError> {
    let header = LinkHeader::parse(payload)?;
    let mut l = LinkBrief {
        index: header.index,
        ..LinkBrief::default()
    };
    let attrs = payload.get(header.buffer_len()..).unwrap_or_default();
    for nla in NlasIterator::new(attrs) {
        let nla = nla?;
        if ![IFLA_ADDRESS, IFLA_IFNAME, IFLA_IFALIAS].contains(&nla.kind()) {
            continue;
        }
        match LinkAttribute::parse_with_param(&nla, header.interface_family)? {
            LinkAttribute::IfName(n) => l.name = n,
            LinkAttribute::Address(m) => l.mac = m,
            LinkAttribute::IfAlias(a) => l.alias = Some(a),
            _ => {}
        }
    }
    Ok(l)
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("the netlink socket is closed")]
    Closed,
    #[error("the kernel refused the link dump: {0}")]
    Refused(netlink_packet_core::ErrorMessage),
    #[error("a link in the dump cannot be read: {0}")]
    Unreadable(String),
}

/// A netlink socket of its own for link dumps, in ipamd's network namespace.
#[derive(Clone)]
pub struct LinkDumper {
    handle: netlink_proto::ConnectionHandle<Brief>,
    /// The kernel runs one dump at a time on a socket and refuses another meanwhile (EBUSY):
    /// the clones sharing this socket (the sweeper's look at the host, the veth reaper) take
    /// turns.
    turn: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl LinkDumper {
    pub fn new() -> std::io::Result<LinkDumper> {
        let (conn, handle, _) = netlink_proto::new_connection::<Brief>(NETLINK_ROUTE)?;
        tokio::spawn(conn);
        Ok(LinkDumper {
            handle,
            turn: Default::default(),
        })
    }

    /// Every link of the namespace.
    pub async fn links(&self) -> Result<Vec<LinkBrief>, DumpError> {
        let _turn = self.turn.lock().await;
        let mut req = LinkMessage::default();
        // Without statistics: the kernel neither gathers nor sends what is never read.
        req.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let msg = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(Brief::Request(RouteNetlinkMessage::GetLink(req))),
        );
        let mut replies = self
            .handle
            .request(msg, SocketAddr::new(0, 0))
            .map_err(|_| DumpError::Closed)?;
        let mut links = Vec::new();
        while let Some(m) = replies.next().await {
            match m.payload {
                NetlinkPayload::InnerMessage(Brief::Link(l)) => links.push(l),
                NetlinkPayload::InnerMessage(Brief::Unreadable(why)) => {
                    return Err(DumpError::Unreadable(why))
                }
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(DumpError::Refused(e)),
                _ => {}
            }
        }
        Ok(links)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::LinkHeader;

    fn emitted(m: &LinkMessage) -> Vec<u8> {
        let mut b = vec![0; m.buffer_len()];
        m.emit(&mut b);
        b
    }

    #[test]
    fn keeps_index_name_mac_and_alias_only() {
        let mut m = LinkMessage::default();
        m.header = LinkHeader {
            index: 7,
            ..LinkHeader::default()
        };
        m.attributes = vec![
            LinkAttribute::Mtu(9001),
            LinkAttribute::IfName("eni1a2b3c4d5e6".into()),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, 1]),
            LinkAttribute::IfAlias("retired 1700000000".into()),
            LinkAttribute::TxQueueLen(1000),
        ];
        let l = decode(&emitted(&m)).expect("decodes");
        assert_eq!(
            l,
            LinkBrief {
                index: 7,
                name: "eni1a2b3c4d5e6".into(),
                mac: vec![2, 0, 0, 0, 0, 1],
                alias: Some("retired 1700000000".into()),
            }
        );
    }

    #[test]
    fn an_unparsable_attribute_it_does_not_read_is_skipped() {
        let mut m = LinkMessage::default();
        m.header.index = 3;
        m.attributes = vec![LinkAttribute::IfName("eth1".into())];
        let mut b = emitted(&m);
        // IFLA_MTU (4) with a 1-byte value: the crate cannot parse it.
        b.extend_from_slice(&[5, 0, 4, 0, 1, 0, 0, 0]);
        let l = decode(&b).expect("decodes");
        assert_eq!((l.index, l.name.as_str()), (3, "eth1"));
    }

    #[test]
    fn a_link_it_cannot_read_is_an_unreadable_reply_not_a_missing_link() {
        // A truncated header.
        let b = Brief::deserialize(&NetlinkHeader::default(), &[0, 0, 1]).expect("never fails");
        assert!(matches!(b, Brief::Unreadable(_)));
        // A name attribute cut short.
        let mut m = LinkMessage::default();
        m.attributes = vec![LinkAttribute::IfName("eth1".into())];
        let mut b = emitted(&m);
        b.truncate(b.len() - 4);
        assert!(matches!(
            Brief::deserialize(&NetlinkHeader::default(), &b).expect("never fails"),
            Brief::Unreadable(_)
        ));
    }
}
