//! The worker's task agent: applies the assignments its session carries.
//!
//! Secrets arrive only with the tasks that reference them and live only in
//! memory here (`Zeroizing`, wiped when removed), and in each task's own
//! secret tmpfs. For each task it takes a block of host IDs for the task's user
//! namespace ([`crate::userns`]), mounts that tmpfs, writes the task's files
//! (owned by the task's IDs as the host sees them), starts the container,
//! reports its states, streams its output to the manager, and at the end stops
//! it, wipes and unmounts the tmpfs, and gives the block back once the
//! container is gone. A new
//! version of a secret replaces the file in place in every running task that
//! follows it.
//!
//! Every task also gets a workload identity before its container starts
//! ([`crate::identity`]): a key made here, a certificate from the managers,
//! both in the task's tmpfs (which every task has, secrets or not), renewed in
//! place at half its life and wiped with the tmpfs when the task ends. A task
//! that cannot get one within [`FIRST_IDENTITY_WITHIN`] fails.
//!
//! The agent reaches the host only through four seams: a
//! [`ContainerRuntime`], a [`SecretFs`], a `Reporter` and an `IdentitySource`
//! (the managers). The worker gives it runc or crun, tmpfs mounts and the
//! dispatcher RPCs; its unit tests (`agent/tests.rs`) give it recording fakes,
//! and need no root.

mod report;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use swarmd_proto::dispatcher::TaskState;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::executor::{BoxFuture, ContainerRuntime, ContainerSpec, ExecError, Runtime};
use crate::identity::{DispatcherIdentity, IdentityError, IdentitySource, Issued};
use crate::images::{ImageDefaults, ImageSource};
use crate::secret_mount::{SecretFile, SecretFs, Tmpfs};
use crate::userns::{IdAllocator, UserNamespace, ALLOCATION_FILE, MAX_BLOCKS};
use report::{LogCursor, Reporter};

/// How long a task gets between SIGTERM and SIGKILL when it is stopped (Docker's default is 10 s).
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long a task may wait for its first workload identity while no
/// manager answers (a refusal fails it at once).
pub const FIRST_IDENTITY_WITHIN: Duration = Duration::from_secs(60);

use crate::assignment::{Assignment, SecretKey, WorkTask as Task};

enum Control {
    Secrets(Vec<SecretFile>),
    Stop,
}

struct Handle {
    task: Task,
    ctl: mpsc::UnboundedSender<Control>,
}

/// What the agent acts through: the real host, or fakes in unit tests.
#[derive(Clone)]
pub(crate) struct Seams {
    /// Runs the containers.
    pub(crate) runtime: Arc<dyn ContainerRuntime>,
    /// Holds each task's secret files.
    pub(crate) secret_fs: Arc<dyn SecretFs>,
    /// Tells the managers about task states and output.
    pub(crate) reporter: Arc<dyn Reporter>,
    /// Issues the tasks' workload identities.
    pub(crate) identity: Arc<dyn IdentitySource>,
    /// Fetches and unpacks the tasks' images.
    pub(crate) images: Arc<dyn ImageSource>,
}

/// Applies assignments; one per worker process.
pub(crate) struct Agent {
    seams: Seams,
    run_dir: PathBuf,
    secrets: HashMap<SecretKey, Zeroizing<Vec<u8>>>,
    running: HashMap<String, Handle>,
    /// Every task loop still running, stopping or not: waited for at shutdown.
    loops: JoinSet<()>,
    /// Tasks this process has run to the end: never started again.
    finished: HashSet<String>,
    ended: (mpsc::UnboundedSender<Ended>, mpsc::UnboundedReceiver<Ended>),
    shutdown: CancellationToken,
    secrets_max: u64,
    /// The blocks of host IDs held by tasks' user namespaces.
    ids: IdAllocator,
}

/// A task loop's last word: its task ID, and whether its container is gone
/// (only then is its block of host IDs handed out again).
struct Ended {
    task: String,
    container_gone: bool,
}

/// What the agent holds, for `swarmd worker status`-like inspection and tests.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct AgentState {
    /// Task IDs with a live container or being prepared.
    pub tasks: Vec<String>,
    /// `secret-id@version` held in memory.
    pub secrets: Vec<String>,
}

