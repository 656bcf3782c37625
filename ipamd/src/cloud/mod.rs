//! The cloud behind a trait: what ipamd asks of IMDS and EC2, and the errors it must tell apart.
//!
//! `Ec2` is implemented by the AWS SDK client (`sdk`) and, in unit tests, by in-memory fakes, so
//! the pool logic is tested without any server. `guard` wraps any `Ec2` with the per-node token
//! bucket, retries with jittered backoff and call counting.

#[cfg(test)]
pub mod fake;
pub mod guard;
pub mod imds;
pub mod sdk;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::pool::datastore::Prefix;

/// Tag upstream puts on every ENI it creates, naming the instance.
pub const TAG_INSTANCE_ID: &str = "node.k8s.amazonaws.com/instance_id";
/// Creation time (RFC 3339), used to age ENIs that leaked.
pub const TAG_CREATED_AT: &str = "node.k8s.amazonaws.com/createdAt";
pub const TAG_CLUSTER_NAME: &str = "cluster.k8s.amazonaws.com/name";
/// ENIs carrying this tag with value "true" are never touched.
pub const TAG_NO_MANAGE: &str = "node.k8s.amazonaws.com/no_manage";
/// Description prefix of upstream's ENIs, followed by the instance id.
pub const ENI_DESCRIPTION_PREFIX: &str = "aws-K8S-";

/// One ENI as EC2 describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EniInfo {
    pub id: String,
    pub mac: String,
    pub status: String,
    pub description: String,
    pub subnet_id: String,
    pub primary_ip: Option<Ipv4Addr>,
    pub secondary_ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Prefix>,
    pub ipv6_addresses: Vec<std::net::Ipv6Addr>,
    pub ipv6_prefixes: Vec<ipnet::Ipv6Net>,
    pub tags: BTreeMap<String, String>,
    pub attachment: Option<Attachment>,
    /// EC2's InterfaceType: "interface" (or empty) for an ordinary ENI; "trunk", "efa",
    /// "efa-only", "branch" belong to other controllers or need other handling.
    pub interface_type: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attachment {
    pub id: String,
    pub instance_id: String,
    pub device_index: u32,
    pub network_card: u32,
    pub delete_on_termination: bool,
}

impl EniInfo {
    pub fn no_manage(&self) -> bool {
        self.tags
            .get(TAG_NO_MANAGE)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    /// Why ipamd must leave this ENI alone (never adopt, assign to or delete it), if it must.
    pub fn not_ours(&self) -> Option<&'static str> {
        match self.interface_type.as_str() {
            "trunk" => return Some("a trunk ENI (pods' branch ENIs hang off it)"),
            "efa" => return Some("an EFA ENI"),
            "efa-only" => return Some("an EFA-only ENI"),
            "branch" => return Some("a branch ENI"),
            _ => {}
        }
        if self.no_manage() {
            return Some("tagged node.k8s.amazonaws.com/no_manage=true");
        }
        if self
            .attachment
            .as_ref()
            .is_some_and(|a| a.network_card != 0)
        {
            return Some("on another network card");
        }
        None
    }

    /// Why ipamd leaves this attached ENI alone, if it does: the primary is always ipamd's;
    /// with `manage_untagged` false (MANAGE_UNTAGGED_ENI) so are only ENIs tagged with an
    /// instance id (ipamd's own tag), as upstream.
    pub fn left_alone(&self, manage_untagged: bool) -> Option<&'static str> {
        if self
            .attachment
            .as_ref()
            .is_some_and(|a| a.device_index == 0 && a.network_card == 0)
        {
            return None;
        }
        self.not_ours().or_else(|| {
            (!manage_untagged && !self.tags.contains_key(TAG_INSTANCE_ID)).then_some(
                "not tagged node.k8s.amazonaws.com/instance_id and MANAGE_UNTAGGED_ENI is false",
            )
        })
    }
}

/// The tag that offers a subnet to subnet discovery (upstream's key).
pub const TAG_CNI_ROLE: &str = "kubernetes.io/role/cni";
/// With CLUSTER_NAME set, a discovered subnet carrying tags with this prefix must carry
/// `<prefix><CLUSTER_NAME>` among them.
pub const TAG_CLUSTER_PREFIX: &str = "cni.networking.k8s.aws/cluster/";

/// One subnet as DescribeSubnets lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubnetInfo {
    pub id: String,
    pub vpc_id: String,
    pub az: String,
    pub cidr: Option<ipnet::Ipv4Net>,
    pub available: u64,
    pub tags: BTreeMap<String, String>,
}

