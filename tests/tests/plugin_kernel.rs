//! The real `aws-cni` binary wiring real network namespaces, against a stand-in ipamd.
//!
//! Each test makes a "node" namespace (the plugin runs inside it, so the host side of the
//! wiring never touches this machine's own namespace) and one or more pod namespaces. All
//! are deleted when the test ends, pass or fail.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use cni_proto::FailureReason;
use integration::fake_ipamd::FakeIpamd;
use integration::netns::Netns;
use integration::{ping_eventually, unique, NODE_IP};
use serde_json::{json, Value};

struct Rig {
    node: Netns,
    dir: tempfile::TempDir,
    ipamd: FakeIpamd,
}

impl Rig {
    fn new(pool: &[(Ipv4Addr, i32)]) -> Rig {
        let any: Vec<(std::net::IpAddr, i32)> =
            pool.iter().map(|(a, d)| ((*a).into(), *d)).collect();
        Self::new_any(&any)
    }

    fn new_any(pool: &[(std::net::IpAddr, i32)]) -> Rig {
        let node = Netns::node("kn");
        let dir = tempfile::tempdir().unwrap();
        let ipamd = FakeIpamd::start_any(dir.path(), pool);
        Rig { node, dir, ipamd }
    }

    fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "aws-cni",
            "type": "aws-cni",
            "vethPrefix": "eni",
            "mtu": "9001",
            "pluginLogFile": self.dir.path().join("plugin.log"),
            "pluginLogLevel": "DEBUG",
            "ipamdSocket": self.ipamd.socket,
            "stateDir": self.dir.path().join("state"),
        })
    }

    fn run(&self, cmd: &str, pod: Option<&Pod>, conf: &Value) -> Out {
        let env = match pod {
            Some(p) => p.env(cmd),
            None => vec![("CNI_COMMAND".into(), cmd.into())],
        };
        self.run_env(&env, conf.to_string().as_bytes())
    }

    fn run_env(&self, env: &[(String, String)], stdin: &[u8]) -> Out {
        run_plugin(&self.node.name, env, stdin)
    }

    fn state_files(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("state/aws-cni"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

struct Pod {
    ns: Option<Netns>,
    netns_path: String,
    name: String,
    cid: String,
    ifname: String,
}

impl Pod {
    fn new() -> Pod {
        let ns = Netns::new("kp");
        Pod {
            netns_path: ns.path(),
            name: unique("web-"),
            cid: unique("cid"),
            ifname: "eth0".into(),
            ns: Some(ns),
        }
    }
    /// The environment a runtime gives the plugin for this pod.
    fn env(&self, cmd: &str) -> Vec<(String, String)> {
        vec![
            ("CNI_COMMAND".into(), cmd.into()),
            ("CNI_CONTAINERID".into(), self.cid.clone()),
            ("CNI_NETNS".into(), self.netns_path.clone()),
            ("CNI_IFNAME".into(), self.ifname.clone()),
            (
                "CNI_ARGS".into(),
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
                    self.name, self.cid
                ),
            ),
        ]
    }
    fn ns(&self) -> &Netns {
        self.ns.as_ref().unwrap()
    }
    fn veth(&self) -> String {
        aws_cni::naming::host_veth_name("eni", "default", &self.name)
    }
}

#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {:?}", self))
    }
    fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "plugin failed: {self:?}");
        self
    }
    fn err_code(&self) -> u64 {
        assert_ne!(self.code, 0, "plugin should have failed: {self:?}");
        self.json()["code"].as_u64().unwrap()
    }
    fn err_msg(&self) -> String {
        self.json()["msg"].as_str().unwrap().to_string()
    }
}

fn run_plugin(node: &str, env: &[(String, String)], stdin: &[u8]) -> Out {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", node])
        .arg(integration::bin("aws-cni"))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
    }
}

fn has_rule(node: &Netns, pref: u64, key: &str, ip: &str) -> bool {
    node.rules()
        .iter()
        .any(|r| r["priority"].as_u64() == Some(pref) && r[key].as_str() == Some(ip))
}

