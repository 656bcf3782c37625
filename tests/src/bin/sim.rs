//! sim: the simulated cluster on this machine.
//!
//! `sim run [--keep] [--custom-networking | --subnet-discovery]`: a VPC of network namespaces (router, internet), the EC2 shim (moto), two
//! t3.medium nodes each with its fake IMDS and the real ipamd, pods created by libcni through
//! `aws-cni` + `portmap`; then a report: the ENIs and addresses each node holds, pod addresses,
//! cross-node pings, the source address the internet sees (SNAT), and a port mapping reached
//! from the other node. Everything is torn down at the end unless `--keep`.
//! `--custom-networking`: pods take addresses of ENIConfig subnets in 100.64.0.0/16 (the
//! Kubernetes API emulator serves the ENIConfigs and the nodes' zone labels); node 2 is then
//! relabelled to another ENIConfig, and only its new ENIs follow. `--subnet-discovery`: each
//! node sits in a /28 of its own, and ENIs go to the subnet tagged `kubernetes.io/role/cni`.
//! `--ipv6`: an IPv6 cluster (ENABLE_IPv6): two nodes whose pods get IPv6 addresses from each
//! node's /80 and reach IPv4 through egress-cni, and a third, IPv4 node of the same VPC with
//! ENABLE_V6_EGRESS whose pods reach IPv6 the same way.
//! `sim down`: remove whatever a run (even a crashed one) left: processes, namespaces, files.

use std::path::PathBuf;
use std::process::ExitCode;

use integration::in_cidr;
use integration::sim::{serve_text, tcp_text, teardown, Mode, NodeSpec, Sim, ZONE_LABEL};

const PREFIX: &str = "acs";

fn state_dir() -> PathBuf {
    std::env::var_os("AWS_CNI_SIM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/aws-cni-sim"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("down") => {
            for line in teardown(&state_dir(), PREFIX) {
                println!("sim: {line}");
            }
            ExitCode::SUCCESS
        }
        Some("run") => {
            let keep = args.iter().any(|a| a == "--keep");
            let mut mode = Mode::Default;
            for a in &args[1..] {
                match a.as_str() {
                    "--keep" => {}
                    "--custom-networking" if mode == Mode::Default => mode = Mode::CustomNetworking,
                    "--subnet-discovery" if mode == Mode::Default => mode = Mode::SubnetDiscovery,
                    "--ipv6" if mode == Mode::Default => mode = Mode::Ipv6,
                    other => {
                        eprintln!("sim: unknown or conflicting argument {other:?}");
                        return ExitCode::from(2);
                    }
                }
            }
            if keep {
                integration::keep_helpers();
            }
            let go = |keep, mode| {
                if mode == Mode::Ipv6 {
                    run_ipv6(keep)
                } else {
                    run(keep, mode)
                }
            };
            match std::panic::catch_unwind(|| go(keep, mode)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(_) => {
                    eprintln!("sim: failed; cleaning up");
                    teardown(&state_dir(), PREFIX);
                    ExitCode::FAILURE
                }
            }
        }
        _ => {
            eprintln!(
                "usage: sim run [--keep] [--custom-networking | --subnet-discovery | --ipv6] | sim down"
            );
            ExitCode::from(2)
        }
    }
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "ok  "
    } else {
        "FAIL"
    }
}

