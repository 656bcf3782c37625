//! The pool manager: turns the warm-pool planner's steps into EC2 calls and datastore changes.
//!
//! Woken by every ADD/DEL (so a pool that drops below target refills at once) and by a periodic
//! tick. EC2 calls are made without holding the datastore lock; addresses leave the datastore
//! before they are unassigned in EC2 (so no pod can get one that is going away) and come back if
//! the call fails.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cni_proto::FailureReason;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::cloud::imds::Imds;
use crate::cloud::{self, CloudError, Ec2, EniFilter, EniInfo, ErrorKind, NewEni};
use crate::config::Timing;
use crate::hostnet::LINK_WAIT;
use crate::k8s::events::Recorder;
use crate::pool::datastore::{Datastore, Eni, Prefix};
use crate::pool::lifecycle::{self as lifecycle, NodeNetworking, StepError};
use crate::pool::placement::{Blocked, Mode, Placement, Target};
use crate::pool::warm::{self, Ceiling, EniView, PoolView, Step, Targets};
use crate::pool::Pool;

/// Leaked ENIs younger than this may still be on their way to being attached.
pub const LEAK_MIN_AGE: Duration = Duration::from_secs(300);
/// ADD waits this long for a refill that is under way before reporting the pool empty.
pub const ADD_WAIT: Duration = Duration::from_secs(10);

/// What the manager needs to know about the node that IMDS told us at start.
#[derive(Debug, Clone, Default)]
pub struct CloudNode {
    pub instance_id: String,
    /// The primary ENI's MAC: whose VPC CIDRs a reconcile reads.
    pub primary_mac: String,
    pub vpc_id: String,
    pub subnet_id: String,
    pub subnet_cidr: ipnet::Ipv4Net,
    pub security_groups: Vec<String>,
    /// ENIs attached to the node that ipamd does not manage, by device index.
    pub unmanaged: BTreeMap<u32, String>,
    /// Attachment id of every managed ENI, for detaching.
    pub attachments: HashMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// ENIs the node may have (instance type, MAX_ENI), primary included.
    pub max_enis: usize,
    /// Ipv4AddressesPerInterface - 1.
    pub slots_per_eni: usize,
    /// May pods get addresses of the primary ENI? Not under custom networking.
    pub primary_hosts_pods: bool,
}

pub struct Manager<E: Ec2> {
    pub ec2: Arc<E>,
    pub shared: Arc<Pool>,
    pub imds: Option<Arc<Imds>>,
    pub node: CloudNode,
    pub limits: Limits,
    pub targets: Targets,
    pub timing: Timing,
    pub cluster_name: String,
    pub extra_tags: BTreeMap<String, String>,
    pub leak_cleanup: bool,
    /// Secondary ENIs' links, tables and rules; None in standalone tests of the pool alone.
    pub net: Option<Arc<dyn NodeNetworking>>,
    /// Where new ENIs go (the node's subnet unless custom networking or subnet discovery).
    pub placement: Arc<Placement>,
    pub events: Recorder,
    /// False with DISABLE_NETWORK_RESOURCE_PROVISIONING or ENABLE_IMDS_ONLY_MODE: the pool is
    /// never grown or shrunk; reconcile still adopts what others attach.
    pub provisioning: bool,
    /// The node as the Kubernetes API shows it: with `manage_cordoned` false (upstream's
    /// default of AWS_MANAGE_ENIS_NON_SCHEDULABLE) a cordoned node's pool is left as it is.
    pub node_view: Option<tokio::sync::watch::Receiver<crate::k8s::eniconfig::View>>,
    pub manage_cordoned: bool,
    /// MANAGE_UNTAGGED_ENI: false leaves alone ENIs without an instance-id tag.
    pub manage_untagged: bool,
    /// ENABLE_IMDS_ONLY_MODE: reconcile takes the ENIs from IMDS, never from EC2.
    pub imds_only: bool,
    /// Whether the current reason to leave the pool alone has been logged.
    hold_said: Option<&'static str>,
    /// The subnets the last ENI creation tried, for the subnet-full message.
    last_subnets: String,
    last_release: Option<Instant>,
    growth_paused_until: Option<Instant>,
    /// Growth calls in a row that EC2 accepted without the pool growing.
    no_progress: u32,
}

fn grows(s: &Step) -> bool {
    matches!(
        s,
        Step::AssignIps { .. } | Step::AssignPrefixes { .. } | Step::NewEni { .. }
    )
}

/// The planner's picture of the datastore.
pub fn pool_view(ds: &Datastore, limits: &Limits, unmanaged: usize, min_age: Duration) -> PoolView {
    let now = SystemTime::now();
    PoolView {
        enis: ds
            .enis()
            .map(|e| {
                let st = ds.eni_stats(&e.id).unwrap_or_default();
                EniView {
                    id: e.id.clone(),
                    device_number: e.device_number,
                    primary: e.primary,
                    ips: e.ips.len(),
                    prefixes: e.prefixes.len(),
                    free_prefixes: ds.free_prefixes(&e.id).len(),
                    assigned: st.assigned,
                    cooldown: st.cooldown,
                    available: st.available,
                    age: now.duration_since(e.attached_at).unwrap_or_default(),
                    hosts_pods: !e.primary || limits.primary_hosts_pods,
                }
            })
            .collect(),
        max_enis: limits.max_enis,
        unmanaged_enis: unmanaged,
        slots_per_eni: limits.slots_per_eni,
        max_pods: ds.max_pods(),
        min_eni_age: min_age,
    }
}

