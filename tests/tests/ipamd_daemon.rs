//! The real `ipamd` binary driven through its real unix socket: allocation, cooldown, health,
//! refusals with reasons, checkpoint durability across kill -9, and restore rules.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use cni_proto::{FailureReason, StatusRequest};
use integration::ipamd_proc::{add_req, client, del_req, enis, health, health_of, rt, Ipamd};
use integration::netns::Netns;

#[test]
fn allocates_releases_and_reports_through_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    // t3.medium-like: 3 ENIs x 5 secondary IPs.
    let d = Ipamd::standalone(
        dir.path(),
        None,
        "t3.medium",
        &enis(3, 5),
        &[("IP_COOLDOWN_PERIOD", "2")],
    );
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    rt().block_on(async {
        assert_eq!(health(&d.socket).await, "SERVING");
        let mut c = client(&d.socket).await;
        let r = c.add_network(add_req("a")).await.unwrap().into_inner();
        assert!(r.success, "{r:?}");
        assert_eq!(r.vp_cv4_cid_rs, vec!["10.0.0.0/16".to_string()]);
        let ip = r.ip_allocation_metadata[0].clone();
        let again = c.add_network(add_req("a")).await.unwrap().into_inner();
        assert_eq!(
            again.ip_allocation_metadata[0], ip,
            "repeated AddNetwork gives the same IP"
        );
        if ip.device_number == 0 {
            assert_eq!(ip.route_table_id, 254);
        } else {
            assert_eq!(ip.route_table_id, ip.device_number + 1);
        }

        // Fill the pool: 15 addresses in all.
        let mut seen = HashSet::from([ip.i_pv4_addr.clone()]);
        for i in 1..15 {
            let r = c
                .add_network(add_req(&format!("p{i}")))
                .await
                .unwrap()
                .into_inner();
            assert!(r.success, "{r:?}");
            assert!(
                seen.insert(r.ip_allocation_metadata[0].i_pv4_addr.clone()),
                "duplicate address"
            );
        }
        let r = c.add_network(add_req("p15")).await.unwrap().into_inner();
        assert!(!r.success);
        assert_eq!(r.reason(), FailureReason::PoolEmpty);
        assert!(
            r.message.contains("pool empty") && r.message.contains("t3.medium"),
            "{}",
            r.message
        );
        assert_eq!(health(&d.socket).await, "NOT_SERVING");
        // What upstream's probes ask for (liveness and readiness alike) stays SERVING: an
        // empty pool must not get aws-node restarted.
        for name in cni_proto::health::LIVE {
            assert_eq!(health_of(&d.socket, name).await, "SERVING", "{name:?}");
        }
        let s = c
            .status(StatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(!s.ready);
        assert_eq!(s.reason(), FailureReason::PoolEmpty);

        // Release: the address cools down before it can be reused. At the ceiling an ADD
        // whose only obstacle is cooldown waits for it (2 s here, within the 10 s bound).
        let r = c.del_network(del_req("a")).await.unwrap().into_inner();
        assert!(r.success);
        assert_eq!(r.ip_allocation_metadata[0].i_pv4_addr, ip.i_pv4_addr);
        assert_eq!(
            health(&d.socket).await,
            "NOT_SERVING",
            "cooling addresses are not available"
        );
        let r = c
            .del_network(del_req("never-added"))
            .await
            .unwrap()
            .into_inner();
        assert!(r.success && r.ip_allocation_metadata.is_empty());
        let r = c.add_network(add_req("p15")).await.unwrap().into_inner();
        assert!(r.success, "waited out the cooldown: {r:?}");
        assert_eq!(r.ip_allocation_metadata[0].i_pv4_addr, ip.i_pv4_addr);
        // Cooled and handed out again: the pool is full once more.
        let r = c.del_network(del_req("p15")).await.unwrap().into_inner();
        assert!(r.success);
        tokio::time::sleep(Duration::from_millis(3200)).await;
        assert_eq!(
            health(&d.socket).await,
            "SERVING",
            "health follows cooldown expiry"
        );
        let r = c.add_network(add_req("p15")).await.unwrap().into_inner();
        assert!(r.success);

        // Missing fields are refused with a reason.
        let mut bad = add_req("x");
        bad.container_id.clear();
        let r = c.add_network(bad).await.unwrap().into_inner();
        assert_eq!(r.reason(), FailureReason::InvalidRequest);

        // A plugin of another major version is served (here: told the pool is empty), and logged.
        let mut skew = add_req("skew");
        skew.client_version = "2.3.0".into();
        let r = c.add_network(skew).await.unwrap().into_inner();
        assert_eq!(r.reason(), FailureReason::PoolEmpty);
    });

    // The checkpoint is upstream's format.
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&d.checkpoint).unwrap()).unwrap();
    assert_eq!(raw["version"], "vpc-cni-ipam/1");
    assert_eq!(raw["allocations"].as_array().unwrap().len(), 15);
    let log = d.log_text();
    assert!(
        log.contains("plugin from another major version"),
        "version skew not logged"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("AddNetwork") && l.contains("p15")),
        "spans name the pod"
    );
}

