//! `fleet [--smoke] [--nodes N] [--out FILE]`: many real ipamd processes against one EC2 shim
//! that throttles like EC2 (a token bucket per API for the whole account), to measure what a
//! fleet costs the account: calls in all and per node, throttled calls, time until every node
//! can allocate; then pod churn; then a fleet whose EC2 accepts assignments and does nothing.
//!
//! The account's buckets are EC2's published defaults for the API categories (mutating: 200
//! tokens, 5 per second; describe: 100, 20 per second) scaled by nodes / 1,000, so a run of
//! N nodes faces what 1,000 nodes face against the real defaults; the figures project linearly.
//! (Fewer than 50 nodes, for the smoke run, get 50 nodes' budget.)

use std::path::Path;
use std::time::{Duration, Instant};

use cni_proto::StatusRequest;
use integration::cloud::eventually;
use integration::ipamd_proc::{add_req, client, del_req, rt};
use integration::sim::http_get;
use integration::vpc::{Vpc, VpcNode};
use serde_json::{json, Value};

/// Each node's clocks: upstream's, so the call counts are those of a real node.
const UPSTREAM: &[(&str, &str)] = &[
    ("IPAMD_POOL_CHECK_INTERVAL", "5"),
    ("IPAMD_DECREASE_INTERVAL", "30"),
    ("IPAMD_RECONCILE_INTERVAL", "60"),
    ("IPAMD_MIN_ENI_AGE", "60"),
    ("IP_COOLDOWN_PERIOD", "30"),
];

fn available(n: &VpcNode) -> i32 {
    let sock = n.ipamd().socket.clone();
    rt().block_on(async {
        let Ok(ch) =
            cni_common::grpc::connect(&sock, Duration::from_secs(5), Duration::from_secs(30)).await
        else {
            panic!(
                "ipamd of {} is gone; log:\n{}",
                n.inst.id,
                n.ipamd().log_text()
            );
        };
        cni_proto::cni_backend_client::CniBackendClient::new(ch)
            .status(StatusRequest::default())
            .await
            .map(|r| r.into_inner().available_addresses)
            .unwrap_or(0)
    })
}

