//! The cloud rig: the EC2 shim (moto behind our middleware, `tests/rig/ec2_shim.py`) and the
//! fake IMDS (`fake-imds`), each a real process on loopback, stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The repository root (tests/ is one level down).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// The venv `scripts/setup.sh` creates, with moto and boto3.
pub fn python() -> PathBuf {
    repo_root().join(".venv/bin/python")
}

/// Note a helper process in `dir/pids`, so a teardown after a crash can stop it.
pub fn record_pid(dir: &Path, pid: u32) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("pids"))
    {
        let _ = writeln!(f, "{pid}");
    }
}

fn wait_port(child: &mut Child, ready: &Path, what: &str, log: &Path) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(s) = std::fs::read_to_string(ready) {
            if let Ok(p) = s.trim().parse() {
                return p;
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "{what} exited early with {st}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not come up");
}

pub struct Shim {
    child: Option<Child>,
    pub url: String,
    pub log: PathBuf,
}

/// What `POST /_shim/instance` returns.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub instance_type: String,
    pub vpc_id: String,
    pub subnet_id: String,
    pub primary_eni: String,
    pub primary_ip: String,
    /// The primary ENI's IPv6 address, when the subnet has IPv6 (see `Shim::instance_v6`).
    pub ipv6: Option<String>,
    /// The subnet's /64, when it has one.
    pub subnet_ipv6_cidr: Option<String>,
    /// The VPC's Amazon-provided /56, when it has one.
    pub vpc_ipv6_cidr: Option<String>,
    pub raw: Value,
}

impl Instance {
    fn from_reply(v: Value) -> Instance {
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        let opt = |k: &str| v[k].as_str().map(str::to_string);
        Instance {
            id: s("instance_id"),
            instance_type: s("instance_type"),
            vpc_id: s("vpc_id"),
            subnet_id: s("subnet_id"),
            primary_eni: s("primary_eni"),
            primary_ip: s("primary_ip"),
            ipv6: opt("ipv6"),
            subnet_ipv6_cidr: opt("subnet_ipv6_cidr"),
            vpc_ipv6_cidr: opt("vpc_ipv6_cidr"),
            raw: v,
        }
    }
}

