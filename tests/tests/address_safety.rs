//! A pod's address leaves it only on positive evidence that the pod is gone. The real `ipamd`
//! and `aws-cni` (through libcni) under hostile or unlucky conditions: flooded HTTP ports at a
//! low descriptor limit, corrupt checkpoints, DELs while ipamd is down, a changed veth prefix,
//! ADD racing DEL, an unwritable checkpoint, oversized requests, and a long soak.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use cni_proto::{FailureReason, StatusRequest};
use integration::cloud::eventually;
use integration::cni::CniClient;
use integration::ipamd_proc::{add_req, client, del_req, enis, health, rt, Ipamd};
use integration::netns::Netns;
use integration::sim::http_get;
use integration::{sh, tcp_connect_in, try_sh};
use serde_json::Value;

/// Container ids and addresses in the checkpoint.
fn checkpointed(path: &Path) -> HashMap<String, String> {
    let raw: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    raw["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["containerID"].as_str().unwrap().to_string(),
                a["ipv4"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn cooling(path: &Path) -> HashSet<String> {
    let raw: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    raw["cooldowns"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["ipv4"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Fast sweeps, no grace: any mistake in reading the host shows up within a second.
const EAGER: &[(&str, &str)] = &[
    ("IPAMD_ALLOCATION_GRACE", "0"),
    ("IPAMD_RECONCILE_INTERVAL", "0.2"),
    ("IP_COOLDOWN_PERIOD", "30"),
];

#[test]
fn flooded_http_ports_at_a_low_descriptor_limit_release_nothing() {
    integration::raise_nofile();
    let node = Netns::node("fl");
    let dir = tempfile::tempdir().unwrap();
    // containerd's default for containers: 1,024 descriptors, soft and hard.
    let d = Ipamd::standalone_wrapped(
        dir.path(),
        Some(&node.name),
        "t3.medium",
        &enis(3, 5),
        EAGER,
        &["prlimit", "--nofile=1024:1024"],
    );
    let c = CniClient::new(&node.name, dir.path(), &d.socket);
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("flp")).collect();
    let mut ips = HashMap::new();
    for (i, p) in pods.iter().take(2).enumerate() {
        ips.insert(
            format!("cid{i}"),
            c.add(&format!("cid{i}"), p, &format!("web{i}"), "")
                .unwrap(),
        );
    }

    let (fds_before, _) = d.footprint();
    for (port, what) in [(61678, "metrics"), (61679, "introspection")] {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let conns = tcp_connect_in(&node.name, addr, 1100);
        // Far more than ipamd serves at once; the rest wait in the kernel's queue, where they
        // cost ipamd nothing (before the cap, each took a descriptor until none were left).
        let (fds, _) = d.footprint();
        eprintln!(
            "{what}: {} of 1100 connections open, ipamd holds {fds} descriptors (was {fds_before})",
            conns.len()
        );
        assert!(
            conns.len() > 4 * ipamd::api::http::MAX_CONNECTIONS,
            "{what}: only {} connections",
            conns.len()
        );
        assert!(
            fds <= fds_before + ipamd::api::http::MAX_CONNECTIONS + 8,
            "{what}: ipamd holds {fds} descriptors (was {fds_before})"
        );
        // Several sweeps run while the port is flooded.
        let t0 = d.cpu_ticks();
        std::thread::sleep(Duration::from_secs(2));
        let used = d.cpu_ticks() - t0;
        // 2 s at 100 ticks/s: a spinning accept loop would use ~160 of them.
        assert!(
            used < 50,
            "{what}: ipamd used {used} ticks in 2 s while flooded"
        );
        let now = checkpointed(&d.checkpoint);
        for (cid, ip) in &ips {
            assert_eq!(now.get(cid), Some(ip), "{what}: {cid} lost its address");
        }
        assert!(
            !d.log_text().contains("address released"),
            "{what}: {}",
            d.log_text()
        );
        // The gRPC socket keeps working: a new pod gets an address while the flood holds.
        let cid = format!("new-{port}");
        let ip = c.add(&cid, &pods[2], "late", "").unwrap();
        assert!(!ips.values().any(|v| *v == ip), "{ip} given twice");
        c.ok("del", &cid, &pods[2], "late", "");
        drop(conns);
        // Capped connections time out and the port serves again.
        let url = format!("http://127.0.0.1:{port}/");
        eventually(40, "the port serves again", || {
            // Metrics answers 404 at `/`; introspection lists its commands there.
            matches!(http_get(&node.name, &url).0, 200 | 404).then_some(())
        });
    }
    let (st, body) = http_get(&node.name, "http://127.0.0.1:61678/metrics");
    assert_eq!(st, 200);
    assert!(body.contains("awscni_assigned_ip_addresses 2"), "{body}");
    for (i, p) in pods.iter().take(2).enumerate() {
        c.ok("del", &format!("cid{i}"), p, &format!("web{i}"), "");
    }
}

#[test]
fn the_soft_descriptor_limit_is_raised_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = Ipamd::standalone_wrapped(
        dir.path(),
        None,
        "t3.medium",
        &enis(1, 5),
        &[],
        &["prlimit", "--nofile=1024:4096"],
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid().unwrap())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums, vec!["4096", "4096"], "{line}");
}

const CORRUPT: &[(&str, &str)] = &[
    ("garbage", "\u{1}\u{2}garbage"),
    ("empty", ""),
    ("wrong shape", "[1,2,3]"),
    ("no allocations", r#"{"version":"vpc-cni-ipam/1"}"#),
    (
        "bad first entry",
        r#"{"version":"vpc-cni-ipam/1","allocations":[{"networkName":"aws-cni","containerID":"a","ifName":"eth0","ipv4":"10.0.1.999"},{"networkName":"aws-cni","containerID":"b","ifName":"eth0","ipv4":"10.0.1.12"}]}"#,
    ),
    (
        "torn",
        r#"{"version":"vpc-cni-ipam/1","allocations":[{"networkName":"aws-cni","containerID":"a","ifName":"eth0","ipv4":"10.0.1.11"},{"networkName":"aws-c"#,
    ),
];

#[test]
fn every_corrupt_checkpoint_stops_ipamd_and_stays_unchanged() {
    for (what, body) in CORRUPT {
        let dir = tempfile::tempdir().unwrap();
        let nf = integration::ipamd_proc::node_file(dir.path(), "t3.medium", &enis(1, 5));
        let ck = dir.path().join("ipam.json");
        std::fs::write(&ck, body).unwrap();
        let nf = nf.to_string_lossy().into_owned();
        let out = Ipamd::run_to_exit(
            dir.path(),
            None,
            &[
                ("IPAMD_NODE_FILE", nf.as_str()),
                ("DISABLE_METRICS", "true"),
                ("DISABLE_INTROSPECTION", "true"),
            ],
            &[],
        );
        assert!(!out.status.success(), "{what}: ipamd started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&ck.display().to_string()) && err.contains("ipamd --recover"),
            "{what}: {err}"
        );
        assert_eq!(
            std::fs::read(&ck).unwrap(),
            body.as_bytes(),
            "{what}: file changed"
        );
        assert!(!dir.path().join("ipamd.sock").exists(), "{what}: served");
    }
}

#[test]
fn recover_rebuilds_a_lost_checkpoint_from_the_node() {
    let node = Netns::node("rc");
    let dir = tempfile::tempdir().unwrap();
    let mut d = Ipamd::standalone(dir.path(), Some(&node.name), "t3.medium", &enis(2, 5), &[]);
    let c = CniClient::new(&node.name, dir.path(), &d.socket);
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("rcp")).collect();
    let mut ips = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        ips.push(
            c.add(&format!("cid{i}"), p, &format!("web{i}"), "")
                .unwrap(),
        );
    }
    d.stop();
    // Deleted while ipamd was down: its release is recorded, its host side gone.
    c.ok("del", "cid2", &pods[2], "web2", "");
    // A pod wired by an older plugin: a host route to a veth of ours, no record.
    sh(&[
        "ip",
        "-n",
        &node.name,
        "link",
        "add",
        "eni0ld0000000",
        "type",
        "veth",
        "peer",
        "name",
        "old-peer",
    ]);
    sh(&["ip", "-n", &node.name, "link", "set", "eni0ld0000000", "up"]);
    sh(&[
        "ip",
        "-n",
        &node.name,
        "route",
        "add",
        "10.0.2.15/32",
        "dev",
        "eni0ld0000000",
    ]);
    std::fs::write(&d.checkpoint, b"\x00\x00\x00").unwrap();

    let nf = dir.path().join("node.json").to_string_lossy().into_owned();
    let env = [("IPAMD_NODE_FILE", nf.as_str())];
    let out = Ipamd::run_to_exit(dir.path(), Some(&node.name), &env, &["--recover"]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = checkpointed(&d.checkpoint);
    assert_eq!(got.get("cid0"), Some(&ips[0]), "{report}");
    assert_eq!(got.get("cid1"), Some(&ips[1]), "{report}");
    assert!(!got.contains_key("cid2"), "{report}");
    assert_eq!(
        got.get("recovered-10.0.2.15").map(String::as_str),
        Some("10.0.2.15"),
        "{report}"
    );
    let kept: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("ipam.json.unusable-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "the unusable file is kept");
    assert_eq!(std::fs::read(kept[0].path()).unwrap(), b"\x00\x00\x00");

    // ipamd starts on it; the recovered pods keep their addresses, nobody gets them again.
    let d = Ipamd::standalone(dir.path(), Some(&node.name), "t3.medium", &enis(2, 5), &[]);
    rt().block_on(async {
        let mut cl = client(&d.socket).await;
        let mut seen: HashSet<String> = ips[..2].iter().cloned().collect();
        seen.insert("10.0.2.15".into());
        for i in 0..6 {
            let r = cl
                .add_network(add_req(&format!("new{i}")))
                .await
                .unwrap()
                .into_inner();
            assert!(r.success, "{r:?}");
            let ip = r.ip_allocation_metadata[0].i_pv4_addr.clone();
            assert!(seen.insert(ip.clone()), "{ip} handed out again");
        }
    });
    for (i, p) in pods.iter().take(2).enumerate() {
        c.ok("del", &format!("cid{i}"), p, &format!("web{i}"), "");
    }
}

/// DEL of 3 pods while ipamd is stopped; the 3 addresses are free (cooling) the moment it
/// serves again.
fn dels_while_down(kill: bool) {
    let node = Netns::node("dd");
    let dir = tempfile::tempdir().unwrap();
    let env = [("IP_COOLDOWN_PERIOD", "30")];
    let mut d = Ipamd::standalone(dir.path(), Some(&node.name), "t3.medium", &enis(2, 5), &env);
    let c = CniClient::new(&node.name, dir.path(), &d.socket);
    let pods: Vec<Netns> = (0..4).map(|_| Netns::new("ddp")).collect();
    let mut ips = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        ips.push(
            c.add(&format!("cid{i}"), p, &format!("web{i}"), "")
                .unwrap(),
        );
    }
    if kill {
        d.kill9();
    } else {
        d.stop();
    }
    for (i, p) in pods.iter().take(3).enumerate() {
        c.ok("del", &format!("cid{i}"), p, &format!("web{i}"), "");
    }
    let records = dir.path().join("state/.released");
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 3);

    let d = Ipamd::standalone(dir.path(), Some(&node.name), "t3.medium", &enis(2, 5), &env);
    // Serving now: the checkpoint already holds only the pod that was not deleted.
    let got = checkpointed(&d.checkpoint);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got.get("cid3"), Some(&ips[3]));
    let cool = cooling(&d.checkpoint);
    for ip in &ips[..3] {
        assert!(cool.contains(ip), "{ip} not cooling: {cool:?}");
    }
    assert_eq!(
        std::fs::read_dir(&records).unwrap().count(),
        0,
        "records applied and removed"
    );
    rt().block_on(async {
        let mut cl = client(&d.socket).await;
        let s = cl
            .status(StatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.available_addresses, 10 - 1 - 3);
    });
    c.ok("del", "cid3", &pods[3], "web3", "");
}

#[test]
fn dels_while_ipamd_is_stopped_are_applied_before_it_serves() {
    dels_while_down(false);
}

#[test]
fn dels_while_ipamd_is_killed_are_applied_before_it_serves() {
    dels_while_down(true);
}

#[test]
fn a_changed_veth_prefix_keeps_every_allocation() {
    let node = Netns::node("vp");
    let dir = tempfile::tempdir().unwrap();
    let mut d = Ipamd::standalone(dir.path(), Some(&node.name), "t3.medium", &enis(2, 5), &[]);
    let c = CniClient::new(&node.name, dir.path(), &d.socket);
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("vpp")).collect();
    let mut ips = HashMap::new();
    for (i, p) in pods.iter().enumerate() {
        ips.insert(
            format!("cid{i}"),
            c.add(&format!("cid{i}"), p, &format!("web{i}"), "")
                .unwrap(),
        );
    }
    d.stop();
    let mut env = EAGER.to_vec();
    env.push(("AWS_VPC_K8S_CNI_VETHPREFIX", "abc"));
    let d = Ipamd::standalone(dir.path(), Some(&node.name), "t3.medium", &enis(2, 5), &env);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(checkpointed(&d.checkpoint), ips, "{}", d.log_text());
    // The pods still work and leave cleanly.
    for (i, p) in pods.iter().enumerate() {
        c.ok("del", &format!("cid{i}"), p, &format!("web{i}"), "");
    }
    eventually(5, "every address released", || {
        checkpointed(&d.checkpoint).is_empty().then_some(())
    });
}

