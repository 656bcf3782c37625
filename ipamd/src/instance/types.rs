//! Per-instance-type network limits, embedded at build time.
//!
//! ipamd needs to know how many ENIs and addresses per ENI an instance can
//! hold before it has talked to EC2 (and `max-pods` must work offline), so the
//! table is generated from a pinned DescribeInstanceTypes snapshot by
//! `scripts/gen-instance-types.py` and compiled into the binary.

use std::collections::BTreeMap;
use std::sync::LazyLock;

/// The generated table; see `scripts/gen-instance-types.py` for the columns.
const DATA: &str = include_str!("../../data/instance-types.tsv");

/// Header the parser expects; a mismatch means the generator and this parser
/// disagree about column order, which the unit tests catch.
const HEADER: &str = "type\tmax_enis\tipv4_per_eni\thypervisor\tbare_metal\tvcpus";

/// Virtualisation platform; prefix delegation is only possible on Nitro.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hypervisor {
    Nitro,
    Xen,
    /// EC2 reports no hypervisor for bare-metal types.
    Unspecified,
}

/// The limits that decide how many pod addresses a node can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceLimits {
    /// Maximum ENIs on the default network card (pods only use that card).
    pub enis: u32,
    /// IPv4 addresses per ENI, including the ENI's primary address.
    pub ipv4_per_eni: u32,
    pub hypervisor: Hypervisor,
    pub bare_metal: bool,
    /// Default vCPU count, used for kubelet's recommended max-pods cap.
    pub vcpus: u32,
}

impl InstanceLimits {
    /// Whether the type supports prefix delegation (Nitro-based, which
    /// includes every bare-metal type).
    pub fn is_nitro(&self) -> bool {
        self.hypervisor == Hypervisor::Nitro || self.bare_metal
    }
}

/// Why a line of the embedded table could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum LineError {
    #[error("expected 6 tab-separated fields, got {0}")]
    FieldCount(usize),
    #[error("bad number in column {column}: {value:?}")]
    Number { column: &'static str, value: String },
    #[error("unknown hypervisor {0:?}")]
    Hypervisor(String),
    #[error("bad bare_metal flag {0:?}")]
    BareMetal(String),
}

fn number(column: &'static str, value: &str) -> Result<u32, LineError> {
    value.parse().map_err(|_| LineError::Number {
        column,
        value: value.to_owned(),
    })
}

fn parse_line(line: &'static str) -> Result<(&'static str, InstanceLimits), LineError> {
    let fields: Vec<&'static str> = line.split('\t').collect();
    let [name, enis, ips, hypervisor, bare_metal, vcpus] = fields[..] else {
        return Err(LineError::FieldCount(fields.len()));
    };
    let hypervisor = match hypervisor {
        "nitro" => Hypervisor::Nitro,
        "xen" => Hypervisor::Xen,
        "" => Hypervisor::Unspecified,
        other => return Err(LineError::Hypervisor(other.to_owned())),
    };
    let bare_metal = match bare_metal {
        "true" => true,
        "false" => false,
        other => return Err(LineError::BareMetal(other.to_owned())),
    };
    let limits = InstanceLimits {
        enis: number("max_enis", enis)?,
        ipv4_per_eni: number("ipv4_per_eni", ips)?,
        hypervisor,
        bare_metal,
        vcpus: number("vcpus", vcpus)?,
    };
    Ok((name, limits))
}

/// Data lines of the table: everything but comments, blanks and the header.
fn data_lines(text: &'static str) -> impl Iterator<Item = (usize, &'static str)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#') && *l != HEADER)
}

