//! rustls configurations for every swarmd connection.
//!
//! * Managers serve with [`server_config`]: client certificates are optional at
//!   the TLS layer (joiners have none yet), but any certificate that *is* presented
//!   must chain to the cluster root, belong to this cluster, carry a swarmd role
//!   and not be on the [`DenyList`]. Which RPC a connection may call is decided per
//!   RPC from the [`PeerIdentity`] of its certificate.
//! * Nodes dial managers with [`client_config`] (mTLS) or, while joining,
//!   [`anonymous_client_config`]. Both verify that the server certificate chains to
//!   the root and names `swarm-manager`.
//! * [`danger::bootstrap_client_config`] trusts any server; it exists only to
//!   download the root CA, whose digest the caller then checks against the token.
//!
//! TLS 1.3 is preferred, TLS 1.2 is the minimum, and the ring provider only offers
//! AEAD suites. ALPN is `h2` (gRPC).
//!
//! Rotation: [`TlsCredentials`] publishes new configurations through a
//! `tokio::sync::watch` channel after validating them; acceptors and connectors
//! read the latest one per new connection, so live connections are untouched.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::sync::watch;

use crate::{CertError, CertInfo, ClusterId, NodeId, NodeIdentity, Role};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Parses every certificate in `pem` into a trust store.
pub fn roots_from_pem(pem: &str) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let der = der.map_err(|e| CertError::InvalidCertificate { reason: e.to_string() })?;
        roots.add(der)?;
    }
    if roots.is_empty() {
        return Err(CertError::InvalidCertificate { reason: "no certificate in CA bundle".into() });
    }
    Ok(roots)
}

/// A certificate chain, leaf first: every certificate in `pem` (at most six:
/// a leaf, an organisation's cluster CA and its chain, or a cross-signature).
pub fn chain_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::InvalidCertificate { reason: e.to_string() })?;
    if chain.is_empty() || chain.len() > 6 {
        return Err(CertError::InvalidCertificate { reason: format!("{} certificates in a chain", chain.len()) });
    }
    Ok(chain)
}

/// Verifies `chain` (leaf first) for client authentication against the roots
/// in `roots_pem`, as of unix second `at`.
pub fn verify_chain_at(chain: &[CertificateDer<'_>], roots_pem: &str, at: i64) -> Result<(), CertError> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| CertError::InvalidCertificate { reason: "an empty certificate chain".into() })?;
    let roots = Arc::new(roots_from_pem(roots_pem)?);
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots, Arc::new(rustls::crypto::ring::default_provider()))
            .build()
            .map_err(|e| CertError::InvalidCertificate { reason: e.to_string() })?;
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(at.max(0) as u64));
    verifier
        .verify_client_cert(leaf, intermediates, at)
        .map_err(|e| CertError::InvalidCertificate { reason: format!("does not chain to a trusted root: {e}") })?;
    Ok(())
}

/// Who is on the other end of a connection, from its verified certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The certificate's CN.
    pub node_id: NodeId,
    /// The certificate's OU.
    pub role: Role,
    /// The certificate's O.
    pub cluster_id: ClusterId,
    /// The certificate's serial, hex.
    pub serial: String,
    /// The certificate's NotAfter, unix seconds: no RPC is served after it.
    pub not_after: i64,
}

impl PeerIdentity {
    /// The identity in a verified peer certificate chain (leaf first).
    pub fn from_chain(chain: &[CertificateDer<'_>]) -> Option<Self> {
        let info = CertInfo::from_der(chain.first()?).ok()?;
        Some(Self {
            node_id: info.node_id,
            role: info.role,
            cluster_id: info.cluster_id,
            serial: info.serial,
            not_after: info.not_after,
        })
    }
}

/// What the replicated deny-list refuses: every certificate of a removed node,
/// and single certificates by serial (a demoted manager's manager
/// certificates, revoked admin certificates).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Denied {
    /// Removed nodes: all their certificates.
    pub nodes: HashSet<NodeId>,
    /// Revoked certificates, by serial (lowercase hex).
    pub serials: HashSet<String>,
}

/// Why a certificate is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// The node was removed from the cluster.
    NodeRemoved,
    /// This certificate was revoked (the node itself may still be a member).
    CertificateRevoked,
}

/// The deny-list every acceptor and RPC of a manager checks.
///
/// Shared by every acceptor of a manager and replaced whenever the replicated
/// deny-list changes.
#[derive(Clone, Default)]
pub struct DenyList(Arc<RwLock<Denied>>);

