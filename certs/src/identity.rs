//! A node's own key and certificate, and what a certificate says about its holder.
//!
//! On disk a node keeps `certs/ca.crt`, `certs/node.crt` and `certs/node.key`
//! (mode 0600). Writes go to a temporary file that is synced and renamed, so a
//! crash leaves either the old or the new file, never half of one.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use zeroize::Zeroizing;

use crate::{CertError, ClusterId, NodeId, Role};

/// A node's private key, PKCS#8 PEM, wiped from memory on drop.
pub type NodeKey = Zeroizing<String>;

/// Generates a fresh ECDSA P-256 key and a CSR for it. The CSR names nothing:
/// the CA decides the subject.
pub fn generate_key_and_csr() -> Result<(NodeKey, String), CertError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr = CertificateParams::default().serialize_request(&key)?.pem()?;
    Ok((Zeroizing::new(key.serialize_pem()), csr))
}

/// What a node certificate says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// CN.
    pub node_id: NodeId,
    /// From the OU.
    pub role: Role,
    /// O.
    pub cluster_id: ClusterId,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// NotBefore, unix seconds.
    pub not_before: i64,
    /// NotAfter, unix seconds.
    pub not_after: i64,
    /// DNS SANs.
    pub dns_names: Vec<String>,
}

fn first_attr<'a>(it: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'a>>) -> Option<&'a str> {
    it.into_iter().next().and_then(|a| a.as_str().ok())
}

impl CertInfo {
    /// Parses a PEM node certificate.
    pub fn parse(pem: &str) -> Result<Self, CertError> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| CertError::InvalidCertificate { reason: e.to_string() })?;
        Self::from_der(&der)
    }

    /// Parses a DER node certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, CertError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| CertError::InvalidCertificate { reason: e.to_string() })?;
        let subject = cert.subject();
        let no_id = |reason: &str| CertError::NoIdentity { reason: reason.to_owned() };
        let cn = first_attr(subject.iter_common_name()).ok_or_else(|| no_id("no CN"))?;
        let ou = first_attr(subject.iter_organizational_unit()).ok_or_else(|| no_id("no OU"))?;
        let o = first_attr(subject.iter_organization()).ok_or_else(|| no_id("no O"))?;
        let node_id: NodeId = cn.parse().map_err(|e: crate::IdError| no_id(&e.to_string()))?;
        let role = Role::from_org_unit(ou).ok_or_else(|| no_id("OU is not a swarmd role"))?;
        let cluster_id: ClusterId = o.parse().map_err(|e: crate::IdError| no_id(&e.to_string()))?;
        let mut dns_names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                if let GeneralName::DNSName(d) = n {
                    dns_names.push((*d).to_owned());
                }
            }
        }
        Ok(Self {
            node_id,
            role,
            cluster_id,
            serial: hex::encode(cert.raw_serial()),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            dns_names,
        })
    }

    /// The cluster ID (O) of a root CA certificate.
    pub fn parse_ca(pem: &str) -> Result<ClusterId, CertError> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| CertError::InvalidCertificate { reason: e.to_string() })?;
        let (_, cert) =
            X509Certificate::from_der(&der).map_err(|e| CertError::InvalidCertificate { reason: e.to_string() })?;
        let o = first_attr(cert.subject().iter_organization())
            .ok_or_else(|| CertError::NoIdentity { reason: "CA has no O".into() })?;
        o.parse().map_err(|e: crate::IdError| CertError::NoIdentity { reason: e.to_string() })
    }
}

/// A node's certificate, key and the root it chains to.
#[derive(Clone)]
pub struct NodeIdentity {
    /// The root CA, PEM.
    pub ca_pem: String,
    /// The node certificate, PEM.
    pub cert_pem: String,
    /// The node key, PKCS#8 PEM.
    pub key_pem: NodeKey,
    /// What the certificate says.
    pub info: CertInfo,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity").field("info", &self.info).field("key_pem", &"<redacted>").finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io { path: path.to_owned(), source }
}

/// Writes `data` to `path` atomically with `mode`: temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    let mut f =
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io_err(&tmp))?;
    f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
    Ok(())
}

impl NodeIdentity {
    /// Builds an identity, checking that the key matches the certificate.
    pub fn new(ca_pem: String, cert_pem: String, key_pem: NodeKey) -> Result<Self, CertError> {
        let info = CertInfo::parse(&cert_pem)?;
        let me = Self { ca_pem, cert_pem, key_pem, info };
        let ck = me.certified_key()?;
        ck.keys_match()
            .map_err(|e| CertError::InvalidKey { reason: format!("does not match the certificate: {e}") })?;
        Ok(me)
    }

