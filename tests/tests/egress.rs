//! The real `egress-cni` binary in network namespaces: chained by libcni after Debian's `ptp`
//! (standing in for aws-cni: any first plugin that gives the pod its cluster address), and run
//! directly for what a runtime would not send.
//!
//! Each test builds its own world: a "node" namespace where the plugins run, an "internet"
//! namespace behind a veth holding one far host, and pod namespaces. The internet has no
//! route back to the egress ranges, so a pod that reaches the far host has been SNATed; the
//! far host also reports the source it saw. All namespaces (and with them every link and
//! rule) and the temporary directory go when the test ends, pass or fail.

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use integration::cni::{CniClient, CniServer};
use integration::netns::Netns;
use integration::{ping_eventually, sh, unique};
use serde_json::{json, Value};

const NETWORK: &str = "aws-cni";

/// Which egress the world exercises.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Egress {
    /// IPv6 pods (ptp with an IPv6 range), IPv4 egress SNATed to the node's IPv4 address.
    V4,
    /// IPv4 pods, IPv6 egress SNATed to the node's IPv6 address.
    V6,
}

impl Egress {
    fn node_ip(self) -> &'static str {
        match self {
            Egress::V4 => "192.0.2.1",
            Egress::V6 => "2001:db8:1::1",
        }
    }
    fn far_host(self) -> &'static str {
        match self {
            Egress::V4 => "198.51.100.10",
            Egress::V6 => "2001:db8:ff::10",
        }
    }
    fn subnet(self) -> &'static str {
        match self {
            Egress::V4 => "169.254.172.0/22",
            Egress::V6 => "fd00::ac:00/118",
        }
    }
    fn dst(self) -> &'static str {
        match self {
            Egress::V4 => "0.0.0.0/0",
            Egress::V6 => "::/0",
        }
    }
    fn pod_subnet(self) -> &'static str {
        match self {
            Egress::V4 => "fd01::/64",
            Egress::V6 => "10.244.0.0/24",
        }
    }
    fn pod_ifname(self) -> &'static str {
        match self {
            Egress::V4 => "v4if0",
            Egress::V6 => "v6if0",
        }
    }
    fn iptables_save(self) -> &'static str {
        match self {
            Egress::V4 => "iptables-save",
            Egress::V6 => "ip6tables-save",
        }
    }
    fn chain_prefix(self) -> &'static str {
        match self {
            Egress::V4 => "CNI-E4-",
            Egress::V6 => "CNI-E6-",
        }
    }
}

/// Duplicate address detection off for links made from now on in `ns`: ptp's IPv6 pod
/// addresses (it waits for them to settle) would otherwise take seconds per pod.
fn no_dad(ns: &Netns) {
    sh(&[
        "ip",
        "netns",
        "exec",
        &ns.name,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ]);
}

fn pod_ns() -> Netns {
    let p = Netns::new("egp");
    no_dad(&p);
    p
}

struct World {
    family: Egress,
    node: Netns,
    inet: Netns,
    dir: tempfile::TempDir,
    client: CniClient,
}

impl World {
    fn new(family: Egress) -> World {
        World::with(family, "1.0.0", "true")
    }

