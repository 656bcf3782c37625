//! Network namespace facts a plugin checks before it touches one.

use std::fs::File;
use std::os::unix::fs::MetadataExt;

/// Whether `ns` (an open namespace file, e.g. `/var/run/netns/x` or `/proc/<pid>/ns/net`) is
/// the network namespace this process runs in. A plugin asked to wire a pod into its own
/// namespace would rewire the host: its default route, its interfaces.
pub fn is_own_netns(ns: &File) -> std::io::Result<bool> {
    let own = std::fs::metadata("/proc/self/ns/net")?;
    let target = ns.metadata()?;
    Ok(own.dev() == target.dev() && own.ino() == target.ino())
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    #[test]
    fn own_namespace_is_recognised() {
        let own = File::open("/proc/self/ns/net").unwrap();
        assert!(super::is_own_netns(&own).unwrap());
        let not_ns = File::open("/proc/self/status").unwrap();
        assert!(!super::is_own_netns(&not_ns).unwrap());
    }
}
