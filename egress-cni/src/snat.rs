//! The pod's SNAT: a chain of its own in the `nat` table, upstream's names and rules, and the
//! `iptables-restore --noflush` scripts that put it in place or take it away in one atomic
//! call. Pure: the text here is run by `crate::iptables`.
//!
//! ```text
//! -A POSTROUTING -s <pod>/32 -m comment --comment "name: \"<net>\" id: \"<cid>\"" -j CNI-E4-<hash>
//! -A CNI-E4-<hash> -d 224.0.0.0/4 -m comment --comment "..." -j ACCEPT
//! -A CNI-E4-<hash> -m comment --comment "..." -j SNAT --to-source <node IP> --random-fully
//! ```
//!
//! Rules are written in the form `iptables-save` prints them, so what is in place compares
//! equal to what is wanted and a repeated ADD changes nothing.

use std::net::IpAddr;

use sha2::{Digest, Sha512};

use crate::config::{Family, RandomizeSnat};

pub const TABLE: &str = "nat";
const POSTROUTING: &str = "POSTROUTING";
/// The CNI plugins' chain names are exactly this long.
const CHAIN_LEN: usize = 28;

fn sha512_hex(s: &str) -> String {
    Sha512::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The pod's chain: containernetworking/plugins' `MustFormatChainNameWithPrefix(network,
/// containerID, "E4-"|"E6-")`, i.e. `CNI-E4-` and sha512(network + container id) in hex, cut
/// to 28 characters, so chains upstream made are found and removed by name.
pub fn chain_name(family: Family, network: &str, container_id: &str) -> String {
    let prefix = match family {
        Family::V4 => "CNI-E4-",
        Family::V6 => "CNI-E6-",
    };
    let mut name = format!(
        "{prefix}{}",
        sha512_hex(&format!("{network}{container_id}"))
    );
    name.truncate(CHAIN_LEN);
    name
}

/// The host end of the egress veth pair: `veth` and 11 hex characters of the same hash as the
/// chain's (so one can be told from the other), 15 characters, the kernel's limit.
pub fn host_veth_name(network: &str, container_id: &str) -> String {
    let mut name = format!("veth{}", sha512_hex(&format!("{network}{container_id}")));
    name.truncate(15);
    name
}

/// containernetworking/plugins' `FormatComment`: `name: "<net>" id: "<cid>"` (Go's %q; the
/// network name and container id are limited to `[A-Za-z0-9_.-]`, which %q leaves alone).
pub fn comment(network: &str, container_id: &str) -> String {
    format!("name: \"{network}\" id: \"{container_id}\"")
}

/// As `iptables-save` quotes an argument: in double quotes, `"` and `\` escaped, when it
/// holds anything but letters, digits and a few safe characters.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c))
    {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// What one pod's SNAT consists of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snat {
    pub family: Family,
    pub chain: String,
    /// The chain's rules, `-A <chain> ...`, in order.
    pub rules: Vec<String>,
    /// `-A POSTROUTING -s <pod> ... -j <chain>`.
    pub jump: String,
}

impl Snat {
    pub fn new(
        family: Family,
        network: &str,
        container_id: &str,
        node_ip: IpAddr,
        pod_ip: IpAddr,
        randomize: RandomizeSnat,
    ) -> Snat {
        let chain = chain_name(family, network, container_id);
        let c = quote(&comment(network, container_id));
        let (multicast, host_len) = match family {
            Family::V4 => ("224.0.0.0/4", 32),
            Family::V6 => ("ff00::/8", 128),
        };
        let random = match randomize {
            RandomizeSnat::Prng => " --random-fully",
            RandomizeSnat::HashRandom => " --random",
            RandomizeSnat::None => "",
        };
        Snat {
            family,
            rules: vec![
                format!("-A {chain} -d {multicast} -m comment --comment {c} -j ACCEPT"),
                format!(
                    "-A {chain} -m comment --comment {c} -j SNAT --to-source {node_ip}{random}"
                ),
            ],
            jump: format!(
                "-A {POSTROUTING} -s {pod_ip}/{host_len} -m comment --comment {c} -j {chain}"
            ),
            chain,
        }
    }
}

/// What `<family>-save -t nat` shows of one chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    pub chain_exists: bool,
    pub rules: Vec<String>,
    /// Every POSTROUTING rule jumping to the chain, whatever its match (upstream's have the
    /// same shape as ours; a pod address need not be known to find them).
    pub jumps: Vec<String>,
}

/// The last word of a rule, when it is `-j <target>`'s.
fn jump_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace().rev();
    let target = words.next()?;
    (words.next()? == "-j").then_some(target)
}

