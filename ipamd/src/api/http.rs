//! The two HTTP endpoints upstream serves: Prometheus metrics (`:61678/metrics`) and
//! introspection (`127.0.0.1:61679/v1/...`, or a unix socket). Plain hyper: a handful of GET
//! routes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tracing::{info, warn};

use crate::config::Bind;
use crate::pool::datastore::Datastore;
use crate::pool::Pool;

/// What introspection shows of the settings and the ENIConfig keys, fixed at start.
#[derive(Debug, Clone, Default)]
pub struct Introspect {
    /// `/v1/ipamd-env-settings`: upstream's keys, typed and defaulted.
    pub ipamd_env: Value,
    /// `/v1/networkutils-env-settings`: upstream's keys, typed and defaulted.
    pub network_env: Value,
    /// `/v1/settings` (ours): every variable ipamd reads, as it took it, and what it said.
    pub settings: Value,
    /// ENI_CONFIG_LABEL_DEF / ENI_CONFIG_ANNOTATION_DEF, for `/v1/eni-configs`.
    pub eniconfig_keys: crate::k8s::eniconfig::Keys,
}

/// Upstream's introspection paths, listed at `/` (and, as upstream's catch-all, any unknown
/// path); ours work too but are not listed, so the answer is upstream's.
const COMMANDS: [&str; 4] = [
    "/v1/enis",
    "/v1/eni-configs",
    "/v1/networkutils-env-settings",
    "/v1/ipamd-env-settings",
];

/// Go's time.Time as JSON (RFC 3339, the zero time for "never").
fn go_time(t: Option<SystemTime>) -> String {
    match t {
        Some(t) => humantime::format_rfc3339_nanos(t).to_string(),
        None => "0001-01-01T00:00:00Z".into(),
    }
}

/// Go's net.IPNet as JSON: IP as text, Mask as base64 of its bytes.
fn ipnet(ip: std::net::IpAddr, len: u32) -> Value {
    use base64::Engine;
    let mask: Vec<u8> = match ip {
        std::net::IpAddr::V4(_) => u32::MAX
            .checked_shl(32 - len)
            .unwrap_or(0)
            .to_be_bytes()
            .to_vec(),
        std::net::IpAddr::V6(_) => u128::MAX
            .checked_shl(128 - len)
            .unwrap_or(0)
            .to_be_bytes()
            .to_vec(),
    };
    let s = base64::engine::general_purpose::STANDARD.encode(mask);
    json!({"IP": ip.to_string(), "Mask": s})
}

