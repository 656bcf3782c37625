//! IPv6 clusters through the real binaries on the simulated VPC (router with fe80:ec2::1 and a
//! route per /80, internet on both families): ipamd with ENABLE_IPv6, aws-cni, egress-cni.

use std::collections::{HashMap, HashSet};

use integration::cloud::eventually;
use integration::ipamd_proc::{add_req, client, rt};
use integration::sim::{http_get, Mode, NodeSpec, Sim};
use integration::vpc::{INTERNET_IP, INTERNET_IP6};
use integration::{ip_json, ping_eventually};
use serde_json::Value;

fn t3(env: &[(&str, &str)]) -> NodeSpec {
    NodeSpec::new("t3.medium", env)
}

fn ipv6_sim(prefix: &str, specs: &[NodeSpec]) -> (Sim, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let s = Sim::up_in(dir.path(), prefix, specs, Mode::Ipv6);
    (s, dir)
}

fn in_net(ip: &str, cidr: &str) -> bool {
    let net: ipnet::IpNet = cidr.parse().unwrap();
    net.contains(&ip.parse::<std::net::IpAddr>().unwrap())
}

/// The node's /80, as EC2 shows it.
fn prefix_of(s: &Sim, node: usize) -> String {
    let (_, prefixes) = s.vpc.shim.ipv6(&s.nodes[node].inst().id);
    assert_eq!(prefixes.len(), 1, "{prefixes:?}");
    prefixes[0].clone()
}

fn checkpoint(s: &Sim, node: usize) -> Value {
    serde_json::from_slice(&std::fs::read(&s.nodes[node].node.ipamd().checkpoint).unwrap()).unwrap()
}

fn nat_rules(ns: &str, v6: bool) -> String {
    let save = if v6 {
        "ip6tables-save"
    } else {
        "iptables-save"
    };
    integration::sh(&["ip", "netns", "exec", ns, save, "-t", "nat"])
}

#[test]
fn ipv6_pods_reach_each_other_and_both_families_and_ipv4_pods_get_ipv6_egress() {
    let v4_node = t3(&[
        ("ENABLE_IPv6", "false"),
        ("ENABLE_IPv4", "true"),
        ("ENABLE_PREFIX_DELEGATION", "false"),
        ("ENABLE_V6_EGRESS", "true"),
    ]);
    let (mut s, _dir) = ipv6_sim("s6", &[t3(&[]), t3(&[]), v4_node]);
    let a = s.add_pod(0, "a", "").unwrap();
    let x = s.add_pod(1, "x", "").unwrap();
    let z = s.add_pod(2, "z", "").unwrap();
    assert!(in_net(&a, &prefix_of(&s, 0)), "{a}");
    assert!(in_net(&x, &prefix_of(&s, 1)), "{x}");
    assert!(z.parse::<std::net::Ipv4Addr>().is_ok(), "{z}");
    // ipamd attached nothing and assigned one /80 to the primary ENI only.
    assert_eq!(s.enis(0).len(), 1);

    assert!(s.ping(s.pod(0, "a"), &x).is_some(), "a -> x over IPv6");
    assert!(s.ping(s.pod(1, "x"), &a).is_some(), "x -> a over IPv6");
    // IPv6 leaves as the pod's own address; IPv4 through egress-cni as the node's IPv4.
    assert_eq!(s.seen_at((0, "a"), INTERNET_IP6).unwrap(), a);
    let node1_v4 = s.nodes[0].inst().primary_ip.clone();
    assert_eq!(s.seen_at((0, "a"), INTERNET_IP).unwrap(), node1_v4);
    // The IPv4 node's pod reaches IPv6 as the node's IPv6 (ENABLE_V6_EGRESS).
    let node3_v6 = s.nodes[2].inst().ipv6.clone().unwrap();
    assert_eq!(s.seen_at((2, "z"), INTERNET_IP6).unwrap(), node3_v6);

    // ipamd's view: the pod's address in upstream's checkpoint field and in /v1/enis.
    let ck = checkpoint(&s, 0);
    let entry = &ck["allocations"][0];
    assert_eq!(entry["ipv6"], a.as_str(), "{ck}");
    assert!(entry.get("ipv4").is_none(), "{ck}");
    let node_ns = s.nodes[0].ns().to_string();
    let (st, body) = http_get(&node_ns, "http://127.0.0.1:61679/v1/enis");
    assert_eq!(st, 200, "{body}");
    let enis: Value = serde_json::from_str(&body).unwrap();
    let eni = enis["0"]["ENIs"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    let cidr = &eni["IPv6Cidrs"][prefix_of(&s, 0).as_str()];
    assert_eq!(cidr["AddressFamily"], "6", "{eni}");
    assert!(cidr["IPAddresses"].get(a.as_str()).is_some(), "{eni}");

    // The host side as upstream's: IPv6 forwarding, the primary ENI still taking the router's
    // advertisements, and the REJECT of new connections to other pods' egress addresses (the
    // IPv4 node with IPv6 egress has the IPv6 one).
    let sysctl = |ns: &str, key: &str| {
        integration::sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "cat",
            &format!("/proc/sys/net/ipv6/conf/{key}"),
        ])
        .trim()
        .to_string()
    };
    assert_eq!(sysctl(&node_ns, "all/forwarding"), "1");
    assert_eq!(sysctl(&node_ns, "eth0/accept_ra"), "2");
    let forward = |ns: &str, cmd: &str| {
        integration::sh(&[
            "ip", "netns", "exec", ns, cmd, "-t", "filter", "-S", "FORWARD",
        ])
    };
    assert!(
        forward(&node_ns, "iptables").contains("-d 169.254.172.0/22 -m conntrack --ctstate NEW -m comment --comment \"Block Node Local Pod access via IPv4\" -j REJECT"),
        "{}",
        forward(&node_ns, "iptables")
    );
    let node3_ns = s.nodes[2].ns().to_string();
    assert!(
        forward(&node3_ns, "ip6tables").contains("-d fd00::ac:0/118"),
        "{}",
        forward(&node3_ns, "ip6tables")
    );
    // What the network policy agent is told: the node's IPv6 address.
    let socket = s.nodes[0].node.ipamd().socket.clone();
    let r = rt().block_on(async {
        let ch = cni_common::grpc::connect(
            &socket,
            std::time::Duration::from_secs(2),
            std::time::Duration::from_secs(2),
        )
        .await
        .unwrap();
        cni_proto::config_server_backend_client::ConfigServerBackendClient::new(ch)
            .get_network_policy_configs(())
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(Some(r.node_i_pv6), s.nodes[0].inst().ipv6.clone());

    // CHECK through the whole chain, then DEL removes the pod's host side and its egress.
    let p = s.pod(0, "a");
    s.nodes[0].cni.ok("check", &p.cid, &p.ns, "a", "");
    assert!(nat_rules(&node_ns, false).contains("CNI-E4-"));
    s.del_pod(0, "a");
    let veth = cni_common::naming::host_veth_name("eni", "default", "a");
    eventually(15, "the pod's host veth gone", || {
        (!s.nodes[0].node.ns.links().contains(&veth)).then_some(())
    });
    let routes = ip_json(&node_ns, &["-6", "route", "show"]);
    assert!(
        !routes
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == a.as_str()),
        "{routes}"
    );
    let rules = ip_json(&node_ns, &["-6", "rule", "show"]);
    assert!(
        !rules
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == a.as_str()),
        "{rules}"
    );
    assert!(!nat_rules(&node_ns, false).contains("CNI-E4-"));
    s.down();
}