impl Agent {
    pub(crate) fn new(
        channel: Channel,
        session: watch::Receiver<String>,
        runtime_bin: &str,
        run_dir: PathBuf,
        images: Arc<dyn ImageSource>,
        shutdown: CancellationToken,
    ) -> Self {
        let runtime = Runtime::new(runtime_bin, &run_dir.join("runtime"), &run_dir.join("bundles"));
        let seams = Seams {
            runtime: Arc::new(runtime),
            secret_fs: Arc::new(Tmpfs),
            reporter: Arc::new(report::Dispatcher::new(channel.clone(), session)),
            identity: Arc::new(DispatcherIdentity::new(channel)),
            images,
        };
        Self::with_seams(seams, run_dir, shutdown)
    }

    /// An agent acting through `seams`, keeping its state below `run_dir`.
    pub(crate) fn with_seams(seams: Seams, run_dir: PathBuf, shutdown: CancellationToken) -> Self {
        let ids = IdAllocator::load(&run_dir.join(ALLOCATION_FILE), MAX_BLOCKS, first_block(&run_dir));
        Self {
            seams,
            run_dir,
            secrets: HashMap::new(),
            running: HashMap::new(),
            loops: JoinSet::new(),
            finished: HashSet::new(),
            ended: mpsc::unbounded_channel(),
            shutdown,
            secrets_max: secrets_max(),
            ids,
        }
    }

    /// Removes containers and secret mounts a previous run of this worker left
    /// (its watchdog normally has already).
    pub(crate) async fn clean_up_leftovers(&self) {
        // What `crate::watchdog::clear_leftovers` does: containers (and the
        // runtime processes working for them) first, then the secret mounts.
        self.seams.runtime.remove_leftovers().await;
        self.seams.secret_fs.remove_leftovers(&self.run_dir.join("tasks"));
    }

    /// What is held now.
    pub(crate) fn state(&self) -> AgentState {
        let mut tasks: Vec<String> = self.running.keys().cloned().collect();
        tasks.sort();
        let mut secrets: Vec<String> = self.secrets.keys().map(|(id, v)| format!("{id}@{v}")).collect();
        secrets.sort();
        AgentState { tasks, secrets }
    }

