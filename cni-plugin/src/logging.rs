//! Plugin logs: JSON lines into `pluginLogFile`. Never stdout, which belongs to the result.
//!
//! Our own events at `pluginLogLevel`; the libraries under us (h2, tonic, hyper) only from
//! WARN, or every pod's ADD would log each HTTP/2 frame. The file is private (0600) and
//! rotates at upstream's size (100 MB, 5 old files kept).

use std::sync::Mutex;

use cni_common::logfile::{RotatingFile, DEFAULT_KEEP, DEFAULT_MAX_BYTES};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};

fn level(s: &str) -> LevelFilter {
    // tracing's parser takes upstream's level names in any case ("DEBUG", "Info", "off").
    s.trim().parse().unwrap_or(LevelFilter::INFO)
}

/// Ours at `lvl`, everything else at WARN (or less, when ours is quieter still).
pub fn filter(lvl: LevelFilter) -> EnvFilter {
    EnvFilter::default()
        .add_directive(LevelFilter::WARN.min(lvl).into())
        .add_directive(
            format!("aws_cni={lvl}")
                .parse()
                .unwrap_or_else(|_| LevelFilter::INFO.into()),
        )
}

/// Best effort: a log file we cannot open must not fail pod creation.
pub fn init(file: &str, lvl: &str) {
    let lvl = level(lvl);
    if file.is_empty() || lvl == LevelFilter::OFF {
        return;
    }
    let builder = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter(lvl))
        .with_current_span(true)
        .with_span_list(false);
    if file == "stderr" || file == "stdout" {
        let _ = builder.with_writer(std::io::stderr).try_init();
        return;
    }
    if let Ok(f) = RotatingFile::open(std::path::Path::new(file), DEFAULT_MAX_BYTES, DEFAULT_KEEP) {
        let _ = builder.with_writer(Mutex::new(f)).try_init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!(level("DEBUG"), LevelFilter::DEBUG);
        assert_eq!(level("Info"), LevelFilter::INFO);
        assert_eq!(level("bogus"), LevelFilter::INFO);
    }

    #[test]
    fn libraries_stay_at_warn() {
        let f = filter(LevelFilter::DEBUG).to_string();
        assert!(f.contains("aws_cni=debug"), "{f}");
        assert!(f.contains("warn"), "{f}");
    }
}
