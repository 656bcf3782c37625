//! Network namespaces that are deleted when the guard drops, panics included.

use crate::{sh, try_sh, unique};

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        sh(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// A node: [`crate::NODE_IP`] on its loopback and IPv4 forwarding on, as a pod host needs.
    pub fn node(prefix: &str) -> Netns {
        let ns = Netns::new(prefix);
        sh(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{}/32", crate::NODE_IP),
            "dev",
            "lo",
        ]);
        ns.enable_forwarding();
        ns
    }

    /// IPv4 forwarding on, as a node that routes for its pods needs.
    pub fn enable_forwarding(&self) {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Links in this namespace other than loopback.
    /// The links besides `lo`, once host veths the plugin retired at DEL are gone: ipamd
    /// deletes those within seconds, and one left after 15 s fails the test.
    pub fn links(&self) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let now = self.links_now();
            let retired: Vec<&String> = now
                .iter()
                .filter(|n| n.starts_with(cni_common::naming::RETIRED_NAME_PREFIX))
                .collect();
            if retired.is_empty() {
                return now;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "retired host veths not deleted within 15 s: {retired:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// The links besides `lo`, as they are now.
    pub fn links_now(&self) -> Vec<String> {
        crate::ip_json(&self.name, &["link", "show"])
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l["ifname"].as_str().map(str::to_string))
                    .filter(|n| n != "lo")
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Policy rules other than the kernel's three defaults.
    pub fn rules(&self) -> Vec<serde_json::Value> {
        crate::ip_json(&self.name, &["rule", "show"])
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| !matches!(r["priority"].as_u64(), Some(0) | Some(32766) | Some(32767)))
            .collect()
    }

    /// Routes in the main table.
    pub fn routes(&self) -> Vec<serde_json::Value> {
        crate::ip_json(&self.name, &["route", "show"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        try_sh(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = try_sh(&["ip", "netns", "del", &self.name]);
    }
}
