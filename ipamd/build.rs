//! The toolchain's version for `awscni_build_info{goversion}` (upstream puts Go's there), and
//! the link of ipamd's binaries.
fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=RUSTC_SEMVER={version}");

    // Relative relocations packed (DT_RELR): a position-independent Rust binary has tens of
    // thousands of them (every vtable, string slice and panic location in a static), and the
    // loader reads the whole table at every start, so a classic table is 1.5 MB of ipamd's
    // resident memory for good; packed it is a few kB. Needs glibc 2.36 at run time (the
    // image's bookworm has it; an older one refuses to start the binary, naming
    // GLIBC_ABI_DT_RELR). The plugins are static and run on the host: not theirs.
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