impl DenyList {
    /// Whether the certificate `serial` of node `id` is refused, and why.
    pub fn check(&self, id: &NodeId, serial: &str) -> Option<DenyReason> {
        let d = self.0.read().expect("deny-list lock");
        if d.nodes.contains(id) {
            Some(DenyReason::NodeRemoved)
        } else if d.serials.contains(serial) {
            Some(DenyReason::CertificateRevoked)
        } else {
            None
        }
    }
    /// Whether every certificate of node `id` is refused (it was removed).
    pub fn contains(&self, id: &NodeId) -> bool {
        self.0.read().expect("deny-list lock").nodes.contains(id)
    }
    /// Replaces the whole list; returns whether it changed.
    pub fn replace(&self, denied: Denied) -> bool {
        let mut d = self.0.write().expect("deny-list lock");
        if *d == denied {
            return false;
        }
        *d = denied;
        true
    }
    /// Adds the given entries to the list.
    pub fn extend(&self, more: Denied) {
        let mut d = self.0.write().expect("deny-list lock");
        d.nodes.extend(more.nodes);
        d.serials.extend(more.serials);
    }
}

impl fmt::Debug for DenyList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0.read().expect("deny-list lock");
        f.debug_struct("DenyList").field("nodes", &d.nodes).field("serials", &d.serials.len()).finish()
    }
}

/// The node IDs of the cluster's current managers, as a node last heard them
/// from its session. A node refuses a server certificate whose node ID is not
/// among them (a demoted manager keeps a valid manager certificate for a while).
/// Empty means "not known yet": any manager certificate of the cluster passes.
#[derive(Clone, Debug, Default)]
pub struct ManagerSet(Arc<RwLock<HashSet<NodeId>>>);

impl ManagerSet {
    /// Whether `id` may serve as a manager.
    pub fn allows(&self, id: &NodeId) -> bool {
        let s = self.0.read().expect("manager set lock");
        s.is_empty() || s.contains(id)
    }
    /// Replaces the set (ignored when `ids` is empty).
    pub fn replace(&self, ids: HashSet<NodeId>) {
        if !ids.is_empty() {
            *self.0.write().expect("manager set lock") = ids;
        }
    }
    /// The IDs held.
    pub fn get(&self) -> HashSet<NodeId> {
        self.0.read().expect("manager set lock").clone()
    }
}

/// Checks a node makes on the manager certificates it is served, beyond the
/// chain and the `swarm-manager` name.
#[derive(Clone, Debug, Default)]
pub struct ServerChecks {
    /// Refuse servers on this deny-list (managers dialing managers).
    pub deny: Option<DenyList>,
    /// Refuse servers that are not current managers (workers).
    pub managers: Option<ManagerSet>,
}

/// The signature checks of a verifier that wraps webpki's (`self.inner`):
/// ours add checks on the certificate, never on its signatures.
macro_rules! delegate_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    };
}

/// Client-certificate verifier: chain to the root (webpki), then cluster, role
/// and deny-list checks. Anonymous clients pass the handshake; RPCs other than
/// the join RPCs refuse them.
#[derive(Debug)]
struct NodeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    cluster_id: ClusterId,
    deny: DenyList,
}

impl ClientCertVerifier for NodeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let info = CertInfo::from_der(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))?;
        if info.cluster_id != self.cluster_id {
            return Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
        }
        if self.deny.check(&info.node_id, &info.serial).is_some() {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }
    delegate_signature_checks!();
}

/// The manager's server configuration.
pub fn server_config(identity: &NodeIdentity, deny: DenyList) -> Result<ServerConfig, CertError> {
    let roots = Arc::new(identity.roots()?);
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| CertError::InvalidCertificate { reason: e.to_string() })?;
    let verifier = NodeClientVerifier { inner, cluster_id: identity.info.cluster_id.clone(), deny };
    let (chain, key) = chain_and_key(identity)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A node's mTLS client configuration for dialing managers (chain and name
/// checks only).
pub fn client_config(identity: &NodeIdentity) -> Result<ClientConfig, CertError> {
    client_config_checked(identity, &ServerChecks::default())
}

/// A node's mTLS client configuration that also applies `checks` to every
/// manager certificate it is served.
pub fn client_config_checked(identity: &NodeIdentity, checks: &ServerChecks) -> Result<ClientConfig, CertError> {
    let (chain, key) = chain_and_key(identity)?;
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(identity.roots()?), provider())
        .build()
        .map_err(|e| CertError::InvalidCertificate { reason: e.to_string() })?;
    let verifier = ManagerServerVerifier { inner, checks: checks.clone() };
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// webpki's server verification (chain, validity, the `swarm-manager` name),
/// then the role, the deny-list and the current managers.
#[derive(Debug)]
struct ManagerServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    checks: ServerChecks,
}

impl ServerCertVerifier for ManagerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let refused = |e| Err(rustls::Error::InvalidCertificate(e));
        let Ok(info) = CertInfo::from_der(end_entity) else {
            return refused(CertificateError::ApplicationVerificationFailure);
        };
        if info.role != Role::Manager {
            return refused(CertificateError::ApplicationVerificationFailure);
        }
        if self.checks.deny.as_ref().is_some_and(|d| d.check(&info.node_id, &info.serial).is_some()) {
            return refused(CertificateError::Revoked);
        }
        if self.checks.managers.as_ref().is_some_and(|m| !m.allows(&info.node_id)) {
            return refused(CertificateError::ApplicationVerificationFailure);
        }
        Ok(ServerCertVerified::assertion())
    }
    delegate_signature_checks!();
}