#[test]
fn max_pods_is_enforced_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    // t3.nano allows 4 pods; this node file offers more addresses than that.
    let d = Ipamd::standalone(dir.path(), None, "t3.nano", &enis(1, 8), &[]);
    rt().block_on(async {
        let mut c = client(&d.socket).await;
        for i in 0..4 {
            assert!(
                c.add_network(add_req(&format!("c{i}")))
                    .await
                    .unwrap()
                    .into_inner()
                    .success
            );
        }
        let r = c.add_network(add_req("c4")).await.unwrap().into_inner();
        assert_eq!(r.reason(), FailureReason::MaxPodsReached);
        assert_eq!(r.message, "max pods reached (4)");
    });
}

#[test]
fn kill9_during_burst_loses_no_acknowledged_allocation() {
    let dir = tempfile::tempdir().unwrap();
    // m5.24xlarge: 15 ENIs x 50 IPs; 5 ENIs x 49 is plenty for 200 pods.
    let start = || Ipamd::standalone(dir.path(), None, "m5.24xlarge", &enis(5, 49), &[]);
    let mut d = start();
    let socket = d.socket.clone();

    let rt = rt();
    let acked: HashMap<String, String> = rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..200 {
            let socket = socket.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut c = client(&socket).await;
                if let Ok(r) = c.add_network(add_req(&format!("burst{i}"))).await {
                    let r = r.into_inner();
                    if r.success {
                        let _ = tx.send((
                            format!("burst{i}"),
                            r.ip_allocation_metadata[0].i_pv4_addr.clone(),
                        ));
                    }
                }
            });
        }
        drop(tx);
        let mut acked = HashMap::new();
        // Kill once a good part of the burst is acknowledged, while the rest is in flight.
        while let Some((k, ip)) = rx.recv().await {
            acked.insert(k, ip);
            if acked.len() == 60 {
                d.kill9();
            }
        }
        acked
    });
    assert!(acked.len() >= 60, "only {} acknowledged", acked.len());
    let ips: HashSet<_> = acked.values().collect();
    assert_eq!(
        ips.len(),
        acked.len(),
        "an IP was given twice before the crash"
    );

    let d2 = start();
    rt.block_on(async {
        let mut c = client(&d2.socket).await;
        for (k, ip) in &acked {
            let r = c.add_network(add_req(k)).await.unwrap().into_inner();
            assert_eq!(
                &r.ip_allocation_metadata[0].i_pv4_addr, ip,
                "{k} lost its address across kill -9"
            );
        }
        // New pods never get an address an acknowledged pod holds. (Allocations written but
        // not yet acknowledged at the kill are restored too, so fewer than 245 - acked remain.)
        let free = c
            .status(StatusRequest::default())
            .await
            .unwrap()
            .into_inner()
            .available_addresses;
        assert!(free > 0);
        for i in 0..free {
            let r = c
                .add_network(add_req(&format!("after{i}")))
                .await
                .unwrap()
                .into_inner();
            assert!(r.success);
            assert!(
                !ips.contains(&r.ip_allocation_metadata[0].i_pv4_addr),
                "address handed out twice"
            );
        }
    });
}