impl<E: Ec2> Manager<E> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ec2: Arc<E>,
        shared: Arc<Pool>,
        imds: Option<Arc<Imds>>,
        node: CloudNode,
        limits: Limits,
        targets: Targets,
        timing: Timing,
        cluster_name: String,
        extra_tags: BTreeMap<String, String>,
        leak_cleanup: bool,
    ) -> Self {
        let placement = Arc::new(Placement::new(
            Mode::NodeSubnet,
            Target {
                subnet_id: node.subnet_id.clone(),
                subnet_cidr: node.subnet_cidr,
                security_groups: node.security_groups.clone(),
                why: "the node's subnet".into(),
            },
            node.vpc_id.clone(),
            String::new(),
        ));
        Manager {
            ec2,
            shared,
            imds,
            placement,
            events: Recorder::none(),
            last_subnets: node.subnet_id.clone(),
            node,
            limits,
            targets,
            timing,
            cluster_name,
            extra_tags,
            leak_cleanup,
            net: None,
            provisioning: true,
            node_view: None,
            manage_cordoned: true,
            manage_untagged: true,
            imds_only: false,
            hold_said: None,
            last_release: None,
            growth_paused_until: None,
            no_progress: 0,
        }
    }

    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.timing.pool_check);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reconcile = Instant::now();
        // The first sweep for leaked ENIs comes right after the first pass over the pool, not
        // before it: a fresh node's first pods do not wait for its DescribeNetworkInterfaces
        // (upstream sweeps in the background, after a random delay of up to 5 minutes).
        let mut last_leak: Option<Instant> = None;
        loop {
            let placement = self.placement.clone();
            tokio::select! {
                _ = self.shared.pool_changed.notified() => {}
                _ = tick.tick() => {}
                _ = placement.changed() => {}
            }
            self.publish_limits();
            if let Some(why) = self.hold() {
                if self.hold_said != Some(why) {
                    info!("the pool is left as it is: {why}");
                    self.hold_said = Some(why);
                }
            } else {
                self.hold_said = None;
                self.converge().instrument(info_span!("pool")).await;
            }
            if last_reconcile.elapsed() >= self.timing.reconcile {
                self.reconcile().instrument(info_span!("reconcile")).await;
                last_reconcile = Instant::now();
            }
            if self.leak_cleanup
                && last_leak.is_none_or(|t| t.elapsed() >= self.timing.leak_cleanup)
            {
                self.cleanup_leaked().await;
                last_leak = Some(Instant::now());
            }
        }
    }

    /// `awscni_eni_max` and `awscni_ip_max` as upstream counts them: ENIs ipamd may use (the
    /// instance's, less those left alone) and their addresses.
    fn publish_limits(&self) {
        let enis = self
            .limits
            .max_enis
            .saturating_sub(self.node.unmanaged.len());
        let per = if self.targets.prefix_delegation {
            16
        } else {
            1
        };
        let m = crate::metrics::global();
        m.eni_max.set(enis as i64);
        m.ip_max
            .set((enis * self.limits.slots_per_eni * per) as i64);
    }

    /// Why the pool must not be grown or shrunk now, if it must not.
    fn hold(&self) -> Option<&'static str> {
        if !self.provisioning {
            return Some("DISABLE_NETWORK_RESOURCE_PROVISIONING or ENABLE_IMDS_ONLY_MODE is set");
        }
        let cordoned = self
            .node_view
            .as_ref()
            .is_some_and(|v| v.borrow().node.as_ref().is_some_and(|n| n.unschedulable));
        (cordoned && !self.manage_cordoned)
            .then_some("the node is cordoned and AWS_MANAGE_ENIS_NON_SCHEDULABLE is false")
    }

    /// Plan and execute steps until the pool is on target (or a step fails).
    pub async fn converge(&mut self) {
        for _ in 0..64 {
            let may_release = self
                .last_release
                .is_none_or(|t| t.elapsed() >= self.timing.decrease);
            let (step, ceiling) = {
                let mut ds = self.shared.ds.lock().await;
                ds.expire_cooldowns(SystemTime::now());
                let v = pool_view(
                    &ds,
                    &self.limits,
                    self.node.unmanaged.len(),
                    self.timing.min_eni_age,
                );
                let (short, over) = warm::short_over(&v, &self.targets);
                let m = crate::metrics::global();
                m.pool_short.set(short as i64);
                m.pool_over.set(over as i64);
                (
                    warm::plan(&v, &self.targets, may_release),
                    warm::ceiling(&v, &self.targets),
                )
            };
            let paused = self.growth_paused_until.is_some_and(|t| Instant::now() < t);
            let growing = grows(&step) && !paused;
            self.shared.growing.store(growing, Ordering::Release);
            self.set_ceiling(ceiling);
            if step == Step::Nothing || (grows(&step) && paused) {
                break;
            }
            debug!(?step, "pool step");
            let before = self.total_addresses().await;
            match self.execute(step.clone()).await {
                Ok(()) => {
                    if grows(&step) && !self.grew_since(&step, before).await {
                        // Accepted and nothing to show for it: retrying at once would spend the
                        // account's EC2 budget in a loop (upstream's failure mode at scale).
                        self.on_no_progress(&step);
                        break;
                    }
                    if grows(&step) {
                        if self.no_progress > 0 {
                            info!(after = self.no_progress, "EC2 calls grow the pool again");
                            crate::metrics::global().ec2_no_progress_streak.set(0);
                        }
                        self.no_progress = 0;
                        self.clear_note();
                    }
                    if matches!(step, Step::ReleaseIps { .. } | Step::ReleasePrefixes { .. }) {
                        self.last_release = Some(Instant::now());
                    }
                    self.shared.update_health().await;
                    self.shared.pool_grew.notify_waiters();
                }
                Err(e) => {
                    self.on_error(&step, &e);
                    break;
                }
            }
        }
        self.shared.growing.store(false, Ordering::Release);
        self.shared.pool_grew.notify_waiters();
    }

    async fn total_addresses(&self) -> usize {
        self.shared.ds.lock().await.stats().total
    }

    /// Did the pool grow past `before`? When the reply brought nothing new, one describe of
    /// the ENI asks EC2 what it really holds (its answer may lag the reply, or run ahead).
    async fn grew_since(&self, step: &Step, before: usize) -> bool {
        if self.total_addresses().await > before {
            return true;
        }
        let eni = match step {
            Step::AssignIps { eni, .. } | Step::AssignPrefixes { eni, .. } => eni,
            _ => return false,
        };
        if let Err(e) = self.resync_eni(eni).await {
            warn!(%eni, error = %e, "cannot confirm the assignment with EC2");
        }
        self.total_addresses().await > before
    }

    /// One more growth step in a row without progress (no-op or throttled): pause growth for
    /// 1 s doubling per step, jittered ±20 %, at most `growth_backoff_max` (and at most a
    /// minute while EC2 throttles: the account's budget refills in seconds, and the node's
    /// adaptive bucket already spaces its calls). Returns the pause.
    fn pause_growth(&mut self, throttled: bool) -> Duration {
        self.no_progress += 1;
        let max = if throttled {
            self.timing.growth_backoff_max.min(Duration::from_secs(60))
        } else {
            self.timing.growth_backoff_max
        };
        let base = Duration::from_secs(1).min(max);
        let exp = base
            .saturating_mul(1u32 << (self.no_progress - 1).min(20))
            .min(max);
        let jitter = 0.8 + 0.4 * rand::random::<f64>();
        let pause = exp.mul_f64(jitter).min(max);
        self.growth_paused_until = Some(Instant::now() + pause);
        pause
    }

    /// Count a growth call that EC2 accepted without the pool growing, and pause growth.
    fn on_no_progress(&mut self, step: &Step) {
        let pause = self.pause_growth(false);
        let m = crate::metrics::global();
        m.ec2_no_progress_count.inc();
        m.ec2_no_progress_streak.set(self.no_progress as i64);
        let asked = match step {
            Step::AssignIps { eni, count } => {
                format!("AssignPrivateIpAddresses of {count} address(es) on {eni}")
            }
            Step::AssignPrefixes { eni, count } => {
                format!("AssignPrivateIpAddresses of {count} /28 prefix(es) on {eni}")
            }
            Step::NewEni { ips, prefixes } => {
                format!("a new ENI with {ips} address(es) and {prefixes} prefix(es)")
            }
            other => format!("{other:?}"),
        };
        let msg = format!(
            "EC2 accepted {asked} but neither its reply nor a describe shows anything new; {} such call(s) in a row; growth paused for {:.1}s",
            self.no_progress,
            pause.as_secs_f64()
        );
        warn!("{msg}");
        self.note(FailureReason::PoolEmpty, msg);
    }

    fn set_ceiling(&self, c: Option<Ceiling>) {
        let text = c.map(|c| match c {
            Ceiling::MaxPods(n) => format!("max pods reached ({n})"),
            Ceiling::Enis { enis, slots } => {
                format!("all {enis} ENIs attached, each holding its {slots} addresses")
            }
        });
        if let Ok(mut g) = self.shared.ceiling.lock() {
            *g = text;
        }
    }

    fn note(&self, reason: FailureReason, msg: String) {
        if let Ok(mut g) = self.shared.pool_note.lock() {
            *g = Some((reason, msg));
        }
    }

    fn growth_note(&self) -> Option<String> {
        self.shared.growth_note()
    }

    fn clear_note(&self) {
        if let Ok(mut g) = self.shared.pool_note.lock() {
            *g = None;
        }
    }

    fn on_error(&mut self, step: &Step, e: &StepError) {
        let what = match step {
            Step::AssignIps { .. } | Step::AssignPrefixes { .. } => {
                "increaseIPPoolAllocIPAddressesFailed"
            }
            Step::NewEni { .. } => "increaseIPPoolAllocENI",
            Step::ReleaseIps { .. } | Step::ReleasePrefixes { .. } => "decreaseIPPool",
            Step::FreeEni { .. } => "decreaseIPPoolFreeENIFailed",
            Step::Nothing => "pool",
        };
        crate::metrics::global()
            .ipamd_error_count
            .with_label_values(&[what])
            .inc();
        let e = match e {
            StepError::Cloud(c) => c,
            StepError::Placement(b) => {
                let msg = format!("no ENI can be added: {b}");
                if self.growth_note().as_deref() != Some(msg.as_str()) {
                    warn!("{msg}");
                    let reason = match b {
                        Blocked::NoEniConfig(_) => "MissingENIConfig",
                        Blocked::Unknown(_) => "ENIConfigUnknown",
                        Blocked::Cloud(_) => "ENIConfigSubnet",
                    };
                    self.events.warn(reason, msg.clone());
                }
                self.note(FailureReason::PoolEmpty, msg);
                return;
            }
            other => {
                error!(error = %other, ?step, "pool step failed");
                return;
            }
        };
        match e.kind {
            ErrorKind::SubnetFull | ErrorKind::NoCidrBlocks => {
                let what = if e.kind == ErrorKind::SubnetFull {
                    "has no free addresses"
                } else {
                    "has no free /28 blocks"
                };
                let msg = format!(
                    "subnet {} {what} ({}); growth paused for {}s",
                    self.last_subnets,
                    e.code,
                    self.timing.subnet_full_backoff.as_secs()
                );
                error!(error = %e, "{msg}");
                self.events.warn("SubnetFull", msg.clone());
                self.growth_paused_until = Some(Instant::now() + self.timing.subnet_full_backoff);
                self.note(FailureReason::SubnetFull, msg);
            }
            ErrorKind::Throttled if grows(step) => {
                // Past the per-call retries: the account's budget is spent. Every node retrying
                // on its next pool check would keep it spent; back off like for no progress.
                let pause = self.pause_growth(true);
                let msg = format!(
                    "EC2 is throttling this node's calls ({}); {} throttled step(s) in a row; growth paused for {:.1}s",
                    e.code,
                    self.no_progress,
                    pause.as_secs_f64()
                );
                warn!(error = %e, ?step, "{msg}");
                self.note(FailureReason::Throttled, msg);
            }
            ErrorKind::Throttled => {
                warn!(error = %e, ?step, "EC2 keeps throttling; will retry");
            }
            ErrorKind::Unauthorized => {
                let msg = format!("the node's IAM role may not call ec2:{} ({})", e.op, e.code);
                warn!(error = %e, "{msg}");
                self.events.warn("MissingIAMPermissions", msg.clone());
                self.note(FailureReason::PoolEmpty, msg);
            }
            _ => {
                warn!(error = %e, ?step, "pool step failed");
            }
        }
    }

    async fn execute(&mut self, step: Step) -> Result<(), StepError> {
        let _busy = crate::metrics::InProgress::start(if grows(&step) {
            "increaseDatastorePool"
        } else {
            "decreaseDatastorePool"
        });
        match step {
            Step::Nothing => Ok(()),
            Step::AssignIps { eni, count } => {
                match self.ec2.assign_ips(&eni, count).await {
                    Ok(ips) => {
                        let mut ds = self.shared.ds.lock().await;
                        for ip in &ips {
                            if let Err(e) = ds.add_ip(&eni, *ip) {
                                warn!(%eni, %ip, error = %e, "assigned address not added");
                            }
                        }
                        info!(%eni, count = ips.len(), "assigned secondary IPs");
                        Ok(())
                    }
                    // Our count was off (someone else assigned): take EC2's word for it.
                    Err(e) if e.kind == ErrorKind::Limit => Ok(self.resync_eni(&eni).await?),
                    Err(e) => Err(e.into()),
                }
            }
            Step::AssignPrefixes { eni, count } => {
                match self.ec2.assign_prefixes(&eni, count).await {
                    Ok(ps) => {
                        let mut ds = self.shared.ds.lock().await;
                        for p in &ps {
                            if let Err(e) = ds.add_prefix(&eni, *p) {
                                warn!(%eni, prefix = %p.0, error = %e, "assigned prefix not added");
                            }
                        }
                        info!(%eni, count = ps.len(), "assigned /28 prefixes");
                        Ok(())
                    }
                    Err(e) if e.kind == ErrorKind::Limit => Ok(self.resync_eni(&eni).await?),
                    Err(e) => Err(e.into()),
                }
            }
            Step::NewEni { ips, prefixes } => self.new_eni(ips, prefixes).await,
            Step::ReleaseIps { eni, count } => {
                let ips: Vec<Ipv4Addr> = {
                    let mut ds = self.shared.ds.lock().await;
                    let mut picked = ds.free_ips(&eni);
                    // The most recently added go first: older ones are more likely in IMDS already.
                    picked.reverse();
                    picked.truncate(count as usize);
                    picked.retain(|ip| ds.remove_ip(*ip));
                    picked
                };
                if ips.is_empty() {
                    return Ok(());
                }
                match self.ec2.unassign_ips(&eni, &ips).await {
                    Ok(()) => {
                        info!(%eni, count = ips.len(), "released surplus IPs");
                        Ok(())
                    }
                    Err(e) => {
                        let mut ds = self.shared.ds.lock().await;
                        for ip in ips {
                            let _ = ds.add_ip(&eni, ip);
                        }
                        Err(e.into())
                    }
                }
            }
            Step::ReleasePrefixes { eni, count } => {
                let ps: Vec<Prefix> = {
                    let mut ds = self.shared.ds.lock().await;
                    let mut picked = ds.free_prefixes(&eni);
                    picked.reverse();
                    picked.truncate(count as usize);
                    picked.retain(|p| ds.remove_prefix(&eni, *p));
                    picked
                };
                if ps.is_empty() {
                    return Ok(());
                }
                match self.ec2.unassign_prefixes(&eni, &ps).await {
                    Ok(()) => {
                        info!(%eni, count = ps.len(), "released surplus prefixes");
                        Ok(())
                    }
                    Err(e) => {
                        let mut ds = self.shared.ds.lock().await;
                        for p in ps {
                            let _ = ds.add_prefix(&eni, p);
                        }
                        Err(e.into())
                    }
                }
            }
            Step::FreeEni { eni } => self.free_eni(&eni).await,
        }
    }

    fn next_device_index(&self, ds: &Datastore) -> u32 {
        let used: HashSet<u32> = ds
            .enis()
            .map(|e| e.device_number)
            .chain(self.node.unmanaged.keys().copied())
            .collect();
        (1..).find(|i| !used.contains(i)).unwrap_or(1)
    }

    fn eni_tags(&self) -> BTreeMap<String, String> {
        let mut tags = self.extra_tags.clone();
        tags.insert(
            cloud::TAG_INSTANCE_ID.to_string(),
            self.node.instance_id.clone(),
        );
        tags.insert(
            cloud::TAG_CREATED_AT.to_string(),
            humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        );
        if !self.cluster_name.is_empty() {
            tags.insert(
                cloud::TAG_CLUSTER_NAME.to_string(),
                self.cluster_name.clone(),
            );
        }
        tags
    }

    /// Create, attach, set DeleteOnTermination: three calls, and the addresses come with the
    /// create reply, so there is no wait for IMDS. Then node networking, then the pool; a step
    /// that fails undoes the ones before it.
    async fn new_eni(&mut self, ips: u32, prefixes: u32) -> Result<(), StepError> {
        let targets = self
            .placement
            .targets(&*self.ec2)
            .await
            .map_err(StepError::Placement)?;
        self.last_subnets = targets
            .iter()
            .map(|t| t.subnet_id.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        // Discovery lists the subnets best first: a full one sends the ENI to the next.
        let mut last_err = None;
        let mut made = None;
        for t in &targets {
            let req = NewEni {
                subnet_id: t.subnet_id.clone(),
                security_groups: t.security_groups.clone(),
                description: format!("{}{}", cloud::ENI_DESCRIPTION_PREFIX, self.node.instance_id),
                tags: self.eni_tags(),
                secondary_ips: ips,
                prefixes,
            };
            match self.ec2.create_eni(req).await {
                Ok(c) => {
                    made = Some((c, t.clone()));
                    break;
                }
                Err(e) if matches!(e.kind, ErrorKind::SubnetFull | ErrorKind::NoCidrBlocks) => {
                    info!(subnet = %t.subnet_id, code = %e.code, "subnet full; trying the next one");
                    self.placement.subnet_full(&t.subnet_id);
                    last_err = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let Some((created, target)) = made else {
            return Err(match last_err {
                Some(e) => e.into(),
                None => StepError::Placement(Blocked::NoEniConfig("no subnet to use".into())),
            });
        };
        let device = self.next_device_index(&*self.shared.ds.lock().await);
        let Some(eni) = lifecycle::from_ec2(&created, device, target.subnet_cidr) else {
            self.delete_eni_retrying(&created.id, "AllocENIDeleteErr")
                .await;
            return Err(StepError::NoAddress(created.id));
        };
        let attachment = match self
            .ec2
            .attach_eni(&created.id, &self.node.instance_id, device)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                self.delete_eni_retrying(&created.id, "AllocENIDeleteErr")
                    .await;
                return Err(e.into());
            }
        };
        if let Err(e) = self
            .ec2
            .set_delete_on_termination(&created.id, &attachment)
            .await
        {
            self.detach_and_delete(&created.id, &attachment).await;
            return Err(e.into());
        }
        if let Err(e) = self.bring_onto_node(eni.clone()).await {
            self.detach_and_delete(&created.id, &attachment).await;
            return Err(e);
        }
        self.node.attachments.insert(created.id.clone(), attachment);
        info!(eni = %created.id, device, subnet = %target.subnet_id, why = %target.why, security_groups = ?target.security_groups, ips = created.secondary_ips.len(), prefixes = created.prefixes.len(), "ENI attached");
        Ok(())
    }

    /// An attached ENI joins the node: networking first (pods get addresses of this ENI only
    /// once its link, table and rule exist), then the pool. On failure both are undone and the
    /// caller gives the ENI back (or, for one found in EC2, tries again next reconcile).
    async fn bring_onto_node(&self, eni: Eni) -> Result<(), StepError> {
        if let (Some(net), false) = (&self.net, eni.primary) {
            if let Err(source) = net.setup_eni(&eni, LINK_WAIT).await {
                net.teardown_eni(&eni).await;
                return Err(StepError::Networking {
                    eni: eni.id,
                    source,
                });
            }
        }
        let added = self.shared.ds.lock().await.add_eni(eni.clone());
        if let Err(source) = added {
            // Only a duplicate id or address gets here: nothing on the node may use this ENI.
            if let (Some(net), false) = (&self.net, eni.primary) {
                net.teardown_eni(&eni).await;
            }
            return Err(StepError::Pool {
                eni: eni.id,
                source,
            });
        }
        Ok(())
    }

    async fn detach_and_delete(&self, eni: &str, attachment: &str) {
        if let Err(e) = self.ec2.detach_eni(attachment).await {
            warn!(%eni, error = %e, "detach failed; leak cleanup will retry once it is detached");
            return;
        }
        self.delete_eni_retrying(eni, "FreeENIDeleteErr").await;
    }

    /// Delete an ENI, retrying while EC2 still calls it in use (a detached ENI takes a moment to
    /// become available). What cannot be deleted is left to the leaked-ENI sweep, and counted
    /// in `awscni_aws_utils_error_count{fn=what}` (the error label is EC2's code, not the
    /// message upstream puts there, so the series stay bounded).
    async fn delete_eni_retrying(&self, eni: &str, what: &'static str) {
        for attempt in 1..=5u32 {
            match self.ec2.delete_eni(eni).await {
                Ok(()) => return,
                Err(e) if e.kind == ErrorKind::NotFound => return,
                Err(e) if e.kind == ErrorKind::InUse && attempt < 5 => {
                    tokio::time::sleep(Duration::from_millis(500) * attempt).await;
                }
                Err(e) => {
                    warn!(%eni, error = %e, "delete failed; leak cleanup will retry");
                    crate::metrics::global()
                        .aws_utils_error_count
                        .with_label_values(&[what, e.label()])
                        .inc();
                    return;
                }
            }
        }
    }

    async fn free_eni(&mut self, eni_id: &str) -> Result<(), StepError> {
        let Some(attachment) = self.node.attachments.get(eni_id).cloned() else {
            warn!(eni = eni_id, "no attachment id known; not freeing");
            return Ok(());
        };
        let removed = match self.shared.ds.lock().await.remove_eni(eni_id) {
            Ok(e) => e,
            // A pod got an address meanwhile: keep the ENI.
            Err(_) => return Ok(()),
        };
        if let Some(net) = &self.net {
            net.teardown_eni(&removed).await;
        }
        if let Err(e) = self.ec2.detach_eni(&attachment).await {
            if e.kind != ErrorKind::NotFound {
                if let Some(net) = &self.net {
                    if let Err(se) = net.setup_eni(&removed, Duration::from_secs(1)).await {
                        warn!(eni = eni_id, error = %se, "ENI networking not restored");
                    }
                }
                let _ = self.shared.ds.lock().await.add_eni(removed);
                return Err(e.into());
            }
        }
        self.node.attachments.remove(eni_id);
        info!(eni = eni_id, "ENI detached");
        self.delete_eni_retrying(eni_id, "FreeENIDeleteErr").await;
        Ok(())
    }

    /// Take EC2's list of one ENI's addresses as the truth.
    async fn resync_eni(&self, eni: &str) -> Result<(), CloudError> {
        let found = self
            .ec2
            .describe_enis(EniFilter::Ids(vec![eni.to_string()]))
            .await?;
        let mut ds = self.shared.ds.lock().await;
        for info in found {
            apply_eni_addresses(&mut ds, &info);
        }
        Ok(())
    }

    /// IMDS costs no EC2 quota; only when it disagrees with the pool is EC2 asked, and only
    /// EC2's answer changes the pool (IMDS lags attach and assign, upstream #1967 and #3019).
    /// Of IMDS it reads only what it compares, and the VPC's CIDRs.
    pub async fn reconcile(&mut self) {
        let Some(imds) = &self.imds else { return };
        let read = futures::try_join!(imds.addresses(), imds.vpc_cidrs(&self.node.primary_mac));
        let (ifaces, vpc_cidrs) = match read {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "IMDS unreadable; skipping reconcile");
                return;
            }
        };
        self.refresh_host(&vpc_cidrs).await;
        let differs = {
            let ds = self.shared.ds.lock().await;
            let imds_enis: HashSet<&str> = ifaces
                .iter()
                .filter(|i| {
                    i.network_card == 0 && !self.node.unmanaged.values().any(|u| *u == i.id)
                })
                .map(|i| i.id.as_str())
                .collect();
            let ds_enis: HashSet<&str> = ds.enis().map(|e| e.id.as_str()).collect();
            imds_enis != ds_enis
                || ifaces.iter().any(|i| match ds.eni(&i.id) {
                    None => false,
                    Some(e) => {
                        let a: HashSet<Ipv4Addr> = i
                            .ips
                            .iter()
                            .copied()
                            .filter(|x| *x != e.primary_ip)
                            .collect();
                        let b: HashSet<Ipv4Addr> = e.ips.iter().copied().collect();
                        let pa: HashSet<Prefix> = i.prefixes.iter().copied().collect();
                        let pb: HashSet<Prefix> = e.prefixes.iter().copied().collect();
                        a != b || pa != pb
                    }
                })
        };
        if !differs {
            return;
        }
        let _busy = crate::metrics::InProgress::start("nodeIPPoolReconcile");
        if self.imds_only {
            info!("IMDS differs from the pool; ENABLE_IMDS_ONLY_MODE: taking IMDS's view");
            let full = match imds.interfaces().await {
                Ok(i) => i,
                Err(e) => {
                    warn!(error = %e, "IMDS unreadable; pool left as it is");
                    return;
                }
            };
            let id = self.node.instance_id.clone();
            let enis: Vec<EniInfo> = full.iter().map(|i| i.as_eni_info(&id)).collect();
            self.sync_from_ec2(&enis).await;
            return;
        }
        info!("IMDS differs from the pool; asking EC2");
        match self
            .ec2
            .describe_enis(EniFilter::AttachedTo(self.node.instance_id.clone()))
            .await
        {
            Ok(enis) => self.sync_from_ec2(&enis).await,
            Err(e) => warn!(error = %e, "cannot confirm with EC2; pool left as it is"),
        }
    }

    /// Adopt the VPC's current CIDRs and re-assert the node-wide rules (cheap when unchanged).
    async fn refresh_host(&self, vpc_cidrs: &[ipnet::Ipv4Net]) {
        if vpc_cidrs.is_empty() {
            return;
        }
        let changed = match self.shared.vpc_cidrs.write() {
            Ok(mut v) if v.as_slice() != vpc_cidrs => {
                info!(old = ?*v, new = ?vpc_cidrs, "VPC CIDRs changed");
                *v = vpc_cidrs.to_vec();
                true
            }
            _ => false,
        };
        if let Some(net) = &self.net {
            if let Err(e) = net.setup_host(vpc_cidrs).await {
                error!(error = %e, changed, "node networking not reconciled");
            }
        }
    }

    /// Make the pool agree with EC2's list of this instance's ENIs: ENIs attached behind
    /// ipamd's back join the node through the same lifecycle as ENIs it creates (networking,
    /// then the pool); ENIs EC2 no longer lists leave it (pool, then networking), unless pods
    /// still hold their addresses.
    pub async fn sync_from_ec2(&mut self, enis: &[EniInfo]) {
        let mut adopt = Vec::new();
        let gone: Vec<Eni> = {
            let mut ds = self.shared.ds.lock().await;
            let mut seen = HashSet::new();
            for info in enis {
                let Some(att) = &info.attachment else {
                    continue;
                };
                if let Some(why) = info.left_alone(self.manage_untagged) {
                    if self
                        .node
                        .unmanaged
                        .insert(att.device_index, info.id.clone())
                        .is_none()
                    {
                        info!(eni = %info.id, device = att.device_index, "ENI left alone: {why}");
                    }
                    continue;
                }
                seen.insert(info.id.clone());
                self.node
                    .attachments
                    .insert(info.id.clone(), att.id.clone());
                if ds.eni(&info.id).is_some() {
                    apply_eni_addresses(&mut ds, info);
                } else {
                    adopt.push((info.clone(), att.device_index));
                }
            }
            let ids: Vec<String> = ds
                .enis()
                .filter(|e| !seen.contains(&e.id))
                .map(|e| e.id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| match ds.remove_eni(&id) {
                    Ok(e) => Some(e),
                    Err(err) => {
                        error!(eni = %id, error = %err, "EC2 says this ENI is gone but pods use it; keeping their allocations");
                        None
                    }
                })
                .collect()
        };
        let m = crate::metrics::global();
        m.reconcile_count
            .with_label_values(&["eniReconcileAdd"])
            .inc_by(adopt.len() as u64);
        m.reconcile_count
            .with_label_values(&["eniReconcileDel"])
            .inc_by(gone.len() as u64);
        for e in gone {
            if let (Some(net), false) = (&self.net, e.primary) {
                net.teardown_eni(&e).await;
            }
            self.node.attachments.remove(&e.id);
            info!(eni = %e.id, "ENI no longer attached in EC2; removed from the pool and the node");
        }
        for (info, device) in adopt {
            let cidr = match self
                .placement
                .subnet_cidr(&*self.ec2, &info.subnet_id)
                .await
            {
                Ok(Some(c)) => c,
                Ok(None) => {
                    warn!(eni = %info.id, subnet = %info.subnet_id, "ENI found in EC2 not adopted: EC2 does not list its subnet");
                    continue;
                }
                Err(err) => {
                    warn!(eni = %info.id, error = %err, "ENI found in EC2 not adopted: its subnet could not be described; next reconcile tries again");
                    continue;
                }
            };
            let Some(e) = lifecycle::from_ec2(&info, device, cidr) else {
                continue;
            };
            let id = e.id.clone();
            match self.bring_onto_node(e).await {
                Ok(()) => {
                    info!(eni = %id, "ENI found attached in EC2 adopted: networking set up, addresses in the pool")
                }
                Err(err) => {
                    warn!(eni = %id, error = %err, "ENI found in EC2 not adopted; next reconcile tries again")
                }
            }
        }
        self.shared.pool_grew.notify_waiters();
    }

    /// Delete ENIs ipamd created that were never attached or were left detached.
    pub async fn cleanup_leaked(&self) {
        let filter = EniFilter::Leaked {
            vpc_id: self.node.vpc_id.clone(),
            instance_id: self
                .cluster_name
                .is_empty()
                .then(|| self.node.instance_id.clone()),
            cluster: (!self.cluster_name.is_empty()).then(|| self.cluster_name.clone()),
        };
        let enis = match self.ec2.describe_enis(filter).await {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "leaked-ENI sweep skipped");
                return;
            }
        };
        for e in enis {
            if !is_leaked(&e, SystemTime::now()) {
                continue;
            }
            match self.ec2.delete_eni(&e.id).await {
                Ok(()) => info!(eni = %e.id, "deleted leaked ENI"),
                Err(err) => {
                    warn!(eni = %e.id, error = %err, "could not delete leaked ENI");
                    crate::metrics::global()
                        .aws_utils_error_count
                        .with_label_values(&["cleanUpLeakedENIDeleteErr", err.label()])
                        .inc();
                }
            }
        }
    }
}

