//! An in-memory EC2 for the pool manager's unit tests: ENIs, attachments and addresses of
//! one instance, one-shot failures armed per action, and a log of the calls made.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Mutex;

use super::{Attachment, CloudError, Ec2, EniFilter, EniInfo, NewEni, SubnetFilter, SubnetInfo};
use crate::pool::datastore::Prefix;

#[derive(Default)]
pub struct State {
    pub enis: BTreeMap<String, EniInfo>,
    /// Failures to return, per action, in order.
    pub faults: HashMap<&'static str, VecDeque<CloudError>>,
    pub calls: Vec<&'static str>,
    /// Actions that succeed and do nothing (EC2 accepting a call it does not carry out).
    pub noop: std::collections::HashSet<&'static str>,
    /// Subnets DescribeSubnets lists; a create in one of them takes one of its addresses
    /// per address asked for and fails with InsufficientFreeAddressesInSubnet at 0.
    pub subnets: Vec<SubnetInfo>,
    /// Every create request, in order (subnet, security groups).
    pub created: Vec<NewEni>,
    next_id: u32,
    next_ip: u32,
}

pub struct FakeEc2 {
    pub state: Mutex<State>,
    pub instance_id: String,
    /// How long a describe takes (to see calls overlap).
    pub describe_latency: Mutex<std::time::Duration>,
}

