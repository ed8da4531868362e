//! Recording fakes of the task agent's seams: one [`Host`] plays the container
//! runtime, the secret filesystem and the managers (reports and identities), and writes down everything
//! asked of it as [`Event`]s, in order; it fails the calls it is told to.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use swarmd_proto::dispatcher::TaskState;
use tokio::sync::watch;

use crate::agent::report::{LogCursor, Reporter};
use crate::executor::{BoxFuture, Container, ContainerRuntime, ContainerSpec, ExecError, LogRing};
use crate::identity::{IdentityError, IdentityFiles, IdentitySource, Issued};
use crate::secret_mount::{MountError, SecretFile, SecretFs, TaskSecrets};
use crate::userns::UserNamespace;

/// One thing asked of the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Event {
    /// The containers an earlier run left were removed.
    ClearedContainers,
    /// The secret mounts an earlier run left were removed.
    ClearedMounts,
    /// A task's secret filesystem was made, holding these (file name, content).
    Mounted(String, Vec<(String, Vec<u8>)>, UserNamespace),
    /// Its whole content was replaced in place.
    Replaced(String, Vec<(String, Vec<u8>)>),
    /// A workload identity was installed in it: task, certificate.
    Identity(String, String),
    /// It was wiped and removed.
    Wiped(String),
    /// A container start was asked for, with this `/run/secrets` source.
    Started(String, Option<PathBuf>, UserNamespace),
    /// A container was asked to stop.
    Stopped(String),
    /// A task state was reported: task, state, message.
    Reported(String, String, String),
}

use Event::*;

pub(super) type Log = Arc<Mutex<Vec<Event>>>;

pub(super) fn reported(task: &str, state: &str, message: &str) -> Event {
    Reported(task.into(), state.into(), message.into())
}

fn contents(files: &[SecretFile]) -> Vec<(String, Vec<u8>)> {
    files.iter().map(|f| (f.name.clone(), f.data.to_vec())).collect()
}

pub(super) fn file(name: &str, data: &str) -> (String, Vec<u8>) {
    (name.into(), data.as_bytes().to_vec())
}

/// The fake host: records every call, and fails the ones it is told to.
#[derive(Default)]
pub(super) struct Host {
    pub(super) log: Log,
    /// Task ID → how its container start fails (`refused`, or else a runtime error).
    pub(super) failing_starts: Mutex<HashMap<String, &'static str>>,
    /// Tasks whose secret filesystem cannot be made.
    pub(super) failing_mounts: Mutex<HashSet<String>>,
    /// How many of the next in-place replacements fail for lack of room.
    pub(super) failing_replaces: Arc<Mutex<u32>>,
    /// Tasks whose container is still there after a stop.
    pub(super) sticky: Mutex<HashSet<String>>,
    /// Task ID → its container's exit code, once it has one.
    pub(super) exits: Mutex<HashMap<String, watch::Sender<Option<i32>>>>,
    /// Tasks whose identity the managers refuse.
    pub(super) refused_identities: Mutex<HashSet<String>>,
    /// The lifetime of the identities issued (default 1 h).
    pub(super) identity_ttl: Mutex<Option<Duration>>,
    /// Identities issued so far (each certificate says which it is).
    pub(super) issued: Mutex<u32>,
}

impl Host {
    fn record(&self, e: Event) {
        self.log.lock().unwrap().push(e);
    }

    /// Makes task `id`'s container exit with `code` on its own.
    pub(super) fn exit(&self, id: &str, code: i32) {
        self.exits.lock().unwrap()[id].send_replace(Some(code));
    }
}

/// The task a secret filesystem belongs to: `.../tasks/<task ID>`.
fn task_of(root: &Path) -> String {
    root.file_name().unwrap().to_string_lossy().into_owned()
}

impl ContainerRuntime for Host {
    fn list(&self) -> BoxFuture<'_, Result<Vec<String>, ExecError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn remove_leftovers(&self) -> BoxFuture<'_, ()> {
        Box::pin(async { self.record(ClearedContainers) })
    }

    fn start<'a>(
        &'a self,
        id: &'a str,
        spec: &'a ContainerSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Container>, ExecError>> {
        Box::pin(async move {
            self.record(Started(id.into(), spec.secrets_dir.clone(), spec.userns));
            match self.failing_starts.lock().unwrap().get(id) {
                Some(&"refused") => return Err(ExecError::Refused("privileged containers are not allowed".into())),
                Some(_) => return Err(ExecError::Runtime { runtime: "fake".into(), why: "exec failed".into() }),
                None => {}
            }
            let (tx, exit) = watch::channel(None);
            self.exits.lock().unwrap().insert(id.into(), tx);
            let sticky = self.sticky.lock().unwrap().contains(id);
            let c = FakeContainer { id: id.into(), exit, sticky, log: self.log.clone(), logs: LogRing::new(10) };
            Ok(Box::new(c) as Box<dyn Container>)
        })
    }
}

