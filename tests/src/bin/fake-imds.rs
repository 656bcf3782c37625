//! fake-imds: IMDSv2 for one instance, rendered from the EC2 shim's state.
//!
//! `fake-imds --shim URL --instance i-... [--listen 127.0.0.1:0] [--ready-file F] [--lag-ms N]
//!            [--netns NAME] [--ec2-listen 127.0.0.1:0] [--relay PORT]...`
//!
//! With `--netns`, the listeners are opened inside that network namespace (a node of the
//! simulated VPC) while the shim is still reached on the host's loopback: a socket stays in the
//! namespace it was opened in. `--ec2-listen` adds a plain TCP relay to the shim there, the
//! node's "EC2 endpoint", since the node cannot reach the host's loopback itself. `--relay PORT`
//! relays 127.0.0.1:PORT inside the namespace to the same port on the host (the Kubernetes API
//! emulator: its kubeconfig and certificate then work unchanged from inside the node).
//!
//! Real IMDS shows attach and assign some time after EC2 reports them; `--lag-ms` (or
//! `PUT /fake-imds/lag` with the milliseconds as body) makes this one serve the shim's state
//! as it was that long ago, so ipamd is tested against a lagging view.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;

const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// The instance profile role the fake reports (credentials are dummies; moto ignores them).
const ROLE: &str = "aws-node";