#[test]
fn add_and_del_of_one_container_racing_end_consistent() {
    let node = Netns::node("rx");
    let dir = tempfile::tempdir().unwrap();
    let d = Ipamd::standalone(
        dir.path(),
        Some(&node.name),
        "m5.24xlarge",
        &enis(2, 40),
        &[("IP_COOLDOWN_PERIOD", "0")],
    );
    let c = CniClient::new(&node.name, dir.path(), &d.socket);
    let pods: Vec<Netns> = (0..20).map(|_| Netns::new("rxp")).collect();
    let state = dir.path().join("state/aws-cni");
    let mut pairs = 0;
    for round in 0..10 {
        std::thread::scope(|s| {
            for (i, p) in pods.iter().enumerate() {
                let c = &c;
                let cid = format!("cid{i}");
                let name = format!("web{i}");
                s.spawn({
                    let (cid, name) = (cid.clone(), name.clone());
                    move || {
                        let _ = c.run("add", &cid, p, &name, "");
                    }
                });
                s.spawn(move || {
                    if round % 2 == 1 {
                        std::thread::sleep(Duration::from_millis(3));
                    }
                    let _ = c.run("del", &cid, p, &name, "");
                });
            }
        });
        pairs += pods.len();
        // Whatever order each pair ran in, the three views agree.
        let ck = checkpointed(&d.checkpoint);
        let routes = sh(&["ip", "-n", &node.name, "route", "show"]);
        for (i, _) in pods.iter().enumerate() {
            let cid = format!("cid{i}");
            let rec: Option<Value> = std::fs::read(state.join(format!("{cid}+eth0.json")))
                .ok()
                .map(|b| serde_json::from_slice(&b).unwrap());
            match rec {
                Some(r) => {
                    let ip = r["ip"].as_str().unwrap();
                    assert_eq!(
                        ck.get(&cid).map(String::as_str),
                        Some(ip),
                        "round {round}: {cid} wired but ipamd disagrees"
                    );
                    assert!(
                        routes.contains(&format!("{ip} dev")),
                        "round {round}: {cid} has no host route"
                    );
                }
                None => assert!(
                    !ck.contains_key(&cid),
                    "round {round}: {cid} deleted but ipamd still holds {:?}",
                    ck.get(&cid)
                ),
            }
        }
    }
    assert_eq!(pairs, 200);
    // No address is held twice at the end of it all.
    let held: Vec<String> = checkpointed(&d.checkpoint).into_values().collect();
    let distinct: HashSet<&String> = held.iter().collect();
    assert_eq!(distinct.len(), held.len(), "{held:?}");
    for (i, p) in pods.iter().enumerate() {
        c.ok("del", &format!("cid{i}"), p, &format!("web{i}"), "");
    }
    assert!(checkpointed(&d.checkpoint).is_empty());
    assert_eq!(node.links().len(), 0, "{:?}", node.links());
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);
    let locks = dir.path().join("state/.locks");
    assert_eq!(std::fs::read_dir(&locks).map(|d| d.count()).unwrap_or(0), 0);
}

