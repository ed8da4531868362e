//! Test harness: real `swarmd` processes on 127.0.0.1.
//!
//! Every process is killed when its [`Proc`] drops (also on panic), each test
//! works in its own temporary directory, ports come from free-port discovery,
//! and every wait polls with a deadline that only a hang can exceed. When a test
//! fails, the logs of its processes are printed.

#![allow(dead_code)]

pub mod grpc;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Generous deadline for things that take well under a second normally.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The `swarmd` binary under test: this build's, or the one in
/// `$SWARMD_TEST_BIN_DIR` (to show that a test fails against an older build).
pub fn swarmd_bin() -> String {
    bin_under_test("swarmd", env!("CARGO_BIN_EXE_swarmd"))
}

/// The `secretctl` binary under test (see [`swarmd_bin`]).
pub fn secretctl_bin() -> String {
    bin_under_test("secretctl", env!("CARGO_BIN_EXE_secretctl"))
}

fn bin_under_test(name: &str, built: &str) -> String {
    match std::env::var("SWARMD_TEST_BIN_DIR") {
        Ok(dir) if !dir.is_empty() => format!("{dir}/{name}"),
        _ => built.to_owned(),
    }
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `f` every 50 ms until it returns `Some`, panicking after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running process, killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        wait_for(&format!("{} to exit", self.name), DEADLINE, || self.child.try_wait().unwrap())
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test's working area: a temp dir and the processes started in it.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub procs: Vec<Proc>,
    counter: usize,
    /// Environment every process started here gets (see [`Env::set_env`]).
    vars: Vec<(String, String)>,
    /// Open-file limit of every process started here (see [`Env::limit_open_files`]).
    nofile: Option<u64>,
}

