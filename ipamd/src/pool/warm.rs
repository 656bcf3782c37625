//! Warm-pool arithmetic: given the pool and the targets, what is the one next step?
//!
//! Pure (no clock, no I/O): the manager feeds it a snapshot and executes the step it returns,
//! then asks again, so every decision is unit-tested against upstream's worked examples
//! (docs/eni-and-ip-target.md, docs/prefix-and-ip-target.md). One deliberate difference from
//! upstream: addresses in cooldown are not "available" - a pool of cooling addresses cannot
//! serve an ADD, so it is short, not full.

use std::time::Duration;

/// Addresses in one /28 prefix.
pub const PREFIX_SIZE: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    /// WARM_ENI_TARGET: whole ENIs' worth of free addresses to keep (default 1).
    pub warm_eni: u32,
    /// WARM_IP_TARGET: free addresses to keep; with MINIMUM_IP_TARGET it overrides warm_eni.
    pub warm_ip: Option<u32>,
    /// MINIMUM_IP_TARGET: addresses (free or not) to hold at least.
    pub minimum_ip: Option<u32>,
    /// WARM_PREFIX_TARGET: free /28s to keep under prefix delegation.
    pub warm_prefix: u32,
    pub prefix_delegation: bool,
}

impl Default for Targets {
    fn default() -> Self {
        Targets {
            warm_eni: 1,
            warm_ip: None,
            minimum_ip: None,
            warm_prefix: 1,
            prefix_delegation: false,
        }
    }
}

impl Targets {
    /// Upstream: WARM_IP_TARGET or MINIMUM_IP_TARGET set (and > 0) switches to IP targets.
    pub fn ip_targets(&self) -> bool {
        self.warm_ip.is_some_and(|n| n > 0) || self.minimum_ip.is_some_and(|n| n > 0)
    }
}

/// One ENI as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniView {
    pub id: String,
    pub device_number: u32,
    pub primary: bool,
    /// Secondary IPs held (IP mode) - each takes one address slot.
    pub ips: usize,
    /// /28 prefixes held (prefix mode) - each takes one address slot.
    pub prefixes: usize,
    /// Prefixes whose 16 addresses are all free (release candidates).
    pub free_prefixes: usize,
    pub assigned: usize,
    pub cooldown: usize,
    pub available: usize,
    pub age: Duration,
    /// May the pool grow on this ENI? Not the primary under custom networking.
    pub hosts_pods: bool,
}

