//! Recovery of a node whose certificate expired while it was off, or was
//! signed by a root that a rotation replaced while it was off (Docker Swarm
//! makes such a node leave and rejoin, moby#24132).
//!
//! The node proves that it still holds its last certificate's key: it signs a
//! fresh nonce from the manager, bound to the CSR of its new key, with the old
//! key ([`proof_message`]). The manager checks the old certificate's chain to
//! a root it trusts now or to the root its last rotation replaced — at a time
//! the certificate was valid — and its own records (not removed, latest
//! serial, within the recovery window), then issues a certificate for the same
//! node ID and the node's current role. No token is involved.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use swarmd_proto::ca::ca_client::CaClient;
use swarmd_proto::ca::{GetRecoveryNonceRequest, GetRootCaRequest, RecoverNodeCertificateRequest};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::join::{refused_or_unreachable, JoinError};
use crate::tls::{anonymous_client_config, chain_from_pem};
use crate::{dial, generate_key_and_csr, CertError, CertInfo, NodeIdentity};

/// What a proof signs: a context string, the nonce and the CSR, with lengths.
pub fn proof_message(nonce: &[u8], csr_pem: &str) -> Vec<u8> {
    let mut m = b"swarmd node recovery v1\0".to_vec();
    m.extend_from_slice(&(nonce.len() as u32).to_be_bytes());
    m.extend_from_slice(nonce);
    m.extend_from_slice(&(csr_pem.len() as u32).to_be_bytes());
    m.extend_from_slice(csr_pem.as_bytes());
    m
}

/// Signs `message` with a node key (PKCS#8 PEM, ECDSA P-256): DER ECDSA-SHA256.
pub fn sign_proof(key_pem: &str, message: &[u8]) -> Result<Vec<u8>, CertError> {
    use rcgen::SigningKey;
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| CertError::InvalidKey { reason: e.to_string() })?;
    key.sign(message).map_err(|e| CertError::InvalidKey { reason: e.to_string() })
}

/// Checks that `signature` over `message` was made by the key of the
/// certificate `leaf` (DER), ECDSA P-256 with SHA-256.
pub fn verify_proof(leaf: &[u8], message: &[u8], signature: &[u8]) -> Result<(), CertError> {
    let bad = |reason: &str| CertError::InvalidCertificate { reason: reason.into() };
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| bad(&e.to_string()))?;
    let point = &cert.public_key().subject_public_key.data;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, point.as_ref())
        .verify(message, signature)
        .map_err(|_| bad("the proof of possession does not verify with the certificate's key"))
}

/// Verifies the chain in `chain_pem` (leaf first) against the roots in
/// `roots_pem` as of the last second the leaf was valid, or now if it still
/// is; returns the leaf's identity. The caller checks the time window.
pub fn verify_chain_ignoring_expiry(chain_pem: &str, roots_pem: &str) -> Result<(CertInfo, Vec<u8>), CertError> {
    let chain = chain_from_pem(chain_pem)?;
    let info = CertInfo::from_der(&chain[0])?;
    let now = crate::now_unix();
    let at = now.min(info.not_after - 1).max(info.not_before);
    crate::tls::verify_chain_at(&chain, roots_pem, at)?;
    Ok((info, chain[0].to_vec()))
}

/// Whether `cert` may sign certificates: basicConstraints CA:TRUE, and
/// keyCertSign if it has a key usage; valid now.
fn is_ca(cert: &X509Certificate<'_>) -> bool {
    let signs = match cert.key_usage() {
        Ok(Some(ku)) => ku.value.key_cert_sign(),
        Ok(None) => true,
        Err(_) => false,
    };
    cert.is_ca() && signs && cert.validity().is_valid()
}

/// Whether `cross_signed_pem` vouches for `anchor_pem`: both CA certificates
/// (a node's leaf vouches for nothing), the anchor self-signed, the same
/// subject and key, and the cross-signature by one of the roots in `trusted_pem`.
pub fn vouches_for(trusted_pem: &str, cross_signed_pem: &str, anchor_pem: &str) -> bool {
    let parse = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).ok();
    let (Some(cross), Some(anchor)) = (parse(cross_signed_pem), parse(anchor_pem)) else { return false };
    let (Ok((_, cross)), Ok((_, anchor))) = (X509Certificate::from_der(&cross), X509Certificate::from_der(&anchor))
    else {
        return false;
    };
    if !is_ca(&cross) || !is_ca(&anchor) || anchor.verify_signature(None).is_err() {
        return false;
    }
    if cross.public_key().raw != anchor.public_key().raw || cross.subject().as_raw() != anchor.subject().as_raw() {
        return false;
    }
    CertificateDer::pem_slice_iter(trusted_pem.as_bytes()).flatten().any(|root| {
        X509Certificate::from_der(&root).is_ok_and(|(_, root)| {
            root.subject().as_raw() == cross.issuer().as_raw()
                && cross.verify_signature(Some(root.public_key())).is_ok()
        })
    })
}

