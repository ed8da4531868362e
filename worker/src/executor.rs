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

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use oci_spec::runtime::{
    LinuxCapabilities, LinuxIdMappingBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxSeccomp, Mount, MountBuilder, Spec, UserBuilder,
};
use tokio::io::AsyncReadExt;

pub use crate::userns::UserNamespace;
use crate::userns::{UsernsError, BLOCK_SIZE};

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
}

fn spec_err(e: impl std::fmt::Display) -> ExecError {
    ExecError::Spec(e.to_string())
}

fn seccomp() -> Result<LinuxSeccomp, ExecError> {
    crate::seccomp::default_filter().map_err(|e| ExecError::Spec(e.to_string()))
}

fn tmpfs(dest: &str, options: &[&str]) -> Result<Mount, ExecError> {
    MountBuilder::default()
        .destination(dest)
        .typ("tmpfs")
        .source("tmpfs")
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(|e| ExecError::Spec(e.to_string()))
}

/// The OCI spec for `c`, or why the policy refuses it.
pub fn build_spec(c: &ContainerSpec, hostname: &str) -> Result<Spec, ExecError> {
    if c.privileged {
        return Err(ExecError::Refused("privileged containers are not allowed in this cluster".into()));
    }
    if !c.cap_add.is_empty() {
        return Err(ExecError::Refused(format!(
            "adding capabilities ({}) is not allowed in this cluster",
            c.cap_add.join(", ")
        )));
    }
    if c.args.is_empty() {
        return Err(ExecError::Spec("no command to run".into()));
    }
    let mut spec = Spec::default();
    spec.set_hostname(Some(hostname.to_owned()));
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(c.rootfs.clone());
    root.set_readonly(Some(true));
    spec.set_root(Some(root));

    let (uid, gid) = c.user.unwrap_or((65534, 65534));
    c.userns.host_id(uid, "uid")?;
    c.userns.host_id(gid, "gid")?;
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_user(UserBuilder::default().uid(uid).gid(gid).build().map_err(|e| ExecError::Spec(e.to_string()))?);
    process.set_args(Some(c.args.clone()));
    let mut env = vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned()];
    env.extend(c.env.iter().cloned());
    process.set_env(Some(env));
    process.set_cwd("/".into());
    process.set_no_new_privileges(Some(true));
    let none = oci_spec::runtime::Capabilities::default();
    let mut caps = LinuxCapabilities::default();
    caps.set_bounding(Some(none.clone()));
    caps.set_effective(Some(none.clone()));
    caps.set_inheritable(Some(none.clone()));
    caps.set_permitted(Some(none.clone()));
    caps.set_ambient(Some(none));
    process.set_capabilities(Some(caps));
    spec.set_process(Some(process));

    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(tmpfs("/tmp", &["nosuid", "nodev", "mode=1777", "size=67108864"])?);
    mounts.push(tmpfs("/run", &["nosuid", "nodev", "noexec", "mode=755", "size=1048576"])?);
    if let Some(dir) = &c.secrets_dir {
        mounts.push(
            MountBuilder::default()
                .destination("/run/secrets")
                .typ("bind")
                .source(dir.clone())
                .options(["rbind", "ro", "nosuid", "nodev", "noexec"].iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .build()
                .map_err(|e| ExecError::Spec(e.to_string()))?,
        );
    }
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut ns = linux.namespaces().clone().unwrap_or_default();
    if c.host_network {
        ns.retain(|n| n.typ() != LinuxNamespaceType::Network);
    }
    if let UserNamespace::Private(block) = c.userns {
        let user = LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::User).build().map_err(spec_err)?;
        ns.push(user);
        let map = LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(block.base())
            .size(BLOCK_SIZE)
            .build()
            .map_err(spec_err)?;
        linux.set_uid_mappings(Some(vec![map]));
        linux.set_gid_mappings(Some(vec![map]));
        if c.host_network {
            // sysfs belongs to the network namespace: one owned by another
            // user namespace refuses the mount. The host's, read-only, instead.
            for m in mounts.iter_mut().filter(|m| m.typ().as_deref() == Some("sysfs")) {
                *m = MountBuilder::default()
                    .destination("/sys")
                    .typ("bind")
                    .source("/sys")
                    .options(["rbind", "ro", "nosuid", "nodev", "noexec"].map(String::from).to_vec())
                    .build()
                    .map_err(spec_err)?;
            }
        }
    }
    linux.set_namespaces(Some(ns));
    spec.set_mounts(Some(mounts));
    let mut resources = linux.resources().clone().unwrap_or_default();
    if let Some(m) = c.memory {
        resources.set_memory(Some(
            LinuxMemoryBuilder::default().limit(m).swap(m).build().map_err(|e| ExecError::Spec(e.to_string()))?,
        ));
    }
    if let Some(p) = c.pids {
        resources
            .set_pids(Some(LinuxPidsBuilder::default().limit(p).build().map_err(|e| ExecError::Spec(e.to_string()))?));
    }
    linux.set_resources(Some(resources));
    linux.set_seccomp(Some(seccomp()?));
    spec.set_linux(Some(linux));
    Ok(spec)
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