/// A tmpfs of its own, so the test can make it read-only.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn new(at: &Path) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        sh(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=4m",
            "tmpfs",
            at.to_str().unwrap(),
        ]);
        Tmpfs(at.to_path_buf())
    }
    fn remount(&self, opt: &str) {
        sh(&[
            "mount",
            "-o",
            &format!("remount,{opt}"),
            self.0.to_str().unwrap(),
        ]);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = try_sh(&["umount", "-l", self.0.to_str().unwrap()]);
    }
}

#[test]
fn an_unwritable_checkpoint_makes_ipamd_unready_until_it_can_write_again() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::new(&dir.path().join("ck"));
    let ck = fs.0.join("ipam.json");
    let ck_s = ck.to_string_lossy().into_owned();
    let d = Ipamd::standalone(
        dir.path(),
        None,
        "t3.medium",
        &enis(1, 5),
        &[("AWS_VPC_K8S_CNI_BACKING_STORE", ck_s.as_str())],
    );
    rt().block_on(async {
        let mut c = client(&d.socket).await;
        assert!(
            c.add_network(add_req("a"))
                .await
                .unwrap()
                .into_inner()
                .success
        );
        assert_eq!(health(&d.socket).await, "SERVING");
        fs.remount("ro");
        let r = c.add_network(add_req("b")).await.unwrap().into_inner();
        assert!(!r.success);
        assert_eq!(r.reason(), FailureReason::Internal);
        assert!(r.message.contains("ipam.json"), "{}", r.message);
        let mut ready = true;
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if health(&d.socket).await == "NOT_SERVING" {
                ready = false;
                break;
            }
        }
        assert!(
            !ready,
            "readiness stayed SERVING with an unwritable checkpoint"
        );
        fs.remount("rw");
        let mut back = false;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if health(&d.socket).await == "SERVING" {
                back = true;
                break;
            }
        }
        assert!(back, "readiness did not come back with the disk");
    });
    // The write that failed was retried: both allocations are on disk.
    let got = checkpointed(&ck);
    assert!(got.contains_key("a") && got.contains_key("b"), "{got:?}");
}

