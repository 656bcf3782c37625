//! What both binaries do to policy routing, and the numbers they must agree on: rule
//! priorities and route tables (upstream's values, so a node switched from upstream keeps its
//! layout), and the rule add/delete/list calls over rtnetlink.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::route::{RouteAttribute, RouteMessage};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, IpVersion};

/// The kernel's main routing table.
pub const MAIN_TABLE: u32 = 254;

/// `to <pod IP> lookup main`: traffic for a pod stays on the node (plugin).
pub const TO_POD_RULE_PRIORITY: u32 = 512;
/// `fwmark <mark>/<mark> lookup main`: replies to connections that came in by the primary ENI
/// leave by it (ipamd, upstream's hostRulePriority).
pub const FWMARK_RULE_PRIORITY: u32 = 1024;
/// `to <cidr> lookup main` for each AWS_EXTERNAL_SERVICE_CIDRS entry (ipamd).
pub const EXTERNAL_SERVICE_RULE_PRIORITY: u32 = 1535;
/// `from <pod IP> lookup <ENI table>`: a pod on a secondary ENI leaves by that ENI (plugin).
pub const FROM_POD_RULE_PRIORITY: u32 = 1536;
/// `from <ENI primary IP> lookup <ENI table>` (ipamd, upstream's FromPrimaryIPofENIRulePriority).
pub const ENI_RULE_PRIORITY: u32 = 32765;

/// Upstream's table for the ENI at `device_number`: device + 1; the primary ENI (device 0)
/// routes through main.
pub fn route_table_for_device(device_number: u32) -> u32 {
    if device_number == 0 {
        MAIN_TABLE
    } else {
        device_number + 1
    }
}

/// A `lookup <table>` policy rule of either family: IPv6 when its source or destination is
/// (a rule with neither, such as the fwmark one, is IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    pub priority: u32,
    pub table: u32,
    pub dst: Option<(IpAddr, u8)>,
    pub src: Option<(IpAddr, u8)>,
    pub fwmark: Option<(u32, u32)>,
}

/// The host prefix length of `ip`'s family: 32 or 128.
pub fn host_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

impl Rule {
    /// `to <ip>` or `from <ip>` (a host prefix) at `priority`.
    pub fn host(priority: u32, table: u32, dst: Option<IpAddr>, src: Option<IpAddr>) -> Rule {
        Rule {
            priority,
            table,
            dst: dst.map(|d| (d, host_len(d))),
            src: src.map(|s| (s, host_len(s))),
            fwmark: None,
        }
    }

    pub fn is_v6(&self) -> bool {
        self.dst.or(self.src).is_some_and(|(ip, _)| ip.is_ipv6())
    }

    fn from_msg(m: &RuleMessage) -> Rule {
        let mut r = Rule {
            priority: 0,
            table: m.header.table as u32,
            dst: None,
            src: None,
            fwmark: None,
        };
        let (mut mark, mut mask) = (None, None);
        for a in &m.attributes {
            match a {
                RuleAttribute::Priority(p) => r.priority = *p,
                RuleAttribute::Table(t) => r.table = *t,
                RuleAttribute::Source(s) => r.src = Some((*s, m.header.src_len)),
                RuleAttribute::Destination(d) => r.dst = Some((*d, m.header.dst_len)),
                RuleAttribute::FwMark(v) => mark = Some(*v),
                RuleAttribute::FwMask(v) => mask = Some(*v),
                _ => {}
            }
        }
        if let Some(mark) = mark {
            r.fwmark = Some((mark, mask.unwrap_or(u32::MAX)));
        }
        r
    }
}

/// The table a route is in: the attribute when present (tables above 255 only fit there).
pub fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table as u32)
}

/// The addresses on link `index` (the kernel's filter is a hint: checked again here).
pub async fn link_addresses(
    handle: &Handle,
    index: u32,
) -> Result<Vec<AddressMessage>, rtnetlink::Error> {
    let msgs: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await?;
    Ok(msgs
        .into_iter()
        .filter(|m| m.header.index == index)
        .collect())
}

/// Positive errno of a netlink failure, if it was one.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Every IPv4 policy rule.
pub async fn rules_v4(handle: &Handle) -> Result<Vec<Rule>, rtnetlink::Error> {
    rules(handle, false).await
}

/// Every policy rule of one family (`v6`: IPv6).
pub async fn rules(handle: &Handle, v6: bool) -> Result<Vec<Rule>, rtnetlink::Error> {
    // Reduced as each message arrives: a node has a rule or two per pod.
    handle
        .rule()
        .get(if v6 { IpVersion::V6 } else { IpVersion::V4 })
        .execute()
        .map_ok(|m| Rule::from_msg(&m))
        .try_collect()
        .await
}

/// Add a rule; one already there is fine (both binaries converge, and may run again).
pub async fn add_rule(handle: &Handle, r: &Rule) -> Result<(), rtnetlink::Error> {
    // The action must be set: the kernel accepts a rule without one, then fails every lookup
    // through it with EINVAL.
    let mut req = handle
        .rule()
        .add()
        .action(RuleAction::ToTable)
        .table_id(r.table)
        .priority(r.priority);
    let m = req.message_mut();
    m.header.family = if r.is_v6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    if let Some((ip, len)) = r.dst {
        m.header.dst_len = len;
        m.attributes.push(RuleAttribute::Destination(ip));
    }
    if let Some((ip, len)) = r.src {
        m.header.src_len = len;
        m.attributes.push(RuleAttribute::Source(ip));
    }
    if let Some((mark, mask)) = r.fwmark {
        req.message_mut()
            .attributes
            .push(RuleAttribute::FwMark(mark));
        req.message_mut()
            .attributes
            .push(RuleAttribute::FwMask(mask));
    }
    match req.execute().await {
        Err(e) if errno(&e) == Some(nix::libc::EEXIST) => Ok(()),
        r => r,
    }
}

/// Delete a rule; one already gone is fine.
pub async fn del_rule(handle: &Handle, r: &Rule) -> Result<(), rtnetlink::Error> {
    let mut msg = RuleMessage::default();
    msg.header.family = if r.is_v6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    msg.header.action = RuleAction::ToTable;
    msg.attributes.push(RuleAttribute::Priority(r.priority));
    msg.attributes.push(RuleAttribute::Table(r.table));
    if let Some((ip, len)) = r.dst {
        msg.header.dst_len = len;
        msg.attributes.push(RuleAttribute::Destination(ip));
    }
    if let Some((ip, len)) = r.src {
        msg.header.src_len = len;
        msg.attributes.push(RuleAttribute::Source(ip));
    }
    if let Some((mark, mask)) = r.fwmark {
        msg.attributes.push(RuleAttribute::FwMark(mark));
        msg.attributes.push(RuleAttribute::FwMask(mask));
    }
    match handle.rule().del(msg).execute().await {
        Err(e) if errno(&e) == Some(nix::libc::ENOENT) => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_as_upstream() {
        assert_eq!(route_table_for_device(0), MAIN_TABLE);
        assert_eq!(route_table_for_device(1), 2);
        assert_eq!(route_table_for_device(14), 15);
    }
}