    /// Runs until the shutdown token is cancelled, applying what arrives on
    /// `rx`; then stops every task.
    pub(crate) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Assignment>, state: watch::Sender<AgentState>) {
        self.clean_up_leftovers().await;
        // A block stays held while a container of an earlier run is still
        // there (one that could not be removed); the others are free again.
        match self.seams.runtime.list().await {
            Ok(alive) => {
                if let Err(e) = self.ids.retain(|t| alive.iter().any(|a| a == t)) {
                    tracing::error!(error = %e, "cannot save the user namespace allocation");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list containers: every saved user namespace block stays held"),
        }
        loop {
            tokio::select! {
                a = rx.recv() => match a {
                    Some(a) => self.apply(a),
                    None => break,
                },
                Some(end) = self.ended.1.recv() => {
                    self.running.remove(&end.task);
                    if end.container_gone {
                        if let Err(e) = self.ids.release(&end.task) {
                            tracing::error!(task.id = %end.task, error = %e, "cannot release a user namespace block");
                        }
                    } else {
                        tracing::warn!(task.id = %end.task, "the container may still be there: its user namespace block stays held");
                    }
                    self.finished.insert(end.task);
                }
                Some(_) = self.loops.join_next(), if !self.loops.is_empty() => {}
                _ = self.shutdown.cancelled() => break,
            }
            state.send_replace(self.state());
        }
        self.stop_all().await;
        state.send_replace(self.state());
    }

    /// Stops every task and forgets every secret (shutdown, or removal from
    /// the cluster): each task loop stops its container (SIGTERM, [`STOP_GRACE`],
    /// SIGKILL), deletes it, wipes and unmounts its secrets, and is waited for.
    pub(crate) async fn stop_all(&mut self) {
        for (_, h) in self.running.drain() {
            let _ = h.ctl.send(Control::Stop);
        }
        while let Some(r) = self.loops.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "a task loop failed");
            }
        }
        self.secrets.clear();
    }

    fn files_for(&self, task: &Task) -> Result<Vec<SecretFile>, String> {
        let mut files = Vec::new();
        for s in &task.spec.secrets {
            let data = self
                .secrets
                .get(&s.key)
                .ok_or_else(|| format!("secret {} version {} was not delivered", s.name, s.key.1))?;
            files.push(SecretFile { name: s.target.clone(), uid: s.uid, gid: s.gid, mode: s.mode, data: data.clone() });
        }
        Ok(files)
    }

    fn apply(&mut self, a: Assignment) {
        for (key, data) in a.secrets {
            self.secrets.insert(key, data);
        }
        let listed: HashSet<String> = a.tasks.iter().map(|t| t.id.clone()).collect();
        let mut stop: Vec<String> = a.removed_tasks.clone();
        if a.full {
            stop.extend(self.running.keys().filter(|id| !listed.contains(*id)).cloned());
        }
        for id in stop {
            if let Some(h) = self.running.remove(&id) {
                let _ = h.ctl.send(Control::Stop);
            }
        }
        for t in a.tasks {
            if !t.desired_running {
                match self.running.remove(&t.id) {
                    Some(h) => {
                        let _ = h.ctl.send(Control::Stop);
                    }
                    None => self.report(&t.id, TaskState::Shutdown, ""),
                }
                continue;
            }
            let changed = match self.running.get(&t.id) {
                Some(h) => Some(h.task.spec != t.spec),
                None => None,
            };
            match changed {
                Some(true) => {
                    let files = self.files_for(&t);
                    if let Some(h) = self.running.get_mut(&t.id) {
                        match files {
                            Ok(files) => {
                                let _ = h.ctl.send(Control::Secrets(files));
                            }
                            Err(e) => tracing::warn!(task.id = %t.id, error = %e, "cannot update secrets"),
                        }
                        h.task = t;
                    }
                }
                Some(false) => {}
                None if self.finished.contains(&t.id) => {}
                None => self.start(t),
            }
        }
        for k in a.removed_secrets {
            // Dropping the Zeroizing buffer wipes it.
            self.secrets.remove(&k);
        }
        if a.full {
            let needed: HashSet<SecretKey> =
                self.running.values().flat_map(|h| h.task.spec.secrets.iter()).map(|s| s.key.clone()).collect();
            self.secrets.retain(|k, _| needed.contains(k));
        }
    }

    fn report(&self, task: &str, state: TaskState, message: &str) {
        self.seams.reporter.report(task, state, message);
    }

    fn start(&mut self, t: Task) {
        let files = match self.files_for(&t) {
            Ok(f) => f,
            Err(e) => {
                self.report(&t.id, TaskState::Rejected, &e);
                self.finished.insert(t.id.clone());
                return;
            }
        };
        let userns = if t.spec.host_userns {
            UserNamespace::Host
        } else {
            match self.ids.allocate(&t.id) {
                Ok(block) => UserNamespace::Private(block),
                Err(e) => {
                    tracing::error!(task.id = %t.id, error = %e, "no user namespace for the task");
                    self.report(&t.id, TaskState::Failed, &format!("user namespace: {e}"));
                    self.finished.insert(t.id.clone());
                    return;
                }
            }
        };
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        let ctx = TaskCtx {
            seams: self.seams.clone(),
            dir: self.run_dir.join("tasks").join(&t.id),
            secrets_max: self.secrets_max,
            ended: self.ended.0.clone(),
            userns,
        };
        self.loops.spawn(run_task(ctx, t.clone(), files, ctl_rx));
        self.running.insert(t.id.clone(), Handle { task: t, ctl });
    }
}

struct TaskCtx {
    seams: Seams,
    dir: PathBuf,
    /// How far the task's secret tmpfs may grow.
    secrets_max: u64,
    ended: mpsc::UnboundedSender<Ended>,
    /// The task's user namespace.
    userns: UserNamespace,
}

/// Where this worker's search for a free block of host IDs starts: from its
/// node ID (its run dir's name), so that workers on one kernel rarely meet.
fn first_block(run_dir: &std::path::Path) -> u32 {
    let name = run_dir.file_name().map(|n| n.as_encoded_bytes().to_vec()).unwrap_or_default();
    // FNV-1a: stable across builds and versions, unlike std's hasher.
    name.iter().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)) % MAX_BLOCKS
}