/// A detached ENI of ours (description, no no_manage tag) older than `LEAK_MIN_AGE` by its
/// createdAt tag. Without a readable tag it is left alone: its age is unknown.
pub fn is_leaked(e: &EniInfo, now: SystemTime) -> bool {
    if e.attachment.is_some()
        || e.no_manage()
        || !matches!(e.interface_type.as_str(), "" | "interface")
        || !e.description.starts_with(cloud::ENI_DESCRIPTION_PREFIX)
        || (!e.status.is_empty() && e.status != "available")
    {
        return false;
    }
    let Some(created) = e
        .tags
        .get(cloud::TAG_CREATED_AT)
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
    else {
        return false;
    };
    now.duration_since(created).unwrap_or_default() >= LEAK_MIN_AGE
}

/// Add what EC2 lists and the pool lacks; drop free addresses EC2 no longer lists.
fn apply_eni_addresses(ds: &mut Datastore, info: &EniInfo) {
    let Some(eni) = ds.eni(&info.id).cloned() else {
        return;
    };
    // Upstream's reconcile counts each address or prefix it adds or removes.
    let m = crate::metrics::global();
    let added = |n: &str| m.reconcile_count.with_label_values(&[n]).inc();
    for ip in &info.secondary_ips {
        if !eni.ips.contains(ip) && ds.add_ip(&info.id, *ip).is_ok() {
            added("eniDataStorePoolReconcileAdd");
        }
    }
    for p in &info.prefixes {
        if !eni.prefixes.contains(p) && ds.add_prefix(&info.id, *p).is_ok() {
            added("eniDataStorePoolReconcileAdd");
        }
    }
    for ip in eni.ips.iter().filter(|ip| !info.secondary_ips.contains(ip)) {
        if ds.remove_ip(*ip) {
            added("eniIPPoolReconcileDel");
        } else {
            error!(eni = %info.id, %ip, "EC2 no longer lists this address but a pod holds it");
        }
    }
    for p in eni.prefixes.iter().filter(|p| !info.prefixes.contains(p)) {
        if ds.remove_prefix(&info.id, *p) {
            added("eniIPPoolReconcileDel");
        } else {
            error!(eni = %info.id, prefix = %p.0, "EC2 no longer lists this prefix but pods hold it");
        }
    }
}

