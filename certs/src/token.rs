//! Join tokens: `SWDTKN-1-<sha256 of the root CA bundle, hex>-<secret, hex>`.
//!
//! The digest lets a joiner pin the CA before it trusts anything the manager
//! says; the secret proves the joiner was invited. Worker and manager tokens have
//! different secrets and the same digest. The secret part never appears in
//! `Debug` or `Display` of a parsed token.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Every token starts with this.
pub const TOKEN_PREFIX: &str = "SWDTKN-1-";
const SECRET_BYTES: usize = 16;

/// Why a string is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The string does not have the token's shape.
    #[error("malformed join token: expected SWDTKN-1-<64 hex digits>-<32 hex digits> ({reason})")]
    Malformed { reason: &'static str },
}

/// SHA-256 of a root CA bundle exactly as served (PEM text).
pub fn ca_digest(ca_bundle_pem: &str) -> [u8; 32] {
    Sha256::digest(ca_bundle_pem.as_bytes()).into()
}

/// A parsed join token.
#[derive(Clone)]
pub struct JoinToken {
    digest: [u8; 32],
    secret: Zeroizing<[u8; SECRET_BYTES]>,
}

impl JoinToken {
    /// A fresh token with a random secret for the CA whose bundle has `digest`.
    pub fn generate(digest: [u8; 32]) -> Self {
        let mut secret = Zeroizing::new([0u8; SECRET_BYTES]);
        crate::random_bytes(secret.as_mut());
        Self { digest, secret }
    }

    /// The CA digest this token pins.
    pub fn ca_digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// Whether `bundle_pem` is the CA this token pins.
    pub fn pins(&self, bundle_pem: &str) -> bool {
        bool::from(ca_digest(bundle_pem).ct_eq(&self.digest))
    }

    /// Constant-time comparison of the whole token.
    pub fn ct_matches(&self, other: &JoinToken) -> bool {
        let d = self.digest.ct_eq(&other.digest);
        let s = self.secret.as_ref().ct_eq(other.secret.as_ref());
        bool::from(d & s)
    }

    /// The full token text, secret included. Handle the result as a secret.
    pub fn expose(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("{TOKEN_PREFIX}{}-{}", hex::encode(self.digest), hex::encode(self.secret.as_ref())))
    }
}

impl FromStr for JoinToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, TokenError> {
        let s = s.trim();
        let rest = s.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Malformed { reason: "missing SWDTKN-1- prefix" })?;
        let (digest_hex, secret_hex) =
            rest.split_once('-').ok_or(TokenError::Malformed { reason: "missing secret part" })?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(digest_hex, &mut digest).map_err(|_| TokenError::Malformed { reason: "bad CA digest" })?;
        let mut secret = Zeroizing::new([0u8; SECRET_BYTES]);
        hex::decode_to_slice(secret_hex, secret.as_mut())
            .map_err(|_| TokenError::Malformed { reason: "bad secret" })?;
        Ok(Self { digest, secret })
    }
}

impl fmt::Display for JoinToken {
    /// Prints the digest and redacts the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOKEN_PREFIX}{}-<redacted>", hex::encode(self.digest))
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_redacts() {
        let t = JoinToken::generate(ca_digest("bundle"));
        let text = t.expose();
        let back: JoinToken = text.parse().unwrap();
        assert!(back.ct_matches(&t));
        assert!(back.pins("bundle"));
        assert!(!back.pins("other bundle"));
        let secret_hex = text.rsplit('-').next().unwrap().to_owned();
        assert!(!format!("{t}").contains(&secret_hex));
        assert!(!format!("{t:?}").contains(&secret_hex));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = JoinToken::generate([7; 32]).expose().to_string();
        for bad in [
            "",
            "SWMTKN-1-abc-def",
            "SWDTKN-1-",
            &good.replace("SWDTKN-1-", "SWDTKN-2-"),
            &good[..good.len() - 1],
            &format!("{good}0"),
            &good.replacen('-', "", 3),
            &format!("{}g", &good[..good.len() - 1]),
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn different_secrets_do_not_match() {
        let a = JoinToken::generate([1; 32]);
        let b = JoinToken::generate([1; 32]);
        assert!(!a.ct_matches(&b));
    }
}
