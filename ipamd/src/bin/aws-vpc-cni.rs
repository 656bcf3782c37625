//! `aws-vpc-cni`: the aws-node container's entrypoint.
//!
//! `aws-vpc-cni`              validate, install aws-cni, run ipamd, write the conflist once an
//!                            address can be allocated, then supervise ipamd.
//! `aws-vpc-cni init`         the init container: install the chained plugins, set sysctls.
//! `aws-vpc-cni probe [--live]` exit 0 when ipamd is ready (SERVING), or with --live when it
//!                            answers at all: the readiness and liveness probes.
//! `aws-vpc-cni conflist`     print the conflist this environment makes (nothing else done).
//! `grpc-health-probe -addr=...` (this binary under that name) upstream's probe, for
//!                            manifests that run `/app/grpc-health-probe`.
//! `aws-vpc-cni-init`         (this binary under that name) the init container, as the
//!                            init image's default command.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use ipamd::entrypoint::{self, EntryConfig};

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aws-vpc-cni: cannot start runtime: {e}");
            std::process::exit(1);
        }
    }
}

fn socket() -> std::path::PathBuf {
    env("IPAMD_SOCKET_PATH")
        .filter(|s| !s.is_empty())
        .map(Into::into)
        .unwrap_or_else(|| cni_proto::DEFAULT_SOCKET.into())
}

fn main() -> ExitCode {
    let mut argv = std::env::args();
    let program = argv.next().unwrap_or_default();
    let args: Vec<String> = argv.collect();
    // Upstream's image runs these by name: the probe in /app, the init container's binary.
    match std::path::Path::new(&program)
        .file_name()
        .and_then(|n| n.to_str())
    {
        Some("grpc-health-probe") => return health_probe(&args),
        Some("aws-vpc-cni-init") => return init(),
        _ => {}
    }
    match args.first().map(String::as_str) {
        None => run(),
        Some("init") => init(),
        Some("conflist") => match EntryConfig::from_env(&env) {
            Ok((mut entry, cfg)) => {
                for w in &cfg.warnings {
                    eprintln!("aws-vpc-cni: {w}");
                }
                if let Err(e) = egress_node_ip(&mut entry) {
                    eprintln!("aws-vpc-cni: {e}");
                    return ExitCode::FAILURE;
                }
                match entry.render_installed_conflist() {
                    Ok(c) => {
                        println!("{c}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("aws-vpc-cni: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                eprintln!("aws-vpc-cni: invalid configuration: {e}");
                ExitCode::from(2)
            }
        },
        Some("probe") => {
            let live = args.iter().any(|a| a == "--live");
            let ready = cni_proto::health::READY;
            match runtime().block_on(entrypoint::health(&socket(), ready)) {
                Some(true) => ExitCode::SUCCESS,
                Some(false) if live => ExitCode::SUCCESS,
                Some(false) => {
                    eprintln!("ipamd answers but cannot allocate an address yet");
                    ExitCode::FAILURE
                }
                None => {
                    eprintln!("ipamd does not answer on {}", socket().display());
                    ExitCode::FAILURE
                }
            }
        }
        Some(other) => {
            eprintln!("aws-vpc-cni: unknown command {other:?} (init, probe, conflist)");
            ExitCode::from(2)
        }
    }
}

fn health_probe(args: &[String]) -> ExitCode {
    use ipamd::probe;
    let o = match probe::parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(probe::EXIT_ARGS);
        }
    };
    if o.verbose {
        eprintln!(
            "> target={:?} conn-timeout={:?} rpc-timeout={:?}",
            o.target, o.connect_timeout, o.rpc_timeout
        );
    }
    let (code, line) = runtime().block_on(probe::check(&o));
    eprintln!("{line}");
    ExitCode::from(code)
}

fn init() -> ExitCode {
    let to = env("HOST_CNI_BIN_PATH")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "/host/opt/cni/bin".into());
    let r = entrypoint::exe_dir().and_then(|from| {
        entrypoint::install_plugins(
            &from,
            to.as_ref(),
            &["loopback", "portmap", "bandwidth", "tuning", "host-local"],
            &[],
        )
    });
    match r {
        Ok(done) => println!("aws-vpc-cni init: installed {} into {to}", done.join(", ")),
        Err(e) => {
            eprintln!("aws-vpc-cni init: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    // Pods' traffic is routed by the node.
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
        eprintln!("aws-vpc-cni init: net.ipv4.ip_forward=1: {e}");
        return ExitCode::FAILURE;
    }
    // IPv6 as upstream's init: on for an IPv6 node, forwarded for IPv6 pods or IPv6 egress.
    // (ipamd sets accept_ra=2 on the primary ENI's link, which it finds by MAC.)
    let flag = |var: &'static str| {
        ipamd::config::bool_from(var, env(var), false).unwrap_or_else(|e| {
            eprintln!("aws-vpc-cni init: {e}; using false, as upstream");
            false
        })
    };
    let (v6, v6_egress) = (flag("ENABLE_IPv6"), flag("ENABLE_V6_EGRESS"));
    let mut sysctls = Vec::new();
    if v6 {
        sysctls.push(("net/ipv6/conf/all/disable_ipv6", "0"));
    }
    if v6 || v6_egress {
        sysctls.push(("net/ipv6/conf/all/forwarding", "1"));
    }
    for (key, value) in sysctls {
        if let Err(e) = std::fs::write(format!("/proc/sys/{key}"), value) {
            eprintln!("aws-vpc-cni init: {key}={value}: {e}");
            return ExitCode::FAILURE;
        }
        println!("aws-vpc-cni init: {key}={value}");
    }
    // Upstream's init writes tcp_early_demux either way (1 unless DISABLE_TCP_EARLY_DEMUX),
    // where the kernel has it.
    // A bad value is upstream's default (false), said.
    let disable_demux = ipamd::config::bool_from(
        "DISABLE_TCP_EARLY_DEMUX",
        env("DISABLE_TCP_EARLY_DEMUX"),
        false,
    )
    .unwrap_or_else(|e| {
        eprintln!("aws-vpc-cni init: {e}; using false, as upstream");
        false
    });
    let demux = "/proc/sys/net/ipv4/tcp_early_demux";
    if std::path::Path::new(demux).exists() {
        let v = if disable_demux { "0" } else { "1" };
        if let Err(e) = std::fs::write(demux, v) {
            eprintln!("aws-vpc-cni init: net.ipv4.tcp_early_demux={v}: {e}");
            return ExitCode::FAILURE;
        }
        println!("aws-vpc-cni init: net.ipv4.tcp_early_demux={v}");
    }
    ExitCode::SUCCESS
}

/// egress-cni's SNAT source, from IMDS as upstream's entrypoint reads it. An IPv4 node without
/// an IPv6 address gets no IPv6 egress (said, as upstream); an IPv6 node must have an IPv4.
fn egress_node_ip(entry: &mut EntryConfig) -> Result<(), String> {
    if !entry.egress.enabled {
        return Ok(());
    }
    let v6 = entry.egress.v6;
    let found = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("start a runtime for IMDS: {e}"))?
        .block_on(ipamd::cloud::imds::Imds::new().primary_address(v6));
    match (found, v6) {
        (Ok(Some(ip)), _) => {
            entry.egress.node_ip = ip.to_string();
            Ok(())
        }
        (other, true) => {
            let why = match other {
                Err(e) => e.to_string(),
                _ => "IMDS lists no IPv6 address (meta-data/ipv6)".into(),
            };
            eprintln!("aws-vpc-cni: ENABLE_V6_EGRESS=true but the node has no global IPv6 address ({why}); IPv6 egress stays off, as upstream");
            entry.egress.enabled = false;
            Ok(())
        }
        (Err(e), false) => Err(format!("read the node's IPv4 address for egress-cni: {e}")),
        (Ok(None), false) => Err("IMDS lists no local-ipv4: an IPv6 node needs one for its pods' IPv4 egress (ENABLE_V4_EGRESS)".into()),
    }
}

