//! Process limits ipamd sets for itself.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raise the soft open-file limit to the hard one. Returns (before, after).
pub fn raise_nofile() -> nix::Result<(u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard.max(soft)))
}
