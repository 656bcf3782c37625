//! The two HTTP endpoints upstream serves: Prometheus metrics (`:61678/metrics`) and
//! introspection (`127.0.0.1:61679/v1/...`). Plain hyper: a handful of GET routes.

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

use crate::pool::datastore::Datastore;
use crate::pool::Pool;

/// Variables shown by /v1/ipamd-env-settings (upstream's GetConfigForDebug, and ours).
pub const IPAMD_ENV: &[&str] = &[
    "AWS_VPC_K8S_CNI_LOGLEVEL",
    "AWS_VPC_K8S_CNI_LOG_FILE",
    "AWS_VPC_K8S_CNI_BACKING_STORE",
    "WARM_ENI_TARGET",
    "WARM_IP_TARGET",
    "MINIMUM_IP_TARGET",
    "WARM_PREFIX_TARGET",
    "ENABLE_PREFIX_DELEGATION",
    "MAX_ENI",
    "IP_COOLDOWN_PERIOD",
    "DISABLE_LEAKED_ENI_CLEANUP",
    "ADDITIONAL_ENI_TAGS",
    "CLUSTER_NAME",
    "AWS_EC2_ENDPOINT",
    "AWS_VPC_K8S_CNI_VETHPREFIX",
    "INTROSPECTION_BIND_ADDRESS",
    "DISABLE_INTROSPECTION",
    "DISABLE_METRICS",
    "IPAMD_SOCKET_PATH",
    "IPAMD_POOL_CHECK_INTERVAL",
    "IPAMD_DECREASE_INTERVAL",
    "IPAMD_RECONCILE_INTERVAL",
    "IPAMD_MIN_ENI_AGE",
    "IPAMD_LEAKED_ENI_CLEANUP_INTERVAL",
    "IPAMD_SUBNET_FULL_BACKOFF",
    "IPAMD_ALLOCATION_GRACE",
    "IPAMD_GROWTH_BACKOFF_MAX",
    "IPAMD_EC2_BURST",
    "IPAMD_EC2_RATE",
    "AWS_CNI_STATE_DIR",
];

/// Variables shown by /v1/networkutils-env-settings.
pub const NETWORK_ENV: &[&str] = &[
    "AWS_VPC_K8S_CNI_EXTERNALSNAT",
    "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
    "AWS_EXTERNAL_SERVICE_CIDRS",
    "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
    "AWS_VPC_K8S_CNI_CONNMARK",
    "AWS_VPC_CNI_NODE_PORT_SUPPORT",
    "AWS_VPC_ENI_MTU",
    "AWS_VPC_K8S_CNI_VETHPREFIX",
];

fn env_json(names: &[&str]) -> Value {
    let mut m = Map::new();
    for n in names {
        m.insert(
            n.to_string(),
            Value::String(std::env::var(n).unwrap_or_default()),
        );
    }
    Value::Object(m)
}

/// Go's time.Time as JSON (RFC 3339, the zero time for "never").
fn go_time(t: Option<SystemTime>) -> String {
    match t {
        Some(t) => humantime::format_rfc3339_nanos(t).to_string(),
        None => "0001-01-01T00:00:00Z".into(),
    }
}

/// Go's net.IPNet as JSON: IP as text, Mask as base64 of its bytes.
fn ipnet(ip: std::net::Ipv4Addr, len: u32) -> Value {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    use base64::Engine;
    let s = base64::engine::general_purpose::STANDARD.encode(mask.to_be_bytes());
    json!({"IP": ip.to_string(), "Mask": s})
}

/// Upstream's /v1/enis: per network card, ENIInfos with every address; ContainerID and IfName
/// scrubbed (they are what a forged DelNetwork would need).
pub fn enis_json(ds: &Datastore) -> Value {
    let allocs: BTreeMap<std::net::Ipv4Addr, &crate::pool::datastore::Allocation> =
        ds.allocations().map(|a| (a.ip, a)).collect();
    let cooling: BTreeMap<std::net::Ipv4Addr, SystemTime> = ds.cooldowns().collect();
    let addr = |ip: std::net::Ipv4Addr| -> Value {
        let a = allocs.get(&ip);
        json!({
            "Address": ip.to_string(),
            "IPAMKey": {
                "networkName": a.map(|a| a.key.network_name.clone()).unwrap_or_default(),
                "containerID": "",
                "ifName": "",
            },
            "IPAMMetadata": match a {
                Some(a) => json!({"k8sPodNamespace": a.pod.namespace, "k8sPodName": a.pod.name}),
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
                    "Cidr": ipnet(*ip, 32),
                    "IPAddresses": {ip.to_string(): addr(*ip)},
                    "IsPrefix": false,
                    "AddressFamily": "4",
                }),
            );
        }
        for p in &e.prefixes {
            let mut addrs = Map::new();
            for ip in p.addresses() {
                addrs.insert(ip.to_string(), addr(ip));
            }
            cidrs.insert(
                format!("{}/28", p.0),
                json!({"Cidr": ipnet(p.0, 28), "IPAddresses": addrs, "IsPrefix": true, "AddressFamily": "4"}),
            );
        }
        enis.insert(
            e.id.clone(),
            json!({
                "ID": e.id,
                "IsPrimary": e.primary,
                "IsTrunk": false,
                "IsEFA": false,
                "DeviceNumber": e.device_number,
                "AvailableIPv4Cidrs": cidrs,
                "IPv6Cidrs": {},
                "IsExcludedForPodIPs": false,
                "RouteTableID": e.route_table(),
                "SubnetID": "",
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
                    .find(|p| p.addresses().any(|x| x == a.ip))
                    .map(|p| format!("{}/28", p.0))
            })
            .unwrap_or_else(|| format!("{}/32", a.ip));
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
        "/v1/ipamd-env-settings" => reply(StatusCode::OK, JSON, env_json(IPAMD_ENV).to_string()),
        "/v1/networkutils-env-settings" => {
            reply(StatusCode::OK, JSON, env_json(NETWORK_ENV).to_string())
        }
        "/v1/eni-configs" => match eni_configs_json(&s) {
            Some(v) => reply(StatusCode::OK, JSON, v.to_string()),
            None => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "custom networking is off (AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=false)\n".into(),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "404 page not found\n".into(),
        ),
    })
}

/// The node's ENIConfig as custom networking sees it: upstream's ENIConfigInfo keys (every
/// ENIConfig, the node's, the annotation and label keys), and ours: whether the node's exists,
/// why not, and the Kubernetes API's condition.
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
pub async fn serve(addr: SocketAddr, shared: Arc<Pool>, metrics: bool) {
    let what = if metrics { "metrics" } else { "introspection" };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "cannot serve {what}");
            crate::metrics::global()
                .ipamd_error_count
                .with_label_values(&[what])
                .inc();
            // Pods work without this port; the task stays (idle) so supervision sees no death.
            return std::future::pending().await;
        }
    };
    info!(%addr, "serving {what}");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = std::time::Duration::from_millis(10);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = std::time::Duration::from_millis(10);
                stream
            }
            Err(e) => {
                // EMFILE and friends: retrying at once would spin a core without helping.
                warn!(%addr, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed on the {what} port; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                continue;
            }
        };
        let s = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| route(s.clone(), metrics, req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_as_go_encodes_them() {
        let ip = std::net::Ipv4Addr::new(10, 0, 1, 16);
        assert_eq!(ipnet(ip, 32)["Mask"], "/////w==");
        assert_eq!(ipnet(ip, 28)["Mask"], "////8A==");
        assert_eq!(ipnet(ip, 24)["Mask"], "////AA==");
    }
}
