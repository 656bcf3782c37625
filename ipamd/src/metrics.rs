//! Prometheus metrics under upstream's `awscni_*` names and labels, plus what upstream lacks:
//! AddNetwork/DelNetwork latency histograms, cooldown addresses, pool short/over, throttles.
//!
//! Counters are updated where things happen; gauges that mirror the pool are refreshed from the
//! datastore at scrape time, so they are never stale. `awscni_aws_api_latency_ms` is a summary
//! without quantiles, as upstream's (the prometheus crate has no summary type: a small collector
//! here). The process collector adds upstream's `process_*` series.

use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType, Summary};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Count and sum per label values.
type SummarySeries = BTreeMap<Vec<String>, (u64, f64)>;

/// A summary with no quantiles, by labels: what upstream's `SummaryVec` without objectives
/// exposes (`_sum` and `_count` per label set).
#[derive(Clone)]
pub struct PlainSummaryVec {
    desc: Desc,
    labels: &'static [&'static str],
    series: std::sync::Arc<Mutex<SummarySeries>>,
}

impl PlainSummaryVec {
    fn new(name: &str, help: &str, labels: &'static [&'static str]) -> prometheus::Result<Self> {
        Ok(PlainSummaryVec {
            desc: Desc::new(
                name.into(),
                help.into(),
                labels.iter().map(|l| l.to_string()).collect(),
                Default::default(),
            )?,
            labels,
            series: Default::default(),
        })
    }

    pub fn observe(&self, values: &[&str], v: f64) {
        if let Ok(mut s) = self.series.lock() {
            let e = s
                .entry(values.iter().map(|x| x.to_string()).collect())
                .or_insert((0, 0.0));
            e.0 += 1;
            e.1 += v;
        }
    }
}

impl Collector for PlainSummaryVec {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(series) = self.series.lock() else {
            return Vec::new();
        };
        if series.is_empty() {
            return Vec::new();
        }
        let mut mf = MetricFamily::default();
        mf.set_name(self.desc.fq_name.clone());
        mf.set_help(self.desc.help.clone());
        mf.set_field_type(MetricType::SUMMARY);
        for (values, (count, sum)) in series.iter() {
            let mut pairs = Vec::new();
            for (n, v) in self.labels.iter().zip(values) {
                let mut p = LabelPair::default();
                p.set_name(n.to_string());
                p.set_value(v.clone());
                pairs.push(p);
            }
            let mut sm = Summary::default();
            sm.set_sample_count(*count);
            sm.set_sample_sum(*sum);
            let mut m = Metric::from_label(pairs);
            m.set_summary(sm);
            mf.mut_metric().push(m);
        }
        vec![mf]
    }
}