/// Parses every data line, returning the good entries and the bad lines.
/// Bad lines are skipped rather than fatal: the unit tests guarantee there
/// are none in the shipped table, so at run time one bad line must not take
/// the whole daemon down.
fn parse(
    text: &'static str,
) -> (
    BTreeMap<&'static str, InstanceLimits>,
    Vec<(usize, LineError)>,
) {
    let mut map = BTreeMap::new();
    let mut errors = Vec::new();
    for (idx, line) in data_lines(text) {
        match parse_line(line) {
            Ok((name, limits)) => {
                map.insert(name, limits);
            }
            Err(e) => errors.push((idx + 1, e)),
        }
    }
    (map, errors)
}

static TABLE: LazyLock<BTreeMap<&'static str, InstanceLimits>> = LazyLock::new(|| {
    let (map, errors) = parse(DATA);
    for (line, err) in errors {
        tracing::warn!(line, %err, "skipping malformed line in embedded instance-types table");
    }
    map
});

/// Limits for an EC2 instance type such as `m5.large`, if known.
pub fn lookup(instance_type: &str) -> Option<&'static InstanceLimits> {
    TABLE.get(instance_type)
}

/// Every known instance type, sorted by name.
pub fn all() -> impl Iterator<Item = (&'static str, &'static InstanceLimits)> {
    TABLE.iter().map(|(name, limits)| (*name, limits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_table_is_well_formed() {
        assert!(
            DATA.lines().any(|l| l == HEADER),
            "header line missing or columns changed"
        );
        let (map, errors) = parse(DATA);
        assert!(errors.is_empty(), "malformed lines: {errors:?}");
        let lines = data_lines(DATA).count();
        assert_eq!(map.len(), lines, "duplicate instance types in the table");
        assert!(lines > 500, "suspiciously small table: {lines}");
    }

    #[test]
    fn embedded_values_are_sane() {
        for (name, l) in all() {
            assert!(l.enis >= 1, "{name}: no ENIs");
            assert!(l.ipv4_per_eni >= 1, "{name}: no IPv4 addresses");
            assert!(l.vcpus >= 1, "{name}: no vCPUs");
        }
    }

    #[test]
    fn known_types() {
        let m5 = lookup("m5.large").unwrap();
        assert_eq!(
            *m5,
            InstanceLimits {
                enis: 3,
                ipv4_per_eni: 10,
                hypervisor: Hypervisor::Nitro,
                bare_metal: false,
                vcpus: 2,
            }
        );
        let metal = lookup("m5.metal").unwrap();
        assert!(metal.bare_metal && metal.is_nitro());
        assert_eq!(metal.hypervisor, Hypervisor::Unspecified);
        let t2 = lookup("t2.micro").unwrap();
        assert_eq!(t2.hypervisor, Hypervisor::Xen);
        assert!(!t2.is_nitro());
        assert!(lookup("nope.large").is_none());
    }

    #[test]
    fn multi_card_types_use_default_card() {
        // 16 ENIs in total, but only 8 on the default card.
        assert_eq!(lookup("c6in.32xlarge").unwrap().enis, 8);
    }

    #[test]
    fn all_is_sorted() {
        let names: Vec<_> = all().map(|(n, _)| n).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn bad_lines_are_reported_and_skipped() {
        let text = "# comment\ntype\tmax_enis\tipv4_per_eni\thypervisor\tbare_metal\tvcpus\n\
                    a.one\t2\t4\tnitro\tfalse\t2\n\
                    a.two\t2\t4\tnitro\n\
                    a.three\tx\t4\tnitro\tfalse\t2\n\
                    a.four\t2\t4\tkvm\tfalse\t2\n\
                    a.five\t2\t4\t\tyes\t2\n";
        let (map, errors) = parse(text);
        assert_eq!(map.keys().copied().collect::<Vec<_>>(), ["a.one"]);
        let errors: Vec<_> = errors.into_iter().map(|(_, e)| e).collect();
        assert_eq!(
            errors,
            [
                LineError::FieldCount(4),
                LineError::Number {
                    column: "max_enis",
                    value: "x".into()
                },
                LineError::Hypervisor("kvm".into()),
                LineError::BareMetal("yes".into()),
            ]
        );
    }
}
