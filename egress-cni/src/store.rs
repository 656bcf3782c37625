//! Egress address reservations, on disk exactly as the host-local IPAM plugin keeps them, so a
//! node that ran upstream's egress plugin (which delegates to host-local) keeps its
//! reservations when switched to this one, and the other way round:
//!
//! - `<dataDir>/<network>/` holds everything of one network (created 0755);
//! - one file per reserved address, named by the address as Go prints it (`169.254.172.2`,
//!   `fd00::ac:2`), holding `<containerID>\r\n<ifname>` (0600); a file holding only the
//!   container id is an older host-local's, matched when no newer one is;
//! - `last_reserved_ip.<range set index>`, the address handed out last (plain text), from
//!   which the next allocation resumes;
//! - `lock`, `flock`ed for the whole of an allocation or a release, by host-local as by us.
//!
//! A reservation file appears whole or not at all: it is written under a temporary name and
//! hard-linked into place (the link fails if the address is taken), so a crash never leaves an
//! empty reservation that nobody's DEL would ever match. Temporary files exist only while the
//! lock is held; one found by a lock holder is a crashed writer's and is removed.
//!
//! Nothing is fsynced, as host-local does not: the directory lives on `/run` (tmpfs), whose
//! contents do not outlive the pods they describe.

use std::collections::HashSet;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use cni_common::fsio::{remove_if_exists, FileLock};

use crate::range::Range;

/// host-local's default `dataDir`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";
const LOCK_FILE: &str = "lock";
const LAST_RESERVED_PREFIX: &str = "last_reserved_ip.";
const LINE_BREAK: &str = "\r\n";
/// The one range set egress configurations have is host-local's range set 0.
pub const RANGE_ID: usize = 0;
const TEMP_PREFIX: &str = ".egress-cni-";

/// The file content naming a reservation's holder, as host-local writes it.
pub fn owner_key(container_id: &str, ifname: &str) -> String {
    format!("{}{LINE_BREAK}{ifname}", container_id.trim())
}

/// How a reservation file's content relates to an attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// `<containerID>\r\n<ifname>`.
    Exact,
    /// Only `<containerID>`: an older host-local's file, the attachment's if no exact one is.
    ContainerOnly,
    Other,
}

/// Compared after trimming surrounding whitespace, as host-local does.
pub fn holder(content: &str, container_id: &str, ifname: &str) -> Holder {
    let c = content.trim();
    if c == owner_key(container_id, ifname) {
        Holder::Exact
    } else if c == container_id.trim() {
        Holder::ContainerOnly
    } else {
        Holder::Other
    }
}

/// One reserved address and who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub ip: IpAddr,
    /// The file's content, trimmed.
    pub owner: String,
}

impl Reservation {
    /// (container id, ifname); the ifname is empty for an older host-local's file.
    pub fn attachment(&self) -> (&str, &str) {
        match self.owner.split_once(LINE_BREAK) {
            Some((id, ifname)) => (id, ifname),
            None => (self.owner.as_str(), ""),
        }
    }
}

/// The reservations of one attachment among `all`: its exact ones, or else its container-only
/// ones (host-local's rule).
pub fn held_by<'a>(
    all: &'a [Reservation],
    container_id: &str,
    ifname: &str,
) -> Vec<&'a Reservation> {
    for wanted in [Holder::Exact, Holder::ContainerOnly] {
        let found: Vec<&Reservation> = all
            .iter()
            .filter(|r| holder(&r.owner, container_id, ifname) == wanted)
            .collect();
        if !found.is_empty() {
            return found;
        }
    }
    Vec::new()
}

/// One network's directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// The store with its lock held; every read and change goes through this.
pub struct Locked<'a> {
    dir: &'a Path,
    _lock: FileLock,
}

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("no free address in {range}: all {capacity} are reserved (in {dir})")]
    Exhausted {
        range: String,
        capacity: u128,
        dir: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: io::Error,
    },
}

/// The address an ADD gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// The attachment held it already (a repeated ADD): the same address again.
    Existing(IpAddr),
    /// Reserved now.
    New(IpAddr),
}

impl Allocation {
    pub fn ip(self) -> IpAddr {
        match self {
            Allocation::Existing(ip) | Allocation::New(ip) => ip,
        }
    }
}