/// Whether `identity` needs recovery before it can talk to managers: its
/// certificate has expired (or will within `margin` seconds).
pub fn expired(identity: &NodeIdentity, margin: i64) -> bool {
    identity.info.not_after <= crate::now_unix() + margin
}

/// A recovered identity, and the managers the answer named.
#[derive(Debug)]
pub struct Recovered {
    /// The new identity: new key, certificate, roots to trust.
    pub identity: NodeIdentity,
    /// The managers it reported: addresses.
    pub managers: Vec<String>,
    /// The managers it reported: node IDs.
    pub manager_ids: Vec<crate::NodeId>,
}

/// The roots this node should trust to talk to the manager at `addr`: its
/// own, or — if the cluster rotated to a root it does not know — the new root,
/// once a cross-signature by a root it trusts vouches for it. `None` when the
/// node's own roots include the cluster's.
///
/// Asked over TLS verified against the node's own roots: after a rotation
/// managers keep the cross-signed certificate in their chains, so a node that
/// trusts only the old root still authenticates them (as managers: the
/// `swarm-manager` name, which no worker certificate carries). A manager this
/// node cannot authenticate, or whose answer vouches for nothing, is
/// `Unreachable`: the caller tries the next one, and never gives up a
/// certificate that is still good.
pub async fn rotated_root(addr: &str, trusted_pem: &str) -> Result<Option<String>, JoinError> {
    let unreachable = |detail: String| JoinError::Unreachable { detail: format!("{addr}: {detail}") };
    let cfg = anonymous_client_config(trusted_pem).map_err(|e| JoinError::BadCertificate(e.to_string()))?;
    let chan = dial::connect(addr, Arc::new(cfg)).await.map_err(|e| unreachable(e.to_string()))?;
    let r = CaClient::new(chan)
        .get_root_ca(GetRootCaRequest {})
        .await
        .map_err(|s| refused_or_unreachable(addr, s))?
        .into_inner();
    let anchor = r.ca_bundle_pem;
    let known = |pem: &str| CertificateDer::pem_slice_iter(pem.as_bytes()).flatten().collect::<Vec<_>>();
    let mine = known(trusted_pem);
    if known(&anchor).iter().all(|c| mine.contains(c)) {
        return Ok(None);
    }
    if !r.cross_signed_pem.is_empty() && vouches_for(trusted_pem, &r.cross_signed_pem, &anchor) {
        return Ok(Some(anchor));
    }
    Err(unreachable("serves a root CA that no root this node trusts vouches for".into()))
}

/// What a node checks as it starts: if its certificate expired, or the
/// cluster rotated its root while the node was off, recovers it at the first
/// manager in `remotes` that answers. `Ok(None)`: nothing to do, or no manager
/// answered and the certificate is still good. Writes nothing: the caller
/// stores the identity.
pub async fn refresh(current: &NodeIdentity, remotes: &[String]) -> Result<Option<Recovered>, JoinError> {
    let expired = expired(current, 5);
    let mut last = JoinError::NoRemote;
    for addr in remotes {
        match rotated_root(addr, &current.ca_pem).await {
            Ok(None) if !expired => return Ok(None),
            Ok(rotated) => match recover_via(addr, current, rotated).await {
                // A refusal by an authenticated manager is the cluster's word.
                Ok(r) => return Ok(Some(r)),
                Err(e @ JoinError::Refused { .. }) => return Err(e),
                Err(e) => last = e,
            },
            // Nothing a server says before it is authenticated is final.
            Err(e) => last = e,
        }
    }
    if expired {
        Err(last)
    } else {
        Ok(None)
    }
}

