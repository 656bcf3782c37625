//! sim: the simulated cluster on this machine.
//!
//! `sim run [--keep]`: a VPC of network namespaces (router, internet), the EC2 shim (moto), two
//! t3.medium nodes each with its fake IMDS and the real ipamd, pods created by libcni through
//! `aws-cni` + `portmap`; then a report: the ENIs and addresses each node holds, pod addresses,
//! cross-node pings, the source address the internet sees (SNAT), and a port mapping reached
//! from the other node. Everything is torn down at the end unless `--keep`.
//! `sim down`: remove whatever a run (even a crashed one) left: processes, namespaces, files.

use std::path::PathBuf;
use std::process::ExitCode;

use integration::sim::{serve_text, tcp_text, teardown, NodeSpec, Sim};

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
            if keep {
                integration::keep_helpers();
            }
            match std::panic::catch_unwind(|| run(keep)) {
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
            eprintln!("usage: sim run [--keep] | sim down");
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

fn run(keep: bool) -> bool {
    let dir = state_dir();
    let left = teardown(&dir, PREFIX);
    if !left.is_empty() {
        println!("sim: cleared {} leftovers of an earlier run", left.len());
    }
    std::fs::create_dir_all(&dir).expect("state dir");
    println!("sim: starting the EC2 shim, the VPC router and two t3.medium nodes ...");
    let t0 = std::time::Instant::now();
    let spec = || NodeSpec::new("t3.medium", &[]);
    let mut sim = Sim::up(&dir, PREFIX, &[spec(), spec()]);
    println!(
        "sim: both ipamds serving after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    let mut all_ok = true;
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
            let (dev, id, ip, sec, pfx) = (e.device, e.id, e.primary_ip, e.secondary, e.prefixes);
            println!(
                "  eth{dev} {id} {ip}: {} secondary IPs {}{}",
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

    println!();
    if keep {
        println!(
            "sim: left running (state in {}); `sim down` removes it",
            dir.display()
        );
        std::mem::forget(sim);
    } else {
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
