//! `Ec2` through `aws-sdk-ec2`. The SDK's own retries are off: the guard retries, so every
//! attempt is counted and rate-limited in one place.

use std::net::Ipv4Addr;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, NetworkInterface, NetworkInterfaceAttachmentChanges, ResourceType, Tag,
    TagSpecification,
};

use super::{Attachment, CloudError, Ec2, EniFilter, EniInfo, NewEni, SubnetFilter, SubnetInfo};
use crate::instance::types::{Hypervisor, InstanceLimits};
use crate::pool::datastore::Prefix;

pub struct SdkEc2 {
    client: aws_sdk_ec2::Client,
}

impl SdkEc2 {
    /// `endpoint`: upstream's `AWS_EC2_ENDPOINT`; the SDK also honours `AWS_ENDPOINT_URL_EC2`.
    /// `timeout`: upstream's `HTTP_TIMEOUT`, each request's limit. `version`: upstream's
    /// `VPC_CNI_VERSION`, which it puts in its EC2 user agent.
    pub async fn new(
        region: &str,
        endpoint: Option<&str>,
        timeout: Duration,
        version: Option<&str>,
    ) -> SdkEc2 {
        let http = super::http_client();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region.to_string()))
            .http_client(http)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(timeout)
                    .build(),
            );
        if let Some(ep) = endpoint.filter(|e| !e.is_empty()) {
            loader = loader.endpoint_url(ep);
        }
        if let Some(v) = version {
            match aws_config::AppName::new(format!("amazon-vpc-cni-k8s-{v}")) {
                Ok(name) => loader = loader.app_name(name),
                Err(e) => {
                    tracing::warn!(version = v, error = %e, "VPC_CNI_VERSION not usable in the EC2 user agent")
                }
            }
        }
        let conf = loader.load().await;
        SdkEc2 {
            client: aws_sdk_ec2::Client::new(&conf),
        }
    }
}

impl SdkEc2 {
    /// Wrap a client configured elsewhere (tests point one at the shim).
    pub fn from_client(client: aws_sdk_ec2::Client) -> SdkEc2 {
        SdkEc2 { client }
    }
}

fn cloud_err<E>(op: &'static str, e: SdkError<E>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
    match &e {
        SdkError::ServiceError(s) => {
            let inner = s.err();
            CloudError::new(
                op,
                inner.code().unwrap_or(""),
                inner.message().unwrap_or("").to_string(),
                status,
            )
        }
        _ => CloudError::new(
            op,
            "",
            aws_smithy_types::error::display::DisplayErrorContext(&e).to_string(),
            status,
        ),
    }
}

fn ip(s: Option<&str>) -> Option<Ipv4Addr> {
    s.and_then(|s| s.parse().ok())
}

fn eni_info(n: &NetworkInterface) -> EniInfo {
    let mut primary_ip = None;
    let mut secondary_ips = Vec::new();
    for p in n.private_ip_addresses() {
        match (ip(p.private_ip_address()), p.primary().unwrap_or(false)) {
            (Some(a), true) => primary_ip = Some(a),
            (Some(a), false) => secondary_ips.push(a),
            _ => {}
        }
    }
    if primary_ip.is_none() {
        primary_ip = ip(n.private_ip_address());
        secondary_ips.retain(|a| Some(*a) != primary_ip);
    }
    EniInfo {
        id: n.network_interface_id().unwrap_or_default().to_string(),
        mac: n.mac_address().unwrap_or_default().to_ascii_lowercase(),
        status: n
            .status()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        description: n.description().unwrap_or_default().to_string(),
        subnet_id: n.subnet_id().unwrap_or_default().to_string(),
        primary_ip,
        secondary_ips,
        prefixes: n
            .ipv4_prefixes()
            .iter()
            .filter_map(|p| p.ipv4_prefix().and_then(super::parse_prefix))
            .collect(),
        ipv6_addresses: n
            .ipv6_addresses()
            .iter()
            .filter_map(|a| a.ipv6_address().and_then(|s| s.parse().ok()))
            .collect(),
        ipv6_prefixes: n
            .ipv6_prefixes()
            .iter()
            .filter_map(|p| p.ipv6_prefix().and_then(|s| s.parse().ok()))
            .collect(),
        tags: n
            .tag_set()
            .iter()
            .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or("").to_string())))
            .collect(),
        interface_type: n
            .interface_type()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default(),
        attachment: n.attachment().and_then(|a| {
            Some(Attachment {
                id: a.attachment_id()?.to_string(),
                instance_id: a.instance_id().unwrap_or_default().to_string(),
                device_index: a.device_index().unwrap_or(0).max(0) as u32,
                network_card: a.network_card_index().unwrap_or(0).max(0) as u32,
                delete_on_termination: a.delete_on_termination().unwrap_or(false),
            })
        }),
    }
}

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