async fn recover_via(addr: &str, current: &NodeIdentity, rotated: Option<String>) -> Result<Recovered, JoinError> {
    let bad = |e: CertError| JoinError::BadCertificate(e.to_string());
    let trust = rotated.unwrap_or_else(|| current.ca_pem.clone());
    let cfg = anonymous_client_config(&trust).map_err(bad)?;
    let chan = dial::connect(addr, Arc::new(cfg))
        .await
        .map_err(|e| JoinError::Unreachable { detail: format!("{addr}: {e}") })?;
    let mut client = CaClient::new(chan);
    let nonce = client
        .get_recovery_nonce(GetRecoveryNonceRequest {})
        .await
        .map_err(|s| refused_or_unreachable(addr, s))?
        .into_inner()
        .nonce;
    let (key, csr) = generate_key_and_csr().map_err(bad)?;
    let signature = sign_proof(&current.key_pem, &proof_message(&nonce, &csr)).map_err(bad)?;
    let resp = client
        .recover_node_certificate(RecoverNodeCertificateRequest {
            certificate_pem: current.cert_pem.clone(),
            csr_pem: csr,
            nonce,
            signature,
        })
        .await
        .map_err(|s| {
            let removed = s.metadata().get(swarmd_proto::NODE_REMOVED_METADATA).is_some();
            let e = refused_or_unreachable(addr, s);
            match e {
                JoinError::Refused { addr, reason } if removed => {
                    JoinError::Refused { addr, reason: format!("{reason} (this node was removed)") }
                }
                e => e,
            }
        })?
        .into_inner();
    // The roots to trust next must include the one the manager was
    // authenticated with, and the new certificate must chain to them.
    let bundle = if resp.ca_bundle_pem.is_empty() { trust.clone() } else { resp.ca_bundle_pem };
    let roots = |pem: &str| CertificateDer::pem_slice_iter(pem.as_bytes()).flatten().collect::<Vec<_>>();
    let kept = roots(&bundle);
    if !roots(&trust).iter().any(|r| kept.contains(r)) {
        return Err(JoinError::BadCertificate("the manager answered with roots this node does not trust".into()));
    }
    verify_chain_ignoring_expiry(&resp.certificate_pem, &bundle).map_err(bad)?;
    let identity = NodeIdentity::new(bundle, resp.certificate_pem, key).map_err(bad)?;
    if identity.info.node_id != current.info.node_id || identity.info.cluster_id != current.info.cluster_id {
        return Err(JoinError::BadCertificate("the recovered certificate names another node or cluster".into()));
    }
    let manager_ids = resp.manager_ids.iter().filter_map(|m| m.parse().ok()).collect();
    Ok(Recovered { identity, managers: resp.managers, manager_ids })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertValidity, ClusterId, NodeId, Role, RootCa};

    fn node(ca: &RootCa) -> NodeIdentity {
        let (key, csr) = generate_key_and_csr().unwrap();
        let issued = ca.sign_node(&csr, &NodeId::random(), Role::Worker, CertValidity::DEFAULT).unwrap();
        NodeIdentity::new(ca.cert_pem().into(), issued.pem, key).unwrap()
    }

    #[test]
    fn a_proof_verifies_only_with_the_certificates_key_over_the_same_nonce_and_csr() {
        let ca = RootCa::generate(&ClusterId::random()).unwrap();
        let id = node(&ca);
        let leaf = chain_from_pem(&id.cert_pem).unwrap()[0].to_vec();
        let msg = proof_message(b"nonce", "csr");
        let sig = sign_proof(&id.key_pem, &msg).unwrap();
        verify_proof(&leaf, &msg, &sig).unwrap();
        assert!(verify_proof(&leaf, &proof_message(b"nonce2", "csr"), &sig).is_err());
        assert!(verify_proof(&leaf, &proof_message(b"nonce", "csr2"), &sig).is_err());
        let other = node(&ca);
        assert!(verify_proof(&leaf, &msg, &sign_proof(&other.key_pem, &msg).unwrap()).is_err());
    }

    #[test]
    fn a_chain_verifies_against_the_old_root_through_the_cross_signature_and_not_against_a_stranger() {
        let old = RootCa::generate(&ClusterId::random()).unwrap();
        let new = old.generate_successor().unwrap();
        let cross = old.cross_sign(&new).unwrap();
        let signer = RootCa::from_pem(new.cert_pem(), &new.key_pem().unwrap()).unwrap().with_chain(cross.clone());
        let id = node(&signer);
        verify_chain_ignoring_expiry(&id.cert_pem, old.cert_pem()).unwrap();
        verify_chain_ignoring_expiry(&id.cert_pem, new.cert_pem()).unwrap();
        let stranger = RootCa::generate(&ClusterId::random()).unwrap();
        assert!(verify_chain_ignoring_expiry(&id.cert_pem, stranger.cert_pem()).is_err());
        // The cross-signature vouches for the new root to a node that trusts the old one only.
        assert!(vouches_for(old.cert_pem(), &cross, new.cert_pem()));
        assert!(!vouches_for(stranger.cert_pem(), &cross, new.cert_pem()));
        assert!(!vouches_for(old.cert_pem(), &cross, stranger.cert_pem()));
        let forged = stranger.cross_sign(&new).unwrap();
        assert!(!vouches_for(old.cert_pem(), &forged, new.cert_pem()));
    }

    /// Review finding: a node's own certificate, signed by the trusted root,
    /// vouched for itself as a "new root" (same subject and key as itself), so
    /// a restarting node adopted a worker's certificate as its only root.
    #[test]
    fn a_leaf_vouches_for_nothing_not_even_itself() {
        let root = RootCa::generate(&ClusterId::random()).unwrap();
        let leaf = node(&root).cert_pem;
        let leaf_only = leaf.split_inclusive("-----END CERTIFICATE-----\n").next().unwrap().to_owned();
        assert!(!vouches_for(root.cert_pem(), &leaf_only, &leaf_only));
        // Nor a leaf for a real new root, nor a real cross-signature for a leaf.
        let new = root.generate_successor().unwrap();
        let cross = root.cross_sign(&new).unwrap();
        assert!(!vouches_for(root.cert_pem(), &leaf_only, new.cert_pem()));
        assert!(!vouches_for(root.cert_pem(), &cross, &leaf_only));
        assert!(vouches_for(root.cert_pem(), &cross, new.cert_pem()));
    }
}
