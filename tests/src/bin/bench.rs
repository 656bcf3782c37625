//! bench: where the project stands, measured on the simulated VPC with the real binaries.
//!
//! `bench [--smoke] [--out FILE]`. Every timing is printed next to a baseline measured in the
//! same run (Debian's bridge + host-local driven by the same libcni client, or /bin/true), as a
//! ratio, and next to the kernel floor where there is one. Figures go to stdout as one table and
//! to a JSON file (default target/bench/results.json). `--smoke` runs a few iterations of
//! everything, to keep the benchmark from rotting; its figures mean nothing.
//!
//! `bench --startup N [--keep DIR]`: only ipamd's start-up and its fill of an empty pool, N
//! rounds, each round on fresh nodes, alternating with the ipamd at `AWS_CNI_BASELINE_IPAMD`
//! when it is set (another build or version), with medians and ratios: the figures are tens to
//! hundreds of milliseconds, too close to measure once. `--keep` copies every ipamd log there.
//! `--idle SECS` also measures each filled node's ipamd idle for SECS (its own CPU, % of a core),
//! and `--bursts SIZE` times a burst of SIZE concurrent ADDs, then DELs, through the plugin
//! (`AWS_CNI_SHIPPED` when set) on each filled node, after 1,000 AddNetwork + DelNetwork pairs
//! one at a time (ipamd's own part of an ADD, and its CPU): p50 of each round, median of the
//! rounds. The side that goes first swaps every round: use an even N against a baseline.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cni_proto::StatusRequest;
use integration::cloud::{eventually, eventually_every, Instance};
use integration::cni::{CniClient, CniServer};
use integration::ipamd_proc::{add_req, client, del_req, rt};
use integration::netns::Netns;
use integration::vpc::{Vpc, VpcNode};
use serde_json::{json, Value};

struct Row {
    section: &'static str,
    name: String,
    ours: String,
    baseline: String,
    ratio: String,
    floor: String,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    json: serde_json::Map<String, Value>,
}

impl Report {
    fn row(
        &mut self,
        section: &'static str,
        name: &str,
        ours: String,
        baseline: Option<String>,
        ratio: Option<f64>,
        floor: Option<String>,
    ) {
        self.rows.push(Row {
            section,
            name: name.to_string(),
            ours,
            baseline: baseline.unwrap_or_else(|| "-".into()),
            ratio: ratio.map_or("-".into(), |r| format!("{r:.2}")),
            floor: floor.unwrap_or_else(|| "-".into()),
        });
    }
    fn set(&mut self, key: &str, v: Value) {
        self.json.insert(key.to_string(), v);
    }
    fn write(&self, out: &Path) {
        if let Some(d) = out.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let _ = std::fs::write(
            out,
            serde_json::to_string_pretty(&Value::Object(self.json.clone())).unwrap_or_default(),
        );
    }
    fn print(&self) {
        println!();
        println!(
            "{:<14} {:<44} {:>24} {:>24} {:>7} {:>16}",
            "section", "measure", "ours", "baseline", "ratio", "floor"
        );
        println!("{}", "-".repeat(134));
        for r in &self.rows {
            println!(
                "{:<14} {:<44} {:>24} {:>24} {:>7} {:>16}",
                r.section, r.name, r.ours, r.baseline, r.ratio, r.floor
            );
        }
    }
}

/// (p50, p90, p99, max) in ms.
fn pct(mut v: Vec<f64>) -> [f64; 4] {
    if v.is_empty() {
        return [0.0; 4];
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    [at(0.5), at(0.9), at(0.99), v[v.len() - 1]]
}

fn fmt4(p: [f64; 4]) -> String {
    format!("{:.1}/{:.1}/{:.1}/{:.1}", p[0], p[1], p[2], p[3])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The baseline chain: Debian's bridge with host-local, driven by the same libcni client.
fn bridge_client(node: &str, dir: &Path) -> CniClient {
    let bindir = dir.join("bin");
    std::fs::create_dir_all(&bindir).expect("bin");
    for p in ["bridge", "host-local"] {
        let _ = std::os::unix::fs::symlink(format!("/usr/lib/cni/{p}"), bindir.join(p));
    }
    let conflist = dir.join("bridge.conflist");
    std::fs::write(
        &conflist,
        json!({"cniVersion": "1.0.0", "name": "bridge-net", "plugins": [{
            "type": "bridge", "bridge": "cnibr0", "isGateway": true, "ipMasq": false,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]],
                     "dataDir": dir.join("host-local")}}]})
        .to_string(),
    )
    .expect("conflist");
    CniClient {
        node: node.to_string(),
        conflist,
        bindir,
        cache: dir.join("cache"),
    }
}

/// ADD then DEL `n` times, one pod at a time: (add ms, del ms), as the libcni runtime timed
/// each call.
fn sequential(c: &CniClient, pod: &Netns, tag: &str, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut srv = CniServer::start(c);
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let call = [(format!("{tag}-{i}"), pod, "p".to_string())];
        adds.extend(srv.run("add", &call));
        dels.extend(srv.run("del", &call));
    }
    (adds, dels)
}

