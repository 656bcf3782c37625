//! Per-sandbox state on disk: what DEL and GC need to clean the host when ipamd cannot tell
//! them (it is down, or it already forgot the allocation). Upstream smuggles this through
//! a dummy interface; a small JSON file per attachment is plainer and survives a netns loss.
//!
//! Layout under the state directory (ipamd reads the same files, see `cni_common::state`):
//! `<network>/<containerID>+<ifname>.json` the attachment, `.locks/` for the per-attachment
//! locks, and `.released/<network>+<containerID>+<ifname>.json` for a release a DEL owes
//! ipamd because ipamd was unreachable.

use std::fs;
use std::path::{Path, PathBuf};

use cni_common::fsio::{self, FileLock, WriteOptions};
use cni_common::state::{
    attachment_file, legacy_attachment_file, lock_file, released_dir, ReleaseRecord,
};

pub use cni_common::state::SandboxState;

pub struct StateStore {
    root: PathBuf,
    network: String,
}

impl StateStore {
    pub fn new(root: &Path, network_name: &str) -> StateStore {
        StateStore {
            root: root.to_path_buf(),
            network: network_name.to_string(),
        }
    }

    fn path(&self, container_id: &str, ifname: &str) -> PathBuf {
        attachment_file(&self.root, &self.network, container_id, ifname)
    }

    /// Serialise every command on one attachment (ADD against DEL of the same container):
    /// held until the returned lock is dropped.
    pub fn lock(&self, container_id: &str, ifname: &str) -> std::io::Result<FileLock> {
        FileLock::acquire(&lock_file(&self.root, &self.network, container_id, ifname))
    }

    pub fn load(&self, container_id: &str, ifname: &str) -> Option<SandboxState> {
        let data = fs::read(self.path(container_id, ifname))
            .or_else(|_| {
                fs::read(legacy_attachment_file(
                    &self.root,
                    &self.network,
                    container_id,
                    ifname,
                ))
            })
            .ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// No fsync: the record describes a pod network namespace and veth, which do not survive
    /// the machine either (and it lives under /var/run, tmpfs on nodes). What it must survive
    /// is this process dying mid-ADD, and the rename gives that. (An fsync cost ADD 1-5 ms on
    /// a disk-backed directory.)
    pub fn save(&self, s: &SandboxState) -> std::io::Result<()> {
        let data = serde_json::to_vec(s).map_err(std::io::Error::other)?;
        fsio::write_atomic(
            &self.path(&s.container_id, &s.ifname),
            &data,
            WriteOptions::PRIVATE_ATOMIC,
        )
    }

    pub fn remove(&self, container_id: &str, ifname: &str) -> std::io::Result<()> {
        fsio::remove_if_exists(&legacy_attachment_file(
            &self.root,
            &self.network,
            container_id,
            ifname,
        ))?;
        fsio::remove_if_exists(&self.path(container_id, ifname))
    }

    /// Every attachment recorded for this network (for GC).
    pub fn list(&self) -> Vec<SandboxState> {
        let dir = self.path("x", "x");
        let Some(dir) = dir.parent() else {
            return Vec::new();
        };
        let Ok(rd) = fs::read_dir(dir) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| fs::read(e.path()).ok())
            .filter_map(|d| serde_json::from_slice(&d).ok())
            .collect()
    }

    /// ipamd was unreachable during DEL: leave a durable note of the release it owes, which
    /// ipamd applies before it serves again.
    pub fn record_release(&self, rec: &ReleaseRecord) -> std::io::Result<PathBuf> {
        let path = released_dir(&self.root).join(rec.file_name());
        let data = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
        fsio::write_atomic(&path, &data, WriteOptions::PRIVATE_DURABLE)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn sample(cid: &str) -> SandboxState {
        SandboxState {
            network_name: "aws-cni".into(),
            container_id: cid.into(),
            ifname: "eth0".into(),
            host_veth: "eni0".into(),
            ip: Ipv4Addr::new(10, 0, 0, 9).into(),
            route_table: 2,
            device_number: 1,
            netns: "/var/run/netns/x".into(),
            pod_namespace: "default".into(),
            pod_name: "p".into(),
        }
    }

    #[test]
    fn save_load_list_remove() {
        let d = tempfile::tempdir().unwrap();
        let st = StateStore::new(d.path(), "aws-cni");
        assert!(st.load("c1", "eth0").is_none());
        st.save(&sample("c1")).unwrap();
        st.save(&sample("../../etc/passwd")).unwrap();
        assert_eq!(st.load("c1", "eth0").unwrap(), sample("c1"));
        assert_eq!(st.list().len(), 2);
        st.remove("c1", "eth0").unwrap();
        st.remove("c1", "eth0").unwrap();
        assert_eq!(st.list().len(), 1);
        // Nothing escaped the state directory.
        assert!(d.path().join("aws-cni").read_dir().unwrap().count() == 1);
        let mode = std::os::unix::fs::MetadataExt::mode(
            &fs::metadata(
                d.path()
                    .join("aws-cni")
                    .read_dir()
                    .unwrap()
                    .next()
                    .unwrap()
                    .unwrap()
                    .path(),
            )
            .unwrap(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn separators_do_not_collide() {
        let d = tempfile::tempdir().unwrap();
        let st = StateStore::new(d.path(), "aws-cni");
        let mut a = sample("a-b");
        a.ifname = "c".into();
        let mut b = sample("a");
        b.ifname = "b-c".into();
        st.save(&a).unwrap();
        st.save(&b).unwrap();
        assert_eq!(st.load("a-b", "c").unwrap(), a);
        assert_eq!(st.load("a", "b-c").unwrap(), b);
    }

    #[test]
    fn reads_files_of_the_previous_layout() {
        let d = tempfile::tempdir().unwrap();
        let st = StateStore::new(d.path(), "aws-cni");
        let old = legacy_attachment_file(d.path(), "aws-cni", "c1", "eth0");
        fs::create_dir_all(old.parent().unwrap()).unwrap();
        fs::write(&old, serde_json::to_vec(&sample("c1")).unwrap()).unwrap();
        assert_eq!(st.load("c1", "eth0").unwrap(), sample("c1"));
        st.remove("c1", "eth0").unwrap();
        assert!(!old.exists());
    }
}