impl EniView {
    fn total(&self) -> usize {
        self.assigned + self.cooldown + self.available
    }
    fn slots_used(&self) -> usize {
        self.ips + self.prefixes
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    pub enis: Vec<EniView>,
    /// ENIs the node may have in all (instance type limit, MAX_ENI), counting the primary and
    /// ENIs ipamd does not manage.
    pub max_enis: usize,
    /// ENIs that occupy a slot but are not ipamd's (tagged no_manage).
    pub unmanaged_enis: usize,
    /// Address slots per ENI besides its primary address (Ipv4AddressesPerInterface - 1).
    pub slots_per_eni: usize,
    pub max_pods: usize,
    /// An ENI younger than this is not freed (it may be about to get pods).
    pub min_eni_age: Duration,
}

impl PoolView {
    fn total(&self) -> usize {
        self.enis.iter().map(EniView::total).sum()
    }
    fn available(&self) -> usize {
        self.enis.iter().map(|e| e.available).sum()
    }
    fn assigned(&self) -> usize {
        self.enis.iter().map(|e| e.assigned).sum()
    }
    fn prefixes(&self) -> usize {
        self.enis.iter().map(|e| e.prefixes).sum()
    }
    fn free_prefixes(&self) -> usize {
        self.enis.iter().map(|e| e.free_prefixes).sum()
    }
    fn can_add_eni(&self) -> bool {
        self.enis.len() + self.unmanaged_enis < self.max_enis
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Nothing,
    AssignIps {
        eni: String,
        count: u32,
    },
    AssignPrefixes {
        eni: String,
        count: u32,
    },
    /// Create and attach an ENI holding this many secondary IPs or prefixes.
    NewEni {
        ips: u32,
        prefixes: u32,
    },
    ReleaseIps {
        eni: String,
        count: u32,
    },
    ReleasePrefixes {
        eni: String,
        count: u32,
    },
    FreeEni {
        eni: String,
    },
}

/// Why the pool cannot grow, for the ADD reply when it is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ceiling {
    MaxPods(usize),
    Enis { enis: usize, slots: usize },
}

/// Upstream's datastoreTargetState in IP-target mode: (short, over) in addresses, or in
/// prefixes under prefix delegation.
fn ip_target_state(v: &PoolView, t: &Targets) -> (usize, usize) {
    let total = v.total();
    let avail = v.available();
    let warm = t.warm_ip.unwrap_or(0) as usize;
    let min = t.minimum_ip.unwrap_or(0) as usize;
    let short = warm.saturating_sub(avail).max(min.saturating_sub(total));
    let over = avail.saturating_sub(warm).min(total.saturating_sub(min));
    if !t.prefix_delegation {
        return (short, over);
    }
    let prefixes = v.prefixes();
    let need_warm = (v.assigned() + warm).div_ceil(PREFIX_SIZE);
    let need_min = min.div_ceil(PREFIX_SIZE);
    let over = v
        .free_prefixes()
        .min(prefixes.saturating_sub(need_warm))
        .min(prefixes.saturating_sub(need_min));
    (short.div_ceil(PREFIX_SIZE), over)
}

/// The warm target outside IP-target mode: (how many, addresses each) - WARM_PREFIX_TARGET
/// prefixes of 16, or WARM_ENI_TARGET ENIs' worth of secondary addresses.
fn warm_target(v: &PoolView, t: &Targets) -> (usize, usize) {
    if t.prefix_delegation {
        (t.warm_prefix as usize, PREFIX_SIZE)
    } else {
        (t.warm_eni as usize, v.slots_per_eni)
    }
}

/// Is the pool below target? Never once it holds max pods' worth of addresses.
pub fn too_low(v: &PoolView, t: &Targets) -> bool {
    if v.total() >= v.max_pods {
        return false;
    }
    if t.ip_targets() {
        return ip_target_state(v, t).0 > 0;
    }
    let (target, unit) = warm_target(v, t);
    let avail = v.available();
    avail < target * unit || (target == 0 && avail == 0)
}

/// (short, over) of the targets, for metrics: addresses (prefixes under delegation with IP
/// targets, as upstream counts them).
pub fn short_over(v: &PoolView, t: &Targets) -> (usize, usize) {
    if t.ip_targets() {
        return ip_target_state(v, t);
    }
    let short = if too_low(v, t) {
        let (target, unit) = warm_target(v, t);
        (target * unit).max(1).saturating_sub(v.available())
    } else {
        0
    };
    (short, surplus(v, t))
}

/// Surplus to give back now, in addresses (IP mode) or prefixes (prefix mode). Warm-ENI mode
/// never returns single addresses, only whole ENIs.
pub fn surplus(v: &PoolView, t: &Targets) -> usize {
    if t.ip_targets() {
        ip_target_state(v, t).1
    } else if t.prefix_delegation {
        v.free_prefixes().saturating_sub(t.warm_prefix as usize)
    } else {
        0
    }
}

/// How many addresses (or prefixes) to ask for in one call.
fn wanted(v: &PoolView, t: &Targets) -> usize {
    let unit = if t.prefix_delegation { PREFIX_SIZE } else { 1 };
    let n = if t.ip_targets() {
        ip_target_state(v, t).0
    } else if t.prefix_delegation {
        (t.warm_prefix as usize).saturating_sub(v.free_prefixes())
    } else {
        v.slots_per_eni
    };
    // Max pods caps the pool: never ask for addresses no pod could use.
    let room = v.max_pods.saturating_sub(v.total()).div_ceil(unit);
    n.min(room).max(1)
}

/// The pool will not grow past this: max pods, or every ENI slot used.
pub fn ceiling(v: &PoolView, t: &Targets) -> Option<Ceiling> {
    if v.assigned() >= v.max_pods {
        return Some(Ceiling::MaxPods(v.max_pods));
    }
    let full = v
        .enis
        .iter()
        .filter(|e| e.hosts_pods)
        .all(|e| e.slots_used() >= v.slots_per_eni);
    (full && !v.can_add_eni()).then_some(Ceiling::Enis {
        enis: v.enis.len() + v.unmanaged_enis,
        slots: v.slots_per_eni * if t.prefix_delegation { PREFIX_SIZE } else { 1 },
    })
}

/// The next step toward the targets. `may_release`: the decrease interval has passed
/// (releases are rate-limited so a pod churn does not turn into EC2 churn).
pub fn plan(v: &PoolView, t: &Targets, may_release: bool) -> Step {
    if too_low(v, t) {
        let n = wanted(v, t);
        // The lowest device with room first: higher ENIs stay empty and can be given back.
        let target = v
            .enis
            .iter()
            .filter(|e| e.hosts_pods && e.slots_used() < v.slots_per_eni)
            .min_by_key(|e| e.device_number);
        if let Some(e) = target {
            let count = n.min(v.slots_per_eni - e.slots_used()) as u32;
            let eni = e.id.clone();
            return if t.prefix_delegation {
                Step::AssignPrefixes { eni, count }
            } else {
                Step::AssignIps { eni, count }
            };
        }
        if v.can_add_eni() {
            let n = n.min(v.slots_per_eni) as u32;
            return if t.prefix_delegation {
                Step::NewEni {
                    ips: 0,
                    prefixes: n,
                }
            } else {
                Step::NewEni {
                    ips: n,
                    prefixes: 0,
                }
            };
        }
        return Step::Nothing;
    }
    if let Some(eni) = deletable_eni(v, t) {
        return Step::FreeEni { eni };
    }
    let over = surplus(v, t);
    if over == 0 || !may_release {
        return Step::Nothing;
    }
    // Surplus goes back from the highest device down: those ENIs may then become idle.
    let mut enis: Vec<&EniView> = v.enis.iter().collect();
    enis.sort_by_key(|e| std::cmp::Reverse(e.device_number));
    if t.prefix_delegation {
        return enis
            .into_iter()
            .find(|e| e.free_prefixes > 0)
            .map_or(Step::Nothing, |e| Step::ReleasePrefixes {
                eni: e.id.clone(),
                count: over.min(e.free_prefixes) as u32,
            });
    }
    enis.into_iter()
        .find(|e| e.available > 0)
        .map_or(Step::Nothing, |e| Step::ReleaseIps {
            eni: e.id.clone(),
            count: over.min(e.available) as u32,
        })
}

/// An ENI that can go: not the primary, old enough, no pod and no cooling address on it, and
/// the pool stays on target without it (upstream's shouldRemoveExtraENIs + getDeletableENI).
fn deletable_eni(v: &PoolView, t: &Targets) -> Option<String> {
    let avail = v.available();
    if !t.ip_targets() {
        let (target, unit) = warm_target(v, t);
        // Upstream's shouldRemoveExtraENIs: (target + 1) ENIs' worth free, whatever the unit.
        let eni_worth = v.slots_per_eni * if t.prefix_delegation { unit } else { 1 };
        let idle_exists = v.enis.iter().any(|e| !e.primary && e.assigned == 0);
        if avail < (target + 1) * eni_worth && !(t.prefix_delegation && idle_exists) {
            return None;
        }
    }
    let mut idle: Vec<&EniView> = v
        .enis
        .iter()
        .filter(|e| !e.primary && e.assigned == 0 && e.cooldown == 0 && e.age >= v.min_eni_age)
        .collect();
    // The newest (highest device) first.
    idle.sort_by_key(|e| std::cmp::Reverse(e.device_number));
    idle.into_iter()
        .find(|e| {
            let others = PoolView {
                enis: v.enis.iter().filter(|x| x.id != e.id).cloned().collect(),
                ..v.clone()
            };
            let warm = t.warm_ip.unwrap_or(0) as usize;
            let min = t.minimum_ip.unwrap_or(0) as usize;
            let round = |n: usize| {
                if t.prefix_delegation {
                    n.div_ceil(PREFIX_SIZE) * PREFIX_SIZE
                } else {
                    n
                }
            };
            let ok_warm = warm == 0 || others.available() >= round(warm);
            let ok_min = min == 0 || others.total() >= round(min);
            let ok_prefix = !t.prefix_delegation
                || t.ip_targets()
                || others.free_prefixes() >= t.warm_prefix as usize;
            ok_warm && ok_min && ok_prefix
        })
        .map(|e| e.id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node as the docs' examples imagine it: pods fill the lowest device first, and the pool
    /// settles (every step applied) after each pod, as the event-driven manager does.
    struct Node {
        /// Per ENI: assigned count per IP (IP mode: each entry is one address, 0 or 1) or per
        /// prefix (prefix mode: 0..=16).
        enis: Vec<Vec<usize>>,
        slots: usize,
        max_enis: usize,
        max_pods: usize,
        t: Targets,
    }

    impl Node {
        fn new(slots: usize, max_enis: usize, max_pods: usize, t: Targets) -> Node {
            let mut n = Node {
                enis: vec![vec![]],
                slots,
                max_enis,
                max_pods,
                t,
            };
            n.settle();
            n
        }
        fn unit(&self) -> usize {
            if self.t.prefix_delegation {
                PREFIX_SIZE
            } else {
                1
            }
        }
        fn view(&self) -> PoolView {
            let unit = self.unit();
            PoolView {
                enis: self
                    .enis
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        let assigned: usize = e.iter().sum();
                        EniView {
                            id: format!("eni-{i}"),
                            device_number: i as u32,
                            primary: i == 0,
                            ips: if unit == 1 { e.len() } else { 0 },
                            prefixes: if unit == 1 { 0 } else { e.len() },
                            free_prefixes: if unit == 1 {
                                0
                            } else {
                                e.iter().filter(|a| **a == 0).count()
                            },
                            assigned,
                            cooldown: 0,
                            available: e.len() * unit - assigned,
                            age: Duration::from_secs(3600),
                            hosts_pods: true,
                        }
                    })
                    .collect(),
                max_enis: self.max_enis,
                unmanaged_enis: 0,
                slots_per_eni: self.slots,
                max_pods: self.max_pods,
                min_eni_age: Duration::from_secs(60),
            }
        }
        fn idx(eni: &str) -> usize {
            eni.trim_start_matches("eni-").parse().unwrap()
        }
        fn settle(&mut self) {
            for _ in 0..100 {
                match plan(&self.view(), &self.t, true) {
                    Step::Nothing => return,
                    Step::AssignIps { eni, count } | Step::AssignPrefixes { eni, count } => {
                        let e = &mut self.enis[Self::idx(&eni)];
                        assert!(e.len() + count as usize <= self.slots);
                        e.extend(std::iter::repeat_n(0, count as usize));
                    }
                    Step::NewEni { ips, prefixes } => {
                        assert!(self.enis.len() < self.max_enis);
                        self.enis.push(vec![0; (ips + prefixes) as usize]);
                    }
                    Step::ReleaseIps { eni, count } | Step::ReleasePrefixes { eni, count } => {
                        let e = &mut self.enis[Self::idx(&eni)];
                        for _ in 0..count {
                            let i = e.iter().rposition(|a| *a == 0).unwrap();
                            e.remove(i);
                        }
                    }
                    Step::FreeEni { eni } => {
                        let i = Self::idx(&eni);
                        assert_eq!(i, self.enis.len() - 1, "test model frees the last ENI only");
                        self.enis.pop();
                    }
                }
            }
            panic!("pool did not settle");
        }
        fn add_pods(&mut self, n: usize) {
            let unit = self.unit();
            for _ in 0..n {
                let slot = self
                    .enis
                    .iter_mut()
                    .flat_map(|e| e.iter_mut())
                    .find(|a| **a < unit)
                    .expect("a free address for the pod");
                *slot += 1;
                self.settle();
            }
        }
        fn del_pods(&mut self, n: usize) {
            for _ in 0..n {
                let slot = self
                    .enis
                    .iter_mut()
                    .rev()
                    .flat_map(|e| e.iter_mut().rev())
                    .find(|a| **a > 0)
                    .unwrap();
                *slot -= 1;
                self.settle();
            }
        }
        /// Addresses (IP mode) or prefixes (prefix mode) per ENI.
        fn shape(&self) -> Vec<usize> {
            self.enis.iter().map(Vec::len).collect()
        }
    }