/// The sides of a round in the order they run, the first side first in even rounds and last in
/// odd ones: whichever place in a round is slower (the same ipamd on both sides of `--startup`
/// read 1.05-1.11 of itself when it always went first: one run, three rounds) then costs both
/// sides alike over an even number of rounds.
fn in_turn<T>(sides: &[T], round: usize) -> Vec<&T> {
    let mut order: Vec<&T> = sides.iter().collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// `n` pods at once: every ADD started together, then every DEL: (add ms each, del ms each).
fn burst(c: &CniClient, node: &Netns, pods: &[Netns], tag: &str) -> (Vec<f64>, Vec<f64>) {
    // Each burst starts and ends with the node at rest: no host veth of an earlier DEL still
    // waiting for ipamd's reaper, whose deletions would contend for the kernel's rtnl lock with
    // whichever burst comes next (ours or the baseline's).
    node.links();
    let mut srv = CniServer::start(c);
    let calls: Vec<(String, &Netns, String)> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("{tag}-{i}"), p, format!("b{i}")))
        .collect();
    let adds = srv.run("add", &calls);
    let dels = srv.run("del", &calls);
    node.links();
    (adds, dels)
}

/// The bare kernel work of one ADD, done directly: veth pair created in place, pod address, the
/// two pod routes, the neighbour, the host route and the rule. (Deleting the veth is not timed.)
fn floor(node: &Netns, pod: &Netns, n: usize) -> Vec<f64> {
    use aws_cni::netlink::{gateway_route, host_route, Netlink, Rule, MAIN_TABLE};
    use std::net::{IpAddr, Ipv4Addr};
    let rt = rt();
    rt.block_on(async {
        let host_ns = std::fs::File::open(node.path()).expect("node ns");
        let pod_ns = std::fs::File::open(pod.path()).expect("pod ns");
        let host = Netlink::in_netns(&host_ns).await.expect("host netlink");
        let inner = Netlink::in_netns(&pod_ns).await.expect("pod netlink");
        let ip: IpAddr = Ipv4Addr::new(10, 99, 0, 5).into();
        let gw: IpAddr = Ipv4Addr::new(169, 254, 1, 1).into();
        let mut out = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            host.add_veth_into("flr0", "eth0", 9001, &pod_ns)
                .await
                .expect("veth");
            let h = host
                .link_by_name("flr0")
                .await
                .expect("link")
                .expect("host veth");
            let p = inner
                .link_by_name("eth0")
                .await
                .expect("link")
                .expect("pod veth");
            let (hi, pi) = (h.header.index, p.header.index);
            host.set_up(hi).await.expect("up");
            inner.set_up(pi).await.expect("up");
            inner.add_addr(pi, ip, 32).await.expect("addr");
            inner
                .replace_route(host_route(gw, pi, MAIN_TABLE))
                .await
                .expect("route");
            inner
                .replace_route(gateway_route(gw, pi))
                .await
                .expect("default");
            let mac = aws_cni::netlink::link_mac(&h);
            inner.replace_neighbour(pi, gw, &mac).await.expect("neigh");
            host.replace_route(host_route(ip, hi, MAIN_TABLE))
                .await
                .expect("host route");
            host.add_rule(&Rule::host(512, MAIN_TABLE, Some(ip), None))
                .await
                .expect("rule");
            out.push(ms(t.elapsed()));
            host.del_rule(&Rule::host(512, MAIN_TABLE, Some(ip), None))
                .await
                .expect("del rule");
            host.del_link(hi).await.expect("del veth");
        }
        out
    })
}

fn wall(cmd: &[&str], env: &[(&str, &str)], n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let _ = Command::new(cmd[0])
                .args(&cmd[1..])
                .envs(env.iter().copied())
                .output();
            ms(t.elapsed())
        })
        .collect()
}

fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:")
}

/// A `/proc/<pid>/status` figure in kB (`VmRSS:`, `RssAnon:`, ...).
fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (user + system) the process has used.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of /proc/pid/stat (utime, stime) are 11 and 12 after the ")".
    (t(11) + t(12)) / 100.0
}

fn status(sock: &Path) -> i32 {
    rt().block_on(async {
        client(sock)
            .await
            .status(StatusRequest::default())
            .await
            .map(|r| r.into_inner().available_addresses)
            .unwrap_or(0)
    })
}