impl Drop for Env {
    fn drop(&mut self) {
        // Workers that may run containers get a SIGTERM first: they stop their
        // tasks and unmount their secret filesystems on the way out.
        for p in &mut self.procs {
            if matches!(p.child.try_wait(), Ok(None)) {
                let _ = Command::new("kill").arg("-TERM").arg(p.pid().to_string()).status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for p in &mut self.procs {
            while matches!(p.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        self.sweep_worker_leftovers();
        if std::thread::panicking() {
            for p in &self.procs {
                let text = p.log_text();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!("----- log of {} (last {} lines) -----", p.name, tail.len());
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl Env {
    /// After a crash: containers, secret mounts and run dirs of this
    /// environment's workers (their node IDs come from their `worker.json`).
    fn sweep_worker_leftovers(&self) {
        let run = PathBuf::from(std::env::var("SWARMD_RUN_DIR").unwrap_or_else(|_| "/run/swarmd".into()));
        for cfg in files_below(self.dir.path()).into_iter().filter(|p| p.ends_with("worker.json")) {
            let Some(id) = fs::read_to_string(&cfg)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v["node_id"].as_str().map(str::to_owned))
            else {
                continue;
            };
            // Exposure mounts a killed worker left, then its image cache.
            if let Ok(entries) = fs::read_dir(image_dir(&id).join("rootfs")) {
                for e in entries.flatten() {
                    let _ = Command::new("umount").arg("-l").arg(e.path()).output();
                }
            }
            let _ = fs::remove_dir_all(image_dir(&id));
            let dir = run.join(&id);
            if !dir.exists() {
                continue;
            }
            let state = dir.join("runtime");
            if let Ok(o) = Command::new("runc").arg("--root").arg(&state).args(["list", "-q"]).output() {
                for c in String::from_utf8_lossy(&o.stdout).lines().filter(|l| !l.is_empty()) {
                    let _ = Command::new("runc").arg("--root").arg(&state).args(["delete", "--force", c]).output();
                }
            }
            if let Ok(entries) = fs::read_dir(dir.join("tasks")) {
                for e in entries.flatten() {
                    let _ = Command::new("umount").arg("-l").arg(e.path()).output();
                }
            }
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap(), procs: Vec::new(), counter: 0, vars: Vec::new(), nofile: None }
    }

    /// Sets `key=value` in the environment of every process started from now on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.vars.push((key.to_owned(), value.to_owned()));
    }

    /// Starts every process from now on with `n` as its soft and hard limit of
    /// open files (through util-linux's `prlimit`), so that a test can reach a
    /// cap derived from it.
    pub fn limit_open_files(&mut self, n: u64) {
        self.nofile = Some(n);
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts `swarmd ARGS` with output in `<name>.log`; returns its index.
    pub fn spawn(&mut self, name: &str, args: &[&str]) -> usize {
        self.spawn_with(name, args, &[], None)
    }

    /// As [`Env::spawn`], with extra environment variables and, if given,
    /// `stdin` written to its standard input (then closed).
    pub fn spawn_with(&mut self, name: &str, args: &[&str], envs: &[(&str, &str)], stdin: Option<&[u8]>) -> usize {
        use std::io::Write;
        self.counter += 1;
        let log = self.path(&format!("{name}.{}.log", self.counter));
        let out = fs::File::create(&log).unwrap();
        let mut cmd = match self.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(swarmd_bin());
                c
            }
            None => Command::new(swarmd_bin()),
        };
        let mut child = cmd
            .args(args)
            .env("RUST_LOG", "info,openraft=warn")
            .envs(self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(envs.iter().copied())
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let _ = pipe.write_all(input);
        }
        self.procs.push(Proc { name: name.to_owned(), child, log });
        self.procs.len() - 1
    }

    /// Runs `swarmd ARGS` to completion with `input` on its standard input
    /// (how tokens and unlock keys are given).
    pub fn swarmd_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = Command::new(swarmd_bin())
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(input);
        child.wait_with_output().unwrap()
    }

    /// Runs `swarmd ARGS` to completion.
    pub fn swarmd(&self, args: &[&str]) -> Output {
        Command::new(swarmd_bin()).args(args).env("RUST_LOG", "warn").stdin(Stdio::null()).output().unwrap()
    }

    /// Starts a manager in `<name>/` and waits until its control API answers.
    pub fn start_manager(&mut self, name: &str, extra: &[&str]) -> Manager {
        let data = self.path(name);
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["manager", "init", "--data-dir", data.to_str().unwrap(), "--listen-addr", &addr];
        args.extend_from_slice(extra);
        let idx = self.spawn(name, &args);
        let m = Manager { name: name.to_owned(), data, addr, proc_idx: idx };
        wait_for(&format!("{name} to serve"), DEADLINE, || {
            m.try_ctl(&["node", "ls", "-q"]).filter(|o| o.status.success())
        });
        m
    }

    /// Joins a manager in `<name>/` through `remote` and waits until it is a raft member.
    /// The token goes on its standard input: never in a command line (invariant 11).
    pub fn join_manager(&mut self, name: &str, token: &str, remote: &Manager) -> Manager {
        self.join_manager_with(name, token, remote, &[])
    }

    /// As [`Env::join_manager`], with extra options.
    pub fn join_manager_with(&mut self, name: &str, token: &str, remote: &Manager, extra: &[&str]) -> Manager {
        let m = self.start_manager_join(name, token, remote, extra);
        wait_for(&format!("{name} to join raft"), DEADLINE, || m.data.join("manager.json").exists().then_some(()));
        wait_for(&format!("{name} to serve"), DEADLINE, || {
            m.try_ctl(&["node", "ls", "-q"]).filter(|o| o.status.success())
        });
        m
    }

    /// Starts `swarmd manager join` in `<name>/` through `remote` without
    /// waiting for it (the token on its standard input).
    pub fn start_manager_join(&mut self, name: &str, token: &str, remote: &Manager, extra: &[&str]) -> Manager {
        let data = self.path(name);
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "manager",
            "join",
            "--remote",
            &remote.addr,
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-addr",
            &addr,
        ];
        args.extend_from_slice(extra);
        let idx = self.spawn_joining(name, args, token);
        Manager { name: name.to_owned(), data, addr, proc_idx: idx }
    }

    /// Three managers: `m1` initialises the cluster (with `extra`), `m2` and `m3`
    /// join through it (with `extra`); returns them and the index of the leader.
    pub fn three_managers(&mut self, extra: &[&str]) -> ([Manager; 3], usize) {
        let m1 = self.start_manager("m1", extra);
        let token = m1.token("manager");
        let m2 = self.join_manager_with("m2", &token, &m1, extra);
        let m3 = self.join_manager_with("m3", &token, &m1, extra);
        let managers = [m1, m2, m3];
        let leader = wait_for("a leader", DEADLINE, || managers.iter().position(|m| m.is_leader()));
        (managers, leader)
    }

    /// Restarts a node with `swarmd run`.
    pub fn run_node(&mut self, name: &str, data: &Path) -> usize {
        self.spawn(name, &["run", "--data-dir", data.to_str().unwrap()])
    }

    /// Starts `swarmd worker join` in `<name>/`, the token on its standard input.
    pub fn join_worker(&mut self, name: &str, token: &str, remote: &str) -> Worker {
        let data = self.path(name);
        let args = vec!["worker", "join", "--remote", remote, "--data-dir", data.to_str().unwrap()];
        let idx = self.spawn_joining(name, args, token);
        Worker { name: name.to_owned(), data, proc_idx: idx }
    }

    /// Starts a join with the token on standard input — or, with
    /// `SWARMD_TEST_TOKEN_IN_ARGV=1`, as its argument (for builds from before
    /// tokens came on standard input, see [`swarmd_bin`]).
    fn spawn_joining<'a>(&mut self, name: &str, mut args: Vec<&'a str>, token: &'a str) -> usize {
        if std::env::var("SWARMD_TEST_TOKEN_IN_ARGV").is_ok_and(|v| v == "1") {
            args.insert(2, token);
            return self.spawn_with(name, &args, &[], None);
        }
        self.spawn_with(name, &args, &[], Some(format!("{token}\n").as_bytes()))
    }

    pub fn proc(&mut self, idx: usize) -> &mut Proc {
        &mut self.procs[idx]
    }
}

pub struct Manager {
    pub name: String,
    pub data: PathBuf,
    pub addr: String,
    pub proc_idx: usize,
}

pub struct Worker {
    pub name: String,
    pub data: PathBuf,
    pub proc_idx: usize,
}

impl Worker {
    pub fn node_id(&self) -> String {
        let v: Value = serde_json::from_str(&fs::read_to_string(self.data.join("worker.json")).unwrap()).unwrap();
        v["node_id"].as_str().unwrap().to_owned()
    }
}

impl Manager {
    pub fn socket(&self) -> PathBuf {
        self.data.join("control.sock")
    }

    pub fn try_ctl(&self, args: &[&str]) -> Option<Output> {
        Command::new(secretctl_bin())
            .arg("--host")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()
    }

    /// Runs secretctl against this manager.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.try_ctl(args).unwrap()
    }

    /// Runs secretctl with `input` on its standard input.
    pub fn ctl_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = Command::new(secretctl_bin())
            .arg("--host")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    }

