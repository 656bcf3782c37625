//! Process entry: read the environment and stdin, run the command, print the result or the
//! error JSON, and pick the exit code.

use std::io::{Read, Write};
use std::process::ExitCode;

use tracing::Instrument;

use crate::config::{self, CniEnv, NetConf};
use crate::error::{CniError, Code};
use crate::{commands, logging, version};

/// What differs between the plugins this process entry runs (`aws-cni`, `egress-cni`): the
/// configuration they parse, where they log, the span their lines carry, and the commands.
pub trait Plugin {
    type Conf;
    fn parse(stdin: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Self::Conf, CniError>;
    /// (`pluginLogFile`, `pluginLogLevel`).
    fn log_to(conf: &Self::Conf) -> (&str, &str);
    fn span(env: &CniEnv) -> tracing::Span;
    /// The command's stdout (`Ok(None)`: nothing to print).
    fn run(
        env: &CniEnv,
        conf: &Self::Conf,
    ) -> impl std::future::Future<Output = Result<Option<String>, CniError>>;
}

/// `aws-cni`.
pub struct AwsCni;

impl Plugin for AwsCni {
    type Conf = NetConf;
    fn parse(stdin: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<NetConf, CniError> {
        NetConf::parse(stdin, env)
    }
    fn log_to(conf: &NetConf) -> (&str, &str) {
        (&conf.plugin_log_file, &conf.plugin_log_level)
    }
    fn span(env: &CniEnv) -> tracing::Span {
        tracing::info_span!(
            "cni",
            command = %env.command,
            container = %env.container_id,
            ifname = %env.ifname,
            pod = %format!("{}/{}", env.args.pod_namespace, env.args.pod_name),
        )
    }
    async fn run(env: &CniEnv, conf: &NetConf) -> Result<Option<String>, CniError> {
        commands::run(env, conf).await
    }
}

pub fn main() -> ExitCode {
    run_plugin::<AwsCni>()
}

/// Read the environment and stdin, answer VERSION, run the command; print the result or the
/// error JSON in the version the runtime asked for; the exit code.
pub fn run_plugin<P: Plugin>() -> ExitCode {
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
    let conf = match P::parse(&stdin, &env) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let (file, level) = P::log_to(&conf);
    logging::init(file, level);

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(CniError::new(Code::Io, format!("start runtime: {e}"))),
    };
    let span = P::span(&cni_env);
    let out = rt.block_on(P::run(&cni_env, &conf).instrument(span.clone()));
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
