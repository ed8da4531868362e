//! The worker's session with a manager: open it, heartbeat, reopen on failure.
//!
//! A node concludes that it was removed from the cluster only from an
//! authoritative, typed signal ([`removal_signal`]): its certificate refused
//! at the TLS handshake as revoked (the deny-list, which only removal puts a
//! worker on), or a PERMISSION_DENIED carrying
//! [`swarmd_proto::NODE_REMOVED_METADATA`]. Anything else — a manager that does
//! not know the node yet, an unreachable one — is retried with backoff.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use swarmd_certs::dial::Remotes;
use swarmd_certs::renew::Backoff;
use swarmd_certs::tls::ManagerSet;
use swarmd_proto::dispatcher::dispatcher_client::DispatcherClient;
use swarmd_proto::dispatcher::{Assignments, HeartbeatRequest, SessionMessage, SessionRequest};
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

/// Largest session message accepted (a manager sends at most about 2 MiB of
/// assignments per message, and one item is far smaller than this).
const MAX_MESSAGE: usize = 16 << 20;

/// Whether `s` says, authoritatively, that this node was removed: the
/// manager's typed removal status, or the TLS alert `certificate_revoked`
/// found (by type, not by text) in the error's sources.
pub fn removal_signal(s: &tonic::Status) -> bool {
    if s.code() == tonic::Code::PermissionDenied && s.metadata().get(swarmd_proto::NODE_REMOVED_METADATA).is_some() {
        return true;
    }
    let revoked =
        |e: &rustls::Error| matches!(e, rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked));
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = src {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            if revoked(r) {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).is_some_and(revoked) {
                return true;
            }
        }
        src = e.source();
    }
    false
}

/// Why one session ended.
enum Ended {
    Promoted,
    Stopped,
    Removed(String),
    Lost(String),
}

/// Chunks of one set of assignments, merged until the last one arrives.
#[derive(Default)]
struct Pending(Option<Assignments>);

impl Pending {
    /// Adds a chunk; returns the whole set once `chunk` is its last.
    fn add(&mut self, chunk: Assignments) -> Option<Assignments> {
        let more = chunk.more;
        let merged = match self.0.take() {
            None => chunk,
            Some(mut m) => {
                m.full |= chunk.full;
                m.tasks.extend(chunk.tasks);
                m.removed_tasks.extend(chunk.removed_tasks);
                m.secrets.extend(chunk.secrets);
                m.removed_secrets.extend(chunk.removed_secrets);
                m
            }
        };
        if more {
            self.0 = Some(merged);
            None
        } else {
            Some(Assignments { more: false, ..merged })
        }
    }
}

/// Keeps one session open for as long as the worker runs.
pub(crate) struct SessionLoop {
    channel: Channel,
    /// This node's newest client configuration, to ask managers directly.
    tls: tokio::sync::watch::Receiver<std::sync::Arc<rustls::ClientConfig>>,
    remotes: Remotes,
    managers: ManagerSet,
    data_dir: PathBuf,
    cfg: WorkerConfig,
    /// The current session ID ("" without one), for task reports.
    session: tokio::sync::watch::Sender<String>,
    /// Assignments, to the task agent.
    assignments: tokio::sync::mpsc::UnboundedSender<crate::assignment::Assignment>,
    /// The certificate renewer: a root CA rotation asks it to renew now and
    /// to trust other roots.
    renew: swarmd_certs::renew::RenewControl,
}

impl SessionLoop {
    pub(crate) fn new(
        (channel, tls): (Channel, tokio::sync::watch::Receiver<std::sync::Arc<rustls::ClientConfig>>),
        (remotes, managers): (Remotes, ManagerSet),
        data_dir: PathBuf,
        cfg: WorkerConfig,
        session: tokio::sync::watch::Sender<String>,
        assignments: tokio::sync::mpsc::UnboundedSender<crate::assignment::Assignment>,
        renew: swarmd_certs::renew::RenewControl,
    ) -> Self {
        Self { channel, tls, remotes, managers, data_dir, cfg, session, assignments, renew }
    }

