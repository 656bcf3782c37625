//! Process entry: read the environment and stdin, run the command, print the result or the
//! error JSON, and pick the exit code.

use std::io::{Read, Write};
use std::process::ExitCode;

use aws_cni::config::{requested_version, CniEnv};
use aws_cni::error::{CniError, Code};
use aws_cni::{logging, version};
use tracing::Instrument;

use crate::commands;
use crate::config::NetConf;

pub fn main() -> ExitCode {
    let env = |k: &str| std::env::var(k).ok();
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let requested = requested_version(&stdin);
    let reply_version = requested
        .clone()
        .filter(|v| version::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| version::LATEST.to_string());
    let fail = |e: CniError| {
        let _ = writeln!(std::io::stdout(), "{}", e.to_json(&reply_version));
        ExitCode::FAILURE
    };
    if let Err(e) = read {
        return fail(CniError::new(Code::Io, format!("read stdin: {e}")));
    }
    let cni_env = match CniEnv::from_env(&env) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    if cni_env.command == "VERSION" {
        println!("{}", version::version_reply(requested.as_deref()));
        return ExitCode::SUCCESS;
    }
    let conf = match NetConf::parse(&stdin) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    logging::init(&conf.plugin_log_file, &conf.plugin_log_level);

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(CniError::new(Code::Io, format!("start runtime: {e}"))),
    };
    let span = tracing::info_span!(
        target: crate::LOG_TARGET,
        "egress",
        command = %cni_env.command,
        container = %cni_env.container_id,
        ifname = %cni_env.ifname,
    );
    let out = rt.block_on(commands::run(&cni_env, &conf).instrument(span.clone()));
    let _e = span.enter();
    match out {
        Ok(stdout) => {
            crate::info!("succeeded");
            if let Some(s) = stdout {
                println!("{s}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(target: crate::LOG_TARGET, code = e.code as u32, error = %e.msg, "failed");
            fail(e)
        }
    }
}