fn host_route_dev(node: &Netns, ip: &str) -> Option<String> {
    node.routes()
        .iter()
        .find(|r| r["dst"].as_str() == Some(ip))
        .and_then(|r| r["dev"].as_str().map(str::to_string))
}

fn assert_clean(rig: &Rig, pod: &Pod, ip: &str) {
    assert!(
        rig.node.links().is_empty(),
        "links left: {:?}",
        rig.node.links()
    );
    assert!(
        rig.node.rules().is_empty(),
        "rules left: {:?}",
        rig.node.rules()
    );
    assert_eq!(host_route_dev(&rig.node, ip), None, "host route left");
    if let Some(ns) = &pod.ns {
        assert!(ns.links().is_empty(), "pod links left: {:?}", ns.links());
    }
    assert_eq!(rig.state_files(), 0, "sandbox state left");
}

#[test]
fn add_wires_pod_and_del_removes_everything() {
    let rig = Rig::new(&[(Ipv4Addr::new(10, 0, 1, 20), 0)]);
    let pod = Pod::new();
    let conf = rig.conf("1.0.0");
    let out = rig.run("ADD", Some(&pod), &conf);
    let res = out.ok().json();
    assert_eq!(res["cniVersion"], "1.0.0");
    assert_eq!(res["ips"][0]["address"], "10.0.1.20/32");
    assert!(res["ips"][0].get("version").is_none());
    assert_eq!(res["interfaces"][0]["name"], pod.veth());
    assert_eq!(res["interfaces"][1]["name"], "eth0");
    assert_eq!(res["interfaces"][1]["sandbox"], pod.netns_path);

    // What ipamd was told.
    let req = rig.ipamd.state.lock().unwrap().last_add.clone().unwrap();
    assert_eq!(req.k8s_pod_name, pod.name);
    assert_eq!(req.k8s_pod_namespace, "default");
    assert_eq!(req.container_id, pod.cid);
    assert_eq!(req.network_name, "aws-cni");
    assert_eq!(req.netns, pod.netns_path);

    // Pod side.
    let addrs = integration::ip_json(&pod.ns().name, &["addr", "show", "dev", "eth0"]);
    let a = &addrs[0];
    assert_eq!(a["mtu"], 9001);
    assert!(a["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    assert!(a["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["local"] == "10.0.1.20" && i["prefixlen"] == 32));
    let routes = pod.ns().routes();
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == "169.254.1.1" && r["dev"] == "eth0"),
        "{routes:?}"
    );
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "169.254.1.1" && r["scope"] == "link"),
        "{routes:?}"
    );
    let neigh = integration::ip_json(&pod.ns().name, &["neigh", "show", "dev", "eth0"]);
    let host_mac = res["interfaces"][0]["mac"].as_str().unwrap();
    assert!(
        neigh
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["dst"] == "169.254.1.1"
                && n["lladdr"] == host_mac
                && n["state"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s == "PERMANENT")),
        "{neigh:?}"
    );

    // Host side.
    assert_eq!(
        host_route_dev(&rig.node, "10.0.1.20").as_deref(),
        Some(pod.veth().as_str())
    );
    assert!(
        has_rule(&rig.node, 512, "dst", "10.0.1.20"),
        "{:?}",
        rig.node.rules()
    );
    assert!(
        !has_rule(&rig.node, 1536, "src", "10.0.1.20"),
        "primary ENI needs no from-rule"
    );

    // Traffic both ways.
    assert!(
        ping_eventually(&rig.node.name, "10.0.1.20"),
        "host cannot reach pod"
    );
    assert!(
        ping_eventually(&pod.ns().name, NODE_IP),
        "pod cannot reach host"
    );

    // CHECK passes against the result.
    let mut check_conf = conf.clone();
    check_conf["prevResult"] = res.clone();
    rig.run("CHECK", Some(&pod), &check_conf).ok();

    // DEL removes it all and returns the address.
    rig.run("DEL", Some(&pod), &check_conf).ok();
    assert_clean(&rig, &pod, "10.0.1.20");
    assert_eq!(rig.ipamd.state.lock().unwrap().free.len(), 1);
    // DEL again is fine.
    rig.run("DEL", Some(&pod), &check_conf).ok();

    let log = std::fs::read_to_string(rig.dir.path().join("plugin.log")).unwrap();
    let first: Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert!(
        first.get("level").is_some(),
        "plugin log is JSON lines: {first}"
    );
    assert!(log.contains(&pod.cid), "log lines carry the container id");
}

