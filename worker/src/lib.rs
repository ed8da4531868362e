//! The swarmd worker.
//!
//! A worker joins with a token ([`Worker::join`]), keeps its key and
//! certificate in `certs/`, and then holds one session with a manager for as
//! long as it runs ([`Worker::run`]): heartbeats, and certificate renewal over
//! the same connection. [`Worker::open`] restarts it from its data dir — no
//! token needed.

pub mod agent;
pub mod assignment;
mod config;
pub mod executor;
pub mod identity;
pub mod images;
mod join;
pub mod seccomp;
pub mod secret_mount;
mod session;
pub mod userns;
pub mod watchdog;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use swarmd_certs::dial::{lazy_channel, Remotes};
use swarmd_certs::renew::{CertIssuer, Renewed, Renewer};
use swarmd_certs::tls::{ManagerSet, ServerChecks, TlsCredentials};
use swarmd_certs::NodeIdentity;
use swarmd_proto::ca::ca_client::CaClient;
use swarmd_proto::ca::RenewNodeCertificateRequest;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use config::{WorkerConfig, CONFIG_FILE};
pub use join::JoinOptions;
pub use swarmd_certs::join::JoinError;

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// Joining failed.
    #[error(transparent)]
    Join(#[from] JoinError),
    /// The data dir holds no worker.
    #[error("{path} holds no swarmd worker (no {CONFIG_FILE}); join with `swarmd worker join TOKEN --remote ADDR`")]
    NotAWorker { path: PathBuf },
    /// Config file problems.
    #[error("{0}")]
    Config(String),
    /// Certificates.
    #[error(transparent)]
    Cert(#[from] swarmd_certs::CertError),
    /// The task watchdog could not be started: without it, tasks could outlive the worker.
    #[error(transparent)]
    Watchdog(#[from] watchdog::WatchdogError),
}

/// A worker ready to run.
pub struct Worker {
    data_dir: PathBuf,
    cfg: WorkerConfig,
    creds: Arc<TlsCredentials>,
    /// The managers this worker accepts as servers, kept current by its sessions.
    managers: ManagerSet,
}

/// A worker's TLS credentials: its identity, accepting as servers only the
/// managers its config lists (once it lists any).
fn credentials(cfg: &WorkerConfig, identity: NodeIdentity) -> Result<(Arc<TlsCredentials>, ManagerSet), WorkerError> {
    let managers = ManagerSet::default();
    managers.replace(cfg.managers.iter().cloned().collect());
    let checks = ServerChecks { deny: None, managers: Some(managers.clone()) };
    Ok((Arc::new(TlsCredentials::client_only(identity, checks)?), managers))
}

impl Worker {
    /// Joins a cluster and stores the new identity in `opts.data_dir`.
    pub async fn join(opts: JoinOptions) -> Result<Self, WorkerError> {
        let (cfg, identity) = join::join(&opts).await?;
        let (creds, managers) = credentials(&cfg, identity)?;
        Ok(Self { data_dir: opts.data_dir, cfg, creds, managers })
    }

    /// Opens the worker stored in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, WorkerError> {
        let cfg = WorkerConfig::load(data_dir)?;
        let identity = NodeIdentity::load(&NodeIdentity::dir(data_dir))?;
        if identity.info.node_id != cfg.node_id {
            return Err(WorkerError::Config(format!(
                "{}: certificate is for node {}, config for {}",
                data_dir.display(),
                identity.info.node_id,
                cfg.node_id
            )));
        }
        let (creds, managers) = credentials(&cfg, identity)?;
        Ok(Self { data_dir: data_dir.to_owned(), cfg, creds, managers })
    }

    /// This worker's node ID.
    pub fn node_id(&self) -> &swarmd_certs::NodeId {
        &self.cfg.node_id
    }

    /// Holds a session and renews the certificate until `shutdown` is cancelled
    /// or the node is promoted to manager.
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerOutcome, WorkerError> {
        // First of all: whatever ends this process, its tasks end with it.
        let run_dir = run_dir(&self.cfg.node_id);
        if let Err(e) = create_run_dir(&run_dir) {
            tracing::warn!(error = %e, "cannot create this worker's private run dir; tasks will fail");
        }
        let runtime = self.cfg.runtime.clone().unwrap_or_else(|| "runc".into());
        let watchdog = watchdog::Watchdog::spawn(&run_dir, &runtime).await?;
        let (watchdog_stop, stop_rx) = tokio::sync::oneshot::channel();
        let watchdog =
            swarmd_certs::spawn_loop("watchdog", watchdog.supervise(run_dir.clone(), runtime.clone(), stop_rx));
        let remotes = Remotes::new(self.cfg.remotes.clone());
        let channel = lazy_channel(remotes.clone(), self.creds.client());
        let issuer = RpcIssuer { channel: channel.clone() };
        let renewer = Renewer::new(self.creds.clone(), NodeIdentity::dir(&self.data_dir), issuer);
        let renew_control = renewer.control();
        let tasks = shutdown.child_token();
        swarmd_certs::spawn_loop("cert-renewer", renewer.run(tasks.clone()));
        tracing::info!(node.id = %self.cfg.node_id, remotes = ?self.cfg.remotes, "worker running");
        let (session_tx, session_rx) = tokio::sync::watch::channel(String::new());
        let (assign_tx, assign_rx) = tokio::sync::mpsc::unbounded_channel();
        let images = images::DispatcherImages::new(channel.clone(), &images::image_dir(&self.cfg.node_id));
        let image_cache = images.cache();
        if let Some(cache) = images.cache() {
            swarmd_certs::spawn_loop("image-gc", images::DispatcherImages::collect_garbage(cache, tasks.clone()));
        }
        let agent = agent::Agent::new(
            channel.clone(),
            session_rx,
            &runtime,
            run_dir.clone(),
            std::sync::Arc::new(images),
            tasks.clone(),
        );
        let (state_tx, mut state_rx) = tokio::sync::watch::channel(agent::AgentState::default());
        let agent_done = swarmd_certs::spawn_loop("agent", agent.run(assign_rx, state_tx));
        // What the agent holds (task and secret IDs, never values), for `swarmd worker status`.
        let writer = swarmd_certs::spawn_loop("state-writer", async move {
            while state_rx.changed().await.is_ok() {
                let s = state_rx.borrow_and_update().clone();
                let _ = create_run_dir(&run_dir);
                let _ = swarmd_certs::write_atomic(
                    &run_dir.join("state.json"),
                    serde_json::to_string(&s).unwrap_or_default().as_bytes(),
                    0o600,
                );
            }
        });
        let session = session::SessionLoop::new(
            (channel, self.creds.client()),
            (remotes, self.managers.clone()),
            self.data_dir.clone(),
            self.cfg.clone(),
            session_tx,
            assign_tx,
            renew_control,
        );
        let end = session.run(shutdown).await;
        // Stops every task (SIGTERM, a grace period, SIGKILL) and waits for each,
        // unmounts and wipes their secret filesystems and drops every secret
        // from memory.
        tasks.cancel();
        let _ = agent_done.await;
        // Nothing is left running: the runtime state, bundles and status go too.
        let _ = writer.await;
        let _ = std::fs::remove_dir_all(crate::run_dir(&self.cfg.node_id));
        // Its tasks are gone: so are the mounts through which they reached their images.
        if let Some(cache) = image_cache {
            cache.unmount_all();
        }
        if end == session::SessionEnd::Removed {
            // Out of the cluster: its images go too.
            let _ = std::fs::remove_dir_all(images::image_dir(&self.cfg.node_id));
        }
        // Nothing left for the watchdog to do: it sees its pipe close and exits.
        let _ = watchdog_stop.send(());
        let _ = watchdog.await;
        tracing::info!("worker stopped");
        Ok(match end {
            session::SessionEnd::Stopped => WorkerOutcome::Stopped,
            session::SessionEnd::Promoted => WorkerOutcome::Promoted,
            session::SessionEnd::Removed => WorkerOutcome::Removed,
        })
    }
}

/// Where a worker keeps its runtime state, task bundles and secret mounts:
/// `$SWARMD_RUN_DIR/<node ID>` (default `/run/swarmd`).
pub fn run_dir(node: &swarmd_certs::NodeId) -> PathBuf {
    PathBuf::from(std::env::var("SWARMD_RUN_DIR").unwrap_or_else(|_| "/run/swarmd".into())).join(node.as_str())
}

/// Creates `dir` (a worker's run dir) with mode 0700, and its parent too when
/// it is the default `/run/swarmd` (made 0700 even if it existed: it is ours).
/// A parent named by `SWARMD_RUN_DIR` is created 0700 if missing but otherwise
/// left as it is: it may be a directory the operator shares.
fn create_run_dir(dir: &Path) -> Result<(), swarmd_certs::CertError> {
    if let Some(parent) = dir.parent() {
        if std::env::var_os("SWARMD_RUN_DIR").is_none() {
            swarmd_certs::create_private_dir(parent)?;
        } else if !parent.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|source| swarmd_certs::CertError::Io { path: parent.to_owned(), source })?;
        }
    }
    swarmd_certs::create_private_dir(dir)
}

/// How a worker's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerOutcome {
    /// Shut down on request.
    Stopped,
    /// Promoted: the caller turns this node into a manager (`Manager::promote`).
    Promoted,
    /// Removed from the cluster: its tasks are stopped and its secrets wiped.
    Removed,
}

/// Renews through the `RenewNodeCertificate` RPC on the session's channel, so a
/// renewal reuses the established connection instead of a new handshake.
struct RpcIssuer {
    channel: Channel,
}

impl CertIssuer for RpcIssuer {
    async fn issue(&self, csr_pem: String) -> Result<Renewed, String> {
        let mut client = CaClient::new(self.channel.clone());
        let r = client
            .renew_node_certificate(RenewNodeCertificateRequest { csr_pem })
            .await
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?
            .into_inner();
        // A manager of an older version sends no bundle: keep the current one.
        let ca_bundle_pem = Some(r.ca_bundle_pem).filter(|b| !b.is_empty());
        Ok(Renewed { cert_pem: r.certificate_pem, ca_bundle_pem })
    }
}
