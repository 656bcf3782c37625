//! Running the helper programs the binaries shell out to (`iptables-save`, `iptables-restore`):
//! one place that feeds stdin, collects stdout, and on failure names the command and what it
//! printed on stderr, since that text is usually the only explanation an operator gets.

use std::io::Write;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("run {cmd}: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
}

/// Run `program args`, with `input` on its stdin; its stdout.
pub fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, CommandError> {
    let cmd = if args.is_empty() {
        program.to_string()
    } else {
        format!("{program} {}", args.join(" "))
    };
    let spawn_err = |source| CommandError::Spawn {
        cmd: cmd.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    // Fed from another thread: a child that writes a full pipe of output before it has read
    // all of its input would otherwise wait on us while we wait on it.
    let feeder = match (input, child.stdin.take()) {
        (Some(text), Some(mut stdin)) => {
            let text = text.to_string();
            Some(std::thread::spawn(move || stdin.write_all(text.as_bytes())))
        }
        _ => None,
    };
    let out = child.wait_with_output().map_err(spawn_err)?;
    let fed = feeder
        .map(|f| {
            f.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("stdin writer panicked")))
        })
        .unwrap_or(Ok(()));
    if !out.status.success() {
        return Err(CommandError::Failed {
            cmd,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    // A child that exits 0 without reading all of its input did not see all of it.
    fed.map_err(spawn_err)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_input_and_failures() {
        assert_eq!(run("cat", &[], Some("hello")).unwrap(), "hello");
        let big = "x".repeat(1 << 20);
        assert_eq!(run("cat", &[], Some(&big)).unwrap().len(), big.len());
        match run("sh", &["-c", "echo oops >&2; exit 3"], None) {
            Err(CommandError::Failed { cmd, stderr, .. }) => {
                assert_eq!(cmd, "sh -c echo oops >&2; exit 3");
                assert_eq!(stderr, "oops");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            run("/nonexistent/program", &[], None),
            Err(CommandError::Spawn { .. })
        ));
    }
}
