//! `ipamd`: the aws-node daemon. `ipamd --recover` rebuilds a lost or unusable checkpoint from
//! the node itself and exits.

use std::process::ExitCode;

fn main() -> ExitCode {
    let recover = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--recover") => true,
        Some(other) => {
            eprintln!("ipamd: unknown argument {other:?} (only --recover is accepted)");
            return ExitCode::from(2);
        }
    };
    let env = |k: &str| std::env::var(k).ok();
    let cfg = match ipamd::config::Config::from_env(&env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ipamd: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if !recover {
        ipamd::logging::init(&cfg.log_file, &cfg.log_level);
    }
    for w in &cfg.warnings {
        tracing::warn!(variable = w.var, value = %w.value, "{}", w.why);
    }
    // Rust keeps the soft descriptor limit it inherits (1,024 in many container runtimes),
    // where Go raises it; a burst of connections must not leave ipamd unable to open a file.
    match ipamd::rlimit::raise_nofile() {
        Ok((from, to)) if from != to => tracing::info!(from, to, "raised the open-file limit"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    // One thread runs every task (file writes and iptables go to the blocking pool). Requests
    // take the datastore's lock one at a time anyway; two workers added the cost of waking
    // each other (futexes, cross-thread wake-ups) to every request and a second thread's stack
    // and malloc arena to the resident memory: 14 % of the CPU per AddNetwork + DelNetwork and
    // 2 MB (`bench --startup`, the footprint rows).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ipamd: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if recover {
        return match rt.block_on(ipamd::daemon::recover(&cfg)) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ipamd --recover: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match rt.block_on(ipamd::daemon::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "ipamd failed");
            eprintln!("ipamd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