struct FakeContainer {
    id: String,
    exit: watch::Receiver<Option<i32>>,
    sticky: bool,
    log: Log,
    logs: LogRing,
}

impl Container for FakeContainer {
    fn logs(&self) -> &LogRing {
        &self.logs
    }

    fn wait(&mut self) -> BoxFuture<'_, Result<i32, ExecError>> {
        Box::pin(async move {
            let code = self.exit.wait_for(Option::is_some).await.map(|c| c.unwrap_or_default());
            match code {
                Ok(code) => Ok(code),
                // The host is gone: the test is over.
                Err(_) => std::future::pending().await,
            }
        })
    }

    fn stop(&mut self, _grace: Duration) -> BoxFuture<'_, Result<(), ExecError>> {
        Box::pin(async move {
            self.log.lock().unwrap().push(Stopped(self.id.clone()));
            if self.sticky {
                Err(ExecError::Runtime { runtime: "fake".into(), why: "still there".into() })
            } else {
                Ok(())
            }
        })
    }
}

impl SecretFs for Host {
    fn create(
        &self,
        root: &Path,
        _size: u64,
        _max_size: u64,
        userns: UserNamespace,
        files: &[SecretFile],
    ) -> Result<Box<dyn TaskSecrets>, MountError> {
        let task = task_of(root);
        if self.failing_mounts.lock().unwrap().contains(&task) {
            return Err(MountError::NotTmpfs { path: root.to_owned(), found: 0xef53 });
        }
        self.record(Mounted(task.clone(), contents(files), userns));
        Ok(Box::new(FakeMount {
            task: task.clone(),
            dir: root.join("secrets"),
            log: self.log.clone(),
            failing: self.failing_replaces.clone(),
            wiped: false,
        }))
    }

    fn remove_leftovers(&self, _tasks: &Path) {
        self.record(ClearedMounts);
    }
}

struct FakeMount {
    task: String,
    dir: PathBuf,
    log: Log,
    failing: Arc<Mutex<u32>>,
    wiped: bool,
}

impl TaskSecrets for FakeMount {
    fn dir(&self) -> &Path {
        &self.dir
    }

    fn replace(&mut self, files: &[SecretFile]) -> Result<(), MountError> {
        let mut failing = self.failing.lock().unwrap();
        if *failing > 0 {
            *failing -= 1;
            return Err(MountError::TooLarge { need: 1 << 30, max: 64 << 20 });
        }
        self.log.lock().unwrap().push(Replaced(self.task.clone(), contents(files)));
        Ok(())
    }

    fn write_identity(&mut self, files: &IdentityFiles, _user: (u32, u32)) -> Result<(), MountError> {
        self.log.lock().unwrap().push(Identity(self.task.clone(), files.cert_pem.clone()));
        Ok(())
    }

    fn destroy(&mut self) {
        if !std::mem::replace(&mut self.wiped, true) {
            self.log.lock().unwrap().push(Wiped(self.task.clone()));
        }
    }
}

/// Like a [`crate::secret_mount::SecretMount`], a mount dropped is destroyed.
impl Drop for FakeMount {
    fn drop(&mut self) {
        self.destroy();
    }
}

impl Reporter for Host {
    fn report(&self, task: &str, state: TaskState, message: &str) {
        let name = state.as_str_name().trim_start_matches("TASK_STATE_").to_ascii_lowercase();
        self.record(reported(task, &name, message));
    }

    fn push_logs<'a>(
        &'a self,
        _task: &'a str,
        lines: &'a [String],
        _cursor: &'a mut LogCursor,
    ) -> BoxFuture<'a, usize> {
        Box::pin(async move { lines.len() })
    }
}

impl IdentitySource for Host {
    fn issue(&self, task: &str) -> BoxFuture<'static, Result<Issued, IdentityError>> {
        let r = if self.refused_identities.lock().unwrap().contains(task) {
            Err(IdentityError::Refused(format!("task {task} is not a live task of this node")))
        } else {
            let mut n = self.issued.lock().unwrap();
            *n += 1;
            let files = IdentityFiles {
                cert_pem: format!("cert {task} {n}"),
                key_pem: zeroize::Zeroizing::new(format!("key {n}")),
                bundle_pem: "bundle".into(),
            };
            let ttl = self.identity_ttl.lock().unwrap().unwrap_or(Duration::from_secs(3600));
            Ok(Issued { files, spiffe_id: "spiffe://c/service/s".into(), ttl })
        };
        Box::pin(async move { r })
    }
}