#[test]
fn a_socket_path_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let nf = integration::ipamd_proc::node_file(dir.path(), "t3.medium", &enis(1, 5));
    let sock = dir.path().join("ipamd.sock");
    std::fs::write(&sock, b"precious").unwrap();
    let nf = nf.to_string_lossy().into_owned();
    let out = Ipamd::run_to_exit(
        dir.path(),
        None,
        &[
            ("IPAMD_NODE_FILE", nf.as_str()),
            ("DISABLE_METRICS", "true"),
            ("DISABLE_INTROSPECTION", "true"),
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a socket"),
        "{out:?}"
    );
    assert_eq!(std::fs::read(&sock).unwrap(), b"precious");
}

#[test]
fn settings_out_of_range_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let nf = integration::ipamd_proc::node_file(dir.path(), "t3.medium", &enis(1, 5));
    let nf = nf.to_string_lossy().into_owned();
    for (var, val) in [
        ("IPAMD_RECONCILE_INTERVAL", "0"),
        ("IPAMD_RECONCILE_INTERVAL", "1e30"),
        ("AWS_VPC_K8S_CNI_VETHPREFIX", "e\nx"),
        ("IPAMD_ALLOCATION_GRACE", "NaN"),
    ] {
        let out = Ipamd::run_to_exit(
            dir.path(),
            None,
            &[("IPAMD_NODE_FILE", nf.as_str()), (var, val)],
            &[],
        );
        assert_eq!(out.status.code(), Some(2), "{var}={val:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(var),
            "{var}: {out:?}"
        );
    }
    // Above 2^32 means "no limit" as upstream reads it, not a wrapped 0.
    let d = Ipamd::standalone(
        dir.path(),
        None,
        "t3.medium",
        &enis(1, 5),
        &[("MAX_ENI", "8589934593")],
    );
    rt().block_on(async {
        let mut c = client(&d.socket).await;
        assert!(
            c.add_network(add_req("a"))
                .await
                .unwrap()
                .into_inner()
                .success
        );
    });
}