impl Store {
    /// `network` must be a validated network name (one path segment).
    pub fn new(data_dir: &Path, network: &str) -> Store {
        Store {
            dir: data_dir.join(network),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Create the directory if needed and take the lock.
    pub fn lock(&self) -> io::Result<Locked<'_>> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.dir)?;
        self.take_lock()
    }

    /// The lock, or None when the directory does not exist (nothing was ever reserved).
    pub fn lock_existing(&self) -> io::Result<Option<Locked<'_>>> {
        match fs::symlink_metadata(&self.dir) {
            Ok(_) => self.take_lock().map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn take_lock(&self) -> io::Result<Locked<'_>> {
        let lock = FileLock::acquire(&self.dir.join(LOCK_FILE))?;
        Ok(Locked {
            dir: &self.dir,
            _lock: lock,
        })
    }

    fn io_err(&self, what: &'static str, source: io::Error) -> AllocError {
        AllocError::Io {
            what,
            path: self.dir.display().to_string(),
            source,
        }
    }

    /// The attachment's address in `range`: the one it holds already, else the next free one
    /// in host-local's order.
    pub fn allocate(
        &self,
        range: &Range,
        container_id: &str,
        ifname: &str,
    ) -> Result<Allocation, AllocError> {
        let locked = self.lock().map_err(|e| self.io_err("lock", e))?;
        let all = locked
            .reservations()
            .map_err(|e| self.io_err("read reservations in", e))?;
        if let Some(r) = held_by(&all, container_id, ifname)
            .into_iter()
            .find(|r| range.contains(r.ip))
        {
            return Ok(Allocation::Existing(r.ip));
        }
        let taken: HashSet<IpAddr> = all.iter().map(|r| r.ip).collect();
        let free = range
            .candidates(locked.last_reserved(RANGE_ID))
            .filter(|ip| !taken.contains(ip));
        match locked
            .reserve_first(free, container_id, ifname)
            .map_err(|e| self.io_err("reserve an address in", e))?
        {
            Some(ip) => {
                locked
                    .set_last_reserved(RANGE_ID, ip)
                    .map_err(|e| self.io_err("record the last reserved address in", e))?;
                Ok(Allocation::New(ip))
            }
            None => Err(AllocError::Exhausted {
                range: format!("{} ({range})", range.subnet()),
                capacity: range.capacity(),
                dir: self.dir.display().to_string(),
            }),
        }
    }

    /// Release what the attachment holds; the addresses released.
    pub fn release(&self, container_id: &str, ifname: &str) -> io::Result<Vec<IpAddr>> {
        match self.lock_existing()? {
            Some(l) => l.release(container_id, ifname),
            None => Ok(Vec::new()),
        }
    }

    /// What the attachment holds, without changing anything.
    pub fn find(&self, container_id: &str, ifname: &str) -> io::Result<Vec<IpAddr>> {
        match self.lock_existing()? {
            Some(l) => {
                let all = l.reservations()?;
                Ok(held_by(&all, container_id, ifname)
                    .into_iter()
                    .map(|r| r.ip)
                    .collect())
            }
            None => Ok(Vec::new()),
        }
    }

    /// Every reservation.
    pub fn list(&self) -> io::Result<Vec<Reservation>> {
        match self.lock_existing()? {
            Some(l) => l.reservations(),
            None => Ok(Vec::new()),
        }
    }
}

impl Locked<'_> {
    /// Every reservation file; stale temporary files are removed on the way.
    pub fn reservations(&self) -> io::Result<Vec<Reservation>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(TEMP_PREFIX) {
                // Only lock holders make these, and they remove them before unlocking.
                remove_if_exists(&entry.path())?;
                continue;
            }
            let Ok(ip) = name.parse::<IpAddr>() else {
                continue;
            };
            if !entry.file_type()?.is_file() {
                continue;
            }
            let owner = match fs::read_to_string(entry.path()) {
                Ok(s) => s.trim().to_string(),
                // Released by an older host-local that does not lock? Not reserved, then.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            out.push(Reservation { ip, owner });
        }
        Ok(out)
    }

    /// Reserve the first of `candidates` whose file can be created; None when none can.
    fn reserve_first(
        &self,
        candidates: impl Iterator<Item = IpAddr>,
        container_id: &str,
        ifname: &str,
    ) -> io::Result<Option<IpAddr>> {
        let tmp = self
            .dir
            .join(format!("{TEMP_PREFIX}{}.tmp", std::process::id()));
        remove_if_exists(&tmp)?;
        let res = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
                .open(&tmp)?;
            f.write_all(owner_key(container_id, ifname).as_bytes())?;
            drop(f);
            for ip in candidates {
                match fs::hard_link(&tmp, self.dir.join(ip.to_string())) {
                    Ok(()) => return Ok(Some(ip)),
                    // Reserved by someone who does not take the lock (or a file we could not
                    // parse): not ours to take.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                }
            }
            Ok(None)
        })();
        let cleaned = remove_if_exists(&tmp);
        let ip = res?;
        cleaned?;
        Ok(ip)
    }

    /// The last address handed out in range set `range_id`; None when unknown or unreadable
    /// (host-local too treats that as "start from the beginning").
    pub fn last_reserved(&self, range_id: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("{LAST_RESERVED_PREFIX}{range_id}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn set_last_reserved(&self, range_id: usize, ip: IpAddr) -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(self.dir.join(format!("{LAST_RESERVED_PREFIX}{range_id}")))?;
        f.write_all(ip.to_string().as_bytes())
    }

    /// Remove the attachment's reservations (host-local's rule: exact ones, else
    /// container-only ones).
    pub fn release(&self, container_id: &str, ifname: &str) -> io::Result<Vec<IpAddr>> {
        let all = self.reservations()?;
        let mut released = Vec::new();
        for r in held_by(&all, container_id, ifname) {
            remove_if_exists(&self.dir.join(r.ip.to_string()))?;
            released.push(r.ip);
        }
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(s: &str) -> Range {
        Range::new(s.parse().unwrap(), None, None, None).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn files_as_host_local_writes_them() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(d.path(), "aws-cni");
        let r = range("169.254.172.0/22");
        assert_eq!(
            s.allocate(&r, "cid1", "eth0").unwrap(),
            Allocation::New(ip("169.254.172.2"))
        );
        let dir = d.path().join("aws-cni");
        assert_eq!(
            fs::read_to_string(dir.join("169.254.172.2")).unwrap(),
            "cid1\r\neth0"
        );
        assert_eq!(
            fs::read_to_string(dir.join("last_reserved_ip.0")).unwrap(),
            "169.254.172.2"
        );
        assert!(dir.join("lock").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("169.254.172.2")), 0o600);
        assert_eq!(mode(&dir), 0o755);
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["169.254.172.2", "last_reserved_ip.0", "lock"]);
    }

    #[test]
    fn ipv6_names_are_gos() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(d.path(), "aws-cni");
        let r = range("fd00::ac:00/118");
        assert_eq!(s.allocate(&r, "c", "eth0").unwrap().ip(), ip("fd00::ac:2"));
        assert!(d.path().join("aws-cni/fd00::ac:2").exists());
        // Go's net.IP.String() forms (RFC 5952), which Rust's Display matches.
        for (a, go) in [
            ("2001:db8:0:1:0:0:0:1", "2001:db8:0:1::1"),
            ("2001:0:0:1:0:0:0:1", "2001:0:0:1::1"),
            ("fd00:0:0:0:0:0:ac:3ff", "fd00::ac:3ff"),
            ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
        ] {
            assert_eq!(ip(a).to_string(), go);
        }
    }

    #[test]
    fn repeated_add_gets_the_same_address_and_release_frees_it() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(d.path(), "n");
        let r = range("10.0.0.0/29");
        let a = s.allocate(&r, "a", "eth0").unwrap();
        assert_eq!(a, Allocation::New(ip("10.0.0.2")));
        assert_eq!(
            s.allocate(&r, "a", "eth0").unwrap(),
            Allocation::Existing(ip("10.0.0.2"))
        );
        // Another interface of the same container is another attachment.
        assert_eq!(
            s.allocate(&r, "a", "net1").unwrap(),
            Allocation::New(ip("10.0.0.3"))
        );
        assert_eq!(s.find("a", "eth0").unwrap(), [ip("10.0.0.2")]);
        assert_eq!(s.release("a", "eth0").unwrap(), [ip("10.0.0.2")]);
        assert_eq!(s.release("a", "eth0").unwrap(), Vec::<IpAddr>::new());
        assert_eq!(s.find("a", "net1").unwrap(), [ip("10.0.0.3")]);
        // Round robin: the freed .2 comes back only after the rest of the range.
        assert_eq!(s.allocate(&r, "b", "eth0").unwrap().ip(), ip("10.0.0.4"));
    }

    #[test]
    fn exhaustion_names_the_range() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(d.path(), "n");
        let r = range("10.0.0.0/30"); // one address: .2
        s.allocate(&r, "a", "eth0").unwrap();
        let e = s.allocate(&r, "b", "eth0").unwrap_err();
        assert!(
            e.to_string().starts_with(
                "no free address in 10.0.0.0/30 (10.0.0.1-10.0.0.2): all 1 are reserved"
            ),
            "{e}"
        );
    }

    #[test]
    fn older_host_local_files_and_strangers() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("n");
        fs::create_dir_all(&dir).unwrap();
        // An older host-local's file (container id only), with the trailing newline some wrote.
        fs::write(dir.join("10.0.0.2"), "old\n").unwrap();
        fs::write(dir.join("10.0.0.3"), "other\r\neth0").unwrap();
        fs::write(dir.join("last_reserved_ip.0"), "10.0.0.3").unwrap();
        // A crashed writer's temporary file.
        fs::write(dir.join(".egress-cni-1.tmp"), "x").unwrap();
        let s = Store::new(d.path(), "n");
        let r = range("10.0.0.0/28");
        assert_eq!(
            s.allocate(&r, "old", "eth0").unwrap(),
            Allocation::Existing(ip("10.0.0.2"))
        );
        assert!(!dir.join(".egress-cni-1.tmp").exists());
        assert_eq!(s.allocate(&r, "new", "eth0").unwrap().ip(), ip("10.0.0.4"));
        assert_eq!(s.release("old", "eth0").unwrap(), [ip("10.0.0.2")]);
        let owners: Vec<(String, String)> = s
            .list()
            .unwrap()
            .iter()
            .map(|r| {
                let (c, i) = r.attachment();
                (c.to_string(), i.to_string())
            })
            .collect();
        assert!(owners.contains(&("other".into(), "eth0".into())));
        assert!(owners.contains(&("new".into(), "eth0".into())));
        assert_eq!(owners.len(), 2);
    }

    #[test]
    fn holder_rules() {
        assert_eq!(holder("c\r\neth0", "c", "eth0"), Holder::Exact);
        assert_eq!(holder(" c\r\neth0\n", "c", "eth0"), Holder::Exact);
        assert_eq!(holder("c", "c", "eth0"), Holder::ContainerOnly);
        assert_eq!(holder("c\r\nnet1", "c", "eth0"), Holder::Other);
        assert_eq!(holder("cc\r\neth0", "c", "eth0"), Holder::Other);
    }

    #[test]
    fn missing_store_is_empty_and_not_created() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(&d.path().join("absent"), "n");
        assert!(s.release("a", "eth0").unwrap().is_empty());
        assert!(s.find("a", "eth0").unwrap().is_empty());
        assert!(!d.path().join("absent").exists());
    }

    /// Many allocators at once, each with its own lock file description as separate processes
    /// would have: every attachment gets a distinct address, and a second round of the same
    /// attachments gets the same ones.
    #[test]
    fn concurrent_allocations_are_distinct() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().to_path_buf();
        let r = range("169.254.172.0/26");
        let run = || {
            let handles: Vec<_> = (0..40)
                .map(|i| {
                    let root = root.clone();
                    let r = r.clone();
                    std::thread::spawn(move || {
                        Store::new(&root, "n")
                            .allocate(&r, &format!("c{i}"), "eth0")
                            .unwrap()
                            .ip()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        };
        let first = run();
        let set: HashSet<_> = first.iter().collect();
        assert_eq!(set.len(), 40);
        assert_eq!(run(), first);
    }
}