#[test]
fn kill9_during_ipv6_adds_loses_and_doubles_nothing() {
    let (mut s, _dir) = ipv6_sim("k6", &[t3(&[])]);
    let prefix = prefix_of(&s, 0);
    let socket = s.nodes[0].node.ipamd().socket.clone();
    let rt = rt();
    let acked: HashMap<String, String> = rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..100 {
            let socket = socket.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut c = client(&socket).await;
                if let Ok(r) = c.add_network(add_req(&format!("burst{i}"))).await {
                    let r = r.into_inner();
                    if r.success {
                        let _ = tx.send((
                            format!("burst{i}"),
                            r.ip_allocation_metadata[0].i_pv6_addr.clone(),
                        ));
                    }
                }
            });
        }
        drop(tx);
        let mut acked = HashMap::new();
        while let Some((k, ip)) = rx.recv().await {
            acked.insert(k, ip);
            if acked.len() == 30 {
                if let Some(d) = s.nodes[0].node.ipamd.as_mut() {
                    d.kill9();
                }
            }
        }
        acked
    });
    assert!(acked.len() >= 30, "only {} acknowledged", acked.len());
    let ips: HashSet<&String> = acked.values().collect();
    assert_eq!(ips.len(), acked.len(), "an address was given twice");
    assert!(ips.iter().all(|ip| in_net(ip, &prefix)), "{ips:?}");

    s.nodes[0].node.ipamd = None;
    s.start_ipamd(0);
    let socket = s.nodes[0].node.ipamd().socket.clone();
    // Same /80 after the restart: EC2 lists it, no second one is assigned.
    assert_eq!(prefix_of(&s, 0), prefix);
    rt.block_on(async {
        let mut c = client(&socket).await;
        for (k, ip) in &acked {
            let r = c.add_network(add_req(k)).await.unwrap().into_inner();
            assert_eq!(
                &r.ip_allocation_metadata[0].i_pv6_addr, ip,
                "{k} lost its address across kill -9"
            );
        }
        for i in 0..50 {
            let r = c
                .add_network(add_req(&format!("after{i}")))
                .await
                .unwrap()
                .into_inner();
            assert!(r.success, "{r:?}");
            let ip = &r.ip_allocation_metadata[0].i_pv6_addr;
            assert!(!ips.contains(ip), "address {ip} handed out twice");
        }
    });
    s.down();
}