fn run(keep: bool, mode: Mode) -> bool {
    let dir = fresh_state_dir();
    let what = match mode {
        Mode::Default => "",
        Mode::CustomNetworking => {
            " (custom networking: ENIConfigs in 100.64.0.0/16, Kubernetes API emulator)"
        }
        Mode::SubnetDiscovery => " (subnet discovery: nodes in /28 subnets, one tagged subnet)",
        Mode::Ipv6 => " (IPv6)",
    };
    println!("sim: starting the EC2 shim, the VPC router and two t3.medium nodes{what} ...");
    let t0 = std::time::Instant::now();
    let spec = || NodeSpec::new("t3.medium", &[]);
    let mut sim = Sim::up_in(&dir, PREFIX, &[spec(), spec()], mode);
    println!(
        "sim: both ipamds serving after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    let mut all_ok = true;
    if mode == Mode::CustomNetworking {
        // Node 2 now names another ENIConfig: ENIs it already has stay where they are.
        let node2 = sim.nodes[1].inst().id.clone();
        if let Some(k) = &sim.vpc.kube {
            k.label_node(&node2, &format!("{ZONE_LABEL}=alt"));
        }
        println!("sim: node2 relabelled {ZONE_LABEL}=alt");
        // The watch delivers the label before the pods below make node 2 grow.
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    // Node 1: a web pod with a host port, then enough pods that one lands on a secondary ENI.
    let ports = r#"[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]"#;
    let mut made = Vec::new();
    for (node, name, p) in [
        (0, "web", ports),
        (0, "a", ""),
        (0, "b", ""),
        (0, "c", ""),
        (0, "d", ""),
        (0, "e", ""),
        (1, "x", ""),
        (1, "y", ""),
    ] {
        match sim.add_pod(node, name, p) {
            Ok(_) => made.push((node, name)),
            Err(e) => {
                all_ok = false;
                println!("sim: ADD {name} on node{} failed: {e}", node + 1);
            }
        }
    }

    println!();
    println!("== nodes (EC2's view, which ipamd holds) ==");
    for (i, n) in sim.nodes.iter().enumerate() {
        println!(
            "node{} {} ({}) primary {}",
            i + 1,
            n.inst().id,
            n.inst().instance_type,
            n.inst().primary_ip
        );
        for e in sim.enis(i) {
            let where_ = if mode == Mode::Default {
                String::new()
            } else {
                format!(
                    " [subnet {}, groups {}]",
                    sim.layout.name_of(&e.subnet_id),
                    e.security_groups.join(",")
                )
            };
            let (dev, id, ip, sec, pfx) = (e.device, e.id, e.primary_ip, e.secondary, e.prefixes);
            println!(
                "  eth{dev} {id} {ip}: {} secondary IPs {}{}{where_}",
                sec.len(),
                sec.join(" "),
                if pfx.is_empty() {
                    String::new()
                } else {
                    format!(", prefixes {}", pfx.join(" "))
                }
            );
        }
        for p in &n.pods {
            println!(
                "  pod {:<4} {:<12} on eth{}",
                p.name,
                p.ip,
                sim.device_of(i, &p.ip)
                    .map_or("?".into(), |d| d.to_string())
            );
        }
    }

    // ipamd's own calls, before the checks below describe subnets themselves.
    let calls = sim.vpc.shim.calls();
    match mode {
        Mode::Default => {}
        Mode::CustomNetworking => all_ok &= custom_networking_checks(&mut sim),
        Mode::SubnetDiscovery => all_ok &= subnet_discovery_checks(&sim),
        Mode::Ipv6 => {}
    }
    if mode != Mode::Default {
        let n = |a: &str| calls["by_action"][a].as_u64().unwrap_or(0);
        println!(
            "     ipamd's EC2 calls (both nodes, before these checks): {} CreateNetworkInterface, {} DescribeSubnets",
            n("CreateNetworkInterface"),
            n("DescribeSubnets")
        );
    }

    println!();
    println!("== pod to pod across nodes ==");
    let x = sim.pod(1, "x").ip.clone();
    for (node, name) in made.iter().filter(|(n, _)| *n == 0) {
        let p = sim.pod(*node, name);
        let r = sim.ping(p, &x);
        all_ok &= r.is_some();
        println!(
            "{} node1/{name} ({}) -> node2/x ({x}){}",
            mark(r.is_some()),
            p.ip,
            r.map_or(String::new(), |ms| format!(": {ms} ms"))
        );
    }
    let e_ip = sim.pod(0, "e").ip.clone();
    let r = sim.ping(sim.pod(1, "y"), &e_ip);
    all_ok &= r.is_some();
    println!(
        "{} node2/y -> node1/e ({e_ip}, eth{})",
        mark(r.is_some()),
        sim.device_of(0, &e_ip).unwrap_or(0)
    );

    println!();
    println!("== pod to internet ({}) ==", integration::vpc::INTERNET_IP);
    for (node, name) in [(0, "a"), (0, "e"), (1, "x")] {
        let pod_ip = sim.pod(node, name).ip.clone();
        let primary = sim.nodes[node].inst().primary_ip.clone();
        match sim.seen_from_internet((node, name)) {
            Ok(seen) => {
                let ok = seen == primary;
                all_ok &= ok;
                println!(
                    "{} node{}/{name} ({pod_ip}) seen as {seen} (node{} primary {primary}: SNAT)",
                    mark(ok),
                    node + 1,
                    node + 1
                );
            }
            Err(e) => {
                all_ok = false;
                println!("FAIL node{}/{name}: {e}", node + 1);
            }
        }
    }

    println!();
    println!("== port mapping (portmap) ==");
    let web = sim.pod(0, "web");
    let mut server = serve_text(&web.ns.name, 80, "hello from web");
    let node1 = sim.nodes[0].inst().primary_ip.clone();
    let r = tcp_text(&sim.pod(1, "x").ns.name, &node1, 8080);
    let _ = server.kill();
    let _ = server.wait();
    let ok = r.as_deref() == Ok("hello from web");
    all_ok &= ok;
    println!(
        "{} node2/x -> node1 {node1}:8080 -> web ({}):80: {}",
        mark(ok),
        sim.pod(0, "web").ip,
        r.unwrap_or_else(|e| e)
    );

    finish(sim, keep, all_ok)
}

/// Pods in the ENIConfigs' subnets with their security group; node 2's first ENI kept in the
/// old ENIConfig's subnet after the relabel, its next one in the new one's.
fn custom_networking_checks(sim: &mut Sim) -> bool {
    let mut ok_all = true;
    let (a, b) = match (sim.layout.subnet("us-west-2a"), sim.layout.subnet("alt")) {
        (Some(a), Some(b)) => (a.clone(), b.clone()),
        _ => return false,
    };
    let group = sim.layout.pod_group.clone().unwrap_or_default();
    println!();
    println!("== custom networking (EC2's view) ==");
    for i in 0..sim.nodes.len() {
        for e in sim.enis(i).iter().filter(|e| e.device > 0) {
            let ok =
                (e.subnet_id == a.1 || e.subnet_id == b.1) && e.security_groups == [group.clone()];
            ok_all &= ok;
            println!(
                "{} node{} eth{} in {} with group {}",
                mark(ok),
                i + 1,
                e.device,
                sim.layout.name_of(&e.subnet_id),
                e.security_groups.join(",")
            );
        }
        for p in &sim.nodes[i].pods {
            let ok = in_cidr(&p.ip, "100.64.0.0/16");
            ok_all &= ok;
            println!(
                "{} node{}/{} {} in the secondary CIDR 100.64.0.0/16",
                mark(ok),
                i + 1,
                p.name,
                p.ip
            );
        }
    }
    // Node 2 grows after the relabel: the new ENI goes to the alt subnet, the first stays.
    let first_in_a = sim
        .enis(1)
        .iter()
        .any(|e| e.device == 1 && e.subnet_id == a.1);
    ok_all &= first_in_a;
    println!(
        "{} node2 eth1 (made before the relabel) still in {}",
        mark(first_in_a),
        a.0
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut in_b = sim.enis(1).iter().any(|e| e.subnet_id == b.1);
    while !in_b && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(300));
        in_b = sim.enis(1).iter().any(|e| e.subnet_id == b.1);
    }
    ok_all &= in_b;
    println!(
        "{} node2's next ENI in {} ({}) after the relabel",
        mark(in_b),
        b.0,
        b.2
    );
    let mut landed = None;
    for n in 0..6 {
        let name = format!("z{n}");
        match sim.add_pod(1, &name, "") {
            Ok(ip) if in_cidr(&ip, &b.2) => {
                landed = Some((name, ip));
                break;
            }
            Ok(_) => {}
            Err(e) => {
                println!("FAIL ADD {name} on node2: {e}");
                break;
            }
        }
    }
    match landed {
        Some((name, ip)) => {
            let x = sim.pod(0, "a").ip.clone();
            let r = sim.ping(sim.pod(1, &name), &x);
            ok_all &= r.is_some();
            println!(
                "{} node2/{name} ({ip}, {} subnet) -> node1/a ({x})",
                mark(r.is_some()),
                b.0
            );
        }
        None => {
            ok_all = false;
            println!("FAIL no pod of node2 landed in {}", b.2);
        }
    }
    ok_all
}

/// The nodes' /28 subnets filled by their primary ENIs; node 1's next ENI in the tagged
/// subnet, none in the larger untagged one.
fn subnet_discovery_checks(sim: &Sim) -> bool {
    let mut ok_all = true;
    let (tagged, untagged) = match (sim.layout.subnet("tagged"), sim.layout.subnet("untagged")) {
        (Some(t), Some(u)) => (t.clone(), u.clone()),
        _ => return false,
    };
    println!();
    println!("== subnet discovery (EC2's view) ==");
    for (i, s) in sim.layout.node_subnets.iter().enumerate() {
        println!(
            "     node{} subnet {s}: {} addresses free",
            i + 1,
            sim.vpc.shim.subnet_free(s)
        );
    }
    println!(
        "     tagged {} {}: {} free; untagged {} {}: {} free",
        tagged.1,
        tagged.2,
        sim.vpc.shim.subnet_free(&tagged.1),
        untagged.1,
        untagged.2,
        sim.vpc.shim.subnet_free(&untagged.1)
    );
    let secondary: Vec<_> = sim.enis(0).into_iter().filter(|e| e.device > 0).collect();
    let ok = !secondary.is_empty() && secondary.iter().all(|e| e.subnet_id == tagged.1);
    ok_all &= ok;
    println!(
        "{} node1's secondary ENIs ({}) in the tagged subnet {}",
        mark(ok),
        secondary.len(),
        tagged.2
    );
    let none_untagged =
        (0..sim.nodes.len()).all(|i| sim.enis(i).iter().all(|e| e.subnet_id != untagged.1));
    ok_all &= none_untagged;
    println!(
        "{} no ENI in the untagged subnet {}",
        mark(none_untagged),
        untagged.2
    );
    let e_ip = sim.pod(0, "e").ip.clone();
    let ok = in_cidr(&e_ip, &tagged.2);
    ok_all &= ok;
    println!(
        "{} node1/e ({e_ip}) holds an address of the tagged subnet",
        mark(ok)
    );
    ok_all
}

/// Whether `ip` lies in `cidr` (either family).
fn in_net(ip: &str, cidr: &str) -> bool {
    match (ip.parse::<std::net::IpAddr>(), cidr.parse::<ipnet::IpNet>()) {
        (Ok(ip), Ok(net)) => net.contains(&ip),
        _ => false,
    }
}

/// The IPv6 cluster: two IPv6 nodes and one IPv4 node with IPv6 egress, in one VPC.
fn run_ipv6(keep: bool) -> bool {
    use integration::vpc::{INTERNET_IP, INTERNET_IP6};
    let dir = fresh_state_dir();
    println!("sim: starting the EC2 shim, the VPC router (IPv4 and IPv6) and three t3.medium nodes: two with ENABLE_IPv6, one IPv4 node with ENABLE_V6_EGRESS ...");
    let t0 = std::time::Instant::now();
    let v6 = || NodeSpec::new("t3.medium", &[]);
    let v4 = NodeSpec::new(
        "t3.medium",
        &[
            ("ENABLE_IPv6", "false"),
            ("ENABLE_IPv4", "true"),
            ("ENABLE_PREFIX_DELEGATION", "false"),
            ("ENABLE_V6_EGRESS", "true"),
        ],
    );
    let mut sim = Sim::up_in(&dir, PREFIX, &[v6(), v6(), v4], Mode::Ipv6);
    println!(
        "sim: all three ipamds serving after {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let mut all_ok = true;
    for (node, name) in [(0, "a"), (0, "b"), (0, "c"), (1, "x"), (1, "y"), (2, "z")] {
        if let Err(e) = sim.add_pod(node, name, "") {
            all_ok = false;
            println!("sim: ADD {name} on node{} failed: {e}", node + 1);
        }
    }

    println!();
    println!("== nodes (EC2's view) ==");
    let mut prefixes: Vec<Vec<String>> = Vec::new();
    for (i, n) in sim.nodes.iter().enumerate() {
        let (addrs, pfx) = sim.vpc.shim.ipv6(&n.inst().id);
        let family = if i < 2 {
            "IPv6 pods"
        } else {
            "IPv4 pods, ENABLE_V6_EGRESS"
        };
        println!(
            "node{} {} ({family}) primary {} / {}; IPv6 prefixes: {}",
            i + 1,
            n.inst().id,
            n.inst().primary_ip,
            addrs.join(" "),
            if pfx.is_empty() {
                "none".to_string()
            } else {
                pfx.join(" ")
            }
        );
        prefixes.push(pfx);
    }
    for (i, pfx) in prefixes.iter().enumerate().take(2) {
        let ok = pfx.len() == 1 && pfx[0].ends_with("/80");
        all_ok &= ok;
        println!(
            "{} node{} holds one /80 on its primary ENI",
            mark(ok),
            i + 1
        );
    }

    println!();
    println!("== pods ==");
    for (i, n) in sim.nodes.iter().enumerate() {
        for p in &n.pods {
            let ok = match prefixes[i].first() {
                Some(pfx) if i < 2 => in_net(&p.ip, pfx),
                _ => p.ip.parse::<std::net::Ipv4Addr>().is_ok(),
            };
            all_ok &= ok;
            let where_ = if i < 2 { "in the node's /80" } else { "IPv4" };
            println!(
                "{} node{}/{:<2} {} ({where_})",
                mark(ok),
                i + 1,
                p.name,
                p.ip
            );
        }
    }

    println!();
    println!("== pod to pod across nodes (IPv6) ==");
    let x = sim.pod(1, "x").ip.clone();
    for name in ["a", "b", "c"] {
        let p = sim.pod(0, name);
        let r = sim.ping(p, &x);
        all_ok &= r.is_some();
        println!(
            "{} node1/{name} ({}) -> node2/x ({x}){}",
            mark(r.is_some()),
            p.ip,
            r.map_or(String::new(), |ms| format!(": {ms} ms"))
        );
    }
    let a = sim.pod(0, "a").ip.clone();
    let r = sim.ping(sim.pod(1, "y"), &a);
    all_ok &= r.is_some();
    println!("{} node2/y -> node1/a ({a})", mark(r.is_some()));

    println!();
    println!("== pods to the internet ({INTERNET_IP6} and {INTERNET_IP}) ==");
    for (node, name) in [(0, "a"), (1, "x")] {
        let pod_ip = sim.pod(node, name).ip.clone();
        let primary = sim.nodes[node].inst().primary_ip.clone();
        let seen6 = sim.seen_at((node, name), INTERNET_IP6);
        let ok6 = seen6.as_deref() == Ok(pod_ip.as_str());
        all_ok &= ok6;
        println!(
            "{} node{}/{name} -> {INTERNET_IP6}: seen as {} (its own address, routed)",
            mark(ok6),
            node + 1,
            seen6.unwrap_or_else(|e| e)
        );
        let seen4 = sim.seen_at((node, name), INTERNET_IP);
        let ok4 = seen4.as_deref() == Ok(primary.as_str());
        all_ok &= ok4;
        println!(
            "{} node{}/{name} -> {INTERNET_IP}: seen as {} (node{} primary IPv4 {primary}: egress-cni + SNAT)",
            mark(ok4),
            node + 1,
            seen4.unwrap_or_else(|e| e),
            node + 1
        );
    }
    let z_node_v6 = sim.nodes[2].inst().ipv6.clone().unwrap_or_default();
    let seen = sim.seen_at((2, "z"), INTERNET_IP6);
    let ok = seen.as_deref() == Ok(z_node_v6.as_str());
    all_ok &= ok;
    println!(
        "{} node3/z ({}) -> {INTERNET_IP6}: seen as {} (node3 IPv6 {z_node_v6}: ENABLE_V6_EGRESS)",
        mark(ok),
        sim.pod(2, "z").ip,
        seen.unwrap_or_else(|e| e)
    );
    let primary3 = sim.nodes[2].inst().primary_ip.clone();
    let seen = sim.seen_at((2, "z"), INTERNET_IP);
    let ok = seen.as_deref() == Ok(primary3.as_str());
    all_ok &= ok;
    println!(
        "{} node3/z -> {INTERNET_IP}: seen as {} (SNAT to node3 primary {primary3})",
        mark(ok),
        seen.unwrap_or_else(|e| e)
    );

    finish(sim, keep, all_ok)
}

/// The state directory, cleared of whatever an earlier run left.
fn fresh_state_dir() -> PathBuf {
    let dir = state_dir();
    let left = teardown(&dir, PREFIX);
    if !left.is_empty() {
        println!("sim: cleared {} leftovers of an earlier run", left.len());
    }
    std::fs::create_dir_all(&dir).expect("state dir");
    dir
}

/// Leave the cluster running (`--keep`) or take it down; the verdict line; the verdict.
fn finish(sim: Sim, keep: bool, all_ok: bool) -> bool {
    println!();
    if keep {
        println!(
            "sim: left running (state in {}); `sim down` removes it",
            sim.dir.display()
        );
        std::mem::forget(sim);
    } else {
        let dir = sim.dir.clone();
        sim.down();
        teardown(&dir, PREFIX);
        println!("sim: torn down");
    }
    println!(
        "sim: {}",
        if all_ok {
            "all checks passed"
        } else {
            "some checks FAILED"
        }
    );
    all_ok
}
