//! The cluster's root certificate authority and its signing policy.
//!
//! The CA decides everything about a node certificate except its public key:
//! subject (CN = node ID, OU = role, O = cluster ID), SANs (role and node ID, plus
//! `swarm-ca` for managers), usages and validity. Whatever else a CSR asks for is
//! ignored, so a joiner cannot name itself or pick its role.

use std::fmt;
use std::time::Duration;

use ::time::OffsetDateTime;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use zeroize::Zeroizing;

use crate::{ca_digest, CertError, ClusterId, NodeId, Role};

/// Root CA lifetime: 10 years.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// NotBefore is backdated by this much to tolerate clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// How long node certificates live.
///
/// # Defaults
/// 24 hours; at least 30 seconds, at most 10 years (the root's own lifetime).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertValidity(Duration);

impl CertValidity {
    /// The shortest lifetime accepted.
    pub const MIN: Duration = Duration::from_secs(30);
    /// The longest lifetime accepted: the root CA's. (Unbounded, `now + d`
    /// overflowed and the signer panicked.)
    pub const MAX: Duration = ROOT_VALIDITY;
    /// The default lifetime.
    pub const DEFAULT: CertValidity = CertValidity(Duration::from_secs(24 * 3600));

    /// A lifetime, refused below [`CertValidity::MIN`] and above [`CertValidity::MAX`].
    pub fn new(d: Duration) -> Result<Self, String> {
        if d < Self::MIN {
            return Err(format!("certificate expiry {}s is below the minimum of 30s", d.as_secs()));
        }
        if d > Self::MAX {
            return Err(format!(
                "certificate expiry {}s is above the maximum of {} days",
                d.as_secs(),
                Self::MAX.as_secs() / 86400
            ));
        }
        Ok(Self(d))
    }
}

/// What a bounded lifetime setting (a newtype over `Duration` with `new`
/// and `DEFAULT`) shares: `duration()`, `Default`, parsing `30s`, `90m`,
/// `24h` or `7d` through `new`, and printing in seconds.
macro_rules! lifetime_setting {
    ($t:ty) => {
        impl $t {
            /// The lifetime.
            pub fn duration(self) -> std::time::Duration {
                self.0
            }
        }

        impl Default for $t {
            fn default() -> Self {
                Self::DEFAULT
            }
        }

        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::new($crate::parse_duration(s)?)
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}s", self.0.as_secs())
            }
        }
    };
}
pub(crate) use lifetime_setting;

lifetime_setting!(CertValidity);

/// Parses a duration written as a number and a unit: `ms`, `s`, `m`, `h` or `d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 =
        num.parse().map_err(|_| format!("invalid duration {s:?}: expected a number and a unit, e.g. 30s, 5m, 24h"))?;
    let secs = |k: u64| n.checked_mul(k).map(Duration::from_secs);
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => None,
    };
    d.ok_or_else(|| format!("invalid duration {s:?}: unit must be ms, s, m, h or d"))
}

/// A freshly signed node certificate.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub pem: String,
    /// Its serial number, lowercase hex.
    pub serial: String,
    /// Its NotAfter, unix seconds.
    pub not_after: i64,
}

/// A CA: its certificate, its signing key, and the certificates it appends to
/// every leaf it signs (during a root rotation, its own certificate
/// cross-signed by the previous root, so nodes that trust only that root
/// still verify the new leaves).
///
/// The key is absent for a CA whose key an external signer holds
/// ([`RootCa::without_key`]): such a CA signs nothing itself, and checks
/// what the signer returns ([`RootCa::accept_signed_node`]).
pub struct RootCa {
    cert_pem: String,
    chain_pem: String,
    cluster_id: ClusterId,
    issuer: Option<Issuer<'static, KeyPair>>,
}

/// What the CA puts in a node certificate besides the key: the subject
/// (CN = node ID, OU = role, O = cluster ID) and the DNS SANs (the role and
/// the node ID, plus `swarm-ca` for managers). Local signing and an external
/// signer's request are both made from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSubject {
    /// CN: the node ID.
    pub common_name: String,
    /// OU: the role.
    pub org_unit: &'static str,
    /// O: the cluster ID.
    pub organization: String,
    /// The DNS SANs.
    pub dns_names: Vec<String>,
}