#[test]
fn restart_restores_upstream_checkpoint_and_drops_what_is_gone() {
    let node = Netns::new("ipr");
    let dir = tempfile::tempdir().unwrap();
    // Written by upstream: an old pod whose veth exists, an old one whose veth is gone, a fresh
    // one (still being wired: kept), and one on an address this node no longer holds.
    let veth_kept = cni_common::naming::host_veth_name("eni", "default", "alive");
    integration::sh(&[
        "ip", "-n", &node.name, "link", "add", &veth_kept, "type", "veth", "peer", "name",
        "tmp-peer",
    ]);
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let old = now_ns - 3600 * 1_000_000_000;
    let entry = |cid: &str, ip: &str, pod: &str, ts: i64| {
        serde_json::json!({"networkName":"aws-cni","containerID":cid,"ifName":"eth0","ipv4":ip,
            "allocationTimestamp":ts,"metadata":{"k8sPodNamespace":"default","k8sPodName":pod,"interfacesCount":1}})
    };
    std::fs::write(
        dir.path().join("ipam.json"),
        serde_json::json!({"version":"vpc-cni-ipam/1","allocations":[
            entry("alive", "10.0.1.11", "alive", old),
            entry("dead", "10.0.1.12", "dead", old),
            entry("young", "10.0.2.13", "young", now_ns),
            entry("foreign", "10.9.9.9", "foreign", old),
        ]})
        .to_string(),
    )
    .unwrap();
    let d = Ipamd::standalone(dir.path(), Some(&node.name), "t3.medium", &enis(2, 5), &[]);
    rt().block_on(async {
        let mut c = client(&d.socket).await;
        let ip = |r: cni_proto::AddNetworkReply| r.ip_allocation_metadata[0].i_pv4_addr.clone();
        let alive = add_req("alive");
        assert_eq!(
            ip(c.add_network(alive).await.unwrap().into_inner()),
            "10.0.1.11"
        );
        assert_eq!(
            ip(c.add_network(add_req("young")).await.unwrap().into_inner()),
            "10.0.2.13"
        );
        let s = c
            .status(StatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            s.available_addresses,
            10 - 2 - 1,
            "the dead pod's address cools down, the foreign entry is gone"
        );
    });
    let log = d.log_text();
    assert!(
        log.contains("no host route and no host veth; released into cooldown")
            && log.contains("no ENI of this node holds"),
        "{log}"
    );
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&d.checkpoint).unwrap()).unwrap();
    assert_eq!(raw["allocations"].as_array().unwrap().len(), 2);
}

#[test]
fn bad_environment_is_refused_naming_the_variable() {
    let out = std::process::Command::new(integration::bin("ipamd"))
        .env_clear()
        .env("IP_COOLDOWN_PERIOD", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("IP_COOLDOWN_PERIOD"));
}

#[test]
fn unreadable_checkpoint_stops_the_daemon_instead_of_forgetting_pods() {
    let dir = tempfile::tempdir().unwrap();
    let nf = integration::ipamd_proc::node_file(dir.path(), "t3.medium", &enis(1, 5));
    // A directory where the file should be: it exists, but cannot be read as a checkpoint.
    let store = dir.path().join("ipam.json");
    std::fs::create_dir(&store).unwrap();
    let out = std::process::Command::new(integration::bin("ipamd"))
        .env_clear()
        .env("IPAMD_NODE_FILE", &nf)
        .env("AWS_VPC_K8S_CNI_BACKING_STORE", &store)
        .env("IPAMD_SOCKET_PATH", dir.path().join("ipamd.sock"))
        .env("AWS_VPC_K8S_CNI_LOG_FILE", "stderr")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read checkpoint"), "{err}");
    assert!(!dir.path().join("ipamd.sock").exists(), "must not serve");
}

#[test]
fn a_background_task_that_stops_is_noticed_and_ipamd_exits() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Ipamd::standalone(
        dir.path(),
        None,
        "t3.medium",
        &enis(1, 5),
        &[
            ("IPAMD_TEST_FAULT", "sweeper-stops"),
            ("IPAMD_RECONCILE_INTERVAL", "1"),
        ],
    );
    rt().block_on(async {
        assert_eq!(health(&d.socket).await, "SERVING");
    });
    let mut child = d.child.take().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ipamd kept serving without its sweeper"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let log = d.log_text();
    assert!(
        log.contains("background task stopped") && log.contains("sweeper"),
        "{log}"
    );
}

/// The sweeper's look at the host and the veth reaper dump links on one netlink socket; the
/// kernel refuses a second dump on a socket while one runs (EBUSY), which cost the sweep its
/// pass whenever their ticks met (every 10 s in the simulated cluster). Dumps sharing the
/// socket now take turns, as do the route and rule dumps on the other socket.
#[test]
fn link_dumps_sharing_a_socket_take_turns() {
    rt().block_on(async {
        let dumper = ipamd::hostnet::link_dump::LinkDumper::new().expect("netlink socket");
        let mut all = Vec::new();
        for _ in 0..32 {
            let d = dumper.clone();
            all.push(tokio::spawn(async move { d.links().await }));
        }
        for h in all {
            let links = h.await.unwrap().expect("a link dump refused");
            assert!(!links.is_empty());
        }
        // The same for the route and rule dumps of one `Links` shared by its clones.
        let links = ipamd::hostnet::links::Links::new().expect("netlink sockets");
        let mut all = Vec::new();
        for i in 0..32 {
            let l = links.clone();
            all.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    l.rules().await.map(|_| ())
                } else {
                    l.host_view().await.map(|_| ())
                }
            }));
        }
        for h in all {
            h.await.unwrap().expect("a route or rule dump refused");
        }
    });
}
