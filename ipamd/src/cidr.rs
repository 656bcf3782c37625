//! Every CIDR ipamd reads (settings, IMDS, EC2, the node file) goes through here, on `ipnet`:
//! one parser, one set of rules, one spelling for iptables.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::pool::datastore::Prefix;

/// An IPv4 CIDR, or a bare address meaning /32; host bits cleared ("10.0.1.7/16" is
/// 10.0.0.0/16, as the kernel and iptables-save treat it).
pub fn parse_v4(s: &str) -> Option<Ipv4Net> {
    let s = s.trim();
    let net = if s.contains('/') {
        s.parse::<Ipv4Net>().ok()?
    } else {
        Ipv4Net::new(s.parse::<Ipv4Addr>().ok()?, 32).ok()?
    };
    Some(net.trunc())
}

/// As iptables-save prints it: "10.0.0.0/16"; None if not an IPv4 CIDR.
pub fn normalise(s: &str) -> Option<String> {
    parse_v4(s).map(|n| n.to_string())
}

/// A delegated /28: exactly that length, aligned.
pub fn parse_prefix(s: &str) -> Option<Prefix> {
    let n: Ipv4Net = s.trim().parse().ok()?;
    (n.prefix_len() == 28 && n.trunc() == n).then_some(Prefix(n.addr()))
}

/// The subnet's gateway (its first address + 1, as in every VPC) and prefix length.
pub fn gateway_of(subnet: &Ipv4Net) -> Option<(Ipv4Addr, u8)> {
    let n = Some(subnet.trunc()).filter(|n| n.prefix_len() <= 30)?;
    let gw = u32::from(n.network()).checked_add(1)?;
    Some((Ipv4Addr::from(gw), n.prefix_len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_set_of_rules() {
        assert_eq!(normalise("10.0.1.7/16").unwrap(), "10.0.0.0/16");
        assert_eq!(normalise("1.2.3.4").unwrap(), "1.2.3.4/32");
        assert_eq!(normalise(" 0.0.0.0/0 ").unwrap(), "0.0.0.0/0");
        for bad in ["nope", "10.0.0.0/33", "10.0.0/8", "fd00::/8", ""] {
            assert_eq!(normalise(bad), None, "{bad:?}");
        }
        assert_eq!(
            parse_prefix("10.0.1.16/28"),
            Some(Prefix(Ipv4Addr::new(10, 0, 1, 16)))
        );
        assert_eq!(parse_prefix("10.0.1.17/28"), None, "unaligned");
        assert_eq!(parse_prefix("10.0.1.16/27"), None);
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        assert_eq!(
            gateway_of(&net("10.0.64.7/18")),
            Some((Ipv4Addr::new(10, 0, 64, 1), 18))
        );
        assert_eq!(gateway_of(&net("10.0.0.4/31")), None);
    }
}