/// EC2 calls this node's ipamd made, by its own metrics.
fn node_calls(n: &VpcNode) -> u64 {
    let (_, body) = http_get(&n.ns.name, "http://127.0.0.1:61678/metrics");
    body.lines()
        .filter(|l| l.starts_with("awscni_ec2api_req_count{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn shim_calls(vpc: &Vpc) -> (u64, u64, Value) {
    let c = vpc.shim.calls();
    (
        c["total"].as_u64().unwrap_or(0),
        c["throttled"].as_u64().unwrap_or(0),
        c["by_action"].clone(),
    )
}

/// `count` nodes, each a namespace with its ENI wired by the fabric and a fake IMDS.
fn nodes(vpc: &Vpc, dir: &Path, count: usize, tag: &str) -> Vec<VpcNode> {
    let first = vpc.shim.instance("t3.large", "10.0.0.0/16");
    let mut out = Vec::new();
    for i in 0..count {
        let inst = if i == 0 {
            first.clone()
        } else {
            vpc.shim.instance_beside("t3.large", &first)
        };
        let d = dir.join(format!("{tag}{i}"));
        std::fs::create_dir_all(&d).expect("node dir");
        out.push(vpc.add_node(&d, &inst, 0));
    }
    out
}

/// Start every node's ipamd at once (from this thread: each dies with the thread that starts
/// it) and wait until each serves.
fn spawn_all(nodes: &mut [VpcNode], dir: &Path, tag: &str, env: &[(&str, &str)]) {
    for (i, n) in nodes.iter_mut().enumerate() {
        n.spawn_ipamd(&dir.join(format!("{tag}{i}")), env);
    }
    for n in nodes.iter_mut() {
        if let Some(d) = n.ipamd.as_mut() {
            d.wait_ready_for(900);
        }
    }
}

/// Start every node's ipamd at once; how long until each can allocate.
fn start_all(nodes: &mut [VpcNode], dir: &Path, tag: &str, env: &[(&str, &str)]) -> Duration {
    let t0 = Instant::now();
    spawn_all(nodes, dir, tag, env);
    for n in nodes.iter() {
        eventually(900, "every node able to allocate", || {
            (available(n) > 0).then_some(())
        });
    }
    t0.elapsed()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let count: usize = arg("--nodes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke { 4 } else { 50 });
    let out = arg("--out").unwrap_or_else(|| "target/bench/fleet.json".into());
    let top = tempfile::tempdir().expect("tempdir");
    let vpc = Vpc::start(top.path(), 0);
    // A tiny smoke fleet gets the budget of 50 nodes: one token a minute would only measure
    // the wait for it.
    let scale = count.max(50) as f64 / 1000.0;
    let limits = json!({
        "mutating": {"burst": (200.0 * scale).max(1.0), "rate": 5.0 * scale},
        "describe": {"burst": (100.0 * scale).max(1.0), "rate": 20.0 * scale},
    });
    vpc.shim.post("/_shim/account-limits", limits.clone());
    let mut report = json!({"nodes": count, "account_limits": limits});
    println!("fleet: {count} nodes (t3.large), account buckets {limits}");

    // ---- cold start: every node at once ---------------------------------------------------
    let mut fleet = nodes(&vpc, top.path(), count, "n");
    vpc.shim.reset_calls();
    let ready = start_all(&mut fleet, top.path(), "n", UPSTREAM);
    // Let the warm pools settle (each node wants a warm ENI beyond its first addresses).
    std::thread::sleep(Duration::from_secs(if smoke { 3 } else { 30 }));
    let (total, throttled, by) = shim_calls(&vpc);
    let per_node: Vec<u64> = fleet.iter().map(node_calls).collect();
    let max = per_node.iter().copied().max().unwrap_or(0);
    println!(
        "cold start: all {count} ready in {:.1} s; {total} EC2 calls ({:.1} per node, max {max}), {throttled} throttled",
        ready.as_secs_f64(),
        total as f64 / count as f64
    );
    report["cold_start"] = json!({"ready_s": ready.as_secs_f64(), "calls": total,
        "per_node_avg": total as f64 / count as f64, "per_node_max": max, "throttled": throttled, "by_action": by});

    // ---- churn: 10 pods per node, added then deleted ----------------------------------------
    vpc.shim.reset_calls();
    let pods = if smoke { 3 } else { 10 };
    std::thread::scope(|s| {
        for (i, n) in fleet.iter().enumerate() {
            let sock = n.ipamd().socket.clone();
            s.spawn(move || {
                rt().block_on(async {
                    let mut c = client(&sock).await;
                    for p in 0..pods {
                        let _ = c.add_network(add_req(&format!("n{i}p{p}"))).await;
                    }
                    for p in 0..pods {
                        let _ = c.del_network(del_req(&format!("n{i}p{p}"))).await;
                    }
                })
            });
        }
    });
    std::thread::sleep(Duration::from_secs(if smoke { 3 } else { 40 }));
    let (total, throttled, by) = shim_calls(&vpc);
    println!(
        "churn ({pods} pods per node in and out): {total} EC2 calls ({:.2} per node), {throttled} throttled",
        total as f64 / count as f64
    );
    report["churn"] = json!({"pods_per_node": pods, "calls": total,
        "per_node_avg": total as f64 / count as f64, "throttled": throttled, "by_action": by});
    drop(fleet);

    // ---- EC2 accepts assignments and does nothing ------------------------------------------
    let faulty = (count / 5).max(2);
    let mut bad = nodes(&vpc, top.path(), faulty, "f");
    vpc.shim
        .fault(json!({"action": "AssignPrivateIpAddresses", "kind": "noop", "count": -1}));
    vpc.shim.reset_calls();
    let mut env = UPSTREAM.to_vec();
    env.push(("ENABLE_PREFIX_DELEGATION", "true"));
    env.push(("WARM_PREFIX_TARGET", "1"));
    let t0 = Instant::now();
    spawn_all(&mut bad, top.path(), "f", &env);
    let (first, window) = if smoke { (5, 5) } else { (60, 60) };
    std::thread::sleep(Duration::from_secs(first).saturating_sub(t0.elapsed()));
    let (before, _, by0) = shim_calls(&vpc);
    std::thread::sleep(Duration::from_secs(window));
    let (after, _, by1) = shim_calls(&vpc);
    let assigns = |v: &Value| v["AssignPrivateIpAddresses"].as_u64().unwrap_or(0);
    let per_min = (after - before) as f64 / faulty as f64 * 60.0 / window as f64;
    let assign_per_min =
        (assigns(&by1) - assigns(&by0)) as f64 / faulty as f64 * 60.0 / window as f64;
    println!(
        "no-progress fault: {faulty} nodes; in the first {first} s {before} calls; then {per_min:.1} calls per node per minute ({assign_per_min:.1} assigns)"
    );
    report["no_progress"] = json!({"nodes": faulty, "first_s": first, "calls_first": before,
        "window_s": window, "calls_per_node_per_min": per_min, "assigns_per_node_per_min": assign_per_min});
    vpc.shim.clear_faults();
    drop(bad);

    if let Some(d) = Path::new(&out).parent() {
        let _ = std::fs::create_dir_all(d);
    }
    let _ = std::fs::write(
        &out,
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    );
    println!("fleet: results in {out}");
}