#[cfg(test)]
mod tests {
    //! The manager's failure paths over in-memory EC2 and node networking.

    use super::*;
    use crate::cloud::fake::FakeEc2;
    use crate::pool::checkpoint::Committer;
    use crate::pool::datastore::{Key, PodMeta};
    use crate::pool::lifecycle::fake::FakeNet;
    use tokio::sync::Mutex;

    struct Rig {
        mgr: Manager<FakeEc2>,
        ec2: Arc<FakeEc2>,
        net: Arc<FakeNet>,
        _dir: tempfile::TempDir,
    }

    impl Rig {
        async fn new(targets: Targets) -> Rig {
            let ec2 = Arc::new(FakeEc2::new("i-1", 5));
            let net = Arc::new(FakeNet::default());
            let dir = tempfile::tempdir().unwrap();
            let mut ds = Datastore::new(Duration::from_secs(30), 100);
            let mut node = CloudNode {
                instance_id: "i-1".into(),
                subnet_id: "subnet-1".into(),
                subnet_cidr: "10.0.0.0/16".parse().unwrap(),
                ..Default::default()
            };
            for info in ec2
                .describe_enis(EniFilter::AttachedTo("i-1".into()))
                .await
                .unwrap()
            {
                let att = info.attachment.clone().unwrap();
                node.attachments.insert(info.id.clone(), att.id.clone());
                ds.add_eni(
                    lifecycle::from_ec2(&info, att.device_index, "10.0.0.0/16".parse().unwrap())
                        .unwrap(),
                )
                .unwrap();
            }
            let ds = Arc::new(Mutex::new(ds));
            let committer = Committer::start(dir.path().join("ipam.json"), ds.clone());
            let shared = Arc::new(Pool::new(
                ds,
                committer,
                vec!["10.0.0.0/16".parse().unwrap()],
                false,
                "t3.medium".into(),
                true,
            ));
            let mut mgr = Manager::new(
                ec2.clone(),
                shared,
                None,
                node,
                Limits {
                    primary_hosts_pods: true,
                    max_enis: 3,
                    slots_per_eni: 5,
                },
                targets,
                Timing {
                    min_eni_age: Duration::ZERO,
                    decrease: Duration::ZERO,
                    ..Default::default()
                },
                String::new(),
                BTreeMap::new(),
                false,
            );
            let n: Arc<dyn NodeNetworking> = net.clone();
            mgr.net = Some(n);
            Rig {
                mgr,
                ec2,
                net,
                _dir: dir,
            }
        }