/// `awscni_ipamd_action_inprogress{fn}` held up while an action runs, as upstream's
/// increment and deferred decrement.
pub struct InProgress(&'static str);

impl InProgress {
    pub fn start(action: &'static str) -> InProgress {
        global()
            .ipamd_action_inprogress
            .with_label_values(&[action])
            .inc();
        InProgress(action)
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        global()
            .ipamd_action_inprogress
            .with_label_values(&[self.0])
            .dec();
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub ipamd_error_count: IntCounterVec,
    pub ipamd_action_inprogress: IntGaugeVec,
    pub eni_max: IntGauge,
    pub ip_max: IntGauge,
    pub reconcile_count: IntCounterVec,
    pub add_ip_req_count: IntCounter,
    pub del_ip_req_count: IntCounterVec,
    pub aws_api_latency_ms: PlainSummaryVec,
    pub aws_api_error_count: IntCounterVec,
    pub ec2api_req_count: IntCounterVec,
    pub ec2api_error_count: IntCounterVec,
    pub eni_allocated: IntGauge,
    pub total_ip_addresses: IntGauge,
    pub assigned_ip_addresses: IntGauge,
    pub force_removed_enis: IntCounter,
    pub force_removed_ips: IntCounter,
    pub total_ipv4_prefixes: IntGauge,
    pub assigned_ip_per_cidr: IntGaugeVec,
    pub assigned_ip_per_eni: IntGaugeVec,
    pub no_available_ip_addresses: IntCounter,
    pub build_info: IntGaugeVec,
    pub aws_utils_error_count: IntCounterVec,
    pub pod_eni_error_count: IntCounterVec,
    pub ipamd_startup_duration_seconds: HistogramVec,
    pub ipamd_node_initialization_duration_seconds: HistogramVec,
    pub connmark_backend: IntGaugeVec,
    pub connmark_reconcile_total: IntCounterVec,
    // Ours.
    pub add_network_seconds: Histogram,
    pub del_network_seconds: Histogram,
    pub cooldown_ip_addresses: IntGauge,
    pub pool_short: IntGauge,
    pub pool_over: IntGauge,
    pub ec2api_throttle_count: IntCounterVec,
    pub ec2_no_progress_count: IntCounter,
    pub ec2_no_progress_streak: IntGauge,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        // Only reachable with a malformed metric definition, which the unit test catches.
        Err(e) => panic!("metric definition: {e}"),
    }
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        let cv = |n: &str, h: &str, l: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(n, h), l));
            must(r.register(Box::new(c.clone())));
            c
        };
        let c = |n: &str, h: &str| {
            let c = must(IntCounter::new(n, h));
            must(r.register(Box::new(c.clone())));
            c
        };
        let g = |n: &str, h: &str| {
            let g = must(IntGauge::new(n, h));
            must(r.register(Box::new(g.clone())));
            g
        };
        let gv = |n: &str, h: &str, l: &[&str]| {
            let g = must(IntGaugeVec::new(Opts::new(n, h), l));
            must(r.register(Box::new(g.clone())));
            g
        };
        let secs = |n: &str, h: &str| {
            let b = vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let x = must(Histogram::with_opts(HistogramOpts::new(n, h).buckets(b)));
            must(r.register(Box::new(x.clone())));
            x
        };
        let latency = must(PlainSummaryVec::new(
            "awscni_aws_api_latency_ms",
            "AWS API call latency in ms",
            &["api", "error", "status"],
        ));
        must(r.register(Box::new(latency.clone())));
        // Default buckets, as upstream's.
        let hv = |n: &str, h: &str, l: &[&str]| {
            let x = must(HistogramVec::new(HistogramOpts::new(n, h), l));
            must(r.register(Box::new(x.clone())));
            x
        };
        #[cfg(target_os = "linux")]
        must(r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )));
        let m = Metrics {
            ipamd_error_count: cv("awscni_ipamd_error_count", "The number of errors encountered in ipamd", &["fn"]),
            ipamd_action_inprogress: gv("awscni_ipamd_action_inprogress", "The number of ipamd actions in progress", &["fn"]),
            eni_max: g("awscni_eni_max", "The maximum number of ENIs that can be attached to the instance, accounting for unmanaged ENIs"),
            ip_max: g("awscni_ip_max", "The maximum number of IP addresses that can be allocated to the instance"),
            reconcile_count: cv("awscni_reconcile_count", "The number of times ipamd reconciles on ENIs and IP/Prefix addresses", &["fn"]),
            add_ip_req_count: c("awscni_add_ip_req_count", "The number of add IP address requests"),
            del_ip_req_count: cv("awscni_del_ip_req_count", "The number of delete IP address requests", &["reason"]),
            aws_api_latency_ms: latency,
            aws_api_error_count: cv("awscni_aws_api_error_count", "The number of times AWS API returns an error", &["api", "error"]),
            ec2api_req_count: cv("awscni_ec2api_req_count", "The number of requests made to EC2 APIs by CNI", &["fn"]),
            ec2api_error_count: cv("awscni_ec2api_error_count", "The number of failed EC2 APIs requests", &["fn"]),
            eni_allocated: g("awscni_eni_allocated", "The number of ENIs allocated"),
            total_ip_addresses: g("awscni_total_ip_addresses", "The total number of IP addresses"),
            assigned_ip_addresses: g("awscni_assigned_ip_addresses", "The number of IP addresses assigned to pods"),
            force_removed_enis: c("awscni_force_removed_enis", "The number of ENIs force removed while they had assigned pods"),
            force_removed_ips: c("awscni_force_removed_ips", "The number of IPs force removed while they had assigned pods"),
            total_ipv4_prefixes: g("awscni_total_ipv4_prefixes", "The total number of IPv4 prefixes"),
            assigned_ip_per_cidr: gv("awscni_assigned_ip_per_cidr", "The total number of IP addresses assigned per cidr", &["cidr"]),
            assigned_ip_per_eni: gv("awscni_assigned_ip_per_eni", "The number of allocated ips partitioned by eni", &["eni"]),
            no_available_ip_addresses: c("awscni_no_available_ip_addresses", "The number of pod IP assignments that fail due to no available IP addresses"),
            build_info: gv("awscni_build_info", "Version information of this build", &["version", "goversion"]),
            aws_utils_error_count: cv("awscni_aws_utils_error_count", "The number of errors not handled in awsutils library", &["fn", "error"]),
            pod_eni_error_count: cv("awscni_pod_eni_error_count", "The number of errors encountered for pod ENIs", &["fn"]),
            ipamd_startup_duration_seconds: hv("awscni_ipamd_startup_duration_seconds", "Time taken for IPAMD to complete startup", &["success", "with_api_server", "failure_reason"]),
            ipamd_node_initialization_duration_seconds: hv("awscni_ipamd_node_initialization_duration_seconds", "Time taken to initialize the node", &["success"]),
            connmark_backend: gv("awscni_connmark_backend", "The connmark backend in use (1 = active)", &["backend"]),
            connmark_reconcile_total: cv("awscni_connmark_reconcile_total", "The number of connmark rule reconciliations", &["result"]),
            add_network_seconds: secs("awscni_add_network_seconds", "AddNetwork handling time in ipamd, seconds"),
            del_network_seconds: secs("awscni_del_network_seconds", "DelNetwork handling time in ipamd, seconds"),
            cooldown_ip_addresses: g("awscni_cooldown_ip_addresses", "Addresses released by pods and not yet reusable (IP_COOLDOWN_PERIOD)"),
            pool_short: g("awscni_pool_short", "Addresses (or prefixes) the pool is short of its warm targets"),
            pool_over: g("awscni_pool_over", "Addresses (or prefixes) the pool holds beyond its warm targets"),
            ec2api_throttle_count: cv("awscni_ec2api_throttle_count", "EC2 calls answered with a throttling error", &["fn"]),
            ec2_no_progress_count: c("awscni_ec2_no_progress_count", "Pool-growing EC2 calls that were accepted but did not grow the pool (reply and describe)"),
            ec2_no_progress_streak: g("awscni_ec2_no_progress_streak", "Such calls in a row right now; growth backs off exponentially while above 0"),
            registry: r,
        };
        // Upstream's labels; "goversion" names the toolchain, as Go's runtime.Version() does.
        m.build_info
            .with_label_values(&[
                concat!("v", env!("CARGO_PKG_VERSION")),
                concat!("rust-", env!("RUSTC_SEMVER")),
            ])
            .set(1);
        // Pre-created, as upstream's.
        for result in ["success", "error"] {
            m.connmark_reconcile_total.with_label_values(&[result]);
        }
        m
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// One EC2 call's outcome.
    pub fn ec2_call(&self, api: &str, ms: f64, error: Option<(&str, bool)>) {
        self.ec2api_req_count.with_label_values(&[api]).inc();
        // Upstream's labels: error "true"/"false"; status "200", else the AWS error code (empty
        // when the error has none, e.g. a transport failure).
        let (failed, status) = match error {
            None => ("false", "200"),
            Some((code, throttled)) => {
                self.ec2api_error_count.with_label_values(&[api]).inc();
                self.aws_api_error_count
                    .with_label_values(&[api, code])
                    .inc();
                if throttled {
                    self.ec2api_throttle_count.with_label_values(&[api]).inc();
                }
                ("true", if code == "transport" { "" } else { code })
            }
        };
        self.aws_api_latency_ms.observe(&[api, failed, status], ms);
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics (one registry per process, as Prometheus clients do).
pub fn global() -> &'static Metrics {
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_names_render() {
        let m = global();
        m.add_ip_req_count.inc();
        m.ec2_call(
            "AssignPrivateIpAddresses",
            12.0,
            Some(("RequestLimitExceeded", true)),
        );
        let text = m.render();
        for name in [
            "awscni_add_ip_req_count 1",
            "awscni_ec2api_req_count{fn=\"AssignPrivateIpAddresses\"} 1",
            "awscni_aws_api_error_count{api=\"AssignPrivateIpAddresses\",error=\"RequestLimitExceeded\"} 1",
            "awscni_ec2api_throttle_count{fn=\"AssignPrivateIpAddresses\"} 1",
            "awscni_build_info{goversion=\"rust-",
            "# TYPE awscni_eni_max gauge",
            "# TYPE awscni_aws_api_latency_ms summary",
            "awscni_aws_api_latency_ms_count{api=\"AssignPrivateIpAddresses\",error=\"true\",status=\"RequestLimitExceeded\"} 1",
            "awscni_aws_api_latency_ms_sum{api=\"AssignPrivateIpAddresses\",error=\"true\",status=\"RequestLimitExceeded\"} 12",
            "awscni_connmark_reconcile_total{result=\"success\"} 0",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }
}
