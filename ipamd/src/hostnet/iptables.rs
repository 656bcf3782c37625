//! SNAT and connmark rules, as upstream's networkutils lays them out, applied as one
//! `iptables-restore --noflush` batch per table.
//!
//! The rules are written in the canonical form `iptables-save` prints them in, so comparing
//! desired with saved text is exact: a restart that finds everything in place changes nothing,
//! and one that finds duplicates or an earlier layout (AWS-SNAT-CHAIN-1.., the legacy
//! `--state NEW` jump) replaces them within the same transaction.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// `AWS_VPC_K8S_CNI_RANDOMIZESNAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Randomize {
    /// `prng` (default): `--random-fully`.
    Fully,
    /// `hashrandom`: `--random`.
    Hash,
    /// `none`.
    None,
}

/// Everything the rules depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnatSpec {
    pub vpc_cidrs: Vec<ipnet::Ipv4Net>,
    /// `AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS`.
    pub exclude_cidrs: Vec<String>,
    pub primary_ip: Ipv4Addr,
    /// Name of the primary ENI's link, e.g. eth0.
    pub primary_if: String,
    pub veth_prefix: String,
    pub mark: u32,
    pub external_snat: bool,
    pub node_port_support: bool,
    pub randomize: Randomize,
    /// Connections are marked in nf_tables (`table ip aws-cni`, see `nft`), not in the nat
    /// table's `AWS-CONNMARK-CHAIN-0`: upstream's choice on an nf_tables node.
    pub connmark_in_nft: bool,
}

/// Destinations whose connections are not marked: the VPC's CIDRs and the SNAT exclusions.
pub fn connmark_exempt(s: &SnatSpec) -> Vec<String> {
    let mut v: Vec<String> = s.vpc_cidrs.iter().map(|c| c.trunc().to_string()).collect();
    v.extend(cidrs(&s.exclude_cidrs));
    v
}

/// Comments that mark a rule in a built-in chain as ours.
const OUR_COMMENTS: [&str; 4] = [
    "\"AWS SNAT CHAIN\"",
    "\"AWS, outbound connections\"",
    "\"AWS, CONNMARK\"",
    "\"AWS, primary ENI\"",
];
const SNAT_CHAIN: &str = "AWS-SNAT-CHAIN-0";
const CONNMARK_CHAIN: &str = "AWS-CONNMARK-CHAIN-0";

fn is_our_chain(name: &str) -> bool {
    name.starts_with("AWS-SNAT-CHAIN-") || name.starts_with("AWS-CONNMARK-CHAIN-")
}

pub use crate::cidr::normalise as normalise_cidr;

/// The IPv4 CIDRs of `list` in iptables' spelling. IPv6 entries (upstream accepts them here)
/// are left out: the config check admits nothing else, and ipamd says so once at start.
fn cidrs(list: &[String]) -> Vec<String> {
    list.iter().filter_map(|c| normalise_cidr(c)).collect()
}

/// One table's desired state: our chains with their rules in order, and our rules in
/// built-in chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableRules {
    pub chains: BTreeMap<String, Vec<String>>,
    pub builtin: Vec<String>,
}

fn dst(cidr: &str) -> String {
    if cidr == "0.0.0.0/0" {
        String::new()
    } else {
        format!("-d {cidr} ")
    }
}

