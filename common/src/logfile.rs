//! Size-based log rotation for both binaries, with upstream's limits (100 MB, 5 old files).
//!
//! Rotation is checked on open and on every write, so it works for the long-running ipamd and
//! for the plugin, a process per pod that appends a few lines and exits. Old files are
//! `<log>.1` (newest) to `<log>.<keep>`; files are private (0600) and never opened through a
//! symlink. Two plugin processes rotating at the same moment can at worst rotate twice.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::fsio::open_private_append;

/// Upstream's lumberjack settings: MaxSize 100 (MB), MaxBackups 5.
pub const DEFAULT_MAX_BYTES: u64 = 100 * 1024 * 1024;
pub const DEFAULT_KEEP: u32 = 5;

pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: File,
    size: u64,
}

fn backup(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl RotatingFile {
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> io::Result<RotatingFile> {
        let file = open_private_append(path)?;
        let size = file.metadata()?.len();
        let mut r = RotatingFile {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(1),
            keep,
            file,
            size,
        };
        if r.size >= r.max_bytes {
            r.rotate()?;
        }
        Ok(r)
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.keep == 0 {
            fs::remove_file(&self.path).or_else(|e| match e.kind() {
                io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })?;
        } else {
            for n in (1..self.keep).rev() {
                let from = backup(&self.path, n);
                if from.exists() {
                    fs::rename(&from, backup(&self.path, n + 1))?;
                }
            }
            match fs::rename(&self.path, backup(&self.path, 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.file = open_private_append(&self.path)?;
        self.size = self.file.metadata()?.len();
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.size > 0 && self.size + buf.len() as u64 > self.max_bytes {
            // A failed rotation must not stop logging: keep appending to the current file.
            let _ = self.rotate();
        }
        let n = self.file.write(buf)?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn rotates_by_size_and_keeps_n() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ipamd.log");
        let mut f = RotatingFile::open(&p, 100, 2).unwrap();
        for i in 0..20 {
            writeln!(f, "line {i:03} {}", "x".repeat(30)).unwrap();
        }
        let names: Vec<String> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        for n in ["ipamd.log", "ipamd.log.1", "ipamd.log.2"] {
            let m = fs::metadata(d.path().join(n)).unwrap();
            assert!(m.len() <= 100, "{n}: {}", m.len());
            assert_eq!(m.mode() & 0o777, 0o600);
        }
        let newest = fs::read_to_string(&p).unwrap();
        assert!(newest.contains("line 019"));
    }

    #[test]
    fn a_full_file_rotates_on_open() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("plugin.log");
        fs::write(&p, vec![b'x'; 200]).unwrap();
        let mut f = RotatingFile::open(&p, 100, 5).unwrap();
        writeln!(f, "new").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "new\n");
        assert_eq!(fs::metadata(backup(&p, 1)).unwrap().len(), 200);
    }
}
