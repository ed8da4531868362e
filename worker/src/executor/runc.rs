//! The runtime process driver: runc (or crun) run in the foreground of a
//! child process, one per container, with the bundle it reads written first.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::{build_spec, BoxFuture, Container, ContainerRuntime, ContainerSpec, ExecError, LogRing, UserNamespace};

/// Whether this host mixes cgroup v1 controllers with a v2 hierarchy at
/// `/sys/fs/cgroup/unified` (the hybrid layout).
pub fn hybrid_cgroups() -> bool {
    let v1_root = nix::sys::statfs::statfs("/sys/fs/cgroup")
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false);
    v1_root && std::path::Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists()
}

/// Checks that a task's root in its own user namespace (to the host: a uid of
/// nobody's) can reach `rootfs`: every directory from `/` down to it must be
/// searchable by others, since runc mounts the root filesystem from inside
/// the namespace. Refused with what to change otherwise.
fn reachable_from_a_user_namespace(rootfs: &Path) -> Result<(), ExecError> {
    use std::os::unix::fs::PermissionsExt;
    let bad = |why: String| ExecError::BadImage { path: rootfs.to_owned(), why };
    let full = std::fs::canonicalize(rootfs).map_err(|e| bad(e.to_string()))?;
    for dir in full.ancestors() {
        let mode = std::fs::metadata(dir).map_err(|e| bad(format!("{}: {e}", dir.display())))?.permissions().mode();
        if mode & 0o001 == 0 {
            return Err(bad(format!(
                "{} (mode {:04o}) is not searchable by others, so the task's root in its user namespace cannot \
                 reach the image: make every directory down to the image o+x, or run the service with --userns host",
                dir.display(),
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

/// An OCI runtime binary and where it keeps its state and our bundles.
#[derive(Clone, Debug)]
pub struct Runtime {
    binary: String,
    state_dir: PathBuf,
    bundles: PathBuf,
}

/// A started container.
pub struct Running {
    /// Its ID.
    pub id: String,
    /// Its output.
    pub logs: LogRing,
    child: tokio::process::Child,
    runtime: Runtime,
}

impl Runtime {
    /// `binary` (`runc` or `crun`), state under `state_dir`, bundles under `bundles`.
    pub fn new(binary: &str, state_dir: &Path, bundles: &Path) -> Self {
        Self { binary: binary.to_owned(), state_dir: state_dir.to_owned(), bundles: bundles.to_owned() }
    }

    /// The runtime binary.
    pub fn binary(&self) -> &str {
        &self.binary
    }

    /// Where the runtime keeps its state (its `--root`).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// A command running the runtime with `--root` set. crun refuses hosts with
    /// cgroups in hybrid mode (v1 controllers plus `/sys/fs/cgroup/unified`);
    /// there it runs in a private mount namespace where `unified` is hidden
    /// (unmounted there, or covered by an empty tmpfs), as DESIGN.md describes.
    /// runc handles hybrid hosts itself.
    pub fn command(&self) -> tokio::process::Command {
        let mut c = if self.binary.ends_with("crun") && hybrid_cgroups() {
            let mut c = tokio::process::Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(
                    "umount -l /sys/fs/cgroup/unified 2>/dev/null || mount -t tmpfs none /sys/fs/cgroup/unified; \
                     exec \"$0\" \"$@\"",
                )
                .arg(&self.binary);
            c
        } else {
            tokio::process::Command::new(&self.binary)
        };
        c.arg("--root").arg(&self.state_dir);
        c
    }

    /// The IDs of the containers under this runtime's state dir, or why they
    /// cannot be listed.
    pub async fn list(&self) -> Result<Vec<String>, ExecError> {
        if !self.state_dir.exists() {
            return Ok(Vec::new());
        }
        let out = self.command().args(["list", "-q"]).stderr(Stdio::null()).output().await.map_err(|e| self.err(e))?;
        if !out.status.success() {
            return Err(self.err(format!("list: {}", out.status)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(str::to_owned).collect())
    }

    /// Kills and deletes every container under this runtime's state dir (what a
    /// worker that died left behind).
    pub async fn remove_all(&self) {
        if !self.state_dir.exists() {
            return;
        }
        let Ok(out) = self.command().args(["list", "-q"]).stderr(Stdio::null()).output().await else { return };
        for id in String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()) {
            let quiet = |c: &mut tokio::process::Command| {
                c.stdout(Stdio::null()).stderr(Stdio::null());
            };
            let mut kill = self.command();
            kill.args(["kill", "--all", id, "KILL"]);
            quiet(&mut kill);
            let _ = kill.status().await;
            let mut delete = self.command();
            delete.args(["delete", "--force", id]);
            quiet(&mut delete);
            let _ = delete.status().await;
            let _ = std::fs::remove_dir_all(self.bundles.join(id));
            tracing::info!(container = %id, "removed a container left behind");
        }
    }

    fn err(&self, why: impl std::fmt::Display) -> ExecError {
        ExecError::Runtime { runtime: self.binary.clone(), why: why.to_string() }
    }

    /// Writes the bundle for `id` and starts the container in the foreground of
    /// a child runtime process whose output feeds the log ring.
    pub async fn start(&self, id: &str, c: &ContainerSpec) -> Result<Running, ExecError> {
        let meta = std::fs::metadata(c.rootfs.join("bin"))
            .map_err(|e| ExecError::BadImage { path: c.rootfs.clone(), why: format!("no bin/ directory: {e}") })?;
        if !meta.is_dir() {
            return Err(ExecError::BadImage { path: c.rootfs.clone(), why: "bin is not a directory".into() });
        }
        if matches!(c.userns, UserNamespace::Private(_)) {
            reachable_from_a_user_namespace(&c.rootfs)?;
        }
        if c.secrets_dir.is_some() && !c.rootfs.join("run").is_dir() {
            return Err(ExecError::BadImage {
                path: c.rootfs.clone(),
                why: "no run/ directory to mount /run/secrets below (the root filesystem is read-only)".into(),
            });
        }
        let spec = build_spec(c, id)?;
        let bundle = self.bundles.join(id);
        std::fs::create_dir_all(&bundle).map_err(|e| self.err(format!("{}: {e}", bundle.display())))?;
        let json = serde_json::to_vec_pretty(&spec).map_err(|e| ExecError::Spec(e.to_string()))?;
        std::fs::write(bundle.join("config.json"), json).map_err(|e| self.err(e))?;
        std::fs::create_dir_all(&self.state_dir).map_err(|e| self.err(e))?;
        let mut child = self
            .command()
            .args(["run", "--no-new-keyring", "--bundle"])
            .arg(&bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| self.err(format!("cannot start: {e}")))?;
        let logs = LogRing::new(1000);
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            swarmd_certs::spawn_loop("log-pump", logs.clone().pump(stream));
        }
        Ok(Running { id: id.to_owned(), logs, child, runtime: self.clone() })
    }
}

impl Running {
    /// Waits for the container to exit; returns its exit code.
    pub async fn wait(&mut self) -> Result<i32, ExecError> {
        let status = self.child.wait().await.map_err(|e| self.runtime.err(e))?;
        Ok(status.code().unwrap_or(128 + nix::libc::SIGKILL))
    }

    /// Stops the container (SIGTERM, then SIGKILL after `grace`) and removes it
    /// and its bundle; an error if the runtime still knows the container after
    /// that (its user namespace block must then stay held).
    pub async fn stop(&mut self, grace: std::time::Duration) -> Result<(), ExecError> {
        let rt = &self.runtime;
        let signal = |sig: &'static str| {
            rt.command().args(["kill", "--all", &self.id, sig]).stdout(Stdio::null()).stderr(Stdio::null()).status()
        };
        let _ = signal("TERM").await;
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            let _ = signal("KILL").await;
            let _ = self.child.wait().await;
        }
        let _ = rt
            .command()
            .args(["delete", "--force", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        let _ = std::fs::remove_dir_all(rt.bundles.join(&self.id));
        let state = rt.command().args(["state", &self.id]).stdout(Stdio::null()).stderr(Stdio::null()).status().await;
        match state {
            Ok(s) if !s.success() => Ok(()),
            Ok(_) => Err(rt.err(format!("container {} is still there after delete", self.id))),
            Err(e) => Err(rt.err(format!("cannot ask about container {}: {e}", self.id))),
        }
    }
}

impl ContainerRuntime for Runtime {
    fn list(&self) -> BoxFuture<'_, Result<Vec<String>, ExecError>> {
        Box::pin(Runtime::list(self))
    }

    fn remove_leftovers(&self) -> BoxFuture<'_, ()> {
        Box::pin(crate::watchdog::clear_containers(self))
    }

    fn start<'a>(
        &'a self,
        id: &'a str,
        spec: &'a ContainerSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Container>, ExecError>> {
        Box::pin(async move { Ok(Box::new(Runtime::start(self, id, spec).await?) as Box<dyn Container>) })
    }
}

impl Container for Running {
    fn logs(&self) -> &LogRing {
        &self.logs
    }

    fn wait(&mut self) -> BoxFuture<'_, Result<i32, ExecError>> {
        Box::pin(Running::wait(self))
    }

    fn stop(&mut self, grace: std::time::Duration) -> BoxFuture<'_, Result<(), ExecError>> {
        Box::pin(Running::stop(self, grace))
    }
}
