//! How many pods a node can hold, following EKS's `max-pods-calculator.sh`.
//!
//! kubelet must not schedule more pods than the CNI can give addresses to,
//! otherwise pods get stuck in ContainerCreating. The rules here match the
//! upstream calculator so nodes get the same `--max-pods` they would on EKS.

use crate::instance::types::InstanceLimits;

/// Addresses in one delegated /28 prefix.
const IPS_PER_PREFIX: u32 = 16;
/// Pods that use host networking (aws-node and kube-proxy) need no address.
const HOST_NETWORK_PODS: u32 = 2;
/// First CNI release that can assign prefixes instead of single addresses.
const PREFIX_DELEGATION_SINCE: [u32; 3] = [1, 9, 0];
/// EKS's recommended kubelet limits, for small and large nodes.
const SMALL_NODE_CAP: u32 = 110;
const LARGE_NODE_CAP: u32 = 250;
/// Nodes with more vCPUs than this get the larger cap.
const SMALL_NODE_MAX_VCPUS: u32 = 30;

/// Inputs of the calculator besides the instance type, as its flags name them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaxPodsParams {
    /// CNI version the node runs; `None` means the latest (this one).
    pub cni_version: Option<String>,
    /// With custom networking the primary ENI hosts no pods.
    pub custom_networking: bool,
    pub prefix_delegation: bool,
    /// `MAX_ENI`: an operator-imposed ceiling on ENIs.
    pub max_eni: Option<u32>,
    /// Report the raw address capacity instead of the kubelet recommendation.
    pub show_max_allowed: bool,
}

/// Parses `1.9.0`, `v1.10.1` or `1.9.0-eksbuild.1` into `[major, minor, patch]`
/// (missing minor/patch count as 0). `None` if it is not a version at all.
pub fn parse_cni_version(version: &str) -> Option<[u32; 3]> {
    let v = version.trim();
    let v = v.strip_prefix(['v', 'V']).unwrap_or(v);
    let core = v.split(['-', '+']).next().unwrap_or(v);
    let mut parts = core.split('.');
    let mut out = [0; 3];
    for (i, slot) in out.iter_mut().enumerate() {
        match parts.next() {
            Some(p) => *slot = p.parse().ok()?,
            None if i > 0 => break,
            None => return None,
        }
    }
    if parts.next().is_some() {
        return None;
    }
    Some(out)
}

/// Whether a CNI of this version can delegate prefixes. An unparseable
/// version counts as "no": overstating max-pods strands pods, understating
/// only wastes capacity.
fn version_supports_prefixes(version: Option<&str>) -> bool {
    match version {
        None => true,
        Some(v) => parse_cni_version(v).is_some_and(|v| v >= PREFIX_DELEGATION_SINCE),
    }
}

/// The address-capacity formula: every ENI but its primary address, times
/// 16 when prefixes are used, plus the host-network pods.
fn formula(enis: u32, ipv4_per_eni: u32, prefixes: bool) -> u32 {
    let per_eni = ipv4_per_eni.saturating_sub(1);
    let per_eni = if prefixes {
        per_eni.saturating_mul(IPS_PER_PREFIX)
    } else {
        per_eni
    };
    enis.saturating_mul(per_eni)
        .saturating_add(HOST_NETWORK_PODS)
}

/// ENIs usable for pods after `MAX_ENI` and custom networking.
pub fn pod_enis(limits: &InstanceLimits, max_eni: Option<u32>, custom_networking: bool) -> u32 {
    let enis = max_eni.map_or(limits.enis, |m| m.min(limits.enis));
    if custom_networking {
        enis.saturating_sub(1)
    } else {
        enis
    }
}

/// Max pods from address capacity alone, ignoring `show_max_allowed` and the
/// kubelet cap.
pub fn max_pods_uncapped(limits: &InstanceLimits, p: &MaxPodsParams) -> u32 {
    let prefixes = p.prefix_delegation
        && limits.is_nitro()
        && version_supports_prefixes(p.cni_version.as_deref());
    formula(
        pod_enis(limits, p.max_eni, p.custom_networking),
        limits.ipv4_per_eni,
        prefixes,
    )
}

/// The value to give kubelet's `--max-pods`, as the EKS calculator prints it.
pub fn max_pods(limits: &InstanceLimits, p: &MaxPodsParams) -> u32 {
    let uncapped = max_pods_uncapped(limits, p);
    if p.show_max_allowed {
        return uncapped;
    }
    let cap = if limits.vcpus > SMALL_NODE_MAX_VCPUS {
        LARGE_NODE_CAP
    } else {
        SMALL_NODE_CAP
    };
    uncapped.min(cap)
}