    fn with(family: Egress, version: &str, enabled: &str) -> World {
        let node = Netns::new("egn");
        let inet = Netns::new("egi");
        no_dad(&node);
        let up = unique("eu");
        sh(&[
            "ip", "-n", &node.name, "link", "add", &up, "type", "veth", "peer", "name", "down0",
            "netns", &inet.name,
        ]);
        let (node_addr, inet_addr, far) = match family {
            Egress::V4 => ("192.0.2.1/24", "192.0.2.2/24", "198.51.100.10/32"),
            Egress::V6 => (
                "2001:db8:1::1/64",
                "2001:db8:1::2/64",
                "2001:db8:ff::10/128",
            ),
        };
        let gw = inet_addr.split('/').next().unwrap_or_default();
        sh(&[
            "ip", "-n", &node.name, "addr", "add", node_addr, "dev", &up, "nodad",
        ]);
        sh(&["ip", "-n", &node.name, "link", "set", &up, "up"]);
        sh(&[
            "ip", "-n", &inet.name, "addr", "add", inet_addr, "dev", "down0", "nodad",
        ]);
        sh(&["ip", "-n", &inet.name, "link", "set", "down0", "up"]);
        sh(&["ip", "-n", &inet.name, "addr", "add", far, "dev", "lo"]);
        sh(&["ip", "-n", &node.name, "route", "add", far, "via", gw]);
        if family == Egress::V6 {
            // Upstream's init container turns IPv6 forwarding on for IPv6 egress; the plugin
            // only does IPv4's.
            sh(&[
                "ip",
                "netns",
                "exec",
                &node.name,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.forwarding=1",
            ]);
        }

        let dir = tempfile::tempdir().expect("tempdir");
        let bindir = dir.path().join("bin");
        std::fs::create_dir_all(&bindir).expect("mkdir bin");
        for (name, target) in [
            ("ptp", PathBuf::from("/usr/lib/cni/ptp")),
            ("host-local", PathBuf::from("/usr/lib/cni/host-local")),
            ("egress-cni", integration::bin("egress-cni")),
        ] {
            std::os::unix::fs::symlink(target, bindir.join(name)).expect("symlink plugin");
        }
        let conflist = dir.path().join("10-egress.conflist");
        let client = CniClient {
            node: node.name.clone(),
            conflist,
            bindir,
            cache: dir.path().join("cache"),
        };
        let w = World {
            family,
            node,
            inet,
            dir,
            client,
        };
        w.write_conflist(version, enabled);
        w
    }

    fn egress_conf(&self, enabled: &str) -> Value {
        json!({
            "name": "egress-cni", "type": "egress-cni", "mtu": "9001", "enabled": enabled,
            "randomizeSNAT": "prng", "nodeIP": self.family.node_ip(),
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.family.subnet()}]],
                "routes": [{"dst": self.family.dst()}],
                "dataDir": self.data_dir(),
            },
            "pluginLogFile": self.dir.path().join("egress.log"), "pluginLogLevel": "DEBUG",
        })
    }

    fn write_conflist(&self, version: &str, enabled: &str) {
        let cl = json!({
            "cniVersion": version,
            "name": NETWORK,
            "plugins": [
                {
                    "type": "ptp", "ipMasq": false, "mtu": 1500,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.family.pod_subnet()}]],
                        "dataDir": self.dir.path().join("ptp-ipam"),
                    },
                },
                self.egress_conf(enabled),
            ]
        });
        std::fs::write(&self.client.conflist, cl.to_string()).expect("write conflist");
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("egress-ipam")
    }

    /// Reserved address -> file content.
    fn reservations(&self) -> Vec<(String, String)> {
        let Ok(rd) = std::fs::read_dir(self.data_dir().join(NETWORK)) else {
            return Vec::new();
        };
        let mut out: Vec<(String, String)> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.parse::<IpAddr>().ok()?;
                Some((name, std::fs::read_to_string(e.path()).ok()?))
            })
            .collect();
        out.sort();
        out
    }

    /// The node's nat table lines that belong to egress (its chains and the jumps to them).
    fn nat_rules(&self) -> Vec<String> {
        let out = sh(&[
            "ip",
            "netns",
            "exec",
            &self.node.name,
            self.family.iptables_save(),
            "-t",
            "nat",
        ]);
        out.lines()
            .filter(|l| l.contains(self.family.chain_prefix()))
            .map(str::to_string)
            .collect()
    }

    fn chains(&self) -> Vec<String> {
        self.nat_rules()
            .iter()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    fn add(&self, cid: &str, pod: &Netns) -> Value {
        let out = self.client.ok("add", cid, pod, "web", "");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// The egress address on the pod's egress interface ("169.254.172.2/22").
    fn pod_egress_addr(&self, pod: &Netns) -> Option<String> {
        let family = match self.family {
            Egress::V4 => "-4",
            Egress::V6 => "-6",
        };
        let v = integration::ip_json(
            &pod.name,
            &[family, "addr", "show", "dev", self.family.pod_ifname()],
        );
        v.as_array()?.first()?["addr_info"]
            .as_array()?
            .iter()
            .find(|a| a["scope"] == "global")
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"]))
    }

    /// Links of the node besides lo and the uplink.
    fn node_links(&self) -> Vec<String> {
        self.node
            .links_now()
            .into_iter()
            .filter(|l| !l.starts_with("eu"))
            .collect()
    }

    /// The source address the far host sees for a TCP connection from `pod`.
    fn source_seen_from(&self, pod: &Netns) -> IpAddr {
        let far: IpAddr = self.family.far_host().parse().expect("far host");
        let addr = SocketAddr::new(far, 8080);
        let listener = in_netns(&self.inet.name, move || TcpListener::bind(addr))
            .expect("listen on the far host");
        let conn = in_netns(&pod.name, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })
        .expect("connect from the pod to the far host");
        let (_, peer) = listener.accept().expect("accept");
        drop(conn);
        peer.ip()
    }

    fn assert_clean(&self, pods: &[&Netns]) {
        assert!(
            self.chains().is_empty(),
            "nat rules left: {:?}",
            self.nat_rules()
        );
        assert!(
            self.reservations().is_empty(),
            "reservations left: {:?}",
            self.reservations()
        );
        // A deleted namespace takes its links with it a moment later (the kernel tears
        // namespaces down in the background).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !self.node_links().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            self.node_links().is_empty(),
            "node links left: {:?}",
            self.node_links()
        );
        for p in pods {
            let links = p.links_now();
            assert!(
                !links.iter().any(|l| l == self.family.pod_ifname()),
                "{} left in {}: {links:?}",
                self.family.pod_ifname(),
                p.name
            );
        }
    }
}

