//! Workload identities: a short-lived X.509 certificate per task, SPIFFE style.
//!
//! A task's certificate names its service in a URI SAN,
//! `spiffe://<cluster ID>/service/<service name>`, and its task ID in the CN.
//! The signing policy is the node certificates' ([`crate::RootCa::sign_node`]):
//! the CA decides everything but the public key, which must be ECDSA P-256 in
//! a CSR whose signature verifies; whatever else the CSR asks for is ignored.
//!
//! A workload certificate must never pass as a node certificate. Its OU is
//! [`WORKLOAD_OU`], which is no role ([`crate::Role::from_org_unit`] refuses it,
//! so [`crate::CertInfo`] and every acceptor and RPC built on it do); it carries
//! no O (the cluster ID a node certificate's O holds) and no DNS SAN (the role
//! names `swarm-manager`/`swarm-ca` a node dials by). Its basic constraints say
//! it is no CA.
//!
//! The key is generated where the task runs and never leaves that worker; the
//! worker renews at half the lifetime ([`renew_after`]).

use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, PublicKeyData, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use x509_parser::x509::AttributeTypeAndValue;

use crate::ca::csr_public_key;
use crate::{CertError, ClusterId, IssuedCert, RootCa, TaskId};

/// The OU of every workload certificate: not a role.
pub const WORKLOAD_OU: &str = "swarm-workload";

/// The directory below `/run/secrets` that holds a task's identity
/// (`cert.pem`, `key.pem`, `bundle.pem`): no secret may take its name.
pub const IDENTITY_DIR: &str = "identity";

/// The largest CSR the signer reads.
pub const MAX_CSR: usize = 16 * 1024;

/// NotBefore is backdated by this much, for clock skew between nodes (short:
/// the certificates are short-lived).
const BACKDATE: Duration = Duration::from_secs(60);

/// How long workload certificates live: a cluster setting
/// (`swarmd manager init --identity-ttl`, `secretctl cluster update --identity-ttl`).
///
/// # Defaults
/// 1 hour; at least 30 seconds (the node certificates' minimum), at most 30 days.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdentityTtl(Duration);

impl IdentityTtl {
    /// The shortest lifetime accepted (renewal every 15 s).
    pub const MIN: Duration = Duration::from_secs(30);
    /// The longest lifetime accepted.
    pub const MAX: Duration = Duration::from_secs(30 * 86400);
    /// The default lifetime.
    pub const DEFAULT: IdentityTtl = IdentityTtl(Duration::from_secs(3600));

    /// A lifetime, refused below [`IdentityTtl::MIN`] and above [`IdentityTtl::MAX`].
    pub fn new(d: Duration) -> Result<Self, String> {
        if d < Self::MIN || d > Self::MAX {
            return Err(format!(
                "workload identity lifetime {}s is out of range: use 30s to 30d (e.g. --identity-ttl 1h)",
                d.as_secs()
            ));
        }
        Ok(Self(d))
    }

    /// The lifetime in seconds, as stored; refused like [`IdentityTtl::new`].
    pub fn from_secs(secs: u64) -> Result<Self, String> {
        Self::new(Duration::from_secs(secs))
    }
}

crate::ca::lifetime_setting!(IdentityTtl);

/// When a workload certificate of lifetime `ttl`, received now, is renewed:
/// at half its life (SPIRE's default), so that a manager unreachable for a
/// while costs nothing until the other half is spent too.
pub fn renew_after(ttl: Duration) -> Duration {
    ttl / 2
}

/// Whom a workload certificate names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadId {
    /// The SPIFFE trust domain.
    pub cluster: ClusterId,
    /// The service, a SPIFFE path segment.
    pub service: String,
    /// The task: the certificate's CN.
    pub task: TaskId,
}

impl WorkloadId {
    /// The identity of `task` of `service`, refused unless the service name is
    /// a valid SPIFFE path segment (1-64 of `[a-zA-Z0-9-_.]`, not `.` or `..`).
    pub fn new(cluster: ClusterId, service: &str, task: TaskId) -> Result<Self, CertError> {
        let ok = !service.is_empty()
            && service.len() <= 64
            && service != "."
            && service != ".."
            && service.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ok {
            return Err(CertError::NoIdentity {
                reason: format!("service name {service:?} is not a SPIFFE path segment"),
            });
        }
        Ok(Self { cluster, service: service.to_owned(), task })
    }

    /// `spiffe://<cluster ID>/service/<service name>`.
    pub fn spiffe_id(&self) -> String {
        format!("spiffe://{}/service/{}", self.cluster, self.service)
    }
}

/// Signs a workload certificate for `id`, valid for `ttl` from now, taking
/// only the public key from `csr_pem`: no more than [`MAX_CSR`] bytes, an
/// ECDSA P-256 key, a signature that verifies.
pub fn sign_workload(ca: &RootCa, csr_pem: &str, id: &WorkloadId, ttl: IdentityTtl) -> Result<IssuedCert, CertError> {
    if csr_pem.len() > MAX_CSR {
        return Err(CertError::InvalidCsr { reason: format!("larger than {} KiB", MAX_CSR / 1024) });
    }
    // A lifetime that bypassed `new` (deserialized) is refused here, not signed.
    if IdentityTtl::new(ttl.duration()).is_err() {
        return Err(CertError::InvalidLifetime { secs: ttl.duration().as_secs() });
    }
    let key = csr_public_key(csr_pem)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id.task.as_str());
    dn.push(DnType::OrganizationalUnitName, WORKLOAD_OU);
    params.distinguished_name = dn;
    let uri = Ia5String::try_from(id.spiffe_id())?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    // With the CA's chain (a cross-signature during a root rotation, an
    // organisation's chain), so peers that trust either root verify it.
    ca.sign_leaf(params, &key, ttl.duration(), BACKDATE)
}

/// What a workload certificate says, as its worker checks it before use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadCert {
    /// The CN: the task.
    pub task: String,
    /// The URI SAN.
    pub spiffe_id: String,
    /// NotAfter, unix seconds.
    pub not_after: i64,
}

/// Checks that `cert_pem` is a workload certificate for `task` and for the
/// key `key_pem` (PKCS#8 PEM): a worker never installs a certificate that
/// does not go with the key it generated.
pub fn check_issued(cert_pem: &str, key_pem: &str, task: &str) -> Result<WorkloadCert, CertError> {
    let bad = |reason: String| CertError::InvalidCertificate { reason };
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| bad(e.to_string()))?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::InvalidKey { reason: e.to_string() })?;
    if *cert.public_key().subject_public_key.data != *key.der_bytes() {
        return Err(bad("the certificate is not for this task's key".into()));
    }
    let subject = cert.subject();
    let cn = first_attr(subject.iter_common_name());
    let ou = first_attr(subject.iter_organizational_unit());
    if cn != task || ou != WORKLOAD_OU {
        return Err(bad(format!("not a workload certificate of task {task} (CN {cn:?}, OU {ou:?})")));
    }
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::URI(u) = n {
                uris.push((*u).to_owned());
            }
        }
    }
    let [spiffe_id] = <[String; 1]>::try_from(uris).map_err(|u| bad(format!("{} URI SANs, not one", u.len())))?;
    Ok(WorkloadCert { task: cn, spiffe_id, not_after: cert.validity().not_after.timestamp() })
}

fn first_attr<'a>(mut it: impl Iterator<Item = &'a AttributeTypeAndValue<'a>>) -> String {
    it.next().and_then(|a| a.as_str().ok()).unwrap_or_default().to_owned()
}

#[cfg(test)]
#[path = "workload_tests.rs"]
mod tests;
