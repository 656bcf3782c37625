//! Where ENIs go, through the real binaries on the simulated VPC: custom networking with
//! ENIConfigs served by the Kubernetes API emulator, subnet discovery over tagged subnets, the
//! pod IP annotation, Events, and ENIs ipamd must leave alone.

use integration::cloud::eventually;
use integration::in_cidr;
use integration::sim::{http_get, Mode, NodeSpec, Opts, Sim, ZONE_LABEL};
use serde_json::{json, Value};

fn t3(env: &[(&str, &str)]) -> NodeSpec {
    NodeSpec::new("t3.medium", env)
}

/// Ours, `/v1/eni-config-status`, checked against upstream's `/v1/eni-configs` (the name alone,
/// as a JSON string).
fn eni_configs(s: &Sim, node: usize) -> Value {
    let (code, body) = http_get(
        s.nodes[node].ns(),
        "http://127.0.0.1:61679/v1/eni-config-status",
    );
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let (code, name) = http_get(s.nodes[node].ns(), "http://127.0.0.1:61679/v1/eni-configs");
    if v["kubernetes"] == "watching" {
        assert_eq!(code, 200, "{name}");
        assert_eq!(serde_json::from_str::<Value>(&name).unwrap(), v["MyENI"]);
    }
    v
}

fn has_event(s: &Sim, reason: &str, text: &str) -> bool {
    s.vpc
        .kube
        .as_ref()
        .unwrap()
        .events()
        .iter()
        .any(|(r, m)| r == reason && m.contains(text))
}