/// Run `f` on a thread inside network namespace `ns` (sockets it makes stay there).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let f_ns = File::open(&path).expect("open netns");
        nix::sched::setns(f_ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
    fn ok(&self) -> Value {
        assert_eq!(self.code, 0, "plugin failed: {self:?}");
        if self.stdout.is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }
    fn err_code(&self) -> u64 {
        assert_ne!(self.code, 0, "plugin should have failed: {self:?}");
        self.json()["code"].as_u64().unwrap_or(0)
    }
    fn err_msg(&self) -> String {
        self.json()["msg"].as_str().unwrap_or("").to_string()
    }
}

/// Run a plugin binary in `node` as a runtime would, without libcni.
fn run_in(node: &str, program: &Path, env: &[(&str, &str)], stdin: &str) -> Out {
    let mut child = Command::new("ip")
        .args(["netns", "exec", node])
        .arg(program)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn plugin");
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin.as_bytes()).expect("stdin");
    }
    let out = child.wait_with_output().expect("wait plugin");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
    }
}

fn egress(node: &str, cmd: &str, cid: &str, pod: &str, stdin: &Value) -> Out {
    run_in(
        node,
        &integration::bin("egress-cni"),
        &[
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", cid),
            ("CNI_NETNS", pod),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ],
        &stdin.to_string(),
    )
}

/// The egress entry as libcni hands it to the plugin: the list's name and version, and the
/// first plugin's result as prevResult (an IPv6 pod's, for IPv4 egress).
fn direct_conf(w: &World, version: &str) -> Value {
    let mut c = w.egress_conf("true");
    c["cniVersion"] = json!(version);
    c["name"] = json!(NETWORK);
    c["prevResult"] = json!({
        "cniVersion": version,
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
        "ips": [{"address": "fd01::5/64", "interface": 0}],
    });
    c
}

