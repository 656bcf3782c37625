//! The libcni-based client (tests/cniclient) driving a conflist like upstream's 10-aws.conflist:
//! `aws-cni` then Debian's `portmap`, exactly as a container runtime would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::netns::Netns;

pub struct CniClient {
    /// The node's namespace (where the runtime would run the plugins).
    pub node: String,
    pub conflist: PathBuf,
    pub bindir: PathBuf,
    pub cache: PathBuf,
}

impl CniClient {
    /// The conflist `aws-cni` + `portmap` under `dir`, pointed at ipamd's `socket`.
    pub fn new(node: &str, dir: &Path, socket: &Path) -> CniClient {
        let bindir = dir.join("bin");
        std::fs::create_dir_all(&bindir).expect("mkdir bin");
        for (name, target) in [
            ("aws-cni", crate::bin("aws-cni")),
            ("portmap", PathBuf::from("/usr/lib/cni/portmap")),
        ] {
            let link = bindir.join(name);
            if !link.exists() {
                std::os::unix::fs::symlink(target, link).expect("symlink plugin");
            }
        }
        let conflist = dir.join("10-aws.conflist");
        std::fs::write(
            &conflist,
            json!({
                "cniVersion": "1.0.0",
                "name": "aws-cni",
                "disableCheck": false,
                "plugins": [
                    {
                        "name": "aws-cni", "type": "aws-cni", "vethPrefix": "eni", "mtu": "9001",
                        "podSGEnforcingMode": "strict",
                        "pluginLogFile": dir.join("plugin.log"), "pluginLogLevel": "DEBUG",
                        "ipamdSocket": socket, "stateDir": dir.join("state"),
                    },
                    { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true }
                ]
            })
            .to_string(),
        )
        .expect("write conflist");
        CniClient {
            node: node.to_string(),
            conflist,
            bindir,
            cache: dir.join("cache"),
        }
    }

    /// The same client with only the conflist's first plugin (CHECK of aws-cni alone).
    pub fn first_plugin_only(&self, dir: &Path) -> CniClient {
        let only = dir.join("check.conflist");
        let mut cl: Value =
            serde_json::from_slice(&std::fs::read(&self.conflist).expect("conflist"))
                .expect("json");
        if let Some(p) = cl["plugins"].as_array_mut() {
            p.truncate(1);
        }
        std::fs::write(&only, cl.to_string()).expect("write");
        CniClient {
            node: self.node.clone(),
            conflist: only,
            bindir: self.bindir.clone(),
            cache: self.cache.clone(),
        }
    }

    pub fn run(&self, cmd: &str, cid: &str, pod: &Netns, name: &str, ports: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.node])
            .arg(crate::cniclient())
            .arg(cmd)
            .arg(&self.conflist)
            .arg(&self.bindir)
            .arg(&self.cache)
            .args([cid, &pod.path(), "eth0", "default", name, ports])
            .output()
            .expect("run cniclient")
    }

    /// Run and require success; the plugin chain's stdout.
    pub fn ok(&self, cmd: &str, cid: &str, pod: &Netns, name: &str, ports: &str) -> String {
        let out = self.run(cmd, cid, pod, name, ports);
        assert!(
            out.status.success(),
            "{cmd} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// ADD: the pod's IP, or the runtime's error text.
    pub fn add(&self, cid: &str, pod: &Netns, name: &str, ports: &str) -> Result<String, String> {
        let out = self.run("add", cid, pod, name, ports);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        Ok(crate::result_ip(&v))
    }
}