#[test]
fn custom_networking_places_enis_by_eniconfig_and_survives_an_api_outage() {
    let dir = tempfile::tempdir().unwrap();
    // Node 2 grows one address at a time: its first ENI fills before a second is made.
    let mut s = Sim::up_in(
        dir.path(),
        "kc",
        &[t3(&[]), t3(&[("WARM_IP_TARGET", "1")])],
        Mode::CustomNetworking,
    );
    let (a, b) = (
        s.layout.subnet("us-west-2a").unwrap().clone(),
        s.layout.subnet("alt").unwrap().clone(),
    );
    let group = s.layout.pod_group.clone().unwrap();
    for (node, name) in [(0, "a"), (0, "b"), (1, "x")] {
        let ip = s.add_pod(node, name, "").unwrap();
        assert!(in_cidr(&ip, &a.2), "{name} got {ip}, not in {}", a.2);
    }
    // EC2 says so: secondary ENIs in the ENIConfig's subnet with its group; the primary holds
    // no pod address.
    for i in 0..2 {
        for e in s.enis(i) {
            if e.device == 0 {
                assert!(e.secondary.is_empty(), "primary grown: {:?}", e.secondary);
            } else {
                assert_eq!(e.subnet_id, a.1);
                assert_eq!(e.security_groups, std::slice::from_ref(&group));
            }
        }
    }
    let x = s.pod(1, "x").ip.clone();
    assert!(s.ping(s.pod(0, "a"), &x).is_some(), "cross-node ping");
    let primary = s.nodes[0].inst().primary_ip.clone();
    assert_eq!(s.seen_from_internet((0, "a")).unwrap(), primary, "SNAT");
    // Max pods without the primary ENI: (3 - 1) x (6 - 1) + 2.
    let (_, pool) = http_get(s.nodes[0].ns(), "http://127.0.0.1:61679/v1/pool");
    let pool: Value = serde_json::from_str(&pool).unwrap();
    assert_eq!(pool["maxPods"], 12, "{pool}");
    assert_eq!(pool["kubernetes"], "watching", "{pool}");
    let v = eni_configs(&s, 0);
    assert_eq!(v["status"], "found", "{v}");
    assert_eq!(v["MyENI"], "us-west-2a");
    assert_eq!(v["EniConfigLabelDef"], ZONE_LABEL);
    assert_eq!(v["ENI"]["alt"]["subnet"], b.1.as_str());

    // The API server goes away for a minute: pods keep working, ADDs and DELs the pool can
    // serve go on.
    let kube = s.vpc.kube.as_ref().unwrap();
    kube.admin("POST", "/_emu/requests/reset", json!({}));
    let started = std::time::Instant::now();
    kube.outage(60);
    for name in ["c", "d"] {
        let ip = s.add_pod(0, name, "").unwrap();
        assert!(in_cidr(&ip, &a.2));
    }
    s.del_pod(0, "b");
    assert!(s.ping(s.pod(0, "c"), &x).is_some());
    assert!(s.ping(s.pod(1, "x"), &s.pod(0, "a").ip.clone()).is_some());
    eventually(20, "the outage named in the log", || {
        let log = s.nodes[0].node.ipamd().log_text();
        log.contains("the pool keeps serving").then_some(())
    });
    while started.elapsed() < std::time::Duration::from_secs(62) {
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    // Back: the watches resume, and a relabel moves node 2's next ENI only. The watches'
    // backoff (kube's default, as client-go's: up to 30 s doubled by jitter) may have put
    // their next try up to a minute after the last failed one.
    let kube = s.vpc.kube.as_ref().unwrap();
    let node2 = s.nodes[1].inst().id.clone();
    kube.label_node(&node2, &format!("{ZONE_LABEL}=alt"));
    eventually(80, "node 2 follows its new ENIConfig", || {
        (eni_configs(&s, 1)["MyENI"] == "alt").then_some(())
    });
    for n in 0..5 {
        s.add_pod(1, &format!("y{n}"), "").unwrap();
    }
    eventually(20, "node 2's next ENI in the alt subnet", || {
        s.enis(1).iter().any(|e| e.subnet_id == b.1).then_some(())
    });
    let first = s.enis(1).into_iter().find(|e| e.device == 1).unwrap();
    assert_eq!(first.subnet_id, a.1, "the ENI holding pods stays");
    assert!(first.secondary.contains(&x));
    s.down();
}

#[test]
fn a_node_without_its_eniconfig_or_permission_says_why() {
    let dir = tempfile::tempdir().unwrap();
    // The label names an ENIConfig nobody made; and at first ipamd may not list ENIConfigs.
    // The node's zone label is not the key here: it selects "default", which nobody made.
    let mut s = Sim::up_with(
        dir.path(),
        "kn",
        &[t3(&[
            ("ENI_CONFIG_ANNOTATION_DEF", "example.com/eni-config"),
            ("ENI_CONFIG_LABEL_DEF", "example.com/no-such-label"),
            ("MY_POD_NAME", "aws-node-x1"),
        ])],
        Mode::CustomNetworking,
        Opts {
            wait_serving: false,
            kube: true,
        },
    );
    let kube = s.vpc.kube.as_ref().unwrap();
    let node = s.nodes[0].inst().id.clone();
    // Forbidden first: the watch names the permission.
    kube.deny("list", "eniconfigs");
    kube.deny("watch", "eniconfigs");
    s.stop_ipamd(0);
    s.start_ipamd(0);
    eventually(20, "the forbidden watch is named", || {
        let v = eni_configs(&s, 0);
        (v["status"] == "unknown"
            && v["reason"]
                .as_str()
                .is_some_and(|r| r.contains("permission denied")))
        .then_some(())
    });
    let mut n = 0;
    eventually(10, "the ADD refusal names the denied permission", || {
        n += 1;
        let err = s.add_pod(0, &format!("early-{n}"), "").unwrap_err();
        err.contains("permission denied").then_some(())
    });
    eventually(20, "an Event names the missing permission", || {
        has_event(&s, "KubernetesAPIForbidden", "eniconfigs").then_some(())
    });
    let kube = s.vpc.kube.as_ref().unwrap();
    kube.allow_all();
    kube.kubectl(
        &["annotate", "node", &node, "example.com/eni-config=nowhere"],
        None,
    )
    .unwrap();
    eventually(40, "the missing ENIConfig is named", || {
        let v = eni_configs(&s, 0);
        (v["status"] == "missing").then_some(())
    });
    // The ADD's refusal names it too (the pool manager follows the watch at once).
    let mut n = 0;
    eventually(10, "the ADD refusal names the missing ENIConfig", || {
        n += 1;
        let err = s.add_pod(0, &format!("p1-{n}"), "").unwrap_err();
        err.contains("no ENIConfig named \"nowhere\"").then_some(())
    });
    assert!(s.nodes[0]
        .node
        .ipamd()
        .log_text()
        .contains("no ENIConfig named"));
    eventually(20, "an Event names the missing ENIConfig", || {
        has_event(&s, "MissingENIConfig", "nowhere").then_some(())
    });
    // On the Node, naming aws-node's pod (MY_POD_NAME) as the related object.
    let events = s.vpc.kube.as_ref().unwrap().get(&["events", "-A"]);
    let ev = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["reason"] == "MissingENIConfig")
        .unwrap()
        .clone();
    assert_eq!(ev["involvedObject"]["kind"], "Node", "{ev}");
    assert_eq!(ev["related"]["name"], "aws-node-x1", "{ev}");
    assert_eq!(s.enis(0).len(), 1, "no secondary ENI without an ENIConfig");
    // It appears: the next ENI goes to its subnet and the pod starts.
    let (_, subnet, cidr) = s.layout.subnet("alt").unwrap().clone();
    s.vpc
        .kube
        .as_ref()
        .unwrap()
        .eniconfig("nowhere", &subnet, &[]);
    let ip = eventually(30, "an ADD served from the new ENIConfig's subnet", || {
        s.add_pod(0, "p2", "").ok()
    });
    assert!(in_cidr(&ip, &cidr), "{ip} not in {cidr}");
    let eni = s.enis(0).into_iter().find(|e| e.device == 1).unwrap();
    // No groups in the ENIConfig: the primary ENI's, as upstream.
    let primary_groups = s.enis(0)[0].security_groups.clone();
    assert_eq!(eni.security_groups, primary_groups);
    s.down();
}

