//! A VPC built from network namespaces, driven by the EC2 shim's state as the real VPC fabric
//! is driven by EC2's: a router namespace owns every subnet's gateway; each node is a namespace
//! whose ENIs are veth links to the router. A fabric thread polls the shim: an ENI attached in
//! EC2 appears as `eth<device index>` (with the ENI's MAC) on its node, and every address or
//! /28 EC2 assigns to an ENI gets a route on the router toward that ENI's link. The router's
//! strict rp_filter drops a packet that leaves a node by an ENI that does not own its source.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use crate::cloud::{eventually, FakeImds, Instance, Shim};
use crate::ipamd_proc::Ipamd;
use crate::netns::Netns;
use crate::{sh, try_sh};

/// The "internet" beyond the router.
pub const INTERNET_IP: &str = "203.0.113.10";
const INTERNET_GW: &str = "203.0.113.1";
/// The internet's IPv6 address, and the router's on that link.
pub const INTERNET_IP6: &str = "2001:db8:ffff::10";
const INTERNET_GW6: &str = "2001:db8:ffff::1";
/// The VPC router's IPv6 address on every subnet link, as AWS's (fe80:ec2::1).
pub const VPC_GW6: &str = "fe80:ec2::1";

/// Where the fabric's links are, per ENI.
#[derive(Debug, Clone)]
struct Wired {
    router_if: String,
    node_ns: String,
    routes: HashSet<String>,
}

struct Fabric {
    shim_url: String,
    router: String,
    /// instance id -> node netns
    nodes: Mutex<HashMap<String, String>>,
    wired: Mutex<HashMap<String, Wired>>,
    next_if: AtomicU32,
    stop: AtomicBool,
    /// Last error, for a test that wonders why a link never came.
    error: Mutex<Option<String>>,
}

fn gateway(cidr: &str) -> Option<String> {
    let (ip, len) = cidr.split_once('/')?;
    let ip: std::net::Ipv4Addr = ip.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Some(std::net::Ipv4Addr::from((u32::from(ip) & mask) + 1).to_string())
}

/// The strings of a JSON array (none for anything else).
pub fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

impl Fabric {
    fn try_ip(&self, args: &str) {
        let mut full = vec!["ip", "-n", &self.router];
        full.extend(args.split_whitespace());
        try_sh(&full);
    }

