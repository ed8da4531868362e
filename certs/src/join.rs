//! The join client, shared by workers and managers (a worker's join, a
//! manager's join, a promoted worker's manager certificate).
//!
//! 1. Download the root CA from a manager over TLS *without* verifying the
//!    server — and refuse it unless its SHA-256 equals the token's digest.
//! 2. Reconnect verifying the manager against that root, send a fresh CSR and
//!    the token, and receive a certificate whose subject the CA chose.
//!
//! Nothing here writes to disk: the caller persists what it gets.

use std::path::PathBuf;
use std::sync::Arc;

use swarmd_proto::ca::ca_client::CaClient;
use swarmd_proto::ca::{GetRootCaRequest, IssueNodeCertificateRequest, RenewNodeCertificateRequest};
use tonic::Code;

use crate::dial;
use crate::tls::{anonymous_client_config, client_config, danger};
use crate::{generate_key_and_csr, CertInfo, JoinToken, NodeIdentity, Role};

/// Why a join failed. Each message names the cause and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// The token does not parse.
    #[error("{0}; copy the whole token printed by `secretctl join-token worker`")]
    Token(#[from] crate::TokenError),
    /// No `--remote` given.
    #[error("no manager address given: pass --remote HOST:PORT")]
    NoRemote,
    /// The data dir already holds a node.
    #[error("{path} already holds a swarmd node; start it with `swarmd run --data-dir {path}`, or join with an empty --data-dir")]
    AlreadyInitialised { path: PathBuf },
    /// No manager answered.
    #[error("cannot reach a manager: {detail}")]
    Unreachable { detail: String },
    /// The CA served does not match the token.
    #[error("the manager at {addr} presented a root CA whose SHA-256 does not match the join token; refusing to trust it (a token from another cluster, or from before a root CA rotation — get the current one with `secretctl join-token` — or someone in between)")]
    DigestMismatch { addr: String },
    /// The manager is taking no more joins for a moment.
    #[error("the manager at {addr} is busy with other joins: {reason}")]
    Busy { addr: String, reason: String, retry_after: std::time::Duration },
    /// The manager answered but cannot take the join now (no raft leader yet,
    /// a leader change, a connection cut under load): tried again for a while.
    #[error("the manager at {addr} cannot take the join now: {reason}")]
    NotNow { addr: String, reason: String },
    /// The manager refused.
    #[error("the manager at {addr} refused to join this node: {reason}")]
    Refused { addr: String, reason: String },
    /// The returned certificate is not what we asked for.
    #[error("the manager returned an unusable certificate: {0}")]
    BadCertificate(String),
    /// Local I/O.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

pub fn refused_or_unreachable(addr: &str, s: tonic::Status) -> JoinError {
    if s.code() == Code::ResourceExhausted {
        let ms = s
            .metadata()
            .get(swarmd_proto::RETRY_AFTER_METADATA)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(1000);
        return JoinError::Busy {
            addr: addr.to_owned(),
            reason: s.message().to_owned(),
            retry_after: std::time::Duration::from_millis(ms),
        };
    }
    match s.code() {
        Code::InvalidArgument
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented
        | Code::FailedPrecondition
        | Code::NotFound => JoinError::Refused { addr: addr.to_owned(), reason: s.message().to_owned() },
        _ => JoinError::NotNow { addr: addr.to_owned(), reason: s.message().to_owned() },
    }
}

/// A certificate obtained with a join token.
#[derive(Debug)]
pub struct Issued {
    /// The new identity (key, certificate, pinned root).
    pub identity: NodeIdentity,
    /// The manager that issued it.
    pub addr: String,
    /// The managers it reported: addresses.
    pub managers: Vec<String>,
    /// The managers it reported: node IDs.
    pub manager_ids: Vec<crate::NodeId>,
}

/// Steps 1 and 2 of a join, shared by workers and managers: pins the CA with the
/// token's digest and obtains a certificate for `role` from the first reachable
/// manager in `remotes`. Writes nothing.
pub async fn request_certificate(
    token: &JoinToken,
    remotes: &[String],
    hostname: &str,
    role: Role,
) -> Result<Issued, JoinError> {
    if remotes.is_empty() {
        return Err(JoinError::NoRemote);
    }
    // Managers that are busy with other joins say when to come back: wait
    // that long (with jitter, so a storm of joiners spreads out), for a while.
    // One that answered but cannot take the join now is asked again after a
    // growing, jittered pause. Only an address where nothing answers fails
    // at once.
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut not_now = std::time::Duration::from_millis(250);
    loop {
        let mut last_err = None;
        let mut wait: Option<std::time::Duration> = None;
        for addr in remotes {
            match request_via(addr, token, hostname, role).await {
                Ok(r) => return Ok(r),
                Err(e @ JoinError::Unreachable { .. }) => last_err = Some(e),
                Err(JoinError::Busy { addr, reason, retry_after }) => {
                    wait = Some(wait.map_or(retry_after, |w| w.min(retry_after)));
                    last_err = Some(JoinError::Busy { addr, reason, retry_after });
                }
                Err(e @ JoinError::NotNow { .. }) => {
                    tracing::info!(error = %e, "join: trying again");
                    wait = Some(wait.map_or(not_now, |w| w.min(not_now)));
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        if wait == Some(not_now) {
            not_now = (not_now * 2).min(std::time::Duration::from_secs(4));
        }
        match wait {
            Some(w) if std::time::Instant::now() + w < give_up => {
                tokio::time::sleep(w.mul_f64(1.0 + rand::random::<f64>())).await;
            }
            _ => return Err(last_err.unwrap_or(JoinError::NoRemote)),
        }
    }
}

async fn request_via(addr: &str, token: &JoinToken, hostname: &str, role: Role) -> Result<Issued, JoinError> {
    let unreachable = |e: std::io::Error| JoinError::Unreachable { detail: e.to_string() };

    // 1. Root CA, pinned by the token's digest.
    let boot = dial::connect(addr, Arc::new(danger::bootstrap_client_config())).await.map_err(unreachable)?;
    let bundle = CaClient::new(boot)
        .get_root_ca(GetRootCaRequest {})
        .await
        .map_err(|s| refused_or_unreachable(addr, s))?
        .into_inner()
        .ca_bundle_pem;
    // (The bootstrap connection is closed here: `boot` was moved and dropped.)
    if !token.pins(&bundle) {
        return Err(JoinError::DigestMismatch { addr: addr.to_owned() });
    }
    // A root the cluster generated names the cluster (O); an operator's own
    // root need not.
    let cluster_id = CertInfo::parse_ca(&bundle).ok();

    // 2. Certificate, over TLS verified against that root.
    let cfg = anonymous_client_config(&bundle).map_err(|e| JoinError::BadCertificate(e.to_string()))?;
    let chan = dial::connect(addr, Arc::new(cfg)).await.map_err(unreachable)?;
    let (key, csr) = generate_key_and_csr().map_err(|e| JoinError::BadCertificate(e.to_string()))?;
    let resp = CaClient::new(chan)
        .issue_node_certificate(IssueNodeCertificateRequest {
            token: token.expose().to_string(),
            csr_pem: csr,
            hostname: hostname.to_owned(),
            role: role.to_string(),
        })
        .await
        .map_err(|s| refused_or_unreachable(addr, s))?
        .into_inner();
    // During a root rotation the manager adds the new root after the pinned
    // one: trust both (the answer came over TLS verified against the pin).
    let trust = if resp.ca_bundle_pem.len() > bundle.len() && resp.ca_bundle_pem.starts_with(&bundle) {
        resp.ca_bundle_pem
    } else {
        bundle
    };
    let identity =
        NodeIdentity::new(trust, resp.certificate_pem, key).map_err(|e| JoinError::BadCertificate(e.to_string()))?;
    if identity.info.node_id.as_str() != resp.node_id
        || identity.info.role != role
        || cluster_id.as_ref().is_some_and(|c| *c != identity.info.cluster_id)
    {
        return Err(JoinError::BadCertificate(format!(
            "subject does not match the join response (asked for a {role} certificate, got {})",
            identity.info.role
        )));
    }
    let manager_ids = resp.manager_ids.iter().filter_map(|m| m.parse().ok()).collect();
    Ok(Issued { identity, addr: addr.to_owned(), managers: resp.managers, manager_ids })
}

/// A promoted worker's manager certificate: renews `current` (its worker
/// identity) with a fresh key at the first manager in `remotes` that answers,
/// and checks that the CA made it a manager. Writes nothing.
pub async fn renew_as_manager(current: &NodeIdentity, remotes: &[String]) -> Result<(String, NodeIdentity), JoinError> {
    let tls = Arc::new(client_config(current).map_err(|e| JoinError::BadCertificate(e.to_string()))?);
    let (key, csr) = generate_key_and_csr().map_err(|e| JoinError::BadCertificate(e.to_string()))?;
    let mut last = JoinError::NoRemote;
    for addr in remotes {
        let chan = match dial::connect(addr, tls.clone()).await {
            Ok(c) => c,
            Err(e) => {
                last = JoinError::Unreachable { detail: format!("{addr}: {e}") };
                continue;
            }
        };
        let req = RenewNodeCertificateRequest { csr_pem: csr.clone() };
        match CaClient::new(chan).renew_node_certificate(req).await {
            Ok(r) => {
                let r = r.into_inner();
                let ca_pem = if r.ca_bundle_pem.is_empty() { current.ca_pem.clone() } else { r.ca_bundle_pem };
                let identity = NodeIdentity::new(ca_pem, r.certificate_pem, key)
                    .map_err(|e| JoinError::BadCertificate(e.to_string()))?;
                if identity.info.role != Role::Manager {
                    return Err(JoinError::BadCertificate(
                        "the renewed certificate is not a manager certificate".into(),
                    ));
                }
                return Ok((addr.clone(), identity));
            }
            Err(s) => last = refused_or_unreachable(addr, s),
        }
    }
    Err(last)
}
