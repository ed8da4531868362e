//! Content trust: the cluster's trusted keys, the signatures of its images,
//! and whether only signed images run.
//!
//! | key                           | value |
//! |-------------------------------|-------|
//! | `trustkey/<name>`             | [`TrustKeyRecord`] |
//! | `imagesig/<digest>/<id>`      | [`SignatureRecord`] (`id`: sha256 of payload and signature) |
//! | `contenttrust`                | `true` when only signed images run |
//!
//! A signature is cosign's (see `swarmd_image::trust`): it counts for a
//! service's image when a trusted key verifies it, its payload names the
//! image's manifest digest, the payload's repository is the one the service
//! names the image by (for a service pinned by digest alone: one of the
//! image's names), and the key's scope (a glob over repositories) covers that
//! repository — so a key vouches only for names in its scope, whatever
//! repository its holder writes into a payload. Whether one counts is decided
//! when it is used (admission, the dispatcher, the worker) against the keys
//! then: a key removed stops vouching at once.

use serde::{Deserialize, Serialize};
use swarmd_image::trust::{parse_payload, scope_matches, PublicKey, MAX_PAYLOAD, MAX_SIGNATURE};

use super::{encode, Command, Rejection, StateError, StateView, WriteBatch};

/// A key the cluster trusts to sign images.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustKeyRecord {
    /// Its name (1 to 64 of `A-Za-z0-9._-`).
    pub name: String,
    /// DER `SubjectPublicKeyInfo`, ECDSA P-256.
    pub public_key: Vec<u8>,
    /// The repositories it vouches for (a glob; `*`: all).
    pub scope: String,
    /// Added at, unix seconds.
    pub created_at: i64,
}

/// One signature of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureRecord {
    /// The simple signing payload, as signed.
    pub payload: Vec<u8>,
    /// DER ECDSA signature over it.
    pub signature: Vec<u8>,
    /// Added at, unix seconds.
    pub added_at: i64,
}

impl SignatureRecord {
    /// Its ID: sha256 of the payload, a zero byte, and the signature.
    pub fn id(&self) -> String {
        let mut b = self.payload.clone();
        b.push(0);
        b.extend_from_slice(&self.signature);
        swarmd_image::Digest::of(&b).hex().to_owned()
    }
}

/// Most signatures one image keeps.
pub const MAX_SIGNATURES: usize = 32;

/// Most trusted keys.
pub const MAX_TRUST_KEYS: usize = 256;

const KEY_PREFIX: &str = "trustkey/";
const SIG_PREFIX: &str = "imagesig/";
const CONTENT_TRUST_KEY: &[u8] = b"contenttrust";

fn key_key(name: &str) -> Vec<u8> {
    format!("{KEY_PREFIX}{name}").into_bytes()
}

fn sig_key(digest: &str, id: &str) -> Vec<u8> {
    format!("{SIG_PREFIX}{digest}/{id}").into_bytes()
}

/// Refuses a key name that is not 1 to 64 of `A-Za-z0-9._-`.
pub fn check_trust_key_name(name: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 64 || !name.chars().all(ok) {
        return Err(format!("key name {name:?}: 1 to 64 letters, digits, '.', '_' or '-'"));
    }
    Ok(())
}

/// A signature that counts for an image: the key that verified it and the
/// repository it vouches for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vouch {
    /// The key's name.
    pub key: String,
    /// The repository the payload names.
    pub repository: String,
}

impl StateView {
    /// The trusted keys, by name.
    pub fn trust_keys(&self) -> Result<Vec<TrustKeyRecord>, StateError> {
        self.scan(KEY_PREFIX)
    }

    /// The signatures of image `digest`.
    pub fn image_signatures(&self, digest: &str) -> Result<Vec<SignatureRecord>, StateError> {
        self.scan(&format!("{SIG_PREFIX}{digest}/"))
    }

    /// Whether only signed images run.
    pub fn content_trust_required(&self) -> Result<bool, StateError> {
        Ok(self.get::<bool>(CONTENT_TRUST_KEY)?.unwrap_or(false))
    }

    /// The repositories a service's image reference `image` names it by:
    /// the name it was pinned with, or (a digest alone) every name the image has.
    pub fn repositories_of(&self, image: &str) -> Result<Vec<String>, StateError> {
        use swarmd_image::trust::repository_of;
        Ok(match image.rsplit_once('@') {
            Some((name, _)) => vec![repository_of(name).to_owned()],
            None => {
                let names = self.image_names(image)?;
                names.iter().map(|n| repository_of(n).to_owned()).collect()
            }
        })
    }

    /// The signatures of image `digest` that count now for `repositories`,
    /// with the keys that verify them (see the module doc).
    pub fn vouches(
        &self,
        digest: &str,
        repositories: &[String],
    ) -> Result<Vec<(Vouch, SignatureRecord, TrustKeyRecord)>, StateError> {
        let keys = self.trust_keys()?;
        let mut out = Vec::new();
        for s in self.image_signatures(digest)? {
            let Ok(claim) = parse_payload(&s.payload) else { continue };
            if claim.digest.as_str() != digest || !repositories.contains(&claim.repository) {
                continue;
            }
            for k in &keys {
                let Ok(pk) = PublicKey::from_spki_der(&k.public_key) else { continue };
                if scope_matches(&k.scope, &claim.repository) && pk.verifies(&s.payload, &s.signature) {
                    let vouch = Vouch { key: k.name.clone(), repository: claim.repository.clone() };
                    out.push((vouch, s.clone(), k.clone()));
                }
            }
        }
        Ok(out)
    }