/// Which subnets to describe.
#[derive(Debug, Clone)]
pub enum SubnetFilter {
    Ids(Vec<String>),
    /// Every subnet of a VPC in one availability zone.
    VpcAz {
        vpc_id: String,
        az: String,
    },
}

/// What to create an ENI with.
#[derive(Debug, Clone, Default)]
pub struct NewEni {
    pub subnet_id: String,
    pub security_groups: Vec<String>,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    /// Secondary addresses to request with the ENI (saves an Assign call).
    pub secondary_ips: u32,
    /// /28 prefixes to request with the ENI (prefix delegation).
    pub prefixes: u32,
}

/// Which ENIs to describe.
#[derive(Debug, Clone)]
pub enum EniFilter {
    Ids(Vec<String>),
    AttachedTo(String),
    /// Detached ENIs that ipamd created (tag key present) in this VPC, of this instance, or
    /// of any instance of the cluster when one is named: leak candidates.
    Leaked {
        vpc_id: String,
        instance_id: Option<String>,
        cluster: Option<String>,
    },
}

/// How ipamd must react to an EC2 error; the code and message are kept for the log and the ADD reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// RequestLimitExceeded and friends: back off and retry.
    Throttled,
    /// 5xx or a transport failure: retry.
    Transient,
    /// InsufficientFreeAddressesInSubnet: no address left in the subnet.
    SubnetFull,
    /// InsufficientCidrBlocks: no free /28 left in the subnet.
    NoCidrBlocks,
    /// The IAM role lacks a permission.
    Unauthorized,
    /// PrivateIpAddressLimitExceeded / AttachmentLimitExceeded: our accounting is off.
    Limit,
    /// The resource is attached or otherwise busy.
    InUse,
    NotFound,
    Other,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("EC2 {op}: {code}: {message}")]
pub struct CloudError {
    pub op: &'static str,
    pub kind: ErrorKind,
    pub code: String,
    pub message: String,
}

impl CloudError {
    /// The code for metric labels: EC2's, or "transport" when the call failed before EC2
    /// answered (a bounded label either way).
    pub fn label(&self) -> &str {
        if self.code.is_empty() {
            "transport"
        } else {
            &self.code
        }
    }

    pub fn new(op: &'static str, code: &str, message: impl Into<String>, status: u16) -> Self {
        CloudError {
            op,
            kind: classify(code, status),
            code: code.to_string(),
            message: message.into(),
        }
    }

    pub fn retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Throttled | ErrorKind::Transient)
    }
}

/// Map an EC2 error code (and HTTP status) to what ipamd does about it.
pub fn classify(code: &str, status: u16) -> ErrorKind {
    match code {
        "RequestLimitExceeded"
        | "Throttling"
        | "ThrottlingException"
        | "RequestThrottled"
        | "TooManyRequestsException" => ErrorKind::Throttled,
        "InsufficientFreeAddressesInSubnet" => ErrorKind::SubnetFull,
        "InsufficientCidrBlocks" => ErrorKind::NoCidrBlocks,
        "UnauthorizedOperation" | "AccessDenied" | "AuthFailure" => ErrorKind::Unauthorized,
        "PrivateIpAddressLimitExceeded" | "AttachmentLimitExceeded" => ErrorKind::Limit,
        "InvalidNetworkInterface.InUse" | "IncorrectState" => ErrorKind::InUse,
        "InvalidNetworkInterfaceID.NotFound" | "InvalidAttachmentID.NotFound" => {
            ErrorKind::NotFound
        }
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" => {
            ErrorKind::Transient
        }
        _ if status == 503 && code.is_empty() => ErrorKind::Throttled,
        _ if status >= 500 || status == 0 => ErrorKind::Transient,
        _ => ErrorKind::Other,
    }
}