    /// Runs secretctl and requires success; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(o.status.success(), "secretctl {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }

    /// This manager's node ID.
    pub fn node_id(&self) -> String {
        let v: Value = serde_json::from_str(&fs::read_to_string(self.data.join("manager.json")).unwrap()).unwrap();
        v["node_id"].as_str().unwrap().to_owned()
    }

    /// Whether this manager currently reports itself as the raft leader.
    pub fn is_leader(&self) -> bool {
        let id = self.node_id();
        self.nodes().iter().any(|n| n["id"] == id && n["leader"] == true)
    }

    pub fn token(&self, role: &str) -> String {
        self.ctl_ok(&["join-token", role, "-q"]).trim().to_owned()
    }

    pub fn nodes(&self) -> Vec<Value> {
        let o = self.ctl(&["--format", "json", "node", "ls"]);
        if !o.status.success() {
            return Vec::new();
        }
        serde_json::from_slice(&o.stdout).unwrap_or_default()
    }

    pub fn node(&self, id: &str) -> Option<Value> {
        self.nodes().into_iter().find(|n| n["id"] == id)
    }

    /// Waits until `count` nodes are listed and all are ready.
    pub fn wait_ready(&self, count: usize) -> Vec<Value> {
        wait_for(&format!("{count} ready nodes"), DEADLINE, || {
            let n = self.nodes();
            (n.len() == count && n.iter().all(|n| n["status"] == "ready")).then_some(n)
        })
    }
}

/// Every regular file below `dir`.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                out.push(p);
            }
        }
    }
    out
}