impl NodeSubject {
    /// The subject of `node_id`'s certificate in `role` in cluster `cluster_id`.
    pub fn new(node_id: &NodeId, role: Role, cluster_id: &ClusterId) -> Self {
        let mut dns_names = vec![role.org_unit().to_owned(), node_id.to_string()];
        if role == Role::Manager {
            dns_names.push("swarm-ca".to_owned());
        }
        Self {
            common_name: node_id.to_string(),
            org_unit: role.org_unit(),
            organization: cluster_id.to_string(),
            dns_names,
        }
    }
}

impl fmt::Debug for RootCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootCa").field("cluster_id", &self.cluster_id).field("key", &"<redacted>").finish()
    }
}

impl RootCa {
    /// Creates a new root CA (ECDSA P-256, 10 years) for `cluster_id`.
    pub fn generate(cluster_id: &ClusterId) -> Result<Self, CertError> {
        Self::generate_named(cluster_id, None)
    }

    /// A new root for the same cluster, to rotate to: a new key, and a subject
    /// of its own (an OU naming it) so that path building never confuses it
    /// with the root it replaces.
    pub fn generate_successor(&self) -> Result<Self, CertError> {
        let mut tag = [0u8; 6];
        crate::random_bytes(&mut tag);
        Self::generate_named(&self.cluster_id, Some(&format!("root-{}", hex::encode(tag))))
    }

