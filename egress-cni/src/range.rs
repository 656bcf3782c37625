//! The address range egress addresses come from, with host-local's rules: the gateway is the
//! subnet's first address unless given, allocation runs from `rangeStart` (default: the first
//! address after the network's) to `rangeEnd` (default: the last, or the one before the
//! broadcast address for IPv4), and resumes after the last address handed out so that a
//! crash-looping pod does not get the same address back until the range has gone round.
//! Pure: no I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("subnet {0} is too small to allocate from (at most /30 for IPv4, /126 for IPv6)")]
    TooSmall(IpNet),
    #[error("subnet {subnet} has host bits set: its network address is {network}")]
    HostBits { subnet: IpNet, network: IpAddr },
    #[error("{what} {ip} is not in subnet {subnet}")]
    Outside {
        what: &'static str,
        ip: IpAddr,
        subnet: IpNet,
    },
    #[error("rangeStart {start} is after rangeEnd {end}")]
    Inverted { start: IpAddr, end: IpAddr },
}

/// One allocatable range of a subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    subnet: IpNet,
    start: IpAddr,
    end: IpAddr,
    gateway: IpAddr,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// `v` as an address of `like`'s family; `v` always comes from arithmetic inside a subnet of
/// that family, so it fits.
fn from_u128(v: u128, like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

impl Range {
    /// The range of `subnet`, with host-local's optional `rangeStart`, `rangeEnd` and `gateway`.
    pub fn new(
        subnet: IpNet,
        start: Option<IpAddr>,
        end: Option<IpAddr>,
        gateway: Option<IpAddr>,
    ) -> Result<Range, RangeError> {
        if subnet.prefix_len() + 2 > subnet.max_prefix_len() {
            return Err(RangeError::TooSmall(subnet));
        }
        if subnet.addr() != subnet.network() {
            return Err(RangeError::HostBits {
                subnet,
                network: subnet.network(),
            });
        }
        let net = to_u128(subnet.network());
        let first = from_u128(net + 1, subnet.addr());
        let last = match subnet {
            IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.broadcast()) - 1)),
            IpNet::V6(n) => IpAddr::V6(n.broadcast()),
        };
        let inside = |what: &'static str, ip: Option<IpAddr>, default: IpAddr| match ip {
            None => Ok(default),
            Some(ip) if subnet.contains(&ip) => Ok(ip),
            Some(ip) => Err(RangeError::Outside { what, ip, subnet }),
        };
        let gateway = inside("gateway", gateway, first)?;
        let start = inside("rangeStart", start, first)?;
        let end = inside("rangeEnd", end, last)?;
        if to_u128(start) > to_u128(end) {
            return Err(RangeError::Inverted { start, end });
        }
        Ok(Range {
            subnet,
            start,
            end,
            gateway,
        })
    }

    pub fn subnet(&self) -> IpNet {
        self.subnet
    }

    pub fn gateway(&self) -> IpAddr {
        self.gateway
    }

    pub fn is_ipv4(&self) -> bool {
        self.subnet.addr().is_ipv4()
    }

    /// Inside `rangeStart..=rangeEnd`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.is_ipv4()
            && (to_u128(self.start)..=to_u128(self.end)).contains(&to_u128(ip))
    }

    /// An address a pod may have: in the range, and neither the gateway nor the network
    /// address nor (IPv4) the broadcast address, even when `rangeStart`/`rangeEnd` include them.
    pub fn allocatable(&self, ip: IpAddr) -> bool {
        if !self.contains(ip) || ip == self.gateway || ip == self.subnet.network() {
            return false;
        }
        !matches!(self.subnet, IpNet::V4(n) if ip == IpAddr::V4(n.broadcast()))
    }

    /// Number of addresses in `rangeStart..=rangeEnd`. Never 0, and never overflows: the start
    /// is at least the network address plus one.
    fn len(&self) -> u128 {
        to_u128(self.end) - to_u128(self.start) + 1
    }

    /// Addresses to try, in host-local's order: from the one after `last` (the last address
    /// handed out, when it is in the range) round to `last` itself, else from `rangeStart`.
    /// Only allocatable addresses; lazy, as an IPv6 range can be vast.
    pub fn candidates(&self, last: Option<IpAddr>) -> impl Iterator<Item = IpAddr> + '_ {
        let n = self.len();
        let start = to_u128(self.start);
        let offset = match last {
            Some(l) if self.contains(l) => (to_u128(l) - start + 1) % n,
            _ => 0,
        };
        (0..n)
            .map(move |i| {
                // (offset + i) mod n without overflowing near 2^128.
                let k = if i < n - offset {
                    offset + i
                } else {
                    i - (n - offset)
                };
                from_u128(start + k, self.start)
            })
            .filter(move |ip| self.allocatable(*ip))
    }

    /// How many addresses the range can hand out at most (for messages).
    pub fn capacity(&self) -> u128 {
        let mut reserved: Vec<IpAddr> = [
            Some(self.gateway),
            Some(self.subnet.network()),
            self.broadcast(),
        ]
        .into_iter()
        .flatten()
        .filter(|ip| self.contains(*ip))
        .collect();
        reserved.sort();
        reserved.dedup();
        self.len() - reserved.len() as u128
    }

    fn broadcast(&self) -> Option<IpAddr> {
        match self.subnet {
            IpNet::V4(n) => Some(IpAddr::V4(n.broadcast())),
            IpNet::V6(_) => None,
        }
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn range(s: &str) -> Range {
        Range::new(s.parse().unwrap(), None, None, None).unwrap()
    }

    #[test]
    fn upstream_v4_range() {
        let r = range("169.254.172.0/22");
        assert_eq!(r.gateway(), ip("169.254.172.1"));
        assert_eq!(r.to_string(), "169.254.172.1-169.254.175.254");
        let all: Vec<IpAddr> = r.candidates(None).collect();
        assert_eq!(all.first(), Some(&ip("169.254.172.2")));
        assert_eq!(all.last(), Some(&ip("169.254.175.254")));
        assert_eq!(all.len(), 1021);
        assert_eq!(r.capacity(), 1021);
        assert!(!r.allocatable(ip("169.254.175.255")));
        assert!(!r.allocatable(ip("169.254.172.0")));
        assert!(!r.allocatable(ip("169.254.172.1")));
        assert!(!r.allocatable(ip("fd00::ac:2")));
    }

    #[test]
    fn upstream_v6_range() {
        // Written as upstream writes it: "00" as the last group.
        let r = range("fd00::ac:00/118");
        assert_eq!(r.gateway(), ip("fd00::ac:1"));
        let all: Vec<IpAddr> = r.candidates(None).collect();
        assert_eq!(all.first(), Some(&ip("fd00::ac:2")));
        // No broadcast address in IPv6: the last one is allocatable.
        assert_eq!(all.last(), Some(&ip("fd00::ac:3ff")));
        assert_eq!(all.len(), 1022);
        assert_eq!(r.capacity(), 1022);
    }

    #[test]
    fn resumes_after_the_last_reserved_and_wraps() {
        let r = range("10.0.0.0/29"); // .1 gateway, .2-.6 allocatable, .7 broadcast
        let from = |last: Option<&str>| -> Vec<String> {
            r.candidates(last.map(ip)).map(|i| i.to_string()).collect()
        };
        assert_eq!(
            from(None),
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
        );
        assert_eq!(
            from(Some("10.0.0.4")),
            ["10.0.0.5", "10.0.0.6", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
        );
        assert_eq!(
            from(Some("10.0.0.6")),
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
        );
        // A last address outside the range (the range changed) starts from the beginning.
        assert_eq!(from(Some("192.168.0.1"))[0], "10.0.0.2");
    }

    #[test]
    fn explicit_bounds_and_gateway() {
        let r = Range::new(
            "10.0.0.0/24".parse().unwrap(),
            Some(ip("10.0.0.10")),
            Some(ip("10.0.0.12")),
            Some(ip("10.0.0.11")),
        )
        .unwrap();
        let all: Vec<String> = r.candidates(None).map(|i| i.to_string()).collect();
        assert_eq!(all, ["10.0.0.10", "10.0.0.12"]);
        // Bounds that include the network and broadcast addresses never hand them out.
        let r = Range::new(
            "10.0.0.0/30".parse().unwrap(),
            Some(ip("10.0.0.0")),
            Some(ip("10.0.0.3")),
            None,
        )
        .unwrap();
        let all: Vec<String> = r.candidates(None).map(|i| i.to_string()).collect();
        assert_eq!(all, ["10.0.0.2"]);
    }

    #[test]
    fn refuses_what_host_local_refuses() {
        let new = |s: &str, a: Option<&str>, b: Option<&str>, g: Option<&str>| {
            Range::new(s.parse().unwrap(), a.map(ip), b.map(ip), g.map(ip))
        };
        assert!(matches!(
            new("10.0.0.0/31", None, None, None),
            Err(RangeError::TooSmall(_))
        ));
        assert!(matches!(
            new("fd00::/127", None, None, None),
            Err(RangeError::TooSmall(_))
        ));
        let e = new("169.254.172.5/22", None, None, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "subnet 169.254.172.5/22 has host bits set: its network address is 169.254.172.0"
        );
        assert!(matches!(
            new("10.0.0.0/24", Some("10.0.1.1"), None, None),
            Err(RangeError::Outside { .. })
        ));
        assert!(matches!(
            new("10.0.0.0/24", None, None, Some("10.1.0.1")),
            Err(RangeError::Outside { .. })
        ));
        assert!(matches!(
            new("10.0.0.0/24", Some("10.0.0.9"), Some("10.0.0.8"), None),
            Err(RangeError::Inverted { .. })
        ));
    }

    #[test]
    fn vast_ranges_are_lazy_and_do_not_overflow() {
        let r = range("::/0");
        let last = ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe");
        let first: Vec<IpAddr> = r.candidates(Some(last)).take(3).collect();
        assert_eq!(
            first,
            [
                ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
                ip("::2"),
                ip("::3")
            ]
        );
    }

    proptest::proptest! {
        /// Every candidate is allocatable, none repeats, and the whole range comes round.
        #[test]
        fn candidates_cover_the_range_once(prefix in 22u8..=30, base in proptest::prelude::any::<u32>(), last in proptest::prelude::any::<u32>()) {
            let net = ipnet::Ipv4Net::new(Ipv4Addr::from(base), prefix).unwrap().trunc();
            let r = Range::new(IpNet::V4(net), None, None, None).unwrap();
            let last = Ipv4Addr::from(u32::from(net.network()) | (last & !u32::from(net.netmask())));
            let all: Vec<IpAddr> = r.candidates(Some(IpAddr::V4(last))).collect();
            let set: std::collections::HashSet<_> = all.iter().collect();
            proptest::prop_assert_eq!(set.len(), all.len());
            proptest::prop_assert_eq!(all.len() as u128, r.capacity());
            proptest::prop_assert!(all.iter().all(|i| r.allocatable(*i)));
        }
    }
}