/// `n` ADD+DEL cycles `gap` apart, as pods come and go; a refused ADD is retried after 200 ms
/// (as the kubelet would). Returns the number of refusals.
fn paced_churn(sock: &Path, tag: &str, n: usize, gap: Duration) -> usize {
    rt().block_on(async {
        let mut c = client(sock).await;
        let mut refused = 0;
        for i in 0..n {
            let cid = format!("{tag}-{i}");
            loop {
                let r = c
                    .add_network(add_req(&cid))
                    .await
                    .expect("add")
                    .into_inner();
                if r.success {
                    break;
                }
                refused += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            c.del_network(del_req(&cid)).await.expect("del");
            tokio::time::sleep(gap).await;
        }
        refused
    })
}

fn grpc_churn(sock: &Path, tag: &str, n: usize, hold: bool) -> Vec<f64> {
    rt().block_on(async {
        let mut c = client(sock).await;
        let mut lat = Vec::new();
        for i in 0..n {
            let cid = format!("{tag}-{i}");
            let t = Instant::now();
            let r = c
                .add_network(add_req(&cid))
                .await
                .expect("add")
                .into_inner();
            lat.push(ms(t.elapsed()));
            assert!(r.success, "AddNetwork: {}", r.message);
            if !hold {
                c.del_network(del_req(&cid)).await.expect("del");
            }
        }
        lat
    })
}

/// A new instance beside the first one (one VPC, one subnet: the router serves one VPC).
fn instance(vpc: &Vpc, itype: &str) -> Instance {
    static FIRST: std::sync::OnceLock<Instance> = std::sync::OnceLock::new();
    match FIRST.get() {
        Some(f) => vpc.shim.instance_beside(itype, f),
        None => {
            let i = vpc.shim.instance(itype, "10.0.0.0/16");
            let _ = FIRST.set(i.clone());
            i
        }
    }
}

/// A fresh node of `itype` in `vpc` with ipamd started with `env` (after the rig's defaults).
fn node(vpc: &Vpc, dir: &Path, itype: &str, env: &[(&str, &str)]) -> VpcNode {
    let inst = instance(vpc, itype);
    let mut n = vpc.add_node(dir, &inst, 0);
    n.start_ipamd(dir, env);
    n
}

/// Upstream's clocks, except a 5 s cooldown so 1,000 cycles fit in a minute without the
/// cooling addresses exhausting the node.
const UPSTREAM_DEFAULTS: &[(&str, &str)] = &[
    ("IPAMD_POOL_CHECK_INTERVAL", "5"),
    ("IPAMD_DECREASE_INTERVAL", "30"),
    ("IPAMD_RECONCILE_INTERVAL", "60"),
    ("IPAMD_MIN_ENI_AGE", "60"),
    ("IP_COOLDOWN_PERIOD", "5"),
];

fn calls(vpc: &Vpc) -> (u64, Value) {
    let c = vpc.shim.calls();
    (c["total"].as_u64().unwrap_or(0), c["by_action"].clone())
}

/// A tmpfs over a directory, unmounted (lazily: processes may still hold files) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Tmpfs {
        integration::sh(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=1g,mode=0700",
            "tmpfs",
            &dir.display().to_string(),
        ]);
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = integration::try_sh(&["umount", "-l", &self.0.display().to_string()]);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench/results.json"));
    let n = |full: usize, quick: usize| if smoke { quick } else { full };
    let mut r = Report::default();
    let top = tempfile::tempdir().expect("tempdir");
    if let Some(rounds) = args
        .iter()
        .position(|a| a == "--startup")
        .map(|i| args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(5))
    {
        let keep = args
            .iter()
            .position(|a| a == "--keep")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from);
        let idle = args
            .iter()
            .position(|a| a == "--idle")
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(Duration::from_secs_f64);
        let bursts = args
            .iter()
            .position(|a| a == "--bursts")
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok());
        let _tmpfs = Tmpfs::mount(top.path());
        let extra = Extra { keep, idle, bursts };
        startup_rounds(&mut r, top.path(), rounds, &extra);
        r.print();
        r.write(&out);
        return;
    }
    // Everything both CNIs write (our state, checkpoint and logs; host-local's leases; libcni's
    // cache) on tmpfs, as /var/run is on a node: this machine's /tmp and /run are disk.
    let _tmpfs = Tmpfs::mount(top.path());

    // ---- plugin process cost ------------------------------------------------------------
    // Every figure of the plugin (size, start-up, ADD/DEL) is of the shipped build when given.
    let shipped = std::env::var("AWS_CNI_SHIPPED")
        .ok()
        .and_then(|p| PathBuf::from(p).canonicalize().ok())
        .unwrap_or_else(|| integration::bin("aws-cni"));
    let bridge = "/usr/lib/cni/bridge";
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64 / 1e6;
    r.row(
        "plugin",
        "binary size, MB (shipped aws-cni vs bridge)",
        format!("{:.2}", size(&shipped)),
        Some(format!("{:.2}", size(Path::new(bridge)))),
        Some(size(&shipped) / size(Path::new(bridge))),
        None,
    );
    let ver = [("CNI_COMMAND", "VERSION")];
    let ours = pct(wall(&[shipped.to_str().unwrap_or("")], &ver, n(200, 5)));
    let base = pct(wall(&[bridge], &ver, n(200, 5)));
    let truth = pct(wall(&["/bin/true"], &[], n(200, 5)));
    r.row(
        "plugin",
        "VERSION wall p50, ms (vs bridge)",
        format!("{:.2}", ours[0]),
        Some(format!("{:.2}", base[0])),
        Some(ours[0] / base[0]),
        Some(format!("true {:.2}", truth[0])),
    );
    r.set(
        "version_ms",
        json!({"ours": ours, "bridge": base, "true": truth}),
    );

    // ---- the main node: ADD/DEL latency ----------------------------------------------------
    eprintln!(
        "bench: ipamd is {}; starting the VPC and a warm m5.4xlarge node ...",
        integration::bin("ipamd").display()
    );
    let vpc = Vpc::start_named(top.path(), 0, "bn");
    let main_dir = top.path().join("main");
    std::fs::create_dir_all(&main_dir).expect("dir");
    let warm = n(150, 40).to_string();
    let main = node(
        &vpc,
        &main_dir,
        "m5.4xlarge",
        &[
            ("MINIMUM_IP_TARGET", warm.as_str()),
            ("IP_COOLDOWN_PERIOD", "0"),
            ("IPAMD_ALLOCATION_GRACE", "3600"),
        ],
    );
    let sock = main.ipamd().socket.clone();
    let want: i32 = warm.parse().unwrap_or(40);
    eventually(120, "the warm pool", || {
        (status(&sock) >= want).then_some(())
    });
    let ours = CniClient::new(&main.ns.name, &main_dir, &sock).first_plugin_only(&main_dir);
    ours.use_plugin(&shipped);
    let bdir = main_dir.join("bridge");
    std::fs::create_dir_all(&bdir).expect("dir");
    let base = bridge_client(&main.ns.name, &bdir);
    let pod = Netns::new("bnp");
    let (oa, od) = sequential(&ours, &pod, "s", n(200, 5));
    main.ns.links(); // our last DELs' veths reaped before the baseline runs
    let (ba, bd) = sequential(&base, &pod, "s", n(200, 5));
    let fl = floor(&main.ns, &pod, n(200, 5));
    let (oa, od, ba, bd, fl) = (pct(oa), pct(od), pct(ba), pct(bd), pct(fl));
    r.row(
        "latency",
        "ADD 1 at a time p50/p90/p99/max ms",
        fmt4(oa),
        Some(fmt4(ba)),
        Some(oa[0] / ba[0]),
        Some(format!("{:.2}", fl[0])),
    );
    r.row(
        "latency",
        "DEL 1 at a time p50/p90/p99/max ms",
        fmt4(od),
        Some(fmt4(bd)),
        Some(od[0] / bd[0]),
        None,
    );
    r.set("sequential", json!({"ours_add": oa, "ours_del": od, "bridge_add": ba, "bridge_del": bd, "floor_add": fl}));

    // IPv6 pods (ENABLE_IPv6) on a node of an IPv6 VPC of their own, same plugin, same calls;
    // the ratio is against our IPv4 figure above (bridge's is in its column).
    eprintln!("bench: an IPv6 m5.4xlarge node ...");
    let v6_dir = top.path().join("ipv6");
    std::fs::create_dir_all(&v6_dir).expect("dir");
    let v6_inst = vpc.shim.instance_v6("m5.4xlarge", "10.0.128.0/20");
    let mut v6_node = vpc.add_node(&v6_dir, &v6_inst, 0);
    v6_node.start_ipamd(
        &v6_dir,
        &[
            ("ENABLE_IPv6", "true"),
            ("ENABLE_IPv4", "false"),
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("IP_COOLDOWN_PERIOD", "0"),
            ("IPAMD_ALLOCATION_GRACE", "3600"),
        ],
    );
    let v6_sock = v6_node.ipamd().socket.clone();
    eventually(60, "the IPv6 node serving", || {
        (status(&v6_sock) > 0).then_some(())
    });
    let ours6 = CniClient::new(&v6_node.ns.name, &v6_dir, &v6_sock).first_plugin_only(&v6_dir);
    ours6.use_plugin(&shipped);
    let pod6 = Netns::new("bn6");
    let (a6, d6) = sequential(&ours6, &pod6, "v6", n(200, 5));
    v6_node.ns.links();
    let (a6, d6) = (pct(a6), pct(d6));
    r.row(
        "latency",
        "IPv6 ADD 1 at a time p50/p90/p99/max ms (ratio: vs our IPv4)",
        fmt4(a6),
        Some(fmt4(ba)),
        Some(a6[0] / oa[0]),
        None,
    );
    r.row(
        "latency",
        "IPv6 DEL 1 at a time p50/p90/p99/max ms (ratio: vs our IPv4)",
        fmt4(d6),
        Some(fmt4(bd)),
        Some(d6[0] / od[0]),
        None,
    );
    r.set("sequential_ipv6", json!({"ours_add": a6, "ours_del": d6}));
    drop(pod6);
    drop(v6_node);
    for size in [n(30, 3), n(100, 5)] {
        let pods: Vec<Netns> = (0..size).map(|_| Netns::new("bnb")).collect();
        // Four rounds in alternating order, every call's time pooled per side: one round of a
        // CPU-bound burst on two cores moves by a third between runs on either side.
        let (mut a, mut d, mut x, mut y) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..n(4, 1) {
            for &is_ours in in_turn(&[true, false], round) {
                let (c, adds, dels, tag) = if is_ours {
                    (&ours, &mut a, &mut d, "o")
                } else {
                    (&base, &mut x, &mut y, "b")
                };
                let (ra, rd) = burst(c, &main.ns, &pods, &format!("{tag}{size}r{round}"));
                adds.extend(ra);
                dels.extend(rd);
            }
        }
        let (a, d, x, y) = (pct(a), pct(d), pct(x), pct(y));
        r.row(
            "latency",
            &format!("ADD burst of {size} p50/p90/p99/max ms"),
            fmt4(a),
            Some(fmt4(x)),
            Some(a[0] / x[0]),
            None,
        );
        r.row(
            "latency",
            &format!("DEL burst of {size} p50/p90/p99/max ms"),
            fmt4(d),
            Some(fmt4(y)),
            Some(d[0] / y[0]),
            None,
        );
        r.set(
            &format!("burst_{size}"),
            json!({"ours_add": a, "ours_del": d, "bridge_add": x, "bridge_del": y}),
        );
    }
    // Our ADD in phases: process start + parse (VERSION), the gRPC round trip, the kernel work.
    let grpc = pct(grpc_churn(&sock, "phase", n(200, 5), false));
    r.row(
        "latency",
        "ADD phase: exec + parse (VERSION p50) ms",
        format!("{:.2}", ours_version_p50(&shipped, n)),
        None,
        None,
        None,
    );
    r.row(
        "latency",
        "ADD phase: AddNetwork gRPC p50 ms",
        format!("{:.2}", grpc[0]),
        None,
        None,
        None,
    );
    r.row(
        "latency",
        "ADD phase: kernel work p50 ms (floor)",
        format!("{:.2}", fl[0]),
        None,
        None,
        None,
    );
    r.set("phases", json!({"grpc_add": grpc, "floor": fl}));

    // ---- ipamd footprint ---------------------------------------------------------------
    let pid = main.ipamd().pid().unwrap_or(0);
    let idle_s = if smoke { 1.0 } else { 10.0 };
    let c0 = cpu_s(pid);
    std::thread::sleep(Duration::from_secs_f64(idle_s));
    let idle_cpu = (cpu_s(pid) - c0) / idle_s * 100.0;
    let rss_idle = rss_kb(pid);
    grpc_churn(&sock, "hold15", 15, true);
    let rss15 = rss_kb(pid);
    let rss_before = rss_kb(pid);
    grpc_churn(&sock, "cycle", n(5000, 200), false);
    let rss_after = rss_kb(pid);
    // What the RSS is made of: the binary's code pages (shared, page cache) and the process's
    // own memory.
    let (anon, file) = (status_kb(pid, "RssAnon:"), status_kb(pid, "RssFile:"));
    r.row(
        "footprint",
        "ipamd RSS after the churn: own memory (RssAnon) / code pages (RssFile), MB",
        format!("{:.1} / {:.1}", anon as f64 / 1024.0, file as f64 / 1024.0),
        None,
        None,
        None,
    );
    r.set("ipamd_rss_split_kb", json!({"anon": anon, "file": file}));
    r.row(
        "footprint",
        "ipamd RSS idle, MB",
        format!("{:.1}", rss_idle as f64 / 1024.0),
        None,
        None,
        None,
    );
    r.row(
        "footprint",
        "ipamd CPU idle, % of a core",
        format!("{idle_cpu:.2}"),
        None,
        None,
        None,
    );
    r.row(
        "footprint",
        "ipamd RSS with 15 pods, MB",
        format!("{:.1}", rss15 as f64 / 1024.0),
        None,
        None,
        None,
    );
    r.row(
        "footprint",
        &format!("ipamd RSS before/after {} ADD/DEL, MB", n(5000, 200)),
        format!(
            "{:.1} -> {:.1}",
            rss_before as f64 / 1024.0,
            rss_after as f64 / 1024.0
        ),
        None,
        None,
        None,
    );
    let big_dir = top.path().join("big");
    std::fs::create_dir_all(&big_dir).expect("dir");
    let big_n = n(250, 20);
    let big_min = (big_n + 10).to_string();
    let big = node(
        &vpc,
        &big_dir,
        "m5.24xlarge",
        &[
            ("MINIMUM_IP_TARGET", big_min.as_str()),
            ("IPAMD_ALLOCATION_GRACE", "3600"),
        ],
    );
    let bsock = big.ipamd().socket.clone();
    eventually(180, "the big pool", || {
        (status(&bsock) >= big_n as i32).then_some(())
    });
    grpc_churn(&bsock, "hold", big_n, true);
    let bpid = big.ipamd().pid().unwrap_or(0);
    let (big_rss, big_anon, big_file) = (
        rss_kb(bpid),
        status_kb(bpid, "RssAnon:"),
        status_kb(bpid, "RssFile:"),
    );
    r.row(
        "footprint",
        &format!("ipamd RSS with {big_n} pods (m5.24xlarge): total (own / code), MB"),
        format!(
            "{:.1} ({:.1} / {:.1})",
            big_rss as f64 / 1024.0,
            big_anon as f64 / 1024.0,
            big_file as f64 / 1024.0
        ),
        None,
        None,
        None,
    );
    r.set(
        "footprint_kb",
        json!({"idle": rss_idle, "cpu_idle_pct": idle_cpu, "pods15": rss15,
        "churn_before": rss_before, "churn_after": rss_after, "big": big_rss,
        "big_split": {"anon": big_anon, "file": big_file}}),
    );
    drop(big);

    // ---- start-up on a fresh node ------------------------------------------------------
    let fdir = top.path().join("fresh");
    std::fs::create_dir_all(&fdir).expect("dir");
    let inst = instance(&vpc, "t3.medium");
    let mut fresh = vpc.add_node(&fdir, &inst, 0);
    let (serving, first) = time_start(&mut fresh, &integration::bin("ipamd"), &fdir);
    r.row(
        "startup",
        "ipamd start -> serving gRPC, ms",
        format!("{serving:.0}"),
        None,
        None,
        None,
    );
    r.row(
        "startup",
        "ipamd start -> first allocatable address, ms",
        format!("{first:.0}"),
        None,
        None,
        None,
    );
    r.set(
        "startup_ms",
        json!({"serving": serving, "first_address": first}),
    );

    // ---- EC2 economy (counted at the shim) ---------------------------------------------
    // The calls one ENI attach costs: a pod beyond the warm pool makes ipamd attach a second.
    let attach_calls = |n: &VpcNode| {
        let sock = n.ipamd().socket.clone();
        // The start's own calls (the leaked-ENI sweep after the first fill) are not the attach's.
        std::thread::sleep(Duration::from_secs(1));
        vpc.shim.reset_calls();
        grpc_churn(&sock, "grow", 1, true);
        eventually(30, "a second ENI", || {
            (vpc.shim.attached(&n.inst.id).len() == 2).then_some(())
        });
        std::thread::sleep(Duration::from_secs(1));
        calls(&vpc)
    };
    let (attach, by) = attach_calls(&fresh);
    r.row(
        "ec2",
        "EC2 calls per ENI attach (incl. its addresses)",
        attach.to_string(),
        Some("4-5 + IMDS polls".into()),
        None,
        None,
    );
    r.set(
        "ec2_per_eni_attach",
        json!({"total": attach, "by_action": by}),
    );
    drop(fresh);

    // The same without subnet discovery (upstream's default is on; it adds the DescribeSubnets
    // that picks the subnet): what an attach itself costs.
    let ndir = top.path().join("fresh-nodisc");
    std::fs::create_dir_all(&ndir).expect("dir");
    let inst = instance(&vpc, "t3.medium");
    let mut plain = vpc.add_node(&ndir, &inst, 0);
    plain.start_ipamd(&ndir, &[("ENABLE_SUBNET_DISCOVERY", "false")]);
    let psock = plain.ipamd().socket.clone();
    eventually(60, "first address", || (status(&psock) > 0).then_some(()));
    let (attach_plain, by_plain) = attach_calls(&plain);
    r.row(
        "ec2",
        "EC2 calls per ENI attach, ENABLE_SUBNET_DISCOVERY=false",
        attach_plain.to_string(),
        None,
        None,
        None,
    );
    r.set(
        "ec2_per_eni_attach_no_discovery",
        json!({"total": attach_plain, "by_action": by_plain}),
    );
    drop(plain);

    // The fill, at the shim's own latency and at 100 ms a call; and without subnet discovery,
    // the figure as it was before that feature (its one DescribeSubnets per 5 minutes).
    for (key, label, latency, discovery) in [
        ("ec2_fill_100", "default shim latency", 0u64, true),
        ("refill_100_at_100ms", "100 ms per EC2 call", 100, true),
        (
            "ec2_fill_100_no_discovery",
            "default shim latency, ENABLE_SUBNET_DISCOVERY=false",
            0,
            false,
        ),
    ] {
        vpc.shim.post("/_shim/latency", json!({"ms": latency}));
        let d = top.path().join(key);
        std::fs::create_dir_all(&d).expect("dir");
        let inst = instance(&vpc, "m5.4xlarge");
        let mut f = vpc.add_node(&d, &inst, 0);
        vpc.shim.reset_calls();
        let took = time_fill(&mut f, &integration::bin("ipamd"), &d, discovery);
        let (total, by) = calls(&vpc);
        r.row(
            "ec2",
            &format!("empty pool -> 100 addresses, ms ({label})"),
            format!("{took:.0}"),
            None,
            None,
            None,
        );
        if latency == 0 {
            r.row(
                "ec2",
                &format!(
                    "EC2 calls to fill a pool of 100 (from start){}",
                    if discovery {
                        ""
                    } else {
                        ", ENABLE_SUBNET_DISCOVERY=false"
                    }
                ),
                total.to_string(),
                None,
                None,
                None,
            );
        }
        r.set(
            key,
            json!({"total": total, "by_action": by, "ms": took, "calls": total}),
        );
    }
    vpc.shim.post("/_shim/latency", json!({"ms": 0}));

    for (label, extra) in [
        ("default targets", None),
        ("WARM_IP_TARGET=5", Some(("WARM_IP_TARGET", "5"))),
    ] {
        let d = top.path().join(format!("churn{}", extra.is_some()));
        std::fs::create_dir_all(&d).expect("dir");
        let mut env: Vec<(&str, &str)> = UPSTREAM_DEFAULTS.to_vec();
        env.extend(extra);
        let c = node(&vpc, &d, "m5.4xlarge", &env);
        let s = c.ipamd().socket.clone();
        eventually(60, "warm", || (status(&s) > 0).then_some(()));
        std::thread::sleep(Duration::from_secs(2));
        // Steady state: a few pods running, then churn.
        grpc_churn(&s, "base", 3, true);
        std::thread::sleep(Duration::from_secs(if smoke { 1 } else { 6 }));
        vpc.shim.reset_calls();
        let cycles = n(1000, 30);
        let t0 = Instant::now();
        let refused = paced_churn(&s, "churn", cycles, Duration::from_millis(n(50, 10) as u64));
        let churn_s = t0.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(if smoke { 1 } else { 6 }));
        let (total, by) = calls(&vpc);
        r.row(
            "ec2",
            &format!("EC2 calls per {cycles} pod churn ({label})"),
            format!("{total} ({refused} ADD retries)"),
            None,
            None,
            None,
        );
        r.set(&format!("ec2_churn_{}", if extra.is_some() { "warm_ip_5" } else { "default" }),
              json!({"cycles": cycles, "seconds": churn_s, "total": total, "by_action": by, "refused": refused}));
    }

    // ---- datastore micro-benchmark (criterion, run by scripts/bench.sh) -------------------
    for held in [1, 10, 1000] {
        let p = format!("target/criterion/datastore_assign_release/{held}/new/estimates.json");
        if let Ok(text) = std::fs::read_to_string(&p) {
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let ns = v["mean"]["point_estimate"].as_f64().unwrap_or(0.0);
            r.row(
                "datastore",
                &format!("assign+release, {held} held (criterion)"),
                format!("{:.0} ns = {:.2} M/s", ns, 1e3 / ns),
                None,
                None,
                None,
            );
            r.set(&format!("datastore_{held}_ns"), json!(ns));
        }
    }

    r.print();
    r.write(&out);
    println!(
        "\nbench: figures in {}{}",
        out.display(),
        if smoke {
            " (smoke mode: not meaningful)"
        } else {
            ""
        }
    );
    drop(main);
}