#[async_trait::async_trait]
impl Ec2 for SdkEc2 {
    async fn describe_enis(&self, f: EniFilter) -> Result<Vec<EniInfo>, CloudError> {
        const OP: &str = "DescribeNetworkInterfaces";
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut req = self.client.describe_network_interfaces();
            req = match &f {
                EniFilter::Ids(ids) => req.set_network_interface_ids(Some(ids.clone())),
                EniFilter::AttachedTo(i) => req.filters(filter("attachment.instance-id", i)),
                EniFilter::Leaked {
                    vpc_id,
                    instance_id,
                    cluster,
                } => {
                    let mut r = req
                        .filters(filter("tag-key", super::TAG_INSTANCE_ID))
                        .filters(filter("status", "available"));
                    if !vpc_id.is_empty() {
                        r = r.filters(filter("vpc-id", vpc_id));
                    }
                    if let Some(i) = instance_id {
                        r = r.filters(filter(&format!("tag:{}", super::TAG_INSTANCE_ID), i));
                    }
                    if let Some(c) = cluster {
                        r = r.filters(filter(&format!("tag:{}", super::TAG_CLUSTER_NAME), c));
                    }
                    r
                }
            };
            let resp = req
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| cloud_err(OP, e))?;
            out.extend(resp.network_interfaces().iter().map(eni_info));
            match resp.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => return Ok(out),
            }
        }
    }

    async fn create_eni(&self, r: NewEni) -> Result<EniInfo, CloudError> {
        const OP: &str = "CreateNetworkInterface";
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::NetworkInterface)
            .set_tags(Some(
                r.tags
                    .iter()
                    .map(|(k, v)| Tag::builder().key(k).value(v).build())
                    .collect(),
            ))
            .build();
        let mut req = self
            .client
            .create_network_interface()
            .subnet_id(&r.subnet_id)
            .description(&r.description)
            .set_groups(Some(r.security_groups.clone()))
            .tag_specifications(tags);
        if r.secondary_ips > 0 {
            req = req.secondary_private_ip_address_count(r.secondary_ips as i32);
        }
        if r.prefixes > 0 {
            req = req.ipv4_prefix_count(r.prefixes as i32);
        }
        let resp = req.send().await.map_err(|e| cloud_err(OP, e))?;
        resp.network_interface()
            .map(eni_info)
            .ok_or_else(|| CloudError::new(OP, "", "reply without a network interface", 0))
    }

    async fn attach_eni(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
    ) -> Result<String, CloudError> {
        const OP: &str = "AttachNetworkInterface";
        let resp = self
            .client
            .attach_network_interface()
            .network_interface_id(eni_id)
            .instance_id(instance_id)
            .device_index(device_index as i32)
            .send()
            .await
            .map_err(|e| cloud_err(OP, e))?;
        resp.attachment_id()
            .map(str::to_string)
            .ok_or_else(|| CloudError::new(OP, "", "reply without an attachment id", 0))
    }

    async fn set_delete_on_termination(
        &self,
        eni_id: &str,
        attachment_id: &str,
    ) -> Result<(), CloudError> {
        self.client
            .modify_network_interface_attribute()
            .network_interface_id(eni_id)
            .attachment(
                NetworkInterfaceAttachmentChanges::builder()
                    .attachment_id(attachment_id)
                    .delete_on_termination(true)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| cloud_err("ModifyNetworkInterfaceAttribute", e))?;
        Ok(())
    }

    async fn detach_eni(&self, attachment_id: &str) -> Result<(), CloudError> {
        self.client
            .detach_network_interface()
            .attachment_id(attachment_id)
            .send()
            .await
            .map_err(|e| cloud_err("DetachNetworkInterface", e))?;
        Ok(())
    }

    async fn delete_eni(&self, eni_id: &str) -> Result<(), CloudError> {
        self.client
            .delete_network_interface()
            .network_interface_id(eni_id)
            .send()
            .await
            .map_err(|e| cloud_err("DeleteNetworkInterface", e))?;
        Ok(())
    }

    async fn assign_ips(&self, eni_id: &str, count: u32) -> Result<Vec<Ipv4Addr>, CloudError> {
        let resp = self
            .client
            .assign_private_ip_addresses()
            .network_interface_id(eni_id)
            .secondary_private_ip_address_count(count as i32)
            .send()
            .await
            .map_err(|e| cloud_err("AssignPrivateIpAddresses", e))?;
        Ok(resp
            .assigned_private_ip_addresses()
            .iter()
            .filter_map(|a| ip(a.private_ip_address()))
            .collect())
    }

    async fn assign_prefixes(&self, eni_id: &str, count: u32) -> Result<Vec<Prefix>, CloudError> {
        let resp = self
            .client
            .assign_private_ip_addresses()
            .network_interface_id(eni_id)
            .ipv4_prefix_count(count as i32)
            .send()
            .await
            .map_err(|e| cloud_err("AssignPrivateIpAddresses", e))?;
        Ok(resp
            .assigned_ipv4_prefixes()
            .iter()
            .filter_map(|p| p.ipv4_prefix().and_then(super::parse_prefix))
            .collect())
    }

    async fn assign_ipv6_prefixes(
        &self,
        eni_id: &str,
        count: u32,
    ) -> Result<Vec<ipnet::Ipv6Net>, CloudError> {
        let resp = self
            .client
            .assign_ipv6_addresses()
            .network_interface_id(eni_id)
            .ipv6_prefix_count(count as i32)
            .send()
            .await
            .map_err(|e| cloud_err("AssignIpv6Addresses", e))?;
        Ok(resp
            .assigned_ipv6_prefixes()
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    async fn unassign_ips(&self, eni_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError> {
        self.client
            .unassign_private_ip_addresses()
            .network_interface_id(eni_id)
            .set_private_ip_addresses(Some(ips.iter().map(|i| i.to_string()).collect()))
            .send()
            .await
            .map_err(|e| cloud_err("UnassignPrivateIpAddresses", e))?;
        Ok(())
    }

    async fn unassign_prefixes(&self, eni_id: &str, prefixes: &[Prefix]) -> Result<(), CloudError> {
        self.client
            .unassign_private_ip_addresses()
            .network_interface_id(eni_id)
            .set_ipv4_prefixes(Some(
                prefixes.iter().map(|p| format!("{}/28", p.0)).collect(),
            ))
            .send()
            .await
            .map_err(|e| cloud_err("UnassignPrivateIpAddresses", e))?;
        Ok(())
    }

    async fn describe_subnets(&self, f: SubnetFilter) -> Result<Vec<SubnetInfo>, CloudError> {
        const OP: &str = "DescribeSubnets";
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let req = match &f {
                SubnetFilter::Ids(ids) => self
                    .client
                    .describe_subnets()
                    .set_subnet_ids(Some(ids.clone())),
                SubnetFilter::VpcAz { vpc_id, az } => self
                    .client
                    .describe_subnets()
                    .filters(filter("vpc-id", vpc_id))
                    .filters(filter("availability-zone", az)),
            };
            let resp = req
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| cloud_err(OP, e))?;
            out.extend(resp.subnets().iter().map(|s| {
                SubnetInfo {
                    id: s.subnet_id().unwrap_or_default().to_string(),
                    vpc_id: s.vpc_id().unwrap_or_default().to_string(),
                    az: s.availability_zone().unwrap_or_default().to_string(),
                    cidr: s.cidr_block().and_then(|c| c.parse().ok()),
                    available: s.available_ip_address_count().unwrap_or(0).max(0) as u64,
                    tags: s
                        .tags()
                        .iter()
                        .filter_map(|t| {
                            Some((t.key()?.to_string(), t.value().unwrap_or("").to_string()))
                        })
                        .collect(),
                }
            }));
            match resp.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => return Ok(out),
            }
        }
    }

    async fn describe_instance_type(
        &self,
        instance_type: &str,
    ) -> Result<Option<InstanceLimits>, CloudError> {
        let resp = self
            .client
            .describe_instance_types()
            .instance_types(instance_type.into())
            .send()
            .await
            .map_err(|e| cloud_err("DescribeInstanceTypes", e))?;
        let Some(t) = resp.instance_types().first() else {
            return Ok(None);
        };
        let Some(n) = t.network_info() else {
            return Ok(None);
        };
        // Pods use network card 0 only; its limit can be below the instance's total.
        let enis = n
            .network_cards()
            .iter()
            .find(|c| c.network_card_index() == Some(0))
            .and_then(|c| c.maximum_network_interfaces())
            .or(n.maximum_network_interfaces())
            .unwrap_or(1)
            .max(1) as u32;
        let hypervisor = match t.hypervisor().map(|h| h.as_str()) {
            Some("nitro") => Hypervisor::Nitro,
            Some("xen") => Hypervisor::Xen,
            _ => Hypervisor::Unspecified,
        };
        Ok(Some(InstanceLimits {
            enis,
            ipv4_per_eni: n.ipv4_addresses_per_interface().unwrap_or(1).max(1) as u32,
            hypervisor,
            bare_metal: t.bare_metal().unwrap_or(false),
            vcpus: t
                .v_cpu_info()
                .and_then(|v| v.default_v_cpus())
                .unwrap_or(1)
                .max(1) as u32,
        }))
    }
}