    fn eni_t(w: u32) -> Targets {
        Targets {
            warm_eni: w,
            ..Targets::default()
        }
    }
    fn ip_t(w: u32, m: u32) -> Targets {
        Targets {
            warm_ip: Some(w),
            minimum_ip: Some(m),
            ..Targets::default()
        }
    }
    fn pd_t(wp: u32) -> Targets {
        Targets {
            warm_prefix: wp,
            prefix_delegation: true,
            ..Targets::default()
        }
    }
    fn pd_ip_t(w: u32, m: u32) -> Targets {
        Targets {
            prefix_delegation: true,
            ..ip_t(w, m)
        }
    }

    fn shape_after(
        slots: usize,
        enis: usize,
        max_pods: usize,
        t: Targets,
        pods: usize,
    ) -> Vec<usize> {
        let mut n = Node::new(slots, enis, max_pods, t);
        n.add_pods(pods);
        n.shape()
    }

    // docs/eni-and-ip-target.md, t3.small (3 ENIs x 4 addresses, max pods 11).
    #[test]
    fn eni_and_ip_target_t3_small() {
        assert_eq!(shape_after(3, 3, 11, eni_t(1), 0), vec![3]); // E1
        assert_eq!(shape_after(3, 3, 11, eni_t(1), 5), vec![3, 3, 3]); // E2
        assert_eq!(shape_after(3, 3, 11, eni_t(1), 9), vec![3, 3, 3]); // E3
        assert_eq!(shape_after(3, 3, 11, ip_t(1, 1), 0), vec![1]); // E4
        assert_eq!(shape_after(3, 3, 11, ip_t(1, 1), 5), vec![3, 3]); // E5
        assert_eq!(shape_after(3, 3, 11, ip_t(1, 1), 9), vec![3, 3, 3]); // E6
        assert_eq!(shape_after(3, 3, 11, ip_t(2, 5), 0), vec![3, 2]); // E7
        assert_eq!(shape_after(3, 3, 11, ip_t(2, 5), 5), vec![3, 3, 1]); // E8
        assert_eq!(shape_after(3, 3, 11, ip_t(2, 5), 9), vec![3, 3, 3]); // E9
    }

