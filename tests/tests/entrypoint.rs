//! The aws-node entrypoint (`aws-vpc-cni`): bad environments refused with the variable named,
//! and the conflist written only once ipamd can allocate an address; the probes.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration::vpc::Vpc;
use serde_json::{json, Value};

#[test]
fn bad_environment_is_refused_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    for (var, val) in [
        ("AWS_VPC_K8S_CNI_VETHPREFIX", "vlan"),
        ("POD_MTU", "100"),
        ("AWS_VPC_ENI_MTU", "lots"),
        ("ENABLE_IPv6", "true"),
        ("ENABLE_POD_ENI", "true"),
        ("NETWORK_POLICY_ENFORCING_MODE", "audit"),
    ] {
        let out = Command::new(integration::bin("aws-vpc-cni"))
            .env_clear()
            .env(var, val)
            .env("HOST_CNI_BIN_PATH", dir.path().join("bin"))
            .env("HOST_CNI_CONFDIR_PATH", dir.path().join("net.d"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{var}=")), "{var}: {err}");
        assert!(!dir.path().join("bin").exists(), "nothing installed");
    }
}

#[test]
fn conflist_appears_only_once_an_address_can_be_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = Vpc::start(dir.path(), 0);
    let inst = vpc.shim.instance("t3.medium", "10.0.1.0/24");
    // The first refill takes 3 s: ipamd answers gRPC long before it holds an address.
    vpc.shim.fault(
        json!({"action": "AssignPrivateIpAddresses", "kind": "latency",
                          "latency_ms": 3000, "count": 1}),
    );
    let node = vpc.add_node(dir.path(), &inst, 0);
    let host = dir.path().join("host");
    let socket = dir.path().join("ipamd.sock");
    let mut env = node.env(&[]);
    env.extend([
        ("IPAMD_SOCKET_PATH".into(), socket.display().to_string()),
        (
            "AWS_VPC_K8S_CNI_BACKING_STORE".into(),
            dir.path().join("ipam.json").display().to_string(),
        ),
        (
            "AWS_VPC_K8S_CNI_LOG_FILE".into(),
            dir.path().join("ipamd.log").display().to_string(),
        ),
        (
            "HOST_CNI_BIN_PATH".into(),
            host.join("bin").display().to_string(),
        ),
        (
            "HOST_CNI_CONFDIR_PATH".into(),
            host.join("net.d").display().to_string(),
        ),
        ("POD_MTU".into(), "8000".into()),
    ]);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node.ns.name])
        .arg(integration::bin("aws-vpc-cni"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let conflist = host.join("net.d/10-aws.conflist");
    let probe = |live: bool| {
        let mut c = Command::new(integration::bin("aws-vpc-cni"));
        c.arg("probe")
            .env("IPAMD_SOCKET_PATH", &socket)
            .stderr(Stdio::null());
        if live {
            c.arg("--live");
        }
        c.status().unwrap().success()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut saw_answering_without_conflist = false;
    loop {
        assert!(Instant::now() < deadline, "no conflist");
        let had = conflist.exists();
        let ready = probe(false);
        if had {
            assert!(ready, "conflist written before ipamd could allocate");
            break;
        }
        if !ready && probe(true) {
            saw_answering_without_conflist = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        saw_answering_without_conflist,
        "ipamd answered before it could allocate"
    );
    assert!(probe(false), "ready once the conflist is there");
    let v: Value = serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
    assert_eq!(v["plugins"][0]["type"], "aws-cni");
    assert_eq!(v["plugins"][0]["mtu"], "8000");
    assert_eq!(v["plugins"][1]["type"], "portmap");
    let bin = host.join("bin/aws-cni");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&bin).unwrap().permissions().mode() & 0o111,
        0o111
    );
    // SIGTERM reaches ipamd through the entrypoint: both exit.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        assert!(Instant::now() < deadline, "entrypoint did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!probe(true), "ipamd stopped with it");
    drop(node);
}