    /// The manager, if any, that refuses this node's certificate as revoked
    /// when asked directly (see [`swarmd_certs::dial::probe_standing`]). A lost
    /// session's error cannot tell: HTTP/2 keeps only the text of the TLS alert
    /// that a removed node's reconnection meets.
    async fn revoked_by(&self) -> Option<String> {
        let cfg = self.tls.borrow().clone();
        let mut probes = tokio::task::JoinSet::new();
        for addr in self.remotes.get() {
            let cfg = cfg.clone();
            probes.spawn(async move { (swarmd_certs::dial::probe_standing(&addr, cfg).await, addr) });
        }
        while let Some(done) = probes.join_next().await {
            if let Ok((swarmd_certs::dial::Standing::Revoked, addr)) = done {
                return Some(addr);
            }
        }
        None
    }

    /// Runs until `shutdown` is cancelled, the node is promoted, or it learns
    /// that it was removed from the cluster; failures back off and retry.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) -> SessionEnd {
        let first = Duration::from_millis(200);
        let mut backoff = Backoff::new(first, Duration::from_secs(5));
        loop {
            let opened = std::time::Instant::now();
            let ended = self.one(&shutdown).await;
            self.session.send_replace(String::new());
            match ended {
                Ended::Promoted => return SessionEnd::Promoted,
                Ended::Stopped => return SessionEnd::Stopped,
                Ended::Removed(e) => {
                    tracing::error!(error = %e, "this node was removed from the cluster");
                    return SessionEnd::Removed;
                }
                Ended::Lost(e) => {
                    if let Some(addr) = self.revoked_by().await {
                        tracing::error!(error = %e, manager = %addr,
                            "this node was removed from the cluster: the manager refuses its certificate as revoked");
                        return SessionEnd::Removed;
                    }
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

    async fn one(&mut self, shutdown: &CancellationToken) -> Ended {
        let fail = |s: tonic::Status| {
            let text = format!("{}: {}", s.code(), s.message());
            if removal_signal(&s) {
                Ended::Removed(text)
            } else {
                Ended::Lost(text)
            }
        };
        let mut client = DispatcherClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE);
        // The hostname field is left empty: managers ignore what a node says
        // about itself after its join.
        let mut stream = match client.session(SessionRequest::default()).await {
            Ok(r) => r.into_inner(),
            Err(s) => return fail(s),
        };
        let first = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ended::Lost("manager closed the session at once".into()),
            Err(s) => return fail(s),
        };
        let session_id = first.session_id.clone();
        let mut period = Duration::from_millis(first.heartbeat_period_ms.max(100));
        tracing::info!(session.id = %session_id, heartbeat_ms = period.as_millis() as u64, "session established");
        self.learn_managers(&first);
        self.follow_ca(&first);
        self.session.send_replace(session_id.clone());
        let mut pending = Pending::default();
        // The `seq` of the last whole set of assignments received, and whether
        // the manager has been told about it yet.
        let (mut received, mut acked) = (0u64, 0u64);
        loop {
            // Beat a little early so one slow beat does not cost a period; the
            // first complete assignments are acknowledged at once.
            let wait = if received > acked && acked == 0 {
                Duration::ZERO
            } else {
                period.mul_f64(0.75 + 0.2 * rand::random::<f64>())
            };
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(m)) => {
                        self.learn_managers(&m);
                        self.follow_ca(&m);
                        if let Some(a) = m.assignments {
                            if let Some(whole) = pending.add(a) {
                                let _ = self.assignments.send(whole.into());
                                received = m.seq;
                            }
                        }
                    }
                    Ok(None) => return Ended::Lost("manager closed the session".into()),
                    Err(s) => return fail(s),
                },
                _ = tokio::time::sleep(wait) => {
                    let beat = HeartbeatRequest { session_id: session_id.clone(), assignments_seq: received };
                    let r = match client.heartbeat(beat).await {
                        Ok(r) => r.into_inner(),
                        Err(s) => return fail(s),
                    };
                    acked = received;
                    period = Duration::from_millis(r.period_ms.max(100));
                    if r.role == "manager" {
                        tracing::warn!("this node was promoted to manager");
                        return Ended::Promoted;
                    }
                }
                _ = shutdown.cancelled() => return Ended::Stopped,
            }
        }
    }

    /// Follows what a root CA rotation tells this node: the roots to trust,
    /// and when to renew.
    fn follow_ca(&self, m: &SessionMessage) {
        if !m.trust_bundle_pem.is_empty() {
            self.renew.trust(m.trust_bundle_pem.clone());
        }
        if m.renew_certificate {
            self.renew.renew_now();
        }
    }

    /// Follows the manager list a session carries: these addresses are the
    /// ones to dial, and these node IDs the only manager certificates to accept.
    fn learn_managers(&mut self, m: &SessionMessage) {
        let ids: HashSet<swarmd_certs::NodeId> = m.manager_ids.iter().filter_map(|i| i.parse().ok()).collect();
        let addrs: Vec<String> = m.managers.iter().filter(|a| !a.is_empty()).cloned().collect();
        let mut changed = false;
        if !ids.is_empty() && ids != self.managers.get() {
            self.managers.replace(ids.clone());
            let mut sorted: Vec<_> = ids.into_iter().collect();
            sorted.sort();
            self.cfg.managers = sorted;
            changed = true;
        }
        if !addrs.is_empty() && addrs != self.remotes.get() {
            self.remotes.set(addrs.clone());
            self.cfg.remotes = addrs;
            changed = true;
        }
        if changed {
            if let Err(e) = self.cfg.save(&self.data_dir) {
                tracing::warn!(error = %e, "could not save the managers' addresses");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarmd_proto::dispatcher::{SecretValue, Task};

    #[test]
    fn only_typed_signals_mean_removal() {
        // What a lagging manager answered before: a message, no typed signal.
        let lagging = tonic::Status::not_found("node abc is not part of the cluster");
        assert!(!removal_signal(&lagging));
        let worded = tonic::Status::permission_denied("node abc was removed from the cluster");
        assert!(!removal_signal(&worded), "a text alone is not a signal");
        let mut typed = tonic::Status::permission_denied("anything");
        typed.metadata_mut().insert(swarmd_proto::NODE_REMOVED_METADATA, "abc".parse().unwrap());
        assert!(removal_signal(&typed));
        let io = std::io::Error::other(rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked));
        assert!(removal_signal(&tonic::Status::from_error(Box::new(io))));
        let expired = std::io::Error::other(rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired));
        assert!(!removal_signal(&tonic::Status::from_error(Box::new(expired))));
    }

    #[test]
    fn chunks_are_applied_together_once_the_last_arrives() {
        let mut p = Pending::default();
        let secret = |id: &str| SecretValue { id: id.into(), version: 1, data: bytes::Bytes::from_static(b"x") };
        let a = Assignments { full: true, more: true, secrets: vec![secret("a")], ..Default::default() };
        assert!(p.add(a).is_none());
        let b = Assignments { full: true, more: true, secrets: vec![secret("b")], ..Default::default() };
        assert!(p.add(b).is_none());
        let task = Task { id: "t".into(), ..Default::default() };
        let c = Assignments { full: true, more: false, tasks: vec![task], ..Default::default() };
        let whole = p.add(c).unwrap();
        assert!(whole.full && !whole.more);
        assert_eq!(whole.secrets.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(whole.tasks.len(), 1);
        let single = Assignments { removed_tasks: vec!["t".into()], ..Default::default() };
        assert_eq!(p.add(single).unwrap().removed_tasks, ["t"]);
    }
}