#[test]
fn secondary_eni_address_gets_from_rule() {
    let rig = Rig::new(&[(Ipv4Addr::new(10, 0, 2, 7), 2)]);
    let pod = Pod::new();
    let conf = rig.conf("0.4.0");
    let res = rig.run("ADD", Some(&pod), &conf).ok().json();
    assert_eq!(res["ips"][0]["version"], "4");
    let rules = rig.node.rules();
    assert!(
        rules
            .iter()
            .any(|r| r["priority"] == 1536 && r["src"] == "10.0.2.7" && r["table"] == "3"),
        "{rules:?}"
    );
    assert!(has_rule(&rig.node, 512, "dst", "10.0.2.7"));
    let mut c = conf.clone();
    c["prevResult"] = res;
    rig.run("CHECK", Some(&pod), &c).ok();
    rig.run("DEL", Some(&pod), &c).ok();
    assert_clean(&rig, &pod, "10.0.2.7");
}

#[test]
fn repeated_add_is_idempotent() {
    let rig = Rig::new(&[
        (Ipv4Addr::new(10, 0, 1, 30), 1),
        (Ipv4Addr::new(10, 0, 1, 31), 1),
    ]);
    let pod = Pod::new();
    let conf = rig.conf("1.1.0");
    let a = rig.run("ADD", Some(&pod), &conf).ok().json();
    let b = rig.run("ADD", Some(&pod), &conf).ok().json();
    assert_eq!(a, b);
    assert_eq!(rig.node.links(), vec![pod.veth()]);
    assert_eq!(rig.node.rules().len(), 2, "{:?}", rig.node.rules());
    // A half-wired pod (veth lost) is repaired by ADD with the same address.
    integration::sh(&["ip", "-n", &rig.node.name, "link", "del", &pod.veth()]);
    let c = rig.run("ADD", Some(&pod), &conf).ok().json();
    assert_eq!(c["ips"], a["ips"]);
    assert!(ping_eventually(&rig.node.name, "10.0.1.30"));
    rig.run("DEL", Some(&pod), &conf).ok();
    assert_clean(&rig, &pod, "10.0.1.30");
}