        /// Wants one more ENI: 8 free addresses, the primary holds 5.
        async fn growing() -> Rig {
            Rig::new(Targets {
                warm_ip: Some(8),
                ..Default::default()
            })
            .await
        }

        async fn pool_enis(&self) -> Vec<String> {
            self.mgr
                .shared
                .ds
                .lock()
                .await
                .enis()
                .map(|e| e.id.clone())
                .collect()
        }

        fn ec2_enis(&self) -> Vec<String> {
            self.ec2.lock().enis.keys().cloned().collect()
        }

        async fn sync(&mut self) {
            let enis = self
                .ec2
                .describe_enis(EniFilter::AttachedTo("i-1".into()))
                .await
                .unwrap();
            self.mgr.sync_from_ec2(&enis).await;
        }

        async fn assign(&self, n: usize) -> Vec<crate::pool::datastore::Allocation> {
            let mut ds = self.mgr.shared.ds.lock().await;
            (0..n)
                .map(|i| {
                    ds.assign(
                        Key {
                            network_name: "aws-cni".into(),
                            container_id: format!("c{i}"),
                            ifname: "eth0".into(),
                        },
                        PodMeta::default(),
                        SystemTime::now(),
                    )
                    .unwrap()
                })
                .collect()
        }
    }

    #[tokio::test]
    async fn grows_by_one_eni_through_attach_networking_and_pool() {
        let mut r = Rig::growing().await;
        r.mgr.converge().await;
        let enis = r.pool_enis().await;
        assert_eq!(enis.len(), 2, "{enis:?}");
        let new = enis.iter().find(|e| *e != "eni-primary").unwrap();
        assert!(r.net.set_up.lock().unwrap().contains(new));
        assert_eq!(r.ec2.calls("CreateNetworkInterface"), 1);
        assert_eq!(r.ec2.calls("AttachNetworkInterface"), 1);
        assert_eq!(r.ec2.calls("ModifyNetworkInterfaceAttribute"), 1);
    }

