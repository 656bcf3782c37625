//! The allocation checkpoint: upstream's `vpc-cni-ipam/1` JSON file, written durably, with
//! concurrent changes grouped into one write.
//!
//! A reply to AddNetwork/DelNetwork goes out only once the file holding that change is on
//! disk (temp file, fsync, rename, fsync of the directory). Requests that arrive while a write
//! is in flight share the next one, so a burst costs a few fsyncs rather than one per pod.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cni_common::fsio::{self, WriteOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};

use crate::pool::datastore::{Datastore, Key, PodMeta};

pub const FORMAT_VERSION: &str = "vpc-cni-ipam/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: String,
    pub allocations: Vec<Entry>,
    /// Ours: addresses cooling down, so a restart does not hand them out early. Upstream
    /// ignores unknown fields.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cooldowns: Vec<CooldownEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(rename = "networkName")]
    pub network_name: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(rename = "ifName")]
    pub if_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ipv4: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ipv6: String,
    /// Unix nanoseconds, as upstream.
    #[serde(rename = "allocationTimestamp", default)]
    pub allocation_timestamp: i64,
    #[serde(default)]
    pub metadata: Metadata,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    #[serde(
        rename = "k8sPodNamespace",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub k8s_pod_namespace: String,
    #[serde(
        rename = "k8sPodName",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub k8s_pod_name: String,
    #[serde(rename = "interfacesCount", default, skip_serializing_if = "is_zero")]
    pub interfaces_count: u32,
    /// Ours.
    #[serde(
        rename = "k8sPodUID",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub k8s_pod_uid: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CooldownEntry {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ipv4: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ipv6: String,
    /// Unix nanoseconds when the address was released.
    #[serde(rename = "releasedAt")]
    pub released_at: i64,
}

pub fn to_nanos(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

pub fn from_nanos(n: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(n.max(0) as u64)
}

/// Snapshot of the datastore in checkpoint form, sorted so files diff cleanly.
pub fn snapshot(ds: &Datastore) -> Checkpoint {
    let mut allocations: Vec<Entry> = ds
        .allocations()
        .map(|a| Entry {
            network_name: a.key.network_name.clone(),
            container_id: a.key.container_id.clone(),
            if_name: a.key.ifname.clone(),
            ipv4: family_text(a.ip, true),
            ipv6: family_text(a.ip, false),
            allocation_timestamp: to_nanos(a.allocated_at),
            metadata: Metadata {
                k8s_pod_namespace: a.pod.namespace.clone(),
                k8s_pod_name: a.pod.name.clone(),
                interfaces_count: 1,
                k8s_pod_uid: a.pod.uid.clone(),
            },
        })
        .collect();
    allocations.sort_by(|a, b| (&a.ipv4, &a.ipv6).cmp(&(&b.ipv4, &b.ipv6)));
    let mut cooldowns: Vec<CooldownEntry> = ds
        .cooldowns()
        .map(|(ip, t)| CooldownEntry {
            ipv4: family_text(ip, true),
            ipv6: family_text(ip, false),
            released_at: to_nanos(t),
        })
        .collect();
    cooldowns.sort_by(|a, b| (&a.ipv4, &a.ipv6).cmp(&(&b.ipv4, &b.ipv6)));
    Checkpoint {
        version: FORMAT_VERSION.into(),
        allocations,
        cooldowns,
    }
}

/// `ip` as an entry's (ipv4, ipv6) fields: text in its family's, empty in the other.
pub fn address_fields(ip: IpAddr) -> (String, String) {
    (family_text(ip, true), family_text(ip, false))
}

fn family_text(ip: IpAddr, v4: bool) -> String {
    if ip.is_ipv4() == v4 {
        ip.to_string()
    } else {
        String::new()
    }
}

/// The one address of an entry or cooldown: `ipv4` or `ipv6`, never both (no AWS VPC CNI
/// gives a pod one of each yet; a file that does is not one we wrote).
fn one_address(ipv4: &str, ipv6: &str) -> Option<IpAddr> {
    match (ipv4.is_empty(), ipv6.is_empty()) {
        (false, true) => ipv4.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
        (true, false) => ipv6.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
        _ => None,
    }
}

impl CooldownEntry {
    pub fn address(&self) -> Option<IpAddr> {
        one_address(&self.ipv4, &self.ipv6)
    }
}

/// What reading the checkpoint found: every allocation and cooldown, all valid.
#[derive(Debug, Default)]
pub struct Loaded {
    pub entries: Vec<Entry>,
    pub cooldowns: Vec<CooldownEntry>,
}

/// Why a checkpoint cannot be used. Either way ipamd must not start: every address in the
/// file may belong to a running pod, and starting without them would hand them out again.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read checkpoint {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {} is not a usable {FORMAT_VERSION} file: {source}", path.display())]
    Invalid { path: PathBuf, source: Corrupt },
}

