//! End to end on the simulated VPC: libcni -> aws-cni (+ portmap) -> ipamd -> EC2 shim, pods
//! in namespaces pinging across nodes through the router, SNAT seen from the internet.

use integration::cloud::eventually;
use integration::netns::Netns;
use integration::sim::{tcp_text, whoami, NodeSpec, Sim};
use integration::{ip_json, ping};
use serde_json::Value;

fn sim(nodes: &[NodeSpec]) -> (Sim, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let s = Sim::up(dir.path(), "e", nodes);
    (s, dir)
}

fn t3(env: &[(&str, &str)]) -> NodeSpec {
    NodeSpec::new("t3.medium", env)
}

#[test]
fn cross_node_pods_reach_each_other_and_the_internet_through_snat() {
    let (mut s, _dir) = sim(&[t3(&[]), t3(&[])]);
    let ports = r#"[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]"#;
    s.add_pod(0, "web", ports).unwrap();
    for name in ["a", "b", "c", "d", "e"] {
        s.add_pod(0, name, "").unwrap();
    }
    s.add_pod(1, "x", "").unwrap();
    let on_secondary: Vec<String> = s.nodes[0]
        .pods
        .iter()
        .filter(|p| s.device_of(0, &p.ip).is_some_and(|d| d > 0))
        .map(|p| p.name.clone())
        .collect();
    assert!(!on_secondary.is_empty(), "a pod on a secondary ENI");
    let x_ip = s.pod(1, "x").ip.clone();
    for p in &s.nodes[0].pods {
        assert!(
            s.ping(p, &x_ip).is_some(),
            "{} ({}) -> x ({x_ip})",
            p.name,
            p.ip
        );
        assert!(
            s.ping(s.pod(1, "x"), &p.ip).is_some(),
            "x -> {} ({})",
            p.name,
            p.ip
        );
    }
    // Inside the VPC a pod keeps its address (node2's pod x sees node1's pods as themselves)...
    let mut server = whoami(&s.pod(1, "x").ns.name, 7000);
    for name in ["a", on_secondary[0].as_str()] {
        let p = s.pod(0, name);
        assert_eq!(tcp_text(&p.ns.name, &x_ip, 7000).unwrap(), p.ip, "{name}");
    }
    let _ = server.kill();
    let _ = server.wait();
    // ... and beyond it, every pod is its node's primary address.
    for (node, name) in [(0, "a"), (0, on_secondary[0].as_str()), (1, "x")] {
        let primary = s.nodes[node].inst().primary_ip.clone();
        assert_eq!(
            s.seen_from_internet((node, name)).unwrap(),
            primary,
            "{name}"
        );
    }
    // A port mapping on node1 reached from node2's pod through portmap's DNAT.
    let mut web = integration::sim::serve_text(&s.pod(0, "web").ns.name, 80, "web");
    let node1 = s.nodes[0].inst().primary_ip.clone();
    assert_eq!(
        tcp_text(&s.pod(1, "x").ns.name, &node1, 8080).unwrap(),
        "web"
    );
    let _ = web.kill();
    let _ = web.wait();
    s.down();
}