    // docs/eni-and-ip-target.md, p3dn.24xlarge (15 ENIs x 50 addresses, max pods 737).
    #[test]
    fn eni_and_ip_target_p3dn() {
        assert_eq!(shape_after(49, 15, 737, eni_t(1), 0), vec![49]); // E10
        assert_eq!(shape_after(49, 15, 737, eni_t(1), 3), vec![49, 49]); // E11
        assert_eq!(shape_after(49, 15, 737, eni_t(1), 95), vec![49, 49, 49]); // E12
        assert_eq!(shape_after(49, 15, 737, ip_t(5, 10), 0), vec![10]); // E13
        assert_eq!(shape_after(49, 15, 737, ip_t(5, 10), 7), vec![12]); // E14
        assert_eq!(shape_after(49, 15, 737, ip_t(5, 10), 15), vec![20]); // E15
        assert_eq!(shape_after(49, 15, 737, ip_t(5, 10), 45), vec![49, 1]); // E16
    }

    // docs/prefix-and-ip-target.md, t3.small; prefix counts per ENI. The 58-pod rows need max
    // pods above the file's 11, as the docs assume (110 here).
    #[test]
    fn prefix_and_ip_target_t3_small() {
        assert_eq!(shape_after(3, 3, 110, pd_t(1), 0), vec![1]); // P1
        assert_eq!(shape_after(3, 3, 110, pd_t(1), 5), vec![2]); // P2
        assert_eq!(shape_after(3, 3, 110, pd_t(1), 16), vec![2]); // P3
        assert_eq!(shape_after(3, 3, 110, pd_t(1), 17), vec![3]); // P4
        assert_eq!(shape_after(3, 3, 110, pd_t(1), 58), vec![3, 2]); // P5
        assert_eq!(shape_after(3, 3, 110, pd_ip_t(1, 1), 0), vec![1]); // P6
        assert_eq!(shape_after(3, 3, 110, pd_ip_t(1, 1), 5), vec![1]); // P7
        assert_eq!(shape_after(3, 3, 110, pd_ip_t(1, 1), 17), vec![2]); // P8
        assert_eq!(shape_after(3, 3, 110, pd_ip_t(1, 1), 58), vec![3, 1]); // P9
                                                                           // P10: the doc says 1 prefix but MINIMUM_IP_TARGET=20 needs 2 (upstream's code agrees).
        assert_eq!(shape_after(3, 3, 110, pd_ip_t(7, 20), 0), vec![2]);
        assert_eq!(shape_after(3, 3, 110, pd_ip_t(7, 20), 5), vec![2]); // P11
        assert_eq!(shape_after(3, 3, 110, pd_ip_t(7, 20), 17), vec![2]); // P12
        assert_eq!(shape_after(3, 3, 110, pd_ip_t(7, 20), 58), vec![3, 2]); // P13
    }