/// Upstream's /v1/enis: per network card, ENIInfos with every address; ContainerID and IfName
/// scrubbed (they are what a forged DelNetwork would need).
pub fn enis_json(ds: &Datastore) -> Value {
    let allocs: BTreeMap<std::net::IpAddr, &crate::pool::datastore::Allocation> =
        ds.allocations().map(|a| (a.ip, a)).collect();
    let cooling: BTreeMap<std::net::IpAddr, SystemTime> = ds.cooldowns().collect();
    let addr = |ip: std::net::IpAddr| -> Value {
        let a = allocs.get(&ip);
        json!({
            "Address": ip.to_string(),
            "IPAMKey": {
                "networkName": a.map(|a| a.key.network_name.clone()).unwrap_or_default(),
                "containerID": "",
                "ifName": "",
            },
            "IPAMMetadata": match a {
                Some(a) => json!({"k8sPodNamespace": a.pod.namespace, "k8sPodName": a.pod.name, "interfacesCount": 1}),
                None => json!({}),
            },
            "AssignedTime": go_time(a.map(|a| a.allocated_at)),
            "UnassignedTime": go_time(cooling.get(&ip).copied()),
        })
    };
    let mut enis = Map::new();
    let st = ds.stats();
    for e in ds.enis() {
        let mut cidrs = Map::new();
        for ip in &e.ips {
            cidrs.insert(
                format!("{ip}/32"),
                json!({
                    "Cidr": ipnet((*ip).into(), 32),
                    "IPAddresses": {ip.to_string(): addr((*ip).into())},
                    "IsPrefix": false,
                    "AddressFamily": "4",
                }),
            );
        }
        for p in &e.prefixes {
            let mut addrs = Map::new();
            for ip in p.addresses() {
                addrs.insert(ip.to_string(), addr(ip.into()));
            }
            cidrs.insert(
                format!("{}/28", p.0),
                json!({"Cidr": ipnet(p.0.into(), 28), "IPAddresses": addrs, "IsPrefix": true, "AddressFamily": "4"}),
            );
        }
        // An /80's addresses are listed once handed out (assigned or cooling), as upstream's.
        let mut v6 = Map::new();
        for p in &e.ipv6_prefixes {
            let mut addrs = Map::new();
            for ip in ds.handed_out_in(&e.id, p) {
                addrs.insert(ip.to_string(), addr(ip.into()));
            }
            v6.insert(
                p.to_string(),
                json!({"Cidr": ipnet(p.network().into(), u32::from(p.prefix_len())), "IPAddresses": addrs, "IsPrefix": true, "AddressFamily": "6"}),
            );
        }
        enis.insert(
            e.id.clone(),
            json!({
                "ID": e.id,
                "IsPrimary": e.primary,
                // Trunk and EFA ENIs are never in the pool (left alone), so never these.
                "IsTrunk": false,
                "IsEFA": false,
                "DeviceNumber": e.device_number,
                "AvailableIPv4Cidrs": cidrs,
                "IPv6Cidrs": v6,
                "IsExcludedForPodIPs": false,
                "RouteTableID": e.route_table(),
                "SubnetID": e.subnet_id,
            }),
        );
    }
    json!({"0": {"TotalIPs": st.total, "AssignedIPs": st.assigned, "ENIs": enis}})
}

/// Ours: one line per pod with an address (no container ids).
pub fn pods_json(ds: &Datastore) -> Value {
    let mut v: Vec<Value> = ds
        .allocations()
        .map(|a| {
            json!({
                "namespace": a.pod.namespace,
                "name": a.pod.name,
                "ip": a.ip.to_string(),
                "eni": a.eni_id,
                "deviceNumber": a.device_number,
                "routeTableID": a.route_table,
                "assignedTime": go_time(Some(a.allocated_at)),
            })
        })
        .collect();
    v.sort_by(|a, b| a["ip"].as_str().cmp(&b["ip"].as_str()));
    Value::Array(v)
}

/// Mirror the pool into the gauges, at scrape time.
async fn refresh_gauges(s: &Pool) {
    s.inspect(refresh_gauges_from).await
}

fn refresh_gauges_from(ds: &Datastore) {
    let m = crate::metrics::global();
    let st = ds.stats();
    m.eni_allocated.set(ds.enis().count() as i64);
    m.total_ip_addresses.set(st.total as i64);
    m.assigned_ip_addresses.set(st.assigned as i64);
    m.cooldown_ip_addresses.set(st.cooldown as i64);
    m.total_ipv4_prefixes
        .set(ds.enis().map(|e| e.prefixes.len()).sum::<usize>() as i64);
    m.assigned_ip_per_eni.reset();
    m.assigned_ip_per_cidr.reset();
    for e in ds.enis() {
        let es = ds.eni_stats(&e.id).unwrap_or_default();
        m.assigned_ip_per_eni
            .with_label_values(&[&e.id])
            .set(es.assigned as i64);
    }
    for a in ds.allocations() {
        let cidr = ds
            .eni(&a.eni_id)
            .and_then(|e| {
                e.prefixes
                    .iter()
                    .find(|p| p.addresses().any(|x| std::net::IpAddr::V4(x) == a.ip))
                    .map(|p| format!("{}/28", p.0))
                    .or_else(|| {
                        let std::net::IpAddr::V6(v6) = a.ip else {
                            return None;
                        };
                        e.ipv6_prefixes
                            .iter()
                            .find(|p| p.contains(&v6))
                            .map(|p| p.to_string())
                    })
            })
            .unwrap_or_else(|| format!("{}/{}", a.ip, if a.ip.is_ipv4() { 32 } else { 128 }));
        m.assigned_ip_per_cidr.with_label_values(&[&cidr]).inc();
    }
}