#[test]
fn pod_ip_annotation_follows_add_and_del_even_across_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sim::up_with(
        dir.path(),
        "ka",
        &[t3(&[("ANNOTATE_POD_IP", "true")])],
        Mode::Default,
        Opts {
            wait_serving: true,
            kube: true,
        },
    );
    let node = s.nodes[0].inst().id.clone();
    let kube = s.vpc.kube.as_ref().unwrap();
    kube.pod("default", "web", &node);
    kube.pod("default", "late", &node);
    let key = "vpc.amazonaws.com/pod-ips";
    let ip = s.add_pod(0, "web", "").unwrap();
    eventually(10, "the annotation after ADD", || {
        (s.vpc
            .kube
            .as_ref()
            .unwrap()
            .annotation("default", "web", key)
            == Some(ip.clone()))
        .then_some(())
    });
    s.del_pod(0, "web");
    eventually(10, "the annotation emptied after DEL", || {
        (s.vpc
            .kube
            .as_ref()
            .unwrap()
            .annotation("default", "web", key)
            == Some(String::new()))
        .then_some(())
    });
    // An ADD while the API server is away is not held up; the annotation follows.
    s.vpc.kube.as_ref().unwrap().outage(5);
    let t = std::time::Instant::now();
    let ip = s.add_pod(0, "late", "").unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(3),
        "ADD waited on the API"
    );
    eventually(30, "the annotation once the API is back", || {
        (s.vpc
            .kube
            .as_ref()
            .unwrap()
            .annotation("default", "late", key)
            == Some(ip.clone()))
        .then_some(())
    });
    s.down();
}

