//! ipamd against the EC2 shim (moto) and the fake IMDS, all real processes: warm targets, ENI
//! attach up to the instance limit, shrinking, prefix delegation, throttling, subnet exhaustion,
//! leaked ENIs and a lagging IMDS.

use std::collections::HashSet;
use std::time::Duration;

use cni_proto::{AddNetworkReply, FailureReason, StatusReply, StatusRequest};
use integration::cloud::{eventually, Instance, Shim};
use integration::ipamd_proc::{add_req, block, client, del_req, health, rt};
use integration::vpc::{Vpc, VpcNode};
use serde_json::json;

/// A VPC (shim, router, fabric), one instance in it, its IMDS and ipamd inside the node's
/// namespace with the rig's fast clocks plus `env`. Fields drop in order: node, then VPC.
struct Node {
    node: VpcNode,
    vpc: Vpc,
    _dir: tempfile::TempDir,
}

fn node(instance_type: &str, subnet: &str, env: &[(&str, &str)]) -> Node {
    node_with(instance_type, subnet, env, |_, _| {})
}

fn node_with(
    instance_type: &str,
    subnet: &str,
    env: &[(&str, &str)],
    before_start: impl FnOnce(&Shim, &Instance),
) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let vpc = Vpc::start(dir.path(), 0);
    let inst = vpc.shim.instance(instance_type, subnet);
    before_start(&vpc.shim, &inst);
    let mut node = vpc.add_node(dir.path(), &inst, 0);
    node.start_ipamd(dir.path(), env);
    Node {
        node,
        vpc,
        _dir: dir,
    }
}

impl Node {
    /// One AddNetwork through ipamd's socket.
    fn add(&self, cid: &str) -> AddNetworkReply {
        block(async {
            client(&self.node.ipamd().socket)
                .await
                .add_network(add_req(cid))
                .await
                .unwrap()
                .into_inner()
        })
    }

    /// AddNetwork for `<prefix><i>`, each of which must succeed.
    fn add_ok(&self, prefix: &str, range: std::ops::Range<usize>) {
        for i in range {
            let r = self.add(&format!("{prefix}{i}"));
            assert!(r.success, "{r:?}");
        }
    }

    fn del_all(&self, prefix: &str, n: usize) {
        block(async {
            let mut c = client(&self.node.ipamd().socket).await;
            for i in 0..n {
                c.del_network(del_req(&format!("{prefix}{i}")))
                    .await
                    .unwrap();
            }
        })
    }

    fn status(&self) -> StatusReply {
        block(async {
            client(&self.node.ipamd().socket)
                .await
                .status(StatusRequest::default())
                .await
                .unwrap()
                .into_inner()
        })
    }

    /// (ENIs, secondary IPs, prefixes) attached in EC2.
    fn ec2(&self) -> (usize, usize, usize) {
        self.vpc.shim.addresses(&self.node.inst.id)
    }

    fn wait_ec2(&self, want: (usize, usize, usize), secs: u64) {
        let mut last = (0, 0, 0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually(secs, &format!("EC2 to hold {want:?}"), || {
                last = self.ec2();
                (last == want).then_some(())
            })
        }));
        if r.is_err() {
            panic!(
                "EC2 holds {last:?}, wanted {want:?}; ipamd log:\n{}",
                self.node.ipamd().log_text()
            );
        }
    }
}

#[test]
fn fresh_node_reaches_warm_target_and_reports_ready() {
    let n = node("t3.medium", "10.0.1.0/24", &[]);
    // WARM_ENI_TARGET=1: one ENI's worth (5) of free addresses, on the primary ENI.
    n.wait_ec2((1, 5, 0), 20);
    eventually(10, "SERVING", || {
        let h = block(health(&n.node.ipamd().socket));
        (h == "SERVING").then_some(())
    });
    let calls = n.vpc.shim.calls();
    assert_eq!(calls["by_action"]["AssignPrivateIpAddresses"], 1, "{calls}");
    assert_eq!(
        calls["by_action"].get("CreateNetworkInterface"),
        None,
        "{calls}"
    );
    // The rig runs ipamd at upstream's default level, DEBUG: each EC2 call is a line.
    let log = n.node.ipamd().log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(r#""level":"DEBUG""#) && l.contains("AssignPrivateIpAddresses")),
        "no DEBUG line for the EC2 call in:\n{log}"
    );
}