#[test]
fn hostile_requests_are_bounded_and_cost_nothing() {
    let node = Netns::node("hr");
    let dir = tempfile::tempdir().unwrap();
    let d = Ipamd::standalone(
        dir.path(),
        Some(&node.name),
        "t3.medium",
        &enis(1, 5),
        &[("IP_COOLDOWN_PERIOD", "30")],
    );
    rt().block_on(async {
        let mut c = client(&d.socket).await;
        let before = c
            .status(StatusRequest::default())
            .await
            .unwrap()
            .into_inner()
            .available_addresses;
        // 3 MB: refused by the transport before it is even decoded.
        let mut huge = add_req("x");
        huge.container_id = "a".repeat(3 << 20);
        let e = c.add_network(huge).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
        for (field, v) in [
            ("container", "a".repeat(2000)),
            ("container", "k/x".into()),
            ("ifname", "eth 0".into()),
            ("ifname", "..".into()),
            ("pod", "x".repeat(300)),
        ] {
            let mut r = add_req("ok");
            match field {
                "container" => r.container_id = v.clone(),
                "ifname" => r.if_name = v.clone(),
                _ => r.k8s_pod_name = v.clone(),
            }
            let reply = c.add_network(r).await.unwrap().into_inner();
            assert_eq!(
                reply.reason(),
                FailureReason::InvalidRequest,
                "{field}={:?}",
                &v[..v.len().min(20)]
            );
            let mut dr = del_req("ok");
            if field == "ifname" {
                dr.if_name = v.clone();
                let reply = c.del_network(dr).await.unwrap().into_inner();
                assert_eq!(reply.failure_reason(), FailureReason::InvalidRequest);
            }
        }
        let after = c
            .status(StatusRequest::default())
            .await
            .unwrap()
            .into_inner()
            .available_addresses;
        assert_eq!(before, after, "refused requests cooled no address down");
        // Free-text DEL reasons cannot mint metric series.
        for i in 0..200 {
            let mut r = del_req("gone");
            r.reason = format!("reason-{i}");
            c.del_network(r).await.unwrap();
        }
    });
    let (st, body) = http_get(&node.name, "http://127.0.0.1:61678/metrics");
    assert_eq!(st, 200);
    let series: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("awscni_del_ip_req_count{"))
        .collect();
    assert!(
        series.contains(&r#"awscni_del_ip_req_count{reason="other"} 200"#),
        "{series:?}"
    );
    assert!(series.len() <= 2 && !body.contains("reason-"), "{series:?}");
    assert!(
        !d.log_text().contains("reason-7"),
        "free-text reasons stay out of the log"
    );
}