/// The daemon's own pod limit: how many addresses it can hand out with its
/// current `MAX_ENI` and prefix-delegation settings. Uncapped because the
/// kubelet cap is kubelet's business, not an address-pool limit.
pub fn node_max_pods(
    limits: &InstanceLimits,
    max_eni: Option<u32>,
    prefix_delegation: bool,
    custom_networking: bool,
) -> u32 {
    max_pods_uncapped(
        limits,
        &MaxPodsParams {
            prefix_delegation,
            max_eni,
            custom_networking,
            ..MaxPodsParams::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::types::lookup;

    fn calc(ty: &str, p: &MaxPodsParams) -> u32 {
        max_pods(lookup(ty).unwrap(), p)
    }

    fn pd() -> MaxPodsParams {
        MaxPodsParams {
            prefix_delegation: true,
            ..Default::default()
        }
    }

    #[test]
    fn secondary_ip_mode() {
        let p = MaxPodsParams::default();
        assert_eq!(calc("t3.nano", &p), 4);
        assert_eq!(calc("t3.medium", &p), 17);
        assert_eq!(calc("m5.large", &p), 29);
    }

    #[test]
    fn large_nodes_capped_at_250() {
        let p = MaxPodsParams::default();
        assert_eq!(calc("m5.24xlarge", &p), 250);
        assert_eq!(calc("c5n.18xlarge", &p), 250);
        let p = MaxPodsParams {
            show_max_allowed: true,
            ..Default::default()
        };
        assert_eq!(calc("m5.24xlarge", &p), 737);
        assert_eq!(calc("c5n.18xlarge", &p), 737);
    }

    #[test]
    fn custom_networking_loses_primary_eni() {
        let p = MaxPodsParams {
            custom_networking: true,
            ..Default::default()
        };
        assert_eq!(calc("m5.large", &p), 20);
    }

    #[test]
    fn prefix_delegation() {
        assert_eq!(calc("m5.large", &pd()), 110);
        let p = MaxPodsParams {
            show_max_allowed: true,
            ..pd()
        };
        assert_eq!(calc("m5.large", &p), 434);
        // Bare metal has no hypervisor but is Nitro.
        assert_eq!(
            max_pods_uncapped(lookup("m5.metal").unwrap(), &pd()),
            15 * 49 * 16 + 2
        );
    }

    #[test]
    fn prefix_delegation_needs_nitro_and_cni_1_9() {
        let xen = lookup("t2.medium").unwrap();
        assert_eq!(
            max_pods_uncapped(xen, &pd()),
            max_pods_uncapped(xen, &MaxPodsParams::default())
        );
        let m5 = lookup("m5.large").unwrap();
        for (v, expected) in [
            ("1.8.9", 29),
            ("v1.7.5", 29),
            ("garbage", 29),
            ("1.9.0", 434),
            ("v1.10.1", 434),
            ("1.9.0-eksbuild.1", 434),
            ("2", 434),
        ] {
            let p = MaxPodsParams {
                cni_version: Some(v.into()),
                ..pd()
            };
            assert_eq!(max_pods_uncapped(m5, &p), expected, "version {v}");
        }
    }

    #[test]
    fn max_eni_lowers_but_never_raises() {
        let m5 = lookup("m5.large").unwrap();
        let with = |n| MaxPodsParams {
            max_eni: Some(n),
            ..Default::default()
        };
        assert_eq!(max_pods(m5, &with(1)), 11);
        assert_eq!(max_pods(m5, &with(99)), 29);
        let p = MaxPodsParams {
            custom_networking: true,
            ..with(1)
        };
        assert_eq!(max_pods(m5, &p), 2);
    }

    #[test]
    fn node_limit_is_uncapped_formula() {
        let m5 = lookup("m5.24xlarge").unwrap();
        assert_eq!(node_max_pods(m5, None, false, false), 737);
        assert_eq!(node_max_pods(m5, Some(2), false, false), 100);
        assert_eq!(
            node_max_pods(lookup("m5.large").unwrap(), None, true, false),
            434
        );
    }

    #[test]
    fn version_parsing() {
        assert_eq!(parse_cni_version("1.9.0"), Some([1, 9, 0]));
        assert_eq!(parse_cni_version("v1.10.1"), Some([1, 10, 1]));
        assert_eq!(parse_cni_version("1.9.0-eksbuild.1"), Some([1, 9, 0]));
        assert_eq!(parse_cni_version("1.12"), Some([1, 12, 0]));
        assert_eq!(parse_cni_version(""), None);
        assert_eq!(parse_cni_version("1..2"), None);
        assert_eq!(parse_cni_version("1.2.3.4"), None);
        assert_eq!(parse_cni_version("latest"), None);
    }
}