    fn generate_named(cluster_id: &ClusterId, unit: Option<&str>) -> Result<Self, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = root_params(root_subject(cluster_id, unit));
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ROOT_VALIDITY;
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Self::from_pem(&cert_pem, &key.serialize_pem())
    }

    /// Loads a CA from its certificate and PKCS#8 key, both PEM; the cluster
    /// is the certificate's O.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let cluster_id = crate::CertInfo::parse_ca(cert_pem)?;
        Self::from_pem_for(&cluster_id, cert_pem, key_pem)
    }

    /// Loads a CA of `cluster_id` from a certificate that may name another
    /// organisation (an operator's own root), refusing a certificate that is
    /// not a CA, whose key is not `key_pem`'s, or that is not valid now.
    pub fn from_pem_for(cluster_id: &ClusterId, cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::InvalidKey { reason: e.to_string() })?;
        check_ca_cert(cert_pem, Some(&key))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            chain_pem: String::new(),
            cluster_id: cluster_id.clone(),
            issuer: Some(issuer),
        })
    }

    /// A CA of `cluster_id` whose key is held elsewhere (an external signer):
    /// its certificate only, refused unless it is a CA valid now. It signs
    /// nothing ([`CertError::NoSigningKey`]).
    pub fn without_key(cluster_id: &ClusterId, cert_pem: &str) -> Result<Self, CertError> {
        check_ca_cert(cert_pem, None)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            chain_pem: String::new(),
            cluster_id: cluster_id.clone(),
            issuer: None,
        })
    }

    /// Whether this CA holds its signing key.
    pub fn has_key(&self) -> bool {
        self.issuer.is_some()
    }

    fn issuer(&self) -> Result<&Issuer<'static, KeyPair>, CertError> {
        self.issuer.as_ref().ok_or(CertError::NoSigningKey)
    }

    /// This CA appending `chain_pem` to every certificate it signs.
    pub fn with_chain(mut self, chain_pem: String) -> Self {
        self.chain_pem = chain_pem;
        self
    }

    /// `successor`'s certificate signed by this CA: the same subject, key and
    /// lifetime, so that a leaf `successor` signs chains to this root through it.
    pub fn cross_sign(&self, successor: &RootCa) -> Result<String, CertError> {
        let (issuer, successor_key) = (self.issuer()?, successor.issuer()?.key());
        let (subject, not_before, not_after) = ca_subject_and_validity(&successor.cert_pem)?;
        let mut params = root_params(subject);
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        Ok(params.signed_by(successor_key, issuer)?.pem())
    }

    /// This CA's own certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// What this CA appends to the certificates it signs (empty for a root
    /// that is the cluster's only one).
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// SHA-256 of [`RootCa::cert_pem`].
    pub fn digest(&self) -> [u8; 32] {
        ca_digest(&self.cert_pem)
    }

    /// The cluster this CA belongs to.
    pub fn cluster_id(&self) -> &ClusterId {
        &self.cluster_id
    }

    /// The CA's private key as PKCS#8 PEM (`None` when an external signer
    /// holds it). Handle it as a secret: encrypt before storing.
    pub fn key_pem(&self) -> Option<Zeroizing<String>> {
        self.issuer.as_ref().map(|i| Zeroizing::new(i.key().serialize_pem()))
    }

    /// Signs a node certificate for `node_id` in `role`, taking only the public key from `csr_pem`.
    pub fn sign_node(
        &self,
        csr_pem: &str,
        node_id: &NodeId,
        role: Role,
        validity: CertValidity,
    ) -> Result<IssuedCert, CertError> {
        let key = csr_public_key(csr_pem)?;
        if validity.duration() > CertValidity::MAX {
            return Err(CertError::InvalidLifetime { secs: validity.duration().as_secs() });
        }
        let subject = NodeSubject::new(node_id, role, &self.cluster_id);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, subject.common_name);
        dn.push(DnType::OrganizationalUnitName, subject.org_unit);
        dn.push(DnType::OrganizationName, subject.organization);
        params.distinguished_name = dn;
        params.subject_alt_names =
            subject.dns_names.into_iter().map(|s| s.try_into().map(SanType::DnsName)).collect::<Result<_, _>>()?;
        // `validity` may come from a file or the store rather than `new`.
        self.sign_leaf(params, &key, validity.duration(), BACKDATE)
    }

    /// Checks a node certificate an external signer returned for `csr_pem`
    /// (the first certificate of `answer_pem`; at most 64 KiB): the subject
    /// and SANs of [`NodeSubject`] for `node_id` in `role`, the CSR's key, not
    /// a CA, server and client auth, valid now, expiring by `latest` (unix
    /// seconds, plus a minute for clock skew), and issued by this CA.
    /// Returns it with this CA's chain appended, as [`RootCa::sign_node`] would.
    pub fn accept_signed_node(
        &self,
        answer_pem: &str,
        csr_pem: &str,
        node_id: &NodeId,
        role: Role,
        latest: i64,
    ) -> Result<IssuedCert, CertError> {
        use rcgen::PublicKeyData;
        use x509_parser::prelude::FromDer;
        let bad = |reason: String| CertError::BadExternalCert { reason };
        if answer_pem.len() > 64 * 1024 {
            return Err(bad("larger than 64 KiB".into()));
        }
        let key = csr_public_key(csr_pem)?;
        const END: &str = "-----END CERTIFICATE-----";
        let leaf_pem = match answer_pem.find(END) {
            Some(end) => format!("{}\n", answer_pem[..end + END.len()].trim_start()),
            None => return Err(bad("no PEM certificate".into())),
        };
        let der = parse_cert(&leaf_pem).map_err(|e| bad(e.to_string()))?;
        let info = crate::CertInfo::from_der(&der).map_err(|e| bad(e.to_string()))?;
        let want = NodeSubject::new(node_id, role, &self.cluster_id);
        if info.node_id != *node_id || info.role != role || info.cluster_id != self.cluster_id {
            return Err(bad(format!(
                "it names node {} ({}) of cluster {}, not {} ({}) of {}",
                info.node_id, info.role, info.cluster_id, node_id, role, self.cluster_id
            )));
        }
        if let Some(missing) = want.dns_names.iter().find(|n| !info.dns_names.contains(n)) {
            return Err(bad(format!("it lacks the DNS name {missing}")));
        }
        // Names beyond ours could pass a worker off as a manager (`swarm-ca`)
        // or as something outside the cluster.
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der).map_err(|e| bad(e.to_string()))?;
        let names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san.value.general_names.len(),
            Ok(None) => 0,
            Err(e) => return Err(bad(format!("its subject alternative names: {e}"))),
        };
        if names != want.dns_names.len() || info.dns_names.len() != want.dns_names.len() {
            return Err(bad(format!("it names more than {}", want.dns_names.join(", "))));
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(bad("its key is not the one in the request".into()));
        }
        if cert.is_ca() {
            return Err(bad("it is a CA certificate".into()));
        }
        match cert.extended_key_usage() {
            Ok(Some(eku)) if eku.value.server_auth && eku.value.client_auth => {}
            _ => return Err(bad("it is not for both server and client authentication".into())),
        }
        if info.not_after > latest.saturating_add(60) {
            return Err(bad(format!(
                "it lives {}s past what was asked for: the signer's profile is longer than the certificate may live",
                info.not_after - latest
            )));
        }
        crate::tls::verify_chain_at(std::slice::from_ref(&der), &self.cert_pem, crate::now_unix())
            .map_err(|e| bad(e.to_string()))?;
        Ok(IssuedCert { pem: leaf_pem + &self.chain_pem, serial: info.serial, not_after: info.not_after })
    }

    /// Signs a leaf (digital signature, server and client auth) for `key`
    /// with `params`' subject and SANs: a fresh serial, NotBefore backdated by
    /// `backdate`, `lifetime` from now; the CA's chain appended.
    pub(crate) fn sign_leaf(
        &self,
        mut params: CertificateParams,
        key: &rcgen::PublicKey,
        lifetime: Duration,
        backdate: Duration,
    ) -> Result<IssuedCert, CertError> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - backdate;
        params.not_after = ::time::Duration::try_from(lifetime)
            .ok()
            .and_then(|d| now.checked_add(d))
            .ok_or(CertError::InvalidLifetime { secs: lifetime.as_secs() })?;
        let cert = params.signed_by(key, self.issuer()?)?;
        let mut pem = cert.pem();
        pem.push_str(&self.chain_pem);
        Ok(IssuedCert { pem, serial: serial_hex, not_after: params.not_after.unix_timestamp() })
    }
}

