//! Process entry: read the environment and stdin, run the command, print the result or the
//! error JSON, and pick the exit code.

use std::io::{Read, Write};
use std::process::ExitCode;

use tracing::Instrument;

use crate::config::{self, CniEnv, NetConf};
use crate::error::{CniError, Code};
use crate::{commands, logging, version};

pub fn main() -> ExitCode {
    let env = |k: &str| std::env::var(k).ok();
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let requested = config::requested_version(&stdin);
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
    let conf = match NetConf::parse(&stdin, &env) {
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
        "cni",
        command = %cni_env.command,
        container = %cni_env.container_id,
        ifname = %cni_env.ifname,
        pod = %format!("{}/{}", cni_env.args.pod_namespace, cni_env.args.pod_name),
    );
    let out = rt.block_on(commands::run(&cni_env, &conf).instrument(span.clone()));
    let _e = span.enter();
    match out {
        Ok(stdout) => {
            tracing::info!("succeeded");
            if let Some(s) = stdout {
                println!("{s}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(code = e.code as u32, error = %e.msg, "failed");
            fail(e)
        }
    }
}