#[test]
fn pods_attach_enis_up_to_the_limit_then_shrink_back() {
    let n = node(
        "t3.medium",
        "10.0.1.0/24",
        &[
            ("CLUSTER_NAME", "prod"),
            ("ADDITIONAL_ENI_TAGS", r#"{"team":"net"}"#),
        ],
    );
    n.wait_ec2((1, 5, 0), 20);
    n.vpc.shim.reset_calls();
    {
        let mut ok = HashSet::new();
        let mut refused = Vec::new();
        for i in 0..30 {
            let r = n.add(&format!("c{i}"));
            if r.success {
                assert!(
                    ok.insert(r.ip_allocation_metadata[0].i_pv4_addr.clone()),
                    "IP given twice"
                );
            } else {
                refused.push(r);
            }
        }
        assert_eq!(ok.len(), 15, "3 ENIs x 5 secondary IPs");
        assert_eq!(refused.len(), 15);
        for r in &refused {
            assert_eq!(r.reason, FailureReason::PoolEmpty as i32, "{r:?}");
            assert!(
                r.message.contains("t3.medium: 3 ENIs")
                    && r.message.contains("all 3 ENIs attached"),
                "the refusal names the instance's limit: {}",
                r.message
            );
        }
    }
    n.wait_ec2((3, 15, 0), 10);
    let calls = n.vpc.shim.calls();
    let by = &calls["by_action"];
    // Two ENIs: create + attach + DeleteOnTermination each, never a 4th attach attempt.
    assert_eq!(by["CreateNetworkInterface"], 2, "{calls}");
    assert_eq!(by["AttachNetworkInterface"], 2, "{calls}");
    assert_eq!(by["ModifyNetworkInterfaceAttribute"], 2, "{calls}");
    eprintln!("EC2 calls for 30 pods' worth of AddNetwork on t3.medium: {calls}");
    let enis = n.vpc.shim.attached(&n.node.inst.id);
    for e in &enis[1..] {
        assert_eq!(e["description"], format!("aws-K8S-{}", n.node.inst.id));
        assert_eq!(
            e["tags"]["node.k8s.amazonaws.com/instance_id"],
            n.node.inst.id
        );
        assert!(e["tags"]["node.k8s.amazonaws.com/createdAt"].is_string());
        assert_eq!(e["tags"]["cluster.k8s.amazonaws.com/name"], "prod");
        assert_eq!(e["tags"]["team"], "net");
    }

    // Everything released: after the cooldown, the idle ENIs go back down to the target.
    n.del_all("c", 30);
    n.wait_ec2((1, 5, 0), 30);
    // Detached first, then deleted: the delete follows the detach by one EC2 call.
    let ours = |e: &serde_json::Value| e["description"] == format!("aws-K8S-{}", n.node.inst.id);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        eventually(10, "freed ENIs deleted", || {
            (!n.vpc.shim.enis().iter().any(ours)).then_some(())
        })
    }));
    let left: Vec<_> = n.vpc.shim.enis().into_iter().filter(|e| ours(e)).collect();
    assert!(
        r.is_ok() && left.is_empty(),
        "freed ENIs are deleted, not left detached: {left:?}"
    );
}

#[test]
fn warm_ip_and_minimum_ip_targets() {
    let n = node(
        "t3.medium",
        "10.0.1.0/24",
        &[("WARM_IP_TARGET", "2"), ("MINIMUM_IP_TARGET", "4")],
    );
    n.wait_ec2((1, 4, 0), 20);
    n.add_ok("w", 0..6);
    // 6 used + 2 warm = 8: the primary's 5 and 3 on a second ENI.
    n.wait_ec2((2, 8, 0), 20);
    n.del_all("w", 6);
    // Back to the minimum once the cooldown is over; the emptied ENI goes.
    n.wait_ec2((1, 4, 0), 30);
}