#[test]
fn check_names_what_is_missing() {
    let rig = Rig::new(&[(Ipv4Addr::new(10, 0, 3, 3), 1)]);
    let pod = Pod::new();
    let mut conf = rig.conf("1.0.0");
    let res = rig.run("ADD", Some(&pod), &conf).ok().json();
    conf["prevResult"] = res;
    rig.run("CHECK", Some(&pod), &conf).ok();

    integration::sh(&[
        "ip",
        "-n",
        &rig.node.name,
        "rule",
        "del",
        "from",
        "10.0.3.3",
        "lookup",
        "2",
        "prio",
        "1536",
    ]);
    let out = rig.run("CHECK", Some(&pod), &conf);
    assert_eq!(out.err_code(), 101);
    assert!(
        out.err_msg().contains("from 10.0.3.3 lookup 2"),
        "{}",
        out.err_msg()
    );

    integration::sh(&["ip", "-n", &pod.ns().name, "route", "del", "default"]);
    let out = rig.run("CHECK", Some(&pod), &conf);
    assert!(out.err_msg().contains("default route"), "{}", out.err_msg());

    integration::sh(&[
        "ip",
        "-n",
        &pod.ns().name,
        "neigh",
        "replace",
        "169.254.1.1",
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    integration::sh(&[
        "ip",
        "-n",
        &pod.ns().name,
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ]);
    let out = rig.run("CHECK", Some(&pod), &conf);
    assert!(
        out.err_msg().contains("neighbour 169.254.1.1"),
        "{}",
        out.err_msg()
    );

    // CHECK does not exist before 0.4.0.
    let mut old = conf.clone();
    old["cniVersion"] = json!("0.3.1");
    assert_eq!(rig.run("CHECK", Some(&pod), &old).err_code(), 1);

    rig.run("DEL", Some(&pod), &conf).ok();
    assert_clean(&rig, &pod, "10.0.3.3");
}

#[test]
fn add_failures_leave_nothing() {
    let mut rig = Rig::new(&[(Ipv4Addr::new(10, 0, 4, 4), 1)]);
    let mut pod = Pod::new();
    let conf = rig.conf("1.0.0");

    // ipamd refuses: the reason reaches the runtime.
    rig.ipamd.state.lock().unwrap().refuse = Some((
        FailureReason::MaxPodsReached,
        "max pods reached (17)".into(),
    ));
    let out = rig.run("ADD", Some(&pod), &conf);
    assert_eq!(out.err_code(), 11);
    assert_eq!(out.err_msg(), "max pods reached (17)");
    assert_clean(&rig, &pod, "10.0.4.4");
    rig.ipamd.state.lock().unwrap().refuse = None;

    // Wiring fails after the allocation (the pod's "lo" cannot be replaced by a veth end):
    // the address goes back to ipamd and nothing stays on the host.
    pod.ifname = "lo".into();
    let out = rig.run("ADD", Some(&pod), &conf);
    pod.ifname = "eth0".into();
    assert_eq!(out.err_code(), 100, "{out:?}");
    assert!(
        out.err_msg().contains("stale pod interface"),
        "{}",
        out.err_msg()
    );
    {
        let s = rig.ipamd.state.lock().unwrap();
        assert_eq!(s.free.len(), 1, "address returned to ipamd");
        assert!(s.assigned.is_empty());
    }
    assert_clean(&rig, &pod, "10.0.4.4");

    // A path that is not a network namespace: allocation is undone too.
    let not_ns = rig.dir.path().join("not-a-netns");
    std::fs::write(&not_ns, b"").unwrap();
    let fake = Pod {
        ns: None,
        netns_path: not_ns.display().to_string(),
        name: pod.name.clone(),
        cid: pod.cid.clone(),
        ifname: "eth0".into(),
    };
    let out = rig.run("ADD", Some(&fake), &conf);
    assert_ne!(out.code, 0);
    assert!(
        out.err_msg().contains("network namespace"),
        "{}",
        out.err_msg()
    );
    assert_eq!(rig.ipamd.state.lock().unwrap().free.len(), 1);
    assert_clean(&rig, &pod, "10.0.4.4");

    // ipamd gone: code 11 naming the socket.
    rig.ipamd.stop();
    let out = rig.run("ADD", Some(&pod), &conf);
    assert_eq!(out.err_code(), 11);
    assert!(
        out.err_msg().contains("ipamd unreachable") && out.err_msg().contains("ipamd.sock"),
        "{}",
        out.err_msg()
    );
    assert_clean(&rig, &pod, "10.0.4.4");
}

#[test]
fn del_cleans_host_when_ipamd_is_down_or_netns_gone() {
    let mut rig = Rig::new(&[
        (Ipv4Addr::new(10, 0, 5, 5), 1),
        (Ipv4Addr::new(10, 0, 5, 6), 1),
    ]);
    let conf = rig.conf("1.0.0");
    let mut gone = Pod::new();
    rig.run("ADD", Some(&gone), &conf).ok();
    let pod = Pod::new();
    rig.run("ADD", Some(&pod), &conf).ok();

    // The pod's netns disappears first (its veth goes with it); DEL still removes the rules.
    gone.ns = None;
    rig.run("DEL", Some(&gone), &conf).ok();
    assert!(!has_rule(&rig.node, 512, "dst", "10.0.5.5"));

    // ipamd is down: DEL still cleans the host from the state on disk and exits 0, and leaves
    // a record of the release it owes ipamd.
    rig.ipamd.stop();
    rig.run("DEL", Some(&pod), &conf).ok();
    assert_clean(&rig, &pod, "10.0.5.6");
    let released = rig.dir.path().join("state/.released");
    let recs: Vec<Value> = std::fs::read_dir(&released)
        .unwrap()
        .map(|e| serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap())
        .collect();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["containerID"], pod.cid.as_str());
    assert_eq!(recs[0]["ifName"], "eth0");
    assert_eq!(recs[0]["networkName"], "aws-cni");
    assert_eq!(recs[0]["ip"], "10.0.5.6");
}

#[test]
fn refusals_change_nothing() {
    let rig = Rig::new(&[
        (Ipv4Addr::new(10, 0, 9, 1), 1),
        (Ipv4Addr::new(10, 0, 9, 2), 1),
    ]);
    let conf = rig.conf("1.1.0");
    let kept = Pod::new();
    rig.run("ADD", Some(&kept), &conf).ok();
    let links = rig.node.links();
    let routes = rig.node.routes();
    let rules = rig.node.rules();
    let calls = |r: &Rig| {
        let s = r.ipamd.state.lock().unwrap();
        (s.add_calls, s.gc_calls, s.assigned.len())
    };
    let before = calls(&rig);

    // ADD into the plugin's own namespace (the node's) would rewire the host itself.
    let own = Pod {
        ns: None,
        netns_path: rig.node.path(),
        name: unique("own-"),
        cid: unique("cid"),
        ifname: "eth0".into(),
    };
    let out = rig.run("ADD", Some(&own), &conf);
    assert_eq!(out.err_code(), 4, "{out:?}");
    assert!(
        out.err_msg().contains("own network namespace"),
        "{}",
        out.err_msg()
    );

    // GC exists from 1.1.0, and only with the list of attachments to keep.
    let mut old = conf.clone();
    old["cniVersion"] = json!("0.3.1");
    old["cni.dev/valid-attachments"] = json!([]);
    let out = rig.run("GC", None, &old);
    assert_eq!(out.err_code(), 1, "{out:?}");
    let out = rig.run("GC", None, &conf);
    assert_eq!(out.err_code(), 7, "{out:?}");
    assert!(
        out.err_msg().contains("valid-attachments"),
        "{}",
        out.err_msg()
    );

    // Ids and interface names outside CNI's rules never reach ipamd or the disk.
    for (var, val) in [
        ("CNI_CONTAINERID", "k/x"),
        ("CNI_CONTAINERID", "-leading"),
        ("CNI_IFNAME", "eth 0"),
        ("CNI_IFNAME", ".."),
        ("CNI_IFNAME", "sixteen-chars-xx"),
    ] {
        let p = Pod::new();
        let mut env = p.env("ADD");
        for (k, v) in env.iter_mut() {
            if k == var {
                *v = val.into();
            }
        }
        let out = rig.run_env(&env, conf.to_string().as_bytes());
        assert_eq!(out.err_code(), 4, "{var}={val:?}: {out:?}");
        assert!(out.err_msg().contains(var), "{}", out.err_msg());
    }

    assert_eq!(rig.node.links(), links);
    assert_eq!(rig.node.routes(), routes);
    assert_eq!(rig.node.rules(), rules);
    assert_eq!(calls(&rig), before, "ipamd never asked");
    assert_eq!(rig.state_files(), 1, "the kept pod's record only");
    let locks = std::fs::read_dir(rig.dir.path().join("state/.locks"))
        .unwrap()
        .count();
    assert_eq!(locks, 1, "the kept pod's lock only");
    assert!(ping_eventually(&rig.node.name, "10.0.9.1"));
}

#[test]
fn status_reports_ipamd_state() {
    let mut rig = Rig::new(&[(Ipv4Addr::new(10, 0, 6, 6), 1)]);
    let conf = rig.conf("1.1.0");
    rig.run("STATUS", None, &conf).ok();
    rig.ipamd.state.lock().unwrap().free.clear();
    let out = rig.run("STATUS", None, &conf);
    assert_eq!(out.err_code(), 50);
    assert!(out.err_msg().contains("pool empty"), "{}", out.err_msg());
    rig.ipamd.stop();
    let out = rig.run("STATUS", None, &conf);
    assert_eq!(out.err_code(), 50);
    assert!(out.err_msg().contains("unreachable"), "{}", out.err_msg());
}

#[test]
fn gc_removes_attachments_not_listed() {
    let rig = Rig::new(&[
        (Ipv4Addr::new(10, 0, 7, 1), 1),
        (Ipv4Addr::new(10, 0, 7, 2), 1),
    ]);
    let conf = rig.conf("1.1.0");
    let keep = Pod::new();
    let stale = Pod::new();
    rig.run("ADD", Some(&keep), &conf).ok();
    rig.run("ADD", Some(&stale), &conf).ok();
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{ "containerID": keep.cid, "ifname": "eth0" }]);
    rig.run("GC", None, &gc).ok();
    assert_eq!(rig.node.links(), vec![keep.veth()]);
    assert!(has_rule(&rig.node, 512, "dst", "10.0.7.1"));
    assert!(!has_rule(&rig.node, 512, "dst", "10.0.7.2"));
    assert!(!has_rule(&rig.node, 1536, "src", "10.0.7.2"));
    {
        let s = rig.ipamd.state.lock().unwrap();
        assert_eq!(s.gc_calls, 1);
        assert_eq!(s.assigned.len(), 1);
    }
    assert!(ping_eventually(&rig.node.name, "10.0.7.1"));
    rig.run("DEL", Some(&keep), &conf).ok();
    assert_clean(&rig, &keep, "10.0.7.1");
}