    /// Whether a service's image `image` (`NAME@sha256:…` or `sha256:…`)
    /// may run under content trust; if not, why (the keys tried, and what
    /// each lacked).
    pub fn trust_verdict(&self, image: &str) -> Result<Result<Vouch, String>, StateError> {
        let digest = super::images::pinned_digest(image).unwrap_or(image);
        let repositories = self.repositories_of(image)?;
        if let Some((v, _, _)) = self.vouches(digest, &repositories)?.into_iter().next() {
            return Ok(Ok(v));
        }
        let sigs = self.image_signatures(digest)?;
        let keys = self.trust_keys()?;
        let tried = if keys.is_empty() {
            "no key is trusted (secretctl trust key add)".to_owned()
        } else {
            let names: Vec<String> = keys.iter().map(|k| format!("{} (scope {})", k.name, k.scope)).collect();
            format!("keys tried: {}", names.join(", "))
        };
        let what = if sigs.is_empty() {
            "it has no signature".to_owned()
        } else {
            let repos: Vec<String> =
                sigs.iter().filter_map(|s| parse_payload(&s.payload).ok()).map(|c| c.repository).collect();
            format!(
                "none of its {} signature(s) (for {}) is for {} by a trusted key whose scope covers it",
                sigs.len(),
                repos.join(", "),
                if repositories.is_empty() { "a name it has".to_owned() } else { repositories.join(" or ") }
            )
        };
        Ok(Err(format!("image {digest} is not trusted: {what}; {tried}")))
    }
}

/// `AddTrustKey`, `RemoveTrustKey`, `AddImageSignature`, `SetContentTrust`.
pub(super) fn plan_trust(view: &StateView, cmd: &Command) -> Result<Result<WriteBatch, Rejection>, StateError> {
    if view.cluster()?.is_none() {
        return Ok(Err(Rejection::NotInitialised));
    }
    let mut batch = WriteBatch::default();
    let invalid = |s: String| Ok(Err(Rejection::Invalid(s)));
    match cmd {
        Command::AddTrustKey(k) => {
            if let Err(e) = check_trust_key_name(&k.name) {
                return invalid(e);
            }
            if let Err(e) = PublicKey::from_spki_der(&k.public_key) {
                return invalid(format!("key {}: {e}", k.name));
            }
            if k.scope.is_empty() || k.scope.len() > 255 || k.scope.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return invalid(format!("key {}: a scope of 1 to 255 bytes without spaces (e.g. acme/*)", k.name));
            }
            if view.get::<TrustKeyRecord>(&key_key(&k.name))?.is_some() {
                return invalid(format!("a trusted key named {} exists: remove it first", k.name));
            }
            if view.trust_keys()?.len() >= MAX_TRUST_KEYS {
                return invalid(format!("at most {MAX_TRUST_KEYS} trusted keys"));
            }
            batch.insert(key_key(&k.name), encode(k.as_ref()));
        }
        Command::RemoveTrustKey { name } => {
            if view.get::<TrustKeyRecord>(&key_key(name))?.is_none() {
                return invalid(format!("no trusted key named {name}"));
            }
            batch.remove(key_key(name));
        }
        Command::AddImageSignature { digest, signature } => {
            if view.image(digest)?.is_none() {
                return invalid(format!("no image {digest}"));
            }
            if signature.payload.len() > MAX_PAYLOAD || signature.signature.len() > MAX_SIGNATURE {
                return invalid(format!("a payload over {MAX_PAYLOAD} bytes or a signature over {MAX_SIGNATURE}"));
            }
            match parse_payload(&signature.payload) {
                Ok(c) if c.digest.as_str() == digest => {}
                Ok(c) => return invalid(format!("the payload signs {}, not {digest}", c.digest)),
                Err(e) => return invalid(e.to_string()),
            }
            let id = signature.id();
            if view.get::<SignatureRecord>(&sig_key(digest, &id))?.is_none() {
                if view.image_signatures(digest)?.len() >= MAX_SIGNATURES {
                    return invalid(format!("image {digest} has {MAX_SIGNATURES} signatures already"));
                }
                batch.insert(sig_key(digest, &id), encode(signature.as_ref()));
            }
        }
        Command::SetContentTrust { required } => {
            batch.insert(CONTENT_TRUST_KEY.to_vec(), encode(required));
        }
        _ => unreachable!("not a trust command"),
    }
    Ok(Ok(batch))
}

/// The keys of image `digest`'s signatures (removed with the image).
pub(super) fn signature_keys(view: &StateView, digest: &str) -> Result<Vec<Vec<u8>>, StateError> {
    Ok(view.prefix(format!("{SIG_PREFIX}{digest}/").as_bytes())?.into_iter().map(|(k, _)| k.to_vec()).collect())
}
