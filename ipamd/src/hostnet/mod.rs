//! Node networking owned by ipamd, as upstream's pkg/networkutils does it: secondary ENI links
//! with their route tables and rules, the node-wide policy rules, and SNAT/connmark.
//!
//! `iptables` holds the pure rule layout (unit-tested) and its atomic application; `links`
//! the rtnetlink side. This module decides what to apply when.

pub mod iptables;
pub mod link_dump;
pub mod links;
pub mod nft;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use self::iptables::{Iptables, Randomize, SnatSpec};
use self::links::{EniNet, LinkError, Links, NodeRule};
use crate::pool::datastore::Eni;

/// Node networking settings, upstream's variable names and defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// AWS_VPC_ENI_MTU (9001).
    pub mtu: u32,
    /// AWS_VPC_K8S_CNI_CONNMARK (0x80).
    pub mark: u32,
    /// AWS_VPC_CNI_NODE_PORT_SUPPORT (true).
    pub node_port_support: bool,
    /// AWS_VPC_K8S_CNI_EXTERNALSNAT (false).
    pub external_snat: bool,
    /// AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS.
    pub exclude_snat_cidrs: Vec<String>,
    /// AWS_EXTERNAL_SERVICE_CIDRS.
    pub external_service_cidrs: Vec<String>,
    /// AWS_VPC_K8S_CNI_RANDOMIZESNAT (prng).
    pub randomize: Randomize,
    pub veth_prefix: String,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            mtu: 9001,
            mark: 0x80,
            node_port_support: true,
            external_snat: false,
            exclude_snat_cidrs: Vec::new(),
            external_service_cidrs: Vec::new(),
            randomize: Randomize::Fully,
            veth_prefix: "eni".into(),
        }
    }
}

/// How long to wait for an attached ENI's link to show up on the node.
pub const LINK_WAIT: Duration = Duration::from_secs(30);

fn cidr_tuple(c: &str) -> Option<(std::net::IpAddr, u8)> {
    let n = crate::cidr::parse_v4(c)?;
    Some((n.network().into(), n.prefix_len()))
}

pub struct NodeNetwork {
    pub cfg: NetConfig,
    pub primary_ip: Ipv4Addr,
    pub primary_if: String,
    pub primary_mac: String,
    links: Links,
    iptables: Iptables,
    /// The connmark table as the last write left it (nf_tables nodes), normalized.
    nft_written: std::sync::Arc<std::sync::Mutex<Option<(nft::Connmark, String)>>>,
    /// The nf_tables connmark table was looked for (iptables connmark nodes: once).
    nft_cleared: std::sync::atomic::AtomicBool,
}

impl NodeNetwork {
    /// Find the primary ENI's link by its MAC. `iptables`: the back-end [`Iptables::detect`]
    /// found (the daemon starts that look early, beside its IMDS and EC2 reads).
    pub async fn new(
        cfg: NetConfig,
        primary_mac: &str,
        primary_ip: Ipv4Addr,
        iptables: Iptables,
    ) -> Result<NodeNetwork, LinkError> {
        let links = Links::new()?;
        let (_, primary_if) = links
            .link_by_mac(primary_mac)
            .await?
            .ok_or_else(|| LinkError::NoLink(primary_mac.to_string()))?;
        for (var, list) in [
            (
                "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
                &cfg.exclude_snat_cidrs,
            ),
            ("AWS_EXTERNAL_SERVICE_CIDRS", &cfg.external_service_cidrs),
        ] {
            let v6: Vec<&String> = list.iter().filter(|c| c.contains(':')).collect();
            if !v6.is_empty() {
                info!(var, cidrs = ?v6, "IPv6 entries apply to IPv6 rules, which ipamd does not manage yet; the IPv4 rules leave them out");
            }
        }
        Ok(NodeNetwork {
            cfg,
            primary_ip,
            primary_if,
            primary_mac: primary_mac.to_ascii_lowercase(),
            links,
            iptables,
            nft_written: Default::default(),
            nft_cleared: Default::default(),
        })
    }

