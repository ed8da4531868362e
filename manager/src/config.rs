//! `manager.json`: what a manager needs to restart, written last by `init`
//! (its presence marks a complete setup).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use swarmd_certs::{CertValidity, ClusterId, NodeId};

use crate::raft::RaftSettings;
use crate::ManagerError;

/// File name of the manager's config in its data dir.
pub const CONFIG_FILE: &str = "manager.json";

/// A manager's local configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ManagerConfig {
    /// This node.
    pub node_id: NodeId,
    /// Its cluster.
    pub cluster_id: ClusterId,
    /// Its raft ID.
    pub raft_id: u64,
    /// Where it listens (the port actually bound).
    pub listen_addr: String,
    /// What it tells others to dial.
    pub advertise_addr: String,
    /// The control socket.
    pub control_socket: PathBuf,
    /// Raft timing and snapshot settings.
    #[serde(default)]
    pub raft: RaftSettings,
}

impl ManagerConfig {
    /// Loads `manager.json` from `data_dir`.
    pub fn load(data_dir: &Path) -> Result<Self, ManagerError> {
        let p = data_dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ManagerError::NotAManager { path: data_dir.to_owned(), file: CONFIG_FILE }
            } else {
                ManagerError::Io { path: p.clone(), source: e }
            }
        })?;
        serde_json::from_str(&text).map_err(|e| ManagerError::Invalid(format!("{}: {e}", p.display())))
    }

    /// Writes `manager.json` atomically.
    pub fn save(&self, data_dir: &Path) -> Result<(), ManagerError> {
        let text = serde_json::to_string_pretty(self).expect("serialize config");
        swarmd_certs::write_atomic(&data_dir.join(CONFIG_FILE), text.as_bytes(), 0o600)?;
        Ok(())
    }
}

/// Options of `swarmd manager init`.
///
/// # Defaults
/// listen `0.0.0.0:4242`, advertise = the listen address (or this host's
/// address when listening on all interfaces), control socket
/// `<data-dir>/control.sock`, certificates 24 h, heartbeat 5 s, workload
/// identities 1 h.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// The data dir.
    pub data_dir: PathBuf,
    /// Listen address; port 0 picks a free port (kept across restarts).
    pub listen_addr: String,
    /// Advertised address.
    pub advertise_addr: Option<String>,
    /// Control socket path.
    pub control_socket: Option<PathBuf>,
    /// Node certificate lifetime.
    pub cert_expiry: CertValidity,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Raft timing.
    pub raft: RaftSettings,
    /// Seal this manager's keys under an unlock key from the start.
    pub autolock: bool,
    /// The cluster CA to use instead of a generated root.
    pub ca: Option<OwnCa>,
    /// An external CA that holds the cluster CA's key and signs for it.
    pub external_ca: Option<ExternalCaOptions>,
    /// Lifetime of tasks' workload identities (`None`: the default).
    pub identity_ttl: Option<swarmd_certs::workload::IdentityTtl>,
    /// Only signed images run.
    pub content_trust: bool,
}

/// An organisation's CA for a new cluster: typically an intermediate of its
/// root, with the certificates between the two.
#[derive(Clone)]
pub struct OwnCa {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// Its PKCS#8 key, PEM.
    pub key_pem: zeroize::Zeroizing<String>,
    /// The certificates from it up to the organisation's root, PEM (may be empty).
    pub chain_pem: String,
}

/// An external CA for a new cluster: a cfssl signer and the CA certificate
/// it signs with (the cluster's trust anchor).
#[derive(Clone)]
pub struct ExternalCaOptions {
    /// Its signing endpoint, `https://host:port[/path]`.
    pub url: String,
    /// The key its `authsign` endpoint checks requests with (cfssl's
    /// `auth_keys`, type `standard`): only managers hold it.
    pub auth_key: zeroize::Zeroizing<Vec<u8>>,
    /// The roots its TLS certificate must chain to, PEM (empty: `ca_cert_pem`).
    pub tls_roots_pem: String,
    /// The CA certificate it signs with, PEM.
    pub ca_cert_pem: String,
    /// The certificates from it up to an organisation's root, PEM (may be empty).
    pub chain_pem: String,
}

impl std::fmt::Debug for ExternalCaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalCaOptions")
            .field("url", &self.url)
            .field("auth_key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for OwnCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnCa").field("key_pem", &"<redacted>").finish_non_exhaustive()
    }
}

impl InitOptions {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            listen_addr: "0.0.0.0:4242".into(),
            advertise_addr: None,
            control_socket: None,
            cert_expiry: CertValidity::DEFAULT,
            heartbeat: Duration::from_secs(5),
            raft: RaftSettings::default(),
            autolock: false,
            ca: None,
            external_ca: None,
            identity_ttl: None,
            content_trust: false,
        }
    }
}

/// Options of `swarmd manager join`.
#[derive(Clone, Debug)]
pub struct JoinOptions {
    /// Addresses of existing managers.
    pub remotes: Vec<String>,
    /// The data dir.
    pub data_dir: PathBuf,
    /// Listen address.
    pub listen_addr: String,
    /// Advertised address.
    pub advertise_addr: Option<String>,
    /// Control socket path.
    pub control_socket: Option<PathBuf>,
    /// Raft timing.
    pub raft: RaftSettings,
    /// A promoted worker's config file (`worker.json`): the data dir may hold
    /// it (and the worker's `certs/`), and it is removed once `manager.json`
    /// is written. `None` for a join into an empty data dir.
    pub promoted_from: Option<PathBuf>,
}

/// The address to advertise for a listener bound to `bound`.
pub(crate) fn default_advertise(bound: SocketAddr) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let host_ip = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .and_then(|h| std::net::ToSocketAddrs::to_socket_addrs(&(h.as_str(), bound.port())).ok())
        .and_then(|mut it| it.find(|a| a.is_ipv4() && !a.ip().is_loopback()));
    match host_ip {
        Some(a) => a.to_string(),
        None => {
            tracing::warn!("could not determine this host's address; advertising 127.0.0.1 (use --advertise-addr)");
            SocketAddr::from(([127, 0, 0, 1], bound.port())).to_string()
        }
    }
}