/// What is wrong with a checkpoint's content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corrupt {
    #[error("the file is empty")]
    Empty,
    #[error("{0}")]
    Json(String),
    #[error("version {0:?}, expected {FORMAT_VERSION:?}")]
    Version(String),
    #[error(
        "allocation {index} ({container:?}) has no valid address (one of ipv4, ipv6): {value:?}"
    )]
    Address {
        index: usize,
        container: String,
        value: String,
    },
    #[error("allocation {index} ({ip}) has no containerID or ifName")]
    Key { index: usize, ip: IpAddr },
    #[error("address {0} is allocated twice")]
    AddressTwice(IpAddr),
    #[error("attachment {container}/{ifname} holds two addresses")]
    AttachmentTwice { container: String, ifname: String },
    #[error("cooldown entry has no valid address (one of ipv4, ipv6): {0:?}")]
    Cooldown(String),
}

/// Read the checkpoint. A missing file is a fresh node. Anything else that is not a whole,
/// valid checkpoint is an error: no salvage, no guessing, and the file is left as it is.
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(source) => {
            return Err(LoadError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    parse(&data).map_err(|source| LoadError::Invalid {
        path: path.to_path_buf(),
        source,
    })
}

/// Strict parse of a checkpoint's bytes (exposed for the fuzz test).
pub fn parse(data: &[u8]) -> Result<Loaded, Corrupt> {
    if data.iter().all(u8::is_ascii_whitespace) {
        return Err(Corrupt::Empty);
    }
    let f: Checkpoint = serde_json::from_slice(data).map_err(|e| Corrupt::Json(e.to_string()))?;
    if f.version != FORMAT_VERSION {
        return Err(Corrupt::Version(f.version));
    }
    let mut ips = std::collections::HashSet::new();
    let mut keys = std::collections::HashSet::new();
    for (index, e) in f.allocations.iter().enumerate() {
        let Some((key, ip, _, _)) = entry_key(e) else {
            return Err(Corrupt::Address {
                index,
                container: e.container_id.clone(),
                value: format!("{}{}", e.ipv4, e.ipv6),
            });
        };
        if key.container_id.is_empty() || key.ifname.is_empty() {
            return Err(Corrupt::Key { index, ip });
        }
        if !ips.insert(ip) {
            return Err(Corrupt::AddressTwice(ip));
        }
        if !keys.insert(key.clone()) {
            return Err(Corrupt::AttachmentTwice {
                container: key.container_id,
                ifname: key.ifname,
            });
        }
    }
    if let Some(c) = f.cooldowns.iter().find(|c| c.address().is_none()) {
        return Err(Corrupt::Cooldown(format!("{}{}", c.ipv4, c.ipv6)));
    }
    Ok(Loaded {
        entries: f.allocations,
        cooldowns: f.cooldowns,
    })
}

/// Write `f` to `path` durably and privately (see `cni_common::fsio`).
pub fn write_atomic(path: &Path, f: &Checkpoint) -> std::io::Result<()> {
    fsio::write_atomic(
        path,
        &serde_json::to_vec(f).map_err(std::io::Error::other)?,
        WriteOptions::PRIVATE_DURABLE,
    )
}

/// Progress of the writer: everything up to `written` is durable; the last attempt covered
/// up to `attempted` and failed with `error` if set.
#[derive(Debug, Clone, Default)]
struct Progress {
    written: u64,
    attempted: u64,
    error: Option<CommitError>,
}

/// Why a change did not reach the disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    #[error("write checkpoint {path}: {reason}")]
    Write { path: String, reason: String },
    #[error("checkpoint writer stopped")]
    WriterStopped,
}