    fn sync(&self) -> Result<(), String> {
        let enis: Value = ureq::get(&format!("{}/_shim/enis", self.shim_url))
            .call()
            .map_err(|e| e.to_string())?
            .body_mut()
            .read_json()
            .map_err(|e| e.to_string())?;
        let enis = enis.as_array().cloned().unwrap_or_default();
        let nodes = self.nodes.lock().map_err(|_| "poisoned")?.clone();
        let mut wired = self.wired.lock().map_err(|_| "poisoned")?;
        let mut present = HashSet::new();
        let mut errors: Vec<String> = Vec::new();
        for e in &enis {
            let (Some(id), Some(inst)) = (e["id"].as_str(), e["instance_id"].as_str()) else {
                continue;
            };
            let Some(node) = nodes.get(inst) else {
                continue;
            };
            // A node whose namespace is gone took its links with it: forget its ENIs.
            if !Path::new(&format!("/var/run/netns/{node}")).exists() {
                continue;
            }
            let dev = e["device_index"].as_u64().unwrap_or(0);
            let cidr = e["subnet_cidr"].as_str().unwrap_or("");
            let gw = gateway(cidr).ok_or(format!("subnet {cidr:?}"))?;
            present.insert(id.to_string());
            if !wired.contains_key(id) {
                let rif = format!("q{}", self.next_if.fetch_add(1, Ordering::Relaxed));
                let mac = e["mac"].as_str().unwrap_or("");
                let eth = format!("eth{dev}");
                sh(&[
                    "ip",
                    "link",
                    "add",
                    "name",
                    &eth,
                    "address",
                    mac,
                    "mtu",
                    "9001",
                    "netns",
                    node,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &rif,
                    "mtu",
                    "9001",
                    "netns",
                    &self.router,
                ]);
                sh(&[
                    "ip",
                    "-n",
                    &self.router,
                    "addr",
                    "add",
                    &format!("{gw}/32"),
                    "dev",
                    &rif,
                ]);
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    &self.router,
                    "sysctl",
                    "-qw",
                    &format!("net.ipv4.conf.{rif}.proxy_arp=1"),
                ]);
                sh(&[
                    "ip",
                    "-n",
                    &self.router,
                    "addr",
                    "add",
                    &format!("{VPC_GW6}/64"),
                    "dev",
                    &rif,
                    "nodad",
                ]);
                sh(&["ip", "-n", &self.router, "link", "set", &rif, "up"]);
                if dev == 0 {
                    // What DHCP does on a booting instance: the primary address and a default route.
                    let len = cidr.split('/').nth(1).unwrap_or("24");
                    let ip = e["primary_ip"].as_str().unwrap_or("");
                    sh(&[
                        "ip",
                        "-n",
                        node,
                        "addr",
                        "add",
                        &format!("{ip}/{len}"),
                        "dev",
                        &eth,
                    ]);
                    sh(&["ip", "-n", node, "link", "set", &eth, "up"]);
                    sh(&[
                        "ip", "-n", node, "route", "add", "default", "via", &gw, "dev", &eth,
                    ]);
                    // What DHCPv6 and the router's advertisements give an instance in an IPv6
                    // subnet: its address and a default route via the VPC router.
                    if let Some(v6) = strs(&e["ipv6s"]).first() {
                        sh(&[
                            "ip",
                            "-n",
                            node,
                            "addr",
                            "add",
                            &format!("{v6}/128"),
                            "dev",
                            &eth,
                            "nodad",
                        ]);
                        sh(&[
                            "ip", "-n", node, "-6", "route", "add", "default", "via", VPC_GW6,
                            "dev", &eth,
                        ]);
                    }
                }
                wired.insert(
                    id.to_string(),
                    Wired {
                        router_if: rif,
                        node_ns: node.clone(),
                        routes: HashSet::new(),
                    },
                );
            }
            let w = wired.get_mut(id).ok_or("wired")?;
            let primary = e["primary_ip"].as_str().unwrap_or("").to_string();
            let mut want: HashSet<String> = HashSet::new();
            want.insert(format!("{primary}/32"));
            want.extend(strs(&e["secondary_ips"]).iter().map(|a| format!("{a}/32")));
            want.extend(strs(&e["prefixes"]));
            let v6s = strs(&e["ipv6s"]);
            want.extend(v6s.iter().map(|a| format!("{a}/128")));
            // An IPv6 prefix goes to the ENI's own IPv6 address, as a /28 to its IPv4 one.
            if !v6s.is_empty() {
                want.extend(strs(&e["ipv6_prefixes"]));
            }
            let rif = w.router_if.clone();
            for r in want.difference(&w.routes) {
                // Like the VPC fabric, the router sends a secondary address's traffic to the
                // ENI itself (its MAC, learnt through the ENI's own address): the node does not
                // answer ARP for pod addresses.
                let route = if *r == format!("{primary}/32") || r.ends_with("/128") {
                    format!("route replace {r} dev {rif}")
                } else if r.contains(':') {
                    format!(
                        "route replace {r} via {} dev {rif} onlink",
                        v6s.first().map(String::as_str).unwrap_or_default()
                    )
                } else {
                    format!("route replace {r} via {primary} dev {rif} onlink")
                };
                let mut full = vec!["ip", "-n", &self.router];
                full.extend(route.split_whitespace());
                let out = try_sh(&full);
                if !out.status.success() {
                    // Keep wiring the other ENIs; report this one.
                    errors.push(format!(
                        "{route}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
            for r in w.routes.difference(&want) {
                self.try_ip(&format!("route del {r} dev {rif}"));
            }
            w.routes = want;
        }
        // Detached (or deleted) in EC2: the link goes from the node.
        let gone: Vec<String> = wired
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        for id in gone {
            if let Some(w) = wired.remove(&id) {
                try_sh(&["ip", "-n", &self.router, "link", "del", &w.router_if]);
                let _ = w.node_ns;
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

pub struct Vpc {
    /// Every namespace of this VPC is named with this prefix (so a teardown after a crash
    /// can find them).
    pub prefix: String,
    fabric: Arc<Fabric>,
    thread: Option<JoinHandle<()>>,
    pub router: Netns,
    pub internet: Option<Netns>,
    pub shim: Shim,
    /// The Kubernetes API emulator, relayed into every node added after it started.
    pub kube: Option<crate::kube::KubeApi>,
}

impl Vpc {
    /// Start the shim (in `dir`), the router namespace and the fabric.
    pub fn start(dir: &Path, shim_latency_ms: u64) -> Vpc {
        Self::start_named(dir, shim_latency_ms, "v")
    }

    /// As `start`, with namespaces named `<prefix>r...` (router), `<prefix>n...` (nodes),
    /// `<prefix>i...` (internet).
    pub fn start_named(dir: &Path, shim_latency_ms: u64, prefix: &str) -> Vpc {
        let shim = Shim::start(dir, shim_latency_ms);
        let router = Netns::new(&format!("{prefix}r"));
        for s in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=1",
            "net.ipv4.conf.default.rp_filter=1",
            "net.ipv6.conf.all.forwarding=1",
        ] {
            sh(&["ip", "netns", "exec", &router.name, "sysctl", "-qw", s]);
        }
        let fabric = Arc::new(Fabric {
            shim_url: shim.url.clone(),
            router: router.name.clone(),
            nodes: Mutex::default(),
            wired: Mutex::default(),
            next_if: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            error: Mutex::default(),
        });
        let f = fabric.clone();
        let thread = std::thread::spawn(move || {
            while !f.stop.load(Ordering::Relaxed) {
                // A failed `ip` command panics; the fabric must keep going (and say why).
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.sync()));
                let err = match r {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(p) => Some(
                        p.downcast_ref::<String>()
                            .cloned()
                            .unwrap_or_else(|| "fabric step panicked".into()),
                    ),
                };
                if let Some(e) = err {
                    eprintln!("vpc fabric: {e}");
                    if let Ok(mut g) = f.error.lock() {
                        *g = Some(e);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Vpc {
            prefix: prefix.to_string(),
            fabric,
            thread: Some(thread),
            router,
            internet: None,
            shim,
            kube: None,
        }
    }

    /// An "internet" namespace at [`INTERNET_IP`] beyond the router; it routes the VPC back
    /// through the router.
    pub fn add_internet(&mut self) -> &Netns {
        let inet = Netns::new(&format!("{}i", self.prefix));
        sh(&[
            "ip",
            "link",
            "add",
            "name",
            "eth0",
            "netns",
            &inet.name,
            "type",
            "veth",
            "peer",
            "name",
            "qinet",
            "netns",
            &self.router.name,
        ]);
        sh(&[
            "ip",
            "-n",
            &self.router.name,
            "addr",
            "add",
            &format!("{INTERNET_GW}/24"),
            "dev",
            "qinet",
        ]);
        sh(&["ip", "-n", &self.router.name, "link", "set", "qinet", "up"]);
        sh(&[
            "ip",
            "-n",
            &inet.name,
            "addr",
            "add",
            &format!("{INTERNET_IP}/24"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &inet.name, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "-n",
            &inet.name,
            "route",
            "add",
            "10.0.0.0/8",
            "via",
            INTERNET_GW,
        ]);
        // IPv6 beside it: the VPC's addresses are global, routed (not translated) both ways.
        for (ns, addr, dev) in [
            (&self.router.name, INTERNET_GW6, "qinet"),
            (&inet.name, INTERNET_IP6, "eth0"),
        ] {
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                dev,
                "nodad",
            ]);
        }
        sh(&[
            "ip",
            "-n",
            &inet.name,
            "-6",
            "route",
            "add",
            "default",
            "via",
            INTERNET_GW6,
        ]);
        self.internet = Some(inet);
        self.internet.as_ref().expect("just set")
    }

    /// Start the Kubernetes API emulator (files under `dir/kube`); nodes added from now on
    /// reach it at the same address as the host does.
    pub fn start_kube(&mut self, dir: &Path) -> &crate::kube::KubeApi {
        self.kube = Some(crate::kube::KubeApi::start(dir));
        self.kube.as_ref().expect("just set")
    }

    pub fn fabric_error(&self) -> Option<String> {
        self.fabric.error.lock().ok().and_then(|g| g.clone())
    }

    /// A node for `inst`: its namespace, wired by the fabric (eth0 up with the primary address
    /// before this returns), and its fake IMDS + EC2 relay inside it.
    pub fn add_node(&self, dir: &Path, inst: &Instance, imds_lag_ms: u64) -> VpcNode {
        let ns = Netns::new(&format!("{}n", self.prefix));
        ns.enable_forwarding();
        self.fabric
            .nodes
            .lock()
            .expect("fabric lock")
            .insert(inst.id.clone(), ns.name.clone());
        eventually(20, "the node's eth0 from the fabric", || {
            ns.links().contains(&"eth0".to_string()).then_some(())
        });
        let relays: Vec<u16> = self.kube.iter().map(|k| k.port).collect();
        let imds = FakeImds::start_relaying(
            dir,
            &self.shim,
            &inst.id,
            imds_lag_ms,
            Some(&ns.name),
            &relays,
        );
        VpcNode {
            ipamd: None,
            imds,
            inst: inst.clone(),
            ns,
        }
    }
}

impl Drop for Vpc {
    fn drop(&mut self) {
        self.fabric.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One node of the VPC. Field order is drop order: ipamd, then IMDS, then the namespace.
pub struct VpcNode {
    pub ipamd: Option<Ipamd>,
    pub imds: FakeImds,
    pub inst: Instance,
    pub ns: Netns,
}

impl VpcNode {
    /// ipamd's environment on this node: the relayed EC2 endpoint, IMDS, dummy credentials, the
    /// rig's fast clocks, then `env`.
    pub fn env(&self, env: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut all = vec![
            ("AWS_EC2_ENDPOINT".to_string(), self.imds.ec2_url.clone()),
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
                self.imds.url.clone(),
            ),
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            ("IPAMD_POOL_CHECK_INTERVAL".into(), "0.5".into()),
            ("IPAMD_DECREASE_INTERVAL".into(), "1".into()),
            ("IPAMD_RECONCILE_INTERVAL".into(), "2".into()),
            ("IPAMD_MIN_ENI_AGE".into(), "1".into()),
            ("IP_COOLDOWN_PERIOD".into(), "2".into()),
        ];
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        all
    }

    /// Start ipamd inside the node without waiting for it (see [`Ipamd::wait_ready_for`]).
    pub fn spawn_ipamd(&mut self, dir: &Path, env: &[(&str, &str)]) {
        self.spawn_ipamd_bin(&crate::bin("ipamd"), dir, env);
    }

    /// As [`VpcNode::spawn_ipamd`], of the ipamd binary at `bin`.
    pub fn spawn_ipamd_bin(&mut self, bin: &Path, dir: &Path, env: &[(&str, &str)]) {
        let all = self.env(env);
        let refs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.ipamd = Some(Ipamd::spawn_bin(bin, dir, Some(&self.ns.name), &refs, &[]));
    }

    /// Start ipamd inside the node (state files under `dir`).
    pub fn start_ipamd(&mut self, dir: &Path, env: &[(&str, &str)]) -> &Ipamd {
        let all = self.env(env);
        let refs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.ipamd = Some(Ipamd::start(dir, Some(&self.ns.name), &refs));
        self.ipamd.as_ref().expect("just set")
    }

    pub fn ipamd(&self) -> &Ipamd {
        self.ipamd.as_ref().expect("ipamd started")
    }
}