/// Files below `dir` whose bytes contain `needle`.
pub fn grep_dir(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    assert!(needle.len() >= 8, "needle too short to be meaningful");
    files_below(dir)
        .into_iter()
        .filter(|p| fs::read(p).map(|b| b.windows(needle.len()).any(|w| w == needle)).unwrap_or(false))
        .collect()
}

/// Whether a path is absent or an empty directory.
pub fn is_absent_or_empty(p: &Path) -> bool {
    !p.exists() || fs::read_dir(p).map(|mut d| d.next().is_none()).unwrap_or(false)
}

/// Streams label writes (`k<i>=<i>` on `node`) through whichever of `sockets`
/// answers, until `stop` is set; returns the indices acknowledged (exit 0).
pub fn write_stream(
    sockets: Vec<PathBuf>,
    node: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<u32> {
    use std::sync::atomic::Ordering;
    let mut acked = Vec::new();
    let mut i = 0u32;
    let mut which = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let sock = &sockets[which % sockets.len()];
        let o = Command::new(secretctl_bin())
            .arg("--host")
            .arg(format!("unix://{}", sock.display()))
            .args(["node", "update", &node, "--label-add", &format!("k{i}={i}")])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if o.status.success() {
            acked.push(i);
        } else {
            which += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        i += 1;
    }
    acked
}

/// `secretctl info --format json` of a manager.
pub fn info(m: &Manager) -> Option<Value> {
    let o = m.ctl(&["--format", "json", "info"]);
    o.status.success().then(|| serde_json::from_slice(&o.stdout).ok()).flatten()
}

/// Whether this machine can run the container tests (root, runc, busybox).
/// Without them the test is skipped loudly — recorded for `scripts/test`'s
/// summary — unless SWARMD_REQUIRE_ROOT / SWARMD_REQUIRE_RUNC make it mandatory.
pub fn can_run_containers(test: &str) -> bool {
    let mut missing = Vec::new();
    if !nix_is_root() {
        missing.push(("SWARMD_REQUIRE_ROOT", "root"));
    }
    if Command::new("runc").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        missing.push(("SWARMD_REQUIRE_RUNC", "runc"));
    }
    if busybox().is_none() {
        missing.push(("SWARMD_REQUIRE_RUNC", "busybox (Debian's busybox-static)"));
    }
    if missing.is_empty() {
        return true;
    }
    let what: Vec<&str> = missing.iter().map(|(_, w)| *w).collect();
    for (var, _) in &missing {
        if std::env::var(var).is_ok_and(|v| v == "1") {
            panic!(
                "{test}: needs {} ({var}=1 makes it mandatory); scripts/setup installs them as root",
                what.join(", ")
            );
        }
    }
    let line = format!("SKIPPED {test}: needs {}\n", what.join(", "));
    eprintln!("\n!!!!! {line}");
    use std::io::Write;
    if let Ok(mut f) = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(Path::new(env!("CARGO_TARGET_TMPDIR")).join("swarmd-skipped.txt"))
    {
        let _ = f.write_all(line.as_bytes());
    }
    false
}

fn nix_is_root() -> bool {
    // SAFETY-free: geteuid has no preconditions; read through /proc to avoid a libc dependency here.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// The busybox binary of Debian's busybox-static, if installed.
pub fn busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// A minimal root filesystem for workloads: a static busybox and the
/// directories a read-only rootfs must already have (`/run` for
/// `/run/secrets`, `/tmp`, `/proc`, `/dev`, `/sys`).
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    for d in ["bin", "dev", "proc", "sys", "tmp", "run", "etc"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    // In its user namespace a task's root is nobody to the host: it must be
    // able to search every directory down to the image. Test temp dirs are
    // 0700: those (only) are opened to search (not to listing) by others.
    let temp = [std::env::temp_dir(), PathBuf::from(env!("CARGO_TARGET_TMPDIR"))];
    for d in dir.ancestors() {
        let mode = fs::metadata(d).unwrap().permissions().mode();
        if mode & 0o001 == 0 {
            assert!(
                temp.iter().any(|t| d.starts_with(t) && d != t.as_path()),
                "{} (mode {mode:o}) is not searchable by others: a task cannot reach an image below it",
                d.display()
            );
            fs::set_permissions(d, fs::Permissions::from_mode((mode & 0o7777) | 0o001)).unwrap();
        }
    }
    // runc gives a tmpfs mount the mode of the directory it covers.
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::copy(busybox().expect("busybox"), dir.join("bin/busybox")).unwrap();
    for tool in ["sh", "cat", "id", "grep", "touch", "echo", "sha256sum", "sleep", "head", "ls", "stat", "mount"] {
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(tool));
    }
    fs::write(dir.join("etc/passwd"), "root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n").unwrap();
    dir.to_owned()
}

