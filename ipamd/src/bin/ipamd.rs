//! `ipamd`: the aws-node daemon.

use std::process::ExitCode;

fn main() -> ExitCode {
    let env = |k: &str| std::env::var(k).ok();
    let cfg = match ipamd::config::Config::from_env(&env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ipamd: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    ipamd::logging::init(&cfg.log_file, &cfg.log_level);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ipamd: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(ipamd::daemon::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "ipamd failed");
            eprintln!("ipamd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
