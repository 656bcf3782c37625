//! Node networking owned by ipamd, on a node of the namespace VPC: ENI links, per-ENI tables
//! and rules, SNAT/connmark in iptables, after start, restart, VPC CIDR change and external
//! SNAT; and the traffic that follows from them, seen from the router and the internet.

use std::time::Duration;

use integration::cloud::eventually;
use integration::cni::CniClient;
use integration::netns::Netns;
use integration::vpc::{Vpc, VpcNode, INTERNET_IP};
use integration::{ip_json, ping, sh};
use serde_json::{json, Value};

struct Setup {
    node: VpcNode,
    vpc: Vpc,
    dir: tempfile::TempDir,
}

/// A t3.medium node whose ipamd keeps two ENIs' worth warm, so a secondary ENI is attached
/// from the start.
fn setup(env: &[(&str, &str)]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let mut vpc = Vpc::start(dir.path(), 0);
    vpc.add_internet();
    let inst = vpc.shim.instance("t3.medium", "10.0.1.0/24");
    let mut node = vpc.add_node(dir.path(), &inst, 0);
    let mut all = vec![("WARM_ENI_TARGET", "2")];
    all.extend_from_slice(env);
    node.start_ipamd(dir.path(), &all);
    let s = Setup { node, vpc, dir };
    s.wait_eni1();
    s
}

impl Setup {
    fn ns(&self) -> &str {
        &self.node.ns.name
    }

    fn eni(&self, dev: u64) -> Value {
        self.vpc
            .shim
            .attached(&self.node.inst.id)
            .into_iter()
            .find(|e| e["device_index"] == dev)
            .unwrap_or_else(|| panic!("no ENI at device {dev}"))
    }

    /// The ENI at device 1 attached and its table populated by ipamd.
    fn wait_eni1(&self) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually(30, "eth1 set up by ipamd", || {
                let out = integration::try_sh(&[
                    "ip",
                    "-n",
                    self.ns(),
                    "-j",
                    "route",
                    "show",
                    "table",
                    "2",
                ]);
                let routes: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                (routes.as_array().map_or(0, Vec::len) == 2).then_some(())
            })
        }));
        if r.is_err() {
            panic!(
                "eth1 not set up; fabric: {:?}; ipamd log:\n{}",
                self.vpc.fabric_error(),
                self.node.ipamd().log_text()
            );
        }
    }

    fn iptables(&self, table: &str) -> String {
        sh(&[
            "ip",
            "netns",
            "exec",
            self.ns(),
            "iptables-save",
            "-t",
            table,
        ])
    }

    /// `table ip aws-cni` as nft lists it ("" when there is none).
    fn connmark_table(&self) -> String {
        String::from_utf8_lossy(
            &integration::try_sh(&[
                "ip",
                "netns",
                "exec",
                self.ns(),
                "nft",
                "list",
                "table",
                "ip",
                "aws-cni",
            ])
            .stdout,
        )
        .into_owned()
    }

    fn restart(&mut self, env: &[(&str, &str)]) {
        if let Some(mut d) = self.node.ipamd.take() {
            d.stop();
        }
        let mut all = vec![("WARM_ENI_TARGET", "2")];
        all.extend_from_slice(env);
        self.node.start_ipamd(self.dir.path(), &all);
    }
}

fn our_lines(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| l.starts_with("-A ") && l.contains("AWS"))
        .map(str::to_string)
        .collect()
}