#[test]
fn malformed_input_gets_the_right_code_and_creates_nothing() {
    let rig = Rig::new(&[(Ipv4Addr::new(10, 0, 8, 8), 1)]);
    let pod = Pod::new();
    let conf = rig.conf("1.0.0");

    let env = |cmd: &str, netns: &str| -> Vec<(String, String)> {
        let mut e = pod.env(cmd);
        for (k, v) in e.iter_mut() {
            if k == "CNI_NETNS" {
                *v = netns.into();
            }
        }
        e
    };
    let run = |e: Vec<(String, String)>, stdin: &[u8]| rig.run_env(&e, stdin);

    assert_eq!(run(env("ADD", &pod.netns_path), b"{garbage").err_code(), 6);
    assert_eq!(run(vec![], conf.to_string().as_bytes()).err_code(), 4);
    let mut no_netns = env("ADD", "");
    no_netns.retain(|(k, _)| k != "CNI_NETNS");
    let out = run(no_netns, conf.to_string().as_bytes());
    assert_eq!(out.err_code(), 4);
    assert!(out.err_msg().contains("CNI_NETNS"));
    let mut bad = conf.clone();
    bad["cniVersion"] = json!("0.2.0");
    assert_eq!(
        run(env("ADD", &pod.netns_path), bad.to_string().as_bytes()).err_code(),
        1
    );
    let mut bad = conf.clone();
    bad["mtu"] = json!("70000");
    let out = run(env("ADD", &pod.netns_path), bad.to_string().as_bytes());
    assert_eq!(out.err_code(), 7);
    assert!(out.err_msg().contains("mtu"));
    let out = run(
        env("ADD", "/var/run/netns/does-not-exist"),
        conf.to_string().as_bytes(),
    );
    assert_eq!(out.err_code(), 3);
    assert!(out.err_msg().contains("/var/run/netns/does-not-exist"));
    let out = run(env("FROB", &pod.netns_path), conf.to_string().as_bytes());
    assert_eq!(out.err_code(), 4);

    assert_eq!(
        rig.ipamd.state.lock().unwrap().add_calls,
        0,
        "ipamd never asked"
    );
    assert_clean(&rig, &pod, "10.0.8.8");
}

