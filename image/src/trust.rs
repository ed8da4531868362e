//! Content trust: cosign's keyed signatures over "simple signing" payloads.
//!
//! A signature is ECDSA P-256 over SHA-256 of the payload bytes, DER-encoded
//! (what `openssl dgst -sha256 -sign key.pem payload.json` and cosign's
//! `--output-signature` write, before base64). The payload is JSON:
//!
//! ```json
//! {"critical":{"identity":{"docker-reference":"REPO"},
//!              "image":{"docker-manifest-digest":"sha256:<hex>"},
//!              "type":"cosign container image signature"},
//!  "optional":null}
//! ```
//!
//! It vouches that the manifest with that digest is an image of REPO; a key
//! trusted for a scope (a glob over repositories) vouches only for images
//! whose signed REPO matches it. Keys are P-256 `SubjectPublicKeyInfo` PEM
//! (`openssl ec -pubout`, `cosign.pub`).

use base64::Engine;
use ring::signature::{self, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};

use crate::digest::Digest;

/// Most bytes of a payload.
pub const MAX_PAYLOAD: usize = 16 << 10;

/// Most bytes of a DER ECDSA P-256 signature (72, with room).
pub const MAX_SIGNATURE: usize = 128;

/// The payload type cosign writes.
pub const SIGNATURE_TYPE: &str = "cosign container image signature";

/// Why a key, payload or signature is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustError {
    /// Not a P-256 public key.
    #[error("not an ECDSA P-256 public key in PEM (SubjectPublicKeyInfo, as `openssl ec -pubout` writes): {0}")]
    Key(String),
    /// Not a P-256 private key.
    #[error("not an unencrypted ECDSA P-256 private key in PEM (PKCS#8, as `openssl genpkey` writes): {0}")]
    PrivateKey(String),
    /// Not a simple signing payload.
    #[error("not a cosign simple signing payload: {0}")]
    Payload(String),
}

/// What a payload says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The manifest digest it vouches for.
    pub digest: Digest,
    /// The repository it says the image is (`docker-reference`, tag or
    /// digest stripped).
    pub repository: String,
}

/// The DER prefix of every P-256 `SubjectPublicKeyInfo` (id-ecPublicKey,
/// prime256v1, a 66-byte BIT STRING holding an uncompressed point).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A trusted public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    point: Vec<u8>,
}

impl PublicKey {
    /// Parses a `PUBLIC KEY` PEM; only P-256 is accepted.
    pub fn from_pem(pem: &str) -> Result<Self, TrustError> {
        let der =
            SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes()).map_err(|e| TrustError::Key(format!("{e:?}")))?;
        Self::from_spki_der(der.as_ref())
    }

    /// Parses a DER `SubjectPublicKeyInfo`; only P-256 is accepted.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, TrustError> {
        if der.len() != P256_SPKI_PREFIX.len() + 65 || der[..P256_SPKI_PREFIX.len()] != P256_SPKI_PREFIX {
            return Err(TrustError::Key("another algorithm or curve, or a malformed key".into()));
        }
        let point = der[P256_SPKI_PREFIX.len()..].to_vec();
        if point[0] != 0x04 {
            return Err(TrustError::Key("a compressed point".into()));
        }
        Ok(Self { point })
    }

    /// The key as DER `SubjectPublicKeyInfo`.
    pub fn spki_der(&self) -> Vec<u8> {
        let mut v = P256_SPKI_PREFIX.to_vec();
        v.extend_from_slice(&self.point);
        v
    }

    /// The key as PEM.
    pub fn to_pem(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.spki_der());
        let mut s = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            s.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            s.push('\n');
        }
        s.push_str("-----END PUBLIC KEY-----\n");
        s
    }

    /// SHA-256 of the DER `SubjectPublicKeyInfo`, hex (as `openssl pkey
    /// -pubin -outform DER | sha256sum` prints it).
    pub fn fingerprint(&self) -> String {
        Digest::of(&self.spki_der()).hex().to_owned()
    }

    /// Whether `sig` (DER) is this key's signature over `payload`.
    pub fn verifies(&self, payload: &[u8], sig: &[u8]) -> bool {
        if sig.len() > MAX_SIGNATURE {
            return false;
        }
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &self.point).verify(payload, sig).is_ok()
    }
}

/// Signs `payload` with a PKCS#8 P-256 private key (PEM); the DER signature.
pub fn sign(private_pem: &str, payload: &[u8]) -> Result<(Vec<u8>, PublicKey), TrustError> {
    let der = PrivatePkcs8KeyDer::from_pem_slice(private_pem.as_bytes())
        .map_err(|e| TrustError::PrivateKey(format!("{e:?}")))?;
    let rng = ring::rand::SystemRandom::new();
    let pair =
        signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, der.secret_pkcs8_der(), &rng)
            .map_err(|e| TrustError::PrivateKey(e.to_string()))?;
    let sig = pair.sign(&rng, payload).map_err(|e| TrustError::PrivateKey(e.to_string()))?;
    let key = PublicKey { point: pair.public_key().as_ref().to_vec() };
    Ok((sig.as_ref().to_vec(), key))
}