#[test]
fn subnet_discovery_uses_the_tagged_subnet_and_falls_back_when_denied() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sim::up_in(dir.path(), "kd", &[t3(&[])], Mode::SubnetDiscovery);
    let tagged = s.layout.subnet("tagged").unwrap().clone();
    let untagged = s.layout.subnet("untagged").unwrap().clone();
    for n in 0..6 {
        s.add_pod(0, &format!("p{n}"), "").unwrap();
    }
    let enis = s.enis(0);
    let secondary: Vec<_> = enis.iter().filter(|e| e.device > 0).collect();
    assert!(!secondary.is_empty());
    assert!(secondary.iter().all(|e| e.subnet_id == tagged.1));
    assert!(enis.iter().all(|e| e.subnet_id != untagged.1));
    let on_tagged = s.nodes[0]
        .pods
        .iter()
        .find(|p| in_cidr(&p.ip, &tagged.2))
        .map(|p| p.name.clone())
        .expect("a pod on the tagged subnet");
    let primary = s.nodes[0].inst().primary_ip.clone();
    assert_eq!(s.seen_from_internet((0, &on_tagged)).unwrap(), primary);
    s.down();

    // DescribeSubnets denied: the node's own subnet, and the log says so.
    let dir = tempfile::tempdir().unwrap();
    let s = Sim::up_with(
        dir.path(),
        "ke",
        &[t3(&[("WARM_IP_TARGET", "1")])],
        Mode::Default,
        Opts {
            wait_serving: true,
            kube: false,
        },
    );
    let vpc_id = s.nodes[0].inst().vpc_id.clone();
    let tagged = s.vpc.shim.subnet(
        &vpc_id,
        "10.0.32.0/24",
        None,
        json!({"kubernetes.io/role/cni": "1"}),
    );
    s.vpc
        .shim
        .fault(json!({"action": "DescribeSubnets", "kind": "error",
                             "code": "UnauthorizedOperation", "count": -1}));
    let mut s = s;
    for n in 0..6 {
        s.add_pod(0, &format!("q{n}"), "").unwrap();
    }
    eventually(20, "a secondary ENI", || {
        s.enis(0)
            .iter()
            .find(|e| e.device == 1)
            .map(|e| e.subnet_id.clone())
    });
    let node_subnet = s.nodes[0].inst().subnet_id.clone();
    assert!(s
        .enis(0)
        .iter()
        .all(|e| e.subnet_id == node_subnet && e.subnet_id != tagged));
    let log = s.nodes[0].node.ipamd().log_text();
    assert!(
        log.contains("may not call ec2:DescribeSubnets; new ENIs go to the node's subnet"),
        "fallback not said"
    );
    s.down();
}

#[test]
fn trunk_efa_and_efa_only_enis_are_never_adopted_or_touched() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sim::up(
        dir.path(),
        "kt",
        &[NodeSpec::new("p4d.24xlarge", &[("WARM_IP_TARGET", "2")])],
    );
    let inst = s.nodes[0].inst().clone();
    let mut ids = Vec::new();
    for (kind, dev) in [("trunk", 3), ("efa", 4), ("efa-only", 5)] {
        let id = s.vpc.shim.boto3(&format!(
            "e=c.create_network_interface(SubnetId='{}', InterfaceType='{kind}')['NetworkInterface']['NetworkInterfaceId']\n\
             c.attach_network_interface(NetworkInterfaceId=e, InstanceId='{}', DeviceIndex={dev})\nprint(e)",
            inst.subnet_id, inst.id
        ));
        ids.push(id);
    }
    // Found by the reconcile (attached behind ipamd's back) and by a restart.
    eventually(20, "the reconcile names them", || {
        let log = s.nodes[0].node.ipamd().log_text();
        (log.contains("left alone: a trunk ENI")
            && log.contains("left alone: an EFA ENI")
            && log.contains("left alone: an EFA-only ENI"))
        .then_some(())
    });
    s.stop_ipamd(0);
    s.start_ipamd(0);
    for n in 0..3 {
        s.add_pod(0, &format!("p{n}"), "").unwrap();
    }
    let (_, enis) = http_get(s.nodes[0].ns(), "http://127.0.0.1:61679/v1/enis");
    for id in &ids {
        assert!(!enis.contains(id.as_str()), "{id} in the pool: {enis}");
        let e = s
            .vpc
            .shim
            .enis()
            .into_iter()
            .find(|e| e["id"] == id.as_str())
            .unwrap();
        assert!(
            integration::vpc::strs(&e["secondary_ips"]).is_empty(),
            "{id} was assigned to"
        );
        assert_eq!(e["instance_id"], inst.id.as_str(), "{id} was detached");
    }
    s.down();
}