fn ours_version_p50(bin: &Path, n: impl Fn(usize, usize) -> usize) -> f64 {
    pct(wall(
        &[bin.to_str().unwrap_or("")],
        &[("CNI_COMMAND", "VERSION")],
        n(200, 5),
    ))[0]
}

/// Start-up and fill figures of this ipamd and, when `AWS_CNI_BASELINE_IPAMD` names one, of
/// another, `rounds` times each in alternation (so drift in the machine hits both alike).
/// What `--startup` measures besides start and fill, and where it keeps the logs.
struct Extra {
    keep: Option<PathBuf>,
    idle: Option<Duration>,
    bursts: Option<usize>,
}

/// AddNetwork + DelNetwork pairs, one at a time, for `--startup --bursts`' per-call figures.
const SEQ_CALLS: usize = 1000;

fn startup_rounds(r: &mut Report, top: &Path, rounds: usize, extra: &Extra) {
    let keep = extra.keep.as_deref();
    let shipped = std::env::var("AWS_CNI_SHIPPED")
        .ok()
        .and_then(|p| PathBuf::from(p).canonicalize().ok())
        .unwrap_or_else(|| integration::bin("aws-cni"));
    let pods: Vec<Netns> = (0..extra.bursts.unwrap_or(0))
        .map(|_| Netns::new("bsb"))
        .collect();
    let (add_burst, del_burst) = (
        format!("ADD p50 in a burst of {}, ms", pods.len()),
        format!("DEL p50 in a burst of {}, ms", pods.len()),
    );
    let ours = integration::bin("ipamd");
    let baseline = std::env::var_os("AWS_CNI_BASELINE_IPAMD")
        .map(|p| std::path::absolute(PathBuf::from(p)).expect("absolute path"));
    let mut builds = vec![("ours", ours.clone())];
    builds.extend(baseline.clone().map(|b| ("baseline", b)));
    eprintln!("bench: start-up of {}", ours.display());
    if let Some(b) = &baseline {
        eprintln!("bench: against {}", b.display());
        if rounds % 2 == 1 {
            eprintln!("bench: {rounds} rounds: ours goes first once more than the baseline; give an even number");
        }
    }
    if let Some(k) = keep {
        std::fs::create_dir_all(k).expect("--keep dir");
    }
    let vpc = Vpc::start_named(top, 0, "bs");
    // measure -> build -> samples, ms
    let mut got: std::collections::BTreeMap<(&str, &str), Vec<f64>> = Default::default();
    for round in 0..rounds {
        for (label, bin) in in_turn(&builds, round) {
            let dir = top.join(format!("{label}-{round}-start"));
            std::fs::create_dir_all(&dir).expect("dir");
            let mut node = vpc.add_node(&dir, &instance(&vpc, "t3.medium"), 0);
            let (serving, first) = time_start(&mut node, bin, &dir);
            got.entry(("start -> serving gRPC, ms", label))
                .or_default()
                .push(serving);
            got.entry(("start -> first address, ms", label))
                .or_default()
                .push(first);
            keep_log(keep, &node, &format!("{label}-{round}-start"));
            drop(node);
            for discovery in [true, false] {
                let what = if discovery {
                    "empty -> 100 addresses, ms"
                } else {
                    "empty -> 100, no discovery, ms"
                };
                let name = format!("{label}-{round}-fill{}", if discovery { "" } else { "-nd" });
                let dir = top.join(&name);
                std::fs::create_dir_all(&dir).expect("dir");
                let mut node = vpc.add_node(&dir, &instance(&vpc, "m5.4xlarge"), 0);
                let took = time_fill(&mut node, bin, &dir, discovery);
                got.entry((what, label)).or_default().push(took);
                if let Some(idle) = extra.idle.filter(|_| discovery) {
                    got.entry(("idle CPU after the fill, % of a core", label))
                        .or_default()
                        .push(idle_cpu(&node, idle));
                }
                if discovery && !pods.is_empty() {
                    let sock = node.ipamd().socket.clone();
                    // ipamd's own part of an ADD: the AddNetwork round trip one at a time, and
                    // ipamd's CPU for each ADD and DEL, on the full pool. A thousand calls, so
                    // that a periodic job (reconcile, readiness) landing in the window weighs
                    // little; the fill ran without a cooldown, so each DEL's address serves the
                    // next ADD and none waits. Not straight after the fill: its last EC2
                    // answers and checkpoint writes would count as the calls' (an idle
                    // window, when measured, has already waited longer).
                    if extra.idle.is_none() {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    let pid = node.ipamd().pid().unwrap_or(0);
                    let c0 = cpu_ns(pid);
                    let g = pct(grpc_churn(
                        &sock,
                        &format!("{label}{round}g"),
                        SEQ_CALLS,
                        false,
                    ));
                    let per = (cpu_ns(pid) - c0) as f64 / SEQ_CALLS as f64 / 1000.0;
                    if per == 0.0 {
                        // The pid that answered is not the one that worked: a wrapper script
                        // that runs the daemon as its child instead of exec'ing it.
                        eprintln!(
                            "bench: {label}'s pid {pid} used no CPU over {SEQ_CALLS} calls; a \
                             wrapper given as ipamd must exec it"
                        );
                    }
                    got.entry(("AddNetwork gRPC p50, 1 at a time, µs", label))
                        .or_default()
                        .push(g[0] * 1000.0);
                    got.entry(("ipamd CPU per AddNetwork + DelNetwork, µs", label))
                        .or_default()
                        .push(per);
                    let c = CniClient::new(&node.ns.name, &dir, &sock).first_plugin_only(&dir);
                    c.use_plugin(&shipped);
                    let (a, d) = burst(&c, &node.ns, &pods, &format!("{label}{round}"));
                    got.entry((&add_burst, label)).or_default().push(pct(a)[0]);
                    got.entry((&del_burst, label)).or_default().push(pct(d)[0]);
                }
                keep_log(keep, &node, &name);
            }
        }
    }
    let mut json = serde_json::Map::new();
    let measures: Vec<&str> = got.keys().map(|(m, _)| *m).collect();
    let mut seen = std::collections::BTreeSet::new();
    for m in measures.into_iter().filter(|m| seen.insert(*m)) {
        let median = |label: &str| got.get(&(m, label)).map(|v| pct(v.clone())[0]);
        let (o, b) = (median("ours"), median("baseline"));
        let percent = m.contains('%');
        let spread = |label: &str| {
            got.get(&(m, label)).map_or(String::new(), |v| {
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(0.0, f64::max);
                let mid = median(label).unwrap_or(0.0);
                if percent {
                    format!("{mid:.2} ({lo:.2}-{hi:.2})")
                } else {
                    format!("{mid:.0} ({lo:.0}-{hi:.0})")
                }
            })
        };
        r.row(
            "startup",
            m,
            spread("ours"),
            b.map(|_| spread("baseline")),
            o.zip(b).map(|(o, b)| o / b),
            None,
        );
        json.insert(
            m.to_string(),
            json!({"ours": got.get(&(m, "ours")), "baseline": got.get(&(m, "baseline"))}),
        );
    }
    r.set("startup_rounds", Value::Object(json));
    eprintln!("bench: medians of {rounds} rounds (lowest-highest)");
}

/// Start the ipamd at `bin` on a fresh `node`: ms to serving gRPC and to its first allocatable
/// address, both polled every 2 ms (not at the rig's usual 20 and 100 ms: the figures are tens
/// of milliseconds).
fn time_start(node: &mut VpcNode, bin: &Path, dir: &Path) -> (f64, f64) {
    let fine = Duration::from_millis(2);
    let t0 = Instant::now();
    node.spawn_ipamd_bin(bin, dir, &[]);
    let sock = node.ipamd().socket.clone();
    eventually_every(fine, 60, "gRPC serving", || {
        std::os::unix::net::UnixStream::connect(&sock).ok()
    });
    let serving = ms(t0.elapsed());
    eventually_every(fine, 60, "a first address", || {
        (status(&sock) > 0).then_some(())
    });
    (serving, ms(t0.elapsed()))
}

/// Start the ipamd at `bin` on a fresh `node` with MINIMUM_IP_TARGET=100, no cooldown (the
/// sequential calls after the fill reuse each released address at once; the fill itself
/// releases none) and subnet discovery on or off: ms until it holds 100 addresses, polled
/// every 5 ms (the figure is hundreds).
fn time_fill(node: &mut VpcNode, bin: &Path, dir: &Path, discovery: bool) -> f64 {
    let mut env = vec![("MINIMUM_IP_TARGET", "100"), ("IP_COOLDOWN_PERIOD", "0")];
    if !discovery {
        env.push(("ENABLE_SUBNET_DISCOVERY", "false"));
    }
    let t0 = Instant::now();
    node.spawn_ipamd_bin(bin, dir, &env);
    let sock = node.ipamd().socket.clone();
    eventually_every(Duration::from_millis(5), 180, "100 addresses", || {
        std::os::unix::net::UnixStream::connect(&sock).ok()?;
        (status(&sock) >= 100).then_some(())
    });
    ms(t0.elapsed())
}

/// Nanoseconds process `pid`'s live threads have run (the scheduler's own count, not 10 ms
/// ticks); a thread that ends in between takes its share with it, so measure short spans.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The node's ipamd's own CPU over `idle`, % of a core, once its fill has settled (a second
/// for the last EC2 answers and checkpoint writes). The kernel counts in 10 ms ticks, so a
/// short window is coarse: take tens of seconds.
fn idle_cpu(node: &VpcNode, idle: Duration) -> f64 {
    std::thread::sleep(Duration::from_secs(1));
    let pid = node.ipamd().pid().unwrap_or(0);
    let c0 = cpu_s(pid);
    std::thread::sleep(idle);
    (cpu_s(pid) - c0) / idle.as_secs_f64() * 100.0
}

/// A copy of the node's ipamd log in `keep`, named `name`.log.
fn keep_log(keep: Option<&Path>, node: &VpcNode, name: &str) {
    if let Some(k) = keep {
        let _ = std::fs::copy(&node.ipamd().log, k.join(format!("{name}.log")));
    }
}

#[cfg(test)]
mod tests {
    use super::in_turn;

    #[test]
    fn each_side_goes_first_as_often_over_even_rounds() {
        let sides = ["ours", "baseline"];
        let firsts: Vec<&str> = (0..4).map(|r| *in_turn(&sides, r)[0]).collect();
        assert_eq!(firsts, ["ours", "baseline", "ours", "baseline"]);
        // Every side runs in every round.
        assert!((0..4).all(|r| in_turn(&sides, r).len() == 2));
        // One side alone (no baseline) just runs.
        assert_eq!(in_turn(&["ours"], 1), [&"ours"]);
    }
}