#[test]
fn prefix_delegation_hands_out_addresses_from_prefixes() {
    let n = node(
        "t3.medium",
        "10.0.0.0/20",
        &[
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("WARM_PREFIX_TARGET", "1"),
        ],
    );
    n.wait_ec2((1, 0, 1), 20);
    let prefix = n.vpc.shim.attached(&n.node.inst.id)[0]["prefixes"][0]
        .as_str()
        .unwrap()
        .to_string();
    let r = n.add("p0");
    assert!(r.success, "{r:?}");
    let ip: std::net::Ipv4Addr = r.ip_allocation_metadata[0].i_pv4_addr.parse().unwrap();
    let base: std::net::Ipv4Addr = prefix.trim_end_matches("/28").parse().unwrap();
    assert_eq!(u32::from(ip) & !0xf, u32::from(base), "{ip} from {prefix}");
    n.add_ok("p", 1..17);
    // 17 pods: two full-ish prefixes and one warm (upstream's example P4).
    n.wait_ec2((1, 0, 3), 20);
    assert_eq!(n.status().available_addresses, 31);
}

#[test]
fn throttling_slows_but_does_not_break_convergence() {
    let n = node_with("t3.medium", "10.0.1.0/24", &[], |shim, _| {
        shim.fault(json!({"action": "AssignPrivateIpAddresses", "kind": "throttle", "count": 4}));
        shim.fault(json!({"action": "CreateNetworkInterface", "kind": "throttle", "count": 2}));
    });
    n.wait_ec2((1, 5, 0), 30);
    n.add_ok("t", 0..1);
    n.wait_ec2((2, 10, 0), 30);
    let calls = n.vpc.shim.calls();
    assert_eq!(calls["throttled"], 6, "{calls}");
    assert!(n.node.ipamd().log_text().contains("retrying"));
    // And the metrics say so.
    let (_, m) = integration::sim::http_get(&n.node.ns.name, "http://127.0.0.1:61678/metrics");
    for (api, times) in [
        ("AssignPrivateIpAddresses", 4),
        ("CreateNetworkInterface", 2),
    ] {
        let line = format!("awscni_ec2api_throttle_count{{fn=\"{api}\"}} {times}");
        assert!(m.lines().any(|l| l == line), "{line} in:\n{m}");
    }
}

#[test]
fn subnet_exhaustion_gives_the_reason() {
    // A /28: 11 usable addresses, the instance takes one, the primary ENI's 5 leave 5.
    // A second ENI would need 6 (its own address + 5).
    let n = node("t3.medium", "10.0.1.0/28", &[("WARM_ENI_TARGET", "1")]);
    n.wait_ec2((1, 5, 0), 20);
    n.add_ok("s", 0..5);
    let r = eventually(20, "a refusal naming the subnet", || {
        let r = n.add("s5");
        (r.reason == FailureReason::SubnetFull as i32).then_some(r)
    });
    assert!(!r.success);
    assert!(
        r.message.contains(&n.node.inst.subnet_id) && r.message.contains("no free addresses"),
        "{}",
        r.message
    );
    assert!(n
        .node
        .ipamd()
        .log_text()
        .contains("InsufficientFreeAddressesInSubnet"));
    // Nothing half-made: no detached ENI left in EC2.
    assert!(
        n.vpc
            .shim
            .enis()
            .iter()
            .all(|e| !e["instance_id"].is_null()),
        "{:?}",
        n.vpc.shim.enis()
    );
}

/// Run `body` (Python, with `c` a boto3 EC2 client on the shim) and return what it prints.
/// Create an ENI through the EC2 API, as a crashed ipamd would have.
fn create_eni(shim: &Shim, inst: &Instance, tags: &[(&str, String)], description: &str) -> String {
    shim.create_eni(inst, tags, description, 0)
}

