//! Upstream's nf_tables connmark back-end. On a node whose iptables is nf_tables, upstream marks
//! pods' connections to outside the VPC in a table of its own, `table ip aws-cni`, instead of
//! the iptables nat chain (`AWS-CONNMARK-CHAIN-0`) it uses on legacy nodes; so does ours, with
//! upstream's table, chain names, hook and priority, so a node switched from upstream (or
//! back) finds the layout it expects, and the two never both mark.
//!
//! The table is written whole in one `nft -f` transaction. A reconcile rewrites it only when
//! what the kernel lists differs from what the last write left (counters aside).

/// Upstream's names.
pub const TABLE: &str = "aws-cni";
pub const BASE_CHAIN: &str = "nat-prerouting";
pub const MARK_CHAIN: &str = "snat-mark";

/// What the table holds: pods (`<veth_prefix>*`) get `mark` on their connections' conntrack
/// entry unless the destination is one of `exempt` (the VPC's CIDRs and the SNAT
/// exclusions); every packet of a marked connection carries the mark, so the replies'
/// policy rule (fwmark at 1024) routes them by the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connmark {
    pub veth_prefix: String,
    pub mark: u32,
    pub exempt: Vec<String>,
}

/// The `nft -f` input that replaces the table with `c` atomically (declaring it first makes
/// the delete valid when it does not exist yet).
pub fn script(c: &Connmark) -> String {
    format!(
        "table ip {TABLE} {{}}\ndelete table ip {TABLE}\n{}",
        body(c)
    )
}

/// The `nft -f` input that makes the table from nothing: `create` refuses (and the whole
/// transaction with it) when the table exists, so it never adds to one.
pub fn create_script(c: &Connmark) -> String {
    format!("create table ip {TABLE}\n{}", body(c))
}

fn body(c: &Connmark) -> String {
    let mark = format!("{:#x}", c.mark);
    let mut returns = String::new();
    for cidr in &c.exempt {
        returns.push_str(&format!("    ip daddr {cidr} counter return\n"));
    }
    format!(
        "table ip {TABLE} {{\n\
         \x20 chain {BASE_CHAIN} {{\n\
         \x20   type nat hook prerouting priority -90; policy accept;\n\
         \x20   fib daddr type local return\n\
         \x20   iifname \"{prefix}*\" counter jump {MARK_CHAIN}\n\
         \x20   counter meta mark set ct mark & {mark}\n\
         \x20 }}\n\
         \x20 chain {MARK_CHAIN} {{\n\
         {returns}\
         \x20   counter ct mark set ct mark | {mark}\n\
         \x20 }}\n\
         }}\n",
        prefix = c.veth_prefix,
    )
}

/// `nft list table` output without what changes by itself (counters, handles), for comparing
/// two listings of the same table.
pub fn normalize(listing: &str) -> String {
    listing
        .lines()
        .map(|l| {
            let mut words: Vec<&str> = l.split_whitespace().collect();
            if let Some(i) = words.iter().position(|w| *w == "packets") {
                // "counter packets N bytes M"
                if words.len() >= i + 4 && words[i + 2] == "bytes" {
                    words.drain(i..i + 4);
                }
            }
            if let Some(i) = words.iter().position(|w| *w == "#") {
                words.truncate(i);
            }
            words.join(" ")
        })
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

pub use cni_common::command::CommandError as NftError;

fn nft(args: &[&str], input: Option<&str>) -> Result<String, NftError> {
    cni_common::command::run("nft", args, input)
}

/// Whether `nft list tables ip` output names the table.
fn has_table(tables: &str) -> bool {
    let want = format!("table ip {TABLE}");
    tables.lines().any(|l| l.trim() == want)
}

/// The table as the kernel lists it, normalized. An absent table is an error too: a caller
/// comparing it with what it wrote writes it again either way.
pub fn listed() -> Result<String, NftError> {
    nft(&["list", "table", "ip", TABLE], None).map(|l| normalize(&l))
}

/// Write `c` (replacing the table whole); the normalized listing it left.
pub fn apply(c: &Connmark) -> Result<String, NftError> {
    nft(&["-f", "-"], Some(&script(c)))?;
    listed()
}

/// As [`apply`], for the first write of a start, without the listing: on a fresh node the
/// table is made from nothing, because the replace's delete makes the kernel wait out a grace
/// period (about 10 ms of ipamd's start); a table left from before is replaced as by
/// [`apply`].
pub fn apply_first(c: &Connmark) -> Result<(), NftError> {
    if nft(&["-f", "-"], Some(&create_script(c))).is_err() {
        nft(&["-f", "-"], Some(&script(c)))?;
    }
    Ok(())
}

/// Remove the table (a node moved to external SNAT, or to the legacy back-end); whether there
/// was one. Absence is read from the list of tables: an `nft` that fails is an error.
pub fn remove() -> Result<bool, NftError> {
    if !has_table(&nft(&["list", "tables", "ip"], None)?) {
        return Ok(false);
    }
    nft(&["delete", "table", "ip", TABLE], None)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_is_upstreams_layout() {
        let s = script(&Connmark {
            veth_prefix: "eni".into(),
            mark: 0x80,
            exempt: vec!["10.0.0.0/16".into(), "172.16.0.0/12".into()],
        });
        assert!(s.starts_with("table ip aws-cni {}\ndelete table ip aws-cni\n"));
        assert!(s.contains(
            "chain nat-prerouting {\n    type nat hook prerouting priority -90; policy accept;"
        ));
        assert!(s.contains("fib daddr type local return\n    iifname \"eni*\" counter jump snat-mark\n    counter meta mark set ct mark & 0x80"));
        assert!(s.contains("ip daddr 10.0.0.0/16 counter return\n    ip daddr 172.16.0.0/12 counter return\n    counter ct mark set ct mark | 0x80"));
        let created = create_script(&Connmark {
            veth_prefix: "eni".into(),
            mark: 0x80,
            exempt: vec!["10.0.0.0/16".into(), "172.16.0.0/12".into()],
        });
        assert_eq!(
            created.strip_prefix("create table ip aws-cni\n"),
            s.strip_prefix("table ip aws-cni {}\ndelete table ip aws-cni\n"),
            "the same table either way"
        );
    }

    #[test]
    fn the_table_is_found_in_the_list_of_tables_only_by_its_name() {
        assert!(has_table("table ip filter\ntable ip aws-cni\n"));
        assert!(!has_table("table ip filter\ntable ip aws-cni-other\n"));
        assert!(!has_table(""));
    }

    #[test]
    fn listings_compare_without_counters_and_handles() {
        let a = "table ip aws-cni {\n\tchain snat-mark {\n\t\tip daddr 10.0.0.0/16 counter packets 3 bytes 180 return # handle 4\n\t}\n}\n";
        let b = "table ip aws-cni {\n\tchain snat-mark {\n\t\tip daddr 10.0.0.0/16 counter packets 0 bytes 0 return\n\t}\n}\n";
        assert_eq!(normalize(a), normalize(b));
        assert_ne!(
            normalize(a),
            normalize(&b.replace("10.0.0.0/16", "10.1.0.0/16"))
        );
    }
}
