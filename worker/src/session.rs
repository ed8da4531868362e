//! The worker's session with a manager: open it, heartbeat, reopen on failure.

use std::path::PathBuf;
use std::time::Duration;

use swarmd_certs::dial::Remotes;
use swarmd_certs::renew::Backoff;
use swarmd_proto::dispatcher::dispatcher_client::DispatcherClient;
use swarmd_proto::dispatcher::{HeartbeatRequest, SessionRequest};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::WorkerConfig;

/// How the session loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// Shut down on request.
    Stopped,
    /// Promoted to manager.
    Promoted,
    /// Removed from the cluster (`secretctl node rm`).
    Removed,
}

const REMOVED: &str = "removed from the cluster";

/// Whether a manager's answer says this node was removed: its certificate is
/// refused as revoked at the handshake, or the store no longer knows it.
fn was_removed(s: &tonic::Status) -> bool {
    if (s.code() == tonic::Code::NotFound && s.message().contains("is not part of the cluster"))
        || (s.code() == tonic::Code::PermissionDenied && s.message().contains("was removed from the cluster"))
    {
        return true;
    }
    let mut chain = format!("{} {:?}", s.message(), s);
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        chain.push_str(&format!(" {e} {e:?}"));
        src = e.source();
    }
    chain.contains("CertificateRevoked")
}

/// Keeps one session open for as long as the worker runs.
pub(crate) struct SessionLoop {
    channel: Channel,
    remotes: Remotes,
    data_dir: PathBuf,
    cfg: WorkerConfig,
    hostname: String,
    /// The current session ID ("" without one), for task reports.
    session: tokio::sync::watch::Sender<String>,
    /// Assignments, to the task agent.
    assignments: tokio::sync::mpsc::UnboundedSender<swarmd_proto::dispatcher::Assignments>,
}

impl SessionLoop {
    pub(crate) fn new(
        channel: Channel,
        remotes: Remotes,
        data_dir: PathBuf,
        cfg: WorkerConfig,
        session: tokio::sync::watch::Sender<String>,
        assignments: tokio::sync::mpsc::UnboundedSender<swarmd_proto::dispatcher::Assignments>,
    ) -> Self {
        let hostname = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
        Self { channel, remotes, data_dir, cfg, hostname, session, assignments }
    }

    /// Runs until `shutdown` is cancelled, the node is promoted, or it learns
    /// that it was removed from the cluster; failures back off and retry.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) -> SessionEnd {
        let first = Duration::from_millis(200);
        let mut backoff = Backoff::new(first, Duration::from_secs(5));
        loop {
            let opened = std::time::Instant::now();
            let result = self.one(&shutdown).await;
            self.session.send_replace(String::new());
            match result {
                Ok(true) => return SessionEnd::Promoted,
                Ok(false) => return SessionEnd::Stopped,
                Err(e) if e.starts_with(REMOVED) => {
                    tracing::error!(error = %e, "this node was removed from the cluster");
                    return SessionEnd::Removed;
                }
                Err(e) => {
                    if opened.elapsed() > Duration::from_secs(30) {
                        backoff.reset(first);
                    }
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = wait.as_secs_f64(), "session lost");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => return SessionEnd::Stopped,
                    }
                }
            }
        }
    }

    async fn one(&mut self, shutdown: &CancellationToken) -> Result<bool, String> {
        let fmt = |s: tonic::Status| {
            let text = format!("{}: {}", s.code(), s.message());
            if was_removed(&s) {
                format!("{REMOVED}: {text}")
            } else {
                text
            }
        };
        let mut client = DispatcherClient::new(self.channel.clone());
        let mut stream =
            client.session(SessionRequest { hostname: self.hostname.clone() }).await.map_err(fmt)?.into_inner();
        let first = stream.message().await.map_err(fmt)?.ok_or("manager closed the session at once")?;
        let session_id = first.session_id;
        let mut period = Duration::from_millis(first.heartbeat_period_ms.max(100));
        tracing::info!(session.id = %session_id, heartbeat_ms = period.as_millis() as u64, "session established");
        self.learn_managers(first.managers);
        self.session.send_replace(session_id.clone());
        loop {
            // Beat a little early so one slow beat does not cost a period.
            let wait = period.mul_f64(0.75 + 0.2 * rand::random::<f64>());
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(m)) => {
                        self.learn_managers(m.managers);
                        if let Some(a) = m.assignments {
                            let _ = self.assignments.send(a);
                        }
                    }
                    Ok(None) => return Err("manager closed the session".into()),
                    Err(s) => return Err(fmt(s)),
                },
                _ = tokio::time::sleep(wait) => {
                    let r = client.heartbeat(HeartbeatRequest { session_id: session_id.clone() }).await.map_err(fmt)?;
                    let r = r.into_inner();
                    period = Duration::from_millis(r.period_ms.max(100));
                    if r.role == "manager" {
                        tracing::warn!("this node was promoted to manager");
                        return Ok(true);
                    }
                }
                _ = shutdown.cancelled() => return Ok(false),
            }
        }
    }

    fn learn_managers(&mut self, managers: Vec<String>) {
        let mut all = self.remotes.get();
        let before = all.len();
        for m in managers {
            if !m.is_empty() && !all.contains(&m) {
                all.push(m);
            }
        }
        if all.len() != before {
            self.remotes.set(all.clone());
            self.cfg.remotes = all;
            if let Err(e) = self.cfg.save(&self.data_dir) {
                tracing::warn!(error = %e, "could not save manager addresses");
            }
        }
    }
}
