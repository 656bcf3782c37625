//! Plugin logs: JSON lines into `pluginLogFile`. Never stdout, which belongs to the result.
//!
//! Our own events at `pluginLogLevel`; the libraries under us (h2, tonic, hyper) only from
//! WARN, or every pod's ADD would log each HTTP/2 frame. The file is private (0600) and
//! rotates at upstream's size (100 MB, 5 old files kept).

use std::sync::Mutex;

use cni_common::logfile::{RotatingFile, DEFAULT_KEEP, DEFAULT_MAX_BYTES};
use tracing_subscriber::filter::{LevelFilter, Targets};

fn level(s: &str) -> LevelFilter {
    // tracing's parser takes upstream's level names in any case ("DEBUG", "Info", "off");
    // upstream's "Fatal" and "Panic" log only what fails the call, and an unknown name means
    // Debug, as upstream's plugin.
    match s.trim().to_ascii_lowercase().as_str() {
        "fatal" | "panic" | "dpanic" => LevelFilter::ERROR,
        other => other.parse().unwrap_or(LevelFilter::DEBUG),
    }
}

/// Ours at `lvl`, everything else at WARN (or less, when ours is quieter still). `Targets`,
/// not `EnvFilter`: no regex engine in a binary that runs once per pod.
pub fn filter(lvl: LevelFilter) -> Targets {
    Targets::new()
        .with_default(LevelFilter::WARN.min(lvl))
        .with_target("aws_cni", lvl)
}

/// Best effort: a log file we cannot open must not fail pod creation.
pub fn init(file: &str, lvl: &str) {
    let lvl = level(lvl);
    if file.is_empty() || lvl == LevelFilter::OFF {
        return;
    }
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let layer = || {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
    };
    if file == "stderr" || file == "stdout" {
        let _ = tracing_subscriber::registry()
            .with(layer().with_writer(std::io::stderr))
            .with(filter(lvl))
            .try_init();
        return;
    }
    if let Ok(f) = RotatingFile::open(std::path::Path::new(file), DEFAULT_MAX_BYTES, DEFAULT_KEEP) {
        let _ = tracing_subscriber::registry()
            .with(layer().with_writer(Mutex::new(f)))
            .with(filter(lvl))
            .try_init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!(level("DEBUG"), LevelFilter::DEBUG);
        assert_eq!(level("Info"), LevelFilter::INFO);
        // Upstream: an unknown name is Debug; Fatal is a level there.
        assert_eq!(level("bogus"), LevelFilter::DEBUG);
        assert_eq!(level("Fatal"), LevelFilter::ERROR);
    }

    #[test]
    fn libraries_stay_at_warn() {
        let f = filter(LevelFilter::DEBUG);
        assert!(f.would_enable("aws_cni::commands", &tracing::Level::DEBUG));
        assert!(!f.would_enable("h2::codec", &tracing::Level::DEBUG));
        assert!(f.would_enable("h2::codec", &tracing::Level::WARN));
    }
}
