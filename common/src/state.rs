//! The plugin's on-disk records, which ipamd reads too: one file per attachment (what DEL,
//! GC and ipamd's sweeper need to know about a pod's host side) and one per release a DEL
//! owes ipamd because ipamd was unreachable at the time.
//!
//! `<root>/<network>/<containerID>+<ifname>.json`,
//! `<root>/.released/<network>+<containerID>+<ifname>.json`, and the per-attachment lock
//! `<root>/.locks/<network>+<containerID>+<ifname>.lock`. `+` cannot occur in a network
//! name or container id (CNI's character rules), so names never collide.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Upstream keeps its plugin state under /var/run/aws-node; ours goes beside it.
pub const DEFAULT_STATE_DIR: &str = "/var/run/aws-node/cni";
/// The variable both binaries read to move it (tests, unusual layouts).
pub const STATE_DIR_ENV: &str = "AWS_CNI_STATE_DIR";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxState {
    pub network_name: String,
    pub container_id: String,
    pub ifname: String,
    pub host_veth: String,
    pub ip: IpAddr,
    /// Route table of the ENI the IP lives on; 254 (main) for the primary ENI.
    pub route_table: u32,
    pub device_number: i32,
    pub netns: String,
    pub pod_namespace: String,
    pub pod_name: String,
}

/// A release ipamd has not been told about yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseRecord {
    pub network_name: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub if_name: String,
    /// The address the plugin believed the pod had; ipamd releases by key and only logs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    /// Unix nanoseconds.
    pub recorded_at: i64,
}

impl ReleaseRecord {
    pub fn file_name(&self) -> String {
        format!(
            "{}+{}+{}.json",
            sanitize(&self.network_name),
            sanitize(&self.container_id),
            sanitize(&self.if_name)
        )
    }
}

/// Runtime-chosen strings kept to one path segment. Validated input passes unchanged.
pub fn sanitize(s: &str) -> String {
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

pub fn network_dir(root: &Path, network: &str) -> PathBuf {
    root.join(sanitize(network))
}

pub fn attachment_file(root: &Path, network: &str, container_id: &str, ifname: &str) -> PathBuf {
    network_dir(root, network).join(format!(
        "{}+{}.json",
        sanitize(container_id),
        sanitize(ifname)
    ))
}

/// The layout before the `+` separator (`<cid>-<ifname>.json`), still read and removed.
pub fn legacy_attachment_file(
    root: &Path,
    network: &str,
    container_id: &str,
    ifname: &str,
) -> PathBuf {
    network_dir(root, network).join(format!(
        "{}-{}.json",
        sanitize(container_id),
        sanitize(ifname)
    ))
}

pub fn released_dir(root: &Path) -> PathBuf {
    root.join(".released")
}

/// The per-attachment lock file, apart from the records so listing them never sees it.
pub fn lock_file(root: &Path, network: &str, container_id: &str, ifname: &str) -> PathBuf {
    root.join(".locks").join(format!(
        "{}+{}+{}.lock",
        sanitize(network),
        sanitize(container_id),
        sanitize(ifname)
    ))
}

/// Read one attachment's record; `Ok(None)` when there is none. An unreadable directory is an
/// error, never "no record".
pub fn read_attachment(
    root: &Path,
    network: &str,
    container_id: &str,
    ifname: &str,
) -> std::io::Result<Option<SandboxState>> {
    for p in [
        attachment_file(root, network, container_id, ifname),
        legacy_attachment_file(root, network, container_id, ifname),
    ] {
        match std::fs::read(&p) {
            Ok(d) => {
                return serde_json::from_slice(&d).map(Some).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: {e}", p.display()),
                    )
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Every attachment record of every network under `root` (ipamd's recovery). A directory
/// that cannot be read, or a record that does not parse, is an error naming it.
pub fn list_attachments(root: &Path) -> std::io::Result<Vec<SandboxState>> {
    let mut out = Vec::new();
    let nets = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for net in nets {
        let net = net?;
        if !net.file_type()?.is_dir() || net.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        for f in std::fs::read_dir(net.path())? {
            let p = f?.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let d = std::fs::read(&p)?;
            out.push(serde_json::from_slice(&d).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", p.display()),
                )
            })?);
        }
    }
    Ok(out)
}