#[test]
fn ipv6_pod_reaches_an_ipv4_host_as_the_node_and_del_removes_everything() {
    let w = World::new(Egress::V4);
    let pod = pod_ns();
    let cid = unique("cid");
    let res = w.add(&cid, &pod);

    // ptp's result, with the egress pair appended.
    let ifaces = res["interfaces"].as_array().expect("interfaces");
    assert_eq!(ifaces.len(), 4, "{res}");
    let host_end = ifaces[2]["name"].as_str().expect("host end");
    assert!(
        host_end.starts_with("veth") && host_end.len() == 15,
        "{res}"
    );
    assert!(ifaces[2].get("sandbox").is_none(), "{res}");
    assert_eq!(ifaces[3]["name"], "v4if0");
    assert_eq!(ifaces[3]["sandbox"], pod.path());
    assert!(res["ips"][0]["address"]
        .as_str()
        .is_some_and(|a| a.starts_with("fd01::")));

    assert_eq!(w.pod_egress_addr(&pod).as_deref(), Some("169.254.172.2/22"));
    assert_eq!(
        w.reservations(),
        [("169.254.172.2".to_string(), format!("{cid}\r\neth0"))]
    );
    let routes = sh(&["ip", "-n", &pod.name, "-4", "route", "show"]).replace(" proto static", "");
    assert!(
        routes.contains("default via 169.254.172.1 dev v4if0"),
        "{routes}"
    );
    assert!(
        routes.contains("169.254.172.0/22 via 169.254.172.1 dev v4if0 src 169.254.172.2"),
        "{routes}"
    );
    let rules = w.nat_rules();
    assert_eq!(w.chains().len(), 1, "{rules:?}");
    assert!(
        rules
            .iter()
            .any(|r| r.starts_with("-A POSTROUTING -s 169.254.172.2/32 ")),
        "{rules:?}"
    );
    assert!(
        rules
            .iter()
            .any(|r| r.contains("-j SNAT --to-source 192.0.2.1 --random-fully")),
        "{rules:?}"
    );

    assert!(
        ping_eventually(&pod.name, Egress::V4.far_host()),
        "ping the far host"
    );
    assert_eq!(
        w.source_seen_from(&pod),
        "192.0.2.1".parse::<IpAddr>().unwrap()
    );

    // libcni's CHECK runs ptp's and ours.
    w.client.ok("check", &cid, &pod, "web", "");

    w.client.ok("del", &cid, &pod, "web", "");
    w.assert_clean(&[&pod]);
    // DEL again: nothing left to remove, still success.
    w.client.ok("del", &cid, &pod, "web", "");

    // A pod whose namespace is gone by the time of DEL.
    let gone = pod_ns();
    let cid2 = unique("cid");
    w.add(&cid2, &gone);
    assert_eq!(w.chains().len(), 1);
    let path = gone.path();
    drop(gone);
    let out = egress(&w.node.name, "DEL", &cid2, &path, &direct_conf(&w, "1.0.0"));
    out.ok();
    w.assert_clean(&[]);
}

#[test]
fn thirty_concurrent_adds_get_thirty_addresses() {
    let w = World::new(Egress::V4);
    let pods: Vec<Netns> = (0..30).map(|_| pod_ns()).collect();
    let calls: Vec<(String, &Netns, String)> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| (unique("cc"), p, format!("pod-{i}")))
        .collect();
    let mut server = CniServer::start(&w.client);
    server.run("add", &calls);

    let reserved = w.reservations();
    assert_eq!(reserved.len(), 30, "{reserved:?}");
    let mut on_pods: Vec<String> = pods
        .iter()
        .map(|p| w.pod_egress_addr(p).expect("egress address on the pod"))
        .collect();
    on_pods.sort();
    on_pods.dedup();
    assert_eq!(on_pods.len(), 30, "{on_pods:?}");
    for (ip, owner) in &reserved {
        assert!(
            on_pods.contains(&format!("{ip}/22")),
            "{ip} reserved but on no pod"
        );
        assert!(
            calls
                .iter()
                .any(|(cid, _, _)| *owner == format!("{cid}\r\neth0")),
            "{owner:?}"
        );
    }
    assert_eq!(w.chains().len(), 30);
    assert_eq!(
        w.node_links()
            .iter()
            .filter(|l| l.starts_with("veth"))
            .count(),
        60,
        "ptp's and egress' host ends: {:?}",
        w.node_links()
    );
    // Every pod has its own working egress.
    for p in pods.iter().step_by(7) {
        assert_eq!(
            w.source_seen_from(p),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }

    server.run("del", &calls);
    let refs: Vec<&Netns> = pods.iter().collect();
    w.assert_clean(&refs);
}