fn rules(ns: &str) -> Vec<Value> {
    ip_json(ns, &["rule", "show"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn rules_routes_and_iptables_survive_restart_and_follow_settings() {
    let mut s = setup(&[("AWS_EXTERNAL_SERVICE_CIDRS", "198.51.100.0/24")]);
    let primary_ip = s.eni(0)["primary_ip"].as_str().unwrap().to_string();
    let eni1_ip = s.eni(1)["primary_ip"].as_str().unwrap().to_string();

    // The secondary ENI: up, MTU 9001, only its primary address without a subnet route in main.
    let link = &ip_json(s.ns(), &["addr", "show", "dev", "eth1"])[0];
    assert_eq!(link["mtu"], 9001);
    assert!(link["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    let addrs: Vec<&Value> = link["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .collect();
    assert_eq!(addrs.len(), 1, "{link}");
    assert_eq!(addrs[0]["local"], eni1_ip.as_str());
    assert_eq!(addrs[0]["prefixlen"], 24);
    assert_eq!(addrs[0]["noprefixroute"], true, "{link}");
    let main = ip_json(s.ns(), &["route", "show", "table", "main", "dev", "eth1"]);
    assert!(main.as_array().unwrap().is_empty(), "{main}");
    let table2 = ip_json(s.ns(), &["route", "show", "table", "2"]);
    assert!(
        table2
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == "10.0.1.1" && r["dev"] == "eth1"),
        "{table2}"
    );
    assert!(
        table2
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "10.0.1.1" && r["dev"] == "eth1" && r["scope"] == "link"),
        "{table2}"
    );
    let rp = sh(&[
        "ip",
        "netns",
        "exec",
        s.ns(),
        "sysctl",
        "-n",
        "net.ipv4.conf.eth1.rp_filter",
    ]);
    assert_eq!(rp.trim(), "2");

    let check_rules = |s: &Setup| {
        let r = rules(s.ns());
        let eni_rules: Vec<_> = r
            .iter()
            .filter(|x| x["priority"] == 32765 && x["src"] == eni1_ip.as_str())
            .collect();
        assert_eq!(eni_rules.len(), 1, "{r:?}");
        assert_eq!(eni_rules[0]["table"], "2");
        let fwmark: Vec<_> = r.iter().filter(|x| x["priority"] == 1024).collect();
        assert_eq!(fwmark.len(), 1, "{r:?}");
        assert_eq!(fwmark[0]["fwmark"], "0x80");
        assert_eq!(fwmark[0]["fwmask"], "0x80");
        assert_eq!(fwmark[0]["table"], "main");
        let ext: Vec<_> = r.iter().filter(|x| x["priority"] == 1535).collect();
        assert_eq!(ext.len(), 1, "{r:?}");
        assert_eq!(ext[0]["dst"], "198.51.100.0");
    };
    check_rules(&s);

    // This machine's iptables is nf_tables: connections are marked in upstream's nf_tables
    // table, SNAT stays in iptables, as upstream's layout on such a node.
    let nat = s.iptables("nat");
    let want_nat = vec![
        "-A POSTROUTING -m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0".to_string(),
        "-A AWS-SNAT-CHAIN-0 -d 10.0.0.0/16 -m comment --comment \"AWS SNAT CHAIN\" -j RETURN".into(),
        format!("-A AWS-SNAT-CHAIN-0 ! -o vlan+ -m comment --comment \"AWS, SNAT\" -m addrtype ! --dst-type LOCAL -j SNAT --to-source {primary_ip} --random-fully"),
    ];
    assert_eq!(our_lines(&nat), want_nat, "{nat}");
    let table = s.connmark_table();
    for want in [
        // nft names priority -90 after its hook's base (dstnat, -100).
        "type nat hook prerouting priority dstnat + 10; policy accept;",
        "fib daddr type local return",
        "iifname \"eni*\" counter",
        "jump snat-mark",
        "meta mark set ct mark & 0x00000080",
        "ip daddr 10.0.0.0/16 counter",
        "ct mark set ct mark | 0x00000080",
    ] {
        assert!(table.contains(want), "{want}: {table}");
    }
    let mangle = s.iptables("mangle");
    assert_eq!(our_lines(&mangle).len(), 3, "{mangle}");
    assert!(mangle.contains("-A PREROUTING -i eth0 -m comment --comment \"AWS, primary ENI\" -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-xmark 0x80/0x80"), "{mangle}");

    // A restart finds everything in place: exactly one copy of each rule.
    s.restart(&[("AWS_EXTERNAL_SERVICE_CIDRS", "198.51.100.0/24")]);
    s.wait_eni1();
    std::thread::sleep(Duration::from_secs(1));
    check_rules(&s);
    assert_eq!(our_lines(&s.iptables("nat")), want_nat);
    assert_eq!(our_lines(&s.iptables("mangle")).len(), 3);
    assert_eq!(s.connmark_table().matches("snat-mark").count(), 2);

    // Someone else's edit of the table is undone by the next reconcile.
    in_ns(
        s.ns(),
        &["nft", "flush", "chain", "ip", "aws-cni", "snat-mark"],
    );
    assert!(!s
        .connmark_table()
        .contains("ct mark set ct mark | 0x00000080"));
    eventually(20, "the flushed connmark chain written again", || {
        s.connmark_table()
            .contains("ct mark set ct mark | 0x00000080")
            .then_some(())
    });
    assert_eq!(s.connmark_table().matches("snat-mark").count(), 2);

    // The VPC gains a CIDR: the reconcile adds it to both chains.
    s.vpc.shim.post(
        "/_shim/vpc-cidr",
        json!({"vpc_id": s.node.inst.vpc_id, "cidr": "10.1.0.0/16"}),
    );
    eventually(20, "the new VPC CIDR in the SNAT chain", || {
        let nat = s.iptables("nat");
        (nat.contains(
            "-A AWS-SNAT-CHAIN-0 -d 10.1.0.0/16 -m comment --comment \"AWS SNAT CHAIN\" -j RETURN",
        ) && s.connmark_table().contains("ip daddr 10.1.0.0/16"))
        .then_some(())
    });
    assert_eq!(our_lines(&s.iptables("nat")).len(), 4);

    // External SNAT: SNAT and connmark go; the NodePort rules stay.
    s.restart(&[
        ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "true"),
        ("AWS_EXTERNAL_SERVICE_CIDRS", ""),
    ]);
    eventually(20, "SNAT rules removed", || {
        our_lines(&s.iptables("nat")).is_empty().then_some(())
    });
    let nat = s.iptables("nat");
    assert!(
        !nat.contains("AWS-SNAT-CHAIN") && !nat.contains("AWS-CONNMARK-CHAIN"),
        "{nat}"
    );
    assert_eq!(s.connmark_table(), "", "the connmark table goes with SNAT");
    assert_eq!(our_lines(&s.iptables("mangle")).len(), 3);
    let r = rules(s.ns());
    assert_eq!(r.iter().filter(|x| x["priority"] == 1024).count(), 1);
    assert_eq!(
        r.iter().filter(|x| x["priority"] == 1535).count(),
        0,
        "{r:?}"
    );
}

/// Packets the `inet` namespace received from `src` (an INPUT counter rule per source).
fn counted(ns: &str, src: &str) -> u64 {
    let out = sh(&["ip", "netns", "exec", ns, "iptables", "-nvxL", "INPUT"]);
    out.lines()
        .filter(|l| l.contains(&format!(" {src} ")))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn count_from(ns: &str, src: &str) {
    sh(&[
        "ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-p", "icmp", "-s", src,
    ]);
}

#[test]
fn traffic_leaves_by_the_owning_eni_and_is_snated_outside_the_vpc() {
    let s = setup(&[("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "198.51.100.0/24")]);
    let primary_ip = s.eni(0)["primary_ip"].as_str().unwrap().to_string();
    let eni1 = s.eni(1);
    let eni1_ips: Vec<String> = eni1["secondary_ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let client = CniClient::new(s.ns(), s.dir.path(), &s.node.ipamd().socket);
    // The primary's five addresses go first; the sixth pod lands on the secondary ENI.
    let pods: Vec<Netns> = (0..6).map(|_| Netns::new("vp")).collect();
    let mut ips = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        ips.push(
            client
                .add(&format!("cid{i}"), p, &format!("pod{i}"), "")
                .unwrap(),
        );
    }
    let (sec_pod, sec_ip) = pods
        .iter()
        .zip(&ips)
        .find(|(_, ip)| eni1_ips.contains(ip))
        .expect("a pod on the secondary ENI");
    let (pri_pod, pri_ip) = pods
        .iter()
        .zip(&ips)
        .find(|(_, ip)| !eni1_ips.contains(ip))
        .unwrap();

    // To the VPC: the pod's own address, out of its own ENI (the router's strict rp_filter
    // would drop it on any other link; count what arrives on the ENI's router link).
    let router = s.vpc.router.name.clone();
    let rif = |ip: &str| -> String {
        let r = ip_json(&router, &["route", "get", ip]);
        r[0]["dev"].as_str().unwrap().to_string()
    };
    let eni1_link = rif(sec_ip);
    sh(&[
        "ip", "netns", "exec", &router, "iptables", "-A", "INPUT", "-p", "icmp", "-i", &eni1_link,
        "-s", sec_ip,
    ]);
    if !ping(&sec_pod.name, "10.0.1.1") {
        let d = |ns: &str, a: &[&str]| {
            let mut full = vec!["ip", "-n", ns];
            full.extend_from_slice(a);
            String::from_utf8_lossy(&integration::try_sh(&full).stdout).into_owned()
        };
        panic!(
            "pod {sec_ip} on eth1 cannot reach the router\nnode rules:\n{}\nnode main:\n{}\ntable2:\n{}\nnode neigh:\n{}\nrouter routes:\n{}\nrouter neigh:\n{}\nnode links:\n{}\nrouter links:\n{}\npod:\n{}",
            d(s.ns(), &["rule"]), d(s.ns(), &["route"]), d(s.ns(), &["route", "show", "table", "2"]),
            d(s.ns(), &["neigh"]), d(&router, &["route"]), d(&router, &["neigh"]),
            d(s.ns(), &["-br", "addr"]), d(&router, &["-br", "addr"]), d(&sec_pod.name, &["route"]),
        );
    }
    let out = sh(&["ip", "netns", "exec", &router, "iptables", "-nvxL", "INPUT"]);
    let n: u64 = out
        .lines()
        .filter(|l| l.contains(&eni1_link) && l.contains(sec_ip.as_str()))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(
        n >= 1,
        "router saw the secondary-ENI pod on its ENI's link: {out}"
    );
    assert!(ping(&pri_pod.name, "10.0.1.1"));

    // To the internet: SNAT to the node's primary address, for pods on any ENI.
    let inet = s.vpc.internet.as_ref().unwrap().name.clone();
    for ip in [&primary_ip, sec_ip, pri_ip] {
        count_from(&inet, ip);
    }
    assert!(
        ping(&sec_pod.name, INTERNET_IP),
        "secondary-ENI pod reaches the internet"
    );
    assert!(ping(&pri_pod.name, INTERNET_IP));
    assert!(counted(&inet, &primary_ip) >= 2);
    assert_eq!(
        counted(&inet, sec_ip),
        0,
        "pod address must not leave the VPC"
    );
    assert_eq!(counted(&inet, pri_ip), 0);

    // An excluded CIDR keeps the pod's address: give the internet namespace one.
    sh(&[
        "ip",
        "-n",
        &inet,
        "addr",
        "add",
        "198.51.100.7/24",
        "dev",
        "eth0",
    ]);
    sh(&[
        "ip",
        "-n",
        &router,
        "route",
        "add",
        "198.51.100.0/24",
        "dev",
        "qinet",
    ]);
    assert!(
        ping(&sec_pod.name, "198.51.100.7"),
        "excluded CIDR reachable"
    );
    assert!(
        counted(&inet, sec_ip) >= 1,
        "excluded CIDR sees the pod's own address"
    );

    for (i, p) in pods.iter().enumerate() {
        client.ok("del", &format!("cid{i}"), p, &format!("pod{i}"), "");
    }
}

#[test]
fn earlier_layouts_and_duplicates_are_replaced_and_foreign_rules_kept() {
    let dir = tempfile::tempdir().unwrap();
    let vpc = Vpc::start(dir.path(), 0);
    let inst = vpc.shim.instance("t3.medium", "10.0.1.0/24");
    let mut node = vpc.add_node(dir.path(), &inst, 0);
    // What an older aws-node left behind: a second chain, a duplicated jump, a stale SNAT
    // address; and a rule that is not ours.
    let seed = "*nat\n:AWS-SNAT-CHAIN-0 - [0:0]\n:AWS-SNAT-CHAIN-1 - [0:0]\n\
        -A POSTROUTING -m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0\n\
        -A POSTROUTING -m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0\n\
        -A AWS-SNAT-CHAIN-0 ! -d 10.0.0.0/16 -m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-1\n\
        -A AWS-SNAT-CHAIN-1 ! -o vlan+ -m comment --comment \"AWS, SNAT\" -m addrtype ! --dst-type LOCAL -j SNAT --to-source 10.0.9.9\n\
        -A POSTROUTING -s 192.0.2.0/24 -j MASQUERADE\n\
        COMMIT\n";
    let mut child = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &node.ns.name,
            "iptables-restore",
            "--noflush",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(seed.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    node.start_ipamd(dir.path(), &[]);
    let nat = sh(&[
        "ip",
        "netns",
        "exec",
        &node.ns.name,
        "iptables-save",
        "-t",
        "nat",
    ]);
    let ours = our_lines(&nat);
    // The POSTROUTING jump and the SNAT chain; connections are marked in nf_tables here.
    assert_eq!(ours.len(), 3, "{nat}");
    assert!(!nat.contains("AWS-CONNMARK-CHAIN"), "{nat}");
    assert!(
        !nat.contains("AWS-SNAT-CHAIN-1") && !nat.contains("10.0.9.9"),
        "{nat}"
    );
    assert_eq!(
        ours.iter()
            .filter(|l| l.starts_with("-A POSTROUTING"))
            .count(),
        1,
        "{nat}"
    );
    assert!(
        nat.contains(&format!("--to-source {} --random-fully", inst.primary_ip)),
        "{nat}"
    );
    assert!(
        nat.contains("-A POSTROUTING -s 192.0.2.0/24 -j MASQUERADE"),
        "{nat}"
    );
}

/// A node (no ipamd yet) whose namespace `prepare` sets up as an earlier node would have left
/// it; then ipamd started on it. The node, its namespace's name, and the VPC and directory that
/// must outlive it.
fn node_prepared(prepare: impl FnOnce(&str)) -> (VpcNode, String, Vpc, tempfile::TempDir) {
    node_prepared_with(&|_| Vec::new(), prepare)
}

/// As [`node_prepared`], ipamd's environment made from the test's directory.
fn node_prepared_with(
    env: &dyn Fn(&std::path::Path) -> Vec<(String, String)>,
    prepare: impl FnOnce(&str),
) -> (VpcNode, String, Vpc, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let vpc = Vpc::start(dir.path(), 0);
    let inst = vpc.shim.instance("t3.medium", "10.0.1.0/24");
    let mut node = vpc.add_node(dir.path(), &inst, 0);
    let ns = node.ns.name.clone();
    prepare(&ns);
    let env = env(dir.path());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    node.start_ipamd(dir.path(), &env);
    (node, ns, vpc, dir)
}

/// `cmd` run in namespace `ns`: its output.
fn in_ns(ns: &str, cmd: &[&str]) -> String {
    let mut argv = vec!["ip", "netns", "exec", ns];
    argv.extend_from_slice(cmd);
    sh(&argv)
}

/// The marker chain kubelet leaves on a node whose iptables back-end is legacy.
fn mark_legacy(ns: &str) {
    in_ns(
        ns,
        &[
            "iptables-legacy",
            "-t",
            "mangle",
            "-N",
            "KUBE-IPTABLES-HINT",
        ],
    );
}

/// A node whose kubelet uses the legacy iptables back-end (its marker chain is there): ipamd's
/// SNAT and connmark rules go to legacy too, where kube-proxy's are, not to nf_tables.
#[test]
fn rules_go_to_the_iptables_backend_the_node_uses() {
    let (_node, ns, _vpc, _dir) = node_prepared(|ns| {
        mark_legacy(ns);
    });
    let saved = |front: &str| in_ns(&ns, &[&format!("{front}-save"), "-t", "nat"]);
    eventually(30, "SNAT rules in the legacy back-end", || {
        saved("iptables-legacy")
            .contains("AWS-SNAT-CHAIN-0")
            .then_some(())
    });
    assert!(
        !saved("iptables-nft").contains("AWS-SNAT-CHAIN-0"),
        "rules in both back-ends"
    );
    // Upstream on a legacy node marks connections in the iptables chain: so does ours.
    assert!(saved("iptables-legacy").contains("-j AWS-CONNMARK-CHAIN-0"));
    let tables = in_ns(&ns, &["nft", "list", "tables"]);
    assert!(!tables.contains("table ip aws-cni"), "{tables}");
}

/// A legacy node that upstream's nf_tables connmark table is left on, where `nft` fails the
/// first time ipamd runs it: the failure is not taken for "no table". ipamd says so, and the
/// next reconcile looks again and removes the table.
#[test]
fn a_failed_look_for_the_nf_tables_table_is_retried_not_taken_for_absence() {
    let env = |dir: &std::path::Path| {
        let bin = dir.join("failing-nft");
        std::fs::create_dir_all(&bin).unwrap();
        let once = dir.join("nft-failed-once");
        let real = sh(&["sh", "-c", "command -v nft"]).trim().to_string();
        let script = bin.join("nft");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nif [ ! -e {o} ]; then touch {o}; echo 'nft: planted failure' >&2; exit 1; fi\nexec {real} \"$@\"\n",
                o = once.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        vec![("PATH".to_string(), path)]
    };
    let (node, ns, _vpc, dir) = node_prepared_with(&env, |ns| {
        mark_legacy(ns);
        in_ns(ns, &["nft", "add", "table", "ip", "aws-cni"]);
    });
    eventually(30, "the table removed at a later reconcile", || {
        let tables = in_ns(&ns, &["nft", "list", "tables"]);
        (!tables.contains("table ip aws-cni")).then_some(())
    });
    assert!(
        dir.path().join("nft-failed-once").exists(),
        "the planted failure ran"
    );
    let log = node.ipamd().log_text();
    assert!(
        log.contains("nf_tables connmark table not removed") && log.contains("planted failure"),
        "{log}"
    );
}

/// A node that upstream's ipamd ran on in nf_tables mode keeps its connmark table
/// (`table ip aws-cni`); ours rewrites that table in upstream's layout and adds no iptables
/// connmark chain beside it, so nothing is marked twice. Upstream's iptables connmark rules
/// (its layout on a legacy node, or before it moved to nf_tables) are removed.
#[test]
fn upstreams_nftables_connmark_table_is_taken_over() {
    let (_node, ns, _vpc, _dir) = node_prepared(|ns| {
        // Upstream's iptables connmark chain and jump, as an earlier upstream left them.
        in_ns(ns, &["iptables", "-t", "nat", "-N", "AWS-CONNMARK-CHAIN-0"]);
        in_ns(
            ns,
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-i",
                "eni+",
                "-m",
                "comment",
                "--comment",
                "AWS, outbound connections",
                "-j",
                "AWS-CONNMARK-CHAIN-0",
            ],
        );
        in_ns(ns, &["nft", "add", "table", "ip", "aws-cni"]);
        in_ns(
            ns,
            &[
                "nft",
                "add",
                "chain",
                "ip",
                "aws-cni",
                "nat-prerouting",
                "{ type nat hook prerouting priority -90 ; }",
            ],
        );
    });
    eventually(
        30,
        "upstream's table in our layout, no iptables connmark chain",
        || {
            let nat = in_ns(&ns, &["iptables-save", "-t", "nat"]);
            let table = in_ns(&ns, &["nft", "list", "table", "ip", "aws-cni"]);
            (nat.contains("AWS-SNAT-CHAIN-0")
                && !nat.contains("AWS-CONNMARK-CHAIN-0")
                && table.contains("chain snat-mark")
                && table.contains("ct mark set ct mark | 0x00000080"))
            .then_some(())
        },
    );
}
