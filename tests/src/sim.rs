//! The simulated cluster: a namespace VPC with nodes running the real ipamd, pods created by
//! libcni through `aws-cni` + `portmap`, and the checks an operator would make (cross-node pod
//! pings, the SNAT source the internet sees, a port mapping). Shared by the `sim` command and
//! the end-to-end tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cloud::{eventually, Instance};
use crate::cni::CniClient;
use crate::ipamd_proc::{block, health};
use crate::netns::Netns;
use crate::try_sh;
use crate::vpc::{strs, Vpc, VpcNode, INTERNET_IP};
use serde_json::json;

/// A port the internet namespace answers on with the address it sees the caller as.
pub const WHOAMI_PORT: u16 = 8081;

pub struct NodeSpec {
    pub instance_type: String,
    pub env: Vec<(String, String)>,
}

impl NodeSpec {
    pub fn new(instance_type: &str, env: &[(&str, &str)]) -> NodeSpec {
        NodeSpec {
            instance_type: instance_type.into(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

/// How the cluster places ENIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Every ENI in the nodes' subnet.
    #[default]
    Default,
    /// Secondary ENIs in the subnets of ENIConfigs (100.64.0.0/16, added to the VPC), chosen by
    /// the nodes' zone label, with their own security group; the Kubernetes API emulator runs.
    CustomNetworking,
    /// Each node in a /28 subnet of its own; a subnet tagged `kubernetes.io/role/cni=1` (and a
    /// larger untagged one that must not be used) take the ENIs the nodes' subnets cannot.
    SubnetDiscovery,
    /// An IPv6 cluster: the VPC and subnet have IPv6 CIDRs, every ipamd runs with
    /// ENABLE_IPv6 (and prefix delegation), pods get IPv6 addresses from their node's /80 and
    /// IPv4 egress through egress-cni. A node whose spec sets ENABLE_IPv6=false is an IPv4
    /// node of the same VPC (with ENABLE_V6_EGRESS its pods get IPv6 egress).
    Ipv6,
}

/// What a mode made besides the nodes, for the report and the checks.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// (name, subnet id, CIDR) of the subnets made for pods.
    pub subnets: Vec<(String, String, String)>,
    /// The pods' security group (custom networking).
    pub pod_group: Option<String>,
    /// The nodes' subnets.
    pub node_subnets: Vec<String>,
}

impl Layout {
    pub fn subnet(&self, name: &str) -> Option<&(String, String, String)> {
        self.subnets.iter().find(|s| s.0 == name)
    }

    /// A subnet id in words: its name and CIDR when the mode made it.
    pub fn name_of(&self, subnet_id: &str) -> String {
        match self.subnets.iter().find(|s| s.1 == subnet_id) {
            Some((n, id, c)) => format!("{id} ({n} {c})"),
            None if self.node_subnets.iter().any(|s| s == subnet_id) => {
                format!("{subnet_id} (node subnet)")
            }
            None => subnet_id.to_string(),
        }
    }
}

/// How `Sim::up_with` brings the cluster up.
#[derive(Debug, Clone, Copy)]
pub struct Opts {
    /// Wait until every ipamd can hand out an address.
    pub wait_serving: bool,
    /// Run the Kubernetes API emulator (custom networking always does), with a Node object
    /// per node named by its instance id.
    pub kube: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            wait_serving: true,
            kube: false,
        }
    }
}

/// The zone label custom networking selects ENIConfigs by, as many clusters do.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// An ENI as EC2 shows it.
pub struct SimEni {
    pub device: u64,
    pub subnet_id: String,
    pub security_groups: Vec<String>,
    pub id: String,
    pub primary_ip: String,
    pub secondary: Vec<String>,
    pub prefixes: Vec<String>,
}

pub struct Pod {
    pub name: String,
    pub cid: String,
    pub ns: Netns,
    pub ip: String,
    pub ports: String,
}

pub struct SimNode {
    pub pods: Vec<Pod>,
    pub cni: CniClient,
    pub node: VpcNode,
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
}

impl SimNode {
    pub fn ns(&self) -> &str {
        &self.node.ns.name
    }
    pub fn inst(&self) -> &Instance {
        &self.node.inst
    }
}

/// Field order is drop order: nodes (pods, ipamd, IMDS, namespaces) before the VPC.
pub struct Sim {
    pub nodes: Vec<SimNode>,
    pub vpc: Vpc,
    pub dir: PathBuf,
    pub layout: Layout,
    whoami: Option<std::process::Child>,
}

impl Sim {
    /// The VPC (namespaces named `<prefix>...`), an internet, one node per spec (all in one
    /// subnet), each ipamd serving (an address allocatable) before this returns.
    pub fn up(dir: &Path, prefix: &str, specs: &[NodeSpec]) -> Sim {
        Self::up_in(dir, prefix, specs, Mode::Default)
    }