impl FakeEc2 {
    /// An instance with its primary ENI (device 0, primary 10.0.0.10, `ips` secondaries).
    pub fn new(instance_id: &str, ips: u32) -> FakeEc2 {
        let f = FakeEc2 {
            state: Mutex::new(State {
                next_ip: 11,
                ..Default::default()
            }),
            instance_id: instance_id.to_string(),
            describe_latency: Mutex::new(std::time::Duration::ZERO),
        };
        let mut st = f.lock();
        let id = "eni-primary".to_string();
        let secondary = (0..ips).map(|_| st.ip()).collect();
        st.enis.insert(
            id.clone(),
            EniInfo {
                id,
                mac: "02:00:00:00:00:00".into(),
                primary_ip: Some(Ipv4Addr::new(10, 0, 0, 10)),
                secondary_ips: secondary,
                attachment: Some(Attachment {
                    id: "attach-primary".into(),
                    instance_id: instance_id.into(),
                    device_index: 0,
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        drop(st);
        f
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next call of `action` fails with `code`.
    pub fn fail(&self, action: &'static str, code: &str) {
        self.lock()
            .faults
            .entry(action)
            .or_default()
            .push_back(CloudError::new(action, code, "armed by the test", 400));
    }

    pub fn calls(&self, action: &str) -> usize {
        self.lock().calls.iter().filter(|c| **c == action).count()
    }

    /// An ENI created and attached by someone else (as the console or another tool would).
    pub fn attach_foreign(&self, device_index: u32, ips: u32) -> String {
        let mut st = self.lock();
        let id = st.eni_id();
        let primary = st.ip();
        let secondary = (0..ips).map(|_| st.ip()).collect();
        let info = EniInfo {
            id: id.clone(),
            mac: format!("02:00:00:00:00:{device_index:02x}"),
            // The node's subnet in the manager's tests.
            subnet_id: "subnet-1".into(),
            primary_ip: Some(primary),
            secondary_ips: secondary,
            attachment: Some(Attachment {
                id: format!("attach-{id}"),
                instance_id: self.instance_id.clone(),
                device_index,
                ..Default::default()
            }),
            ..Default::default()
        };
        st.enis.insert(id.clone(), info);
        id
    }
}

impl State {
    fn ip(&mut self) -> Ipv4Addr {
        let n = self.next_ip;
        self.next_ip += 1;
        Ipv4Addr::new(10, 0, (n / 250) as u8, (n % 250) as u8 + 1)
    }

    fn eni_id(&mut self) -> String {
        self.next_id += 1;
        format!("eni-{:04}", self.next_id)
    }

    fn call(&mut self, action: &'static str) -> Result<(), CloudError> {
        self.calls.push(action);
        match self.faults.get_mut(action).and_then(VecDeque::pop_front) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn eni(&mut self, action: &'static str, id: &str) -> Result<&mut EniInfo, CloudError> {
        self.enis.get_mut(id).ok_or_else(|| {
            CloudError::new(
                action,
                "InvalidNetworkInterfaceID.NotFound",
                id.to_string(),
                400,
            )
        })
    }
}

#[async_trait::async_trait]
impl Ec2 for FakeEc2 {
    async fn describe_enis(&self, filter: EniFilter) -> Result<Vec<EniInfo>, CloudError> {
        let latency = self.describe_latency.lock().map(|d| *d).unwrap_or_default();
        tokio::time::sleep(latency).await;
        let mut st = self.lock();
        st.call("DescribeNetworkInterfaces")?;
        Ok(st
            .enis
            .values()
            .filter(|e| match &filter {
                EniFilter::Ids(ids) => ids.contains(&e.id),
                EniFilter::AttachedTo(i) => {
                    e.attachment.as_ref().is_some_and(|a| a.instance_id == *i)
                }
                EniFilter::Leaked { .. } => e.attachment.is_none(),
            })
            .cloned()
            .collect())
    }

    async fn create_eni(&self, req: NewEni) -> Result<EniInfo, CloudError> {
        let mut st = self.lock();
        st.call("CreateNetworkInterface")?;
        let need = 1 + u64::from(req.secondary_ips) + 16 * u64::from(req.prefixes);
        if let Some(sn) = st.subnets.iter_mut().find(|s| s.id == req.subnet_id) {
            if sn.available < need {
                return Err(CloudError::new(
                    "CreateNetworkInterface",
                    "InsufficientFreeAddressesInSubnet",
                    format!("subnet {} is full", req.subnet_id),
                    400,
                ));
            }
            sn.available -= need;
        }
        st.created.push(req.clone());
        let id = st.eni_id();
        let primary = st.ip();
        let secondary = (0..req.secondary_ips).map(|_| st.ip()).collect();
        let info = EniInfo {
            id: id.clone(),
            mac: format!("02:00:00:00:01:{:02x}", st.next_id),
            description: req.description,
            subnet_id: req.subnet_id,
            primary_ip: Some(primary),
            secondary_ips: secondary,
            tags: req.tags,
            ..Default::default()
        };
        st.enis.insert(id, info.clone());
        Ok(info)
    }

    async fn attach_eni(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
    ) -> Result<String, CloudError> {
        let mut st = self.lock();
        st.call("AttachNetworkInterface")?;
        let e = st.eni("AttachNetworkInterface", eni_id)?;
        let id = format!("attach-{eni_id}");
        e.attachment = Some(Attachment {
            id: id.clone(),
            instance_id: instance_id.to_string(),
            device_index,
            ..Default::default()
        });
        Ok(id)
    }

    async fn set_delete_on_termination(&self, eni_id: &str, _: &str) -> Result<(), CloudError> {
        let mut st = self.lock();
        st.call("ModifyNetworkInterfaceAttribute")?;
        let e = st.eni("ModifyNetworkInterfaceAttribute", eni_id)?;
        if let Some(a) = e.attachment.as_mut() {
            a.delete_on_termination = true;
        }
        Ok(())
    }

    async fn detach_eni(&self, attachment_id: &str) -> Result<(), CloudError> {
        let mut st = self.lock();
        st.call("DetachNetworkInterface")?;
        for e in st.enis.values_mut() {
            if e.attachment.as_ref().is_some_and(|a| a.id == attachment_id) {
                e.attachment = None;
            }
        }
        Ok(())
    }

    async fn delete_eni(&self, eni_id: &str) -> Result<(), CloudError> {
        let mut st = self.lock();
        st.call("DeleteNetworkInterface")?;
        if st
            .eni("DeleteNetworkInterface", eni_id)?
            .attachment
            .is_some()
        {
            return Err(CloudError::new(
                "DeleteNetworkInterface",
                "InvalidNetworkInterface.InUse",
                "attached",
                400,
            ));
        }
        st.enis.remove(eni_id);
        Ok(())
    }

    async fn assign_ips(&self, eni_id: &str, count: u32) -> Result<Vec<Ipv4Addr>, CloudError> {
        let mut st = self.lock();
        st.call("AssignPrivateIpAddresses")?;
        if st.noop.contains("AssignPrivateIpAddresses") {
            return Ok(Vec::new());
        }
        let new: Vec<Ipv4Addr> = (0..count).map(|_| st.ip()).collect();
        st.eni("AssignPrivateIpAddresses", eni_id)?
            .secondary_ips
            .extend(&new);
        Ok(new)
    }

    async fn assign_prefixes(&self, _: &str, _: u32) -> Result<Vec<Prefix>, CloudError> {
        let mut st = self.lock();
        st.call("AssignPrivateIpAddresses")?;
        Ok(Vec::new())
    }

    async fn unassign_ips(&self, eni_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError> {
        let mut st = self.lock();
        st.call("UnassignPrivateIpAddresses")?;
        st.eni("UnassignPrivateIpAddresses", eni_id)?
            .secondary_ips
            .retain(|ip| !ips.contains(ip));
        Ok(())
    }

    async fn unassign_prefixes(&self, _: &str, _: &[Prefix]) -> Result<(), CloudError> {
        self.lock().call("UnassignPrivateIpAddresses")
    }

    async fn assign_ipv6_prefixes(
        &self,
        eni_id: &str,
        count: u32,
    ) -> Result<Vec<ipnet::Ipv6Net>, CloudError> {
        let mut st = self.lock();
        st.call("AssignIpv6Addresses")?;
        let eni = st.eni("AssignIpv6Addresses", eni_id)?;
        let base = eni.ipv6_prefixes.len() as u128;
        let new: Vec<ipnet::Ipv6Net> = (0..u128::from(count))
            .filter_map(|i| {
                let net = 0x2600_1f14_0000_0001_0000_0000_0000_0000u128 | ((base + i + 1) << 48);
                ipnet::Ipv6Net::new(std::net::Ipv6Addr::from(net), 80).ok()
            })
            .collect();
        eni.ipv6_prefixes.extend(new.iter().copied());
        Ok(new)
    }

    async fn describe_subnets(&self, f: SubnetFilter) -> Result<Vec<SubnetInfo>, CloudError> {
        let mut st = self.lock();
        st.call("DescribeSubnets")?;
        Ok(st
            .subnets
            .iter()
            .filter(|s| match &f {
                SubnetFilter::Ids(ids) => ids.contains(&s.id),
                SubnetFilter::VpcAz { vpc_id, az } => s.vpc_id == *vpc_id && s.az == *az,
            })
            .cloned()
            .collect())
    }

    async fn describe_instance_type(
        &self,
        _: &str,
    ) -> Result<Option<crate::instance::types::InstanceLimits>, CloudError> {
        self.lock().call("DescribeInstanceTypes")?;
        Ok(None)
    }
}