/// Whether this host mixes cgroup v1 controllers with a v2 hierarchy at
/// `/sys/fs/cgroup/unified` (the hybrid layout).
pub fn hybrid_cgroups() -> bool {
    let v1_root = nix::sys::statfs::statfs("/sys/fs/cgroup")
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false);
    v1_root && std::path::Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists()
}

/// Longest output line kept: a longer run of bytes without a newline is cut
/// into pieces of at most this size.
pub const MAX_LINE: usize = 4096;

/// Cuts a byte stream into lines of at most `max` bytes (without their `\n`).
#[derive(Debug)]
pub struct LineSplitter {
    partial: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    /// A splitter for lines of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { partial: Vec::new(), max: max.max(1) }
    }

    /// Feeds `bytes`; `line` gets each complete (or cut) line. A full piece is
    /// held until the next byte shows whether it ended at a newline.
    pub fn feed(&mut self, mut bytes: &[u8], mut line: impl FnMut(String)) {
        while !bytes.is_empty() {
            if self.partial.len() == self.max {
                if bytes[0] == b'\n' {
                    bytes = &bytes[1..];
                }
                line(self.take());
                continue;
            }
            let room = (self.max - self.partial.len()).min(bytes.len());
            match bytes[..room].iter().position(|b| *b == b'\n') {
                Some(i) => {
                    self.partial.extend_from_slice(&bytes[..i]);
                    bytes = &bytes[i + 1..];
                    line(self.take());
                }
                None => {
                    self.partial.extend_from_slice(&bytes[..room]);
                    bytes = &bytes[room..];
                }
            }
        }
    }

    /// The last, unterminated line, if any.
    pub fn finish(&mut self) -> Option<String> {
        (!self.partial.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let l = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        l
    }
}

/// A task's output, kept in memory only: the last `max_lines` lines, and no
/// more than [`LogRing::MAX_BYTES`] bytes of them.
#[derive(Clone, Debug)]
pub struct LogRing {
    inner: Arc<Mutex<Ring>>,
    max_lines: usize,
}

#[derive(Debug, Default)]
struct Ring {
    lines: VecDeque<String>,
    bytes: usize,
    total: u64,
}

impl LogRing {
    /// Bytes held at most.
    pub const MAX_BYTES: usize = 1 << 20;

    /// A ring of `max_lines` lines.
    pub fn new(max_lines: usize) -> Self {
        Self { inner: Arc::default(), max_lines: max_lines.max(1) }
    }

    fn push(&self, line: String) {
        let mut g = self.inner.lock().expect("log ring lock");
        while !g.lines.is_empty() && (g.lines.len() >= self.max_lines || g.bytes + line.len() > Self::MAX_BYTES) {
            if let Some(old) = g.lines.pop_front() {
                g.bytes -= old.len();
            }
        }
        g.bytes += line.len();
        g.lines.push_back(line);
        g.total += 1;
    }