/// Pick `chain` out of a saved `nat` table.
pub fn parse_saved(saved: &str, chain: &str) -> Saved {
    let mut s = Saved::default();
    let decl = format!(":{chain} ");
    let own = format!("-A {chain} ");
    let builtin = format!("-A {POSTROUTING} ");
    let mut in_nat = false;
    for line in saved.lines() {
        let line = line.trim_end();
        if let Some(t) = line.strip_prefix('*') {
            in_nat = t == TABLE;
            continue;
        }
        if !in_nat {
            continue;
        }
        if line.starts_with(&decl) {
            s.chain_exists = true;
        } else if line.starts_with(&own) {
            s.rules.push(line.to_string());
        } else if line.starts_with(&builtin) && jump_target(line) == Some(chain) {
            s.jumps.push(line.to_string());
        }
    }
    s
}

/// The restore script that makes `saved` into `want`, or None when it is already so.
pub fn add_script(saved: &Saved, want: &Snat) -> Option<String> {
    if saved.chain_exists && saved.rules == want.rules && saved.jumps == [want.jump.clone()] {
        return None;
    }
    let mut out = format!("*{TABLE}\n");
    // Declaring the chain creates it, or flushes it: its rules are written whole.
    out.push_str(&format!(":{} - [0:0]\n", want.chain));
    for r in &want.rules {
        out.push_str(r);
        out.push('\n');
    }
    // Old jumps (a pod address from an earlier ADD of this container, duplicates) go, and
    // the one wanted is added last: all in the same transaction.
    for j in &saved.jumps {
        if let Some(rule) = j.strip_prefix("-A ") {
            out.push_str(&format!("-D {rule}\n"));
        }
    }
    out.push_str(&want.jump);
    out.push('\n');
    out.push_str("COMMIT\n");
    Some(out)
}

