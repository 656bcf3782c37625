//! When may an address leave a pod? Only on positive evidence that the pod is gone.
//!
//! Evidence comes from three places: the plugin's DEL (handled by the gRPC server), the
//! release records a DEL leaves when ipamd was unreachable (applied here before ipamd serves
//! and on every sweep), and a look at the host that *succeeded* and found neither a host route
//! to the address nor the pod's host veth (by the name the plugin recorded, and by the name
//! the configured prefix gives). An error while looking is never evidence of absence: a host
//! view that cannot be read, or a record that cannot be read, keeps the allocation.
//!
//! Pure over a [`HostView`] and a record reader, so every rule is a unit test.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use cni_common::state::{read_attachment, released_dir, ReleaseRecord};

use crate::pool::checkpoint;
use crate::pool::datastore::{Allocation, Datastore, Key};

/// What the node's network namespace showed in one successful look.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostView {
    /// Every link name.
    pub links: HashSet<String>,
    /// Destinations of the /32 and /128 routes in the main table that point at a link (pods'
    /// host routes, as the plugin installs them), with that link's name.
    pub host_routes: HashMap<IpAddr, String>,
}

/// Why an allocation is kept or may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Still in use, or not known to be gone: with the reason, for logs.
    Keep(String),
    /// The host was read and shows nothing of the pod.
    Gone,
}

/// The plugin's record of which host veth an attachment got. `Err` means "could not read".
pub type RecordedVeth<'a> = dyn Fn(&Key) -> std::io::Result<Option<String>> + 'a;

/// Decide for one allocation.
pub fn verdict(
    a: &Allocation,
    host: &HostView,
    veth_prefix: &str,
    recorded_veth: &RecordedVeth,
) -> Verdict {
    if host.host_routes.contains_key(&a.ip) {
        return Verdict::Keep(format!("host route to {} exists", a.ip));
    }
    let recorded = match recorded_veth(&a.key) {
        Ok(v) => v,
        Err(e) => return Verdict::Keep(format!("plugin state unreadable: {e}")),
    };
    if let Some(v) = recorded.filter(|v| host.links.contains(v)) {
        return Verdict::Keep(format!("host veth {v} (recorded by the plugin) exists"));
    }
    if !a.pod.name.is_empty() {
        let v = cni_common::naming::host_veth_name(veth_prefix, &a.pod.namespace, &a.pod.name);
        if host.links.contains(&v) {
            return Verdict::Keep(format!("host veth {v} exists"));
        }
    }
    Verdict::Gone
}

/// Allocations older than `grace` whose pods the host shows no trace of. Younger ones are left
/// alone: the plugin may still be wiring them.
pub fn orphaned(
    ds: &Datastore,
    host: &HostView,
    veth_prefix: &str,
    now: SystemTime,
    grace: Duration,
    recorded_veth: &RecordedVeth,
) -> Vec<Key> {
    let c = candidates(ds, host, veth_prefix, now, grace);
    confirm(c, host, recorded_veth)
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// First half of [`orphaned`], for under the datastore lock: no I/O, only the host view. The
/// allocations older than `grace` with neither a host route nor a veth under the prefix.
pub fn candidates(
    ds: &Datastore,
    host: &HostView,
    veth_prefix: &str,
    now: SystemTime,
    grace: Duration,
) -> Vec<(Key, IpAddr)> {
    let no_record = |_: &Key| Ok(None);
    ds.allocations()
        .filter(|a| now.duration_since(a.allocated_at).unwrap_or_default() >= grace)
        .filter(|a| verdict(a, host, veth_prefix, &no_record) == Verdict::Gone)
        .map(|a| (a.key.clone(), a.ip))
        .collect()
}

/// Second half, without the lock: keep out every candidate whose plugin record names a veth
/// that exists, or whose record cannot be read.
pub fn confirm(
    candidates: Vec<(Key, IpAddr)>,
    host: &HostView,
    recorded_veth: &RecordedVeth,
) -> Vec<(Key, IpAddr)> {
    candidates
        .into_iter()
        .filter(|(k, _)| match recorded_veth(k) {
            Ok(Some(v)) => !host.links.contains(&v),
            Ok(None) => true,
            Err(_) => false,
        })
        .collect()
}

/// Read the plugin's attachment record under `root` for an allocation's key.
pub fn state_reader(root: &Path) -> impl Fn(&Key) -> std::io::Result<Option<String>> + '_ {
    move |k: &Key| {
        Ok(
            read_attachment(root, &k.network_name, &k.container_id, &k.ifname)?
                .map(|s| s.host_veth),
        )
    }
}

/// A release record found on disk.
#[derive(Debug)]
pub struct Pending {
    pub path: PathBuf,
    pub record: ReleaseRecord,
}

