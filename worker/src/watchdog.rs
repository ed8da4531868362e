//! The task watchdog: whatever kills the worker, its containers and secret
//! mounts die with it.
//!
//! A worker's containers are not its children in any way that dies with it:
//! runc puts them in their own cgroups and namespaces, and a `kill -9` of the
//! worker (or an OOM kill, or a crash) would leave them running with their
//! secrets mounted, outside any cluster decision. So at start the worker spawns
//! a watchdog — the same binary, `swarmd worker watchdog --run-dir DIR
//! --runtime runc|crun` (a hidden subcommand; nothing secret in its argv) —
//! whose standard input is a pipe only the worker holds (close-on-exec, so no
//! runtime or container inherits it). The watchdog does nothing until that
//! pipe reaches end of file, which happens when the worker exits for any
//! reason. It then kills and deletes every container under the worker's
//! runtime root (through [`Runtime::command`], so crun keeps its hybrid-cgroup
//! workaround), wipes and unmounts each task's secret tmpfs, removes the run
//! dir, and exits. After a clean stop the worker has already done all that and
//! the watchdog finds nothing.
//!
//! The watchdog runs in its own process group and ignores SIGINT, SIGTERM and
//! SIGHUP, so a Ctrl-C or a terminal hangup that stops the worker does not
//! stop it first. It holds an exclusive lock on `<run dir>.lock` for its whole
//! life (and removes the file as it exits): a worker restarted at once waits
//! until the previous watchdog has finished, so that one cannot remove the new
//! worker's containers.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use crate::executor::Runtime;
use crate::secret_mount::SecretMount;

/// The line a watchdog prints once it holds the lock and watches.
const READY: &str = "watching";

/// Why the watchdog could not be started or run.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    /// Spawning it, or talking to it.
    #[error("task watchdog: {0}")]
    Io(#[from] std::io::Error),
    /// It exited or said something else instead of getting ready.
    #[error("task watchdog did not start: {0}")]
    NotReady(String),
}

/// The runtime a worker uses for `run_dir`: state in `runtime/`, bundles in `bundles/`.
pub fn runtime_for(run_dir: &Path, binary: &str) -> Runtime {
    Runtime::new(binary, &run_dir.join("runtime"), &run_dir.join("bundles"))
}

/// Whether `path` is a mount point (per `/proc/self/mountinfo`).
pub fn is_mount_point(path: &Path) -> bool {
    let Some(p) = path.to_str() else { return false };
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(p)))
        .unwrap_or(false)
}

/// PIDs of the runtime processes (`runc|crun --root STATE_DIR …`) working on
/// `state_dir` (`RUN/runtime`): after a worker's death its `run` processes are
/// orphans that may still write into the runtime's state dir.
fn runtime_processes(state_dir: &Path) -> Vec<i32> {
    let root = state_dir.as_os_str().as_encoded_bytes();
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.windows(2).any(|w| w[0] == b"--root" && w[1] == root)
        })
        .collect()
}

/// Kills and deletes every container of `runtime` and destroys every task
/// secret tmpfs below `run_dir/tasks` (wiped, unmounted, removed).
pub async fn clear_leftovers(runtime: &Runtime, run_dir: &Path) {
    clear_containers(runtime).await;
    clear_secret_mounts(&run_dir.join("tasks"));
}

