//! The instance's view of itself, read through `aws-config`'s IMDSv2 client (which honours
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT`). IMDS lags EC2 after attach and assign, so ipamd reads
//! it for identity and discovery only; EC2 decides what an ENI holds.

use std::future::Future;
use std::net::Ipv4Addr;

use aws_config::imds::client::error::ImdsError;
use aws_config::imds::Client;

use super::parse_prefix;
use crate::pool::datastore::Prefix;

#[derive(Debug, Clone, thiserror::Error)]
#[error("IMDS {path}: {message}")]
pub struct MetadataError {
    pub path: String,
    pub message: String,
}

/// One interface under network/interfaces/macs/.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImdsEni {
    pub mac: String,
    pub id: String,
    pub device_number: u32,
    pub network_card: u32,
    pub subnet_id: String,
    pub subnet_cidr: ipnet::Ipv4Net,
    pub vpc_id: String,
    pub vpc_cidrs: Vec<ipnet::Ipv4Net>,
    /// The ENI's primary address first, as IMDS lists them.
    pub ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Prefix>,
    pub security_groups: Vec<String>,
}

impl ImdsEni {
    /// The ENI as ENABLE_IMDS_ONLY_MODE sees it: what IMDS tells, no tags and no interface
    /// type (so no `no_manage` and no trunk or EFA test, as upstream), no attachment id (it
    /// is never detached in that mode).
    pub fn as_eni_info(&self, instance_id: &str) -> super::EniInfo {
        super::EniInfo {
            id: self.id.clone(),
            mac: self.mac.clone(),
            status: "in-use".into(),
            subnet_id: self.subnet_id.clone(),
            primary_ip: self.ips.first().copied(),
            secondary_ips: self.ips.iter().skip(1).copied().collect(),
            prefixes: self.prefixes.clone(),
            attachment: Some(super::Attachment {
                instance_id: instance_id.to_string(),
                device_index: self.device_number,
                network_card: self.network_card,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct InstanceMeta {
    pub instance_id: String,
    pub instance_type: String,
    pub availability_zone: String,
    pub region: String,
    pub primary_mac: String,
    pub local_ipv4: Option<Ipv4Addr>,
    pub interfaces: Vec<ImdsEni>,
}

impl InstanceMeta {
    pub fn primary(&self) -> Option<&ImdsEni> {
        self.interfaces.iter().find(|i| i.mac == self.primary_mac)
    }
}

pub struct Imds {
    client: Client,
}

impl Imds {
    pub fn new() -> Imds {
        Imds {
            client: Client::builder()
                .configure(
                    &aws_config::provider_config::ProviderConfig::default()
                        .with_http_client(super::http_client_keeping(IDLE_CONNECTIONS)),
                )
                .build(),
        }
    }

    // Not `async fn`: the futures own their paths, so callers can start several at once
    // with paths made on the spot.
    fn get(&self, path: &str) -> impl Future<Output = Result<String, MetadataError>> + '_ {
        let path = path.to_string();
        let value = self.get_opt(&path);
        async move {
            value.await?.ok_or_else(|| MetadataError {
                path,
                message: "not found (404)".into(),
            })
        }
    }

    /// A missing path (404) is `None`: IMDS omits e.g. ipv4-prefix when an ENI has no prefix.
    fn get_opt(
        &self,
        path: &str,
    ) -> impl Future<Output = Result<Option<String>, MetadataError>> + '_ {
        let full = format!("/latest/meta-data/{path}");
        async move {
            match self.client.get(&full).await {
                Ok(v) => Ok(Some(v.as_ref().to_string())),
                Err(ImdsError::ErrorResponse(r)) if r.response().status().as_u16() == 404 => {
                    Ok(None)
                }
                Err(e) => Err(MetadataError {
                    path: full,
                    message: aws_smithy_types::error::display::DisplayErrorContext(&e).to_string(),
                }),
            }
        }
    }

    /// The keys are read at once, not one after another: each is a round trip, and a node
    /// with many ENIs has hundreds of them.
    pub async fn instance(&self) -> Result<InstanceMeta, MetadataError> {
        let (
            instance_id,
            instance_type,
            availability_zone,
            region,
            primary_mac,
            local_ipv4,
            interfaces,
        ) = futures::try_join!(
            self.get("instance-id"),
            self.get("instance-type"),
            self.get("placement/availability-zone"),
            self.get_opt("placement/region"),
            self.get("mac"),
            self.get_opt("local-ipv4"),
            self.interfaces(),
        )?;
        let region = match region {
            Some(r) => r,
            None => availability_zone
                .trim_end_matches(|c: char| c.is_ascii_alphabetic())
                .to_string(),
        };
        Ok(InstanceMeta {
            instance_id: instance_id.trim().to_string(),
            instance_type: instance_type.trim().to_string(),
            availability_zone: availability_zone.trim().to_string(),
            region,
            primary_mac: primary_mac.trim().to_string(),
            local_ipv4: local_ipv4.and_then(|s| s.trim().parse().ok()),
            interfaces,
        })
    }

    /// Every attached interface, sorted by device number (a few interfaces read at a time,
    /// each interface's keys at once).
    pub async fn interfaces(&self) -> Result<Vec<ImdsEni>, MetadataError> {
        let mut out = self
            .each_interface(|mac| async move { self.interface(&mac).await })
            .await?;
        out.sort_by_key(|e| (e.network_card, e.device_number));
        Ok(out)
    }

    /// What a reconcile compares with the pool, of every attached interface: 4 keys each where
    /// [`Imds::interfaces`] reads 10. The reconcile runs every interval for the daemon's life,
    /// and these reads were most of an idle ipamd's CPU.
    pub async fn addresses(&self) -> Result<Vec<ImdsAddresses>, MetadataError> {
        self.each_interface(|mac| async move { self.addresses_of(&mac).await })
            .await
    }

    /// `read` of every attached interface's MAC, a few interfaces at a time.
    async fn each_interface<T, F>(
        &self,
        read: impl Fn(String) -> F,
    ) -> Result<Vec<T>, MetadataError>
    where
        F: Future<Output = Result<T, MetadataError>>,
    {
        let macs = self.macs().await?;
        let mut out = Vec::with_capacity(macs.len());
        for some in macs.chunks(INTERFACES_AT_ONCE) {
            out.extend(futures::future::try_join_all(some.iter().cloned().map(&read)).await?);
        }
        Ok(out)
    }

    /// The IPv4 CIDRs of the VPC of the interface with MAC `mac`.
    pub async fn vpc_cidrs(&self, mac: &str) -> Result<Vec<ipnet::Ipv4Net>, MetadataError> {
        let found = self
            .get_opt(&format!(
                "network/interfaces/macs/{mac}/vpc-ipv4-cidr-blocks"
            ))
            .await?;
        Ok(lines(found)
            .iter()
            .filter_map(|c| {
                let n = crate::cidr::parse_v4(c);
                if n.is_none() {
                    tracing::warn!(cidr = %c, "IMDS lists a VPC CIDR that is not IPv4; ignored");
                }
                n
            })
            .collect())
    }

    async fn macs(&self) -> Result<Vec<String>, MetadataError> {
        let macs = self.get("network/interfaces/macs/").await?;
        Ok(macs
            .lines()
            .map(|l| l.trim().trim_end_matches('/'))
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect())
    }

    async fn addresses_of(&self, mac: &str) -> Result<ImdsAddresses, MetadataError> {
        let field = |name: &str| format!("network/interfaces/macs/{mac}/{name}");
        let (id, card, ips, prefixes) = futures::try_join!(
            self.get(&field("interface-id")),
            self.get_opt(&field("network-card")),
            self.get_opt(&field("local-ipv4s")),
            self.get_opt(&field("ipv4-prefix")),
        )?;
        Ok(ImdsAddresses {
            mac: mac.to_string(),
            id: id.trim().to_string(),
            network_card: match card {
                Some(s) => number(s, field("network-card"))?,
                None => 0,
            },
            ips: lines(ips).iter().filter_map(|l| l.parse().ok()).collect(),
            prefixes: lines(prefixes)
                .iter()
                .filter_map(|l| parse_prefix(l))
                .collect(),
        })
    }

    async fn interface(&self, mac: &str) -> Result<ImdsEni, MetadataError> {
        let field = |name: &str| format!("network/interfaces/macs/{mac}/{name}");
        let (addresses, device, subnet_id, subnet_cidr, vpc_id, vpc_cidrs, sgs) = futures::try_join!(
            self.addresses_of(mac),
            self.get(&field("device-number")),
            self.get(&field("subnet-id")),
            self.get(&field("subnet-ipv4-cidr-block")),
            self.get(&field("vpc-id")),
            self.vpc_cidrs(mac),
            self.get_opt(&field("security-group-ids")),
        )?;
        Ok(ImdsEni {
            mac: addresses.mac,
            id: addresses.id,
            device_number: number(device, field("device-number"))?,
            network_card: addresses.network_card,
            subnet_id: subnet_id.trim().to_string(),
            subnet_cidr: crate::cidr::parse_v4(&subnet_cidr).ok_or_else(|| MetadataError {
                path: field("subnet-ipv4-cidr-block"),
                message: format!("{:?} is not an IPv4 CIDR", subnet_cidr.trim()),
            })?,
            vpc_id: vpc_id.trim().to_string(),
            vpc_cidrs,
            ips: addresses.ips,
            prefixes: addresses.prefixes,
            security_groups: lines(sgs),
        })
    }
}

/// What a reconcile needs of one interface ([`Imds::addresses`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImdsAddresses {
    pub mac: String,
    pub id: String,
    pub network_card: u32,
    /// The ENI's primary address first, as IMDS lists them.
    pub ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Prefix>,
}

/// The non-empty lines of a key's value; none for a missing key.
fn lines(s: Option<String>) -> Vec<String> {
    s.unwrap_or_default()
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

fn number(s: String, path: String) -> Result<u32, MetadataError> {
    s.trim().parse::<u32>().map_err(|_| MetadataError {
        path,
        message: format!("not a number: {s:?}"),
    })
}

/// Interfaces read at once: each is ten keys, so up to 20 requests in flight (IMDS allows
/// 1,024 packets a second per ENI).
const INTERFACES_AT_ONCE: usize = 2;

/// Connections kept open to IMDS between reads: the reconcile reads it every minute, and a
/// connection per key kept for the next one would be memory for nothing.
const IDLE_CONNECTIONS: usize = 2;

/// What IMDS says of an interface's IPv6 side (IPv6 clusters read it for the primary only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImdsIpv6 {
    pub addresses: Vec<std::net::Ipv6Addr>,
    pub prefixes: Vec<ipnet::Ipv6Net>,
    pub subnet_cidrs: Vec<ipnet::Ipv6Net>,
    pub vpc_cidrs: Vec<ipnet::Ipv6Net>,
}

impl Imds {
    /// The instance's primary address of one family (`local-ipv4`, or `ipv6`), if it has one.
    pub async fn primary_address(
        &self,
        v6: bool,
    ) -> Result<Option<std::net::IpAddr>, MetadataError> {
        let key = if v6 { "ipv6" } else { "local-ipv4" };
        Ok(self
            .get_opt(key)
            .await?
            .and_then(|s| s.trim().parse::<std::net::IpAddr>().ok())
            .filter(|ip| ip.is_ipv6() == v6))
    }

    /// The IPv6 keys of one interface; each is absent (404) where the interface, subnet or
    /// VPC has no IPv6.
    pub async fn ipv6_of(&self, mac: &str) -> Result<ImdsIpv6, MetadataError> {
        let list = lines;
        let base = format!("network/interfaces/macs/{mac}");
        let nets = |v: Vec<String>, what: &str| -> Vec<ipnet::Ipv6Net> {
            v.iter()
                .filter_map(|c| {
                    let n = c.parse::<ipnet::Ipv6Net>().ok();
                    if n.is_none() {
                        tracing::warn!(cidr = %c, what, "IMDS lists an IPv6 CIDR it cannot be; ignored");
                    }
                    n
                })
                .collect()
        };
        Ok(ImdsIpv6 {
            addresses: list(self.get_opt(&format!("{base}/ipv6s")).await?)
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            prefixes: nets(
                list(self.get_opt(&format!("{base}/ipv6-prefix")).await?),
                "prefix",
            ),
            subnet_cidrs: nets(
                list(
                    self.get_opt(&format!("{base}/subnet-ipv6-cidr-blocks"))
                        .await?,
                ),
                "subnet",
            ),
            vpc_cidrs: nets(
                list(
                    self.get_opt(&format!("{base}/vpc-ipv6-cidr-blocks"))
                        .await?,
                ),
                "VPC",
            ),
        })
    }
}

impl Default for Imds {
    fn default() -> Self {
        Self::new()
    }
}