#[test]
fn leaked_enis_are_deleted_at_start() {
    let mut ids = Vec::new();
    let n = node_with("t3.medium", "10.0.1.0/24", &[], |shim, inst| {
        let old = humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() - Duration::from_secs(600),
        )
        .to_string();
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let desc = format!("aws-K8S-{}", inst.id);
        let tag = |t: String| {
            vec![
                ("node.k8s.amazonaws.com/instance_id", inst.id.clone()),
                ("node.k8s.amazonaws.com/createdAt", t),
            ]
        };
        ids.push(create_eni(shim, inst, &tag(old.clone()), &desc)); // leaked
        ids.push(create_eni(shim, inst, &tag(now), &desc)); // too young
        let mut keep = tag(old.clone());
        keep.push(("node.k8s.amazonaws.com/no_manage", "true".into()));
        ids.push(create_eni(shim, inst, &keep, &desc)); // hands off
        ids.push(create_eni(shim, inst, &tag(old), "someone elses")); // not ours
    });
    eventually(20, "the leaked ENI to be deleted", || {
        let have: HashSet<String> = n
            .vpc
            .shim
            .enis()
            .iter()
            .filter_map(|e| e["id"].as_str().map(str::to_string))
            .collect();
        (!have.contains(&ids[0])).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    let have: HashSet<String> = n
        .vpc
        .shim
        .enis()
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_string))
        .collect();
    for kept in &ids[1..] {
        assert!(have.contains(kept), "{kept} must stay");
    }
    let log = n.node.ipamd().log_text();
    let deleted = log.find("deleted leaked ENI").expect("the deletion logged");
    // The sweep follows the first fill: a fresh node's first pods do not wait for it.
    let assigned = log
        .find("assigned secondary IPs")
        .expect("the first fill logged");
    assert!(
        assigned < deleted,
        "the sweep ran before the first fill:\n{log}"
    );
}

#[test]
fn disable_leaked_eni_cleanup_turns_the_sweep_off() {
    let mut leaked = String::new();
    let n = node_with(
        "t3.medium",
        "10.0.1.0/24",
        &[("DISABLE_LEAKED_ENI_CLEANUP", "true")],
        |shim, inst| {
            let old = humantime::format_rfc3339_seconds(
                std::time::SystemTime::now() - Duration::from_secs(600),
            )
            .to_string();
            leaked = create_eni(
                shim,
                inst,
                &[
                    ("node.k8s.amazonaws.com/instance_id", inst.id.clone()),
                    ("node.k8s.amazonaws.com/createdAt", old),
                ],
                &format!("aws-K8S-{}", inst.id),
            );
        },
    );
    n.wait_ec2((1, 5, 0), 20);
    assert!(n.vpc.shim.enis().iter().any(|e| e["id"] == leaked.as_str()));
}