fn links(ns: &str) -> Vec<String> {
    ip_json(ns, &["link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect()
}

fn rules(ns: &str) -> Vec<Value> {
    ip_json(ns, &["rule", "show"]).as_array().unwrap().clone()
}

#[test]
fn twenty_pods_on_a_t3_medium_then_all_deleted() {
    let (mut s, _dir) = sim(&[t3(&[])]);
    let ns = s.nodes[0].ns().to_string();
    let base_rules = rules(&ns).len();
    let mut failures = Vec::new();
    for i in 0..20 {
        match s.add_pod(0, &format!("p{i}"), "") {
            Ok(_) => assert!(i < 15, "pod {i} must not get an address"),
            Err(e) => {
                assert!(i >= 15, "pod {i} failed: {e}");
                failures.push(e);
            }
        }
    }
    assert_eq!(s.nodes[0].pods.len(), 15);
    for e in &failures {
        assert!(
            e.contains("t3.medium: 3 ENIs") && e.contains("all 3 ENIs attached"),
            "the runtime is told the instance's limit: {e}"
        );
    }
    // The failed ones left nothing: 15 veths, the 3 ENIs, loopback.
    let l = links(&ns);
    assert_eq!(
        l.iter().filter(|n| n.starts_with("eni")).count(),
        15,
        "{l:?}"
    );
    assert_eq!(l.len(), 15 + 3 + 1, "{l:?}");
    let enis = s.enis(0);
    assert_eq!(enis.len(), 3);
    assert!(enis.iter().all(|e| e.secondary.len() == 5));
    // Every pod reaches the VPC router, each by its own ENI (the router's rp_filter checks).
    for p in &s.nodes[0].pods {
        assert!(ping(&p.ns.name, "10.0.0.1"), "{} ({})", p.name, p.ip);
    }

    let names: Vec<String> = s.nodes[0].pods.iter().map(|p| p.name.clone()).collect();
    for n in &names {
        s.del_pod(0, n);
    }
    // No veth, route or pod rule left; the checkpoint is empty.
    let l = links(&ns);
    assert!(!l.iter().any(|n| n.starts_with("eni")), "{l:?}");
    let main = ip_json(&ns, &["route", "show", "table", "main"]);
    assert_eq!(
        main.as_array().unwrap().len(),
        2,
        "default + subnet only: {main}"
    );
    let ck: Value =
        serde_json::from_slice(&std::fs::read(&s.nodes[0].node.ipamd().checkpoint).unwrap())
            .unwrap();
    assert!(ck["allocations"].as_array().unwrap().is_empty(), "{ck}");
    // After the cooldown the surplus ENIs go back: WARM_ENI_TARGET=1 keeps the primary's five.
    eventually(40, "ENIs released back to the warm target", || {
        let e = s.enis(0);
        (e.len() == 1 && e[0].secondary.len() == 5).then_some(())
    });
    eventually(10, "ENI links gone", || {
        (links(&ns).len() == 2).then_some(())
    });
    let r = rules(&ns);
    let prios: Vec<u64> = r.iter().filter_map(|x| x["priority"].as_u64()).collect();
    assert_eq!(
        prios,
        vec![0, 1024, 32766, 32767],
        "only the node-wide rules stay (pod rules and eth1/eth2's rules gone): {r:?}"
    );
    assert_eq!(r.len(), base_rules);
    s.down();
}

#[test]
fn ipamd_restart_keeps_pods_and_del_without_ipamd_cleans_the_host() {
    let (mut s, _dir) = sim(&[t3(&[("IPAMD_ALLOCATION_GRACE", "3")])]);
    for name in ["a", "b", "c"] {
        s.add_pod(0, name, "").unwrap();
    }
    let ips: Vec<String> = s.nodes[0].pods.iter().map(|p| p.ip.clone()).collect();
    s.stop_ipamd(0);
    // DEL while ipamd is down still removes the pod's veth and rules.
    let ns = s.nodes[0].ns().to_string();
    let veth = cni_common::naming::host_veth_name("eni", "default", "c");
    assert!(links(&ns).contains(&veth));
    s.del_pod(0, "c");
    assert!(!links(&ns).contains(&veth), "{:?}", links(&ns));
    assert!(!rules(&ns).iter().any(|r| r["dst"] == ips[2].as_str()));
    // Pods keep working without ipamd, and after it comes back.
    assert!(ping(&s.pod(0, "a").ns.name, "10.0.0.1"));
    s.start_ipamd(0);
    let ck_path = s.nodes[0].node.ipamd().checkpoint.clone();
    let held = |ip: &str| {
        let ck: Value = serde_json::from_slice(&std::fs::read(&ck_path).unwrap()).unwrap();
        ck["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["ipv4"]["address"] == ip || a["ipv4"] == ip)
    };
    assert!(
        held(&ips[0]) && held(&ips[1]),
        "running pods keep their addresses"
    );
    for p in &s.nodes[0].pods {
        assert!(ping(&p.ns.name, "10.0.0.1"), "{} after restart", p.name);
    }
    // The address whose DEL never reached ipamd goes back once its grace is over.
    eventually(20, "the orphaned allocation released", || {
        (!held(&ips[2])).then_some(())
    });
    // A new pod does not get a running pod's address.
    let new_ip = s.add_pod(0, "d", "").unwrap();
    assert!(new_ip != ips[0] && new_ip != ips[1]);
    s.down();
}

#[test]
fn failed_add_leaves_no_namespace_state() {
    // Pods beyond the limit on a node with MAX_ENI=1: the sandbox stays empty.
    let (mut s, _dir) = sim(&[t3(&[("MAX_ENI", "1")])]);
    for i in 0..5 {
        s.add_pod(0, &format!("p{i}"), "").unwrap();
    }
    let extra = Netns::new("ex");
    let out = s.nodes[0].cni.run("add", "cid-extra", &extra, "extra", "");
    assert!(!out.status.success());
    assert!(extra.links().is_empty());
    let state_dir = s.nodes[0].dir.join("state").join("aws-cni");
    let files: Vec<_> = std::fs::read_dir(&state_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(files.len(), 5, "{files:?}");
    s.down();
}

#[test]
fn an_eni_attached_behind_ipamds_back_is_adopted_and_its_pods_work() {
    // Old enough never: the adopted ENI must not be given back by scale-down mid-test.
    let (mut s, _dir) = sim(&[t3(&[("IPAMD_MIN_ENI_AGE", "3600")]), t3(&[])]);
    s.add_pod(1, "x", "").unwrap();
    let ns = s.nodes[0].ns().to_string();
    let inst = s.nodes[0].inst().clone();
    let eni = s.vpc.shim.create_eni(&inst, &[], "attached by hand", 5);
    s.vpc.shim.attach_eni(&inst, &eni, 2);
    eventually(30, "the ENI adopted", || {
        s.nodes[0]
            .node
            .ipamd()
            .log_text()
            .contains("adopted: networking set up")
            .then_some(())
    });
    let e = s.enis(0).into_iter().find(|e| e.id == eni).unwrap();
    // Its link, table 3 and source rule are in place, as for an ENI ipamd made itself.
    let link = ip_json(&ns, &["link", "show", "eth2"]);
    assert!(link[0]["flags"].to_string().contains("UP"), "{link}");
    let table = integration::sh(&["ip", "-n", &ns, "route", "show", "table", "3"]);
    assert!(table.contains("default via"), "{table}");
    let rule = rules(&ns)
        .into_iter()
        .find(|r| r["priority"] == 32765 && r["src"] == e.primary_ip.as_str());
    assert!(rule.is_some_and(|r| r["table"] == "3"), "{:?}", rules(&ns));
    // Pods on it: fill the other ENIs first (the adopted one's addresses come last).
    let x_ip = s.pod(1, "x").ip.clone();
    let mut on_it = None;
    for i in 0..15 {
        let name = format!("p{i}");
        let ip = s.add_pod(0, &name, "").unwrap();
        if e.secondary.contains(&ip) {
            on_it = Some(name);
            break;
        }
    }
    let name = on_it.expect("a pod on the adopted ENI");
    let p = s.pod(0, &name);
    assert!(s.ping(p, &x_ip).is_some(), "{name} ({}) -> x", p.ip);
    assert!(s.ping(s.pod(1, "x"), &p.ip).is_some(), "x -> {name}");
}
