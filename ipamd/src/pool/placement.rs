//! Where a new ENI goes: the node's own subnet, the subnet and security groups of the node's
//! ENIConfig (custom networking), or the subnet with the most free addresses among the node's
//! and the tagged ones of its VPC and zone (subnet discovery). The choice of subnets is pure
//! (`discovered`); the rest caches what EC2 and the Kubernetes watches said.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::cloud::{
    CloudError, Ec2, ErrorKind, SubnetFilter, SubnetInfo, TAG_CLUSTER_PREFIX, TAG_CNI_ROLE,
};
use crate::k8s::eniconfig::{self, Keys, Selection, View};

/// A discovered subnet list older than this is described again before the next ENI.
pub const SUBNET_REFRESH: Duration = Duration::from_secs(300);
/// After DescribeSubnets is denied, ENIs go to the node's subnet for this long before asking
/// again (an IAM fix is picked up without a restart).
pub const DENIED_RETRY: Duration = Duration::from_secs(600);

/// A subnet and the security groups a new ENI gets there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub subnet_id: String,
    pub subnet_cidr: ipnet::Ipv4Net,
    pub security_groups: Vec<String>,
    /// How the subnet was chosen, for the log.
    pub why: String,
}

/// Why no ENI can be placed now.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Blocked {
    /// Custom networking without a usable ENIConfig for this node.
    #[error("{0}")]
    NoEniConfig(String),
    /// The ENIConfig is not known yet (the Kubernetes API has not answered).
    #[error("custom networking: {0}")]
    Unknown(String),
    #[error("the ENIConfig's subnet: {0}")]
    Cloud(CloudError),
}

pub enum Mode {
    NodeSubnet,
    Custom {
        keys: Keys,
        node_name: String,
        view: watch::Receiver<View>,
    },
    Discovery {
        cluster: String,
    },
}

#[derive(Default)]
struct Cache {
    /// Subnets of the VPC and zone, as last described, and when.
    listed: Vec<SubnetInfo>,
    listed_at: Option<Instant>,
    denied_until: Option<Instant>,
    /// Every subnet seen, by id (an ENIConfig's subnet CIDR).
    by_id: HashMap<String, SubnetInfo>,
}

pub struct Placement {
    pub mode: Mode,
    /// The node's own subnet and its primary ENI's security groups.
    pub node: Target,
    pub vpc_id: String,
    pub az: String,
    cache: Mutex<Cache>,
}

/// Is `s` a subnet discovery may use, by upstream's tag rules? `kubernetes.io/role/cni`:
/// "0" keeps every subnet out (the node's own too); absent or empty keeps only the node's own
/// subnet in; any other value offers it. With a cluster name, a tagged subnet that names
/// clusters under `cni.networking.k8s.aws/cluster/` must name this one.
pub fn usable(s: &SubnetInfo, node_subnet: &str, cluster: &str) -> bool {
    let role = s.tags.get(TAG_CNI_ROLE).map(String::as_str).unwrap_or("");
    if role == "0" {
        return false;
    }
    if role.is_empty() {
        return s.id == node_subnet;
    }
    if cluster.is_empty() {
        return true;
    }
    let mut named = s
        .tags
        .keys()
        .filter_map(|k| k.strip_prefix(TAG_CLUSTER_PREFIX));
    let mut any = false;
    let ours = named.any(|c| {
        any = true;
        c == cluster
    });
    ours || !any
}

/// The subnets discovery may use, most free addresses first (ties: the node's own subnet,
/// then by id, so the choice is stable).
pub fn discovered(subnets: &[SubnetInfo], node_subnet: &str, cluster: &str) -> Vec<SubnetInfo> {
    let mut out: Vec<SubnetInfo> = subnets
        .iter()
        .filter(|s| usable(s, node_subnet, cluster) && s.cidr.is_some())
        .cloned()
        .collect();
    out.sort_by(|a, b| {
        b.available
            .cmp(&a.available)
            .then((a.id != node_subnet).cmp(&(b.id != node_subnet)))
            .then(a.id.cmp(&b.id))
    });
    out
}

