//! The node's address pool: ENIs, their addresses, and which pod holds which.
//!
//! Pure state, no I/O and no clock of its own (callers pass `now`), so it is tested without
//! root and property-checked. Assign and release are O(1): free addresses sit in a FIFO queue
//! and released ones in a cooldown queue ordered by release time (the cooldown is the same for
//! all, so release order is expiry order). An address leaves the queues lazily: a queue entry
//! whose address is no longer in that state (its ENI went away, say) is skipped when popped.
//!
//! Both families go through the same states and queues. An IPv6 /80 holds 2^48 addresses, so
//! its addresses exist here only once handed out: a cursor per /80 yields fresh ones after the
//! free queue (addresses back from cooldown) is empty.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

pub use cni_common::netlink::MAIN_TABLE;

/// An allocation's identity: the CNI triple.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub network_name: String,
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub key: Key,
    pub ip: IpAddr,
    pub eni_id: String,
    pub device_number: u32,
    pub route_table: u32,
    pub pod: PodMeta,
    pub allocated_at: SystemTime,
}

/// An IPv4 /28 delegated to an ENI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix(pub Ipv4Addr);

impl Prefix {
    pub fn addresses(self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.0) & !0xf;
        (0..16).map(move |i| Ipv4Addr::from(base + i))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eni {
    pub id: String,
    pub device_number: u32,
    pub primary: bool,
    pub mac: String,
    /// e.g. "10.0.1.0/24".
    pub subnet_cidr: ipnet::Ipv4Net,
    /// EC2's id of that subnet (empty where nothing said it: a node file without one).
    pub subnet_id: String,
    /// The ENI's own address; never handed to a pod.
    pub primary_ip: Ipv4Addr,
    pub ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Prefix>,
    /// The ENI's own IPv6 address (IPv6 clusters); never handed to a pod.
    pub primary_ipv6: Option<Ipv6Addr>,
    /// IPv6 /80 prefixes (IPv6 clusters: one, on the primary ENI).
    pub ipv6_prefixes: Vec<ipnet::Ipv6Net>,
    pub attached_at: SystemTime,
}

impl Eni {
    /// Route table id: main for the primary ENI, device number + 1 otherwise (as upstream).
    pub fn route_table(&self) -> u32 {
        if self.primary {
            MAIN_TABLE
        } else {
            cni_common::netlink::route_table_for_device(self.device_number)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddrState {
    Free,
    Assigned,
    Cooldown(SystemTime),
}

/// Fresh addresses of one IPv6 prefix not handed out yet: offsets `next..end` of `prefix`.
#[derive(Debug, Clone)]
struct V6Cursor {
    eni: String,
    prefix: ipnet::Ipv6Net,
    next: u128,
    end: u128,
}

impl V6Cursor {
    fn new(eni: &str, prefix: ipnet::Ipv6Net) -> V6Cursor {
        let host_bits = 128 - u32::from(prefix.prefix_len());
        let end = if host_bits >= 128 {
            u128::MAX
        } else {
            1u128 << host_bits
        };
        // Offset 0 is the prefix's own address, which may be a subnet-router anycast one.
        V6Cursor {
            eni: eni.to_string(),
            prefix: prefix.trunc(),
            next: 1,
            end,
        }
    }

    fn remaining(&self) -> u128 {
        self.end.saturating_sub(self.next)
    }

    fn at(&self, offset: u128) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.prefix.network()) | offset)
    }
}

#[derive(Debug, Clone)]
struct Addr {
    eni: String,
    state: AddrState,
    /// Generation of this address's entry; a queue entry with an older one is stale.
    gen: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub total: usize,
    pub assigned: usize,
    pub cooldown: usize,
    pub available: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignError {
    #[error("max pods reached ({0})")]
    MaxPods(usize),
    #[error("no IP address available: pool empty ({assigned} assigned, {cooldown} in cooldown)")]
    PoolEmpty { assigned: usize, cooldown: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EniError {
    #[error("ENI {0} is already known")]
    Duplicate(String),
    #[error("ENI {0} is not known")]
    Unknown(String),
    #[error("address {0} is already in the pool")]
    DuplicateAddress(IpAddr),
    #[error("IPv6 prefix {0} overlaps one already in the pool")]
    DuplicatePrefix(ipnet::Ipv6Net),
    #[error("ENI {0} still has {1} assigned address(es)")]
    InUse(String, usize),
}

#[derive(Debug)]
pub struct Datastore {
    enis: BTreeMap<String, Eni>,
    addrs: HashMap<IpAddr, Addr>,
    free: VecDeque<(IpAddr, u64)>,
    cooldown: VecDeque<(IpAddr, u64, SystemTime)>,
    v6_fresh: Vec<V6Cursor>,
    allocations: HashMap<Key, Allocation>,
    assigned: usize,
    cooling: usize,
    next_gen: u64,
    cooldown_period: Duration,
    max_pods: usize,
}

impl Datastore {
    pub fn new(cooldown_period: Duration, max_pods: usize) -> Datastore {
        Datastore {
            enis: BTreeMap::new(),
            addrs: HashMap::new(),
            free: VecDeque::new(),
            cooldown: VecDeque::new(),
            v6_fresh: Vec::new(),
            allocations: HashMap::new(),
            assigned: 0,
            cooling: 0,
            next_gen: 0,
            cooldown_period,
            max_pods,
        }
    }

    pub fn max_pods(&self) -> usize {
        self.max_pods
    }

    /// Changes so far; grows with every change of state (for the group-committed checkpoint).
    pub fn generation(&self) -> u64 {
        self.next_gen
    }

    pub fn cooldown_period(&self) -> Duration {
        self.cooldown_period
    }

    fn gen(&mut self) -> u64 {
        self.next_gen += 1;
        self.next_gen
    }

    /// Add an ENI with its addresses (secondary IPs and prefixes). The primary IP is kept out.
    pub fn add_eni(&mut self, mut eni: Eni) -> Result<(), EniError> {
        if self.enis.contains_key(&eni.id) {
            return Err(EniError::Duplicate(eni.id));
        }
        let ips = std::mem::take(&mut eni.ips);
        let prefixes = std::mem::take(&mut eni.prefixes);
        let v6 = std::mem::take(&mut eni.ipv6_prefixes);
        let id = eni.id.clone();
        self.enis.insert(id.clone(), eni);
        for ip in ips {
            self.add_ip(&id, ip)?;
        }
        for p in prefixes {
            self.add_prefix(&id, p)?;
        }
        for p in v6 {
            self.add_ipv6_prefix(&id, p)?;
        }
        Ok(())
    }

    /// Add an IPv6 prefix to an ENI: its addresses become available without being listed.
    pub fn add_ipv6_prefix(&mut self, eni_id: &str, p: ipnet::Ipv6Net) -> Result<(), EniError> {
        let eni = self
            .enis
            .get_mut(eni_id)
            .ok_or_else(|| EniError::Unknown(eni_id.to_string()))?;
        let p = p.trunc();
        if self
            .v6_fresh
            .iter()
            .any(|c| c.prefix.contains(&p) || p.contains(&c.prefix))
        {
            return Err(EniError::DuplicatePrefix(p));
        }
        eni.ipv6_prefixes.push(p);
        self.v6_fresh.push(V6Cursor::new(eni_id, p));
        self.gen();
        Ok(())
    }

    /// The IPv6 prefix (and its ENI) holding `ip`, if any.
    fn v6_home(&self, ip: IpAddr) -> Option<usize> {
        let IpAddr::V6(v6) = ip else { return None };
        self.v6_fresh.iter().position(|c| c.prefix.contains(&v6))
    }

    /// A fresh IPv6 address from the first prefix that has one, entered as free.
    fn next_fresh_v6(&mut self) -> Option<IpAddr> {
        for i in 0..self.v6_fresh.len() {
            loop {
                let c = &mut self.v6_fresh[i];
                if c.next >= c.end {
                    break;
                }
                let ip = IpAddr::V6(c.at(c.next));
                c.next += 1;
                // Restored from the checkpoint ahead of the cursor: already known.
                if self.addrs.contains_key(&ip) {
                    continue;
                }
                let eni = self.v6_fresh[i].eni.clone();
                let gen = self.gen();
                self.addrs.insert(
                    ip,
                    Addr {
                        eni,
                        state: AddrState::Free,
                        gen,
                    },
                );
                return Some(ip);
            }
        }
        None
    }

    /// Enter an IPv6 address of a known prefix as free (a checkpoint names it).
    fn materialize(&mut self, ip: IpAddr) {
        if self.addrs.contains_key(&ip) {
            return;
        }
        let Some(i) = self.v6_home(ip) else { return };
        let eni = self.v6_fresh[i].eni.clone();
        let gen = self.gen();
        self.addrs.insert(
            ip,
            Addr {
                eni,
                state: AddrState::Free,
                gen,
            },
        );
    }

    fn v6_fresh_count(&self, eni: Option<&str>) -> usize {
        let n: u128 = self
            .v6_fresh
            .iter()
            .filter(|c| eni.is_none_or(|e| c.eni == e))
            .map(V6Cursor::remaining)
            .sum();
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    pub fn add_ip(&mut self, eni_id: &str, ip: Ipv4Addr) -> Result<(), EniError> {
        let eni = self
            .enis
            .get_mut(eni_id)
            .ok_or_else(|| EniError::Unknown(eni_id.to_string()))?;
        if ip == eni.primary_ip {
            return Ok(());
        }
        if self.addrs.contains_key(&IpAddr::V4(ip)) {
            return Err(EniError::DuplicateAddress(ip.into()));
        }
        eni.ips.push(ip);
        self.insert_free(eni_id, ip.into());
        Ok(())
    }

    pub fn add_prefix(&mut self, eni_id: &str, p: Prefix) -> Result<(), EniError> {
        let eni = self
            .enis
            .get_mut(eni_id)
            .ok_or_else(|| EniError::Unknown(eni_id.to_string()))?;
        if let Some(dup) = p
            .addresses()
            .find(|a| self.addrs.contains_key(&IpAddr::V4(*a)))
        {
            return Err(EniError::DuplicateAddress(dup.into()));
        }
        eni.prefixes.push(p);
        for ip in p.addresses() {
            self.insert_free(eni_id, ip.into());
        }
        Ok(())
    }

    fn insert_free(&mut self, eni: &str, ip: IpAddr) {
        let gen = self.gen();
        self.addrs.insert(
            ip,
            Addr {
                eni: eni.to_string(),
                state: AddrState::Free,
                gen,
            },
        );
        self.free.push_back((ip, gen));
    }

    /// Drop a free secondary IP from its ENI (it is being unassigned in EC2). Refused while
    /// the address is assigned or cooling down.
    pub fn remove_ip(&mut self, ip: Ipv4Addr) -> bool {
        let key = IpAddr::V4(ip);
        let Some(a) = self.addrs.get(&key).filter(|a| a.state == AddrState::Free) else {
            return false;
        };
        let eni = a.eni.clone();
        self.addrs.remove(&key);
        self.gen();
        if let Some(e) = self.enis.get_mut(&eni) {
            e.ips.retain(|x| *x != ip);
        }
        true
    }

    /// Drop a prefix whose 16 addresses are all free.
    pub fn remove_prefix(&mut self, eni_id: &str, p: Prefix) -> bool {
        let all_free = p.addresses().all(|a| {
            matches!(self.addrs.get(&IpAddr::V4(a)), Some(x) if x.state == AddrState::Free && x.eni == eni_id)
        });
        if !all_free {
            return false;
        }
        for a in p.addresses() {
            self.addrs.remove(&IpAddr::V4(a));
        }
        if let Some(e) = self.enis.get_mut(eni_id) {
            e.prefixes.retain(|x| *x != p);
        }
        true
    }

    /// Remove an ENI none of whose addresses are assigned or cooling down.
    pub fn remove_eni(&mut self, eni_id: &str) -> Result<Eni, EniError> {
        let eni = self
            .enis
            .get(eni_id)
            .ok_or_else(|| EniError::Unknown(eni_id.to_string()))?;
        let n = self
            .addrs
            .values()
            .filter(|x| x.eni == eni.id && x.state != AddrState::Free)
            .count();
        if n > 0 {
            return Err(EniError::InUse(eni_id.to_string(), n));
        }
        let eni = self
            .enis
            .remove(eni_id)
            .ok_or_else(|| EniError::Unknown(eni_id.to_string()))?;
        self.addrs.retain(|_, a| a.eni != eni.id);
        self.v6_fresh.retain(|c| c.eni != eni.id);
        Ok(eni)
    }

    /// Move every address whose cooldown has run out back to the free queue.
    pub fn expire_cooldowns(&mut self, now: SystemTime) {
        while let Some(&(ip, gen, at)) = self.cooldown.front() {
            let live = matches!(self.addrs.get(&ip), Some(a) if a.gen == gen);
            if live && now.duration_since(at).unwrap_or_default() < self.cooldown_period {
                break;
            }
            self.cooldown.pop_front();
            if !live {
                continue;
            }
            let gen = self.gen();
            if let Some(a) = self.addrs.get_mut(&ip) {
                a.state = AddrState::Free;
                a.gen = gen;
            }
            self.cooling -= 1;
            self.free.push_back((ip, gen));
        }
    }

    /// Give `key` an address: the same one again if it already has one (repeated ADD).
    pub fn assign(
        &mut self,
        key: Key,
        pod: PodMeta,
        now: SystemTime,
    ) -> Result<Allocation, AssignError> {
        if let Some(a) = self.allocations.get(&key) {
            return Ok(a.clone());
        }
        if self.assigned >= self.max_pods {
            return Err(AssignError::MaxPods(self.max_pods));
        }
        self.expire_cooldowns(now);
        let ip = loop {
            let Some((ip, gen)) = self.free.pop_front() else {
                match self.next_fresh_v6() {
                    Some(ip) => break ip,
                    None => {
                        return Err(AssignError::PoolEmpty {
                            assigned: self.assigned,
                            cooldown: self.cooling,
                        })
                    }
                }
            };
            if matches!(self.addrs.get(&ip), Some(a) if a.gen == gen && a.state == AddrState::Free)
            {
                break ip;
            }
        };
        Ok(self.mark_assigned(ip, key, pod, now))
    }

    fn mark_assigned(&mut self, ip: IpAddr, key: Key, pod: PodMeta, at: SystemTime) -> Allocation {
        let gen = self.gen();
        let addr = self.addrs.get_mut(&ip);
        let eni_id = match addr {
            Some(a) => {
                a.state = AddrState::Assigned;
                a.gen = gen;
                a.eni.clone()
            }
            None => String::new(),
        };
        let (device_number, route_table) = self
            .enis
            .get(&eni_id)
            .map(|e| (e.device_number, e.route_table()))
            .unwrap_or((0, MAIN_TABLE));
        let alloc = Allocation {
            key: key.clone(),
            ip,
            eni_id,
            device_number,
            route_table,
            pod,
            allocated_at: at,
        };
        self.assigned += 1;
        self.allocations.insert(key, alloc.clone());
        alloc
    }

    /// Put back an allocation found in the checkpoint. Fails if the address is not on a known
    /// ENI or is not free (never hand one address to two pods).
    pub fn restore(&mut self, key: Key, ip: IpAddr, pod: PodMeta, at: SystemTime) -> bool {
        if self.allocations.contains_key(&key) {
            return false;
        }
        self.materialize(ip);
        match self.addrs.get(&ip) {
            Some(a) if a.state == AddrState::Free => {}
            _ => return false,
        }
        self.mark_assigned(ip, key, pod, at);
        true
    }

    /// Put an address back into cooldown at `at` (restoring the checkpoint's cooldowns).
    pub fn restore_cooldown(&mut self, ip: IpAddr, at: SystemTime) -> bool {
        self.materialize(ip);
        match self.addrs.get(&ip) {
            Some(a) if a.state == AddrState::Free => {}
            _ => return false,
        }
        self.start_cooldown(ip, at);
        true
    }

    fn start_cooldown(&mut self, ip: IpAddr, at: SystemTime) {
        let gen = self.gen();
        if let Some(a) = self.addrs.get_mut(&ip) {
            a.state = AddrState::Cooldown(at);
            a.gen = gen;
            self.cooling += 1;
            // Kept ordered by release time; restored entries may be older than queued ones.
            let pos = self
                .cooldown
                .iter()
                .rposition(|(_, _, t)| *t <= at)
                .map(|p| p + 1)
                .unwrap_or(0);
            self.cooldown.insert(pos, (ip, gen, at));
        }
    }

    /// Release `key`'s address into cooldown. Unknown keys are fine (`None`).
    pub fn release(&mut self, key: &Key, now: SystemTime) -> Option<Allocation> {
        let alloc = self.allocations.remove(key)?;
        self.gen();
        self.assigned -= 1;
        if self.addrs.contains_key(&alloc.ip) {
            self.start_cooldown(alloc.ip, now);
        }
        Some(alloc)
    }

    pub fn allocation(&self, key: &Key) -> Option<&Allocation> {
        self.allocations.get(key)
    }

    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.values()
    }

    /// (address, released at) of every address cooling down.
    pub fn cooldowns(&self) -> impl Iterator<Item = (IpAddr, SystemTime)> + '_ {
        self.addrs.iter().filter_map(|(ip, a)| match a.state {
            AddrState::Cooldown(t) => Some((*ip, t)),
            _ => None,
        })
    }

    pub fn enis(&self) -> impl Iterator<Item = &Eni> {
        self.enis.values()
    }

    pub fn stats(&self) -> Stats {
        let total = self.addrs.len().saturating_add(self.v6_fresh_count(None));
        Stats {
            total,
            assigned: self.assigned,
            cooldown: self.cooling,
            available: total - self.assigned - self.cooling,
        }
    }

    /// Per-ENI statistics, for the pool manager and introspection.
    pub fn eni_stats(&self, id: &str) -> Option<Stats> {
        let eni = self.enis.get(id)?;
        let mut s = Stats::default();
        let mut count = |a: &Addr| {
            s.total += 1;
            match a.state {
                AddrState::Assigned => s.assigned += 1,
                AddrState::Cooldown(_) => s.cooldown += 1,
                AddrState::Free => s.available += 1,
            }
        };
        // The pool manager asks for every ENI at every check: an IPv4 ENI's own addresses are
        // looked up, not the whole pool scanned; only an ENI with IPv6 prefixes needs the scan
        // (its handed-out addresses are listed nowhere else).
        let v4 = eni
            .ips
            .iter()
            .copied()
            .chain(eni.prefixes.iter().flat_map(|p| p.addresses()));
        for ip in v4 {
            if let Some(a) = self.addrs.get(&IpAddr::V4(ip)) {
                count(a);
            }
        }
        if !eni.ipv6_prefixes.is_empty() {
            for (_, a) in self
                .addrs
                .iter()
                .filter(|(ip, a)| ip.is_ipv6() && a.eni == id)
            {
                count(a);
            }
        }
        let fresh = self.v6_fresh_count(Some(id));
        s.total = s.total.saturating_add(fresh);
        s.available = s.available.saturating_add(fresh);
        Some(s)
    }

    pub fn eni(&self, id: &str) -> Option<&Eni> {
        self.enis.get(id)
    }

    /// Free secondary IPs of an ENI (not those inside prefixes), release candidates.
    pub fn free_ips(&self, eni_id: &str) -> Vec<Ipv4Addr> {
        let Some(eni) = self.enis.get(eni_id) else {
            return Vec::new();
        };
        eni.ips
            .iter()
            .copied()
            .filter(|a| matches!(self.addrs.get(&IpAddr::V4(*a)), Some(x) if x.state == AddrState::Free))
            .collect()
    }

    /// Prefixes of an ENI whose 16 addresses are all free (none assigned, none cooling).
    pub fn free_prefixes(&self, eni_id: &str) -> Vec<Prefix> {
        let Some(eni) = self.enis.get(eni_id) else {
            return Vec::new();
        };
        eni.prefixes
            .iter()
            .copied()
            .filter(|p| {
                p.addresses().all(|a| {
                    matches!(self.addrs.get(&IpAddr::V4(a)), Some(x) if x.state == AddrState::Free)
                })
            })
            .collect()
    }

    /// Can an ADD get an address right now (health, STATUS)? Expired cooldowns are freed
    /// first, so the answer is the one an ADD would get.
    pub fn can_allocate(&mut self, now: SystemTime) -> bool {
        self.expire_cooldowns(now);
        self.assigned < self.max_pods && self.stats().available > 0
    }

    /// When the first cooling address becomes free again (None when none is cooling). Only the
    /// pool-empty path asks, so a scan is fine.
    pub fn next_cooldown_end(&self) -> Option<SystemTime> {
        self.cooldowns()
            .map(|(_, at)| at + self.cooldown_period)
            .min()
    }

    /// Addresses of `prefix` (an IPv6 prefix of `eni_id`) that were handed out and not yet
    /// back from cooldown, sorted.
    pub fn handed_out_in(&self, eni_id: &str, prefix: &ipnet::Ipv6Net) -> Vec<Ipv6Addr> {
        let mut v: Vec<Ipv6Addr> = self
            .addrs
            .iter()
            .filter(|(_, a)| a.eni == eni_id && a.state != AddrState::Free)
            .filter_map(|(ip, _)| match ip {
                IpAddr::V6(v6) if prefix.contains(v6) => Some(*v6),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    /// Is `ip` assigned, cooling, free or unknown? For tests and introspection.
    pub fn address_state(&self, ip: IpAddr) -> Option<&'static str> {
        match self.addrs.get(&ip) {
            Some(a) => Some(match a.state {
                AddrState::Free => "free",
                AddrState::Assigned => "assigned",
                AddrState::Cooldown(_) => "cooldown",
            }),
            // Inside a known IPv6 prefix and never handed out.
            None => self.v6_home(ip).map(|_| "free"),
        }
    }
}

/// A store with one primary ENI (10.0.1.10) holding 10.0.1.11 up to 10.0.1.`last`, 30 s
/// cooldown, for the unit tests of the modules around the datastore.
#[cfg(test)]
pub(crate) fn one_eni_store(last: u8) -> Datastore {
    let mut ds = Datastore::new(Duration::from_secs(30), 100);
    let added = ds.add_eni(Eni {
        id: "eni-0".into(),
        device_number: 0,
        primary: true,
        mac: String::new(),
        subnet_cidr: ipnet::Ipv4Net::new(Ipv4Addr::new(10, 0, 1, 0), 24).unwrap_or_default(),
        subnet_id: String::new(),
        primary_ip: Ipv4Addr::new(10, 0, 1, 10),
        ips: (11..=last).map(|i| Ipv4Addr::new(10, 0, 1, i)).collect(),
        prefixes: vec![],
        primary_ipv6: None,
        ipv6_prefixes: vec![],
        attached_at: SystemTime::UNIX_EPOCH,
    });
    assert!(added.is_ok(), "{added:?}");
    ds
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(c: &str) -> Key {
        Key {
            network_name: "aws-cni".into(),
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    fn eni(id: &str, dev: u32, ips: &[[u8; 4]]) -> Eni {
        Eni {
            id: id.into(),
            device_number: dev,
            primary: dev == 0,
            mac: String::new(),
            subnet_cidr: "10.0.0.0/16".parse().unwrap(),
            subnet_id: String::new(),
            primary_ip: Ipv4Addr::new(10, 0, 0, dev as u8 + 200),
            ips: ips.iter().map(|o| Ipv4Addr::from(*o)).collect(),
            prefixes: vec![],
            primary_ipv6: None,
            ipv6_prefixes: vec![],
            attached_at: SystemTime::UNIX_EPOCH,
        }
    }

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    #[test]
    fn assign_is_idempotent_and_release_cools_down() {
        let mut ds = Datastore::new(Duration::from_secs(30), 100);
        ds.add_eni(eni("eni-0", 0, &[[10, 0, 0, 1]])).unwrap();
        let a = ds.assign(key("a"), PodMeta::default(), t(0)).unwrap();
        assert_eq!(a.route_table, MAIN_TABLE);
        assert_eq!(
            ds.assign(key("a"), PodMeta::default(), t(1)).unwrap().ip,
            a.ip
        );
        assert_eq!(
            ds.assign(key("b"), PodMeta::default(), t(1)),
            Err(AssignError::PoolEmpty {
                assigned: 1,
                cooldown: 0
            })
        );
        assert!(ds.release(&key("a"), t(2)).is_some());
        assert!(ds.release(&key("a"), t(2)).is_none());
        assert_eq!(
            ds.stats(),
            Stats {
                total: 1,
                assigned: 0,
                cooldown: 1,
                available: 0
            }
        );
        assert!(!ds.can_allocate(t(3)));
        assert!(matches!(
            ds.assign(key("b"), PodMeta::default(), t(31)),
            Err(AssignError::PoolEmpty { cooldown: 1, .. })
        ));
        assert!(ds.can_allocate(t(32)));
        assert_eq!(
            ds.assign(key("b"), PodMeta::default(), t(32)).unwrap().ip,
            a.ip
        );
    }

    #[test]
    fn least_recently_released_first() {
        let mut ds = Datastore::new(Duration::from_secs(0), 100);
        ds.add_eni(eni(
            "eni-1",
            1,
            &[[10, 0, 0, 1], [10, 0, 0, 2], [10, 0, 0, 3]],
        ))
        .unwrap();
        let ips: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|c| ds.assign(key(c), PodMeta::default(), t(0)).unwrap().ip)
            .collect();
        ds.release(&key("b"), t(1));
        ds.release(&key("a"), t(2));
        assert_eq!(
            ds.assign(key("d"), PodMeta::default(), t(3)).unwrap().ip,
            ips[1]
        );
        assert_eq!(
            ds.assign(key("e"), PodMeta::default(), t(3)).unwrap().ip,
            ips[0]
        );
        let d = ds.allocation(&key("d")).unwrap();
        assert_eq!((d.device_number, d.route_table), (1, 2));
    }

    #[test]
    fn per_eni_stats() {
        let mut ds = Datastore::new(Duration::from_secs(30), 100);
        ds.add_eni(eni("eni-0", 0, &[[10, 0, 0, 1], [10, 0, 0, 2]]))
            .unwrap();
        ds.add_eni(eni("eni-1", 1, &[[10, 0, 1, 1]])).unwrap();
        let a = ds.assign(key("a"), PodMeta::default(), t(0)).unwrap();
        ds.assign(key("b"), PodMeta::default(), t(0)).unwrap();
        ds.release(&key("a"), t(1));
        let first = ds.eni_stats(&a.eni_id).unwrap();
        assert_eq!(first.total, if a.eni_id == "eni-0" { 2 } else { 1 });
        let all: Vec<Stats> = ["eni-0", "eni-1"]
            .iter()
            .map(|e| ds.eni_stats(e).unwrap())
            .collect();
        let sum = |f: fn(&Stats) -> usize| all.iter().map(f).sum::<usize>();
        assert_eq!(sum(|s| s.total), 3);
        assert_eq!(sum(|s| s.assigned), 1);
        assert_eq!(sum(|s| s.cooldown), 1);
        assert_eq!(sum(|s| s.available), 1);
        assert_eq!(ds.eni_stats("eni-9"), None);
    }

    #[test]
    fn max_pods_is_enforced() {
        let mut ds = Datastore::new(Duration::from_secs(0), 1);
        ds.add_eni(eni("eni-1", 1, &[[10, 0, 0, 1], [10, 0, 0, 2]]))
            .unwrap();
        ds.assign(key("a"), PodMeta::default(), t(0)).unwrap();
        let e = ds.assign(key("b"), PodMeta::default(), t(0)).unwrap_err();
        assert_eq!(e.to_string(), "max pods reached (1)");
        assert!(!ds.can_allocate(t(0)));
    }

    #[test]
    fn prefixes_expand_and_enis_are_removed_only_when_idle() {
        let mut ds = Datastore::new(Duration::from_secs(30), 100);
        let mut e = eni("eni-1", 1, &[]);
        e.prefixes.push(Prefix(Ipv4Addr::new(10, 0, 16, 0)));
        ds.add_eni(e).unwrap();
        assert_eq!(ds.stats().total, 16);
        ds.assign(key("a"), PodMeta::default(), t(0)).unwrap();
        assert!(matches!(ds.remove_eni("eni-1"), Err(EniError::InUse(_, 1))));
        assert!(!ds.remove_prefix("eni-1", Prefix(Ipv4Addr::new(10, 0, 16, 0))));
        ds.release(&key("a"), t(1));
        assert!(
            matches!(ds.remove_eni("eni-1"), Err(EniError::InUse(_, 1))),
            "cooldown counts as busy"
        );
        ds.expire_cooldowns(t(40));
        ds.remove_eni("eni-1").unwrap();
        assert_eq!(ds.stats(), Stats::default());
        assert!(matches!(
            ds.assign(key("b"), PodMeta::default(), t(41)),
            Err(AssignError::PoolEmpty { .. })
        ));
    }

    #[test]
    fn duplicate_addresses_refused_and_primary_ip_kept_out() {
        let mut ds = Datastore::new(Duration::from_secs(30), 100);
        let mut e = eni("eni-0", 0, &[[10, 0, 0, 1]]);
        e.ips.push(e.primary_ip);
        ds.add_eni(e).unwrap();
        assert_eq!(ds.stats().total, 1);
        assert_eq!(
            ds.add_ip("eni-0", Ipv4Addr::new(10, 0, 0, 1)),
            Err(EniError::DuplicateAddress(
                Ipv4Addr::new(10, 0, 0, 1).into()
            ))
        );
        assert!(ds.add_eni(eni("eni-0", 0, &[])).is_err());
    }

    #[test]
    fn restore_refuses_conflicts() {
        let mut ds = Datastore::new(Duration::from_secs(30), 100);
        ds.add_eni(eni("eni-1", 1, &[[10, 0, 0, 1], [10, 0, 0, 2]]))
            .unwrap();
        let ip = Ipv4Addr::new(10, 0, 0, 2).into();
        assert!(ds.restore(key("a"), ip, PodMeta::default(), t(0)));
        assert!(
            !ds.restore(key("b"), ip, PodMeta::default(), t(0)),
            "same IP twice"
        );
        assert!(!ds.restore(
            key("c"),
            Ipv4Addr::new(10, 9, 9, 9).into(),
            PodMeta::default(),
            t(0)
        ));
        assert!(ds.restore_cooldown(Ipv4Addr::new(10, 0, 0, 1).into(), t(0)));
        assert_eq!(
            ds.stats(),
            Stats {
                total: 2,
                assigned: 1,
                cooldown: 1,
                available: 0
            }
        );
    }

    fn v6_eni(prefix: &str) -> Eni {
        let mut e = eni("eni-0", 0, &[]);
        e.ipv6_prefixes = vec![prefix.parse().unwrap()];
        e
    }

    #[test]
    fn ipv6_prefix_hands_out_fresh_addresses_then_reuses_after_cooldown() {
        let mut ds = Datastore::new(Duration::from_secs(30), 250);
        ds.add_eni(v6_eni("2600:1f14::1:0:0:0/80")).unwrap();
        let s = ds.stats();
        assert_eq!((s.total, s.available), ((1 << 48) - 1, (1 << 48) - 1));
        let a = ds.assign(key("a"), PodMeta::default(), t(0)).unwrap();
        assert_eq!(a.ip, "2600:1f14::1:0:0:1".parse::<IpAddr>().unwrap());
        assert_eq!(
            ds.assign(key("a"), PodMeta::default(), t(1)).unwrap().ip,
            a.ip
        );
        let b = ds.assign(key("b"), PodMeta::default(), t(1)).unwrap();
        assert_eq!(b.ip, "2600:1f14::1:0:0:2".parse::<IpAddr>().unwrap());
        ds.release(&key("a"), t(2));
        assert_eq!(ds.address_state(a.ip), Some("cooldown"));
        assert_eq!(
            ds.handed_out_in("eni-0", &"2600:1f14::1:0:0:0/80".parse().unwrap())
                .len(),
            2
        );
        // Cooling addresses are not handed out; fresh ones are.
        let c = ds.assign(key("c"), PodMeta::default(), t(3)).unwrap();
        assert_eq!(c.ip, "2600:1f14::1:0:0:3".parse::<IpAddr>().unwrap());
        // Once cooled, an address comes back before fresh ones.
        let d = ds.assign(key("d"), PodMeta::default(), t(40)).unwrap();
        assert_eq!(d.ip, a.ip);
        assert_eq!(ds.stats().assigned, 3);
        let es = ds.eni_stats("eni-0").unwrap();
        assert_eq!((es.assigned, es.cooldown, es.total), (3, 0, (1 << 48) - 1));
        assert_eq!(es.total, es.assigned + es.available);
        assert!(ds
            .add_ipv6_prefix("eni-0", "2600:1f14::1:0:0:0/96".parse().unwrap())
            .is_err());
    }

    #[test]
    fn ipv6_restore_materialises_and_the_cursor_skips_restored() {
        let mut ds = Datastore::new(Duration::from_secs(30), 250);
        ds.add_eni(v6_eni("2600:1f14::1:0:0:0/80")).unwrap();
        let first: IpAddr = "2600:1f14::1:0:0:1".parse().unwrap();
        let outside: IpAddr = "2600:1f14::2:0:0:1".parse().unwrap();
        assert_eq!(ds.address_state(first), Some("free"));
        assert_eq!(ds.address_state(outside), None);
        assert!(ds.restore(key("a"), first, PodMeta::default(), t(0)));
        assert!(!ds.restore(key("b"), first, PodMeta::default(), t(0)));
        assert!(!ds.restore(key("c"), outside, PodMeta::default(), t(0)));
        assert!(ds.restore_cooldown("2600:1f14::1:0:0:2".parse().unwrap(), t(0)));
        let n = ds.assign(key("n"), PodMeta::default(), t(1)).unwrap();
        assert_eq!(n.ip, "2600:1f14::1:0:0:3".parse::<IpAddr>().unwrap());
        assert!(ds.remove_eni("eni-0").is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Assign(u8),
        Release(u8),
        Tick(u8),
        RemoveFree(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..40).prop_map(Op::Assign),
            3 => (0u8..40).prop_map(Op::Release),
            2 => (0u8..20).prop_map(Op::Tick),
            1 => (0u8..24).prop_map(Op::RemoveFree),
        ]
    }

    proptest! {
        #[test]
        fn never_hands_out_an_address_twice(ops in proptest::collection::vec(op(), 1..300)) {
            let mut ds = Datastore::new(Duration::from_secs(5), 30);
            let ips: Vec<[u8; 4]> = (1..=12).map(|i| [10, 0, 1, i]).collect();
            ds.add_eni(eni("eni-1", 1, &ips)).unwrap();
            let ips2: Vec<[u8; 4]> = (1..=12).map(|i| [10, 0, 2, i]).collect();
            ds.add_eni(eni("eni-2", 2, &ips2)).unwrap();
            // A small IPv6 prefix (15 fresh addresses) beside them: both families, one queue.
            let mut e3 = eni("eni-3", 3, &[]);
            e3.ipv6_prefixes = vec!["2600:1f14::10/124".parse().unwrap()];
            ds.add_eni(e3).unwrap();
            let mut now = 0u64;
            let mut released_at: HashMap<IpAddr, u64> = HashMap::new();
            let mut holders: HashMap<IpAddr, String> = HashMap::new();
            for o in ops {
                match o {
                    Op::Assign(c) => {
                        let k = key(&format!("c{c}"));
                        let before = ds.allocation(&k).map(|a| a.ip);
                        if let Ok(a) = ds.assign(k.clone(), PodMeta::default(), t(now)) {
                            if let Some(b) = before { prop_assert_eq!(b, a.ip); continue; }
                            prop_assert!(holders.insert(a.ip, k.container_id.clone()).is_none(), "address handed out twice");
                            if let Some(r) = released_at.get(&a.ip) {
                                prop_assert!(now - r >= 5, "reused during cooldown");
                            }
                        }
                    }
                    Op::Release(c) => {
                        if let Some(a) = ds.release(&key(&format!("c{c}")), t(now)) {
                            holders.remove(&a.ip);
                            released_at.insert(a.ip, now);
                        }
                    }
                    Op::Tick(s) => now += s as u64,
                    Op::RemoveFree(i) => {
                        let ip = Ipv4Addr::new(10, 0, 1 + i / 12, 1 + i % 12);
                        let was_free = ds.address_state(ip.into()) == Some("free");
                        prop_assert_eq!(ds.remove_ip(ip), was_free);
                    }
                }
                let s = ds.stats();
                prop_assert_eq!(s.assigned, holders.len());
                prop_assert_eq!(s.total, s.assigned + s.cooldown + s.available);
                prop_assert_eq!(ds.allocations().count(), s.assigned);
                prop_assert_eq!(ds.cooldowns().count(), s.cooldown);
                // Per ENI, the same pool: the figures add up to the whole.
                let per: Vec<Stats> = ds.enis().filter_map(|e| ds.eni_stats(&e.id)).collect();
                prop_assert_eq!(per.iter().map(|e| e.assigned).sum::<usize>(), s.assigned);
                prop_assert_eq!(per.iter().map(|e| e.cooldown).sum::<usize>(), s.cooldown);
                prop_assert_eq!(per.iter().map(|e| e.total).sum::<usize>(), s.total);
            }
            // Every released address comes back once its cooldown is over.
            for k in (0..40).map(|c| key(&format!("c{c}"))) {
                ds.release(&k, t(now));
            }
            ds.expire_cooldowns(t(now + 5));
            let s = ds.stats();
            prop_assert_eq!(s.available, s.total);
            prop_assert_eq!(s.cooldown, 0);
        }
    }
}
