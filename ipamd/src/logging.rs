//! ipamd logs: JSON lines to `AWS_VPC_K8S_CNI_LOG_FILE` ("stdout" or "stderr" allowed). The
//! file is private (0600) and rotates at upstream's size (100 MB, 5 old files kept).

use std::sync::Mutex;

use cni_common::logfile::{RotatingFile, DEFAULT_KEEP, DEFAULT_MAX_BYTES};

use tracing_subscriber::filter::{EnvFilter, LevelFilter};

fn level(s: &str) -> LevelFilter {
    // tracing's parser takes upstream's level names in any case ("DEBUG", "Info", "off");
    // upstream's "fatal" (and zap's "panic", "dpanic") log only what stops ipamd, and an
    // unknown name means DEBUG, as upstream.
    match s.trim().to_ascii_lowercase().as_str() {
        "fatal" | "panic" | "dpanic" => LevelFilter::ERROR,
        other => other.parse().unwrap_or(LevelFilter::DEBUG),
    }
}

/// ipamd's own events at the chosen level; the SDK, hyper and rustls only from WARN up (their
/// DEBUG is several lines per HTTP request).
fn filter(lvl: &str) -> EnvFilter {
    let l = level(lvl);
    EnvFilter::default()
        .add_directive(LevelFilter::WARN.min(l).into())
        .add_directive(
            format!("ipamd={l}")
                .parse()
                .unwrap_or_else(|_| LevelFilter::INFO.into()),
        )
}

pub fn init(file: &str, lvl: &str) {
    let b = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter(lvl))
        .with_current_span(true)
        .with_span_list(false);
    match file {
        "" | "stdout" => {
            let _ = b.with_writer(std::io::stdout).try_init();
        }
        "stderr" => {
            let _ = b.with_writer(std::io::stderr).try_init();
        }
        path => {
            match RotatingFile::open(std::path::Path::new(path), DEFAULT_MAX_BYTES, DEFAULT_KEEP) {
                Ok(f) => {
                    let _ = b.with_writer(Mutex::new(f)).try_init();
                }
                Err(e) => {
                    eprintln!("ipamd: cannot open log file {path}: {e}; logging to stdout");
                    let _ = tracing_subscriber::fmt()
                        .json()
                        .with_env_filter(filter(lvl))
                        .try_init();
                }
            }
        }
    }
}