#[test]
fn in_cluster_config_finds_the_api_through_the_service_account() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sim::up_with(
        dir.path(),
        "ki",
        &[t3(&[])],
        Mode::Default,
        Opts {
            wait_serving: true,
            kube: true,
        },
    );
    let (port, kdir) = {
        let k = s.vpc.kube.as_ref().unwrap();
        (k.port.to_string(), k.dir.clone())
    };
    let node = s.nodes[0].inst().id.clone();
    s.stop_ipamd(0);
    // What a pod sees: no kubeconfig, the service's address in the environment and the
    // account's token, CA and namespace at the fixed path (a private mount namespace lends
    // the emulator's files there; /run/netns is carried over for `ip netns exec`).
    let keep = dir.path().join("netns-keep");
    std::fs::create_dir_all(&keep).unwrap();
    let script = format!(
        "set -e; mount --rbind /run/netns {keep}; mount -t tmpfs none /run; \
         mkdir -p /run/netns /run/secrets/kubernetes.io/serviceaccount; \
         mount --rbind {keep} /run/netns; \
         mount --bind {kdir} /run/secrets/kubernetes.io/serviceaccount; exec \"$@\"",
        keep = keep.display(),
        kdir = kdir.display()
    );
    let wrapper = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ];
    let env = s.nodes[0].node.env(&[
        ("ANNOTATE_POD_IP", "true"),
        ("MY_NODE_NAME", &node),
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
        ("KUBERNETES_SERVICE_PORT", &port),
    ]);
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let ndir = s.nodes[0].dir.clone();
    let ns = s.nodes[0].ns().to_string();
    s.nodes[0].node.ipamd = Some(integration::ipamd_proc::Ipamd::start_wrapped(
        &ndir,
        Some(&ns),
        &refs,
        &wrapper,
    ));
    s.vpc.kube.as_ref().unwrap().pod("default", "web", &node);
    let ip = s.add_pod(0, "web", "").unwrap();
    eventually(
        15,
        "the annotation written through the in-cluster config",
        || {
            (s.vpc
                .kube
                .as_ref()
                .unwrap()
                .annotation("default", "web", "vpc.amazonaws.com/pod-ips")
                == Some(ip.clone()))
            .then_some(())
        },
    );
    s.down();
}

/// A cordoned node (upstream's test: the `node.kubernetes.io/unschedulable:NoSchedule` taint,
/// as `kubectl cordon` sets it) gets no new ENI with AWS_MANAGE_ENIS_NON_SCHEDULABLE false (the
/// default), as upstream; uncordoned, it grows again. With the variable true it grows anyway.
#[test]
fn a_cordoned_node_holds_its_pool_unless_told_to_manage_it() {
    for (manage, grows_cordoned) in [("false", false), ("true", true)] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sim::up_with(
            dir.path(),
            "kc",
            &[t3(&[("AWS_MANAGE_ENIS_NON_SCHEDULABLE", manage)])],
            Mode::Default,
            Opts {
                wait_serving: true,
                kube: true,
            },
        );
        // Five pods use the primary's addresses; the warm target then adds a second ENI.
        for i in 0..5 {
            s.add_pod(0, &format!("p{i}"), "").unwrap();
        }
        eventually(30, "a second ENI", || (s.enis(0).len() == 2).then_some(()));
        let node = s.nodes[0].inst().id.clone();
        let taint = r#"{"spec":{"taints":[{"key":"node.kubernetes.io/unschedulable","effect":"NoSchedule"}]}}"#;
        let kube = s.vpc.kube.as_ref().unwrap();
        kube.kubectl(
            &["patch", "node", &node, "--type", "merge", "-p", taint],
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        std::thread::sleep(std::time::Duration::from_secs(2));
        // Five more fill the second ENI; the warm target then wants a third.
        for i in 5..10 {
            s.add_pod(0, &format!("p{i}"), "").unwrap();
        }
        std::thread::sleep(std::time::Duration::from_secs(4));
        let enis = s.enis(0).len();
        if grows_cordoned {
            assert_eq!(
                enis, 3,
                "AWS_MANAGE_ENIS_NON_SCHEDULABLE=true: grows while cordoned"
            );
        } else {
            assert_eq!(enis, 2, "cordoned: no new ENI");
            let log = s.nodes[0].node.ipamd().log_text();
            assert!(log.contains("the node is cordoned"), "says why");
            let kube = s.vpc.kube.as_ref().unwrap();
            kube.kubectl(
                &[
                    "patch",
                    "node",
                    &node,
                    "--type",
                    "merge",
                    "-p",
                    r#"{"spec":{"taints":[]}}"#,
                ],
                None,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            eventually(30, "a third ENI once uncordoned", || {
                (s.enis(0).len() == 3).then_some(())
            });
        }
        s.down();
    }
}