#[test]
fn version_lists_supported_versions() {
    use std::io::Write;
    for (stdin, want) in [
        (&br#"{"cniVersion":"1.0.0"}"#[..], "1.0.0"),
        (&b""[..], "1.1.0"),
    ] {
        let mut child = Command::new(integration::bin("aws-cni"))
            .env_clear()
            .env("CNI_COMMAND", "VERSION")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], want);
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }
}

#[test]
fn new_sandbox_of_same_pod_replaces_stale_veth() {
    let rig = Rig::new(&[
        (Ipv4Addr::new(10, 0, 9, 1), 1),
        (Ipv4Addr::new(10, 0, 9, 2), 1),
    ]);
    let conf = rig.conf("1.0.0");
    let old = Pod::new();
    rig.run("ADD", Some(&old), &conf).ok();
    // The runtime recreates the sandbox (same pod name, so same host veth name) without a
    // DEL for the old one: the stale veth is in the way and must be replaced.
    let mut new = Pod::new();
    new.name = old.name.clone();
    let res = rig.run("ADD", Some(&new), &conf).ok().json();
    let ip = integration::result_ip(&res);
    assert_eq!(ip, "10.0.9.2");
    assert_eq!(rig.node.links(), vec![new.veth()]);
    assert!(
        old.ns().links().is_empty(),
        "old sandbox lost its end with the stale veth"
    );
    assert!(ping_eventually(&rig.node.name, &ip));
    // The old sandbox's late DEL must not take the new sandbox's veth (same name) with it.
    rig.run("DEL", Some(&old), &conf).ok();
    assert_eq!(rig.node.links(), vec![new.veth()]);
    assert!(
        ping_eventually(&rig.node.name, &ip),
        "old DEL broke the new pod"
    );
    let mut c = conf.clone();
    c["prevResult"] = res.clone();
    rig.run("CHECK", Some(&new), &c).ok();
    rig.run("DEL", Some(&new), &conf).ok();
    assert_clean(&rig, &new, &ip);
    assert!(!has_rule(&rig.node, 512, "dst", "10.0.9.1"));
}