    /// The lines held, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.inner.lock().expect("log ring lock").lines.iter().cloned().collect()
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.inner.lock().expect("log ring lock").bytes
    }

    /// The lines pushed after the first `seen` ever pushed (those still held),
    /// and the new count to pass next time.
    pub fn since(&self, seen: u64) -> (Vec<String>, u64) {
        let g = self.inner.lock().expect("log ring lock");
        let total = g.total;
        let new = (total - seen.min(total)).min(g.lines.len() as u64) as usize;
        (g.lines.iter().skip(g.lines.len() - new).cloned().collect(), total)
    }

    /// Reads `stream` to its end in bounded chunks, one line at a time into the ring.
    async fn pump(self, mut stream: impl tokio::io::AsyncRead + Unpin) {
        let mut buf = vec![0u8; 16 * 1024];
        let mut split = LineSplitter::new(MAX_LINE);
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => split.feed(&buf[..n], |l| self.push(l)),
            }
        }
        if let Some(l) = split.finish() {
            self.push(l);
        }
    }
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
            tokio::spawn(logs.clone().pump(stream));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]], max: usize) -> Vec<String> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |l| out.push(l));
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn output_lines_are_cut_at_the_maximum_length() {
        assert_eq!(split(&[b"a\nbc\n", b"d", b"e\nf"], 8), ["a", "bc", "de", "f"]);
        assert_eq!(split(&[b"abcdefghij\n"], 4), ["abcd", "efgh", "ij"]);
        assert_eq!(split(&[b"abcd\nef"], 4), ["abcd", "ef"]);
        assert_eq!(split(&[b"abcd", b"\nef"], 4), ["abcd", "ef"]);
        assert_eq!(split(&[b"\n\n"], 4), ["", ""]);
        // 1 MiB without a newline: pieces of 4 KiB.
        let big = vec![b'x'; 1 << 20];
        let lines = split(&[&big], MAX_LINE);
        assert_eq!(lines.len(), 256);
        assert!(lines.iter().all(|l| l.len() == MAX_LINE));
    }

    #[test]
    fn the_log_ring_is_bounded_in_lines_and_bytes() {
        let ring = LogRing::new(1000);
        for _ in 0..10_000 {
            ring.push("y".repeat(MAX_LINE));
        }
        assert!(ring.bytes() <= LogRing::MAX_BYTES, "{}", ring.bytes());
        assert_eq!(ring.lines().len(), LogRing::MAX_BYTES / MAX_LINE);
        let (recent, total) = ring.since(9_990);
        assert_eq!((recent.len(), total), (10, 10_000));
        let small = LogRing::new(3);
        for i in 0..5 {
            small.push(i.to_string());
        }
        assert_eq!(small.lines(), ["2", "3", "4"]);
    }

    fn namespaces(spec: &Spec) -> Vec<LinuxNamespaceType> {
        spec.linux().as_ref().unwrap().namespaces().as_ref().unwrap().iter().map(|n| n.typ()).collect()
    }

    fn mount<'a>(spec: &'a Spec, dest: &str) -> Option<&'a Mount> {
        spec.mounts().as_ref().unwrap().iter().find(|m| m.destination() == Path::new(dest))
    }

    #[test]
    fn the_default_spec_is_least_privilege_and_privilege_is_refused() {
        let block = crate::userns::IdBlock::new(5).unwrap();
        let c = ContainerSpec {
            rootfs: "/r".into(),
            args: vec!["true".into()],
            secrets_dir: Some("/s".into()),
            userns: UserNamespace::Private(block),
            ..Default::default()
        };
        let spec = build_spec(&c, "t").unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (65534, 65534));
        assert_eq!(p.no_new_privileges(), Some(true));
        let caps = p.capabilities().as_ref().unwrap();
        for set in [caps.bounding(), caps.effective(), caps.permitted(), caps.inheritable(), caps.ambient()] {
            assert!(set.as_ref().is_some_and(|s| s.is_empty()));
        }
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.seccomp().is_some());
        let ns = namespaces(&spec);
        for t in [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Cgroup,
            LinuxNamespaceType::Network,
            LinuxNamespaceType::User,
        ] {
            assert!(ns.contains(&t), "{t:?}");
        }
        let secrets = mount(&spec, "/run/secrets").unwrap();
        // Inside a user namespace a read-only bind needs the locked flags repeated (runc#1229).
        for o in ["ro", "nosuid", "nodev", "noexec"] {
            assert!(secrets.options().as_ref().unwrap().iter().any(|x| x == o), "{o}");
        }

        let host = build_spec(&ContainerSpec { host_network: true, ..c.clone() }, "t").unwrap();
        let ns = namespaces(&host);
        assert!(!ns.contains(&LinuxNamespaceType::Network));
        assert!(ns.contains(&LinuxNamespaceType::User));
        // No network namespace of its own: no sysfs mount from the user
        // namespace, the host's /sys read-only instead.
        let sys = mount(&host, "/sys").unwrap();
        assert_eq!(sys.typ().as_deref(), Some("bind"));
        for o in ["rbind", "ro", "nosuid", "nodev", "noexec"] {
            assert!(sys.options().as_ref().unwrap().iter().any(|x| x == o), "{o}");
        }
        assert_eq!(mount(&spec, "/sys").unwrap().typ().as_deref(), Some("sysfs"));
        assert!(matches!(
            build_spec(&ContainerSpec { privileged: true, ..c.clone() }, "t"),
            Err(ExecError::Refused(_))
        ));
        let caps = ContainerSpec { cap_add: vec!["NET_ADMIN".into()], ..c.clone() };
        assert!(matches!(build_spec(&caps, "t"), Err(ExecError::Refused(_))));
    }

    #[test]
    fn invariant_9_every_container_gets_a_user_namespace_of_its_own_unless_host_is_asked() {
        let block = crate::userns::IdBlock::new(2).unwrap();
        let c = ContainerSpec {
            rootfs: "/r".into(),
            args: vec!["true".into()],
            userns: UserNamespace::Private(block),
            ..Default::default()
        };
        let spec = build_spec(&c, "t").unwrap();
        let linux = spec.linux().as_ref().unwrap();
        for maps in [linux.uid_mappings(), linux.gid_mappings()] {
            let maps = maps.as_ref().unwrap();
            assert_eq!(maps.len(), 1);
            let m = maps[0];
            assert_eq!((m.container_id(), m.host_id(), m.size()), (0, (1 << 31) + 2 * 65536, 65536));
        }
        // The task's user stays 65534 inside; the host sees base + 65534.
        let user = spec.process().as_ref().unwrap().user();
        assert_eq!((user.uid(), user.gid()), (65534, 65534));

        // A forgotten choice is refused, never the host's namespace.
        let unset = ContainerSpec { userns: UserNamespace::Unset, ..c.clone() };
        assert!(matches!(build_spec(&unset, "t"), Err(ExecError::Userns(UsernsError::Unset))));
        // IDs the namespace does not map are refused with what to do.
        let far = ContainerSpec { user: Some((70_000, 0)), ..c.clone() };
        let e = build_spec(&far, "t").unwrap_err();
        assert!(e.to_string().contains("--userns host"), "{e}");
        // --userns host: no user namespace, no mappings, uid 70000 allowed.
        let host = build_spec(&ContainerSpec { userns: UserNamespace::Host, ..far }, "t").unwrap();
        assert!(!namespaces(&host).contains(&LinuxNamespaceType::User));
        assert!(host.linux().as_ref().unwrap().uid_mappings().as_ref().is_none_or(|m| m.is_empty()));
    }
}
