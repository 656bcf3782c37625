//! Running the real `ipamd` binary for a test, and talking to it over its socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cni_proto::cni_backend_client::CniBackendClient;
use tonic::transport::Channel;

pub struct Ipamd {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub checkpoint: PathBuf,
    pub log: PathBuf,
}

impl Ipamd {
    /// Start ipamd with `env` (plus socket, checkpoint and log paths under `dir`), optionally
    /// inside network namespace `netns`, and wait until its socket accepts connections.
    pub fn start(dir: &Path, netns: Option<&str>, env: &[(&str, &str)]) -> Ipamd {
        Ipamd::start_wrapped(dir, netns, env, &[])
    }

    /// As [`Ipamd::start`], run through `wrapper` (e.g. `prlimit --nofile=1024:1024`).
    pub fn start_wrapped(
        dir: &Path,
        netns: Option<&str>,
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Ipamd {
        let mut d = Ipamd::spawn(dir, netns, env, wrapper);
        d.wait_ready();
        d
    }

    /// Start ipamd without waiting for its socket (many at once; then [`Ipamd::wait_ready`]).
    /// It dies with the calling thread.
    pub fn spawn(dir: &Path, netns: Option<&str>, env: &[(&str, &str)], wrapper: &[&str]) -> Ipamd {
        Ipamd::spawn_bin(&crate::bin("ipamd"), dir, netns, env, wrapper)
    }

    /// As [`Ipamd::spawn`], of the ipamd binary at `bin` (the bench compares two builds).
    pub fn spawn_bin(
        bin: &Path,
        dir: &Path,
        netns: Option<&str>,
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Ipamd {
        let mut cmd = Ipamd::command(bin, dir, netns, env, wrapper);
        let child = crate::die_with_parent(&mut cmd)
            .spawn()
            .expect("spawn ipamd");
        Ipamd {
            child: Some(child),
            socket: dir.join("ipamd.sock"),
            checkpoint: dir.join("ipam.json"),
            log: dir.join("ipamd.log"),
        }
    }

    /// Run ipamd expecting it to stop by itself (a refusal to start): its output. Panics if it
    /// is still running after 20 s.
    pub fn run_to_exit(
        dir: &Path,
        netns: Option<&str>,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> std::process::Output {
        let mut cmd = Ipamd::command(&crate::bin("ipamd"), dir, netns, env, &[]);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = crate::die_with_parent(&mut cmd)
            .spawn()
            .expect("spawn ipamd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return child.wait_with_output().expect("ipamd output");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("ipamd did not exit");
    }

    fn command(
        bin: &Path,
        dir: &Path,
        netns: Option<&str>,
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Command {
        let socket = dir.join("ipamd.sock");
        let checkpoint = dir.join("ipam.json");
        let log = dir.join("ipamd.log");
        let mut argv: Vec<std::ffi::OsString> = wrapper.iter().map(|a| a.into()).collect();
        if let Some(ns) = netns {
            argv.extend(["ip", "netns", "exec", ns].map(std::ffi::OsString::from));
        }
        argv.push(bin.as_os_str().to_owned());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("IPAMD_SOCKET_PATH", &socket)
            .env("AWS_VPC_K8S_CNI_BACKING_STORE", &checkpoint)
            .env("AWS_VPC_K8S_CNI_LOG_FILE", &log)
            .env("AWS_VPC_K8S_CNI_LOGLEVEL", "DEBUG")
            // The plugin's records (and release records) of this test, never the machine's.
            .env("AWS_CNI_STATE_DIR", dir.join("state"));
        if netns.is_none() {
            // Outside a namespace of its own, ipamd would listen on the machine's ports.
            cmd.env("DISABLE_METRICS", "true")
                .env("DISABLE_INTROSPECTION", "true");
        }
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        cmd
    }

    /// Standalone ipamd (no cloud): `enis` written to a node file of `instance_type`.
    pub fn standalone(
        dir: &Path,
        netns: Option<&str>,
        instance_type: &str,
        enis: &[(u32, String, Vec<String>)],
        env: &[(&str, &str)],
    ) -> Ipamd {
        Ipamd::standalone_wrapped(dir, netns, instance_type, enis, env, &[])
    }

    /// As [`Ipamd::standalone`], run through `wrapper`.
    pub fn standalone_wrapped(
        dir: &Path,
        netns: Option<&str>,
        instance_type: &str,
        enis: &[(u32, String, Vec<String>)],
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Ipamd {
        let nf = node_file(dir, instance_type, enis);
        let nf = nf.to_string_lossy().into_owned();
        let mut all = vec![("IPAMD_NODE_FILE", nf.as_str())];
        all.extend_from_slice(env);
        Ipamd::start_wrapped(dir, netns, &all, wrapper)
    }

    /// Open descriptors and resident memory (kB) of the running ipamd.
    pub fn footprint(&self) -> (usize, u64) {
        let pid = self.pid().expect("running");
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0);
        let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        (fds, rss)
    }

    /// CPU time (user + system) used so far, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let pid = self.pid().expect("running");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may contain spaces) start at ") ".
        let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        n(11) + n(12)
    }

    /// Wait (up to `secs`) until the socket accepts connections; panics with the log if
    /// ipamd exits first.
    pub fn wait_ready_for(&mut self, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("ipamd exited early with {st}; log:\n{}", self.log_text());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("ipamd did not come up; log:\n{}", self.log_text());
    }

    fn wait_ready(&mut self) {
        self.wait_ready_for(20);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        crate::terminate(self.child.take());
    }
}

impl Drop for Ipamd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An AddNetwork as the plugin sends it for pod `pod-<cid>` in `default`.
pub fn add_req(cid: &str) -> cni_proto::AddNetworkRequest {
    cni_proto::AddNetworkRequest {
        client_version: "0.1.0".into(),
        k8s_pod_name: format!("pod-{cid}"),
        k8s_pod_namespace: "default".into(),
        container_id: cid.into(),
        if_name: "eth0".into(),
        network_name: "aws-cni".into(),
        netns: "/var/run/netns/x".into(),
        ..Default::default()
    }
}

pub fn del_req(cid: &str) -> cni_proto::DelNetworkRequest {
    cni_proto::DelNetworkRequest {
        client_version: "0.1.0".into(),
        container_id: cid.into(),
        if_name: "eth0".into(),
        network_name: "aws-cni".into(),
        reason: "PodDeleted".into(),
        ..Default::default()
    }
}

/// Run a future to completion on a throwaway runtime (usable inside polling closures).
pub fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// A two-thread runtime for tests that drive ipamd's socket.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

pub async fn channel(socket: &Path) -> Channel {
    cni_common::grpc::connect(socket, Duration::from_secs(5), Duration::from_secs(60))
        .await
        .expect("connect to ipamd")
}

pub async fn client(socket: &Path) -> CniBackendClient<Channel> {
    CniBackendClient::new(channel(socket).await)
}

/// Readiness: grpc.health.v1 status of "rpc.CNIBackend" ("SERVING", "NOT_SERVING", ...).
pub async fn health(socket: &Path) -> String {
    health_of(socket, cni_proto::health::READY).await
}

/// grpc.health.v1 status of `service`.
pub async fn health_of(socket: &Path, service: &str) -> String {
    use tonic_health::pb::health_client::HealthClient;
    let mut h = HealthClient::new(channel(socket).await);
    let r = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .expect("health check")
        .into_inner();
    r.status().as_str_name().to_string()
}

/// A node file for standalone ipamd: `enis` of (device number, primary IP, secondary IPs).
pub fn node_file(dir: &Path, instance_type: &str, enis: &[(u32, String, Vec<String>)]) -> PathBuf {
    let p = dir.join("node.json");
    let enis: Vec<_> = enis
        .iter()
        .map(|(dev, pip, ips)| {
            serde_json::json!({
                "id": format!("eni-{dev:04}"),
                "deviceNumber": dev,
                "subnetCidr": "10.0.0.0/16",
                "primaryIp": pip,
                "ips": ips,
            })
        })
        .collect();
    std::fs::write(
        &p,
        serde_json::json!({
            "instanceId": "i-0123456789abcdef0",
            "instanceType": instance_type,
            "vpcCidrs": ["10.0.0.0/16"],
            "enis": enis,
        })
        .to_string(),
    )
    .unwrap();
    p
}

/// `n` ENIs, each with a primary IP and `per` secondary IPs, from 10.0.<dev+1>.x.
pub fn enis(n: u32, per: u32) -> Vec<(u32, String, Vec<String>)> {
    (0..n)
        .map(|d| {
            (
                d,
                format!("10.0.{}.10", d + 1),
                (0..per)
                    .map(|i| format!("10.0.{}.{}", d + 1, 11 + i))
                    .collect(),
            )
        })
        .collect()
}
