//! The test rig shared by tests that cross binaries: network namespaces that clean up after
//! themselves, running the real binaries inside them, and a small stand-in for ipamd for the
//! plugin's kernel tests.

pub mod cloud;
pub mod cni;
pub mod fake_ipamd;
pub mod ipamd_proc;
pub mod kube;
pub mod netns;
pub mod np_agent;
pub mod sim;
pub mod vpc;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The address tests give a node namespace (on its loopback), so pods have a host to reach.
pub const NODE_IP: &str = "192.168.250.1";

/// The pod address out of a CNI ADD result ("10.0.1.5/32" -> "10.0.1.5").
pub fn result_ip(result: &serde_json::Value) -> String {
    let addr = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no IP in result {result}"));
    addr.split('/').next().unwrap_or(addr).to_string()
}

/// Is `ip` inside `cidr`? (False when either does not parse.)
pub fn in_cidr(ip: &str, cidr: &str) -> bool {
    match (
        ip.parse::<std::net::Ipv4Addr>(),
        cidr.parse::<ipnet::Ipv4Net>(),
    ) {
        (Ok(ip), Ok(net)) => net.contains(&ip),
        _ => false,
    }
}

/// A short name unique to this process and call (interface and netns names are length-capped).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Path of a workspace binary: `$AWS_CNI_BIN_DIR/<name>` or next to the test executable's
/// `deps/` directory (target/debug), where `cargo build --workspace --bins` puts it.
/// `$AWS_CNI_IPAMD` names another `ipamd` (the benchmark measures the shipped build with it).
pub fn bin(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os("AWS_CNI_IPAMD").filter(|_| name == "ipamd") {
        return std::path::absolute(PathBuf::from(p)).expect("absolute path");
    }
    if let Ok(d) = std::env::var("AWS_CNI_BIN_DIR") {
        let d = PathBuf::from(d);
        let d = if d.is_relative() {
            std::env::current_dir().expect("cwd").join(d)
        } else {
            d
        };
        return d.join(name);
    }
    let exe = std::env::current_exe().expect("current exe");
    // Test executables live in target/debug/deps, binaries (the `sim` command) in target/debug.
    let mut dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

static KEEP_HELPERS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Let helper processes outlive this process (`sim run --keep`).
pub fn keep_helpers() {
    KEEP_HELPERS.store(true, Ordering::Relaxed);
}

/// Make a helper process (ipamd, the shim, fake IMDS, a test server) die with the thread that
/// starts it, so a test that aborts instead of unwinding cannot leave it running.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    if KEEP_HELPERS.load(Ordering::Relaxed) {
        return cmd;
    }
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only makes one
    // async-signal-safe system call (prctl).
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        })
    }
}

/// SIGTERM, then SIGKILL if it has not exited within 5 s.
pub fn terminate(child: Option<std::process::Child>) {
    let Some(mut c) = child else { return };
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// Try `n` TCP connections to `addr` at once from inside network namespace `ns` (a socket
/// stays in the namespace it was made in, whichever thread uses it later). Returns those that
/// connected within 1.5 s; the rest are what the peer's accept queue would not take.
pub fn tcp_connect_in(ns: &str, addr: std::net::SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut out = Vec::new();
            // In waves, so the listener's SYN queue is not what limits the count.
            for wave in (0..n).collect::<Vec<_>>().chunks(100) {
                let tries = wave.iter().map(|_| {
                    tokio::time::timeout(
                        std::time::Duration::from_millis(1500),
                        tokio::net::TcpStream::connect(addr),
                    )
                });
                let before = out.len();
                out.extend(
                    futures::future::join_all(tries)
                        .await
                        .into_iter()
                        .filter_map(|r| r.ok()?.ok()?.into_std().ok()),
                );
                // The queue is full: more tries would only wait out their timeouts.
                if out.len() - before < wave.len() / 10 {
                    break;
                }
            }
            out
        })
    })
    .join()
    .expect("connect thread")
}

/// Raise this process's soft open-file limit to the hard one (tests that hold many sockets).
pub fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Run a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command and return its output whatever the status.
pub fn try_sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"))
}

/// `ip -j ...` inside `ns`, parsed.
pub fn ip_json(ns: &str, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["ip", "-n", ns, "-j"];
    full.extend_from_slice(args);
    let out = sh(&full);
    if out.trim().is_empty() {
        return serde_json::Value::Array(vec![]);
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("parse {full:?}: {e}: {out}"))
}

/// Does `ping` from `ns` reach `dst` (one packet, one second)?
pub fn ping(ns: &str, dst: &str) -> bool {
    try_sh(&["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", dst])
        .status
        .success()
}

/// Like `ping` but a few tries, for links that just came up.
pub fn ping_eventually(ns: &str, dst: &str) -> bool {
    (0..3).any(|_| ping(ns, dst))
}

/// The libcni-based client (tests/cniclient), built once per test process into the target dir.
pub fn cniclient() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cniclient");
            let out_dir = bin("aws-cni")
                .parent()
                .expect("bin dir")
                .join("cniclient-build");
            std::fs::create_dir_all(&out_dir).expect("mkdir");
            let out = out_dir.join("cniclient");
            let st = Command::new("go")
                .args(["build", "-o"])
                .arg(&out)
                .arg(".")
                .current_dir(&src)
                .env("GOPATH", format!("{}:/usr/share/gocode", out_dir.display()))
                .env("GO111MODULE", "off")
                .env("GOCACHE", out_dir.join("cache"))
                .status()
                .expect("run go build (apt: golang-go golang-github-appc-cni-dev)");
            assert!(st.success(), "building the libcni client failed");
            out
        })
        .clone()
}

/// A gRPC server of the rig (a fake ipamd, a stand-in network policy agent) on a unix socket,
/// in a thread of its own; stopped, and its socket removed, when dropped.
pub struct UnixServer {
    pub socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UnixServer {
    /// Bind `socket` and run `serve` on it until stopped; `serve` gets the incoming
    /// connections and the shutdown signal (for tonic's `serve_with_incoming_shutdown`).
    pub fn start<F, Fut>(socket: &Path, serve: F) -> UnixServer
    where
        F: FnOnce(
                tokio_stream::wrappers::UnixListenerStream,
                tokio::sync::oneshot::Receiver<()>,
            ) -> Fut
            + Send
            + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let path = socket.to_path_buf();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let _ = std::fs::remove_file(&path);
                let listener = tokio::net::UnixListener::bind(&path).expect("bind");
                ready_tx.send(()).expect("ready");
                serve(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    rx,
                )
                .await;
            });
        });
        ready_rx.recv().expect("server thread");
        UnixServer {
            socket: socket.to_path_buf(),
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for UnixServer {
    fn drop(&mut self) {
        self.stop();
    }
}