/// The nat and mangle rules for `s`.
pub fn desired(s: &SnatSpec) -> (TableRules, TableRules) {
    let mark = format!("{:#x}", s.mark);
    let mut nat = TableRules::default();
    let mut mangle = TableRules::default();
    let vpc: Vec<String> = s.vpc_cidrs.iter().map(|c| c.trunc().to_string()).collect();
    let excl = cidrs(&s.exclude_cidrs);
    if !s.external_snat {
        nat.builtin.push(format!(
            "-A POSTROUTING -m comment --comment \"AWS SNAT CHAIN\" -j {SNAT_CHAIN}"
        ));
        let mut chain: Vec<String> = vpc
            .iter()
            .map(|c| {
                format!(
                    "-A {SNAT_CHAIN} {}-m comment --comment \"AWS SNAT CHAIN\" -j RETURN",
                    dst(c)
                )
            })
            .collect();
        chain.extend(excl.iter().map(|c| {
            format!(
                "-A {SNAT_CHAIN} {}-m comment --comment \"AWS SNAT CHAIN EXCLUSION\" -j RETURN",
                dst(c)
            )
        }));
        let random = match s.randomize {
            Randomize::Fully => " --random-fully",
            Randomize::Hash => " --random",
            Randomize::None => "",
        };
        chain.push(format!(
            "-A {SNAT_CHAIN} ! -o vlan+ -m comment --comment \"AWS, SNAT\" -m addrtype ! --dst-type LOCAL -j SNAT --to-source {}{random}",
            s.primary_ip
        ));
        nat.chains.insert(SNAT_CHAIN.into(), chain);
    }
    // Pod connections to outside the VPC are marked, so their replies (which come back to the
    // primary address) are routed by the main table, not a secondary ENI's.
    if !s.external_snat && !s.connmark_in_nft {
        nat.builtin.push(format!(
            "-A PREROUTING -i {}+ -m comment --comment \"AWS, outbound connections\" -j {CONNMARK_CHAIN}",
            s.veth_prefix
        ));
        nat.builtin.push(format!(
            "-A PREROUTING -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --restore-mark --nfmask {mark} --ctmask {mark}"
        ));
        let mut cm: Vec<String> = connmark_exempt(s)
            .iter()
            .map(|c| {
                format!(
                    "-A {CONNMARK_CHAIN} {}-m comment --comment \"AWS CONNMARK CHAIN\" -j RETURN",
                    dst(c)
                )
            })
            .collect();
        cm.push(format!(
            "-A {CONNMARK_CHAIN} -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --set-xmark {mark}/{mark}"
        ));
        nat.chains.insert(CONNMARK_CHAIN.into(), cm);
    }
    if s.node_port_support {
        mangle.builtin.push(format!(
            "-A PREROUTING -i {} -m comment --comment \"AWS, primary ENI\" -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-xmark {mark}/{mark}",
            s.primary_if
        ));
    }
    if s.node_port_support || !s.external_snat {
        mangle.builtin.push(format!(
            "-A PREROUTING -i {}+ -m comment --comment \"AWS, primary ENI\" -j CONNMARK --restore-mark --nfmask {mark} --ctmask {mark}",
            s.veth_prefix
        ));
    }
    if s.node_port_support {
        mangle.builtin.push(format!(
            "-A PREROUTING -i vlan+ -m comment --comment \"AWS, primary ENI\" -j CONNMARK --restore-mark --nfmask {mark} --ctmask {mark}"
        ));
    }
    (nat, mangle)
}

/// What `iptables-save -t <table>` shows of ours.
fn ours_in_saved(saved: &str) -> TableRules {
    let mut t = TableRules::default();
    for line in saved.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or("");
            if is_our_chain(name) {
                t.chains.entry(name.to_string()).or_default();
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split_whitespace().next().unwrap_or("");
            if is_our_chain(chain) {
                t.chains
                    .entry(chain.to_string())
                    .or_default()
                    .push(line.to_string());
            } else if OUR_COMMENTS.iter().any(|c| line.contains(c))
                || line.contains("-j AWS-SNAT-CHAIN-")
                || line.contains("-j AWS-CONNMARK-CHAIN-")
            {
                t.builtin.push(line.to_string());
            }
        }
    }
    t
}

/// The `iptables-restore --noflush` input that turns `saved` into `want` for `table`, or None
/// when it already matches (so a restart touches nothing).
pub fn restore_script(table: &str, saved: &str, want: &TableRules) -> Option<String> {
    let have = ours_in_saved(saved);
    let mut have_builtin = have.builtin.clone();
    have_builtin.sort();
    let mut want_builtin = want.builtin.clone();
    want_builtin.sort();
    if have.chains == want.chains && have_builtin == want_builtin {
        return None;
    }
    let mut out = format!("*{table}\n");
    // Declaring a chain flushes it (or creates it): ours are rebuilt whole.
    for name in want.chains.keys().chain(have.chains.keys()) {
        let decl = format!(":{name} - [0:0]\n");
        if !out.contains(&decl) {
            out.push_str(&decl);
        }
    }
    for line in &have.builtin {
        if let Some(rule) = line.strip_prefix("-A ") {
            out.push_str(&format!("-D {rule}\n"));
        }
    }
    for line in &want.builtin {
        out.push_str(line);
        out.push('\n');
    }
    for rules in want.chains.values() {
        for line in rules {
            out.push_str(line);
            out.push('\n');
        }
    }
    for name in have.chains.keys().filter(|n| !want.chains.contains_key(*n)) {
        out.push_str(&format!("-X {name}\n"));
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// A failed iptables call: the command's own error, and the restore input it was given (the
/// rule that failed is in there).
#[derive(Debug, thiserror::Error)]
pub struct IptablesError {
    #[source]
    source: cni_common::command::CommandError,
    input: Option<String>,
}

impl std::fmt::Display for IptablesError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(i) = &self.input {
            write!(f, " (input:\n{i})")?;
        }
        Ok(())
    }
}