struct State {
    shim: String,
    instance: String,
    lag: Mutex<Duration>,
    /// Snapshots of the shim's view, oldest first.
    history: Mutex<VecDeque<(Instant, Value)>>,
    tokens: Mutex<HashSet<String>>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl State {
    async fn fetch(&self) -> anyhow::Result<Value> {
        let uri = format!("{}/_shim/imds/{}", self.shim, self.instance);
        let resp = self
            .client
            .get(uri.parse()?)
            .await
            .with_context(|| format!("GET {uri}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("GET {uri}: {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(serde_json::from_slice(&body)?)
    }

    /// Record a fresh snapshot; keep enough history to serve any lag up to a minute.
    async fn poll(&self) -> anyhow::Result<()> {
        let v = self.fetch().await?;
        let mut h = self
            .history
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        h.push_back((Instant::now(), v));
        while h.len() > 2 && h[1].0.elapsed() > Duration::from_secs(60) {
            h.pop_front();
        }
        Ok(())
    }

    /// The newest snapshot at least `lag` old (the oldest one if none is that old yet).
    async fn view(&self) -> anyhow::Result<Value> {
        let lag = *self.lag.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        if lag.is_zero() {
            return self.fetch().await;
        }
        let h = self
            .history
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        let pick = h
            .iter()
            .rev()
            .find(|(t, _)| t.elapsed() >= lag)
            .or_else(|| h.front());
        pick.map(|(_, v)| v.clone())
            .context("no snapshot of the shim yet")
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r
}

fn ok(body: impl Into<String>) -> Response<Full<Bytes>> {
    text(StatusCode::OK, body)
}

fn not_found() -> Response<Full<Bytes>> {
    text(StatusCode::NOT_FOUND, "Not Found")
}

fn s(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::String(x) => x.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

fn lines(v: &Value, k: &str) -> String {
    v[k].as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// Answer one meta-data path from a snapshot.
fn render(view: &Value, path: &str) -> Response<Full<Bytes>> {
    let ifaces = view["interfaces"].as_array().cloned().unwrap_or_default();
    match path {
        "instance-id" => return ok(s(view, "instance_id")),
        "instance-type" => return ok(s(view, "instance_type")),
        "mac" => return ok(s(view, "mac")),
        "local-ipv4" => return ok(s(view, "local_ipv4")),
        // Real IMDS has no such key on an instance without an IPv6 address.
        "ipv6" => return present(s(view, "ipv6")),
        "placement/availability-zone" => return ok(s(view, "az")),
        "placement/region" => return ok(s(view, "region")),
        "iam/security-credentials" | "iam/security-credentials/" => return ok(ROLE),
        "network/interfaces/macs" | "network/interfaces/macs/" => {
            return ok(ifaces
                .iter()
                .map(|i| format!("{}/", s(i, "mac")))
                .collect::<Vec<_>>()
                .join("\n"))
        }
        _ => {}
    }
    if path == format!("iam/security-credentials/{ROLE}") {
        let exp = humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() + Duration::from_secs(6 * 3600),
        );
        return ok(serde_json::json!({
            "Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "AKIAFAKEIMDS",
            "SecretAccessKey": "fake", "Token": "fake", "Expiration": exp.to_string(),
            "LastUpdated": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        })
        .to_string());
    }
    let Some(rest) = path.strip_prefix("network/interfaces/macs/") else {
        return not_found();
    };
    let (mac, field) = rest.split_once('/').unwrap_or((rest, ""));
    let Some(i) = ifaces.iter().find(|i| s(i, "mac") == mac) else {
        return not_found();
    };
    match field {
        "" => ok(mac_keys(i).join("\n")),
        "device-number" => ok(s(i, "device_number")),
        "network-card" => ok(s(i, "network_card")),
        "interface-id" => ok(s(i, "interface_id")),
        "mac" => ok(s(i, "mac")),
        "subnet-id" => ok(s(i, "subnet_id")),
        "subnet-ipv4-cidr-block" => ok(s(i, "subnet_cidr")),
        "vpc-id" => ok(s(i, "vpc_id")),
        "vpc-ipv4-cidr-block" => ok(lines(i, "vpc_cidrs")
            .lines()
            .next()
            .unwrap_or("")
            .to_string()),
        "vpc-ipv4-cidr-blocks" => ok(lines(i, "vpc_cidrs")),
        "local-ipv4s" => ok(lines(i, "local_ipv4s")),
        "security-group-ids" => ok(lines(i, "security_group_ids")),
        // Real IMDS has no such key when the ENI holds no prefix (or, for the IPv6 keys, when
        // the ENI, its subnet or its VPC has no IPv6).
        key => match OPTIONAL_MAC_KEYS.iter().find(|(k, _)| *k == key) {
            Some((_, field)) => present(lines(i, field)),
            None => not_found(),
        },
    }
}

/// The keys of a MAC's directory that exist only when their list is not empty, with the
/// shim view's field behind each.
const OPTIONAL_MAC_KEYS: [(&str, &str); 5] = [
    ("ipv4-prefix", "ipv4_prefixes"),
    ("ipv6-prefix", "ipv6_prefixes"),
    ("ipv6s", "ipv6s"),
    ("subnet-ipv6-cidr-blocks", "subnet_ipv6_cidrs"),
    ("vpc-ipv6-cidr-blocks", "vpc_ipv6_cidrs"),
];

/// A MAC's directory listing as real IMDS gives it: sorted, naming only the keys there are.
fn mac_keys(iface: &Value) -> Vec<&'static str> {
    let mut keys = vec![
        "device-number",
        "interface-id",
        "local-ipv4s",
        "mac",
        "network-card",
        "security-group-ids",
        "subnet-id",
        "subnet-ipv4-cidr-block",
        "vpc-id",
        "vpc-ipv4-cidr-blocks",
    ];
    keys.extend(
        OPTIONAL_MAC_KEYS
            .iter()
            .filter(|(_, field)| !lines(iface, field).is_empty())
            .map(|(k, _)| *k),
    );
    keys.sort_unstable();
    keys
}

/// 200 with `body`, or 404 when it is empty: a key IMDS leaves out rather than serves empty.
fn present(body: String) -> Response<Full<Bytes>> {
    if body.is_empty() {
        not_found()
    } else {
        ok(body)
    }
}

async fn handle(
    st: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if path == "/fake-imds/lag" {
        if method == Method::PUT || method == Method::POST {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let ms: u64 = match String::from_utf8_lossy(&body).trim().parse() {
                Ok(v) => v,
                Err(_) => return Ok(text(StatusCode::BAD_REQUEST, "body: milliseconds")),
            };
            if let Ok(mut l) = st.lag.lock() {
                *l = Duration::from_millis(ms);
            }
            return Ok(ok(ms.to_string()));
        }
        let ms = st.lag.lock().map(|l| l.as_millis()).unwrap_or(0);
        return Ok(ok(ms.to_string()));
    }
    if path == "/latest/api/token" {
        if method != Method::PUT {
            return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "use PUT"));
        }
        let ttl = req
            .headers()
            .get(TOKEN_TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        let Some(ttl) = ttl.filter(|t| (1..=21600).contains(t)) else {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                "missing or invalid TTL header",
            ));
        };
        let token = format!("fake-{:x}", rand_token());
        if let Ok(mut t) = st.tokens.lock() {
            t.insert(token.clone());
        }
        let mut r = ok(token);
        if let Ok(v) = ttl.to_string().parse() {
            r.headers_mut().insert(TOKEN_TTL_HEADER, v);
        }
        return Ok(r);
    }
    let Some(md) = path.strip_prefix("/latest/meta-data/") else {
        return Ok(not_found());
    };
    let authorised = req
        .headers()
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| st.tokens.lock().is_ok_and(|set| set.contains(t)));
    if !authorised {
        return Ok(text(StatusCode::UNAUTHORIZED, "IMDSv2 token required"));
    }
    match st.view().await {
        Ok(v) => Ok(render(&v, md)),
        Err(e) => Ok(text(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}"))),
    }
}

/// Bind TCP listeners, inside `netns` when given (on a throwaway thread: only that thread
/// switches namespace, and the sockets stay where they were opened).
fn bind_in(
    netns: Option<&str>,
    addrs: &[SocketAddr],
) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let bind = |addrs: &[SocketAddr]| -> anyhow::Result<Vec<std::net::TcpListener>> {
        addrs
            .iter()
            .map(|a| {
                let l = std::net::TcpListener::bind(a).with_context(|| format!("bind {a}"))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .collect()
    };
    let Some(ns) = netns else {
        return bind(addrs);
    };
    let path = format!("/var/run/netns/{ns}");
    let f = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("enter netns {ns}"))?;
            bind(addrs)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    })
}