/// Refuses a CSR the CA would refuse to sign (see [`csr_public_key`]).
pub fn check_csr(csr_pem: &str) -> Result<(), CertError> {
    csr_public_key(csr_pem).map(drop)
}

/// The public key of a CSR, the only thing the CA takes from one: at most
/// 16 KiB, one PEM parse, an ECDSA P-256 key, a signature that verifies
/// (rcgen's parse checks it: proof of possession).
pub(crate) fn csr_public_key(csr_pem: &str) -> Result<rcgen::PublicKey, CertError> {
    if csr_pem.len() > 16 * 1024 {
        return Err(CertError::InvalidCsr { reason: "larger than 16 KiB".into() });
    }
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| CertError::InvalidCsr { reason: format!("not a PEM certificate request: {e}") })?;
    check_csr_key(&der)?;
    let csr =
        CertificateSigningRequestParams::from_der(&der).map_err(|e| CertError::InvalidCsr { reason: e.to_string() })?;
    if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(CertError::InvalidCsr { reason: "key must be ECDSA P-256".into() });
    }
    Ok(csr.public_key)
}

fn root_subject(cluster_id: &ClusterId, unit: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "swarm-ca");
    if let Some(unit) = unit {
        dn.push(DnType::OrganizationalUnitName, unit);
    }
    dn.push(DnType::OrganizationName, cluster_id.as_str());
    dn
}

fn root_params(subject: DistinguishedName) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(random_serial());
    params
}

fn parse_cert(pem: &str) -> Result<rustls_pki_types::CertificateDer<'static>, CertError> {
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CertError::InvalidCertificate { reason: format!("not a PEM certificate: {e}") })
}