/// Every release record under `root`. Unparsable files are reported, not removed: they are
/// evidence someone may want to read.
pub fn pending_releases(root: &Path) -> (Vec<Pending>, Vec<String>) {
    let dir = released_dir(root);
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (out, problems),
        Err(e) => {
            problems.push(format!("read {}: {e}", dir.display()));
            return (out, problems);
        }
    };
    for e in rd.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|d| serde_json::from_slice::<ReleaseRecord>(&d).map_err(|e| e.to_string()))
        {
            Ok(record) => out.push(Pending { path, record }),
            Err(e) => problems.push(format!("release record {}: {e}", path.display())),
        }
    }
    out.sort_by_key(|p| p.record.recorded_at);
    (out, problems)
}

/// Apply release records to the datastore: each named allocation goes into cooldown from the
/// moment the plugin recorded it. Returns what was released; records for keys ipamd does not
/// hold (already released, or never allocated) are simply done.
pub fn apply_releases(ds: &mut Datastore, pending: &[Pending], now: SystemTime) -> Vec<Allocation> {
    let mut released = Vec::new();
    for p in pending {
        let key = Key {
            network_name: p.record.network_name.clone(),
            container_id: p.record.container_id.clone(),
            ifname: p.record.if_name.clone(),
        };
        let at = checkpoint::from_nanos(p.record.recorded_at).min(now);
        if let Some(a) = ds.release(&key, at) {
            released.push(a);
        }
    }
    released
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::datastore::PodMeta;

    fn ds() -> Datastore {
        crate::pool::datastore::one_eni_store(20)
    }

    fn key(c: &str) -> Key {
        Key {
            network_name: "aws-cni".into(),
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    fn pod(n: &str) -> PodMeta {
        PodMeta {
            namespace: "default".into(),
            name: n.into(),
            uid: String::new(),
        }
    }

    fn none(_: &Key) -> std::io::Result<Option<String>> {
        Ok(None)
    }

    #[test]
    fn gone_only_when_the_host_shows_nothing() {
        let mut d = ds();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let a = d.assign(key("a"), pod("web"), t0).unwrap();
        let mut host = HostView::default();
        let now = t0 + Duration::from_secs(120);
        let grace = Duration::from_secs(60);
        assert_eq!(
            orphaned(&d, &host, "eni", now, grace, &none),
            vec![key("a")]
        );
        // Too young: the plugin may still be wiring it.
        assert!(orphaned(&d, &host, "eni", t0 + Duration::from_secs(5), grace, &none).is_empty());
        // A host route to the address keeps it, whatever the veth is called.
        host.host_routes.insert(a.ip, "eniX".into());
        assert!(orphaned(&d, &host, "xyz", now, grace, &none).is_empty());
        host.host_routes.clear();
        // The veth under the configured prefix keeps it.
        host.links
            .insert(cni_common::naming::host_veth_name("eni", "default", "web"));
        assert!(orphaned(&d, &host, "eni", now, grace, &none).is_empty());
        // The prefix changed since: the plugin's record still names the real veth.
        let recorded = |_: &Key| -> std::io::Result<Option<String>> {
            Ok(Some(cni_common::naming::host_veth_name(
                "eni", "default", "web",
            )))
        };
        assert!(orphaned(&d, &host, "abc", now, grace, &recorded).is_empty());
        assert_eq!(
            orphaned(&d, &host, "abc", now, grace, &none),
            vec![key("a")],
            "without the record and the route, a renamed prefix finds nothing"
        );
    }

    #[test]
    fn an_error_while_looking_keeps_the_address() {
        let mut d = ds();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        d.assign(key("a"), pod("web"), t0).unwrap();
        let broken = |_: &Key| -> std::io::Result<Option<String>> {
            Err(std::io::Error::from_raw_os_error(libc::EMFILE))
        };
        let v = verdict(
            d.allocations().next().unwrap(),
            &HostView::default(),
            "eni",
            &broken,
        );
        assert!(
            matches!(v, Verdict::Keep(ref why) if why.contains("unreadable")),
            "{v:?}"
        );
    }

    #[test]
    fn release_records_apply_once_and_cool_from_their_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = ds();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let a = d.assign(key("a"), pod("web"), t0).unwrap();
        let rec = ReleaseRecord {
            network_name: "aws-cni".into(),
            container_id: "a".into(),
            if_name: "eth0".into(),
            ip: Some(a.ip),
            recorded_at: checkpoint::to_nanos(t0 + Duration::from_secs(10)),
        };
        let p = released_dir(dir.path()).join(rec.file_name());
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, serde_json::to_vec(&rec).unwrap()).unwrap();
        std::fs::write(p.with_file_name("junk.json"), b"{").unwrap();
        let (pending, problems) = pending_releases(dir.path());
        assert_eq!(pending.len(), 1);
        assert_eq!(problems.len(), 1, "{problems:?}");
        let now = t0 + Duration::from_secs(20);
        let released = apply_releases(&mut d, &pending, now);
        assert_eq!(released.len(), 1);
        assert_eq!(d.allocations().count(), 0);
        let cooling: Vec<_> = d.cooldowns().collect();
        assert_eq!(cooling, vec![(a.ip, t0 + Duration::from_secs(10))]);
        // Applying again finds nothing to release.
        assert!(apply_releases(&mut d, &pending, now).is_empty());
    }
}