    /// As `up`, with ENIs placed as `mode` says.
    pub fn up_in(dir: &Path, prefix: &str, specs: &[NodeSpec], mode: Mode) -> Sim {
        Self::up_with(dir, prefix, specs, mode, Opts::default())
    }

    /// As `up_in`, with `opts`.
    pub fn up_with(dir: &Path, prefix: &str, specs: &[NodeSpec], mode: Mode, opts: Opts) -> Sim {
        let mut vpc = Vpc::start_named(dir, 0, prefix);
        vpc.add_internet();
        let mut insts: Vec<Instance> = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let inst = match (mode, insts.first()) {
                (Mode::SubnetDiscovery, None) => {
                    vpc.shim.instance(&spec.instance_type, "10.0.0.0/28")
                }
                (Mode::SubnetDiscovery, Some(f)) => vpc.shim.instance_in(
                    &spec.instance_type,
                    &f.vpc_id,
                    &format!("10.0.0.{}/28", 16 * i),
                ),
                (Mode::Ipv6, None) => vpc.shim.instance_v6(&spec.instance_type, "10.0.0.0/20"),
                (_, None) => vpc.shim.instance(&spec.instance_type, "10.0.0.0/20"),
                (_, Some(f)) => vpc.shim.instance_beside(&spec.instance_type, f),
            };
            insts.push(inst);
        }
        let mut layout = Layout {
            node_subnets: insts.iter().map(|i| i.subnet_id.clone()).collect(),
            ..Default::default()
        };
        let vpc_id = insts.first().map(|i| i.vpc_id.clone()).unwrap_or_default();
        let mut mode_env: Vec<(String, String)> = Vec::new();
        if opts.kube && mode != Mode::CustomNetworking {
            let kube = vpc.start_kube(dir);
            for inst in &insts {
                kube.node(&inst.id, &[(ZONE_LABEL, "us-west-2a")]);
            }
        }
        match mode {
            Mode::Default => {}
            Mode::Ipv6 => {
                for (k, v) in [
                    ("ENABLE_IPv6", "true"),
                    ("ENABLE_IPv4", "false"),
                    ("ENABLE_PREFIX_DELEGATION", "true"),
                ] {
                    mode_env.push((k.into(), v.into()));
                }
            }
            Mode::CustomNetworking => {
                vpc.start_kube(dir);
                let group = vpc.shim.security_group(&vpc_id, "pods");
                for (name, cidr) in [("us-west-2a", "100.64.0.0/24"), ("alt", "100.64.1.0/24")] {
                    let id = vpc
                        .shim
                        .subnet(&vpc_id, cidr, Some("100.64.0.0/16"), json!({}));
                    layout.subnets.push((name.into(), id, cidr.into()));
                }
                let kube = vpc.kube.as_ref().expect("kube started");
                for (name, id, _) in &layout.subnets {
                    kube.eniconfig(name, id, &[&group]);
                }
                for inst in &insts {
                    kube.node(&inst.id, &[(ZONE_LABEL, "us-west-2a")]);
                }
                layout.pod_group = Some(group);
                mode_env.push(("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG".into(), "true".into()));
                mode_env.push(("ENI_CONFIG_LABEL_DEF".into(), ZONE_LABEL.into()));
            }
            Mode::SubnetDiscovery => {
                let tagged = vpc.shim.subnet(
                    &vpc_id,
                    "10.0.32.0/24",
                    None,
                    json!({"kubernetes.io/role/cni": "1"}),
                );
                layout
                    .subnets
                    .push(("tagged".into(), tagged, "10.0.32.0/24".into()));
                let untagged = vpc.shim.subnet(&vpc_id, "10.0.64.0/20", None, json!({}));
                layout
                    .subnets
                    .push(("untagged".into(), untagged, "10.0.64.0/20".into()));
                mode_env.push(("ENABLE_SUBNET_DISCOVERY".into(), "true".into()));
            }
        }
        let mut nodes = Vec::new();
        for (i, (spec, inst)) in specs.iter().zip(&insts).enumerate() {
            let ndir = dir.join(format!("node{}", i + 1));
            std::fs::create_dir_all(&ndir).expect("node dir");
            let mut node = vpc.add_node(&ndir, inst, 0);
            let mut all = mode_env.clone();
            if let Some(k) = &vpc.kube {
                all.extend(k.env(&inst.id));
            }
            all.extend(spec.env.iter().cloned());
            let env: Vec<(&str, &str)> =
                all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            node.start_ipamd(&ndir, &env);
            let cni = CniClient::new(&node.ns.name, &ndir, &node.ipamd().socket);
            // egress-cni as the entrypoint chains it (the last value of a variable counts).
            let flag = |k: &str| {
                all.iter()
                    .rev()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v == "true")
            };
            if flag("ENABLE_IPv6") == Some(true) && flag("ENABLE_V4_EGRESS") != Some(false) {
                cni.chain_egress(&ndir, &inst.primary_ip);
            } else if flag("ENABLE_V6_EGRESS") == Some(true) {
                if let Some(v6) = &inst.ipv6 {
                    cni.chain_egress(&ndir, v6);
                }
            }
            nodes.push(SimNode {
                pods: Vec::new(),
                cni,
                node,
                dir: ndir,
                env: all,
            });
        }
        let sim = Sim {
            nodes,
            vpc,
            dir: dir.to_path_buf(),
            layout,
            whoami: None,
        };
        for n in sim.nodes.iter().filter(|_| opts.wait_serving) {
            let sock = n.node.ipamd().socket.clone();
            eventually(30, "ipamd SERVING", || {
                (block(health(&sock)) == "SERVING").then_some(())
            });
        }
        sim
    }

    /// ADD a pod through libcni on `node`; its IP, or the runtime's error text.
    pub fn add_pod(&mut self, node: usize, name: &str, ports: &str) -> Result<String, String> {
        let ns = Netns::new(&format!("{}p", self.vpc.prefix));
        let cid = format!("cid-{name}");
        let n = &mut self.nodes[node];
        match n.cni.add(&cid, &ns, name, ports) {
            Ok(ip) => {
                n.pods.push(Pod {
                    name: name.into(),
                    cid,
                    ns,
                    ip: ip.clone(),
                    ports: ports.into(),
                });
                Ok(ip)
            }
            Err(e) => {
                // What a runtime does after a failed ADD: DEL, then drop the sandbox.
                let _ = n.cni.run("del", &cid, &ns, name, ports);
                Err(e)
            }
        }
    }

    pub fn pod(&self, node: usize, name: &str) -> &Pod {
        self.nodes[node]
            .pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} on node {node}"))
    }

    pub fn del_pod(&mut self, node: usize, name: &str) {
        let n = &mut self.nodes[node];
        if let Some(i) = n.pods.iter().position(|p| p.name == name) {
            let p = n.pods.remove(i);
            n.cni.ok("del", &p.cid, &p.ns, &p.name, &p.ports);
        }
    }

    /// Stop ipamd on `node` (SIGTERM).
    pub fn stop_ipamd(&mut self, node: usize) {
        if let Some(mut d) = self.nodes[node].node.ipamd.take() {
            d.stop();
        }
    }

    pub fn start_ipamd(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        let env: Vec<(&str, &str)> = n
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        n.node.start_ipamd(&n.dir, &env);
    }

    /// Round-trip time of one ping from a pod, or None.
    pub fn ping(&self, from: &Pod, dst: &str) -> Option<f64> {
        for _ in 0..3 {
            // Three packets, the last reported: the first ones also pay for neighbour resolution on
            // every hop (and may be answered together once it completes).
            let out = try_sh(&[
                "ip",
                "netns",
                "exec",
                &from.ns.name,
                "ping",
                "-c",
                "3",
                "-i",
                "0.3",
                "-W",
                "2",
                dst,
            ]);
            if out.status.success() {
                let text = String::from_utf8_lossy(&out.stdout);
                return text
                    .rsplit("time=")
                    .next()
                    .and_then(|t| t.split_whitespace().next())
                    .and_then(|t| t.parse().ok())
                    .or(Some(0.0));
            }
        }
        None
    }

    /// Start (once) a server in the internet namespace that answers with the caller's address.
    pub fn start_whoami(&mut self) {
        if self.whoami.is_some() {
            return;
        }
        let inet = self.vpc.internet.as_ref().expect("internet").name.clone();
        self.whoami = Some(whoami(&inet, WHOAMI_PORT));
    }

    /// The address the internet sees `pod` as (after SNAT), or the error.
    pub fn seen_from_internet(&mut self, pod: (usize, &str)) -> Result<String, String> {
        self.seen_at(pod, INTERNET_IP)
    }

    /// The address the internet's `addr` (its IPv4 or IPv6 one) sees `pod` as.
    pub fn seen_at(&mut self, pod: (usize, &str), addr: &str) -> Result<String, String> {
        self.start_whoami();
        let p = self.pod(pod.0, pod.1);
        tcp_text(&p.ns.name, addr, WHOAMI_PORT)
    }

    /// The ENIs EC2 shows for a node.
    pub fn enis(&self, node: usize) -> Vec<SimEni> {
        self.vpc
            .shim
            .attached(&self.nodes[node].inst().id)
            .iter()
            .map(|e| SimEni {
                device: e["device_index"].as_u64().unwrap_or(0),
                subnet_id: e["subnet_id"].as_str().unwrap_or("").to_string(),
                security_groups: strs(&e["security_group_ids"]),
                id: e["id"].as_str().unwrap_or("").to_string(),
                primary_ip: e["primary_ip"].as_str().unwrap_or("").to_string(),
                secondary: strs(&e["secondary_ips"]),
                prefixes: strs(&e["prefixes"]),
            })
            .collect()
    }

    /// Which device's ENI holds `ip` on `node`.
    pub fn device_of(&self, node: usize, ip: &str) -> Option<u64> {
        self.enis(node)
            .into_iter()
            .find(|e| e.secondary.iter().any(|a| a == ip))
            .map(|e| e.device)
    }

    /// Every pod gone through libcni, every ipamd stopped; namespaces go when dropped.
    pub fn down(mut self) {
        for n in &mut self.nodes {
            for p in std::mem::take(&mut n.pods) {
                let _ = n.cni.run("del", &p.cid, &p.ns, &p.name, &p.ports);
            }
            if let Some(mut d) = n.node.ipamd.take() {
                d.stop();
            }
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(mut c) = self.whoami.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Connect from `ns` to `ip:port` and read what the server says.
pub fn tcp_text(ns: &str, ip: &str, port: u16) -> Result<String, String> {
    let script = format!(
        "import socket;s=socket.create_connection(('{ip}',{port}),timeout=3);print(s.recv(200).decode())"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = try_sh(&["ip", "netns", "exec", ns, "python3", "-c", &script]);
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        if Instant::now() > deadline {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A TCP server in `ns` that answers every caller with the address it sees it as.
pub fn whoami(ns: &str, port: u16) -> std::process::Child {
    // Both families on one socket; an IPv4 caller shows as ::ffff:a.b.c.d, said as a.b.c.d.
    let script = format!(
        "import socket\ns=socket.socket(socket.AF_INET6);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n\
         s.bind(('::',{port}));s.listen(64)\n\
         while True:\n  c,a=s.accept();h=a[0];h=h[7:] if h.startswith('::ffff:') else h;c.sendall(h.encode());c.close()\n"
    );
    let c = crate::die_with_parent(&mut std::process::Command::new("ip"))
        .args(["netns", "exec", ns, "python3", "-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("whoami server");
    std::thread::sleep(Duration::from_millis(300));
    c
}

/// A TCP server in `ns` on `port` answering `text`.
pub fn serve_text(ns: &str, port: u16, text: &str) -> std::process::Child {
    let script = format!(
        "import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('0.0.0.0',{port}));s.listen(8)\n\
         while True:\n  c,a=s.accept();c.sendall(b'{text}');c.close()\n"
    );
    let c = crate::die_with_parent(&mut std::process::Command::new("ip"))
        .args(["netns", "exec", ns, "python3", "-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("server");
    std::thread::sleep(Duration::from_millis(300));
    c
}

/// Remove everything a crashed run left: processes in namespaces named `prefix*` and listed in
/// `dir/pids`, then the namespaces, then `dir`.
pub fn teardown(dir: &Path, prefix: &str) -> Vec<String> {
    let mut done = Vec::new();
    let list = String::from_utf8_lossy(&try_sh(&["ip", "netns", "list"]).stdout).into_owned();
    let names: Vec<String> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect();
    for ns in &names {
        let pids =
            String::from_utf8_lossy(&try_sh(&["ip", "netns", "pids", ns]).stdout).into_owned();
        for pid in pids.split_whitespace() {
            try_sh(&["kill", "-9", pid]);
            done.push(format!("killed {pid} in {ns}"));
        }
    }
    // Helpers outside the namespaces (the shim, fake IMDS) carry the state directory in
    // their command line.
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id().to_string();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let pid = p.file_name().to_string_lossy().into_owned();
            if !pid.chars().all(|c| c.is_ascii_digit()) || pid == me {
                continue;
            }
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) && try_sh(&["kill", "-9", &pid]).status.success() {
                done.push(format!("killed {pid} ({})", cmdline.trim()));
            }
        }
    }
    for ns in &names {
        try_sh(&["ip", "netns", "del", ns]);
        done.push(format!("deleted netns {ns}"));
    }
    if dir.exists() {
        let _ = std::fs::remove_dir_all(dir);
        done.push(format!("removed {}", dir.display()));
    }
    done
}

/// GET `url` from inside `ns`: (status, body).
pub fn http_get(ns: &str, url: &str) -> (u16, String) {
    let script = format!(
        "import urllib.request as u, urllib.error as e, sys\n\
         try:\n r=u.urlopen('{url}',timeout=5); print(r.status); sys.stdout.write(r.read().decode())\n\
         except e.HTTPError as x:\n print(x.code); sys.stdout.write(x.read().decode())\n"
    );
    let out = try_sh(&["ip", "netns", "exec", ns, "python3", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, body) = text.split_once('\n').unwrap_or((&text, ""));
    (status.trim().parse().unwrap_or(0), body.to_string())
}
