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

    /// Set `key` in the conflist's aws-cni entry.
    pub fn set_plugin_field(&self, key: &str, value: Value) {
        let mut cl: Value =
            serde_json::from_slice(&std::fs::read(&self.conflist).expect("conflist"))
                .expect("json");
        cl["plugins"][0][key] = value;
        std::fs::write(&self.conflist, cl.to_string()).expect("write");
    }

    /// Chain `egress-cni` after `aws-cni` as the entrypoint writes it (upstream's entry):
    /// egress of the other family for every pod, SNAT to `node_ip` (its family picks the
    /// direction), node-local addresses kept under `dir`.
    pub fn chain_egress(&self, dir: &Path, node_ip: &str) {
        let link = self.bindir.join("egress-cni");
        if !link.exists() {
            std::os::unix::fs::symlink(crate::bin("egress-cni"), link).expect("symlink egress");
        }
        let v6 = node_ip.contains(':');
        let (subnet, dst) = if v6 {
            ("fd00::ac:00/118", "::/0")
        } else {
            ("169.254.172.0/22", "0.0.0.0/0")
        };
        let mut cl: Value =
            serde_json::from_slice(&std::fs::read(&self.conflist).expect("conflist"))
                .expect("json");
        if let Some(p) = cl["plugins"].as_array_mut() {
            p.retain(|e| e["type"] != "egress-cni");
            p.insert(
                1,
                json!({
                    "name": "egress-cni", "type": "egress-cni", "mtu": "9001", "enabled": "true",
                    "randomizeSNAT": "prng", "nodeIP": node_ip,
                    "ipam": {
                        "type": "host-local", "ranges": [[{"subnet": subnet}]],
                        "routes": [{"dst": dst}], "dataDir": dir.join("egress-ipam"),
                    },
                    "pluginLogFile": dir.join("egress.log"), "pluginLogLevel": "DEBUG",
                }),
            );
        }
        std::fs::write(&self.conflist, cl.to_string()).expect("write");
    }

    /// Point the chain's `aws-cni` at another build of it (the benchmark measures the shipped,
    /// LTO-built plugin, not the rig's quicker build).
    pub fn use_plugin(&self, plugin: &Path) {
        let link = self.bindir.join("aws-cni");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(plugin, link).expect("symlink plugin");
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

/// A long-running libcni runtime (`cniclient serve`) in the node's namespace: requests go in
/// as JSON lines and run concurrently; each reply carries the libcni call's own time.
pub struct CniServer {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    replies: std::sync::mpsc::Receiver<Value>,
    next: u64,
}

impl CniServer {
    pub fn start(c: &CniClient) -> CniServer {
        use std::io::BufRead;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &c.node])
            .arg(crate::cniclient())
            .arg("serve")
            .arg(&c.conflist)
            .arg(&c.bindir)
            .arg(&c.cache)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start cniclient serve");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, replies) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        CniServer {
            child,
            stdin,
            replies,
            next: 0,
        }
    }

    /// Start `cmd` for each (container id, pod netns, pod name) at once; each one's
    /// milliseconds, in the order given. Panics on a failed call.
    pub fn run(&mut self, cmd: &str, calls: &[(String, &Netns, String)]) -> Vec<f64> {
        use std::io::Write;
        let first = self.next;
        let mut batch = String::new();
        for (cid, ns, pod) in calls {
            batch.push_str(
                &json!({"id": self.next, "cmd": cmd, "cid": cid, "netns": ns.path(),
                        "ifname": "eth0", "podns": "default", "pod": pod})
                .to_string(),
            );
            batch.push('\n');
            self.next += 1;
        }
        self.stdin.write_all(batch.as_bytes()).expect("request");
        self.stdin.flush().expect("flush");
        let mut ms = vec![0.0; calls.len()];
        for _ in 0..calls.len() {
            let r = self
                .replies
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("reply from cniclient serve");
            assert!(r["ok"].as_bool().unwrap_or(false), "{cmd}: {r}");
            let i = (r["id"].as_u64().unwrap_or(0) - first) as usize;
            ms[i] = r["ms"].as_f64().unwrap_or(0.0);
        }
        ms
    }
}

impl Drop for CniServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
