//! Applying `crate::snat`'s scripts: one `iptables-save -t nat` to see what is there and at most
//! one `iptables-restore --noflush` to change it, atomically.
//!
//! The front-end is the one on the node's PATH (`iptables-*` for IPv4, `ip6tables-*` for
//! IPv6), as upstream's plugin uses the node's `iptables`.

use cni_common::command::{run, CommandError};

use crate::config::Family;
use crate::snat::{add_script, del_script, parse_saved, Saved, Snat, TABLE};

fn programs(family: Family) -> (&'static str, &'static str) {
    match family {
        Family::V4 => ("iptables-save", "iptables-restore"),
        Family::V6 => ("ip6tables-save", "ip6tables-restore"),
    }
}

/// The chain and the jumps to it, as they are now.
pub fn saved(family: Family, chain: &str) -> Result<Saved, CommandError> {
    let (save, _) = programs(family);
    Ok(parse_saved(&run(save, &["-t", TABLE], None)?, chain))
}

fn restore(family: Family, script: &str) -> Result<(), CommandError> {
    let (_, restore) = programs(family);
    // -w: the legacy back-end's lock is held by whoever else changes rules at that moment.
    run(restore, &["--noflush", "-w"], Some(script)).map(|_| ())
}

/// Save, compute, restore; once more from a fresh save if the restore failed, since the
/// only expected failure is a rule of this container deleted by someone else in between.
fn converge(
    family: Family,
    chain: &str,
    script: impl Fn(&Saved) -> Option<String>,
) -> Result<bool, CommandError> {
    let mut last = None;
    for _ in 0..2 {
        let Some(s) = script(&saved(family, chain)?) else {
            return Ok(last.is_some());
        };
        match restore(family, &s) {
            Ok(()) => return Ok(true),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| CommandError::Failed {
        cmd: "iptables-restore".into(),
        status: "unknown".into(),
        stderr: String::new(),
    }))
}

/// Put the pod's chain and jump in place; whether anything changed.
pub fn ensure(snat: &Snat) -> Result<bool, CommandError> {
    converge(snat.family, &snat.chain, |s| add_script(s, snat))
}

/// Remove the chain and every jump to it; whether anything was there.
pub fn remove(family: Family, chain: &str) -> Result<bool, CommandError> {
    converge(family, chain, |s| del_script(s, chain))
}