    // docs/prefix-and-ip-target.md, p3dn.24xlarge: prefixes go to the ENI with room before a
    // new ENI is made (the doc's extra empty ENIs are not what upstream's code does).
    #[test]
    fn prefix_and_ip_target_p3dn() {
        assert_eq!(shape_after(49, 15, 737, pd_t(1), 0), vec![1]); // P14
        assert_eq!(shape_after(49, 15, 737, pd_t(1), 3), vec![2]); // P15
        assert_eq!(shape_after(49, 15, 737, pd_t(1), 95), vec![7]); // P16
        assert_eq!(shape_after(49, 15, 737, pd_ip_t(5, 10), 0), vec![1]); // P17
        assert_eq!(shape_after(49, 15, 737, pd_ip_t(5, 10), 7), vec![1]); // P18
        assert_eq!(shape_after(49, 15, 737, pd_ip_t(5, 10), 15), vec![2]); // P19
        assert_eq!(shape_after(49, 15, 737, pd_ip_t(5, 10), 45), vec![4]); // P20
    }

    #[test]
    fn shrinks_back_per_targets() {
        // Warm-ENI: whole ENIs go, down to target; single addresses never.
        let mut n = Node::new(3, 3, 11, eni_t(1));
        n.add_pods(9);
        n.del_pods(9);
        assert_eq!(n.shape(), vec![3]);
        // IP targets: surplus addresses go, then the idle ENI.
        let mut n = Node::new(3, 3, 11, ip_t(2, 5));
        n.add_pods(9);
        n.del_pods(9);
        assert_eq!(n.shape().iter().sum::<usize>(), 5);
        // Prefixes: free /28s beyond the target go.
        let mut n = Node::new(3, 3, 110, pd_t(1));
        n.add_pods(40);
        n.del_pods(40);
        assert_eq!(n.shape(), vec![1]);
    }

