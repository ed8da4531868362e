//! Runs a task's container: an OCI bundle built with `oci-spec`, run by runc
//! (or crun), least-privilege by default (invariant 9).
//!
//! Defaults: user 65534:65534 unless given; no capabilities in any set; the
//! seccomp allowlist of Docker's default profile, made a little stricter
//! ([`crate::seccomp`]); `no_new_privs`; a read-only root filesystem with a small
//! writable tmpfs at `/tmp`; private pid, mount, ipc, uts and cgroup namespaces,
//! a private network namespace unless `--network host`, and a private user
//! namespace mapping container IDs 0–65535 to the task's own block of host IDs
//! ([`crate::userns`]) unless `--userns host`; memory and pids limits when
//! asked. Privileged containers and added capabilities are refused, and so is a
//! container for which no user namespace was chosen.
//!
//! In a user namespace the task's root is not host root: every directory above
//! the image must be searchable by others (runc mounts the root filesystem from
//! inside the namespace), and the image's files are read through their "other"
//! permission bits (host-owned files show as the overflow uid 65534). Bind
//! mount sources such as the secrets directory are opened by runc outside it.
//! On the host's network (no network namespace of its own) sysfs cannot be
//! mounted from a user namespace: the host's `/sys` is bound read-only instead.
//!
//! The container's stdout and stderr go into a bounded in-memory ring, never to
//! disk: they may echo secrets. They are read in chunks and cut into lines of
//! at most [`MAX_LINE`] bytes, so an endless line costs no more memory than a
//! short one.

//!
//! The OCI spec is built in `spec`, the output is kept in `logs`, and `runc`
//! drives the runtime process. The task agent sees a runtime only through
//! [`ContainerRuntime`] and [`Container`] (youki's syscall trait is the model),
//! so its logic has unit tests with fakes that need no root; [`Runtime`] is the
//! real one.

mod logs;
mod runc;
mod spec;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

pub use logs::{LineSplitter, LogRing, MAX_LINE};
pub use runc::{hybrid_cgroups, Running, Runtime};
pub use spec::build_spec;

pub use crate::userns::UserNamespace;
use crate::userns::UsernsError;

/// Why a container could not be set up or run.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// A request the policy refuses (privileged, added capabilities).
    #[error("refused by policy: {0}")]
    Refused(String),
    /// The image is not a usable root filesystem.
    #[error("image {path}: {why}")]
    BadImage { path: PathBuf, why: String },
    /// The OCI spec could not be built or written.
    #[error("OCI spec: {0}")]
    Spec(String),
    /// The runtime failed.
    #[error("{runtime}: {why}")]
    Runtime { runtime: String, why: String },
    /// The task's user namespace does not fit the spec (IDs it does not map),
    /// or none was chosen.
    #[error("user namespace: {0}")]
    Userns(#[from] UsernsError),
}

/// What to run, as a service spec describes it.
#[derive(Clone, Debug, Default)]
pub struct ContainerSpec {
    /// Root filesystem directory on this worker.
    pub rootfs: PathBuf,
    /// Command and arguments.
    pub args: Vec<String>,
    /// `K=V` environment entries.
    pub env: Vec<String>,
    /// User and group; `None`: 65534:65534.
    pub user: Option<(u32, u32)>,
    /// Memory limit in bytes.
    pub memory: Option<i64>,
    /// Process limit.
    pub pids: Option<i64>,
    /// Share the host's network namespace.
    pub host_network: bool,
    /// The directory to bind read-only at `/run/secrets`.
    pub secrets_dir: Option<PathBuf>,
    /// Asked for a privileged container (refused).
    pub privileged: bool,
    /// Asked for added capabilities (refused).
    pub cap_add: Vec<String>,
    /// The user namespace to run in; [`UserNamespace::Unset`] is refused.
    pub userns: UserNamespace,
    /// The working directory; `None`: `/`.
    pub cwd: Option<String>,
}

/// A boxed `Send` future: how [`ContainerRuntime`] and [`Container`] return
/// async work while staying usable as trait objects (no `async-trait`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the task agent needs of a container runtime. [`Runtime`] (runc or
/// crun) is the real one; the agent's unit tests use a recording fake.
pub trait ContainerRuntime: Send + Sync {
    /// The IDs of the containers this runtime holds, or why they cannot be listed.
    fn list(&self) -> BoxFuture<'_, Result<Vec<String>, ExecError>>;

    /// Kills and deletes every container this runtime holds and ends the
    /// runtime processes still working for them: what a worker that died left.
    fn remove_leftovers(&self) -> BoxFuture<'_, ()>;

    /// Starts container `id` as `spec` describes.
    fn start<'a>(
        &'a self,
        id: &'a str,
        spec: &'a ContainerSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Container>, ExecError>>;
}

/// A started container, as the task agent drives it.
pub trait Container: Send {
    /// Its output so far.
    fn logs(&self) -> &LogRing;

    /// Waits for it to exit and returns its exit code. Cancel safe: the agent
    /// drops this future whenever something else happens first, and asks again.
    fn wait(&mut self) -> BoxFuture<'_, Result<i32, ExecError>>;

    /// Stops it (SIGTERM, then SIGKILL after `grace`) and removes it; an error
    /// if it may still be there (its user namespace block then stays held).
    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, Result<(), ExecError>>;
}
