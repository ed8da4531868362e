//! Envelope encryption: the node-local key-encryption key (KEK) and the
//! cluster data key (DEK).
//!
//! * `keys/kek` — 32 random bytes, mode 0600, never leaves this node. (With
//!   autolock it will be derived from the unlock key instead of stored.)
//! * `keys/dek` — the cluster data key sealed under the KEK.
//!
//! The DEK seals every value the replicated store must not hold in plaintext: the
//! CA private key, the join-token secrets and, later, secret values. Each sealed
//! value binds a purpose string as associated data, so a ciphertext moved to
//! another field fails to open.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Errors of key handling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A key file is missing or unreadable.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key file has the wrong length or format.
    #[error("{path}: malformed key file")]
    Malformed { path: PathBuf },
    /// Authentication failed: wrong key, or the ciphertext was altered.
    #[error("integrity check failed for {purpose}: wrong key or tampered ciphertext")]
    Integrity { purpose: String },
}

/// A value sealed with XChaCha20-Poly1305: a random 24-byte nonce and the ciphertext with its tag.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    nonce: [u8; 24],
    ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealed({} bytes)", self.ciphertext.len())
    }
}

impl Sealed {
    /// The ciphertext length (plaintext + 16-byte tag).
    pub fn len(&self) -> usize {
        self.ciphertext.len()
    }
    /// Never true for a sealed value (the tag alone is 16 bytes).
    pub fn is_empty(&self) -> bool {
        self.ciphertext.is_empty()
    }
}

/// A 256-bit symmetric key, wiped on drop and redacted in `Debug`.
#[derive(Clone)]
pub struct SymmetricKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SymmetricKey(<redacted>)")
    }
}

impl SymmetricKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        swarmd_certs::random_bytes(k.as_mut());
        Self(k)
    }

    /// The raw key bytes, for handing the data key to a joining manager over mTLS.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// A key from raw bytes (32 of them).
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = b.try_into().ok()?;
        Some(Self(Zeroizing::new(arr)))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&Key::from(*self.0))
    }

    /// Seals `plaintext`, binding `purpose` as associated data.
    pub fn seal(&self, purpose: &str, plaintext: &[u8]) -> Sealed {
        let mut nonce = [0u8; 24];
        swarmd_certs::random_bytes(&mut nonce);
        let ciphertext = self
            .cipher()
            .encrypt(&XNonce::from(nonce), Payload { msg: plaintext, aad: purpose.as_bytes() })
            .expect("XChaCha20-Poly1305 encryption of an in-memory buffer cannot fail");
        Sealed { nonce, ciphertext }
    }

    /// Opens a value sealed for `purpose`.
    pub fn open(&self, purpose: &str, sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.cipher()
            .decrypt(&XNonce::from(sealed.nonce), Payload { msg: &sealed.ciphertext, aad: purpose.as_bytes() })
            .map(Zeroizing::new)
            .map_err(|_| KeyError::Integrity { purpose: purpose.to_owned() })
    }
}

/// Purpose strings (associated data) of the values the DEK seals.
pub mod purpose {
    /// The cluster data key, sealed under the KEK.
    pub const DEK: &str = "swarmd/dek/v1";
    /// The CA private key.
    pub fn ca_key(cluster: &str) -> String {
        format!("swarmd/{cluster}/ca-key")
    }
    /// A join-token secret.
    pub fn join_token(cluster: &str, role: swarmd_certs::Role) -> String {
        format!("swarmd/{cluster}/join-token/{role}")
    }
}

/// The `keys/` directory of a manager.
pub struct KeyDir {
    dir: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io { path: path.to_owned(), source }
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f =
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
    }
    Ok(())
}

impl KeyDir {
    /// The `keys/` directory below `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self { dir: data_dir.join("keys") }
    }

    /// Creates a KEK and seals `dek` under it. Refuses to overwrite existing keys.
    pub fn create(&self, dek: &SymmetricKey) -> Result<(), KeyError> {
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&self.dir))?;
        let kek = SymmetricKey::generate();
        write_private(&self.dir.join("kek"), kek.0.as_ref())?;
        let sealed = kek.seal(purpose::DEK, dek.0.as_ref());
        let bytes = bincode::serialize(&sealed).expect("serialize sealed key");
        write_private(&self.dir.join("dek"), &bytes)
    }

    /// Loads the KEK and opens the DEK.
    pub fn load_dek(&self) -> Result<SymmetricKey, KeyError> {
        let kek_path = self.dir.join("kek");
        let kek_bytes = Zeroizing::new(fs::read(&kek_path).map_err(io_err(&kek_path))?);
        let kek = SymmetricKey::from_slice(&kek_bytes).ok_or(KeyError::Malformed { path: kek_path })?;
        let dek_path = self.dir.join("dek");
        let bytes = fs::read(&dek_path).map_err(io_err(&dek_path))?;
        let sealed: Sealed =
            bincode::deserialize(&bytes).map_err(|_| KeyError::Malformed { path: dek_path.clone() })?;
        let raw = kek.open(purpose::DEK, &sealed)?;
        SymmetricKey::from_slice(&raw).ok_or(KeyError::Malformed { path: dek_path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_binds_purpose() {
        let k = SymmetricKey::generate();
        let s = k.seal("a", b"hello");
        assert_eq!(&k.open("a", &s).unwrap()[..], b"hello");
        assert!(matches!(k.open("b", &s), Err(KeyError::Integrity { .. })));
        assert!(SymmetricKey::generate().open("a", &s).is_err());
        let mut t = s.clone();
        t.ciphertext[0] ^= 1;
        assert!(k.open("a", &t).is_err());
    }

    #[test]
    fn key_dir_round_trip_and_modes() {
        let d = tempfile::tempdir().unwrap();
        let kd = KeyDir::new(d.path());
        let dek = SymmetricKey::generate();
        kd.create(&dek).unwrap();
        for f in ["kek", "dek"] {
            let m = fs::metadata(d.path().join("keys").join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(m, 0o600, "{f}");
        }
        let back = kd.load_dek().unwrap();
        assert_eq!(back.0.as_ref(), dek.0.as_ref());
        assert!(!format!("{back:?}").contains(&format!("{:?}", &dek.0[..4])));
    }
}