/// Writes an OCI image layout of `rootfs` at `layout` (`secretctl image
/// build-rootfs`, offline) named `name`; returns the manifest digest.
pub fn build_image(rootfs: &Path, layout: &Path, name: &str) -> String {
    let o = Command::new(secretctl_bin())
        .args(["image", "build-rootfs"])
        .arg(rootfs)
        .arg("--out")
        .arg(layout)
        .args(["--name", name])
        .output()
        .unwrap();
    assert!(o.status.success(), "build-rootfs: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

/// The test image every container test runs: [`busybox_rootfs`] built as an
/// image and loaded into `m`'s cluster as `busybox:1` (once per environment);
/// returns the name.
pub fn busybox_image(env: &Env, m: &Manager) -> String {
    let rootfs = env.path("busybox-rootfs");
    if !rootfs.exists() {
        busybox_rootfs(&rootfs);
    }
    load_rootfs(env, m, &rootfs, "busybox:1")
}

/// Builds `rootfs` as an image (once per environment and name) and loads it
/// into `m`'s cluster as `name`; returns the name.
pub fn load_rootfs(env: &Env, m: &Manager, rootfs: &Path, name: &str) -> String {
    let layout = env.path(&format!("{}-oci", name.replace([':', '/'], "-")));
    if !layout.exists() {
        build_image(rootfs, &layout, name);
    }
    m.ctl_ok(&["image", "load", layout.to_str().unwrap(), "--name", name]);
    name.to_owned()
}

/// Writes label updates (`c<client>=<n>` on `m`'s own node) to `m` from
/// `clients` concurrent clients until its raft log holds more than
/// `entries` entries; returns how many writes were made.
pub async fn fill_log(m: &Manager, entries: u64, clients: usize) -> usize {
    use swarmd_proto::control::control_client::ControlClient;
    use swarmd_proto::control::UpdateNodeRequest;
    let channel = swarmd::secretctl::connect(&swarmd::secretctl::Host::Unix(m.socket())).await.unwrap();
    let me = m.node_id();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = ControlClient::new(channel.clone());
        let (me, stop) = (me.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let req = UpdateNodeRequest {
                    id_or_prefix: me.clone(),
                    labels_add: [(format!("c{c}"), i.to_string())].into(),
                    ..Default::default()
                };
                client.update_node(req).await.unwrap();
                i += 1;
            }
            i
        }));
    }
    tokio::task::block_in_place(|| {
        wait_for("the log to fill", DEADLINE, || (info(m)?["last_log_index"].as_u64()? > entries).then_some(()))
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut writes = 0;
    for t in tasks {
        writes += t.await.unwrap();
    }
    writes
}

/// Waits until `m`'s latest snapshot covers log index `index`. openraft checks
/// its snapshot policy only as entries are applied, and skips the check while a
/// build is running: small writes keep it checking.
pub fn wait_snapshot_covering(m: &Manager, index: u64) -> serde_json::Value {
    let mut tick = 0;
    wait_for("a snapshot covering the writes", std::time::Duration::from_secs(180), || {
        let i = info(m)?;
        if i["snapshot_index"].as_u64()? >= index {
            return Some(i);
        }
        tick += 1;
        m.ctl(&["node", "update", &m.node_id(), "--label-add", &format!("tick={tick}")]);
        std::thread::sleep(std::time::Duration::from_millis(200));
        None
    })
}

/// Where a worker keeps its images: `$SWARMD_IMAGE_DIR/<node ID>`.
pub fn image_dir(node_id: &str) -> PathBuf {
    PathBuf::from(std::env::var("SWARMD_IMAGE_DIR").unwrap_or_else(|_| "/var/cache/swarmd/images".into())).join(node_id)
}

/// A process's resident set size, in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