/// Which of the kernel's two iptables back-ends the node's rules live in. Rules written to the
/// other are rules nobody else sees (kube-proxy's, kubelet's), so ours must go where theirs are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
}

/// The rule of the iptables wrapper upstream's image uses: kubelet's marker chains (in `mangle`)
/// decide (nf_tables first); without them, the back-end holding more rules; nf_tables on a tie
/// (the distributions' default). `nft` and `legacy` are each back-end's whole save.
pub fn choose_backend(nft: &str, legacy: &str, nft_rules: usize, legacy_rules: usize) -> Backend {
    let marked = |s: &str| s.contains("KUBE-IPTABLES-HINT") || s.contains("KUBE-KUBELET-CANARY");
    if marked(nft) {
        Backend::Nft
    } else if marked(legacy) || legacy_rules > nft_rules {
        Backend::Legacy
    } else {
        Backend::Nft
    }
}

/// The iptables front-end in use.
#[derive(Debug, Clone)]
pub struct Iptables {
    pub save: String,
    pub restore: String,
    /// The front-end writes nf_tables (where upstream marks connections in nf_tables too).
    pub nft: bool,
}

impl Iptables {
    /// The front-end of the node's back-end (see `choose_backend`); the plain `iptables-save`
    /// and `iptables-restore` where the two front-ends are not both installed.
    pub fn detect() -> Iptables {
        // One save of each back-end: the marker chains are in its mangle section.
        let save = |p: &str| run(p, &[], None).ok();
        let (Some(nft), Some(legacy)) = (save("iptables-nft-save"), save("iptables-legacy-save"))
        else {
            // One front-end: its version line names its back-end.
            let version = run("iptables", &["-V"], None).unwrap_or_default();
            return Iptables {
                nft: version.contains("nf_tables"),
                ..Iptables::default()
            };
        };
        let rules = |s: &str| s.lines().filter(|l| l.starts_with("-A ")).count();
        let (prefix, backend) = match choose_backend(&nft, &legacy, rules(&nft), rules(&legacy)) {
            Backend::Nft => ("iptables-nft", "nf_tables"),
            Backend::Legacy => ("iptables-legacy", "legacy"),
        };
        tracing::info!(backend, "iptables back-end of the node's rules");
        Iptables {
            save: format!("{prefix}-save"),
            restore: format!("{prefix}-restore"),
            nft: backend == "nf_tables",
        }
    }
}

impl Default for Iptables {
    fn default() -> Self {
        Iptables {
            save: "iptables-save".into(),
            restore: "iptables-restore".into(),
            nft: false,
        }
    }
}

/// Run `program args`, feeding it `input`; its stdout, or an error naming the command.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, IptablesError> {
    cni_common::command::run(program, args, input).map_err(|source| IptablesError {
        source,
        input: input.map(str::to_string),
    })
}

