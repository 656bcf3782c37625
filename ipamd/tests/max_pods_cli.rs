//! Runs the real `max-pods` binary, since node bootstrap scripts depend on its
//! exact output and exit codes rather than on the library API.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_max-pods"))
        .args(args)
        .output()
        .expect("failed to run max-pods")
}

/// Runs a successful invocation and returns its stdout.
fn stdout(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("stdout is not UTF-8")
}

fn max_pods(ty: &str, extra: &[&str]) -> String {
    let mut args = vec!["--instance-type", ty];
    args.extend_from_slice(extra);
    stdout(&args).trim_end().to_owned()
}

#[test]
fn secondary_ip_examples() {
    assert_eq!(max_pods("t3.nano", &[]), "4");
    assert_eq!(max_pods("t3.medium", &[]), "17");
    assert_eq!(max_pods("m5.large", &[]), "29");
    assert_eq!(stdout(&["--instance-type", "m5.large"]), "29\n");
}

#[test]
fn large_types_are_capped_unless_show_max_allowed() {
    for ty in ["m5.24xlarge", "c5n.18xlarge"] {
        assert_eq!(max_pods(ty, &[]), "250");
        assert_eq!(max_pods(ty, &["--show-max-allowed"]), "737");
    }
}

#[test]
fn custom_networking() {
    assert_eq!(
        max_pods("m5.large", &["--cni-custom-networking-enabled"]),
        "20"
    );
}

#[test]
fn prefix_delegation() {
    let pd = "--cni-prefix-delegation-enabled";
    assert_eq!(max_pods("m5.large", &[pd]), "110");
    assert_eq!(max_pods("m5.large", &[pd, "--show-max-allowed"]), "434");
    assert_eq!(
        max_pods(
            "m5.large",
            &[pd, "--show-max-allowed", "--cni-version", "v1.10.1"]
        ),
        "434"
    );
    assert_eq!(
        max_pods(
            "m5.large",
            &[pd, "--show-max-allowed", "--cni-version=1.9.0-eksbuild.1"]
        ),
        "434"
    );
    // Too old for prefixes: falls back to secondary IPs.
    assert_eq!(max_pods("m5.large", &[pd, "--cni-version", "1.8.0"]), "29");
}

#[test]
fn max_eni() {
    assert_eq!(max_pods("m5.large", &["--cni-max-eni", "1"]), "11");
    assert_eq!(max_pods("m5.large", &["--cni-max-eni=2"]), "20");
}

#[test]
fn all_layout() {
    let text = stdout(&["--all"]);
    let lines: Vec<&str> = text.lines().collect();
    let first_data = lines
        .iter()
        .position(|l| !l.starts_with('#'))
        .expect("no data lines");
    assert!(first_data > 0, "expected leading # comment lines");
    let data = &lines[first_data..];
    assert!(data.len() > 500, "only {} types", data.len());
    let mut names = Vec::new();
    for line in data {
        let (name, n) = line.split_once(' ').expect("line is '<type> <max pods>'");
        assert!(!name.is_empty() && !name.contains(char::is_whitespace));
        n.parse::<u32>().expect("max pods is a number");
        names.push(name);
    }
    assert!(names.windows(2).all(|w| w[0] < w[1]), "not sorted");
    // Uncapped, like eni-max-pods.txt.
    assert!(data.contains(&"m5.24xlarge 737"));
    assert!(data.contains(&"m5.large 29"));
    assert!(data.contains(&"t3.nano 4"));
}

/// Every row of upstream's eni-max-pods.txt (v1.23.1, kept as figures in tests/data) appears in
/// `--all` with the same number: operators' bootstrap scripts switch between the two.
#[test]
fn all_agrees_with_upstream_table() {
    let ours = stdout(&["--all"]);
    let ours: std::collections::HashMap<&str, &str> = ours
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let upstream = include_str!("../../tests/data/upstream-eni-max-pods.tsv");
    let mut rows = 0;
    let mut wrong = Vec::new();
    for line in upstream.lines().filter(|l| !l.starts_with('#')) {
        let (ty, n) = line.split_once('\t').expect("type<TAB>max pods");
        rows += 1;
        if ours.get(ty) != Some(&n) {
            wrong.push(format!("{ty}: upstream {n}, ours {:?}", ours.get(ty)));
        }
    }
    assert_eq!(rows, 1391, "upstream's table has 1391 rows");
    assert!(wrong.is_empty(), "{} rows differ: {wrong:#?}", wrong.len());
}

#[test]
fn all_respects_flags() {
    let text = stdout(&["--all", "--cni-prefix-delegation-enabled"]);
    assert!(text.lines().any(|l| l == "m5.large 434"));
    let text = stdout(&["--all", "--cni-custom-networking-enabled"]);
    assert!(text.lines().any(|l| l == "m5.large 20"));
}

#[test]
fn unknown_type() {
    let out = run(&["--instance-type", "z9.huge"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("z9.huge"));
}

#[test]
fn bad_flags_exit_2_with_usage() {
    for args in [
        &[][..],
        &["--bogus"],
        &["--instance-type"],
        &["--instance-type", "m5.large", "--cni-max-eni", "lots"],
        &["--instance-type", "m5.large", "--cni-version", "latest"],
        &["--instance-type", "m5.large", "--all"],
        &["--all", "--show-max-allowed=yes"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("usage:"),
            "{args:?}"
        );
    }
}

#[test]
fn help() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--instance-type"));
}