/// Relay every connection to `target` (host:port on this process's own loopback).
async fn relay_to(l: tokio::net::TcpListener, target: String) {
    loop {
        let Ok((mut inbound, _)) = l.accept().await else {
            continue;
        };
        let target = target.clone();
        tokio::spawn(async move {
            if let Ok(mut out) = tokio::net::TcpStream::connect(&target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            }
        });
    }
}

fn rand_token() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    ((h.finish() as u128) << 64)
        | std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish() as u128
}

struct Args {
    shim: String,
    instance: String,
    listen: SocketAddr,
    ready_file: Option<String>,
    lag: Duration,
    netns: Option<String>,
    ec2_listen: Option<SocketAddr>,
    relays: Vec<u16>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        shim: String::new(),
        instance: String::new(),
        listen: "127.0.0.1:0".parse()?,
        ready_file: None,
        lag: Duration::ZERO,
        netns: None,
        ec2_listen: None,
        relays: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--shim" => a.shim = v()?.trim_end_matches('/').to_string(),
            "--instance" => a.instance = v()?,
            "--listen" => a.listen = v()?.parse().context("--listen")?,
            "--ready-file" => a.ready_file = Some(v()?),
            "--lag-ms" => a.lag = Duration::from_millis(v()?.parse().context("--lag-ms")?),
            "--netns" => a.netns = Some(v()?),
            "--ec2-listen" => a.ec2_listen = Some(v()?.parse().context("--ec2-listen")?),
            "--relay" => a.relays.push(v()?.parse().context("--relay")?),
            _ => bail!("unknown argument {k}"),
        }
    }
    if a.shim.is_empty() || a.instance.is_empty() {
        bail!("usage: fake-imds --shim URL --instance ID [--listen ADDR] [--ready-file F] [--lag-ms N]");
    }
    Ok(a)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let st = Arc::new(State {
        shim: a.shim.clone(),
        instance: a.instance,
        lag: Mutex::new(a.lag),
        history: Mutex::default(),
        tokens: Mutex::default(),
        client: Client::builder(TokioExecutor::new()).build_http(),
    });
    st.poll().await.context("first read of the shim's state")?;
    let poller = st.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_millis(100));
        loop {
            t.tick().await;
            if let Err(e) = poller.poll().await {
                eprintln!("fake-imds: {e:#}");
            }
        }
    });
    let mut addrs = vec![a.listen];
    addrs.extend(a.ec2_listen);
    let relay_addrs: Vec<SocketAddr> = a
        .relays
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    for (l, addr) in bind_in(a.netns.as_deref(), &relay_addrs)?
        .into_iter()
        .zip(&relay_addrs)
    {
        tokio::spawn(relay_to(
            tokio::net::TcpListener::from_std(l)?,
            addr.to_string(),
        ));
    }
    let mut bound = bind_in(a.netns.as_deref(), &addrs)?.into_iter();
    let listener = tokio::net::TcpListener::from_std(bound.next().context("listener")?)?;
    let addr = listener.local_addr()?;
    let mut ready = format!("imds={}\n", addr.port());
    if let Some(l) = bound.next() {
        let relay = tokio::net::TcpListener::from_std(l)?;
        ready.push_str(&format!("ec2={}\n", relay.local_addr()?.port()));
        let target = a
            .shim
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        tokio::spawn(relay_to(relay, target));
    }
    if let Some(f) = &a.ready_file {
        let tmp = format!("{f}.tmp");
        std::fs::write(&tmp, &ready)?;
        std::fs::rename(&tmp, f)?;
    }
    println!("fake-imds listening on http://{addr}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let st = st.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn get(view: &Value, path: &str) -> (StatusCode, String) {
        let r = render(view, path);
        let status = r.status();
        let body = body_text(r);
        (status, body)
    }

    fn body_text(r: Response<Full<Bytes>>) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let bytes = rt
            .block_on(r.into_body().collect())
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn iface(mac: &str, v6: bool) -> Value {
        let list = |v: &[&str]| if v6 { json!(v) } else { json!([]) };
        json!({
            "mac": mac, "device_number": 0, "network_card": 0, "interface_id": "eni-1",
            "subnet_id": "subnet-1", "subnet_cidr": "10.0.1.0/24", "vpc_id": "vpc-1",
            "vpc_cidrs": ["10.0.0.0/16"], "security_group_ids": ["sg-1"], "interface_type": "interface",
            "local_ipv4s": ["10.0.1.4"], "ipv4_prefixes": [],
            "ipv6s": list(&["2600:1f14:0:100::4", "2600:1f14:0:100::5"]),
            "ipv6_prefixes": list(&["2600:1f14:0:100:1::/80"]),
            "subnet_ipv6_cidrs": list(&["2600:1f14:0:100::/64"]),
            "vpc_ipv6_cidrs": list(&["2600:1f14:0:100::/56"]),
        })
    }

    #[test]
    fn ipv6_keys_as_real_imds_serves_them() {
        let view = json!({"instance_id": "i-1", "ipv6": "2600:1f14:0:100::4",
                          "interfaces": [iface("02:00:00:00:00:01", true)]});
        let mac = "network/interfaces/macs/02:00:00:00:00:01";
        assert_eq!(
            get(&view, "ipv6"),
            (StatusCode::OK, "2600:1f14:0:100::4".into())
        );
        assert_eq!(
            get(&view, &format!("{mac}/ipv6s")),
            (
                StatusCode::OK,
                "2600:1f14:0:100::4\n2600:1f14:0:100::5".into()
            )
        );
        for (key, want) in [
            ("ipv6-prefix", "2600:1f14:0:100:1::/80"),
            ("subnet-ipv6-cidr-blocks", "2600:1f14:0:100::/64"),
            ("vpc-ipv6-cidr-blocks", "2600:1f14:0:100::/56"),
        ] {
            assert_eq!(
                get(&view, &format!("{mac}/{key}")),
                (StatusCode::OK, want.into())
            );
        }
        let (_, listing) = get(&view, mac);
        let keys: Vec<&str> = listing.lines().collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(keys, sorted);
        for key in [
            "ipv6-prefix",
            "ipv6s",
            "subnet-ipv6-cidr-blocks",
            "vpc-ipv6-cidr-blocks",
            "local-ipv4s",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        assert!(!keys.contains(&"ipv4-prefix"), "{keys:?}");
    }

    #[test]
    fn ipv4_only_leaves_the_ipv6_keys_out() {
        let view = json!({"instance_id": "i-1", "ipv6": null,
                          "interfaces": [iface("02:00:00:00:00:01", false)]});
        let mac = "network/interfaces/macs/02:00:00:00:00:01";
        assert_eq!(get(&view, "ipv6").0, StatusCode::NOT_FOUND);
        for key in [
            "ipv6s",
            "ipv6-prefix",
            "subnet-ipv6-cidr-blocks",
            "vpc-ipv6-cidr-blocks",
            "ipv4-prefix",
        ] {
            assert_eq!(
                get(&view, &format!("{mac}/{key}")).0,
                StatusCode::NOT_FOUND,
                "{key}"
            );
        }
        let (status, listing) = get(&view, mac);
        assert_eq!(status, StatusCode::OK);
        assert!(!listing.contains("ipv6"), "{listing}");
        assert_eq!(
            get(&view, &format!("{mac}/local-ipv4s")),
            (StatusCode::OK, "10.0.1.4".into())
        );
    }
}