/// Refuses a CA certificate that is not a CA (basic constraints), whose public
/// key is not `key`'s (when given), or that is outside its validity now.
fn check_ca_cert(cert_pem: &str, key: Option<&KeyPair>) -> Result<(), CertError> {
    use rcgen::PublicKeyData;
    use x509_parser::prelude::FromDer;
    let der = parse_cert(cert_pem)?;
    let bad = |reason: &str| CertError::InvalidCertificate { reason: reason.into() };
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der).map_err(|e| bad(&e.to_string()))?;
    if !cert.is_ca() {
        return Err(bad("the CA certificate is not a CA (no basicConstraints CA:TRUE)"));
    }
    if key.is_some_and(|key| cert.public_key().raw != key.subject_public_key_info().as_slice()) {
        return Err(CertError::InvalidKey { reason: "the CA key does not belong to the CA certificate".into() });
    }
    if !cert.validity().is_valid() {
        return Err(bad("the CA certificate is expired or not yet valid"));
    }
    Ok(())
}

/// The subject (as rcgen re-encodes it, the way it names the issuer of the
/// leaves it signs) and the validity of a CA certificate.
fn ca_subject_and_validity(cert_pem: &str) -> Result<(DistinguishedName, OffsetDateTime, OffsetDateTime), CertError> {
    use x509_parser::prelude::FromDer;
    let der = parse_cert(cert_pem)?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der)
        .map_err(|e| CertError::InvalidCertificate { reason: e.to_string() })?;
    let mut dn = DistinguishedName::new();
    for rdn in cert.subject().iter() {
        for atv in rdn.iter() {
            let oid: Vec<u64> = atv
                .attr_type()
                .iter()
                .ok_or_else(|| CertError::InvalidCertificate { reason: "subject attribute OID too long".into() })?
                .collect();
            let value = atv.as_str().map_err(|_| CertError::InvalidCertificate {
                reason: "the CA subject has an attribute that is not a string".into(),
            })?;
            let value = match atv.attr_value().header.tag() {
                x509_parser::der_parser::asn1_rs::Tag::PrintableString => {
                    rcgen::DnValue::PrintableString(value.try_into().map_err(|_| CertError::InvalidCertificate {
                        reason: "the CA subject has an invalid PrintableString".into(),
                    })?)
                }
                _ => rcgen::DnValue::Utf8String(value.to_owned()),
            };
            dn.push(DnType::from_oid(&oid), value);
        }
    }
    Ok((dn, cert.validity().not_before.to_datetime(), cert.validity().not_after.to_datetime()))
}

