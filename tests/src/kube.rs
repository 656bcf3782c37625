//! The Kubernetes API for tests: `tests/rig/kube_api.py` (an emulator over HTTPS with a token,
//! see tests/rig/README.md), driven through Debian's `kubectl` (an independent client) and its
//! `/_emu/` controls (outage, denied permissions, request counts).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct KubeApi {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
}

impl KubeApi {
    /// Start the emulator with its files (CA, token, kubeconfig) under `dir/kube`.
    pub fn start(dir: &Path) -> KubeApi {
        let kdir = dir.join("kube");
        std::fs::create_dir_all(&kdir).expect("kube dir");
        let ready = kdir.join("port");
        let _ = std::fs::remove_file(&ready);
        let log = kdir.join("requests.log");
        let mut cmd = Command::new(crate::cloud::python());
        cmd.arg(crate::cloud::repo_root().join("tests/rig/kube_api.py"))
            .args(["--port", "0", "--dir"])
            .arg(&kdir)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--log")
            .arg(&log);
        let stderr = std::fs::File::create(kdir.join("kube-api.err")).expect("kube-api log");
        let mut child = crate::die_with_parent(&mut cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn kube_api.py");
        crate::cloud::record_pid(dir, child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&ready)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break p;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "kube_api.py exited with {st}:\n{}",
                    std::fs::read_to_string(kdir.join("kube-api.err")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "kube_api.py did not come up");
            std::thread::sleep(Duration::from_millis(50));
        };
        KubeApi {
            child: Some(child),
            port,
            kubeconfig: kdir.join("kubeconfig"),
            dir: kdir,
        }
    }

    /// ipamd's environment for this API server on node `node_name`.
    pub fn env(&self, node_name: &str) -> Vec<(String, String)> {
        vec![
            ("KUBECONFIG".into(), self.kubeconfig.display().to_string()),
            ("MY_NODE_NAME".into(), node_name.into()),
        ]
    }

    /// `kubectl` against this server; its output, or its error text.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--request-timeout=10s")
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("kubectl: {e}"))?;
        if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
            let _ = w.write_all(text.as_bytes());
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Create or update objects (JSON or YAML), as `kubectl apply` does.
    pub fn apply(&self, obj: &Value) {
        self.kubectl(
            &["apply", "--validate=false", "-f", "-"],
            Some(&obj.to_string()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn get(&self, args: &[&str]) -> Value {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend(["-o", "json"]);
        let out = self.kubectl(&a, None).unwrap_or_else(|e| panic!("{e}"));
        serde_json::from_str(&out).unwrap_or(Value::Null)
    }

    pub fn node(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        self.apply(&json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels},
        }));
    }

    pub fn label_node(&self, name: &str, label: &str) {
        self.kubectl(&["label", "node", name, label, "--overwrite"], None)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn eniconfig(&self, name: &str, subnet: &str, security_groups: &[&str]) {
        self.apply(&json!({
            "apiVersion": "crd.k8s.amazonaws.com/v1alpha1", "kind": "ENIConfig",
            "metadata": {"name": name},
            "spec": {"subnet": subnet, "securityGroups": security_groups},
        }));
    }

    pub fn pod(&self, namespace: &str, name: &str, node: &str) {
        self.apply(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "pause"}]},
        }));
    }

    /// A pod's annotation; None also while the server does not answer.
    pub fn annotation(&self, namespace: &str, pod: &str, key: &str) -> Option<String> {
        let out = self
            .kubectl(&["get", "pod", "-n", namespace, pod, "-o", "json"], None)
            .ok()?;
        let p: Value = serde_json::from_str(&out).ok()?;
        p["metadata"]["annotations"][key]
            .as_str()
            .map(str::to_string)
    }

    /// Warning and Normal events in every namespace: (reason, message).
    pub fn events(&self) -> Vec<(String, String)> {
        self.get(&["events", "-A"])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|e| {
                (
                    e["reason"].as_str().unwrap_or("").to_string(),
                    e["message"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// One of the emulator's controls (`/_emu/...`), through curl with the emulator's CA.
    pub fn admin(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("https://127.0.0.1:{}{path}", self.port);
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "120", "-X", method, "--cacert"])
            .arg(self.dir.join("ca.crt"))
            .args([
                "-H",
                "Content-Type: application/json",
                "-d",
                &body.to_string(),
                &url,
            ])
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "{method} {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// The API server goes away for `secs` (connections refused, watches cut), state kept.
    pub fn outage(&self, secs: u64) {
        self.admin("POST", "/_emu/outage", json!({"seconds": secs}));
    }

    /// Requests for `verb` on `resource` get 403, as RBAC without that rule would answer.
    pub fn deny(&self, verb: &str, resource: &str) {
        self.admin(
            "POST",
            "/_emu/deny",
            json!({"verb": verb, "resource": resource}),
        );
    }

    pub fn allow_all(&self) {
        self.admin("DELETE", "/_emu/deny", json!({}));
    }

    /// Requests served so far, by "verb resource" (e.g. "watch eniconfigs").
    pub fn requests(&self) -> Value {
        self.admin("GET", "/_emu/requests", json!({}))["counts"].clone()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        crate::terminate(self.child.take());
    }
}
