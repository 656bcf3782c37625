//! What every ENI path shares: turning EC2's view of an ENI into the pool's, and the node
//! networking an ENI needs before pods may use its addresses (behind a trait, so the pool
//! manager's failure paths are unit tests over an in-memory fake).
//!
//! The order is always attach -> node networking -> pool, and the reverse on the way out;
//! each step is undone when a later one fails (see `manager`).

use std::time::{Duration, SystemTime};

use crate::cloud::EniInfo;
use crate::hostnet::NodeNetwork;
use crate::pool::datastore::Eni;

/// Why node networking could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkingError {
    #[error("node rules and SNAT: {0:#}")]
    Host(anyhow::Error),
    #[error(transparent)]
    Link(#[from] crate::hostnet::links::LinkError),
}

/// The node's networking as the pool manager drives it: node-wide rules and SNAT, and each
/// secondary ENI's link, route table and source rule.
#[async_trait::async_trait]
pub trait NodeNetworking: Send + Sync + 'static {
    /// Node-wide rules and SNAT for the VPC's CIDRs (converges; cheap when unchanged).
    async fn setup_host(&self, vpc_cidrs: &[ipnet::Ipv4Net]) -> Result<(), NetworkingError>;
    /// Wait up to `wait` for the ENI's link to appear, then configure it. Converges: running
    /// it on an ENI already set up changes nothing.
    async fn setup_eni(&self, eni: &Eni, wait: Duration) -> Result<(), NetworkingError>;
    /// Remove what `setup_eni` made; failures are logged, never fatal (the ENI is leaving).
    async fn teardown_eni(&self, eni: &Eni);
}

#[async_trait::async_trait]
impl NodeNetworking for NodeNetwork {
    async fn setup_host(&self, vpc_cidrs: &[ipnet::Ipv4Net]) -> Result<(), NetworkingError> {
        NodeNetwork::setup_host(self, vpc_cidrs)
            .await
            .map_err(NetworkingError::Host)
    }

    async fn setup_eni(&self, eni: &Eni, wait: Duration) -> Result<(), NetworkingError> {
        NodeNetwork::setup_eni(self, eni, wait).await?;
        Ok(())
    }

    async fn teardown_eni(&self, eni: &Eni) {
        NodeNetwork::teardown_eni(self, eni).await
    }
}

/// The pool's record of an attached ENI, from EC2's description of it. `None` when EC2 lists
/// no primary address (an ENI being created): nothing on the node can use it yet. IPv6
/// prefixes are left out: only an IPv6 node's start puts its one /80 in the pool.
pub fn from_ec2(info: &EniInfo, device_index: u32, subnet_cidr: ipnet::Ipv4Net) -> Option<Eni> {
    Some(Eni {
        id: info.id.clone(),
        device_number: device_index,
        primary: device_index == 0,
        mac: info.mac.clone(),
        subnet_cidr,
        subnet_id: info.subnet_id.clone(),
        primary_ip: info.primary_ip?,
        ips: info.secondary_ips.clone(),
        prefixes: info.prefixes.clone(),
        primary_ipv6: info.ipv6_addresses.first().copied(),
        ipv6_prefixes: Vec::new(),
        attached_at: SystemTime::now(),
    })
}

/// Why a pool step failed: EC2, the node's networking, or the pool itself. Only EC2 failures
/// have EC2 error kinds (throttling, subnet full...); the others are named as what they are.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Cloud(#[from] crate::cloud::CloudError),
    #[error("ENI {eni} attached but its node networking failed: {source}; given back to EC2")]
    Networking {
        eni: String,
        source: NetworkingError,
    },
    #[error("ENI {eni} not added to the pool: {source}; given back to EC2")]
    Pool {
        eni: String,
        source: crate::pool::datastore::EniError,
    },
    #[error("EC2 created ENI {0} without a primary address; deleted it")]
    NoAddress(String),
    #[error(transparent)]
    Placement(crate::pool::placement::Blocked),
}

#[cfg(test)]
pub mod fake {
    //! In-memory node networking for the manager's unit tests.

    use super::*;
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct FakeNet {
        pub set_up: Mutex<BTreeSet<String>>,
        pub torn_down: Mutex<Vec<String>>,
        /// ENI ids whose setup fails.
        pub fail: Mutex<BTreeSet<String>>,
        /// Fail every setup.
        pub fail_all: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl NodeNetworking for FakeNet {
        async fn setup_host(&self, _: &[ipnet::Ipv4Net]) -> Result<(), NetworkingError> {
            Ok(())
        }

        async fn setup_eni(&self, eni: &Eni, _wait: Duration) -> Result<(), NetworkingError> {
            let fail = self.fail_all.load(std::sync::atomic::Ordering::Relaxed)
                || self
                    .fail
                    .lock()
                    .map(|f| f.contains(&eni.id))
                    .unwrap_or(false);
            if fail {
                return Err(crate::hostnet::links::LinkError::NoLink(eni.mac.clone()).into());
            }
            if let Ok(mut s) = self.set_up.lock() {
                s.insert(eni.id.clone());
            }
            Ok(())
        }

        async fn teardown_eni(&self, eni: &Eni) {
            if let Ok(mut s) = self.set_up.lock() {
                s.remove(&eni.id);
            }
            if let Ok(mut t) = self.torn_down.lock() {
                t.push(eni.id.clone());
            }
        }
    }
}