#[test]
fn ipv4_pod_reaches_an_ipv6_host_as_the_node() {
    let w = World::new(Egress::V6);
    let pod = pod_ns();
    let cid = unique("cid");
    let res = w.add(&cid, &pod);
    let ifaces = res["interfaces"].as_array().expect("interfaces");
    assert_eq!(
        ifaces.last().map(|i| i["name"].clone()),
        Some(json!("v6if0"))
    );

    assert_eq!(w.pod_egress_addr(&pod).as_deref(), Some("fd00::ac:2/118"));
    assert_eq!(
        w.reservations(),
        [("fd00::ac:2".to_string(), format!("{cid}\r\neth0"))]
    );
    // IPv6 goes by v6if0 only: off on the pod's own interface, as upstream.
    let off = sh(&[
        "ip",
        "netns",
        "exec",
        &pod.name,
        "sysctl",
        "-n",
        "net.ipv6.conf.eth0.disable_ipv6",
    ]);
    assert_eq!(off.trim(), "1");
    let routes = sh(&["ip", "-n", &pod.name, "-6", "route", "show"]).replace(" proto static", "");
    assert!(routes.contains("default via fe80::1 dev v6if0"), "{routes}");
    let rules = w.nat_rules();
    assert!(
        rules
            .iter()
            .any(|r| r.starts_with("-A POSTROUTING -s fd00::ac:2/128 ")),
        "{rules:?}"
    );
    assert!(
        rules.iter().any(|r| r.contains("-d ff00::/8 ")),
        "{rules:?}"
    );

    assert!(
        ping_eventually(&pod.name, Egress::V6.far_host()),
        "ping6 the far host"
    );
    assert_eq!(
        w.source_seen_from(&pod),
        "2001:db8:1::1".parse::<IpAddr>().unwrap()
    );
    w.client.ok("check", &cid, &pod, "web", "");

    w.client.ok("del", &cid, &pod, "web", "");
    w.assert_clean(&[&pod]);
}

#[test]
fn disabled_is_a_pass_through() {
    let w = World::with(Egress::V4, "0.4.0", "false");
    let pod = pod_ns();
    let cid = unique("cid");
    let res = w.add(&cid, &pod);
    assert_eq!(res["cniVersion"], "0.4.0");
    let ifaces = res["interfaces"].as_array().expect("interfaces");
    assert_eq!(ifaces.len(), 2, "ptp's two only: {res}");
    assert!(!pod.links_now().iter().any(|l| l == "v4if0"));
    assert!(w.chains().is_empty());
    assert!(
        !w.data_dir().exists(),
        "nothing reserved, not even the directory"
    );
    w.client.ok("del", &cid, &pod, "web", "");
}

#[test]
fn results_in_each_version_and_repeated_add_is_idempotent() {
    let w = World::new(Egress::V4);
    let pod = pod_ns();
    for (i, version) in ["0.4.0", "1.0.0", "1.1.0"].iter().enumerate() {
        let cid = format!("ver{i}");
        let conf = direct_conf(&w, version);
        let res = egress(&w.node.name, "ADD", &cid, &pod.path(), &conf).ok();
        assert_eq!(res["cniVersion"], *version);
        assert_eq!(res["ips"], conf["prevResult"]["ips"]);
        let ifaces = res["interfaces"].as_array().expect("interfaces");
        assert_eq!(ifaces.len(), 3, "{res}");
        assert_eq!(ifaces[0]["name"], "eth0");
        assert_eq!(ifaces[2]["name"], "v4if0");
        // The same ADD again: the same address, one jump, one pair.
        let reserved = w.reservations();
        assert_eq!(reserved.len(), 1, "{reserved:?}");
        let again = egress(&w.node.name, "ADD", &cid, &pod.path(), &conf).ok();
        assert_eq!(again["interfaces"][2]["name"], "v4if0");
        assert_eq!(w.reservations(), reserved);
        assert_eq!(
            w.pod_egress_addr(&pod),
            Some(format!("{}/22", reserved[0].0))
        );
        let jumps = w
            .nat_rules()
            .into_iter()
            .filter(|r| r.starts_with("-A POSTROUTING"))
            .count();
        assert_eq!(jumps, 1, "{:?}", w.nat_rules());
        egress(&w.node.name, "DEL", &cid, &pod.path(), &conf).ok();
        w.assert_clean(&[&pod]);
    }
}

