//! Files both binaries keep: the checkpoint, the plugin's per-attachment state, release
//! records, the conflist and the installed plugins.
//!
//! One write path for all of them. The temp file has an unpredictable name and is created with
//! `O_EXCL|O_NOFOLLOW`, so a file or symlink planted in the directory can neither be written
//! through nor become the result; it carries the final mode from its first byte; readers see
//! the old file or the whole new one; with `sync`, the new one is there after a crash too.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Owner read/write only: the checkpoint, state and logs name every pod on the node.
pub const PRIVATE: u32 = 0o600;

/// How a file is replaced.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    pub mode: u32,
    /// fsync the file before the rename and the directory after it. Without it the rename is
    /// still atomic for readers, which is all a file on tmpfs can get anyway.
    pub sync: bool,
}

impl WriteOptions {
    pub const PRIVATE_DURABLE: WriteOptions = WriteOptions {
        mode: PRIVATE,
        sync: true,
    };
    /// Atomic for readers and for a crash of the writing process, not for a crash of the
    /// machine: for records that a reboot makes moot anyway.
    pub const PRIVATE_ATOMIC: WriteOptions = WriteOptions {
        mode: PRIVATE,
        sync: false,
    };
}

fn random_suffix() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // O_EXCL still keeps a guessed name from being used against us; this only costs a retry.
        let n = std::process::id() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        b = n.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Create a new private temp file next to `path` (never an existing file, never via a symlink).
fn create_temp(path: &Path, mode: u32) -> io::Result<(PathBuf, File)> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut last = None;
    for _ in 0..8 {
        let tmp = dir.join(format!(".{name}.{}.tmp", random_suffix()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => {
                // The umask may have narrowed the mode; the caller asked for exactly this one.
                f.set_permissions(fs::Permissions::from_mode(mode))?;
                return Ok((tmp, f));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temp name")))
}

/// Replace `path` with `data`.
pub fn write_atomic(path: &Path, data: &[u8], opts: WriteOptions) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let (tmp, mut f) = create_temp(path, opts.mode)?;
    let res = (|| {
        f.write_all(data)?;
        if opts.sync {
            f.sync_all()?;
        }
        drop(f);
        fs::rename(&tmp, path)?;
        if opts.sync {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Open `path` for appending, creating it private; never through a symlink. An existing file
/// with wider permissions (an older version's 0644 log) is narrowed.
pub fn open_private_append(path: &Path) -> io::Result<File> {
    if let Some(d) = path.parent() {
        fs::create_dir_all(d)?;
    }
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(PRIVATE)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)?;
    if f.metadata()?.mode() & 0o7777 != PRIVATE {
        f.set_permissions(fs::Permissions::from_mode(PRIVATE))?;
    }
    Ok(f)
}

/// Remove `path`; a file already gone is fine.
pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// An exclusive `flock` on a lock file, held until dropped.
///
/// Whoever deletes the lock file does so while holding the lock (`unlink`), so a waiter that
/// wakes up holding a lock on a file no longer at `path` tries again on the new one.
pub struct FileLock {
    file: nix::fcntl::Flock<File>,
    path: PathBuf,
}

impl FileLock {
    pub fn acquire(path: &Path) -> io::Result<FileLock> {
        if let Some(d) = path.parent() {
            fs::create_dir_all(d)?;
        }
        loop {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(PRIVATE)
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
                .open(path)?;
            let locked = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| io::Error::from(e))?;
            let held = locked.metadata()?;
            match fs::symlink_metadata(path) {
                Ok(m) if m.ino() == held.ino() && m.dev() == held.dev() => {
                    return Ok(FileLock {
                        file: locked,
                        path: path.to_path_buf(),
                    })
                }
                // Unlinked (or replaced) by the previous holder: lock the current file instead.
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Remove the lock file and release the lock (the attachment is gone).
    pub fn remove(self) -> io::Result<()> {
        let r = remove_if_exists(&self.path);
        drop(self.file);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_privately_and_ignores_planted_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ipam.json");
        let victim = d.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        // The old predictable temp name, planted as a symlink: no longer used at all.
        std::os::unix::fs::symlink(&victim, d.path().join("ipam.tmp")).unwrap();
        write_atomic(&p, b"one", WriteOptions::PRIVATE_DURABLE).unwrap();
        write_atomic(&p, b"two", WriteOptions::PRIVATE_DURABLE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert!(!fs::symlink_metadata(&p).unwrap().file_type().is_symlink());
        // No temp file left behind.
        let left: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp") && n != "ipam.tmp")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("inner"), b"1").unwrap();
        assert!(write_atomic(&p, b"data", WriteOptions::PRIVATE_DURABLE).is_err());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn append_never_follows_a_symlink_and_narrows_mode() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        fs::write(&target, b"").unwrap();
        let link = d.path().join("log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(open_private_append(&link).is_err());
        let wide = d.path().join("wide.log");
        fs::write(&wide, b"old").unwrap();
        fs::set_permissions(&wide, fs::Permissions::from_mode(0o644)).unwrap();
        open_private_append(&wide).unwrap();
        assert_eq!(fs::metadata(&wide).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn lock_survives_removal_by_the_previous_holder() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.lock");
        let first = FileLock::acquire(&p).unwrap();
        let p2 = p.clone();
        let waiter = std::thread::spawn(move || {
            let l = FileLock::acquire(&p2).unwrap();
            // The waiter holds the file that is at the path now.
            let on_disk = fs::metadata(&p2).unwrap().ino();
            let held = l.file.metadata().unwrap().ino();
            (on_disk, held)
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        first.remove().unwrap();
        let (on_disk, held) = waiter.join().unwrap();
        assert_eq!(on_disk, held);
    }
}