#[test]
fn cooldown_past_the_wait_bound_says_when_an_address_comes_free() {
    let dir = tempfile::tempdir().unwrap();
    let d = Ipamd::standalone(
        dir.path(),
        None,
        "t3.nano",
        &enis(1, 2),
        &[("IP_COOLDOWN_PERIOD", "30")],
    );
    rt().block_on(async {
        let mut c = client(&d.socket).await;
        for i in 0..2 {
            assert!(
                c.add_network(add_req(&format!("p{i}")))
                    .await
                    .unwrap()
                    .into_inner()
                    .success
            );
        }
        c.del_network(del_req("p0")).await.unwrap();
        let t = Instant::now();
        let r = c.add_network(add_req("p2")).await.unwrap().into_inner();
        assert!(!r.success);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "refused without waiting 30 s"
        );
        assert!(r.message.contains("leaves cooldown in"), "{}", r.message);
    });
}

#[test]
fn files_are_private_and_planted_temp_names_are_ignored() {
    let node = Netns::node("pf");
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("ipam.tmp")).unwrap();
    let d = Ipamd::standalone(dir.path(), Some(&node.name), "t3.medium", &enis(1, 5), &[]);
    let c = CniClient::new(&node.name, dir.path(), &d.socket);
    let pod = Netns::new("pfp");
    c.add("cid0", &pod, "web0", "").unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.checkpoint), 0o600);
    assert_eq!(mode(&d.log), 0o600);
    assert_eq!(mode(&dir.path().join("plugin.log")), 0o600);
    assert_eq!(
        mode(&dir.path().join("state/aws-cni/cid0+eth0.json")),
        0o600
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    assert!(!std::fs::symlink_metadata(&d.checkpoint)
        .unwrap()
        .file_type()
        .is_symlink());
    // The plugin's log holds its own events, not every HTTP/2 frame under them.
    let plog = std::fs::read_to_string(dir.path().join("plugin.log")).unwrap();
    assert!(plog.contains("ipamd assigned address"), "{plog}");
    assert!(!plog.contains("\"target\":\"h2"), "library frames logged");
    assert!(plog.len() < 4096, "{} bytes for one ADD", plog.len());
    c.ok("del", "cid0", &pod, "web0", "");
}