#[test]
fn check_names_what_is_missing_and_gc_collects_the_stale() {
    let w = World::new(Egress::V4);
    let pod = pod_ns();
    let conf = direct_conf(&w, "1.1.0");
    let node = w.node.name.clone();
    egress(&node, "ADD", "chk", &pod.path(), &conf).ok();
    egress(&node, "CHECK", "chk", &pod.path(), &conf).ok();

    // The jump goes: CHECK names it.
    let jump = w
        .nat_rules()
        .into_iter()
        .find(|r| r.starts_with("-A POSTROUTING"))
        .expect("jump");
    let mut del = vec!["ip", "netns", "exec", &node, "iptables", "-t", "nat", "-D"];
    let words: Vec<String> = shell_words(&jump[3..]);
    del.extend(words.iter().map(String::as_str));
    sh(&del);
    let out = egress(&node, "CHECK", "chk", &pod.path(), &conf);
    assert_eq!(out.err_code(), 101);
    assert!(
        out.err_msg().contains("POSTROUTING -s 169.254.172.2/32"),
        "{}",
        out.err_msg()
    );

    // The pod's interface goes: CHECK names that too.
    sh(&["ip", "-n", &pod.name, "link", "del", "v4if0"]);
    let out = egress(&node, "CHECK", "chk", &pod.path(), &conf);
    assert_eq!(out.err_code(), 101);
    assert!(
        out.err_msg().contains("pod interface v4if0 is missing"),
        "{}",
        out.err_msg()
    );

    // A CHECK for an attachment never added.
    let out = egress(&node, "CHECK", "never", &pod.path(), &conf);
    assert_eq!(out.err_code(), 101);
    assert!(
        out.err_msg().contains("no egress address reserved"),
        "{}",
        out.err_msg()
    );

    // GC keeps the listed attachment and collects the other.
    let pod2 = pod_ns();
    egress(&node, "ADD", "keep", &pod2.path(), &conf).ok();
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    egress(&node, "GC", "", "", &gc).ok();
    assert_eq!(
        w.reservations(),
        [("169.254.172.3".to_string(), "keep\r\neth0".to_string())]
    );
    assert_eq!(w.chains().len(), 1);
    // GC without the list refuses to collect everything.
    let out = egress(&node, "GC", "", "", &conf);
    assert_eq!(out.err_code(), 7);
    assert_eq!(w.reservations().len(), 1);
    egress(&node, "DEL", "keep", &pod2.path(), &conf).ok();
    w.assert_clean(&[&pod, &pod2]);
}