    /// Node-wide state: primary ENI MTU and rp_filter, the fwmark and external-service rules,
    /// SNAT and connmark. Idempotent; run at start and at every reconcile.
    pub async fn setup_host(&self, vpc_cidrs: &[ipnet::Ipv4Net]) -> anyhow::Result<()> {
        use anyhow::Context;
        if let Some((idx, _)) = self.links.link_by_mac(&self.primary_mac).await? {
            self.links.set_mtu_up(idx, self.cfg.mtu).await?;
        }
        if self.cfg.node_port_support {
            links::set_rp_filter(&self.primary_if, 2)
                .with_context(|| format!("loose rp_filter on {}", self.primary_if))?;
        }
        let mark = if self.cfg.node_port_support || !self.cfg.external_snat {
            vec![NodeRule {
                priority: links::FWMARK_RULE_PRIORITY,
                table: links::MAIN_TABLE,
                dst: None,
                src: None,
                fwmark: Some((self.cfg.mark, self.cfg.mark)),
            }]
        } else {
            Vec::new()
        };
        self.links
            .converge_rules(links::FWMARK_RULE_PRIORITY, &mark)
            .await?;
        let ext: Vec<NodeRule> = self
            .cfg
            .external_service_cidrs
            .iter()
            .filter_map(|c| cidr_tuple(c))
            .map(|dst| NodeRule {
                priority: links::EXTERNAL_SERVICE_RULE_PRIORITY,
                table: links::MAIN_TABLE,
                dst: Some(dst),
                src: None,
                fwmark: None,
            })
            .collect();
        self.links
            .converge_rules(links::EXTERNAL_SERVICE_RULE_PRIORITY, &ext)
            .await?;
        let connmark_in_nft = self.iptables.nft && !self.cfg.external_snat;
        let spec = SnatSpec {
            vpc_cidrs: vpc_cidrs.to_vec(),
            exclude_cidrs: self.cfg.exclude_snat_cidrs.clone(),
            primary_ip: self.primary_ip,
            primary_if: self.primary_if.clone(),
            veth_prefix: self.cfg.veth_prefix.clone(),
            mark: self.cfg.mark,
            external_snat: self.cfg.external_snat,
            node_port_support: self.cfg.node_port_support,
            randomize: self.cfg.randomize,
            connmark_in_nft,
        };
        // Marks move between the back-ends without a gap: the new place is written before the
        // old one is cleared.
        let m = crate::metrics::global();
        let marked = if connmark_in_nft {
            self.connmark_nft(&spec).await
        } else {
            Ok(())
        };
        let (nat, mangle) = iptables::desired(&spec);
        let ipt = self.iptables.clone();
        let applied = tokio::task::spawn_blocking(move || -> anyhow::Result<(bool, bool)> {
            let [nat, mangle] = ipt.apply([("nat", &nat), ("mangle", &mangle)])?;
            Ok((nat, mangle))
        })
        .await?;
        // Looked for once; a look that failed is tried again at the next reconcile.
        let removed = if connmark_in_nft
            || self.nft_cleared.load(std::sync::atomic::Ordering::Acquire)
        {
            Ok(false)
        } else {
            let gone = tokio::task::spawn_blocking(nft::remove).await?;
            if gone.is_ok() {
                self.nft_cleared
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            if let Ok(true) = gone {
                if let Ok(mut w) = self.nft_written.lock() {
                    *w = None;
                }
                info!("removed the nf_tables connmark table (table ip aws-cni): connections are marked by the iptables chain here");
            }
            gone.map_err(anyhow::Error::from)
        };
        // Upstream's connmark metrics: the backend, and each reconciliation's outcome.
        let (on, off) = if connmark_in_nft {
            ("nftables", "iptables")
        } else {
            ("iptables", "nftables")
        };
        m.connmark_backend.with_label_values(&[on]).set(1);
        m.connmark_backend.with_label_values(&[off]).set(0);
        let ok = applied.is_ok() && marked.is_ok() && removed.is_ok();
        m.connmark_reconcile_total
            .with_label_values(&[if ok { "success" } else { "error" }])
            .inc();
        marked?;
        if let Err(e) = removed {
            warn!(error = %e, "nf_tables connmark table not removed");
        }
        let changed = applied?;
        if changed.0 || changed.1 {
            info!(
                nat = changed.0,
                mangle = changed.1,
                external_snat = self.cfg.external_snat,
                ?vpc_cidrs,
                "iptables rules updated"
            );
        }
        Ok(())
    }

    /// An IPv6 node's host side, as upstream's: the primary ENI's MTU and the rule that keeps
    /// pods off other pods' node-local IPv4 egress addresses. No SNAT or connmark: pods'
    /// IPv6 addresses are the VPC's own and leave by the ENI they came in by.
    pub async fn setup_host_ipv6(&self) -> anyhow::Result<()> {
        if let Some((idx, _)) = self.links.link_by_mac(&self.primary_mac).await? {
            self.links.set_mtu_up(idx, self.cfg.mtu).await?;
        }
        self.ipv6_forwarding().await?;
        self.block_node_local(false).await
    }

    /// IPv6 forwarding on, and the primary ENI still taking the VPC router's advertisements
    /// (accept_ra=2: a forwarding interface ignores them otherwise), as upstream's init sets
    /// them; here too so that a node whose init did not run still works.
    pub async fn ipv6_forwarding(&self) -> anyhow::Result<()> {
        use anyhow::Context;
        for (key, value) in [
            ("net/ipv6/conf/all/forwarding".to_string(), "1"),
            (format!("net/ipv6/conf/{}/accept_ra", self.primary_if), "2"),
        ] {
            let path = format!("/proc/sys/{key}");
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            if current.trim() != value {
                std::fs::write(&path, value).with_context(|| format!("write {path}={value}"))?;
                info!(key = %key, value, "IPv6 sysctl set");
            }
        }
        Ok(())
    }

    /// Upstream's REJECT of new connections to egress-cni's node-local range (`v6`: the IPv6
    /// one, for an IPv4 node with ENABLE_V6_EGRESS).
    pub async fn block_node_local(&self, v6: bool) -> anyhow::Result<()> {
        let ipt = self.iptables.clone();
        let added = tokio::task::spawn_blocking(move || {
            ipt.ensure_first(
                v6,
                "filter",
                "FORWARD",
                &iptables::node_local_block_rule(v6),
            )
        })
        .await??;
        if added {
            info!(
                ipv6 = v6,
                "rule blocking pods' node-local egress addresses added"
            );
        }
        Ok(())
    }

    /// Upstream's nf_tables connmark table, written whole when what the kernel lists is not what
    /// the last write left (first pass, a changed VPC, someone else's edit).
    async fn connmark_nft(&self, spec: &SnatSpec) -> anyhow::Result<()> {
        let want = nft::Connmark {
            veth_prefix: spec.veth_prefix.clone(),
            mark: spec.mark,
            exempt: iptables::connmark_exempt(spec),
        };
        let last = self
            .nft_written
            .lock()
            .map_err(|_| anyhow::anyhow!("nft state lock poisoned"))?
            .clone();
        let w2 = want.clone();
        let Some((w, listing)) = last else {
            // Nothing written yet by this ipamd: nothing to compare a listing with.
            tokio::task::spawn_blocking(move || nft::apply_first(&w2)).await??;
            info!(exempt = ?want.exempt, "nf_tables connmark table written (table ip aws-cni)");
            // What the write left is read for the next reconcile, off the start's path. Not
            // read, the next reconcile writes the table again.
            let slot = self.nft_written.clone();
            tokio::task::spawn_blocking(move || {
                if let (Ok(listing), Ok(mut w)) = (nft::listed(), slot.lock()) {
                    w.get_or_insert((want, listing));
                }
            });
            return Ok(());
        };
        // A listing that cannot be read (no table, or nft failing) counts as different: the
        // table is written again.
        let now = tokio::task::spawn_blocking(nft::listed).await?.ok();
        if w == want && now.as_ref() == Some(&listing) {
            return Ok(());
        }
        let listing = tokio::task::spawn_blocking(move || nft::apply(&w2)).await??;
        info!(exempt = ?want.exempt, "nf_tables connmark table written (table ip aws-cni)");
        if let Ok(mut w) = self.nft_written.lock() {
            *w = Some((want, listing));
        }
        Ok(())
    }

    /// Wait for the ENI's link (it appears some time after the attach), then configure it.
    pub async fn setup_eni(&self, eni: &Eni, wait: Duration) -> Result<String, LinkError> {
        let (gateway, prefix_len) = links::gateway_of(&eni.subnet_cidr).ok_or_else(|| {
            LinkError::NoLink(format!("subnet {} of {}", eni.subnet_cidr, eni.id))
        })?;
        let deadline = Instant::now() + wait;
        while self.links.link_by_mac(&eni.mac).await?.is_none() {
            if Instant::now() >= deadline {
                return Err(LinkError::NoLink(eni.mac.clone()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let name = self
            .links
            .setup_eni(&EniNet {
                mac: eni.mac.clone(),
                primary_ip: eni.primary_ip,
                prefix_len,
                gateway,
                table: eni.route_table(),
                mtu: self.cfg.mtu,
            })
            .await?;
        info!(eni = %eni.id, link = %name, table = eni.route_table(), "ENI networking set up");
        Ok(name)
    }

    pub async fn teardown_eni(&self, eni: &Eni) {
        if let Err(e) = self
            .links
            .teardown_eni(eni.primary_ip, eni.route_table())
            .await
        {
            warn!(eni = %eni.id, error = %e, "ENI networking teardown incomplete");
        }
    }
}