#[test]
fn ipv6_pods_survive_an_ipamd_restart_and_del_without_ipamd_cleans_the_host() {
    let (mut s, _dir) = ipv6_sim("r6", &[t3(&[("IPAMD_ALLOCATION_GRACE", "3")])]);
    let ips: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| s.add_pod(0, n, "").unwrap())
        .collect();
    let ns = s.nodes[0].ns().to_string();
    s.stop_ipamd(0);
    let veth = cni_common::naming::host_veth_name("eni", "default", "c");
    s.del_pod(0, "c");
    eventually(15, "c's host veth gone", || {
        (!s.nodes[0].node.ns.links().contains(&veth)).then_some(())
    });
    let rules = ip_json(&ns, &["-6", "rule", "show"]);
    assert!(
        !rules
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == ips[2].as_str()),
        "{rules}"
    );
    assert!(ping_eventually(&s.pod(0, "a").ns.name, INTERNET_IP6));
    s.start_ipamd(0);
    let held = |s: &Sim, ip: &str| {
        checkpoint(s, 0)["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["ipv6"] == ip)
    };
    assert!(held(&s, &ips[0]) && held(&s, &ips[1]));
    eventually(20, "c's address released (its DEL was recorded)", || {
        (!held(&s, &ips[2])).then_some(())
    });
    for p in &s.nodes[0].pods {
        assert!(
            ping_eventually(&p.ns.name, INTERNET_IP6),
            "{} after restart",
            p.name
        );
    }
    let d = s.add_pod(0, "d", "").unwrap();
    assert!(d != ips[0] && d != ips[1]);
    s.down();
}

/// What the entrypoint writes: egress-cni chained with the node's address of the other family
/// from IMDS; an IPv4 node without IPv6 gets no IPv6 egress and is told so, as upstream.
#[test]
fn the_entrypoint_chains_egress_cni_with_the_nodes_address_from_imds() {
    use integration::cloud::{FakeImds, Shim};
    let dir = tempfile::tempdir().unwrap();
    let shim = Shim::start(dir.path(), 0);
    let v6 = shim.instance_v6("t3.medium", "10.0.0.0/24");
    let v4 = shim.instance("t3.medium", "10.0.2.0/24");
    let imds_of = |inst: &str| {
        let d = dir.path().join(inst);
        std::fs::create_dir_all(&d).unwrap();
        FakeImds::start(&d, &shim, inst, 0)
    };
    let imds = [
        (v6.id.clone(), imds_of(&v6.id)),
        (v4.id.clone(), imds_of(&v4.id)),
    ];
    let conflist = |inst: &str, env: &[(&str, &str)]| -> (Value, String) {
        let url = &imds.iter().find(|(i, _)| i == inst).unwrap().1.url;
        let out = std::process::Command::new(integration::bin("aws-vpc-cni"))
            .arg("conflist")
            .env_clear()
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", url)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        (
            serde_json::from_slice(&out.stdout).unwrap(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ipv6_node = [
        ("ENABLE_IPv6", "true"),
        ("ENABLE_IPv4", "false"),
        ("ENABLE_PREFIX_DELEGATION", "true"),
    ];
    let (v, _) = conflist(&v6.id, &ipv6_node);
    let e = &v["plugins"][1];
    assert_eq!(e["type"], "egress-cni", "{v}");
    assert_eq!(e["enabled"], "true");
    assert_eq!(e["nodeIP"], v6.primary_ip.as_str());
    assert_eq!(e["ipam"]["ranges"][0][0]["subnet"], "169.254.172.0/22");
    assert_eq!(e["ipam"]["dataDir"], "/run/cni/v6pd/egress-v4-ipam");

    let (v, err) = conflist(&v6.id, &[("ENABLE_V6_EGRESS", "true")]);
    let e = &v["plugins"][1];
    assert_eq!(e["type"], "egress-cni", "{v} {err}");
    assert_eq!(e["nodeIP"], v6.ipv6.clone().unwrap().as_str());
    assert_eq!(e["ipam"]["ranges"][0][0]["subnet"], "fd00::ac:00/118");

    let (v, err) = conflist(&v4.id, &[("ENABLE_V6_EGRESS", "true")]);
    assert_eq!(v["plugins"].as_array().unwrap().len(), 2, "{v}");
    assert!(err.contains("ENABLE_V6_EGRESS"), "{err}");
    // IPv4 egress switched off in an IPv6 cluster: no egress entry.
    let mut off = ipv6_node.to_vec();
    off.push(("ENABLE_V4_EGRESS", "false"));
    let (v, _) = conflist(&v6.id, &off);
    assert!(
        !v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["type"] == "egress-cni"),
        "{v}"
    );
}