fn in_ns(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    integration::sh(&full)
}

#[test]
fn ipv6_pod_is_wired_as_upstream_checked_and_removed() {
    let ip = "2600:1f14:0:100:1::7";
    let rig = Rig::new_any(&[(ip.parse().unwrap(), 0)]);
    let pod = Pod::new();
    let mut conf = rig.conf("0.4.0");
    let res = rig.run("ADD", Some(&pod), &conf).ok().json();
    assert_eq!(res["ips"][0]["address"], format!("{ip}/128"));
    assert_eq!(res["ips"][0]["version"], "6");
    assert_eq!(res["ips"][0]["gateway"], "fe80::1");
    assert_eq!(res["routes"][0]["dst"], "::/0");

    // Pod side: the /128 usable at once (no DAD), default via fe80::1 answered by the host
    // veth's MAC.
    let pns = pod.ns().name.clone();
    let addrs = integration::ip_json(&pns, &["-6", "addr", "show", "dev", "eth0"]);
    let a = addrs[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["local"] == ip)
        .unwrap_or_else(|| panic!("{addrs}"))
        .clone();
    assert_eq!(a["prefixlen"], 128);
    assert!(a.get("tentative").is_none(), "{a}");
    let routes = integration::ip_json(&pns, &["-6", "route", "show"]);
    assert!(
        routes
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == "fe80::1" && r["dev"] == "eth0"),
        "{routes}"
    );
    let host_mac =
        integration::ip_json(&rig.node.name, &["link", "show", &pod.veth()])[0]["address"].clone();
    let neigh = integration::ip_json(&pns, &["-6", "neigh", "show", "dev", "eth0"]);
    assert!(
        neigh
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["dst"] == "fe80::1"
                && n["lladdr"] == host_mac
                && n["state"][0] == "PERMANENT"),
        "{neigh}"
    );
    // Host side: the /128 routed to the veth, `to <ip> lookup main` at 512, upstream's veth
    // sysctls (and no DAD on it).
    let hroutes = integration::ip_json(&rig.node.name, &["-6", "route", "show"]);
    assert!(
        hroutes
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == ip && r["dev"] == pod.veth().as_str()),
        "{hroutes}"
    );
    let v6_rules = || integration::ip_json(&rig.node.name, &["-6", "rule", "show"]);
    assert!(
        v6_rules()
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["priority"] == 512 && r["dst"] == ip && r["table"] == "main"),
        "{}",
        v6_rules()
    );
    for (key, want) in [
        ("accept_ra", "0"),
        ("accept_redirects", "1"),
        ("forwarding", "0"),
        ("accept_dad", "0"),
    ] {
        let got = in_ns(
            &rig.node.name,
            &[
                "cat",
                &format!("/proc/sys/net/ipv6/conf/{}/{key}", pod.veth()),
            ],
        );
        assert_eq!(got.trim(), want, "{key}");
    }
    // The node reaches the pod over IPv6 at once.
    assert!(integration::ping(&rig.node.name, ip));

    conf["prevResult"] = res;
    rig.run("CHECK", Some(&pod), &conf).ok();
    integration::sh(&["ip", "-n", &pns, "-6", "route", "del", "default"]);
    let out = rig.run("CHECK", Some(&pod), &conf);
    assert_eq!(out.err_code(), 101);
    assert!(out.err_msg().contains("via fe80::1"), "{}", out.err_msg());

    rig.run("DEL", Some(&pod), &conf).ok();
    assert!(rig.node.links().is_empty(), "{:?}", rig.node.links());
    assert!(
        !v6_rules()
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == ip),
        "{}",
        v6_rules()
    );
    let hroutes = integration::ip_json(&rig.node.name, &["-6", "route", "show"]);
    assert!(
        !hroutes.as_array().unwrap().iter().any(|r| r["dst"] == ip),
        "{hroutes}"
    );
    assert_eq!(rig.state_files(), 0);
    assert_eq!(rig.ipamd.state.lock().unwrap().free.len(), 1);
}

