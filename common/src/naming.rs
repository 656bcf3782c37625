//! Host-side veth names, exactly as upstream derives them so that an upstream node's pods are
//! recognised after switching plugins.

use sha1::{Digest, Sha1};

use crate::validate::Invalid;

/// `<prefix>` + the first 11 hex characters of sha1("<namespace>.<pod name>").
pub fn host_veth_name(prefix: &str, pod_namespace: &str, pod_name: &str) -> String {
    let digest = Sha1::digest(format!("{pod_namespace}.{pod_name}").as_bytes());
    let mut hex = String::with_capacity(40);
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("{prefix}{}", &hex[..11])
}

/// The host veth's MAC, set when the pair is created (upstream sets one too): a MAC the kernel
/// chose at random is rewritten by udev on distributions with `MACAddressPolicy=persistent`,
/// after the pod's static neighbour entry has recorded the first one. Derived from the veth's
/// name, unique on the host, instead of drawn at random, so keeping it unique needs no look at
/// the host's links. Locally administered, unicast.
pub fn host_veth_mac(host_veth: &str) -> [u8; 6] {
    let d = Sha1::digest(format!("aws-cni host veth {host_veth}").as_bytes());
    let mut m = [0u8; 6];
    m.copy_from_slice(&d[..6]);
    m[0] = (m[0] | 0x02) & 0xfe;
    m
}

/// A host veth whose pod had its DEL and whose deletion is left to ipamd (the kernel's veth
/// unregister waits out an RCU grace period, 15-20 ms, which DEL need not pay): it is brought
/// down, labelled with this prefix, the time and its attachment, and renamed so that the pod's
/// own name is free for a new sandbox at once.
pub const RETIRED_ALIAS_PREFIX: &str = "aws-cni retired ";

/// The retired link's name, at most 12 characters: it can never be a pod veth's (prefix + 11
/// hex digits: only a 1-character prefix gives 12, and "nir" is not hex).
pub fn retired_name(index: u32) -> String {
    format!("{RETIRED_NAME_PREFIX}{index:x}")
}

pub const RETIRED_NAME_PREFIX: &str = "cnir";

pub fn retired_alias(unix_secs: u64, owner: &str) -> String {
    format!("{RETIRED_ALIAS_PREFIX}{unix_secs} {owner}")
}

/// When a retired link was retired (seconds since the epoch); None for any other alias.
pub fn retired_at(alias: &str) -> Option<u64> {
    alias
        .strip_prefix(RETIRED_ALIAS_PREFIX)?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// Upstream's rule for `vethPrefix` / `AWS_VPC_K8S_CNI_VETHPREFIX`: at most 4 characters so
/// prefix + 11 hex characters fits an interface name (15), and not a prefix other interfaces
/// use. Both the plugin and ipamd check it, with the same words.
pub fn validate_veth_prefix(p: &str) -> Result<(), Invalid> {
    const WHAT: &str = "veth prefix";
    if p.is_empty() {
        return Err(Invalid::Empty { what: WHAT });
    }
    if p.len() > 4 {
        return Err(Invalid::TooLong {
            what: WHAT,
            len: p.len(),
            max: 4,
        });
    }
    if !p
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Invalid::Characters {
            what: WHAT,
            value: p.to_string(),
            allowed: "[A-Za-z0-9_-]",
        });
    }
    if matches!(p, "eth" | "lo" | "vlan") {
        return Err(Invalid::Reserved {
            what: WHAT,
            value: p.to_string(),
            why: "other interfaces use it",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_veth_macs_are_local_unicast_and_stable() {
        let m = host_veth_mac("eni0123456789a");
        assert_eq!(m[0] & 0x03, 0x02, "locally administered, unicast");
        assert_eq!(m, host_veth_mac("eni0123456789a"));
        assert_ne!(m, host_veth_mac("eni0123456789b"));
    }

    use super::*;

    #[test]
    fn retired_links_are_named_apart_and_dated() {
        assert_eq!(retired_name(u32::MAX), "cnirffffffff");
        let a = retired_alias(1_700_000_000, "cid/eth0");
        assert_eq!(retired_at(&a), Some(1_700_000_000));
        assert_eq!(retired_at("cid/eth0"), None);
    }

    #[test]
    fn matches_upstream_scheme() {
        let n = host_veth_name("eni", "default", "nginx");
        assert_eq!(n.len(), 14);
        // sha1("default.nginx") from coreutils' sha1sum.
        assert_eq!(n, "enic440f455693");
        assert!(n.starts_with("eni"));
        assert_eq!(n, format!("eni{}", &sha1_hex("default.nginx")[..11]));
        assert_ne!(n, host_veth_name("eni", "default", "nginx2"));
        assert!(host_veth_name("abcd", "ns", "p").len() <= 15);
    }

    #[test]
    fn veth_prefix_rules() {
        assert!(validate_veth_prefix("eni").is_ok());
        for bad in ["", "toolong", "eth", "lo", "vlan", "a/b"] {
            assert!(validate_veth_prefix(bad).is_err(), "{bad:?}");
        }
    }

    fn sha1_hex(s: &str) -> String {
        let out = std::process::Command::new("sha1sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(s.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        String::from_utf8(out.stdout).unwrap()[..40].to_string()
    }
}