/// The EC2 calls ipamd makes. Every method is one API call (the guard counts them).
#[async_trait::async_trait]
pub trait Ec2: Send + Sync + 'static {
    async fn describe_enis(&self, filter: EniFilter) -> Result<Vec<EniInfo>, CloudError>;
    async fn create_eni(&self, req: NewEni) -> Result<EniInfo, CloudError>;
    /// Returns the attachment id.
    async fn attach_eni(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
    ) -> Result<String, CloudError>;
    async fn set_delete_on_termination(
        &self,
        eni_id: &str,
        attachment_id: &str,
    ) -> Result<(), CloudError>;
    async fn detach_eni(&self, attachment_id: &str) -> Result<(), CloudError>;
    async fn delete_eni(&self, eni_id: &str) -> Result<(), CloudError>;
    /// Returns the newly assigned addresses only.
    async fn assign_ips(&self, eni_id: &str, count: u32) -> Result<Vec<Ipv4Addr>, CloudError>;
    async fn assign_prefixes(&self, eni_id: &str, count: u32) -> Result<Vec<Prefix>, CloudError>;
    async fn unassign_ips(&self, eni_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError>;
    async fn unassign_prefixes(&self, eni_id: &str, prefixes: &[Prefix]) -> Result<(), CloudError>;
    /// AssignIpv6Addresses with a prefix count: the newly assigned IPv6 prefixes (/80s).
    async fn assign_ipv6_prefixes(
        &self,
        eni_id: &str,
        count: u32,
    ) -> Result<Vec<ipnet::Ipv6Net>, CloudError>;
    async fn describe_subnets(&self, filter: SubnetFilter) -> Result<Vec<SubnetInfo>, CloudError>;
    /// (max ENIs on card 0, IPv4 addresses per ENI, Nitro?) for a type missing from the table.
    async fn describe_instance_type(
        &self,
        instance_type: &str,
    ) -> Result<Option<crate::instance::types::InstanceLimits>, CloudError>;
}

/// The one HTTP client ipamd's SDK clients share: hyper with rustls on ring (the SDK's default
/// features, and their second TLS stack, are off to keep the build lean).
pub fn http_client() -> aws_sdk_ec2::config::SharedHttpClient {
    https(aws_smithy_http_client::Builder::new())
}

/// As [`http_client`], keeping at most `idle` connections per host open between requests.
pub fn http_client_keeping(idle: usize) -> aws_sdk_ec2::config::SharedHttpClient {
    https(aws_smithy_http_client::Builder::new().pool_max_idle_per_host(idle))
}

fn https(b: aws_smithy_http_client::Builder) -> aws_sdk_ec2::config::SharedHttpClient {
    use aws_smithy_http_client::tls;
    b.tls_provider(tls::Provider::Rustls(
        tls::rustls_provider::CryptoMode::Ring,
    ))
    .build_https()
}

pub use crate::cidr::parse_prefix;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_codes() {
        assert_eq!(classify("RequestLimitExceeded", 503), ErrorKind::Throttled);
        assert_eq!(classify("", 503), ErrorKind::Throttled);
        assert_eq!(classify("InternalError", 500), ErrorKind::Transient);
        assert_eq!(classify("Whatever", 502), ErrorKind::Transient);
        assert_eq!(
            classify("InsufficientFreeAddressesInSubnet", 400),
            ErrorKind::SubnetFull
        );
        assert_eq!(
            classify("UnauthorizedOperation", 403),
            ErrorKind::Unauthorized
        );
        assert_eq!(classify("InvalidParameterValue", 400), ErrorKind::Other);
    }

    #[test]
    fn enis_of_other_owners_are_named() {
        let mut e = EniInfo::default();
        assert_eq!(e.not_ours(), None);
        e.interface_type = "interface".into();
        assert_eq!(e.not_ours(), None);
        for t in ["trunk", "efa", "efa-only", "branch"] {
            e.interface_type = t.into();
            assert!(e.not_ours().is_some(), "{t}");
        }
        e.interface_type.clear();
        e.tags.insert(TAG_NO_MANAGE.into(), "True".into());
        assert!(e.not_ours().unwrap().contains("no_manage"));
        e.tags.clear();
        e.attachment = Some(Attachment {
            network_card: 1,
            ..Default::default()
        });
        assert!(e.not_ours().unwrap().contains("network card"));
    }

    #[test]
    fn untagged_enis_and_the_primary() {
        let mut e = EniInfo {
            attachment: Some(Attachment {
                device_index: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(e.left_alone(true), None);
        assert!(e.left_alone(false).unwrap().contains("MANAGE_UNTAGGED_ENI"));
        e.tags.insert(TAG_INSTANCE_ID.into(), "i-1".into());
        assert_eq!(e.left_alone(false), None);
        // The primary is ipamd's whatever its tags say.
        e.tags = [(TAG_NO_MANAGE.to_string(), "true".to_string())].into();
        assert!(e.left_alone(true).is_some());
        e.attachment = Some(Attachment::default());
        assert_eq!(e.left_alone(false), None);
    }

    #[test]
    fn parses_prefixes() {
        assert_eq!(
            parse_prefix("10.0.1.16/28"),
            Some(Prefix(Ipv4Addr::new(10, 0, 1, 16)))
        );
        assert_eq!(parse_prefix("10.0.1.17/28"), None);
        assert_eq!(parse_prefix("10.0.1.16/27"), None);
    }
}