/// A client configuration without a client certificate that still verifies the
/// manager against `ca_pem` (used by the join RPC once the root is pinned).
pub fn anonymous_client_config(ca_pem: &str) -> Result<ClientConfig, CertError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_root_certificates(roots_from_pem(ca_pem)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A client configuration for HTTP/1.1 over TLS to a server outside the
/// cluster (an image registry, an external CA): the server verified against
/// `roots`, no client certificate.
pub fn http1_client_config(roots: RootCertStore) -> Result<ClientConfig, CertError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The server name clients verify in a manager's certificate.
pub fn manager_server_name() -> ServerName<'static> {
    ServerName::try_from(crate::MANAGER_SERVER_NAME).expect("valid DNS name")
}

fn chain_and_key(identity: &NodeIdentity) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CertError> {
    let chain = chain_from_pem(&identity.cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
        .map_err(|e| CertError::InvalidKey { reason: e.to_string() })?;
    Ok((chain, key))
}

/// The current TLS configurations of a node, published to acceptors and
/// connectors through `watch` channels.
pub struct TlsCredentials {
    identity: watch::Sender<Arc<NodeIdentity>>,
    client: watch::Sender<Arc<ClientConfig>>,
    checks: ServerChecks,
    server: Option<(watch::Sender<Arc<ServerConfig>>, DenyList)>,
}

impl TlsCredentials {
    /// Credentials for a worker (client side only) that refuses servers
    /// `checks` refuses.
    pub fn client_only(identity: NodeIdentity, checks: ServerChecks) -> Result<Self, CertError> {
        let client = client_config_checked(&identity, &checks)?;
        Ok(Self {
            identity: watch::Sender::new(Arc::new(identity)),
            client: watch::Sender::new(Arc::new(client)),
            checks,
            server: None,
        })
    }

    /// Credentials for a manager (client and server side); its server refuses
    /// client certificates on `deny`. (Its client side does not apply `deny`:
    /// the leader keeps replicating to a demoted manager, whose manager
    /// certificates the demotion denies, until raft has let it go.)
    pub fn with_server(identity: NodeIdentity, deny: DenyList) -> Result<Self, CertError> {
        let server = server_config(&identity, deny.clone())?;
        let mut me = Self::client_only(identity, ServerChecks::default())?;
        me.server = Some((watch::Sender::new(Arc::new(server)), deny));
        Ok(me)
    }

    /// Validates `identity` (same node and cluster, key matches) and publishes
    /// configurations built from it. On error nothing changes.
    pub fn publish(&self, identity: NodeIdentity) -> Result<(), CertError> {
        let current = self.identity.borrow().clone();
        if identity.info.node_id != current.info.node_id || identity.info.cluster_id != current.info.cluster_id {
            return Err(CertError::NoIdentity { reason: "renewed certificate names another node or cluster".into() });
        }
        let client = client_config_checked(&identity, &self.checks)?;
        let server = match &self.server {
            Some((_, deny)) => Some(server_config(&identity, deny.clone())?),
            None => None,
        };
        self.client.send_replace(Arc::new(client));
        if let (Some((tx, _)), Some(cfg)) = (&self.server, server) {
            tx.send_replace(Arc::new(cfg));
        }
        self.identity.send_replace(Arc::new(identity));
        Ok(())
    }

    /// The current identity.
    pub fn identity(&self) -> Arc<NodeIdentity> {
        self.identity.borrow().clone()
    }

    /// Follows the client configuration.
    pub fn client(&self) -> watch::Receiver<Arc<ClientConfig>> {
        self.client.subscribe()
    }

    /// Follows the server configuration (managers only).
    pub fn server(&self) -> Option<watch::Receiver<Arc<ServerConfig>>> {
        self.server.as_ref().map(|(tx, _)| tx.subscribe())
    }

    /// Follows the identity.
    pub fn identity_watch(&self) -> watch::Receiver<Arc<NodeIdentity>> {
        self.identity.subscribe()
    }
}

/// Configurations that skip verification. Each use must say why it is safe.
pub mod danger {
    use super::*;

    /// Trusts any server certificate (signatures are still checked). Safe only for
    /// fetching the root CA bundle, whose SHA-256 the caller then compares with
    /// the digest in its join token before trusting anything else.
    pub fn bootstrap_client_config() -> ClientConfig {
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .expect("ring supports TLS 1.2 and 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider())))
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        cfg
    }

    #[derive(Debug)]
    struct AcceptAnyServer(Arc<CryptoProvider>);

    impl ServerCertVerifier for AcceptAnyServer {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}