/// Refuses a CSR unless its key is ECDSA P-256 (an uncompressed point) and it
/// is signed with ECDSA-SHA256. rcgen names a CSR's key by the *signature*
/// algorithm alone, so without this a P-384 key signed with SHA-256 passed as
/// P-256 and got a certificate whose key no verifier could use.
fn check_csr_key(der: &[u8]) -> Result<(), CertError> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256};
    use x509_parser::prelude::FromDer;

    let bad = |reason: &str| CertError::InvalidCsr { reason: reason.into() };
    let (_, req) = X509CertificationRequest::from_der(der).map_err(|e| bad(&e.to_string()))?;
    let spki = &req.certification_request_info.subject_pki;
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY
        || curve.as_ref() != Some(&OID_EC_P256)
        || spki.subject_public_key.data.len() != 65
    {
        return Err(bad("key must be ECDSA P-256"));
    }
    if req.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(bad("signature must be ECDSA with SHA-256"));
    }
    Ok(())
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    crate::random_bytes(&mut b);
    b[0] &= 0x7f; // keep the DER integer positive
    b[0] |= 0x01; // and of fixed length
    SerialNumber::from_slice(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{generate_key_and_csr, CertInfo};

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("h").is_err());
        assert!("29s".parse::<CertValidity>().is_err());
        assert!("30s".parse::<CertValidity>().is_ok());
    }

    #[test]
    fn ca_sets_subject_and_ignores_what_the_csr_asks() {
        let cluster = ClusterId::random();
        let ca = RootCa::generate(&cluster).unwrap();
        // A CSR that claims to be a manager of another cluster.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(vec!["swarm-manager".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "evil");
        p.distinguished_name.push(DnType::OrganizationalUnitName, "swarm-manager");
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let node = NodeId::random();
        let issued = ca.sign_node(&csr, &node, Role::Worker, CertValidity::DEFAULT).unwrap();
        let info = CertInfo::parse(&issued.pem).unwrap();
        assert_eq!(info.node_id, node);
        assert_eq!(info.role, Role::Worker);
        assert_eq!(&info.cluster_id, &cluster);
        assert_eq!(info.serial, issued.serial);
        assert!(!info.dns_names.contains(&"swarm-manager".to_string()));
    }

    #[test]
    fn garbage_csr_is_refused() {
        let ca = RootCa::generate(&ClusterId::random()).unwrap();
        let node = NodeId::random();
        for bad in ["", "garbage", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"] {
            let err = ca.sign_node(bad, &node, Role::Worker, CertValidity::DEFAULT).unwrap_err();
            assert!(matches!(err, CertError::InvalidCsr { .. }), "{err}");
        }
        let (_k, csr) = generate_key_and_csr().unwrap();
        assert!(ca.sign_node(&csr, &node, Role::Worker, CertValidity::DEFAULT).is_ok());
    }

    /// A well-formed CSR for a P-384 key, signed by that key with
    /// ecdsa-with-SHA256 — the signature algorithm a P-256 CSR names (made with
    /// `openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha256`;
    /// the key was thrown away).
    const P384_CSR_SIGNED_WITH_SHA256: &str = "\
-----BEGIN CERTIFICATE REQUEST-----\n\
MIIBBzCBjgIBADAPMQ0wCwYDVQQDDARldmlsMHYwEAYHKoZIzj0CAQYFK4EEACID\n\
YgAELWNCHazyOwJQ5m9DNDpzsMM/wq4KLRbRVVuNjqdl2iEHUfTnFUV+uH+8QKmc\n\
odBpu65A2gMulsGUjwiqhm2g8TLxIoGLQ/N5BTBQgeQGOoli44uIwWsaCQSMM1UH\n\
IZFaoAAwCgYIKoZIzj0EAwIDaAAwZQIxAM0qx6iA+iw70gGDAfOKoSWIfW2g2ums\n\
u91NGulPlnXhE4+E4fHmtcFIwXHxO6WdmQIwWpE3Gi+S8xBa40B3gHSGMkKdsREj\n\
jzeAMUrtOet7iOhnB/Sm1xnJ+QiY9BdEVjvL\n\
-----END CERTIFICATE REQUEST-----\n\
";

    #[test]
    fn invariant_8_a_csr_for_a_key_that_is_not_p256_is_refused() {
        let ca = RootCa::generate(&ClusterId::random()).unwrap();
        let csr = P384_CSR_SIGNED_WITH_SHA256;
        // The CSR itself is valid: its signature verifies.
        let parsed = CertificateSigningRequestParams::from_pem(csr).expect("a valid CSR");
        assert_eq!(parsed.public_key.algorithm(), &PKCS_ECDSA_P256_SHA256, "rcgen names the key by its signature");
        let err = ca.sign_node(csr, &NodeId::random(), Role::Worker, CertValidity::DEFAULT).unwrap_err();
        assert!(err.to_string().contains("P-256"), "{err}");
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let key = KeyPair::generate_for(alg).unwrap();
            let csr = CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
            assert!(ca.sign_node(&csr, &NodeId::random(), Role::Worker, CertValidity::DEFAULT).is_err());
        }
    }

    #[test]
    fn invariant_8_a_huge_certificate_lifetime_is_refused_not_a_panic() {
        for huge in [u64::MAX, u64::MAX / 1000, 1 << 40, 11 * 365 * 86400] {
            assert!(CertValidity::new(Duration::from_secs(huge)).is_err(), "{huge}s accepted");
        }
        assert!("9999999999999d".parse::<CertValidity>().is_err());
        assert!("300000h".parse::<CertValidity>().is_err());
        // The longest lifetime accepted still signs.
        let ca = RootCa::generate(&ClusterId::random()).unwrap();
        let (_k, csr) = generate_key_and_csr().unwrap();
        let longest = CertValidity::new(Duration::from_secs(10 * 365 * 86400)).unwrap();
        let issued = ca.sign_node(&csr, &NodeId::random(), Role::Worker, longest).unwrap();
        assert!(issued.not_after > OffsetDateTime::now_utc().unix_timestamp() + 9 * 365 * 86400);
        // A lifetime that bypassed `new` (deserialized) is refused by the signer, not a panic.
        let forged: CertValidity = serde_json::from_str(&format!("{{\"secs\":{},\"nanos\":0}}", u64::MAX)).unwrap();
        let err = ca.sign_node(&csr, &NodeId::random(), Role::Worker, forged).unwrap_err();
        assert!(err.to_string().contains("lifetime"), "{err}");
    }

    #[test]
    fn ca_reloads_from_pem() {
        let ca = RootCa::generate(&ClusterId::random()).unwrap();
        let again = RootCa::from_pem(ca.cert_pem(), &ca.key_pem().unwrap()).unwrap();
        assert_eq!(again.digest(), ca.digest());
        assert_eq!(again.cluster_id(), ca.cluster_id());
    }

    #[test]
    fn a_ca_without_its_key_signs_nothing() {
        let ca = RootCa::generate(&ClusterId::random()).unwrap();
        let keyless = RootCa::without_key(ca.cluster_id(), ca.cert_pem()).unwrap();
        assert!(!keyless.has_key() && keyless.key_pem().is_none());
        let (_, csr) = generate_key_and_csr().unwrap();
        let err = keyless.sign_node(&csr, &NodeId::random(), Role::Worker, CertValidity::DEFAULT).unwrap_err();
        assert!(matches!(err, CertError::NoSigningKey), "{err}");
        assert!(matches!(keyless.cross_sign(&ca).unwrap_err(), CertError::NoSigningKey));
        // A leaf is not a CA.
        let issued = ca.sign_node(&csr, &NodeId::random(), Role::Worker, CertValidity::DEFAULT).unwrap();
        assert!(RootCa::without_key(ca.cluster_id(), &issued.pem).is_err());
    }

    /// What an external signer returns is taken only if it is exactly the
    /// certificate the cluster's own CA would have issued: that node, role
    /// and cluster, those names, the CSR's key, not a CA, both usages,
    /// issued by the cluster's root.
    #[test]
    fn an_external_signers_answer_is_checked_before_it_is_used() {
        let signer = RootCa::generate(&ClusterId::random()).unwrap();
        let keyless = RootCa::without_key(signer.cluster_id(), signer.cert_pem()).unwrap().with_chain("CHAIN\n".into());
        let (node, role) = (NodeId::random(), Role::Manager);
        let (_, csr) = generate_key_and_csr().unwrap();
        let good = signer.sign_node(&csr, &node, role, CertValidity::DEFAULT).unwrap();
        let far = crate::now_unix() + 86400;
        // Longer than asked for (a minute of skew allowed).
        let e = keyless.accept_signed_node(&good.pem, &csr, &node, role, crate::now_unix() + 3600).unwrap_err();
        assert!(e.to_string().contains("past what was asked"), "{e}");
        let taken = keyless.accept_signed_node(&good.pem, &csr, &node, role, far).unwrap();
        assert_eq!((taken.serial.as_str(), taken.not_after), (good.serial.as_str(), good.not_after));
        assert!(taken.pem.ends_with("-----END CERTIFICATE-----\nCHAIN\n"), "{}", taken.pem);

        let refused = |answer: &str, csr: &str, node: &NodeId, role: Role| {
            let e = keyless.accept_signed_node(answer, csr, node, role, far).unwrap_err();
            assert!(matches!(e, CertError::BadExternalCert { .. } | CertError::InvalidCsr { .. }), "{e}");
            e.to_string()
        };
        // For another node, or another role.
        assert!(refused(&good.pem, &csr, &NodeId::random(), role).contains("names node"));
        assert!(refused(&good.pem, &csr, &node, Role::Worker).contains("names node"));
        // For another key than the CSR's.
        let (_, other_csr) = generate_key_and_csr().unwrap();
        assert!(refused(&good.pem, &other_csr, &node, role).contains("key"));
        // By another CA (the same cluster ID in its subject).
        let stranger = RootCa::generate(signer.cluster_id()).unwrap();
        let foreign = stranger.sign_node(&csr, &node, role, CertValidity::DEFAULT).unwrap();
        assert!(refused(&foreign.pem, &csr, &node, role).contains("chain"));
        // Of another cluster.
        let other_cluster = RootCa::generate(&ClusterId::random()).unwrap();
        let foreign = other_cluster.sign_node(&csr, &node, role, CertValidity::DEFAULT).unwrap();
        assert!(refused(&foreign.pem, &csr, &node, role).contains("of cluster"));
        // Without the names the cluster's CA writes.
        let mut params = CertificateParams::default();
        let subject = NodeSubject::new(&node, role, signer.cluster_id());
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, subject.common_name);
        dn.push(DnType::OrganizationalUnitName, subject.org_unit);
        dn.push(DnType::OrganizationName, subject.organization);
        params.distinguished_name = dn;
        let key = csr_public_key(&csr).unwrap();
        let nameless = signer.sign_leaf(params.clone(), &key, Duration::from_secs(3600), BACKDATE).unwrap();
        assert!(refused(&nameless.pem, &csr, &node, role).contains("DNS name"));
        // A CA certificate for the right subject and key.
        params.subject_alt_names = vec![
            SanType::DnsName("swarm-manager".try_into().unwrap()),
            SanType::DnsName(node.as_str().try_into().unwrap()),
            SanType::DnsName("swarm-ca".try_into().unwrap()),
        ];
        let mut ca_params = params.clone();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = signer.issuer().unwrap();
        let as_ca = ca_params.signed_by(&key, issuer).unwrap().pem();
        assert!(refused(&as_ca, &csr, &node, role).contains("CA certificate"));
        // More names than ours: a worker that is also `swarm-ca`, or an IP.
        let role_w = Role::Worker;
        let mut worker = params.clone();
        worker.distinguished_name = {
            let subject = NodeSubject::new(&node, role_w, signer.cluster_id());
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, subject.common_name);
            dn.push(DnType::OrganizationalUnitName, subject.org_unit);
            dn.push(DnType::OrganizationName, subject.organization);
            dn
        };
        worker.subject_alt_names = vec![
            SanType::DnsName("swarm-worker".try_into().unwrap()),
            SanType::DnsName(node.as_str().try_into().unwrap()),
            SanType::DnsName("swarm-ca".try_into().unwrap()),
        ];
        let extra = signer.sign_leaf(worker.clone(), &key, Duration::from_secs(3600), BACKDATE).unwrap();
        assert!(refused(&extra.pem, &csr, &node, role_w).contains("names more"));
        worker.subject_alt_names.pop();
        worker.subject_alt_names.push(SanType::IpAddress("10.0.0.1".parse().unwrap()));
        let extra = signer.sign_leaf(worker.clone(), &key, Duration::from_secs(3600), BACKDATE).unwrap();
        assert!(refused(&extra.pem, &csr, &node, role_w).contains("names more"));
        worker.subject_alt_names.pop();
        let exact = signer.sign_leaf(worker, &key, Duration::from_secs(3600), BACKDATE).unwrap();
        keyless.accept_signed_node(&exact.pem, &csr, &node, role_w, far).unwrap();
        // Only client auth.
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_only = params.signed_by(&key, issuer).unwrap().pem();
        assert!(refused(&client_only, &csr, &node, role).contains("server and client"));
        // Garbage, and too much of it.
        assert!(refused("no certificate here", &csr, &node, role).contains("no PEM"));
        assert!(refused(&"A".repeat(70 << 10), &csr, &node, role).contains("64 KiB"));
    }
}