    #[tokio::test]
    async fn attach_failure_deletes_the_new_eni() {
        let mut r = Rig::growing().await;
        r.ec2.fail("AttachNetworkInterface", "InternalError");
        r.mgr.converge().await;
        assert_eq!(r.pool_enis().await, vec!["eni-primary".to_string()]);
        assert_eq!(
            r.ec2_enis(),
            vec!["eni-primary".to_string()],
            "created ENI deleted"
        );
        assert!(r.net.set_up.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn delete_on_termination_failure_detaches_and_deletes() {
        let mut r = Rig::growing().await;
        r.ec2
            .fail("ModifyNetworkInterfaceAttribute", "InternalError");
        r.mgr.converge().await;
        assert_eq!(r.pool_enis().await, vec!["eni-primary".to_string()]);
        assert_eq!(r.ec2_enis(), vec!["eni-primary".to_string()]);
        assert_eq!(r.ec2.calls("DetachNetworkInterface"), 1);
    }

    #[tokio::test]
    async fn a_cordoned_node_or_no_provisioning_holds_the_pool() {
        use crate::k8s::eniconfig::{NodeMeta, View};
        let mut r = Rig::growing().await;
        assert_eq!(r.mgr.hold(), None);
        let (tx, rx) = tokio::sync::watch::channel(View {
            node: Some(NodeMeta {
                unschedulable: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        r.mgr.node_view = Some(rx);
        r.mgr.manage_cordoned = false;
        assert!(r.mgr.hold().unwrap().contains("cordoned"));
        // AWS_MANAGE_ENIS_NON_SCHEDULABLE=true: managed all the same.
        r.mgr.manage_cordoned = true;
        assert_eq!(r.mgr.hold(), None);
        r.mgr.manage_cordoned = false;
        tx.send_modify(|v| v.node = Some(NodeMeta::default()));
        assert_eq!(r.mgr.hold(), None, "uncordoned");
        r.mgr.provisioning = false;
        assert!(r.mgr.hold().unwrap().contains("PROVISIONING"));
    }

    #[tokio::test]
    async fn an_eni_that_cannot_be_deleted_is_counted_as_upstream_does() {
        let mut r = Rig::growing().await;
        let count = || {
            crate::metrics::global()
                .aws_utils_error_count
                .with_label_values(&["AllocENIDeleteErr", "UnauthorizedOperation"])
                .get()
        };
        let before = count();
        r.ec2.fail("AttachNetworkInterface", "InternalError");
        r.ec2
            .fail("DeleteNetworkInterface", "UnauthorizedOperation");
        r.mgr.converge().await;
        assert_eq!(count(), before + 1);
    }

    #[tokio::test]
    async fn networking_failure_gives_the_eni_back_and_adds_nothing() {
        let mut r = Rig::growing().await;
        r.net
            .fail_all
            .store(true, std::sync::atomic::Ordering::Relaxed);
        r.mgr.converge().await;
        assert_eq!(r.pool_enis().await, vec!["eni-primary".to_string()]);
        assert_eq!(
            r.ec2_enis(),
            vec!["eni-primary".to_string()],
            "detached and deleted"
        );
        let torn = r.net.torn_down.lock().unwrap().clone();
        assert_eq!(torn.len(), 1, "the half-made networking is undone");
        // Not an EC2 error: no EC2 reason reaches ADD callers.
        assert!(r.mgr.shared.pool_note.lock().unwrap().is_none());
    }

    #[tokio::test]
    async fn an_eni_attached_behind_our_back_is_adopted_with_its_networking() {
        let mut r = Rig::new(Targets::default()).await;
        let foreign = r.ec2.attach_foreign(2, 4);
        r.net.fail.lock().unwrap().insert(foreign.clone());
        r.sync().await;
        assert!(
            !r.pool_enis().await.contains(&foreign),
            "no addresses from an ENI whose networking failed"
        );
        r.net.fail.lock().unwrap().clear();
        r.sync().await;
        assert!(r.pool_enis().await.contains(&foreign));
        assert!(r.net.set_up.lock().unwrap().contains(&foreign));
        let eni = r.mgr.shared.ds.lock().await.eni(&foreign).cloned().unwrap();
        assert_eq!(eni.device_number, 2);
        assert_eq!(eni.ips.len(), 4);
        assert_eq!(
            r.mgr.node.attachments.get(&foreign).map(String::as_str),
            Some(&*format!("attach-{foreign}"))
        );
    }

    #[tokio::test]
    async fn an_eni_ec2_drops_leaves_unless_pods_use_it() {
        let mut r = Rig::new(Targets::default()).await;
        let busy = r.ec2.attach_foreign(1, 2);
        let idle = r.ec2.attach_foreign(2, 2);
        r.sync().await;
        // Five on the primary, then the next lands on `busy` (added first).
        let allocs = r.assign(6).await;
        assert!(allocs.iter().any(|a| a.eni_id == busy), "{allocs:?}");
        for id in [&busy, &idle] {
            r.ec2.lock().enis.get_mut(id).unwrap().attachment = None;
        }
        r.sync().await;
        let enis = r.pool_enis().await;
        assert!(enis.contains(&busy), "pods keep their addresses");
        assert!(!enis.contains(&idle));
        let torn = r.net.torn_down.lock().unwrap().clone();
        assert_eq!(
            torn,
            vec![idle.clone()],
            "only the idle ENI's networking goes"
        );
    }

    #[tokio::test]
    async fn a_failed_detach_puts_the_eni_back_with_its_networking() {
        let mut r = Rig::new(Targets::default()).await;
        let id = r.ec2.attach_foreign(1, 2);
        r.sync().await;
        r.ec2.fail("DetachNetworkInterface", "InternalError");
        let e = r.mgr.free_eni(&id).await.unwrap_err();
        assert!(matches!(e, StepError::Cloud(_)), "{e}");
        assert!(r.pool_enis().await.contains(&id));
        assert!(
            r.net.set_up.lock().unwrap().contains(&id),
            "networking restored"
        );
        // Next time it goes: pool, networking, EC2.
        r.mgr.free_eni(&id).await.unwrap();
        assert!(!r.pool_enis().await.contains(&id));
        assert!(!r.ec2_enis().contains(&id));
    }

    #[tokio::test]
    async fn subnet_full_pauses_growth_and_names_the_subnet() {
        let mut r = Rig::growing().await;
        r.ec2.fail(
            "CreateNetworkInterface",
            "InsufficientFreeAddressesInSubnet",
        );
        r.mgr.converge().await;
        let note = r.mgr.shared.pool_note.lock().unwrap().clone().unwrap();
        assert_eq!(note.0, FailureReason::SubnetFull);
        assert!(note.1.contains("subnet-1"), "{}", note.1);
        // Paused: no second create while the backoff runs.
        r.mgr.converge().await;
        assert_eq!(r.ec2.calls("CreateNetworkInterface"), 1);
    }

    #[tokio::test]
    async fn accepted_calls_that_grow_nothing_back_off_and_recover() {
        let ec2 = Arc::new(FakeEc2::new("i-1", 2));
        let mut r = Rig::new(Targets {
            warm_ip: Some(4),
            ..Default::default()
        })
        .await;
        // The rig's own EC2 has 5 addresses on the primary: use one with room to grow.
        r.ec2 = ec2.clone();
        r.mgr.ec2 = ec2.clone();
        {
            let mut ds = r.mgr.shared.ds.lock().await;
            let _ = ds.remove_eni("eni-primary");
            let info = ec2.lock().enis["eni-primary"].clone();
            ds.add_eni(lifecycle::from_ec2(&info, 0, "10.0.0.0/16".parse().unwrap()).unwrap())
                .unwrap();
        }
        ec2.lock().noop.insert("AssignPrivateIpAddresses");
        r.mgr.converge().await;
        assert_eq!(ec2.calls("AssignPrivateIpAddresses"), 1);
        assert_eq!(
            ec2.calls("DescribeNetworkInterfaces"),
            1,
            "one describe to confirm"
        );
        assert_eq!(r.mgr.no_progress, 1);
        let note = r.mgr.shared.pool_note.lock().unwrap().clone().unwrap();
        assert!(
            note.1.contains("neither its reply nor a describe"),
            "{}",
            note.1
        );
        // Paused: converging again calls nothing.
        r.mgr.converge().await;
        r.mgr.converge().await;
        assert_eq!(ec2.calls("AssignPrivateIpAddresses"), 1);
        // The pause grows with each call in a row that changes nothing.
        r.mgr.growth_paused_until = None;
        r.mgr.converge().await;
        assert_eq!(r.mgr.no_progress, 2);
        let paused = r.mgr.growth_paused_until.unwrap() - Instant::now();
        assert!(paused > Duration::from_millis(1500), "{paused:?}");
        // EC2 behaves again: the next try after the pause grows the pool and resets all.
        ec2.lock().noop.clear();
        r.mgr.growth_paused_until = None;
        r.mgr.converge().await;
        assert_eq!(r.mgr.no_progress, 0);
        assert!(r.mgr.shared.pool_note.lock().unwrap().is_none());
        assert!(r.mgr.shared.ds.lock().await.stats().total >= 4);
    }

    #[tokio::test]
    async fn throttled_growth_pauses_instead_of_retrying_every_pool_check() {
        let mut r = Rig::growing().await;
        r.ec2.fail("CreateNetworkInterface", "RequestLimitExceeded");
        r.mgr.converge().await;
        let note = r.mgr.shared.pool_note.lock().unwrap().clone().unwrap();
        assert_eq!(note.0, FailureReason::Throttled);
        assert!(note.1.contains("growth paused"), "{}", note.1);
        assert_eq!(r.mgr.no_progress, 1);
        r.mgr.converge().await;
        r.mgr.converge().await;
        assert_eq!(
            r.ec2.calls("CreateNetworkInterface"),
            1,
            "paused: no call per pool check"
        );
        // The pause over, the next try goes through and clears it all.
        r.mgr.growth_paused_until = None;
        r.mgr.converge().await;
        assert_eq!(r.mgr.no_progress, 0);
        assert_eq!(r.pool_enis().await.len(), 2);
    }

    /// The rig's node subnet (the primary ENI's, see `Rig::new`) with a security group.
    fn node_target() -> Target {
        Target {
            subnet_id: "subnet-1".into(),
            subnet_cidr: "10.0.0.0/16".parse().unwrap(),
            security_groups: vec!["sg-node".into()],
            why: "node".into(),
        }
    }

    fn subnet(id: &str, cidr: &str, free: u64, role: Option<&str>) -> crate::cloud::SubnetInfo {
        crate::cloud::SubnetInfo {
            id: id.into(),
            vpc_id: "vpc-1".into(),
            az: "us-west-2a".into(),
            cidr: cidr.parse().ok(),
            available: free,
            tags: role
                .map(|r| [(cloud::TAG_CNI_ROLE.to_string(), r.to_string())].into())
                .unwrap_or_default(),
        }
    }

    #[tokio::test]
    async fn discovery_sends_the_eni_to_the_freest_subnet_and_moves_on_when_full() {
        let mut r = Rig::growing().await;
        r.ec2.lock().subnets = vec![
            subnet("subnet-1", "10.0.0.0/16", 2, None),
            subnet("subnet-a", "100.64.0.0/24", 6, Some("1")),
            subnet("subnet-b", "100.64.1.0/24", 5, Some("1")),
        ];
        r.mgr.node.security_groups = vec!["sg-node".into()];
        r.mgr.placement = Arc::new(Placement::new(
            Mode::Discovery {
                cluster: String::new(),
            },
            node_target(),
            "vpc-1".into(),
            "us-west-2a".into(),
        ));
        r.mgr.converge().await;
        let created = r.ec2.lock().created.clone();
        assert_eq!(created[0].subnet_id, "subnet-a", "most free first");
        assert_eq!(created[0].security_groups, ["sg-node"]);
        let eni = r
            .mgr
            .shared
            .ds
            .lock()
            .await
            .enis()
            .find(|e| !e.primary)
            .cloned()
            .unwrap();
        assert_eq!(eni.subnet_cidr, "100.64.0.0/24".parse().unwrap());
        // EC2 finds subnet-a full although the cached list still ranks it first: the next ENI
        // goes to subnet-b.
        {
            let mut st = r.ec2.lock();
            st.created.clear();
            st.subnets[1].available = 0;
            st.subnets[2].available = 50;
        }
        r.mgr.targets.warm_ip = Some(14);
        r.mgr.limits.max_enis = 4;
        r.mgr.converge().await;
        let subnets: Vec<String> = r
            .ec2
            .lock()
            .created
            .iter()
            .map(|c| c.subnet_id.clone())
            .collect();
        assert_eq!(subnets, ["subnet-b"], "{subnets:?}");
    }

    #[tokio::test]
    async fn custom_networking_without_an_eniconfig_adds_no_eni_and_says_why() {
        let mut r = Rig::growing().await;
        let (tx, rx) = tokio::sync::watch::channel(crate::k8s::eniconfig::View {
            node_synced: true,
            eniconfigs_synced: true,
            node: Some(Default::default()),
            ..Default::default()
        });
        r.mgr.limits.primary_hosts_pods = false;
        r.mgr.placement = Arc::new(Placement::new(
            Mode::Custom {
                keys: Default::default(),
                node_name: "n1".into(),
                view: rx,
            },
            node_target(),
            "vpc-1".into(),
            "us-west-2a".into(),
        ));
        r.mgr.converge().await;
        assert_eq!(r.ec2.calls("CreateNetworkInterface"), 0);
        assert_eq!(
            r.ec2.calls("AssignPrivateIpAddresses"),
            0,
            "the primary is not grown"
        );
        let note = r.mgr.shared.growth_note().unwrap();
        assert!(note.contains("no ENIConfig named \"default\""), "{note}");
        // The ENIConfig appears: the next ENI goes to its subnet with its groups.
        r.ec2.lock().subnets = vec![subnet("subnet-cn", "100.64.2.0/24", 100, None)];
        tx.send_modify(|v| {
            v.eniconfigs.insert(
                "default".into(),
                crate::k8s::eniconfig::EniConfigSpec {
                    subnet: "subnet-cn".into(),
                    security_groups: vec!["sg-pods".into()],
                },
            );
        });
        r.mgr.converge().await;
        let created = r.ec2.lock().created.clone();
        assert_eq!(created.len(), 1);
        assert_eq!(created[0].subnet_id, "subnet-cn");
        assert_eq!(created[0].security_groups, ["sg-pods"]);
    }

    #[tokio::test]
    async fn trunk_and_efa_enis_are_never_adopted() {
        let mut r = Rig::growing().await;
        let trunk = r.ec2.attach_foreign(1, 0);
        let efa = r.ec2.attach_foreign(2, 3);
        for (id, t) in [(&trunk, "trunk"), (&efa, "efa")] {
            r.ec2.lock().enis.get_mut(id).unwrap().interface_type = t.into();
        }
        r.sync().await;
        let pool = r.pool_enis().await;
        assert!(!pool.contains(&trunk) && !pool.contains(&efa), "{pool:?}");
        assert_eq!(r.mgr.node.unmanaged.len(), 2);
        assert!(r.net.set_up.lock().unwrap().is_empty());
    }
}
