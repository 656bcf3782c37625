//! Process entry: read the environment and stdin, run the command, print the result or the
//! error JSON, and pick the exit code.

use std::process::ExitCode;

use aws_cni::cli::{run_plugin, Plugin};
use aws_cni::config::CniEnv;
use aws_cni::error::CniError;

use crate::commands;
use crate::config::NetConf;

/// `egress-cni` through aws-cni's process entry.
pub struct Egress;

impl Plugin for Egress {
    type Conf = NetConf;
    fn parse(stdin: &[u8], _env: &dyn Fn(&str) -> Option<String>) -> Result<NetConf, CniError> {
        NetConf::parse(stdin)
    }
    fn log_to(conf: &NetConf) -> (&str, &str) {
        (&conf.plugin_log_file, &conf.plugin_log_level)
    }
    fn span(env: &CniEnv) -> tracing::Span {
        tracing::info_span!(
            target: crate::LOG_TARGET,
            "egress",
            command = %env.command,
            container = %env.container_id,
            ifname = %env.ifname,
        )
    }
    async fn run(env: &CniEnv, conf: &NetConf) -> Result<Option<String>, CniError> {
        commands::run(env, conf).await
    }
}

pub fn main() -> ExitCode {
    run_plugin::<Egress>()
}
