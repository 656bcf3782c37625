//! ipamd logs: JSON lines to `AWS_VPC_K8S_CNI_LOG_FILE` ("stdout" or "stderr" allowed). The
//! file is private (0600) and rotates at upstream's size (100 MB, 5 old files kept).

use std::sync::Mutex;

use cni_common::logfile::{RotatingFile, DEFAULT_KEEP, DEFAULT_MAX_BYTES};

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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
/// DEBUG is several lines per HTTP request). A static per-target filter: nothing to evaluate
/// per event and no regex engine linked in for directives ipamd never takes from outside.
fn filter(lvl: &str) -> Targets {
    let l = level(lvl);
    Targets::new()
        .with_default(LevelFilter::WARN.min(l))
        .with_target("ipamd", l)
}

pub fn init(file: &str, lvl: &str) {
    let filter = filter(lvl);
    match file {
        "" | "stdout" => install(std::io::stdout, filter),
        "stderr" => install(std::io::stderr, filter),
        path => {
            match RotatingFile::open(std::path::Path::new(path), DEFAULT_MAX_BYTES, DEFAULT_KEEP) {
                Ok(f) => install(Mutex::new(f), filter),
                Err(e) => {
                    eprintln!("ipamd: cannot open log file {path}: {e}; logging to stdout");
                    install(std::io::stdout, filter);
                }
            }
        }
    }
}

fn install<W>(writer: W, filter: Targets)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let _ = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(writer)
        .finish()
        .with(filter)
        .try_init();
}