fn reply(status: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn route(
    s: Arc<Pool>,
    metrics: bool,
    info: Arc<Introspect>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    const JSON: &str = "application/json";
    if metrics {
        return Ok(match path {
            "/metrics" => {
                refresh_gauges(&s).await;
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    crate::metrics::global().render(),
                )
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "404 page not found\n".into(),
            ),
        });
    }
    Ok(match path {
        "/v1/enis" => reply(StatusCode::OK, JSON, s.inspect(enis_json).await.to_string()),
        "/v1/pods" => reply(StatusCode::OK, JSON, s.inspect(pods_json).await.to_string()),
        "/v1/pool" => {
            let note = s.growth_note();
            let mut v = s
                .inspect(|ds| {
                    let st = ds.stats();
                    json!({"total": st.total, "assigned": st.assigned, "cooldown": st.cooldown,
                           "available": st.available, "maxPods": ds.max_pods()})
                })
                .await;
            v["growthNote"] = note.map(Value::String).unwrap_or(Value::Null);
            // The Kubernetes API's condition: readiness stays tied to addresses (an API outage
            // must not take nodes out of service), so it is said here.
            v["kubernetes"] = s
                .kube
                .get()
                .map(|k| Value::String(k.condition()))
                .unwrap_or(Value::Null);
            reply(StatusCode::OK, JSON, v.to_string())
        }
        "/v1/ipamd-env-settings" => reply(StatusCode::OK, JSON, info.ipamd_env.to_string()),
        "/v1/networkutils-env-settings" => {
            reply(StatusCode::OK, JSON, info.network_env.to_string())
        }
        "/v1/settings" => reply(StatusCode::OK, JSON, info.settings.to_string()),
        // Upstream: the node's ENIConfig name as a JSON string, custom networking or not; it
        // needs the node from the Kubernetes API.
        "/v1/eni-configs" => match eni_config_name(&s, &info.eniconfig_keys) {
            Some(name) => reply(StatusCode::OK, JSON, Value::String(name).to_string()),
            None => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "the node is not known from the Kubernetes API\n".into(),
            ),
        },
        "/v1/eni-config-status" => match eni_configs_json(&s) {
            Some(v) => reply(StatusCode::OK, JSON, v.to_string()),
            None => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "custom networking is off (AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=false)\n".into(),
            ),
        },
        _ => reply(
            StatusCode::OK,
            JSON,
            json!({ "AvailableCommands": COMMANDS }).to_string(),
        ),
    })
}

fn eni_config_name(s: &Pool, keys: &crate::k8s::eniconfig::Keys) -> Option<String> {
    let view = s.kube.get()?.view.borrow().clone();
    Some(crate::k8s::eniconfig::name_for(view.node.as_ref()?, keys).0)
}

/// Ours, `/v1/eni-config-status`: the node's ENIConfig as custom networking sees it, with
/// upstream's ENIConfigInfo keys (every ENIConfig, the node's, the annotation and label keys),
/// whether the node's exists, why not, and the Kubernetes API's condition.
fn eni_configs_json(s: &Pool) -> Option<Value> {
    use crate::k8s::eniconfig::{name_for, Selection};
    let (sel, keys, view) = s.placement.get()?.eniconfig()?;
    let my = view
        .node
        .as_ref()
        .map(|n| name_for(n, &keys).0)
        .unwrap_or_default();
    let (status, reason) = match &sel {
        Selection::Found { .. } => ("found", Value::Null),
        Selection::Missing { why, .. } => ("missing", Value::String(why.clone())),
        Selection::Unknown(why) => ("unknown", Value::String(why.clone())),
    };
    Some(json!({
        "ENI": view.eniconfigs,
        "MyENI": my,
        "EniConfigAnnotationDef": keys.annotation,
        "EniConfigLabelDef": keys.label,
        "status": status,
        "reason": reason,
        "kubernetes": s.kube.get().map(|k| k.condition()).unwrap_or_default(),
    }))
}