fn run() -> ExitCode {
    let (mut entry, cfg) = match EntryConfig::from_env(&env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("aws-vpc-cni: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    for w in &cfg.warnings {
        eprintln!("aws-vpc-cni: {w}");
    }
    if let Err(e) = egress_node_ip(&mut entry) {
        eprintln!("aws-vpc-cni: {e}");
        return ExitCode::FAILURE;
    }
    let dir = match entrypoint::exe_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("aws-vpc-cni: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let conflist =
        match entrypoint::conflist_template(&dir).and_then(|t| entry.render_conflist_from(&t)) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("aws-vpc-cni: {e:#}");
                return ExitCode::FAILURE;
            }
        };
    let required: &[&str] = if entry.egress.enabled {
        &["aws-cni", "egress-cni"]
    } else {
        &["aws-cni"]
    };
    let installed = match entrypoint::install_plugins(
        &dir,
        &entry.host_cni_bin,
        &["aws-cni", "egress-cni"],
        required,
    ) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("aws-vpc-cni: installing plugins: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "aws-vpc-cni: installed {} into {}",
        installed.join(", "),
        entry.host_cni_bin.display()
    );
    let mut child = match std::process::Command::new(dir.join("ipamd")).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("aws-vpc-cni: start ipamd: {e}");
            return ExitCode::FAILURE;
        }
    };
    // From here SIGTERM/SIGINT go to ipamd (blocked in this thread and those it starts, waited
    // for by one of them); ipamd was started before, so it does not inherit the block.
    let pid = child.id() as i32;
    if let Some(signals) = signal_set() {
        std::thread::spawn(move || {
            if let Ok(sig) = signals.wait() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            }
        });
    }
    let sock = socket();
    let t0 = Instant::now();
    // The node is ready for pods when an ADD would get an address, not when gRPC first answers.
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            eprintln!("aws-vpc-cni: ipamd exited with {st} before it could allocate an address");
            return ExitCode::FAILURE;
        }
        // A runtime per check: dropping it closes the connection (an idle one left open would
        // hold up ipamd's graceful shutdown).
        if runtime().block_on(entrypoint::health(&sock, cni_proto::health::READY)) == Some(true) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Err(e) = entrypoint::write_atomic(
        &entry.host_cni_conf,
        entrypoint::CONFLIST_NAME,
        conflist.as_bytes(),
        0o644,
    ) {
        eprintln!("aws-vpc-cni: writing the conflist: {e:#}");
        let _ = child.kill();
        return ExitCode::FAILURE;
    }
    println!(
        "aws-vpc-cni: ipamd can allocate after {:.1}s; wrote {}",
        t0.elapsed().as_secs_f64(),
        entry
            .host_cni_conf
            .join(entrypoint::CONFLIST_NAME)
            .display()
    );
    match child.wait() {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("aws-vpc-cni: ipamd exited with {s}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("aws-vpc-cni: waiting for ipamd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn signal_set() -> Option<nix::sys::signal::SigSet> {
    use nix::sys::signal::{SigSet, Signal};
    let mut s = SigSet::empty();
    s.add(Signal::SIGTERM);
    s.add(Signal::SIGINT);
    s.thread_block().ok()?;
    Some(s)
}