    /// `certs/` below a data dir.
    pub fn dir(data_dir: &Path) -> PathBuf {
        data_dir.join("certs")
    }

    /// Loads `ca.crt`, `node.crt` and `node.key` from `dir`; `Locked` if the
    /// key is sealed.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        Self::load_with(dir, None)
    }

    /// Loads the identity, opening a sealed key with `wrap`.
    pub fn load_with(dir: &Path, wrap: Option<&dyn KeyWrap>) -> Result<Self, CertError> {
        let read = |name: &str| {
            let p = dir.join(name);
            fs::read_to_string(&p).map_err(|source| CertError::Io { path: p, source })
        };
        let ca = read("ca.crt")?;
        let cert = read("node.crt")?;
        let stored = Zeroizing::new(read("node.key")?);
        let key = if is_sealed_key(&stored) {
            let wrap = wrap.ok_or(CertError::Locked)?;
            wrap.open(&stored).map_err(|reason| CertError::InvalidKey { reason })?
        } else {
            stored
        };
        Self::new(ca, cert, key)
    }

    /// Writes the three files into `dir` (created 0700 if missing); the key with mode 0600.
    /// The key is written before the certificate.
    pub fn save(&self, dir: &Path) -> Result<(), CertError> {
        self.save_with(dir, None)
    }

    /// As [`NodeIdentity::save`], with the key sealed by `wrap` if it seals.
    pub fn save_with(&self, dir: &Path, wrap: Option<&dyn KeyWrap>) -> Result<(), CertError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        write_atomic(&dir.join("ca.crt"), self.ca_pem.as_bytes(), 0o644)?;
        match wrap.and_then(|w| w.seal(&self.key_pem)) {
            Some(sealed) => write_atomic(&dir.join("node.key"), sealed.as_bytes(), 0o600)?,
            None => write_atomic(&dir.join("node.key"), self.key_pem.as_bytes(), 0o600)?,
        }
        write_atomic(&dir.join("node.crt"), self.cert_pem.as_bytes(), 0o644)?;
        Ok(())
    }

    /// The certificate chain and signing key in rustls' form.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, CertError> {
        let chain = vec![CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| CertError::InvalidCertificate { reason: e.to_string() })?];
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| CertError::InvalidKey { reason: e.to_string() })?;
        let provider = rustls::crypto::ring::default_provider();
        let ck = CertifiedKey::from_der(chain, key, &provider)?;
        Ok(Arc::new(ck))
    }

    /// The root as a rustls trust anchor store.
    pub fn roots(&self) -> Result<rustls::RootCertStore, CertError> {
        crate::tls::roots_from_pem(&self.ca_pem)
    }
}

/// The PEM label of a sealed node key.
pub const SEALED_KEY_LABEL: &str = "SWARMD SEALED PRIVATE KEY";

/// Whether a stored node key is sealed.
pub fn is_sealed_key(stored: &str) -> bool {
    stored.trim_start().starts_with(&format!("-----BEGIN {SEALED_KEY_LABEL}-----"))
}

/// Seals a node key at rest and opens it again (autolocked managers).
pub trait KeyWrap: Send + Sync {
    /// The key in its stored form, or `None` to store it as plain PEM (autolock off).
    fn seal(&self, key_pem: &str) -> Option<String>;
    /// The PEM key from its stored, sealed form.
    fn open(&self, stored: &str) -> Result<NodeKey, String>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertValidity, RootCa};

    #[test]
    fn identity_saves_with_private_key_mode_and_reloads() {
        let ca = RootCa::generate(&ClusterId::random()).unwrap();
        let (key, csr) = generate_key_and_csr().unwrap();
        let issued = ca.sign_node(&csr, &NodeId::random(), Role::Worker, CertValidity::DEFAULT).unwrap();
        let id = NodeIdentity::new(ca.bundle_pem().into(), issued.pem, key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let certs = NodeIdentity::dir(dir.path());
        id.save(&certs).unwrap();
        let mode = fs::metadata(certs.join("node.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = NodeIdentity::load(&certs).unwrap();
        assert_eq!(back.info, id.info);
    }

    #[test]
    fn mismatched_key_is_refused() {
        let ca = RootCa::generate(&ClusterId::random()).unwrap();
        let (_key, csr) = generate_key_and_csr().unwrap();
        let (other_key, _) = generate_key_and_csr().unwrap();
        let issued = ca.sign_node(&csr, &NodeId::random(), Role::Worker, CertValidity::DEFAULT).unwrap();
        assert!(NodeIdentity::new(ca.bundle_pem().into(), issued.pem, other_key).is_err());
    }
}
