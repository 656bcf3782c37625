//! Per-sandbox state on disk: what DEL and GC need to clean the host when ipamd cannot tell
//! them (it is down, or it already forgot the allocation). Upstream smuggles this through
//! a dummy interface; a small JSON file per attachment is plainer and survives a netns loss.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxState {
    pub network_name: String,
    pub container_id: String,
    pub ifname: String,
    pub host_veth: String,
    pub ip: Ipv4Addr,
    /// Route table of the ENI the IP lives on; 254 (main) for the primary ENI.
    pub route_table: u32,
    pub device_number: i32,
    pub netns: String,
    pub pod_namespace: String,
    pub pod_name: String,
}

pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(root: &Path, network_name: &str) -> StateStore {
        StateStore {
            dir: root.join(sanitize(network_name)),
        }
    }

    fn path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.dir.join(format!(
            "{}-{}.json",
            sanitize(container_id),
            sanitize(ifname)
        ))
    }

    pub fn load(&self, container_id: &str, ifname: &str) -> Option<SandboxState> {
        let data = fs::read(self.path(container_id, ifname)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Written via a temp file and rename so a crash never leaves a half file for DEL to trip on.
    pub fn save(&self, s: &SandboxState) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let path = self.path(&s.container_id, &s.ifname);
        let tmp = path.with_extension("tmp");
        {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(s).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)
    }

    pub fn remove(&self, container_id: &str, ifname: &str) -> std::io::Result<()> {
        match fs::remove_file(self.path(container_id, ifname)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every attachment recorded for this network (for GC).
    pub fn list(&self) -> Vec<SandboxState> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| fs::read(e.path()).ok())
            .filter_map(|d| serde_json::from_slice(&d).ok())
            .collect()
    }
}

/// Container ids and network names are runtime-chosen strings; keep them to one path segment.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(cid: &str) -> SandboxState {
        SandboxState {
            network_name: "aws-cni".into(),
            container_id: cid.into(),
            ifname: "eth0".into(),
            host_veth: "eni0".into(),
            ip: Ipv4Addr::new(10, 0, 0, 9),
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
    }
}