/// Kills and deletes every container of `runtime`, then the runtime processes
/// a dead worker left working on its state dir.
pub(crate) async fn clear_containers(runtime: &Runtime) {
    runtime.remove_all().await;
    // Then the runtime processes a dead worker left (never this process's own:
    // a live worker has none when it calls this, before it starts tasks).
    for _ in 0..50 {
        let pids = runtime_processes(runtime.state_dir());
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Destroys every task secret tmpfs below `tasks` (wiped, unmounted, removed)
/// and removes the task directories.
pub(crate) fn clear_secret_mounts(tasks: &Path) {
    if let Ok(entries) = std::fs::read_dir(tasks) {
        for e in entries.flatten() {
            let path = e.path();
            if is_mount_point(&path) {
                SecretMount::adopt(&path).destroy();
                tracing::info!(path = %path.display(), "removed a secret mount left behind");
            }
            if !is_mount_point(&path) {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

/// The watchdog as seen from the worker: dropping it (or [`Watchdog::finish`])
/// closes its pipe.
pub struct Watchdog {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
}

impl Watchdog {
    /// Starts this executable's `worker watchdog` for `run_dir` and waits until
    /// it watches (after any watchdog of a previous run has finished).
    pub async fn spawn(run_dir: &Path, runtime: &str) -> Result<Self, WatchdogError> {
        let mut cmd = tokio::process::Command::new("/proc/self/exe");
        // Only what it needs: nothing of the worker's environment (a join
        // token may have come through it) reaches the watchdog.
        cmd.env_clear();
        for var in ["PATH", "RUST_LOG"] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        let mut child = cmd
            .args(["worker", "watchdog", "--run-dir"])
            .arg(run_dir)
            .args(["--runtime", runtime])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or_else(|| WatchdogError::NotReady("no stdout".into()))?;
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(stdout);
        // A previous run's watchdog may still be cleaning up: allow it time.
        match tokio::time::timeout(Duration::from_secs(120), reader.read_line(&mut line)).await {
            Ok(Ok(_)) if line.trim() == READY => Ok(Self { child, stdin }),
            Ok(Ok(_)) => {
                let _ = child.kill().await;
                Err(WatchdogError::NotReady(format!("it said {:?}", line.trim())))
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                let _ = child.kill().await;
                Err(WatchdogError::NotReady("no answer within 120 s".into()))
            }
        }
    }

    /// Keeps a watchdog running until `stop` fires, then [`Watchdog::finish`]es
    /// it: one that dies while the worker runs (killed, OOM) is replaced at once.
    pub async fn supervise(mut self, run_dir: PathBuf, runtime: String, mut stop: tokio::sync::oneshot::Receiver<()>) {
        loop {
            tokio::select! {
                status = self.child.wait() => {
                    tracing::error!(status = ?status, "the task watchdog exited; starting another");
                    let mut wait = Duration::from_millis(100);
                    self = loop {
                        match Watchdog::spawn(&run_dir, &runtime).await {
                            Ok(w) => break w,
                            Err(e) => tracing::error!(error = %e, "cannot restart the task watchdog"),
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = &mut stop => return,
                        }
                        wait = (wait * 2).min(Duration::from_secs(5));
                    };
                }
                _ = &mut stop => return self.finish().await,
            }
        }
    }

    /// Closes the pipe (the worker has cleaned up) and waits for the watchdog to exit.
    pub async fn finish(mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await.is_err() {
            tracing::warn!("the task watchdog did not exit");
        }
    }
}

fn lock_path(run_dir: &Path) -> PathBuf {
    let mut name = run_dir.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".lock");
    run_dir.with_file_name(name)
}

/// The watchdog itself (`swarmd worker watchdog`): waits for end of file on
/// standard input, then clears what the worker of `run_dir` left.
pub async fn run(run_dir: &Path, runtime: &str) -> Result<(), WatchdogError> {
    use tokio::signal::unix::{signal, SignalKind};
    // Registered handlers replace the default action (exit): these signals
    // are ignored from now on.
    let _ignored = [SignalKind::interrupt(), SignalKind::terminate(), SignalKind::hangup()]
        .into_iter()
        .map(signal)
        .collect::<Result<Vec<_>, _>>()?;
    let lock_file = lock_path(run_dir);
    if let Some(parent) = lock_file.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let lock = {
        let path = lock_file.clone();
        tokio::task::spawn_blocking(move || lock_exclusive(&path)).await.map_err(std::io::Error::other)??
    };
    // Say so, then wait for end of file on the pipe (on a blocking thread:
    // standard input is an ordinary blocking pipe).
    tokio::task::spawn_blocking(|| -> std::io::Result<()> {
        use std::io::{Read, Write};
        let mut out = std::io::stdout().lock();
        // A worker killed before it heard this (EPIPE) still needs its
        // tasks cleared: the end of file on standard input follows at once.
        if let Err(e) = out.write_all(format!("{READY}\n").as_bytes()).and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "the worker is gone before the watchdog was ready; clearing its tasks");
        }
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 64];
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)??;
    if run_dir.exists() {
        let rt = runtime_for(run_dir, runtime);
        clear_leftovers(&rt, run_dir).await;
        let tasks_left = std::fs::read_dir(run_dir.join("tasks")).map(|mut d| d.next().is_some()).unwrap_or(false);
        if tasks_left {
            tracing::error!(run_dir = %run_dir.display(), "secret mounts could not all be removed");
        } else {
            for _ in 0..50 {
                if std::fs::remove_dir_all(run_dir).is_ok() || !run_dir.exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tracing::info!(run_dir = %run_dir.display(), "watchdog: the worker is gone; its containers and mounts are removed");
    }
    // Unlinked while held: a watchdog waiting on this file sees it replaced and locks the new one.
    let _ = std::fs::remove_file(&lock_file);
    drop(lock);
    Ok(())
}

/// Takes an exclusive lock on the file at `path`, created if need be (0600).
/// The holder removes it before releasing it, so a lock taken on a file that
/// is no longer the one at `path` is retried.
fn lock_exclusive(path: &Path) -> std::io::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    loop {
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(path)?;
        let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| std::io::Error::from(e))?;
        let same = std::fs::metadata(path).map(|m| m.ino() == held.metadata().map(|h| h.ino()).unwrap_or(0));
        if same.unwrap_or(false) {
            return Ok(held);
        }
    }
}