/// The payload cosign signs for `digest` as an image of `repository`.
pub fn payload(digest: &Digest, repository: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "critical": {
            "identity": {"docker-reference": repository},
            "image": {"docker-manifest-digest": digest.as_str()},
            "type": SIGNATURE_TYPE,
        },
        "optional": null,
    }))
    .expect("JSON")
}

/// The repository of a reference: without `@digest` and `:tag`.
pub fn repository_of(reference: &str) -> &str {
    let r = reference.split('@').next().unwrap_or(reference);
    match r.rfind(':') {
        Some(i) if !r[i..].contains('/') => &r[..i],
        _ => r,
    }
}

/// Reads a payload.
pub fn parse_payload(bytes: &[u8]) -> Result<Claim, TrustError> {
    if bytes.len() > MAX_PAYLOAD {
        return Err(TrustError::Payload(format!("larger than {} KiB", MAX_PAYLOAD >> 10)));
    }
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| TrustError::Payload(e.to_string()))?;
    let critical = &v["critical"];
    if critical["type"] != SIGNATURE_TYPE {
        return Err(TrustError::Payload(format!("critical.type is not {SIGNATURE_TYPE:?}")));
    }
    let digest = critical["image"]["docker-manifest-digest"]
        .as_str()
        .ok_or_else(|| TrustError::Payload("no critical.image.docker-manifest-digest".into()))?
        .parse::<Digest>()
        .map_err(|e| TrustError::Payload(format!("docker-manifest-digest: {e}")))?;
    let reference = critical["identity"]["docker-reference"]
        .as_str()
        .ok_or_else(|| TrustError::Payload("no critical.identity.docker-reference".into()))?;
    if reference.is_empty() || reference.len() > 255 {
        return Err(TrustError::Payload("a docker-reference of 1 to 255 bytes".into()));
    }
    Ok(Claim { digest, repository: repository_of(reference).to_owned() })
}

/// Whether `glob` (`*` matches any run of characters, `/` included) matches
/// `repository`.
pub fn scope_matches(glob: &str, repository: &str) -> bool {
    let (g, r) = (glob.as_bytes(), repository.as_bytes());
    let (mut gi, mut ri, mut star, mut mark) = (0, 0, None, 0);
    while ri < r.len() {
        if gi < g.len() && g[gi] == b'*' {
            star = Some(gi);
            mark = ri;
            gi += 1;
        } else if gi < g.len() && g[gi] == r[ri] {
            gi += 1;
            ri += 1;
        } else if let Some(s) = star {
            gi = s + 1;
            mark += 1;
            ri = mark;
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh P-256 key, PKCS#8 PEM.
    fn key() -> String {
        let rng = ring::rand::SystemRandom::new();
        let doc = signature::EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(doc.as_ref());
        format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n")
    }

    #[test]
    fn a_signature_verifies_under_its_key_only_and_over_its_payload_only() {
        let d = Digest::of(b"manifest");
        let p = payload(&d, "acme/app");
        let (sig, key) = sign(&key(), &p).unwrap();
        assert!(key.verifies(&p, &sig));
        assert!(!key.verifies(&payload(&Digest::of(b"other"), "acme/app"), &sig));
        let again = PublicKey::from_pem(&key.to_pem()).unwrap();
        assert_eq!(again, key);
        assert_eq!(parse_payload(&p).unwrap(), Claim { digest: d, repository: "acme/app".into() });
        let mut bad = sig.clone();
        bad[10] ^= 1;
        assert!(!key.verifies(&p, &bad));
    }

    #[test]
    fn only_p256_keys_and_cosign_payloads_are_read() {
        assert!(matches!(PublicKey::from_pem("nope"), Err(TrustError::Key(_))));
        let mut der = P256_SPKI_PREFIX.to_vec();
        der.extend([4u8; 65]);
        der[5] = 0;
        assert!(PublicKey::from_spki_der(&der).is_err());
        assert!(parse_payload(b"{}").is_err());
        assert!(parse_payload(br#"{"critical":{"type":"cosign container image signature","image":{"docker-manifest-digest":"sha256:12"},"identity":{"docker-reference":"a"}}}"#).is_err());
        assert!(parse_payload(&vec![b' '; MAX_PAYLOAD + 1]).is_err());
    }

    #[test]
    fn scopes_are_globs_over_repositories() {
        assert!(scope_matches("*", "anything/at/all"));
        assert!(scope_matches("acme/*", "acme/app"));
        assert!(!scope_matches("acme/*", "evil/acme/app"));
        assert!(scope_matches("registry:5000/acme/*", "registry:5000/acme/app"));
        assert!(!scope_matches("acme/app", "acme/app2"));
        assert_eq!(repository_of("acme/app:1"), "acme/app");
        assert_eq!(repository_of("registry:5000/app"), "registry:5000/app");
        assert_eq!(repository_of("registry:5000/app:2@sha256:00"), "registry:5000/app");
    }
}