/// Group commit: after changing the datastore a caller takes its generation and waits until a
/// write covering it is durable. One writer task; a write snapshots everything changed so far.
pub struct Committer {
    wanted: watch::Sender<u64>,
    done: watch::Receiver<Progress>,
    writes: Arc<std::sync::atomic::AtomicU64>,
}

impl Committer {
    pub fn start(path: PathBuf, ds: Arc<Mutex<Datastore>>) -> Arc<Committer> {
        let (wanted_tx, mut wanted_rx) = watch::channel(0u64);
        let (done_tx, done_rx) = watch::channel(Progress::default());
        let p = path.clone();
        let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = writes.clone();
        tokio::spawn(async move {
            let mut written = 0u64;
            while wanted_rx.changed().await.is_ok() {
                let failing = done_tx.borrow().error.is_some();
                if *wanted_rx.borrow_and_update() <= written && !failing {
                    continue;
                }
                let (snap, covered) = {
                    let ds = ds.lock().await;
                    (snapshot(&ds), ds.generation())
                };
                let p2 = p.clone();
                let res = tokio::task::spawn_blocking(move || write_atomic(&p2, &snap))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let error = match res {
                    Ok(()) => {
                        written = covered;
                        None
                    }
                    Err(e) => {
                        tracing::error!(path = %p.display(), error = %e, "checkpoint write failed");
                        Some(CommitError::Write {
                            path: p.display().to_string(),
                            reason: e,
                        })
                    }
                };
                let _ = done_tx.send(Progress {
                    written,
                    attempted: covered,
                    error,
                });
            }
        });
        Arc::new(Committer {
            wanted: wanted_tx,
            done: done_rx,
            writes,
        })
    }

    /// Did the last write succeed? Readiness follows this: an ADD cannot succeed while the
    /// checkpoint cannot be written.
    pub fn healthy(&self) -> bool {
        // A writer task that died (its sender dropped) writes nothing any more.
        self.done.has_changed().is_ok() && self.done.borrow().error.is_none()
    }

    /// The last write failed: try again now with whatever the datastore holds, so readiness
    /// comes back once the disk does, without waiting for the next pod.
    pub fn retry(&self) {
        if !self.healthy() {
            self.wanted.send_modify(|_| {});
        }
    }

    /// File writes so far (each covers every change made before it started).
    pub fn writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Wait until the datastore state of generation `gen` is on disk.
    pub async fn commit(&self, gen: u64) -> Result<(), CommitError> {
        let mut done = self.done.clone();
        self.wanted.send_modify(|w| *w = (*w).max(gen));
        loop {
            {
                let p = done.borrow_and_update();
                if p.written >= gen {
                    return Ok(());
                }
                if let (Some(e), true) = (&p.error, p.attempted >= gen) {
                    return Err(e.clone());
                }
            }
            if done.changed().await.is_err() {
                return Err(CommitError::WriterStopped);
            }
        }
    }
}

