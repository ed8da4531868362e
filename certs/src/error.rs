//! Errors of the PKI crate.

use std::path::PathBuf;

/// Why a certificate, key or CSR operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The CSR could not be parsed, its signature is wrong, or its key is not ECDSA P-256.
    #[error("invalid certificate signing request: {reason}")]
    InvalidCsr { reason: String },
    /// A certificate lifetime the signer cannot represent (beyond
    /// [`crate::CertValidity::MAX`]).
    #[error("certificate lifetime of {secs}s is out of range (at most 10 years)")]
    InvalidLifetime { secs: u64 },
    /// A PEM certificate could not be parsed.
    #[error("invalid certificate: {reason}")]
    InvalidCertificate { reason: String },
    /// A PEM private key could not be parsed.
    #[error("invalid private key: {reason}")]
    InvalidKey { reason: String },
    /// The certificate does not carry a swarmd identity (CN node ID, OU role, O cluster).
    #[error("certificate carries no swarmd identity: {reason}")]
    NoIdentity { reason: String },
    /// rcgen refused to build or sign a certificate.
    #[error("signing failed: {0}")]
    Signing(#[from] rcgen::Error),
    /// rustls refused a configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The CA's key is held by an external signer: this cluster signs nothing itself.
    #[error("the cluster CA's key is held by an external signer, not by this cluster")]
    NoSigningKey,
    /// What an external signer returned is not the certificate asked for.
    #[error("the external CA's certificate is unusable: {reason}")]
    BadExternalCert { reason: String },
    /// The node key is sealed (an autolocked manager) and no key to open it was given.
    #[error("locked: the node key is sealed; run swarmd unlock")]
    Locked,
    /// Reading or writing a node's certificate files failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
