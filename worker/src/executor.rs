//! Runs a task's container: an OCI bundle built with `oci-spec`, run by runc
//! (or crun), least-privilege by default (invariant 9).
//!
//! Defaults: user 65534:65534 unless given; no capabilities in any set; a
//! seccomp filter that refuses what Docker's default profile refuses (mounts,
//! module loading, kexec, ptrace, keyrings, BPF, namespace games, clock and
//! swap changes…); `no_new_privs`; a read-only root filesystem with a small
//! writable tmpfs at `/tmp`; private pid, mount, ipc, uts and cgroup namespaces
//! and a private network namespace unless `--network host`; memory and pids
//! limits when asked. Privileged containers and added capabilities are refused.
//!
//! The container's stdout and stderr go into a bounded in-memory ring, never to
//! disk: they may echo secrets.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use oci_spec::runtime::{
    Arch, LinuxCapabilities, LinuxMemoryBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxSeccomp,
    LinuxSeccompAction, LinuxSeccompBuilder, LinuxSyscallBuilder, Mount, MountBuilder, Spec, UserBuilder,
};
use tokio::io::{AsyncBufReadExt, BufReader};

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
}

/// The syscalls the default seccomp filter refuses with EPERM, as Docker's
/// default profile does (it allows only a list that excludes these).
const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "personality",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "syslog",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

fn seccomp() -> Result<LinuxSeccomp, ExecError> {
    let denied = LinuxSyscallBuilder::default()
        .names(DENIED_SYSCALLS.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(nix::errno::Errno::EPERM as u32)
        .build()
        .map_err(|e| ExecError::Spec(e.to_string()))?;
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32, Arch::ScmpArchAarch64])
        .syscalls(vec![denied])
        .build()
        .map_err(|e| ExecError::Spec(e.to_string()))
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

    let mut process = spec.process().clone().unwrap_or_default();
    let (uid, gid) = c.user.unwrap_or((65534, 65534));
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
    spec.set_mounts(Some(mounts));

    let mut linux = spec.linux().clone().unwrap_or_default();
    if c.host_network {
        let ns = linux.namespaces().clone().unwrap_or_default();
        linux.set_namespaces(Some(ns.into_iter().filter(|n| n.typ() != LinuxNamespaceType::Network).collect()));
    }
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

/// Whether this host mixes cgroup v1 controllers with a v2 hierarchy at
/// `/sys/fs/cgroup/unified` (the hybrid layout).
pub fn hybrid_cgroups() -> bool {
    let v1_root = nix::sys::statfs::statfs("/sys/fs/cgroup")
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false);
    v1_root && std::path::Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists()
}

/// A task's output, kept in memory only: the last `max_lines` lines.
#[derive(Clone, Debug)]
pub struct LogRing {
    inner: Arc<Mutex<(VecDeque<String>, u64)>>,
    max_lines: usize,
}

impl LogRing {
    /// A ring of `max_lines` lines.
    pub fn new(max_lines: usize) -> Self {
        Self { inner: Arc::default(), max_lines }
    }

    fn push(&self, line: String) {
        let mut g = self.inner.lock().expect("log ring lock");
        if g.0.len() == self.max_lines {
            g.0.pop_front();
        }
        g.0.push_back(line);
        g.1 += 1;
    }

    /// The lines held, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.inner.lock().expect("log ring lock").0.iter().cloned().collect()
    }

    /// The lines pushed after the first `seen` ever pushed (those still held),
    /// and the new count to pass next time.
    pub fn since(&self, seen: u64) -> (Vec<String>, u64) {
        let g = self.inner.lock().expect("log ring lock");
        let total = g.1;
        let new = (total - seen.min(total)).min(g.0.len() as u64) as usize;
        (g.0.iter().skip(g.0.len() - new).cloned().collect(), total)
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
            let ring = logs.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    ring.push(l);
                }
            });
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
    /// and its bundle.
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_spec_is_least_privilege_and_privilege_is_refused() {
        let c = ContainerSpec {
            rootfs: "/r".into(),
            args: vec!["true".into()],
            secrets_dir: Some("/s".into()),
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
        let ns: Vec<_> = linux.namespaces().as_ref().unwrap().iter().map(|n| n.typ()).collect();
        for t in [LinuxNamespaceType::Pid, LinuxNamespaceType::Mount, LinuxNamespaceType::Ipc, LinuxNamespaceType::Uts]
        {
            assert!(ns.contains(&t), "{t:?}");
        }
        assert!(ns.contains(&LinuxNamespaceType::Network));
        let secrets = spec.mounts().as_ref().unwrap().iter().find(|m| m.destination() == Path::new("/run/secrets"));
        assert!(secrets.unwrap().options().as_ref().unwrap().contains(&"ro".to_string()));

        let host = build_spec(&ContainerSpec { host_network: true, ..c.clone() }, "t").unwrap();
        let ns: Vec<_> =
            host.linux().as_ref().unwrap().namespaces().as_ref().unwrap().iter().map(|n| n.typ()).collect();
        assert!(!ns.contains(&LinuxNamespaceType::Network));
        assert!(matches!(
            build_spec(&ContainerSpec { privileged: true, ..c.clone() }, "t"),
            Err(ExecError::Refused(_))
        ));
        let caps = ContainerSpec { cap_add: vec!["NET_ADMIN".into()], ..c };
        assert!(matches!(build_spec(&caps, "t"), Err(ExecError::Refused(_))));
    }
}