/// Connections served at once per port. Prometheus needs one; more wait in the kernel's
/// accept queue, where they cost ipamd no descriptor.
pub const MAX_CONNECTIONS: usize = 32;
/// A client that has not sent a whole request head by then is dropped.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// No connection, busy or idle, lives longer than this: a slot always comes free again.
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30);

/// Serve until the process ends. A port already taken is logged, not fatal: pods still work.
///
/// Both ports may face every pod on the node (metrics listens on all addresses), so nothing a
/// client does may cost ipamd more than a bounded share of its descriptors or CPU: connections
/// are capped, slow and idle ones time out, and a failing accept backs off instead of spinning.
pub async fn serve(bind: Bind, shared: Arc<Pool>, metrics: bool, info: Arc<Introspect>) {
    let what = if metrics { "metrics" } else { "introspection" };
    let listener = match Listener::bind(&bind).await {
        Ok(l) => l,
        Err(e) => {
            warn!(addr = %bind, error = %e, "cannot serve {what}");
            crate::metrics::global()
                .ipamd_error_count
                .with_label_values(&[what])
                .inc();
            // Pods work without this port; the task stays (idle) so supervision sees no death.
            return std::future::pending().await;
        }
    };
    info!(addr = %bind, "serving {what}");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = std::time::Duration::from_millis(10);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok(stream) => {
                backoff = std::time::Duration::from_millis(10);
                stream
            }
            Err(e) => {
                // EMFILE and friends: retrying at once would spin a core without helping.
                warn!(addr = %bind, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed on the {what} port; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                continue;
            }
        };
        let s = shared.clone();
        let info = info.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req| route(s.clone(), metrics, info.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(permit);
        });
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix {
        listener: tokio::net::UnixListener,
        _file: SocketFile,
    },
}

/// A unix socket path this process bound: removed when the listener goes (ipamd stopping), so
/// no dead socket is left for a client to connect to and fail.
struct SocketFile(std::path::PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.0) {
            if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }
}

impl Listener {
    async fn bind(b: &Bind) -> std::io::Result<Listener> {
        match b {
            Bind::Tcp(a) => tokio::net::TcpListener::bind(a).await.map(Listener::Tcp),
            // Go's ":port": IPv6 and IPv4 on one socket; IPv4 alone where IPv6 is off.
            Bind::AnyPort(p) => {
                let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, *p));
                match tokio::net::TcpListener::bind(v6).await {
                    Ok(l) => Ok(Listener::Tcp(l)),
                    Err(_) => {
                        let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, *p));
                        tokio::net::TcpListener::bind(v4).await.map(Listener::Tcp)
                    }
                }
            }
            Bind::Unix(path) => {
                // Only a stale socket is ours to replace.
                if let Ok(m) = std::fs::symlink_metadata(path) {
                    if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) {
                        std::fs::remove_file(path)?;
                    }
                }
                let listener = tokio::net::UnixListener::bind(path)?;
                Ok(Listener::Unix {
                    listener,
                    _file: SocketFile(path.into()),
                })
            }
        }
    }

    async fn accept(&self) -> std::io::Result<Box<dyn Io>> {
        Ok(match self {
            Listener::Tcp(l) => Box::new(l.accept().await?.0),
            Listener::Unix { listener, .. } => Box::new(listener.accept().await?.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_as_go_encodes_them() {
        let ip = std::net::Ipv4Addr::new(10, 0, 1, 16);
        assert_eq!(ipnet(ip.into(), 32)["Mask"], "/////w==");
        assert_eq!(ipnet(ip.into(), 28)["Mask"], "////8A==");
        assert_eq!(ipnet(ip.into(), 24)["Mask"], "////AA==");
    }
}