/// The restore script that removes the chain and every jump to it, or None when neither is
/// there.
pub fn del_script(saved: &Saved, chain: &str) -> Option<String> {
    if !saved.chain_exists && saved.jumps.is_empty() {
        return None;
    }
    let mut out = format!("*{TABLE}\n");
    for j in &saved.jumps {
        if let Some(rule) = j.strip_prefix("-A ") {
            out.push_str(&format!("-D {rule}\n"));
        }
    }
    if saved.chain_exists {
        // A chain must be empty to be deleted; declaring it empties it.
        out.push_str(&format!(":{chain} - [0:0]\n-X {chain}\n"));
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// What is missing from `saved` for `want` to hold, in words; empty when nothing is.
pub fn differences(saved: &Saved, want: &Snat) -> Vec<String> {
    let mut out = Vec::new();
    if !saved.chain_exists {
        out.push(format!(
            "SNAT chain {} is missing from the nat table",
            want.chain
        ));
        return out;
    }
    for r in &want.rules {
        if !saved.rules.contains(r) {
            out.push(format!("rule missing: {r}"));
        }
    }
    if !saved.jumps.contains(&want.jump) {
        out.push(format!("rule missing: {}", want.jump));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4() -> Snat {
        Snat::new(
            Family::V4,
            "aws-cni",
            "cid1",
            "192.0.2.1".parse().unwrap(),
            "169.254.172.2".parse().unwrap(),
            RandomizeSnat::Prng,
        )
    }

    #[test]
    fn chain_names_match_upstreams_tests() {
        // Upstream's cmd/egress-cni-plugin/main_test.go: network "aws-cni".
        assert_eq!(
            chain_name(Family::V4, "aws-cni", "containerId-123"),
            "CNI-E4-5740307710ebfd5fb24f5"
        );
        assert_eq!(
            chain_name(Family::V6, "aws-cni", "containerId-789"),
            "CNI-E6-e335b08ae90730d0a659a"
        );
        assert_eq!(
            host_veth_name("aws-cni", "containerId-123"),
            "veth5740307710e"
        );
    }

    #[test]
    fn comment_is_upstreams() {
        assert_eq!(comment("aws-cni", "abc"), r#"name: "aws-cni" id: "abc""#);
        assert_eq!(quote(r#"name: "a" id: "b""#), r#""name: \"a\" id: \"b\"""#);
        assert_eq!(quote("plain"), "plain");
    }

    #[test]
    fn rules_as_iptables_save_prints_them() {
        let s = v4();
        let c = r#""name: \"aws-cni\" id: \"cid1\"""#;
        let chain = chain_name(Family::V4, "aws-cni", "cid1");
        assert_eq!(
            s.rules,
            [
                format!("-A {chain} -d 224.0.0.0/4 -m comment --comment {c} -j ACCEPT"),
                format!("-A {chain} -m comment --comment {c} -j SNAT --to-source 192.0.2.1 --random-fully"),
            ]
        );
        assert_eq!(
            s.jump,
            format!("-A POSTROUTING -s 169.254.172.2/32 -m comment --comment {c} -j {chain}")
        );
        let v6 = Snat::new(
            Family::V6,
            "aws-cni",
            "cid1",
            "2001:db8:1::1".parse().unwrap(),
            "fd00::ac:2".parse().unwrap(),
            RandomizeSnat::HashRandom,
        );
        assert!(v6.rules[0].contains(" -d ff00::/8 "));
        assert!(v6.rules[1].ends_with("--to-source 2001:db8:1::1 --random"));
        assert!(v6.jump.contains(" -s fd00::ac:2/128 "));
        assert!(v6.chain.starts_with("CNI-E6-"));
        let none = Snat::new(
            Family::V4,
            "n",
            "c",
            "192.0.2.1".parse().unwrap(),
            "169.254.172.2".parse().unwrap(),
            RandomizeSnat::None,
        );
        assert!(none.rules[1].ends_with("--to-source 192.0.2.1"));
    }

    /// A real `iptables-save -t nat` (nf_tables, 1.8.9) after our script ran, with an
    /// unrelated rule and another pod's chain around it.
    fn saved_after_add(s: &Snat) -> String {
        format!(
            "# Generated by iptables-save v1.8.9 (nf_tables)\n*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:{chain} - [0:0]\n:CNI-E4-other - [0:0]\n{jump}\n-A POSTROUTING -s 10.0.0.0/8 -j MASQUERADE\n-A POSTROUTING -s 169.254.172.9/32 -j CNI-E4-other\n{r0}\n{r1}\nCOMMIT\n# Completed\n",
            chain = s.chain,
            jump = s.jump,
            r0 = s.rules[0],
            r1 = s.rules[1]
        )
    }

    #[test]
    fn add_is_idempotent_and_replaces_stale_jumps() {
        let s = v4();
        let empty = parse_saved("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n", &s.chain);
        let script = add_script(&empty, &s).unwrap();
        assert_eq!(
            script,
            format!(
                "*nat\n:{c} - [0:0]\n{r0}\n{r1}\n{j}\nCOMMIT\n",
                c = s.chain,
                r0 = s.rules[0],
                r1 = s.rules[1],
                j = s.jump
            )
        );
        let saved = parse_saved(&saved_after_add(&s), &s.chain);
        assert!(saved.chain_exists);
        assert_eq!(saved.jumps, std::slice::from_ref(&s.jump));
        assert_eq!(add_script(&saved, &s), None);
        assert!(differences(&saved, &s).is_empty());

        // The container's chain with a jump from an older address: that jump is removed.
        let old = s.jump.replace("169.254.172.2/32", "169.254.172.7/32");
        let saved = parse_saved(&saved_after_add(&s).replace(&s.jump, &old), &s.chain);
        let script = add_script(&saved, &s).unwrap();
        assert!(script.contains(&format!("-D {}\n", &old[3..])));
        assert!(script.ends_with(&format!("{}\nCOMMIT\n", s.jump)));
    }

    #[test]
    fn del_removes_jumps_then_the_chain() {
        let s = v4();
        let saved = parse_saved(&saved_after_add(&s), &s.chain);
        assert_eq!(
            del_script(&saved, &s.chain).unwrap(),
            format!(
                "*nat\n-D {}\n:{c} - [0:0]\n-X {c}\nCOMMIT\n",
                &s.jump[3..],
                c = s.chain
            )
        );
        let gone = parse_saved("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n", &s.chain);
        assert_eq!(del_script(&gone, &s.chain), None);
        // A jump left without its chain (cannot happen in one table, but a save is input).
        let only_jump = Saved {
            chain_exists: false,
            rules: vec![],
            jumps: vec![s.jump.clone()],
        };
        assert_eq!(
            del_script(&only_jump, &s.chain).unwrap(),
            format!("*nat\n-D {}\nCOMMIT\n", &s.jump[3..])
        );
    }

    #[test]
    fn other_tables_and_chains_are_ignored() {
        let s = v4();
        let text = format!(
            "*filter\n:{c} - [0:0]\n-A POSTROUTING -j {c}\nCOMMIT\n*nat\n:{c}X - [0:0]\n-A POSTROUTING -s 1.2.3.4/32 -j {c}X\n-A POSTROUTING -m comment --comment \"-j {c}\" -j ACCEPT\nCOMMIT\n",
            c = s.chain
        );
        assert_eq!(parse_saved(&text, &s.chain), Saved::default());
    }

    #[test]
    fn differences_name_what_is_missing() {
        let s = v4();
        let mut saved = parse_saved(&saved_after_add(&s), &s.chain);
        saved.jumps.clear();
        saved.rules.pop();
        let d = differences(&saved, &s);
        assert_eq!(d.len(), 2);
        assert!(d[0].contains("SNAT --to-source 192.0.2.1"));
        assert!(d[1].contains("POSTROUTING -s 169.254.172.2/32"));
        let d = differences(&Saved::default(), &s);
        assert_eq!(
            d,
            [format!(
                "SNAT chain {} is missing from the nat table",
                s.chain
            )]
        );
    }
}