impl Placement {
    pub fn new(mode: Mode, node: Target, vpc_id: String, az: String) -> Placement {
        Placement {
            mode,
            node,
            vpc_id,
            az,
            cache: Mutex::default(),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the next ENI may go, in the order to try. Custom networking gives one target or
    /// a reason; discovery gives every usable subnet (the caller moves on when one is full).
    pub async fn targets<E: Ec2 + ?Sized>(&self, ec2: &E) -> Result<Vec<Target>, Blocked> {
        match &self.mode {
            Mode::NodeSubnet => Ok(vec![self.node.clone()]),
            Mode::Custom {
                keys,
                node_name,
                view,
            } => {
                let selection = eniconfig::select(&view.borrow(), keys, node_name);
                match selection {
                    Selection::Found { name, spec } => {
                        let cidr = self
                            .subnet_cidr(ec2, &spec.subnet)
                            .await
                            .map_err(Blocked::Cloud)?;
                        let Some(cidr) = cidr else {
                            return Err(Blocked::NoEniConfig(format!(
                                "ENIConfig {name:?} names subnet {}, which EC2 does not list",
                                spec.subnet
                            )));
                        };
                        // Without groups in the ENIConfig, the primary ENI's (as upstream).
                        let security_groups = if spec.security_groups.is_empty() {
                            self.node.security_groups.clone()
                        } else {
                            spec.security_groups.clone()
                        };
                        Ok(vec![Target {
                            subnet_id: spec.subnet.clone(),
                            subnet_cidr: cidr,
                            security_groups,
                            why: format!("ENIConfig {name}"),
                        }])
                    }
                    Selection::Missing { why, .. } => Err(Blocked::NoEniConfig(why)),
                    Selection::Unknown(why) => Err(Blocked::Unknown(why)),
                }
            }
            Mode::Discovery { cluster } => Ok(self.discover(ec2, cluster).await),
        }
    }

    /// A subnet's CIDR, described once and cached.
    pub async fn subnet_cidr<E: Ec2 + ?Sized>(
        &self,
        ec2: &E,
        id: &str,
    ) -> Result<Option<ipnet::Ipv4Net>, CloudError> {
        if let Some(c) = self.known_cidr(id) {
            return Ok(Some(c));
        }
        let found = ec2
            .describe_subnets(SubnetFilter::Ids(vec![id.to_string()]))
            .await;
        let found = match found {
            Ok(f) => f,
            // EC2's word for an id it does not know.
            Err(e) if e.code == "InvalidSubnetID.NotFound" => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut c = self.cache();
        for s in found {
            c.by_id.insert(s.id.clone(), s);
        }
        Ok(c.by_id.get(id).and_then(|s| s.cidr))
    }

    async fn discover<E: Ec2 + ?Sized>(&self, ec2: &E, cluster: &str) -> Vec<Target> {
        let now = Instant::now();
        let fresh = {
            let c = self.cache();
            if c.denied_until.is_some_and(|t| now < t) {
                return vec![self.node.clone()];
            }
            c.listed_at
                .is_some_and(|t| now.duration_since(t) < SUBNET_REFRESH)
        };
        if !fresh {
            let filter = SubnetFilter::VpcAz {
                vpc_id: self.vpc_id.clone(),
                az: self.az.clone(),
            };
            match ec2.describe_subnets(filter).await {
                Ok(list) => {
                    let mut c = self.cache();
                    let first = c.listed_at.is_none() || c.denied_until.is_some();
                    c.denied_until = None;
                    for s in &list {
                        c.by_id.insert(s.id.clone(), s.clone());
                    }
                    c.listed = list;
                    c.listed_at = Some(now);
                    let usable = discovered(&c.listed, &self.node.subnet_id, cluster);
                    if first {
                        info!(subnets = ?usable.iter().map(|s| format!("{} ({} free)", s.id, s.available)).collect::<Vec<_>>(), "subnet discovery: subnets for new ENIs");
                    }
                }
                Err(e) if e.kind == ErrorKind::Unauthorized => {
                    warn!(error = %e, "subnet discovery: the node's IAM role may not call ec2:DescribeSubnets; new ENIs go to the node's subnet {} (asked again in {}s)", self.node.subnet_id, DENIED_RETRY.as_secs());
                    self.cache().denied_until = Some(now + DENIED_RETRY);
                    return vec![self.node.clone()];
                }
                Err(e) => {
                    warn!(error = %e, "subnet discovery: DescribeSubnets failed; using what is known");
                }
            }
        }
        let c = self.cache();
        let list = discovered(&c.listed, &self.node.subnet_id, cluster);
        if list.is_empty() {
            return vec![self.node.clone()];
        }
        list.into_iter()
            .filter_map(|s| {
                Some(Target {
                    why: format!("subnet discovery ({} free)", s.available),
                    subnet_cidr: s.cidr?,
                    subnet_id: s.id,
                    security_groups: self.node.security_groups.clone(),
                })
            })
            .collect()
    }

    /// EC2 said the subnet is full: the list is described again before the next ENI.
    pub fn subnet_full(&self, subnet_id: &str) {
        let mut c = self.cache();
        c.listed_at = None;
        if let Some(s) = c.listed.iter_mut().find(|s| s.id == subnet_id) {
            s.available = 0;
        }
    }

    /// A subnet's CIDR if any look so far has seen it (ENIs found at start).
    pub fn known_cidr(&self, subnet_id: &str) -> Option<ipnet::Ipv4Net> {
        if subnet_id == self.node.subnet_id {
            return Some(self.node.subnet_cidr);
        }
        self.cache().by_id.get(subnet_id).and_then(|s| s.cidr)
    }

    /// Resolves when what the watches know changes (custom networking only), so that an
    /// ENIConfig appearing or a node relabelled takes effect at once.
    pub async fn changed(&self) {
        match &self.mode {
            Mode::Custom { view, .. } => {
                let mut rx = view.clone();
                rx.borrow_and_update();
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            _ => std::future::pending().await,
        }
    }

    /// The selection custom networking would make now, for introspection and events.
    pub fn eniconfig(&self) -> Option<(Selection, Keys, View)> {
        match &self.mode {
            Mode::Custom {
                keys,
                node_name,
                view,
            } => {
                let v = view.borrow().clone();
                Some((eniconfig::select(&v, keys, node_name), keys.clone(), v))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::fake::FakeEc2;

    fn subnet(id: &str, cidr: &str, free: u64, tags: &[(&str, &str)]) -> SubnetInfo {
        SubnetInfo {
            id: id.into(),
            vpc_id: "vpc-1".into(),
            az: "us-west-2a".into(),
            cidr: cidr.parse().ok(),
            available: free,
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn node() -> Target {
        Target {
            subnet_id: "subnet-node".into(),
            subnet_cidr: "10.0.1.0/24".parse().unwrap(),
            security_groups: vec!["sg-node".into()],
            why: "node subnet".into(),
        }
    }

    #[test]
    fn tag_rules_match_upstream() {
        let cl = "prod";
        assert!(usable(
            &subnet("subnet-node", "10.0.1.0/24", 5, &[]),
            "subnet-node",
            cl
        ));
        assert!(!usable(
            &subnet("subnet-x", "10.0.2.0/24", 5, &[]),
            "subnet-node",
            cl
        ));
        assert!(!usable(
            &subnet("subnet-x", "10.0.2.0/24", 5, &[(TAG_CNI_ROLE, "")]),
            "subnet-node",
            cl
        ));
        assert!(!usable(
            &subnet("subnet-node", "10.0.1.0/24", 5, &[(TAG_CNI_ROLE, "0")]),
            "subnet-node",
            cl
        ));
        assert!(usable(
            &subnet("subnet-x", "10.0.2.0/24", 5, &[(TAG_CNI_ROLE, "1")]),
            "subnet-node",
            cl
        ));
        let other = format!("{TAG_CLUSTER_PREFIX}staging");
        let ours = format!("{TAG_CLUSTER_PREFIX}prod");
        let theirs = subnet("s", "10.0.2.0/24", 5, &[(TAG_CNI_ROLE, "1"), (&other, "1")]);
        assert!(!usable(&theirs, "subnet-node", cl));
        assert!(usable(&theirs, "subnet-node", ""));
        let shared = subnet(
            "s",
            "10.0.2.0/24",
            5,
            &[(TAG_CNI_ROLE, "1"), (&other, "1"), (&ours, "")],
        );
        assert!(usable(&shared, "subnet-node", cl));
    }

    #[test]
    fn most_free_first_node_subnet_wins_ties() {
        let list = vec![
            subnet("subnet-b", "10.0.3.0/24", 100, &[(TAG_CNI_ROLE, "1")]),
            subnet("subnet-node", "10.0.1.0/24", 100, &[]),
            subnet("subnet-a", "10.0.2.0/24", 250, &[(TAG_CNI_ROLE, "1")]),
            subnet("subnet-z", "10.0.4.0/24", 999, &[]),
        ];
        let ids: Vec<String> = discovered(&list, "subnet-node", "")
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, ["subnet-a", "subnet-node", "subnet-b"]);
    }

    #[tokio::test]
    async fn discovery_caches_refreshes_on_full_and_falls_back_when_denied() {
        let ec2 = FakeEc2::new("i-1", 0);
        ec2.lock().subnets = vec![
            subnet("subnet-node", "10.0.1.0/24", 3, &[]),
            subnet("subnet-a", "100.64.0.0/24", 200, &[(TAG_CNI_ROLE, "1")]),
        ];
        let p = Placement::new(
            Mode::Discovery {
                cluster: String::new(),
            },
            node(),
            "vpc-1".into(),
            "us-west-2a".into(),
        );
        let t = p.targets(&ec2).await.unwrap();
        assert_eq!(t[0].subnet_id, "subnet-a");
        assert_eq!(t[0].security_groups, ["sg-node"]);
        assert_eq!(t[1].subnet_id, "subnet-node");
        p.targets(&ec2).await.unwrap();
        assert_eq!(ec2.calls("DescribeSubnets"), 1, "cached");
        p.subnet_full("subnet-a");
        p.targets(&ec2).await.unwrap();
        assert_eq!(
            ec2.calls("DescribeSubnets"),
            2,
            "described again after a full subnet"
        );

        let denied = Placement::new(
            Mode::Discovery {
                cluster: String::new(),
            },
            node(),
            "vpc-1".into(),
            "us-west-2a".into(),
        );
        ec2.fail("DescribeSubnets", "UnauthorizedOperation");
        let t = denied.targets(&ec2).await.unwrap();
        assert_eq!(t, vec![node()]);
        denied.targets(&ec2).await.unwrap();
        assert_eq!(ec2.calls("DescribeSubnets"), 3, "not asked again at once");
    }

    #[tokio::test]
    async fn custom_networking_follows_the_eniconfig_or_names_why_not() {
        let ec2 = FakeEc2::new("i-1", 0);
        ec2.lock().subnets = vec![subnet("subnet-cn", "100.64.1.0/24", 200, &[])];
        let (tx, rx) = watch::channel(View::default());
        let p = Placement::new(
            Mode::Custom {
                keys: Keys::default(),
                node_name: "n1".into(),
                view: rx,
            },
            node(),
            "vpc-1".into(),
            "us-west-2a".into(),
        );
        assert!(matches!(p.targets(&ec2).await, Err(Blocked::Unknown(_))));
        let mut v = View {
            node_synced: true,
            eniconfigs_synced: true,
            node: Some(Default::default()),
            ..Default::default()
        };
        tx.send_replace(v.clone());
        match p.targets(&ec2).await {
            Err(Blocked::NoEniConfig(why)) => assert!(why.contains("\"default\""), "{why}"),
            other => panic!("{other:?}"),
        }
        v.eniconfigs.insert(
            "default".into(),
            eniconfig::EniConfigSpec {
                subnet: "subnet-cn".into(),
                security_groups: vec![],
            },
        );
        tx.send_replace(v.clone());
        let t = p.targets(&ec2).await.unwrap();
        assert_eq!(t[0].subnet_id, "subnet-cn");
        assert_eq!(t[0].subnet_cidr, "100.64.1.0/24".parse().unwrap());
        assert_eq!(
            t[0].security_groups,
            ["sg-node"],
            "no groups: the primary's"
        );
        v.eniconfigs.insert(
            "default".into(),
            eniconfig::EniConfigSpec {
                subnet: "subnet-gone".into(),
                security_groups: vec!["sg-cn".into()],
            },
        );
        tx.send_replace(v);
        assert!(matches!(
            p.targets(&ec2).await,
            Err(Blocked::NoEniConfig(w)) if w.contains("subnet-gone")
        ));
    }
}
