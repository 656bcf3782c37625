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
    let _ = subscriber(writer, filter).try_init();
}

fn subscriber<W>(writer: W, filter: Targets) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // The formatter's own ceiling is INFO unless told otherwise, which would drop DEBUG
    // before `filter` sees it: `filter` alone decides.
    tracing_subscriber::fmt()
        .json()
        .with_max_level(LevelFilter::TRACE)
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(writer)
        .finish()
        .with(filter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(lvl: &str) -> String {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = subscriber(move || w.clone(), filter(lvl));
        tracing::subscriber::with_default(sub, || {
            tracing::debug!(target: "ipamd::pool", "ipamd debug");
            tracing::info!(target: "ipamd::pool", "ipamd info");
            tracing::info!(target: "hyper::client", "dependency info");
            tracing::warn!(target: "hyper::client", "dependency warn");
        });
        let out = buf
            .0
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        out.unwrap_or_default()
    }

    #[test]
    fn debug_level_writes_ipamds_debug_lines_and_only_warnings_of_dependencies() {
        let out = logged("DEBUG");
        assert!(out.contains("ipamd debug"), "{out}");
        assert!(out.contains("ipamd info"), "{out}");
        assert!(!out.contains("dependency info"), "{out}");
        assert!(out.contains("dependency warn"), "{out}");
    }

    #[test]
    fn info_level_drops_debug_lines() {
        let out = logged("info");
        assert!(!out.contains("ipamd debug"), "{out}");
        assert!(out.contains("ipamd info"), "{out}");
    }

    #[test]
    fn upstream_level_names() {
        assert_eq!(level("Fatal"), LevelFilter::ERROR);
        assert_eq!(level("warn"), LevelFilter::WARN);
        assert_eq!(level("nonsense"), LevelFilter::DEBUG);
    }
}