#[test]
fn imds_lag_does_not_remove_addresses() {
    let n = node("t3.medium", "10.0.1.0/24", &[]);
    n.wait_ec2((1, 5, 0), 20);
    // From now on IMDS shows the node as it was a minute ago... (it keeps the first snapshot).
    n.node.imds.set_lag(60_000);
    n.add_ok("l", 0..3);
    // A second ENI appears in EC2 but not in IMDS.
    n.wait_ec2((2, 10, 0), 20);
    // Several reconciles (every 2 s) later, EC2 still holds everything and so does ipamd.
    eventually(20, "a reconcile that asked EC2", || {
        n.node
            .ipamd()
            .log_text()
            .contains("IMDS differs from the pool; asking EC2")
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(n.ec2(), (2, 10, 0));
    let st = n.status();
    assert_eq!(st.available_addresses, 7, "10 held, 3 assigned: {st:?}");
    let log = n.node.ipamd().log_text();
    assert!(!log.contains("removed from the pool"), "{log}");
}

/// Attach an ENI through the EC2 API at `device`.
fn attach_eni(shim: &Shim, inst: &Instance, eni: &str, device: u32) {
    shim.attach_eni(inst, eni, device)
}

#[test]
fn no_manage_eni_is_left_alone_but_takes_a_slot() {
    let mut foreign = String::new();
    let n = node_with("t3.medium", "10.0.1.0/24", &[], |shim, inst| {
        foreign = create_eni(
            shim,
            inst,
            &[("node.k8s.amazonaws.com/no_manage", "true".into())],
            "hands off",
        );
        attach_eni(shim, inst, &foreign, 1);
    });
    n.wait_ec2((2, 5, 0), 20);
    let ok = (0..15).filter(|i| n.add(&format!("n{i}")).success).count();
    // The primary and one more ENI (device 2): the foreign ENI holds the third slot.
    assert_eq!(ok, 10);
    n.wait_ec2((3, 10, 0), 10);
    let enis = n.vpc.shim.attached(&n.node.inst.id);
    let f = enis.iter().find(|e| e["id"] == foreign.as_str()).unwrap();
    assert_eq!(
        f["secondary_ips"].as_array().map_or(0, Vec::len),
        0,
        "never given addresses"
    );
    assert_eq!(
        enis[2]["device_index"], 2,
        "the next free device index is used"
    );
}

#[test]
fn unauthorized_operation_names_the_missing_permission() {
    let n = node_with("t3.medium", "10.0.1.0/24", &[], |shim, _| {
        shim.fault(
            json!({"action": "AssignPrivateIpAddresses", "kind": "error",
                          "code": "UnauthorizedOperation", "count": -1}),
        );
    });
    eventually(20, "the permission log line", || {
        n.node
            .ipamd()
            .log_text()
            .contains("lacks permission ec2:AssignPrivateIpAddresses")
            .then_some(())
    });
    assert_eq!(n.ec2(), (1, 0, 0));
    let r = n.add("u0");
    assert!(!r.success);
    assert!(
        r.message.contains("ec2:AssignPrivateIpAddresses"),
        "{}",
        r.message
    );
}

/// The fallback for types missing from the built-in table: DescribeInstanceTypes through the
/// SDK gives the same limits the table has.
#[test]
fn describe_instance_types_gives_the_tables_limits() {
    use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
    use ipamd::cloud::Ec2;
    let dir = tempfile::tempdir().unwrap();
    let shim = Shim::start(dir.path(), 0);
    let conf = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-west-2"))
        .endpoint_url(&shim.url)
        .credentials_provider(Credentials::new("x", "y", None, None, "test"))
        .http_client(ipamd::cloud::http_client())
        .build();
    let ec2 = ipamd::cloud::sdk::SdkEc2::from_client(aws_sdk_ec2::Client::from_conf(conf));
    rt().block_on(async {
        for t in [
            "t3.medium",
            "m5.large",
            "c5n.18xlarge",
            "m5.metal",
            "t2.micro",
        ] {
            let got = ec2.describe_instance_type(t).await.unwrap().unwrap();
            assert_eq!(&got, ipamd::instance::types::lookup(t).unwrap(), "{t}");
        }
        assert_eq!(
            ec2.describe_instance_type("x9.nonsense")
                .await
                .ok()
                .flatten(),
            None
        );
    });
}

#[test]
fn add_waits_for_a_refill_under_way() {
    // The first refill takes 3 s; an ADD that arrives meanwhile waits for it instead of failing
    // the sandbox.
    let n = node_with("t3.medium", "10.0.1.0/24", &[], |shim, _| {
        shim.fault(
            json!({"action": "AssignPrivateIpAddresses", "kind": "latency",
                          "latency_ms": 3000, "count": 1}),
        );
    });
    assert_eq!(
        n.status().available_addresses,
        0,
        "ipamd serves before its first refill is done"
    );
    let r = n.add("early");
    assert!(r.success, "{r:?}");
    assert_eq!(
        n.vpc.shim.calls()["by_action"]["AssignPrivateIpAddresses"],
        1
    );
}

#[test]
fn prefix_exhaustion_gives_the_reason() {
    // A /26 holds two free aligned /28s (the first has the reserved addresses and the instance's,
    // the last the broadcast): 32 pods, then InsufficientCidrBlocks.
    let n = node(
        "t3.medium",
        "10.0.1.0/26",
        &[
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("WARM_PREFIX_TARGET", "1"),
        ],
    );
    n.wait_ec2((1, 0, 1), 20);
    n.add_ok("c", 0..32);
    let r = eventually(20, "a refusal naming the missing /28 blocks", || {
        let r = n.add("c32");
        (r.reason == FailureReason::SubnetFull as i32).then_some(r)
    });
    assert!(!r.success);
    assert!(
        r.message.contains(&n.node.inst.subnet_id) && r.message.contains("no free /28 blocks"),
        "{}",
        r.message
    );
    assert!(n.node.ipamd().log_text().contains("InsufficientCidrBlocks"));
    assert_eq!(n.ec2(), (1, 0, 2));
}

#[test]
fn accepted_calls_that_assign_nothing_back_off_and_recover() {
    let n = node_with(
        "t3.medium",
        "10.0.0.0/20",
        &[
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("WARM_PREFIX_TARGET", "1"),
            ("IPAMD_GROWTH_BACKOFF_MAX", "4"),
        ],
        |shim, _| {
            // EC2 accepts every assignment and carries none of them out.
            shim.fault(json!({"action": "AssignPrivateIpAddresses", "kind": "noop", "count": -1}));
        },
    );
    eventually(20, "the no-progress log line", || {
        n.node
            .ipamd()
            .log_text()
            .contains("neither its reply nor a describe shows anything new")
            .then_some(())
    });
    // The pause doubles 1, 2, 4 s (the cap here); then count a 10 s window at the cap.
    std::thread::sleep(Duration::from_secs(8));
    n.vpc.shim.reset_calls();
    std::thread::sleep(Duration::from_secs(10));
    let calls = &n.vpc.shim.calls()["by_action"];
    let assigns = calls["AssignPrivateIpAddresses"].as_u64().unwrap_or(0);
    // Without the backoff the token bucket alone allows 10 a second.
    assert!(
        (1..=4).contains(&assigns),
        "{assigns} assigns in 10 s at a 4 s backoff: {calls}"
    );
    let (st, body) = integration::sim::http_get(&n.node.ns.name, "http://127.0.0.1:61678/metrics");
    assert_eq!(st, 200);
    let count: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("awscni_ec2_no_progress_count "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(count >= 3.0, "{count}");
    let r = n.add("waiting");
    assert!(!r.success);
    assert!(r.message.contains("EC2 accepted"), "{}", r.message);
    let (_, pool) = integration::sim::http_get(&n.node.ns.name, "http://127.0.0.1:61679/v1/pool");
    let pool: serde_json::Value = serde_json::from_str(&pool).unwrap();
    assert!(
        pool["growthNote"]
            .as_str()
            .unwrap_or("")
            .contains("growth paused"),
        "{pool}"
    );
    // Fixed: within one backoff period the pool grows.
    n.vpc.shim.clear_faults();
    n.wait_ec2((1, 0, 1), 10);
    let r = n.add("after");
    assert!(r.success, "{r:?}");
    assert!(n
        .node
        .ipamd()
        .log_text()
        .contains("EC2 calls grow the pool again"));
}

/// DISABLE_NETWORK_RESOURCE_PROVISIONING and ENABLE_IMDS_ONLY_MODE: ipamd serves the addresses
/// someone else attached (here a second ENI with three addresses, made through the EC2 API) and
/// never asks EC2 to grow or shrink the pool; in IMDS-only mode it does not even describe ENIs.
/// Addresses someone assigns later are served after a reconcile (IMDS-only: from IMDS alone).
#[test]
fn without_provisioning_attached_addresses_serve_and_ec2_is_not_asked_to_grow() {
    for (var, describes) in [
        ("DISABLE_NETWORK_RESOURCE_PROVISIONING", true),
        ("ENABLE_IMDS_ONLY_MODE", false),
    ] {
        let mut eni = String::new();
        let n = node_with(
            "t3.medium",
            "10.0.1.0/24",
            &[(var, "true"), ("IPAMD_RECONCILE_INTERVAL", "1")],
            |shim, inst| {
                eni = shim.create_eni(inst, &[], "attached by someone else", 3);
                shim.attach_eni(inst, &eni, 1);
                // Only ipamd's calls from here on.
                shim.reset_calls();
            },
        );
        for i in 0..3 {
            let r = n.add(&format!("p{i}"));
            assert!(r.success, "{var}: {r:?}");
        }
        let r = n.add("p3");
        assert!(!r.success, "{var}: the pool was grown: {r:?}");
        std::thread::sleep(Duration::from_secs(2));
        let calls = n.vpc.shim.calls();
        let count = |a: &str| calls["by_action"][a].as_u64().unwrap_or(0);
        for a in [
            "CreateNetworkInterface",
            "AttachNetworkInterface",
            "AssignPrivateIpAddresses",
            "UnassignPrivateIpAddresses",
            "DetachNetworkInterface",
            "DeleteNetworkInterface",
        ] {
            assert_eq!(count(a), 0, "{var}: {a}: {calls}");
        }
        if !describes {
            assert_eq!(count("DescribeNetworkInterfaces"), 0, "{var}: {calls}");
        }
        n.vpc.shim.boto3(&format!(
            "c.assign_private_ip_addresses(NetworkInterfaceId='{eni}',SecondaryPrivateIpAddressCount=2)"
        ));
        n.vpc.shim.reset_calls();
        eventually(20, "the addresses assigned later served", || {
            n.add("p3").success.then_some(())
        });
        assert!(n.add("p4").success, "{var}");
        let calls = n.vpc.shim.calls();
        let count = |a: &str| calls["by_action"][a].as_u64().unwrap_or(0);
        if !describes {
            assert_eq!(count("DescribeNetworkInterfaces"), 0, "{var}: {calls}");
            assert!(
                n.node
                    .ipamd()
                    .log_text()
                    .contains("ENABLE_IMDS_ONLY_MODE: taking IMDS's view"),
                "{var}"
            );
        }
    }
}

/// MANAGE_UNTAGGED_ENI=false: an attached ENI without ipamd's instance-id tag is left alone
/// as upstream leaves it (never given addresses, still holding its slot); with the default it
/// is adopted.
#[test]
fn an_untagged_eni_is_left_alone_with_manage_untagged_eni_false() {
    for (manage, adopted) in [("false", false), ("true", true)] {
        let mut foreign = String::new();
        let n = node_with(
            "t3.medium",
            "10.0.1.0/24",
            &[("MANAGE_UNTAGGED_ENI", manage)],
            |shim, inst| {
                foreign = create_eni(shim, inst, &[], "another owner");
                attach_eni(shim, inst, &foreign, 1);
            },
        );
        let ok = (0..15).filter(|i| n.add(&format!("m{i}")).success).count();
        let enis = n.vpc.shim.attached(&n.node.inst.id);
        let f = enis.iter().find(|e| e["id"] == foreign.as_str()).unwrap();
        let held = f["secondary_ips"].as_array().map_or(0, Vec::len);
        if adopted {
            assert_eq!(ok, 15, "MANAGE_UNTAGGED_ENI={manage}");
            assert_eq!(held, 5, "adopted and filled");
        } else {
            // The primary and one more ENI: the untagged one keeps the third slot.
            assert_eq!(ok, 10, "MANAGE_UNTAGGED_ENI={manage}");
            assert_eq!(held, 0, "never given addresses");
        }
    }
}

/// VPC_CNI_VERSION names the CNI in the EC2 user agent, as upstream's (`amazon-vpc-cni-k8s-<v>`).
#[test]
fn vpc_cni_version_is_in_the_ec2_user_agent() {
    let n = node_with(
        "t3.medium",
        "10.0.1.0/24",
        &[("VPC_CNI_VERSION", "v1.23.1")],
        |_, _| {},
    );
    assert!(n.add("ua").success);
    let agents = n.vpc.shim.calls()["user_agents"].clone();
    assert!(
        agents.as_array().unwrap().iter().any(|a| a
            .as_str()
            .unwrap_or("")
            .contains("amazon-vpc-cni-k8s-v1.23.1")),
        "{agents}"
    );
}

/// HTTP_TIMEOUT bounds each EC2 request: a call slower than it is abandoned and retried (said in
/// the log); with a longer limit the same slow call simply succeeds.
#[test]
fn http_timeout_bounds_each_ec2_request() {
    for (timeout, cut) in [("10", true), ("30", false)] {
        let n = node_with(
            "t3.medium",
            "10.0.1.0/24",
            &[("HTTP_TIMEOUT", timeout)],
            |shim, _| {
                shim.fault(
                    json!({"action": "DescribeNetworkInterfaces", "kind": "latency",
                                  "latency_ms": 12000, "count": 1}),
                );
            },
        );
        eventually(60, "ipamd serving", || n.add("t0").success.then_some(()));
        let log = n.node.ipamd().log_text();
        let retried: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("EC2 call failed; retrying") && l.contains("DescribeNetworkInterfaces")
            })
            .collect();
        assert_eq!(!retried.is_empty(), cut, "HTTP_TIMEOUT={timeout}: {log}");
        // The cause is named.
        assert!(
            retried.iter().all(|l| l.to_lowercase().contains("timeout")),
            "{retried:?}"
        );
    }
}