#[test]
fn a_malformed_address_from_ipamd_gets_the_same_code_in_both_families() {
    let mut codes = Vec::new();
    for (ip, garbage) in [
        ("10.0.1.9", "10.0.1.300"),
        ("2600:1f14:0:100:1::9", "2600:1f14::zz"),
    ] {
        let rig = Rig::new_any(&[(ip.parse().unwrap(), 0)]);
        rig.ipamd.state.lock().unwrap().garble = Some(garbage.into());
        let pod = Pod::new();
        let out = rig.run("ADD", Some(&pod), &rig.conf("1.0.0"));
        codes.push(out.err_code());
        assert!(
            out.err_msg().contains("without an IPv4 or IPv6 address"),
            "{}",
            out.err_msg()
        );
        // The refused address went back and nothing was made.
        assert!(rig.ipamd.state.lock().unwrap().assigned.is_empty());
        assert!(rig.node.links().is_empty());
        assert!(pod.ns().links().is_empty());
    }
    assert_eq!(codes[0], codes[1]);
}

#[test]
fn gc_removes_ipv6_attachments_not_listed() {
    let (keep_ip, stale_ip) = ("2600:1f14:0:100:1::a", "2600:1f14:0:100:1::b");
    let rig = Rig::new_any(&[
        (keep_ip.parse().unwrap(), 0),
        (stale_ip.parse().unwrap(), 0),
    ]);
    let conf = rig.conf("1.1.0");
    let keep = Pod::new();
    let stale = Pod::new();
    rig.run("ADD", Some(&keep), &conf).ok();
    rig.run("ADD", Some(&stale), &conf).ok();
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{ "containerID": keep.cid, "ifname": "eth0" }]);
    rig.run("GC", None, &gc).ok();
    assert_eq!(rig.node.links(), vec![keep.veth()]);
    let v6_rule = |ip: &str| {
        integration::ip_json(&rig.node.name, &["-6", "rule", "show"])
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["priority"] == 512 && r["dst"] == ip)
    };
    assert!(v6_rule(keep_ip) && !v6_rule(stale_ip));
    assert_eq!(rig.ipamd.state.lock().unwrap().assigned.len(), 1);
    assert!(ping_eventually(&rig.node.name, keep_ip));
    rig.run("DEL", Some(&keep), &conf).ok();
    assert!(!v6_rule(keep_ip));
    assert!(rig.node.links().is_empty());
    assert_eq!(rig.state_files(), 0);
}