/// Upstream's rule keeping pods off other pods' node-local egress addresses (egress-cni's
/// range: 169.254.172.0/22, or fd00::ac:00/118 for IPv6 egress): new connections forwarded
/// there are rejected. Its comment is upstream's, so a node switched from upstream keeps one.
pub fn node_local_block_rule(v6: bool) -> Vec<String> {
    let (cidr, family) = if v6 {
        ("fd00::ac:0/118", "v6")
    } else {
        ("169.254.172.0/22", "v4")
    };
    [
        "-d",
        cidr,
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-m",
        "comment",
        "--comment",
        &format!("Block Node Local Pod access via IP{family}"),
        "-j",
        "REJECT",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Iptables {
    /// The rule-at-a-time front-end of this back-end, for `v6` ip6tables.
    fn cli(&self, v6: bool) -> String {
        let base = self.save.trim_end_matches("-save");
        if v6 {
            base.replacen("iptables", "ip6tables", 1)
        } else {
            base.to_string()
        }
    }

    /// Insert `rule` first in `table`/`chain` unless it is there already; whether it was added.
    pub fn ensure_first(
        &self,
        v6: bool,
        table: &str,
        chain: &str,
        rule: &[String],
    ) -> Result<bool, IptablesError> {
        let cli = self.cli(v6);
        let mut check = vec!["-w", "-t", table, "-C", chain];
        check.extend(rule.iter().map(String::as_str));
        if run(&cli, &check, None).is_ok() {
            return Ok(false);
        }
        let mut insert = vec!["-w", "-t", table, "-I", chain, "1"];
        insert.extend(rule.iter().map(String::as_str));
        run(&cli, &insert, None)?;
        Ok(true)
    }

    /// Bring each table to its rules: one save of every table, then, when any differs, one
    /// restore of those that do (each table's section commits atomically). Whether each
    /// table changed, in order. One save instead of one per table: this runs at every
    /// reconcile.
    pub fn apply<const N: usize>(
        &self,
        tables: [(&str, &TableRules); N],
    ) -> Result<[bool; N], IptablesError> {
        let saved = run(&self.save, &[], None)?;
        let scripts =
            tables.map(|(table, want)| restore_script(table, section(&saved, table), want));
        let changed = scripts.each_ref().map(Option::is_some);
        let script: String = scripts.into_iter().flatten().collect();
        if !script.is_empty() {
            run(&self.restore, &["--noflush", "-w"], Some(&script))?;
        }
        Ok(changed)
    }
}

/// One table's part of an `iptables-save` of every table, from its `*table` line to its
/// `COMMIT`; empty when the kernel has no such table yet (the restore makes it).
fn section<'a>(saved: &'a str, table: &str) -> &'a str {
    let head = format!("*{table}\n");
    let start = if saved.starts_with(&head) {
        Some(0)
    } else {
        saved.find(&format!("\n{head}")).map(|i| i + 1)
    };
    let Some(start) = start else {
        return "";
    };
    let rest = &saved[start..];
    match rest.find("\nCOMMIT") {
        Some(end) => &rest[..end + "\nCOMMIT".len()],
        None => rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SnatSpec {
        SnatSpec {
            vpc_cidrs: vec!["10.0.0.0/16".parse().unwrap()],
            exclude_cidrs: vec!["172.16.5.9/16".into()],
            primary_ip: Ipv4Addr::new(10, 0, 1, 4),
            primary_if: "eth0".into(),
            veth_prefix: "eni".into(),
            mark: 0x80,
            external_snat: false,
            node_port_support: true,
            randomize: Randomize::Fully,
            connmark_in_nft: false,
        }
    }

    #[test]
    fn a_tables_section_of_a_save_of_every_table() {
        let saved = "# Generated by iptables-nft-save\n*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j MARK --set-mark 1\nCOMMIT\n# Completed\n*nat\n:POSTROUTING ACCEPT [0:0]\n:AWS-SNAT-CHAIN-0 - [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n";
        assert_eq!(
            section(saved, "nat"),
            "*nat\n:POSTROUTING ACCEPT [0:0]\n:AWS-SNAT-CHAIN-0 - [0:0]\nCOMMIT"
        );
        assert!(section(saved, "mangle").starts_with("*mangle\n:PREROUTING"));
        assert!(section(saved, "mangle").ends_with("--set-mark 1\nCOMMIT"));
        assert_eq!(section(saved, "raw"), "");
        assert_eq!(section("*nat\nCOMMIT\n", "nat"), "*nat\nCOMMIT");
        // A save whose mangle rules mention "*nat" in a comment is not cut there.
        let tricky = "*mangle\n-A PREROUTING -m comment --comment \"*nat\" -j ACCEPT\nCOMMIT\n";
        assert_eq!(section(tricky, "nat"), "");
    }

    #[test]
    fn nf_tables_connmark_leaves_only_snat_in_nat() {
        let mut s = spec();
        s.connmark_in_nft = true;
        let (nat, mangle) = desired(&s);
        assert!(!nat.chains.contains_key(CONNMARK_CHAIN));
        assert_eq!(nat.builtin.len(), 1, "{:?}", nat.builtin);
        assert!(nat.chains.contains_key(SNAT_CHAIN));
        assert_eq!(mangle, desired(&spec()).1);
        assert_eq!(connmark_exempt(&s), ["10.0.0.0/16", "172.16.0.0/16"]);
    }

    #[test]
    fn backend_follows_kubelets_marker_then_the_rule_count() {
        let hint = ":KUBE-IPTABLES-HINT - [0:0]";
        assert_eq!(choose_backend(hint, "", 0, 50), Backend::Nft);
        assert_eq!(choose_backend("", hint, 50, 0), Backend::Legacy);
        assert_eq!(choose_backend("", "", 3, 7), Backend::Legacy);
        assert_eq!(choose_backend("", "", 7, 3), Backend::Nft);
        assert_eq!(choose_backend("", "", 0, 0), Backend::Nft);
    }

    #[test]
    fn upstream_layout() {
        let (nat, mangle) = desired(&spec());
        assert_eq!(
            nat.chains[SNAT_CHAIN],
            vec![
                "-A AWS-SNAT-CHAIN-0 -d 10.0.0.0/16 -m comment --comment \"AWS SNAT CHAIN\" -j RETURN",
                "-A AWS-SNAT-CHAIN-0 -d 172.16.0.0/16 -m comment --comment \"AWS SNAT CHAIN EXCLUSION\" -j RETURN",
                "-A AWS-SNAT-CHAIN-0 ! -o vlan+ -m comment --comment \"AWS, SNAT\" -m addrtype ! --dst-type LOCAL -j SNAT --to-source 10.0.1.4 --random-fully",
            ]
        );
        assert_eq!(nat.chains[CONNMARK_CHAIN].len(), 3);
        assert_eq!(nat.builtin.len(), 3);
        assert_eq!(mangle.builtin.len(), 3);
        let none = SnatSpec {
            randomize: Randomize::None,
            ..spec()
        };
        assert!(desired(&none).0.chains[SNAT_CHAIN][2].ends_with("--to-source 10.0.1.4"));
        let ext = SnatSpec {
            external_snat: true,
            node_port_support: false,
            ..spec()
        };
        let (nat, mangle) = desired(&ext);
        assert!(nat.chains.is_empty() && nat.builtin.is_empty() && mangle.builtin.is_empty());
    }

    fn saved_of(t: &TableRules, extra: &str) -> String {
        let mut s = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
        for c in t.chains.keys() {
            s.push_str(&format!(":{c} - [0:0]\n"));
        }
        s.push_str(extra);
        for l in t.builtin.iter().chain(t.chains.values().flatten()) {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str("COMMIT\n");
        s
    }

    #[test]
    fn nothing_to_do_when_in_place() {
        let (nat, _) = desired(&spec());
        let saved = saved_of(&nat, "-A POSTROUTING -j KUBE-POSTROUTING\n");
        assert_eq!(restore_script("nat", &saved, &nat), None);
    }

    #[test]
    fn duplicates_and_old_layouts_are_replaced() {
        let (nat, _) = desired(&spec());
        let extra = ":AWS-SNAT-CHAIN-1 - [0:0]\n\
            -A POSTROUTING -m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0\n\
            -A AWS-SNAT-CHAIN-0 -m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-1\n\
            -A PREROUTING -i eni+ -m comment --comment \"AWS, outbound connections\" -m state --state NEW -j AWS-CONNMARK-CHAIN-0\n\
            -A POSTROUTING -j KUBE-POSTROUTING\n";
        let saved = saved_of(&nat, extra);
        let s = restore_script("nat", &saved, &nat).unwrap();
        assert!(s.contains(":AWS-SNAT-CHAIN-1 - [0:0]\n"));
        assert!(s.contains("-X AWS-SNAT-CHAIN-1\n"));
        assert!(s.contains("-D PREROUTING -i eni+ -m comment --comment \"AWS, outbound connections\" -m state --state NEW"));
        assert_eq!(s.matches("-D POSTROUTING -m comment").count(), 2);
        assert_eq!(s.matches("-A POSTROUTING").count(), 1);
        assert!(
            !s.contains("KUBE-POSTROUTING"),
            "other rules are not touched"
        );
    }

    #[test]
    fn external_snat_removes_everything() {
        let (nat, _) = desired(&spec());
        let saved = saved_of(&nat, "");
        let none = TableRules::default();
        let s = restore_script("nat", &saved, &none).unwrap();
        assert!(s.contains("-X AWS-SNAT-CHAIN-0\n") && s.contains("-X AWS-CONNMARK-CHAIN-0\n"));
        assert_eq!(s.matches("-D ").count(), 3);
    }

    #[test]
    fn cidrs_normalised() {
        assert_eq!(normalise_cidr("10.0.1.7/16").unwrap(), "10.0.0.0/16");
        assert_eq!(normalise_cidr("1.2.3.4").unwrap(), "1.2.3.4/32");
        assert_eq!(normalise_cidr("0.0.0.0/0").unwrap(), "0.0.0.0/0");
        assert_eq!(normalise_cidr("nope"), None);
    }
}
