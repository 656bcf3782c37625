//! Plugin logs: JSON lines into `pluginLogFile`. Never stdout, which belongs to the result.

use std::fs::OpenOptions;
use std::sync::Mutex;

use tracing_subscriber::filter::LevelFilter;

fn level(s: &str) -> LevelFilter {
    // tracing's parser takes upstream's level names in any case ("DEBUG", "Info", "off").
    s.trim().parse().unwrap_or(LevelFilter::INFO)
}

/// Best effort: a log file we cannot open must not fail pod creation.
pub fn init(file: &str, lvl: &str) {
    let lvl = level(lvl);
    if file.is_empty() || lvl == LevelFilter::OFF {
        return;
    }
    let builder = tracing_subscriber::fmt()
        .json()
        .with_max_level(lvl)
        .with_current_span(true)
        .with_span_list(false);
    if file == "stderr" || file == "stdout" {
        let _ = builder.with_writer(std::io::stderr).try_init();
        return;
    }
    if let Some(dir) = std::path::Path::new(file).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(f) = OpenOptions::new().create(true).append(true).open(file) {
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
}
