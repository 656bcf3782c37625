//! `grpc-health-probe`, as upstream's aws-node manifest runs it (`/app/grpc-health-probe
//! -addr=unix:///var/run/aws-node/ipamd.sock -connect-timeout=5s -rpc-timeout=5s`): the same
//! flags in Go's flag syntax, the same exit codes. The image links the name to `aws-vpc-cni`,
//! which dispatches here on its program name, so a DaemonSet that only swaps images keeps its
//! probes.

use std::path::PathBuf;
use std::time::Duration;

/// Exit codes, as upstream's probe: arguments, connection, RPC, not SERVING.
pub const EXIT_ARGS: u8 = 1;
pub const EXIT_CONNECT: u8 = 2;
pub const EXIT_RPC: u8 = 3;
pub const EXIT_UNHEALTHY: u8 = 4;

#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Unix(PathBuf),
    /// host:port over TCP.
    Tcp(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub target: Target,
    pub service: String,
    pub user_agent: String,
    pub connect_timeout: Duration,
    pub rpc_timeout: Duration,
    pub verbose: bool,
}

/// gRPC's target forms for a unix socket (`unix:///abs`, `unix:/abs`, `unix:rel`), else TCP.
fn target(addr: &str) -> Target {
    match addr.strip_prefix("unix:") {
        Some(rest) => {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            Target::Unix(PathBuf::from(path))
        }
        None => Target::Tcp(addr.to_string()),
    }
}

/// A Go duration ("5s", "1.5s", "500ms", "1m30s", "2h"): Go's own syntax rather than a
/// crate's, since the manifest's values are Go's and fractions must work.
pub fn go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Go's flag rules: `-name=value`, `--name=value`, `-name value`; a boolean takes no value
/// (or `=true`/`=false`); parsing stops at `--` or the first non-flag.
pub fn parse(args: &[String]) -> Result<Options, String> {
    let mut addr = String::new();
    let mut o = Options {
        target: Target::Tcp(String::new()),
        service: String::new(),
        user_agent: "grpc-health-probe".into(),
        connect_timeout: Duration::from_secs(1),
        rpc_timeout: Duration::from_secs(1),
        verbose: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" || !a.starts_with('-') || a == "-" {
            break;
        }
        let flag = a.trim_start_matches('-');
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        if name == "v" {
            o.verbose = match inline.as_deref() {
                None | Some("1" | "t" | "T" | "true" | "TRUE" | "True") => true,
                Some("0" | "f" | "F" | "false" | "FALSE" | "False") => false,
                Some(v) => return Err(format!("invalid boolean value {v:?} for -v")),
            };
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| format!("flag needs an argument: -{name}"))?,
        };
        let duration =
            |v: &str| go_duration(v).ok_or_else(|| format!("invalid value {v:?} for flag -{name}"));
        match name {
            "addr" => addr = value,
            "service" => o.service = value,
            "user-agent" => o.user_agent = value,
            "connect-timeout" => o.connect_timeout = duration(&value)?,
            "rpc-timeout" => o.rpc_timeout = duration(&value)?,
            _ => return Err(format!("flag provided but not defined: -{name}")),
        }
    }
    if addr.is_empty() {
        return Err("--addr not specified".into());
    }
    if o.connect_timeout.is_zero() {
        return Err("--connect-timeout must be greater than zero".into());
    }
    if o.rpc_timeout.is_zero() {
        return Err("--rpc-timeout must be greater than zero".into());
    }
    o.target = target(&addr);
    Ok(o)
}

async fn tcp_channel(hp: &str, o: &Options) -> Result<tonic::transport::Channel, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{hp}"))
        .and_then(|e| e.user_agent(o.user_agent.clone()))
        .map_err(|e| e.to_string())?
        .connect_timeout(o.connect_timeout)
        .timeout(o.rpc_timeout);
    match tokio::time::timeout(o.connect_timeout, endpoint.connect()).await {
        Ok(r) => r.map_err(|e| cni_common::grpc::source_chain(&e)),
        Err(_) => Err(format!("no connection within {:?}", o.connect_timeout)),
    }
}

/// Run one check; the exit code and the line to print.
pub async fn check(o: &Options) -> (u8, String) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let channel = match &o.target {
        Target::Unix(p) => cni_common::grpc::connect(p, o.connect_timeout, o.rpc_timeout)
            .await
            .map_err(|e| e.to_string()),
        Target::Tcp(hp) => tcp_channel(hp, o).await,
    };
    let channel = match channel {
        Ok(c) => c,
        Err(e) => {
            return (
                EXIT_CONNECT,
                format!("error: failed to connect service at {:?}: {e}", o.target),
            )
        }
    };
    let req = tonic_health::pb::HealthCheckRequest {
        service: o.service.clone(),
    };
    match HealthClient::new(channel).check(req).await {
        Err(s) if s.code() == tonic::Code::Unimplemented => (
            EXIT_RPC,
            "error: this server does not implement the grpc health protocol (grpc.health.v1.Health)"
                .into(),
        ),
        Err(s) => (EXIT_RPC, format!("error: health rpc failed: {s}")),
        Ok(r) => match r.into_inner().status() {
            ServingStatus::Serving => (0, "status: SERVING".into()),
            other => (
                EXIT_UNHEALTHY,
                format!("service unhealthy (responded with {:?})", other.as_str_name()),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn upstream_manifest_flags() {
        let o = parse(&args(&[
            "-addr=unix:///var/run/aws-node/ipamd.sock",
            "-connect-timeout=5s",
            "-rpc-timeout=5s",
        ]))
        .unwrap();
        assert_eq!(
            o.target,
            Target::Unix("/var/run/aws-node/ipamd.sock".into())
        );
        assert_eq!(o.connect_timeout, Duration::from_secs(5));
        assert_eq!(o.service, "");
        let o = parse(&args(&[
            "--addr",
            "127.0.0.1:50051",
            "-service",
            "grpc.health.v1.aws-node",
            "-v",
        ]))
        .unwrap();
        assert_eq!(o.target, Target::Tcp("127.0.0.1:50051".into()));
        assert_eq!(o.service, "grpc.health.v1.aws-node");
        assert!(o.verbose);
        assert_eq!(
            parse(&args(&["-addr=unix:/x.sock"])).unwrap().target,
            Target::Unix("/x.sock".into())
        );
    }

    #[test]
    fn bad_arguments() {
        for a in [
            &[][..],
            &["-connect-timeout=5s"][..],
            &["-addr=x:1", "-connect-timeout=0s"][..],
            &["-addr=x:1", "-rpc-timeout=soon"][..],
            &["-addr=x:1", "-tls"][..],
            &["-addr"][..],
        ] {
            assert!(parse(&args(a)).is_err(), "{a:?}");
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(go_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(go_duration("0"), Some(Duration::ZERO));
        for bad in ["", "5", "s", "5x", "-1s", "1..5s"] {
            assert_eq!(go_duration(bad), None, "{bad}");
        }
    }
}