/// Turn checkpoint entries back into datastore keys and metadata.
pub fn entry_key(e: &Entry) -> Option<(Key, IpAddr, PodMeta, SystemTime)> {
    let ip = one_address(&e.ipv4, &e.ipv6)?;
    Some((
        Key {
            network_name: e.network_name.clone(),
            container_id: e.container_id.clone(),
            ifname: e.if_name.clone(),
        },
        ip,
        PodMeta {
            namespace: e.metadata.k8s_pod_namespace.clone(),
            name: e.metadata.k8s_pod_name.clone(),
            uid: e.metadata.k8s_pod_uid.clone(),
        },
        from_nanos(e.allocation_timestamp),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::datastore::MAIN_TABLE;

    const UPSTREAM: &str = r#"{"version":"vpc-cni-ipam/1","allocations":[
      {"networkName":"aws-cni","containerID":"c1","ifName":"eth0","ipv4":"10.0.1.11","allocationTimestamp":1700000000000000000,
       "metadata":{"k8sPodNamespace":"default","k8sPodName":"web-0","interfacesCount":1}},
      {"networkName":"aws-cni","containerID":"c2","ifName":"eth0","ipv4":"10.0.1.12","allocationTimestamp":1700000000000000001,
       "metadata":{"k8sPodNamespace":"kube-system","k8sPodName":"coredns-1"}}]}"#;

    fn ds() -> Datastore {
        crate::pool::datastore::one_eni_store(210)
    }

    #[test]
    fn reads_upstream_file_and_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ipam.json");
        std::fs::write(&p, UPSTREAM).unwrap();
        let l = load(&p).unwrap();
        assert_eq!(l.entries.len(), 2);
        let (k, ip, pod, at) = entry_key(&l.entries[0]).unwrap();
        assert_eq!(k.container_id, "c1");
        assert_eq!(ip, Ipv4Addr::new(10, 0, 1, 11));
        assert_eq!(pod.name, "web-0");
        assert_eq!(to_nanos(at), 1_700_000_000_000_000_000);

        let mut ds = ds();
        for e in &l.entries {
            let (k, ip, pod, at) = entry_key(e).unwrap();
            assert!(ds.restore(k, ip, pod, at));
        }
        ds.release(
            &Key {
                network_name: "aws-cni".into(),
                container_id: "c2".into(),
                ifname: "eth0".into(),
            },
            SystemTime::now(),
        );
        let snap = snapshot(&ds);
        write_atomic(&p, &snap).unwrap();
        let back = load(&p).unwrap();
        assert_eq!(back.entries, snap.allocations);
        assert_eq!(back.cooldowns.len(), 1);
        assert_eq!(back.entries[0].metadata.interfaces_count, 1);
        // Field names are upstream's.
        let raw: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        let a = &raw["allocations"][0];
        for f in [
            "networkName",
            "containerID",
            "ifName",
            "ipv4",
            "allocationTimestamp",
            "metadata",
        ] {
            assert!(a.get(f).is_some(), "missing {f}");
        }
        assert_eq!(raw["version"], "vpc-cni-ipam/1");
        assert_eq!(ds.allocations().next().unwrap().route_table, MAIN_TABLE);
    }

    #[test]
    fn anything_but_a_whole_valid_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ipam.json");
        let cut = UPSTREAM.find("\"c2\"").unwrap() + 3;
        let dup_ip = UPSTREAM.replace("10.0.1.12", "10.0.1.11");
        let dup_key = UPSTREAM.replace("\"c2\"", "\"c1\"");
        let bad_first = UPSTREAM.replace("\"10.0.1.11\"", "\"10.0.1.300\"");
        let wrong_version = UPSTREAM.replace("vpc-cni-ipam/1", "vpc-cni-ipam/9");
        for (what, bytes) in [
            ("torn", &UPSTREAM.as_bytes()[..cut]),
            ("garbage", b"\x00\x01garbage".as_slice()),
            ("empty", b"".as_slice()),
            ("blank", b"  \n".as_slice()),
            ("array", b"[]".as_slice()),
            (
                "no allocations",
                br#"{"version":"vpc-cni-ipam/1"}"#.as_slice(),
            ),
            (
                "null allocations",
                br#"{"version":"vpc-cni-ipam/1","allocations":null}"#.as_slice(),
            ),
            ("bad first entry", bad_first.as_bytes()),
            (
                "entry of wrong shape",
                br#"{"version":"vpc-cni-ipam/1","allocations":[{"containerID":1}]}"#.as_slice(),
            ),
            ("one address twice", dup_ip.as_bytes()),
            ("one attachment twice", dup_key.as_bytes()),
            ("other version", wrong_version.as_bytes()),
        ] {
            std::fs::write(&p, bytes).unwrap();
            match load(&p) {
                Err(LoadError::Invalid { source, .. }) => {
                    assert!(!source.to_string().is_empty(), "{what}")
                }
                other => panic!("{what}: {other:?}"),
            }
            assert_eq!(std::fs::read(&p).unwrap(), bytes, "{what}: file changed");
        }
        let l = load(&d.path().join("missing.json")).unwrap();
        assert!(l.entries.is_empty());
        // Unreadable is not "empty": the daemon must not start as if no pod had an address.
        assert!(matches!(load(d.path()), Err(LoadError::Read { .. })));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Any bytes: a verdict, never a panic; and whatever is accepted round-trips.
        #[test]
        fn parser_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse(&data);
        }

        /// Mutations of a valid file: either refused or parsed into entries that all hold a
        /// valid address and key.
        #[test]
        fn mutated_files_are_refused_or_valid(at in 0usize..UPSTREAM.len(), byte in proptest::prelude::any::<u8>()) {
            let mut data = UPSTREAM.as_bytes().to_vec();
            data[at] = byte;
            if let Ok(l) = parse(&data) {
                for e in &l.entries {
                    proptest::prop_assert!(entry_key(e).is_some());
                    proptest::prop_assert!(!e.container_id.is_empty());
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_batches_writes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ipam.json");
        let ds = Arc::new(Mutex::new(ds()));
        let c = Committer::start(p.clone(), ds.clone());
        let mut tasks = Vec::new();
        for i in 0..100 {
            let (ds, c, p) = (ds.clone(), c.clone(), p.clone());
            tasks.push(tokio::spawn(async move {
                let gen = {
                    let mut g = ds.lock().await;
                    g.assign(
                        Key {
                            network_name: "n".into(),
                            container_id: format!("c{i}"),
                            ifname: "eth0".into(),
                        },
                        PodMeta::default(),
                        SystemTime::now(),
                    )
                    .unwrap();
                    g.generation()
                };
                c.commit(gen).await.unwrap();
                // Durable by now: the file holds this container.
                let l = load(&p).unwrap();
                assert!(l.entries.iter().any(|e| e.container_id == format!("c{i}")));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut want: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
        let mut got: Vec<String> = load(&p)
            .unwrap()
            .entries
            .into_iter()
            .map(|e| e.container_id)
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        // 100 concurrent changes shared far fewer writes than one fsync each.
        eprintln!("group commit: {} writes for 100 changes", c.writes());
        assert!(c.writes() < 50, "{} writes for 100 changes", c.writes());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn write_failure_is_reported() {
        let d = tempfile::tempdir().unwrap();
        // A directory where the file should be: rename over it fails.
        let p = d.path().join("ipam.json");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("x"), b"x").unwrap();
        let ds = Arc::new(Mutex::new(ds()));
        let c = Committer::start(p, ds.clone());
        let gen = {
            let mut g = ds.lock().await;
            g.release(
                &Key {
                    network_name: "n".into(),
                    container_id: "none".into(),
                    ifname: "eth0".into(),
                },
                SystemTime::now(),
            );
            g.add_ip("eni-0", Ipv4Addr::new(10, 0, 2, 99)).unwrap();
            g.generation()
        };
        let e = c.commit(gen).await.unwrap_err();
        assert!(matches!(e, CommitError::Write { .. }), "{e}");
        assert!(e.to_string().contains("write checkpoint"), "{e}");
    }
}