impl Shim {
    /// Start a shim of our own on a free port; `latency_ms` delays every EC2 call.
    pub fn start(dir: &Path, latency_ms: u64) -> Shim {
        let ready = dir.join("shim.port");
        let log = dir.join("shim.log");
        let mut child = crate::die_with_parent(&mut Command::new(python()))
            .arg(repo_root().join("tests/rig/ec2_shim.py"))
            .args(["--port", "0", "--latency-ms", &latency_ms.to_string()])
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("shim log"))
            .spawn()
            .expect("spawn the EC2 shim (run scripts/setup.sh for the venv)");
        record_pid(dir, child.id());
        let port = wait_port(&mut child, &ready, "EC2 shim", &log);
        Shim {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    pub fn get(&self, path: &str) -> Value {
        ureq::get(&format!("{}{path}", self.url))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .body_mut()
            .read_json()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn post(&self, path: &str, body: Value) -> Value {
        let mut r = ureq::post(&format!("{}{path}", self.url))
            .send_json(&body)
            .unwrap_or_else(|e| panic!("POST {path} {body}: {e}"));
        let text = r.body_mut().read_to_string().unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    pub fn delete(&self, path: &str) {
        ureq::delete(&format!("{}{path}", self.url))
            .call()
            .unwrap_or_else(|e| panic!("DELETE {path}: {e}"));
    }

    /// Run boto3 `body` against this shim (client `c`), as another tool in the account would;
    /// its stdout.
    pub fn boto3(&self, body: &str) -> String {
        let script = format!(
            "import boto3,json\n\
             c=boto3.client('ec2',region_name='us-west-2',endpoint_url='{}',aws_access_key_id='x',aws_secret_access_key='y')\n{body}\n",
            self.url
        );
        let out = Command::new(python())
            .args(["-c", &script])
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Create an ENI in `inst`'s subnet through the EC2 API (not ipamd): its id.
    pub fn create_eni(
        &self,
        inst: &Instance,
        tags: &[(&str, String)],
        description: &str,
        secondary_ips: u32,
    ) -> String {
        let tags: Vec<_> = tags
            .iter()
            .map(|(k, v)| serde_json::json!({"Key": k, "Value": v}))
            .collect();
        let count = if secondary_ips > 0 {
            format!(",SecondaryPrivateIpAddressCount={secondary_ips}")
        } else {
            String::new()
        };
        self.boto3(&format!(
            "r=c.create_network_interface(SubnetId='{}',Description='{description}'{count},\
             TagSpecifications=[{{'ResourceType':'network-interface','Tags':json.loads('{}')}}])\n\
             print(r['NetworkInterface']['NetworkInterfaceId'])",
            inst.subnet_id,
            serde_json::to_string(&tags).unwrap_or_default()
        ))
    }

    /// Attach `eni` to `inst` at `device` through the EC2 API.
    pub fn attach_eni(&self, inst: &Instance, eni: &str, device: u32) {
        self.boto3(&format!(
            "c.attach_network_interface(NetworkInterfaceId='{eni}',InstanceId='{}',DeviceIndex={device})",
            inst.id
        ));
    }

    /// A VPC, subnet and running instance of `instance_type`.
    pub fn instance(&self, instance_type: &str, subnet_cidr: &str) -> Instance {
        let v = self.post(
            "/_shim/instance",
            json!({"instance_type": instance_type, "vpc_cidr": "10.0.0.0/16",
                   "subnet_cidr": subnet_cidr, "az": "us-west-2a"}),
        );
        Instance::from_reply(v)
    }

    /// As `instance`, in a dual-stack VPC: the VPC gets an Amazon-provided /56, the subnet a
    /// /64 of it with AssignIpv6AddressOnCreation, and the primary ENI one IPv6 address.
    pub fn instance_v6(&self, instance_type: &str, subnet_cidr: &str) -> Instance {
        let v = self.post(
            "/_shim/instance",
            json!({"instance_type": instance_type, "vpc_cidr": "10.0.0.0/16",
                   "subnet_cidr": subnet_cidr, "az": "us-west-2a", "ipv6": true}),
        );
        Instance::from_reply(v)
    }

    /// Another instance in the same VPC and subnet as `other` (with IPv6 when `other` has it).
    pub fn instance_beside(&self, instance_type: &str, other: &Instance) -> Instance {
        let v = self.post(
            "/_shim/instance",
            json!({"instance_type": instance_type, "vpc_id": other.vpc_id,
                   "subnet_id": other.subnet_id, "az": "us-west-2a",
                   "ipv6": other.subnet_ipv6_cidr.is_some()}),
        );
        Instance::from_reply(v)
    }

    /// An instance in `vpc_id`, in a new subnet `subnet_cidr` of zone us-west-2a.
    pub fn instance_in(&self, instance_type: &str, vpc_id: &str, subnet_cidr: &str) -> Instance {
        let v = self.post(
            "/_shim/instance",
            json!({"instance_type": instance_type, "vpc_id": vpc_id,
                   "subnet_cidr": subnet_cidr, "az": "us-west-2a"}),
        );
        Instance::from_reply(v)
    }

    /// A subnet of `vpc_id` in us-west-2a (associating `vpc_cidr` with the VPC first when
    /// given); its id.
    pub fn subnet(&self, vpc_id: &str, cidr: &str, vpc_cidr: Option<&str>, tags: Value) -> String {
        let mut body = json!({"vpc_id": vpc_id, "cidr": cidr, "az": "us-west-2a", "tags": tags});
        if let Some(c) = vpc_cidr {
            body["vpc_cidr"] = json!(c);
        }
        self.post("/_shim/subnet", body)["subnet_id"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// A security group of `vpc_id` (the existing one of that name, if any); its id.
    pub fn security_group(&self, vpc_id: &str, name: &str) -> String {
        self.post(
            "/_shim/security-group",
            json!({"vpc_id": vpc_id, "name": name}),
        )["group_id"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// DescribeSubnets' free-address count of a subnet, through boto3.
    pub fn subnet_free(&self, subnet_id: &str) -> u64 {
        self.boto3(&format!(
            "print(c.describe_subnets(SubnetIds=['{subnet_id}'])['Subnets'][0]['AvailableIpAddressCount'])"
        ))
        .trim()
        .parse()
        .unwrap_or(0)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Every ENI the shim knows.
    pub fn enis(&self) -> Vec<Value> {
        let v = self.get("/_shim/enis");
        v.as_array()
            .cloned()
            .or_else(|| v["enis"].as_array().cloned())
            .unwrap_or_default()
    }

    /// ENIs attached to `instance`, sorted by device index.
    pub fn attached(&self, instance: &str) -> Vec<Value> {
        let mut v: Vec<Value> = self
            .enis()
            .into_iter()
            .filter(|e| e["instance_id"].as_str() == Some(instance))
            .collect();
        v.sort_by_key(|e| e["device_index"].as_u64());
        v
    }

    /// Secondary IPs plus prefix addresses held by the instance's ENIs.
    pub fn addresses(&self, instance: &str) -> (usize, usize, usize) {
        let enis = self.attached(instance);
        let ips = enis
            .iter()
            .map(|e| e["secondary_ips"].as_array().map_or(0, Vec::len))
            .sum();
        let prefixes = enis
            .iter()
            .map(|e| e["prefixes"].as_array().map_or(0, Vec::len))
            .sum();
        (enis.len(), ips, prefixes)
    }

    /// IPv6 addresses and /80 prefixes held by the instance's ENIs, by device index.
    pub fn ipv6(&self, instance: &str) -> (Vec<String>, Vec<String>) {
        let strings = |e: &Value, k: &str| -> Vec<String> {
            e[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let enis = self.attached(instance);
        (
            enis.iter().flat_map(|e| strings(e, "ipv6s")).collect(),
            enis.iter()
                .flat_map(|e| strings(e, "ipv6_prefixes"))
                .collect(),
        )
    }

    pub fn calls(&self) -> Value {
        self.get("/_shim/calls")
    }

    pub fn reset_calls(&self) {
        self.post("/_shim/calls/reset", json!({}));
    }

    pub fn fault(&self, f: Value) {
        self.post("/_shim/faults", f);
    }

    pub fn clear_faults(&self) {
        self.delete("/_shim/faults");
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        crate::terminate(self.child.take());
    }
}

pub struct FakeImds {
    child: Option<Child>,
    /// IMDS as ipamd sees it (inside the node's namespace when there is one).
    pub url: String,
    /// The EC2 relay as ipamd sees it.
    pub ec2_url: String,
    netns: Option<String>,
}

impl FakeImds {
    pub fn start(dir: &Path, shim: &Shim, instance: &str, lag_ms: u64) -> FakeImds {
        Self::start_in(dir, shim, instance, lag_ms, None)
    }

    /// With `netns`, IMDS and an EC2 relay listen inside that namespace.
    pub fn start_in(
        dir: &Path,
        shim: &Shim,
        instance: &str,
        lag_ms: u64,
        netns: Option<&str>,
    ) -> FakeImds {
        Self::start_relaying(dir, shim, instance, lag_ms, netns, &[])
    }

    /// As `start_in`, also relaying each of `relays` (ports on the host's loopback) from the
    /// same port inside the namespace.
    pub fn start_relaying(
        dir: &Path,
        shim: &Shim,
        instance: &str,
        lag_ms: u64,
        netns: Option<&str>,
        relays: &[u16],
    ) -> FakeImds {
        let ready = dir.join(format!("imds-{instance}.ready"));
        let log = dir.join(format!("imds-{instance}.log"));
        let mut cmd = Command::new(crate::bin("fake-imds"));
        cmd.args(["--shim", &shim.url, "--instance", instance])
            .args(["--lag-ms", &lag_ms.to_string()])
            .args(["--ec2-listen", "127.0.0.1:0"])
            .arg("--ready-file")
            .arg(&ready);
        if let Some(ns) = netns {
            cmd.args(["--netns", ns]);
        }
        for p in relays {
            cmd.args(["--relay", &p.to_string()]);
        }
        let mut child = crate::die_with_parent(&mut cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("imds log"))
            .spawn()
            .expect("spawn fake-imds");
        record_pid(dir, child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        let (imds, ec2) = loop {
            let text = std::fs::read_to_string(&ready).unwrap_or_default();
            let port = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .and_then(|p| p.trim().parse::<u16>().ok())
            };
            if let (Some(i), Some(e)) = (port("imds="), port("ec2=")) {
                break (i, e);
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "fake IMDS exited with {st}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "fake IMDS did not come up");
            std::thread::sleep(Duration::from_millis(20));
        };
        FakeImds {
            child: Some(child),
            url: format!("http://127.0.0.1:{imds}"),
            ec2_url: format!("http://127.0.0.1:{ec2}"),
            netns: netns.map(str::to_string),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Serve the shim's state as it was `ms` ago.
    pub fn set_lag(&self, ms: u64) {
        let url = format!("{}/fake-imds/lag", self.url);
        match &self.netns {
            None => {
                ureq::put(&url).send(ms.to_string()).expect("set IMDS lag");
            }
            // The test runs outside the node: reach its loopback from inside.
            Some(ns) => {
                let script = format!(
                    "import urllib.request as u; u.urlopen(u.Request('{url}', data=b'{ms}', method='PUT')).read()"
                );
                crate::sh(&["ip", "netns", "exec", ns, "python3", "-c", &script]);
            }
        }
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        crate::terminate(self.child.take());
    }
}

/// Poll `f` every 100 ms until it returns Some or `secs` pass.
pub fn eventually<T>(secs: u64, what: &str, f: impl FnMut() -> Option<T>) -> T {
    eventually_every(Duration::from_millis(100), secs, what, f)
}

/// [`eventually`] polling every `every` (a benchmark timing what takes milliseconds).
pub fn eventually_every<T>(
    every: Duration,
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for {what}");
        }
        std::thread::sleep(every);
    }
}
