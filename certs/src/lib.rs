//! swarmd's public-key infrastructure.
//!
//! Everything a node needs to prove who it is and to check who it talks to:
//! typed identifiers ([`NodeId`], [`ClusterId`], [`Role`]), the cluster's root CA
//! and its signing policy ([`RootCa`]), join tokens that pin that CA
//! ([`JoinToken`]), a node's own key and certificate on disk ([`NodeIdentity`]),
//! the rustls configurations every connection uses ([`tls`]), the schedule on
//! which certificates are renewed ([`renew`]), and the signing policy of tasks'
//! workload identities ([`workload`]).
//!
//! Nothing here does I/O beyond reading and writing a node's certificate files.

mod ca;
pub mod dial;
mod error;
mod identity;
mod ids;
pub mod join;
pub mod recover;
pub mod renew;
pub mod tls;
mod token;
pub mod workload;

pub use ca::{check_csr, parse_duration, CertValidity, IssuedCert, NodeSubject, RootCa};
pub use error::CertError;
pub use identity::{
    create_private_dir, erase_file, generate_key_and_csr, is_sealed_key, replace_secret_file, restrict_tree,
    write_atomic, CertInfo, KeyWrap, NodeIdentity, NodeKey, SEALED_KEY_LABEL,
};
pub use ids::{is_secret_file_name, ClusterId, IdError, NodeId, Role, SecretId, ServiceId, TaskId};
pub use token::{ca_digest, JoinToken, TokenError, TOKEN_PREFIX};

/// The DNS name managers present in their certificates and clients dial.
pub use renew::now_unix;

/// This host's name, as a node reports it at its join ("" when unknown).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// Spawns one of a node's long-running loops in a span named after it
/// (`loop=NAME`), so that every line it logs says which loop it came from.
pub fn spawn_loop<F>(name: &'static str, fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    use tracing::Instrument;
    tokio::spawn(fut.instrument(tracing::info_span!("loop", name)))
}

pub const MANAGER_SERVER_NAME: &str = "swarm-manager";

/// Fills `buf` from the operating system's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) {
    use rand::TryRngCore;
    rand::rngs::OsRng.try_fill_bytes(buf).expect("the operating system's random number generator failed");
}

/// Installs ring as rustls' process-wide crypto provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