/// What a task's secret tmpfs may grow to: `SWARMD_TASK_SECRETS_MAX` (bytes),
/// default [`crate::secret_mount::DEFAULT_MAX_SIZE`].
fn secrets_max() -> u64 {
    std::env::var("SWARMD_TASK_SECRETS_MAX")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(crate::secret_mount::DEFAULT_MAX_SIZE)
}

/// Where a task's first identity stands while it prepares.
enum FirstIdentity {
    Ready(Issued),
    /// The cluster issues none: the task runs without.
    NotIssued,
    Stopped,
    Failed(String),
}

/// Asks for the task's first identity, retrying while no manager answers (up
/// to [`FIRST_IDENTITY_WITHIN`]), until a stop; a secret update that arrives
/// meanwhile is kept in `pending`.
async fn first_identity(
    src: &dyn IdentitySource,
    task: &str,
    ctl: &mut mpsc::UnboundedReceiver<Control>,
    pending: &mut Option<Vec<SecretFile>>,
) -> FirstIdentity {
    let deadline = tokio::time::Instant::now() + FIRST_IDENTITY_WITHIN;
    let mut backoff = swarmd_certs::renew::Backoff::new(Duration::from_millis(500), Duration::from_secs(8));
    let mut attempt: Option<BoxFuture<'static, Result<Issued, IdentityError>>> = Some(src.issue(task));
    let mut retry_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            r = async { attempt.as_mut().expect("an attempt").await }, if attempt.is_some() => {
                attempt = None;
                match r {
                    Ok(issued) => return FirstIdentity::Ready(issued),
                    Err(IdentityError::NotIssued) => return FirstIdentity::NotIssued,
                    Err(e) if e.is_final() || tokio::time::Instant::now() >= deadline => {
                        return FirstIdentity::Failed(e.to_string())
                    }
                    Err(e) => {
                        let wait = backoff.next_delay();
                        tracing::warn!(task.id = %task, error = %e, retry_in = wait.as_secs_f64(), "no workload identity yet");
                        retry_at = tokio::time::Instant::now() + wait;
                    }
                }
            }
            _ = tokio::time::sleep_until(retry_at), if attempt.is_none() => attempt = Some(src.issue(task)),
            cmd = ctl.recv() => match cmd {
                Some(Control::Secrets(files)) => *pending = Some(files),
                Some(Control::Stop) | None => return FirstIdentity::Stopped,
            },
        }
    }
}