/// Split an `iptables-save` rule into arguments (double quotes with backslash escapes).
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut escaped, mut any) = (false, false, false);
    for c in s.chars() {
        if escaped {
            cur.push(c);
            escaped = false;
        } else if c == '\\' && quoted {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
            any = true;
        } else if c.is_whitespace() && !quoted {
            if any || !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            any = false;
        } else {
            cur.push(c);
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Debian's host-local and egress-cni share one store: each sees, continues from and
/// releases the other's reservations.
#[test]
fn host_local_and_egress_cni_share_reservations() {
    let w = World::new(Egress::V4);
    let pod = pod_ns();
    let node = w.node.name.clone();
    let conf = direct_conf(&w, "1.0.0");
    let ipam_conf = json!({"cniVersion": "1.0.0", "name": NETWORK, "ipam": conf["ipam"]});
    let host_local = |cmd: &str, cid: &str| {
        run_in(
            &node,
            Path::new("/usr/lib/cni/host-local"),
            &[
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", &pod.path()),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/usr/lib/cni"),
            ],
            &ipam_conf.to_string(),
        )
    };
    let hl1 = host_local("ADD", "hl1").ok();
    assert_eq!(hl1["ips"][0]["address"], "169.254.172.2/22");
    // Ours continues after host-local's last reservation.
    egress(&node, "ADD", "eg1", &pod.path(), &conf).ok();
    assert_eq!(w.pod_egress_addr(&pod).as_deref(), Some("169.254.172.3/22"));
    // And host-local after ours.
    let hl2 = host_local("ADD", "hl2").ok();
    assert_eq!(hl2["ips"][0]["address"], "169.254.172.4/22");
    assert_eq!(
        w.reservations(),
        [
            ("169.254.172.2".to_string(), "hl1\r\neth0".to_string()),
            ("169.254.172.3".to_string(), "eg1\r\neth0".to_string()),
            ("169.254.172.4".to_string(), "hl2\r\neth0".to_string()),
        ]
    );
    // host-local releases ours; ours releases host-local's.
    host_local("DEL", "eg1").ok();
    egress(&node, "DEL", "hl1", &pod.path(), &conf).ok();
    assert_eq!(
        w.reservations(),
        [("169.254.172.4".to_string(), "hl2\r\neth0".to_string())]
    );
    // The released pod's chain and pair are still ours to remove.
    egress(&node, "DEL", "eg1", &pod.path(), &conf).ok();
    host_local("DEL", "hl2").ok();
    w.assert_clean(&[&pod]);
}

/// A plugin's environment: (variable, value).
type Env<'a> = Vec<(&'a str, &'a str)>;

#[test]
fn malformed_input_gets_the_specs_codes_and_changes_nothing() {
    let w = World::new(Egress::V4);
    let pod = pod_ns();
    let node = w.node.name.clone();
    let good = direct_conf(&w, "1.0.0");
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let mut v6_subnet = good.clone();
    v6_subnet["ipam"]["ranges"] = json!([[{"subnet": "fd00::ac:00/118"}]]);
    v6_subnet["ipam"]["routes"] = json!([{"dst": "::/0"}]);
    v6_subnet["nodeIP"] = json!("fe80::1");
    let mut no_prev = good.clone();
    no_prev.as_object_mut().map(|o| o.remove("prevResult"));
    let mut dhcp = good.clone();
    dhcp["ipam"]["type"] = json!("dhcp");
    let mut host_bits = good.clone();
    host_bits["ipam"]["ranges"] = json!([[{"subnet": "169.254.172.9/22"}]]);

    let cases: Vec<(&str, Value, u64, &str)> = vec![
        ("not json", Value::Null, 6, "cannot decode"),
        ("conf", with("nodeIP", json!("")), 7, "nodeIP is missing"),
        (
            "conf",
            with("nodeIP", json!("nonsense")),
            7,
            "nodeIP \"nonsense\"",
        ),
        (
            "conf",
            with("nodeIP", json!("2001:db8::1")),
            7,
            "different families",
        ),
        ("conf", v6_subnet, 7, "not a global unicast"),
        ("conf", with("mtu", json!("jumbo")), 7, "mtu"),
        ("conf", dhcp, 7, "ipam type \"dhcp\""),
        ("conf", host_bits, 7, "host bits"),
        ("conf", no_prev, 7, "prevResult"),
        (
            "conf",
            with("cniVersion", json!("0.2.0")),
            1,
            "incompatible CNI version",
        ),
        ("conf", with("name", json!("a/b")), 7, "network name"),
    ];
    for (kind, conf, code, words) in cases {
        let stdin = if kind == "not json" {
            "{not json".to_string()
        } else {
            conf.to_string()
        };
        let out = run_in(
            &node,
            &integration::bin("egress-cni"),
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "bad"),
                ("CNI_NETNS", &pod.path()),
                ("CNI_IFNAME", "eth0"),
            ],
            &stdin,
        );
        assert_eq!(out.err_code(), code, "{stdin}: {out:?}");
        assert!(out.err_msg().contains(words), "{stdin}: {}", out.err_msg());
    }

    // The environment: 4 for what is missing or malformed, 3 for a namespace that is not there.
    let env_cases: Vec<(Env, u64, &str)> = vec![
        (vec![], 4, "CNI_COMMAND"),
        (
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            4,
            "CNI_CONTAINERID",
        ),
        (
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "eth0"),
            ],
            4,
            "CNI_NETNS",
        ),
        (
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c/../x"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            4,
            "CNI_CONTAINERID",
        ),
        (
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/var/run/netns/none-such"),
            ],
            3,
            "none-such",
        ),
        (vec![("CNI_COMMAND", "FROB")], 4, "FROB"),
    ];
    for (env, code, words) in env_cases {
        let out = run_in(
            &node,
            &integration::bin("egress-cni"),
            &env,
            &good.to_string(),
        );
        assert_eq!(out.err_code(), code, "{env:?}: {out:?}");
        assert!(out.err_msg().contains(words), "{env:?}: {}", out.err_msg());
    }
    w.assert_clean(&[&pod]);
    assert!(
        w.reservations().is_empty() && !w.data_dir().join(NETWORK).exists(),
        "nothing reserved"
    );

    // VERSION answers without a config.
    let out = run_in(
        &node,
        &integration::bin("egress-cni"),
        &[("CNI_COMMAND", "VERSION")],
        r#"{"cniVersion":"0.4.0"}"#,
    );
    let v = out.ok();
    assert_eq!(v["cniVersion"], "0.4.0");
    let versions = v["supportedVersions"].as_array().expect("versions");
    for want in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(versions.contains(&json!(want)), "{v}");
    }
}