    #[test]
    fn never_past_max_pods_or_enis() {
        let mut n = Node::new(5, 3, 17, eni_t(1)); // t3.medium
        n.add_pods(15);
        assert_eq!(n.shape(), vec![5, 5, 5]);
        assert_eq!(
            ceiling(&n.view(), &n.t),
            Some(Ceiling::Enis { enis: 3, slots: 5 })
        );
        // MAX_ENI=1 and a small max pods in prefix mode: one prefix asked for, no more.
        let mut n = Node::new(3, 1, 12, pd_ip_t(30, 0));
        n.add_pods(0);
        assert_eq!(n.shape(), vec![1]);
    }

    #[test]
    fn a_primary_that_hosts_no_pods_is_never_grown() {
        // Custom networking: the primary holds no pod addresses; the first step is an ENI.
        let n = Node::new(3, 3, 11, eni_t(1));
        let mut v = n.view();
        v.enis.truncate(1);
        v.enis[0].ips = 0;
        v.enis[0].available = 0;
        v.enis[0].assigned = 0;
        v.enis[0].hosts_pods = false;
        assert_eq!(
            plan(&v, &eni_t(1), true),
            Step::NewEni {
                ips: 3,
                prefixes: 0
            }
        );
        v.max_enis = 1;
        assert_eq!(plan(&v, &eni_t(1), true), Step::Nothing);
        v.enis[0].hosts_pods = true;
        assert!(matches!(plan(&v, &eni_t(1), true), Step::AssignIps { .. }));
    }

    #[test]
    fn young_busy_or_cooling_enis_stay() {
        let mut v = Node::new(3, 3, 11, eni_t(0)).view();
        v.enis.push(EniView {
            id: "eni-1".into(),
            device_number: 1,
            primary: false,
            ips: 3,
            prefixes: 0,
            free_prefixes: 0,
            assigned: 0,
            cooldown: 0,
            available: 3,
            age: Duration::from_secs(10),
            hosts_pods: true,
        });
        assert_eq!(plan(&v, &eni_t(0), true), Step::Nothing);
        v.enis[1].age = Duration::from_secs(120);
        assert_eq!(
            plan(&v, &eni_t(0), true),
            Step::FreeEni {
                eni: "eni-1".into()
            }
        );
        v.enis[1].cooldown = 1;
        v.enis[1].available = 2;
        assert_eq!(plan(&v, &eni_t(0), true), Step::Nothing);
    }

    #[test]
    fn releases_wait_for_the_decrease_interval() {
        let mut n = Node::new(3, 3, 11, ip_t(1, 0));
        n.add_pods(2);
        assert_eq!(n.shape(), vec![3]);
        n.enis[0][0] = 0;
        let v = n.view();
        assert_eq!(plan(&v, &n.t, false), Step::Nothing);
        assert!(matches!(
            plan(&v, &n.t, true),
            Step::ReleaseIps { count: 1, .. }
        ));
    }
}