/// Waits until the task is told to stop, keeping the newest secret files
/// sent meanwhile in `newer`.
async fn wait_for_stop(ctl: &mut mpsc::UnboundedReceiver<Control>, newer: &mut Option<Vec<SecretFile>>) {
    loop {
        match ctl.recv().await {
            Some(Control::Stop) | None => return,
            Some(Control::Secrets(files)) => *newer = Some(files),
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The container's user, as the executor runs it (65534 unless `--user`).
fn task_user(spec: &crate::assignment::TaskSpec) -> (u32, u32) {
    spec.user.unwrap_or((65534, 65534))
}

async fn run_task(ctx: TaskCtx, t: Task, mut files: Vec<SecretFile>, mut ctl: mpsc::UnboundedReceiver<Control>) {
    let id = t.id.clone();
    let rep = |state: TaskState, msg: String| ctx.seams.reporter.report(&id, state, &msg);
    rep(TaskState::Preparing, String::new());
    let spec = &t.spec;
    // The image first: checked digest by digest, unpacked (or found) in the
    // node's cache, and held until the task ends.
    let (rootfs, defaults, _image) = if spec.image_digest.is_empty() {
        if spec.trust.is_some() {
            // A directory has no digest to sign: under content trust it never runs.
            rep(TaskState::Rejected, "content trust: a directory on the node cannot be trusted as an image".into());
            let _ = ctx.ended.send(Ended { task: id, container_gone: true });
            return;
        }
        (PathBuf::from(&spec.image), ImageDefaults::default(), None)
    } else {
        let mut newer = None;
        let prepared = tokio::select! {
            p = ctx.seams.images.prepare(&id, &spec.image_digest, spec.trust.clone()) => p,
            _ = wait_for_stop(&mut ctl, &mut newer) => {
                rep(TaskState::Shutdown, "stopped before it started".into());
                let _ = ctx.ended.send(Ended { task: id, container_gone: true });
                return;
            }
        };
        if let Some(f) = newer {
            files = f;
        }
        match prepared {
            Ok(p) => (p.rootfs.path().to_owned(), p.defaults.clone(), Some(p)),
            Err(e) => {
                tracing::warn!(task.id = %id, image = %spec.image_digest, error = %e, "image refused");
                rep(TaskState::Rejected, format!("image: {e}"));
                let _ = ctx.ended.send(Ended { task: id, container_gone: true });
                return;
            }
        }
    };
    let Some(args) =
        (if spec.image_digest.is_empty() { Some(spec.args.clone()) } else { defaults.command(&spec.args) })
    else {
        rep(TaskState::Rejected, "the image has no command (Entrypoint or Cmd) and the service gives none".into());
        let _ = ctx.ended.send(Ended { task: id, container_gone: true });
        return;
    };
    let user = task_user(spec);
    let size: u64 = files.iter().map(|f| f.data.len() as u64 + 4096).sum::<u64>().max(1 << 20);
    // Every task has a tmpfs: its identity lives there, secrets or not.
    let mut mount =
        match ctx.seams.secret_fs.create(&ctx.dir, size.min(ctx.secrets_max), ctx.secrets_max, ctx.userns, &files) {
            Ok(m) => m,
            Err(e) => {
                rep(TaskState::Failed, format!("secrets: {e}"));
                let _ = ctx.ended.send(Ended { task: id, container_gone: true });
                return;
            }
        };
    drop(files);
    // A secret update that could not be written: retried with backoff until
    // it is (or a newer one replaces it, or the task ends); meanwhile the
    // task's message says so.
    let mut pending: Option<Vec<SecretFile>> = None;
    let identity = match first_identity(ctx.seams.identity.as_ref(), &id, &mut ctl, &mut pending).await {
        FirstIdentity::Ready(issued) => {
            mount.write_identity(&issued.files, user).map(|()| Some(issued)).map_err(|e| e.to_string())
        }
        FirstIdentity::NotIssued => Ok(None),
        FirstIdentity::Failed(e) => Err(e),
        FirstIdentity::Stopped => {
            mount.destroy();
            rep(TaskState::Shutdown, "stopped before it started".into());
            let _ = ctx.ended.send(Ended { task: id, container_gone: true });
            return;
        }
    };
    // When the identity is renewed next; never without one.
    let mut renew_at = match identity {
        Ok(Some(issued)) => {
            tracing::info!(task.id = %id, spiffe.id = %issued.spiffe_id, "workload identity installed");
            Some(tokio::time::Instant::now() + issued.renew_after())
        }
        Ok(None) => {
            tracing::info!(task.id = %id, "this cluster issues no workload identities: the task runs without one");
            None
        }
        Err(e) => {
            rep(TaskState::Failed, format!("workload identity: {e}"));
            mount.destroy();
            let _ = ctx.ended.send(Ended { task: id, container_gone: true });
            return;
        }
    };
    let c = ContainerSpec {
        rootfs,
        args,
        env: defaults.env(&spec.env),
        cwd: defaults.cwd.clone(),
        user: spec.user,
        memory: spec.memory,
        pids: spec.pids,
        host_network: spec.host_network,
        secrets_dir: Some(mount.dir().to_owned()),
        userns: ctx.userns,
        ..Default::default()
    };
    let mut running = match ctx.seams.runtime.start(&id, &c).await {
        Ok(r) => r,
        Err(e) => {
            let state = if matches!(e, ExecError::Refused(_) | ExecError::BadImage { .. } | ExecError::Userns(_)) {
                TaskState::Rejected
            } else {
                TaskState::Failed
            };
            rep(state, e.to_string());
            mount.destroy();
            let _ = ctx.ended.send(Ended { task: id, container_gone: true });
            return;
        }
    };
    rep(TaskState::Running, String::new());
    tracing::info!(task.id = %id, service = %t.service, "task running");
    let mut cursor = LogCursor::default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut retry_at = tokio::time::Instant::now();
    let mut backoff = swarmd_certs::renew::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    // The failure message last reported (each report is a raft write on the managers: only changes are sent).
    let mut failing: Option<String> = None;
    // The identity renewal in flight, and its backoff after failures.
    let mut renewal: Option<BoxFuture<'static, Result<Issued, IdentityError>>> = None;
    let mut renew_backoff = swarmd_certs::renew::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let (state, message) = loop {
        let retry = tokio::time::sleep_until(retry_at);
        tokio::select! {
            code = running.wait() => {
                break match code {
                    Ok(0) => (TaskState::Complete, "exit status 0".to_string()),
                    Ok(c) => (TaskState::Failed, format!("exit status {c}")),
                    Err(e) => (TaskState::Failed, e.to_string()),
                };
            }
            _ = tick.tick() => {
                let (lines, total) = running.logs().since(cursor.seen);
                let taken = ctx.seams.reporter.push_logs(&id, &lines, &mut cursor).await;
                cursor.seen = total - (lines.len() - taken) as u64;
            }
            _ = sleep_until_some(renew_at), if renewal.is_none() && renew_at.is_some() => {
                renewal = Some(ctx.seams.identity.issue(&id));
            }
            r = async { renewal.as_mut().expect("a renewal").await }, if renewal.is_some() => {
                renewal = None;
                let written = r.map_err(|e| e.to_string()).and_then(|issued| {
                    mount.write_identity(&issued.files, user).map(|()| issued).map_err(|e| e.to_string())
                });
                match written {
                    Ok(issued) => {
                        tracing::info!(task.id = %id, "workload identity renewed in place");
                        renew_backoff.reset(Duration::from_secs(1));
                        renew_at = Some(tokio::time::Instant::now() + issued.renew_after());
                    }
                    Err(e) => {
                        // The current certificate stays until it expires; it
                        // has half its life left when the first try fails.
                        let wait = renew_backoff.next_delay();
                        tracing::error!(task.id = %id, error = %e, retry_in = wait.as_secs_f64(), "cannot renew the workload identity");
                        renew_at = Some(tokio::time::Instant::now() + wait);
                    }
                }
            }
            _ = retry, if pending.is_some() => {
                let files = pending.take().unwrap_or_default();
                match mount.replace(&files) {
                    Ok(()) => {
                        tracing::info!(task.id = %id, "secrets updated in place");
                        if failing.take().is_some() {
                            rep(TaskState::Running, String::new());
                        }
                        backoff.reset(Duration::from_secs(1));
                    }
                    Err(e) => {
                        let wait = backoff.next_delay();
                        tracing::error!(task.id = %id, error = %e, retry_in = wait.as_secs_f64(), "cannot update secrets");
                        let msg = format!("secret update failed (the previous value is still in place; retrying): {e}");
                        if failing.as_deref() != Some(msg.as_str()) {
                            rep(TaskState::Running, msg.clone());
                            failing = Some(msg);
                        }
                        retry_at = tokio::time::Instant::now() + wait;
                        pending = Some(files);
                    }
                }
            }
            cmd = ctl.recv() => match cmd {
                Some(Control::Secrets(files)) => {
                    // The newest set replaces any that is waiting, and is tried now.
                    pending = Some(files);
                    retry_at = tokio::time::Instant::now();
                }
                Some(Control::Stop) | None => {
                    let _ = running.stop(STOP_GRACE).await;
                    break (TaskState::Shutdown, "stopped".to_string());
                }
            }
        }
    };
    drop(pending);
    drop(renewal);
    let (lines, _) = running.logs().since(cursor.seen);
    cursor.not_before = None;
    ctx.seams.reporter.push_logs(&id, &lines, &mut cursor).await;
    let gone = running.stop(Duration::from_millis(100)).await;
    if let Err(e) = &gone {
        tracing::error!(task.id = %id, error = %e, "cannot remove the task's container");
    }
    // The identity goes with the secrets: zeroed, unmounted.
    mount.destroy();
    rep(state, message);
    tracing::info!(task.id = %id, state = state.as_str_name(), "task ended");
    let _ = ctx.ended.send(Ended { task: id, container_gone: gone.is_ok() });
}