#[test]
fn soak_10000_add_del_keeps_descriptors_and_memory_flat() {
    let base = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm")
    } else {
        tempfile::tempdir()
    };
    let dir = base.unwrap();
    let d = Ipamd::standalone(
        dir.path(),
        None,
        "m5.24xlarge",
        &enis(2, 40),
        &[
            ("IP_COOLDOWN_PERIOD", "0"),
            ("AWS_VPC_K8S_CNI_LOGLEVEL", "WARN"),
        ],
    );
    let socket = d.socket.clone();
    const TASKS: usize = 8;
    let round = |from: usize, to: usize| {
        rt().block_on(async {
            let mut hs = Vec::new();
            for t in 0..TASKS {
                let socket = socket.clone();
                hs.push(tokio::spawn(async move {
                    let mut c = client(&socket).await;
                    for i in (from..to).filter(|i| i % TASKS == t) {
                        let cid = format!("soak{i}");
                        let r = c.add_network(add_req(&cid)).await.unwrap().into_inner();
                        assert!(r.success, "{r:?}");
                        let r = c.del_network(del_req(&cid)).await.unwrap().into_inner();
                        assert!(r.success, "{r:?}");
                    }
                }));
            }
            for h in hs {
                h.await.unwrap();
            }
        })
    };
    round(0, 1000);
    let (fds0, rss0) = d.footprint();
    round(1000, 10_000);
    let (fds1, rss1) = d.footprint();
    eprintln!("soak: fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} kB");
    assert!(fds1 <= fds0 + 2, "descriptors grew: {fds0} -> {fds1}");
    assert!(rss1 <= rss0 + 4096, "RSS grew: {rss0} -> {rss1} kB");
    assert!(checkpointed(&d.checkpoint).is_empty());
}

#[test]
fn full_logs_rotate_at_upstreams_size() {
    // A log already at 100 MB (sparse: no disk is spent) is rotated when the binary opens it.
    let full = 100 * 1024 * 1024 + 1;
    let node = Netns::node("lr");
    let dir = tempfile::tempdir().unwrap();
    for name in ["ipamd.log", "plugin.log"] {
        std::fs::File::create(dir.path().join(name))
            .unwrap()
            .set_len(full)
            .unwrap();
    }
    let d = Ipamd::standalone(dir.path(), Some(&node.name), "t3.medium", &enis(1, 5), &[]);
    let c = CniClient::new(&node.name, dir.path(), &d.socket);
    let pod = Netns::new("lrp");
    c.add("cid0", &pod, "web0", "").unwrap();
    c.ok("del", "cid0", &pod, "web0", "");
    for name in ["ipamd.log", "plugin.log"] {
        let old = dir.path().join(format!("{name}.1"));
        let new = dir.path().join(name);
        assert_eq!(
            std::fs::metadata(&old).map(|m| m.len()).unwrap_or(0),
            full,
            "{name}.1"
        );
        let len = std::fs::metadata(&new).unwrap().len();
        assert!(
            len > 0 && len < 1024 * 1024,
            "{name}: {len} bytes after rotation"
        );
        assert_eq!(
            std::fs::metadata(&new).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
