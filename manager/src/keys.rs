//! Envelope encryption: the node-local key-encryption key (KEK) and the
//! cluster data key (DEK).
//!
//! * `keys/kek` — 32 random bytes, mode 0600, never leaves this node. With
//!   autolock it is replaced by `keys/kek.locked` (sealed under the unlock key).
//!   A key file that is replaced or deleted is overwritten with zeros in place
//!   first, so its old blocks do not keep the key.
//! * `keys/dek` — the cluster's data keys (a [`Keyring`]: every data key still in
//!   use, by ID) sealed under the KEK.
//!
//! The active data key seals every value the replicated store must not hold in
//! plaintext: the CA private key, the join-token secrets and secret values. Each
//! sealed value records the ID of the key that sealed it and binds a purpose
//! string as associated data, so a ciphertext moved to another field or record
//! fails to open.

use std::fmt;
use std::fs;
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
    /// Not an unlock key, or not this manager's.
    #[error("wrong unlock key: {0}")]
    BadUnlockKey(String),
    /// A value was sealed under a data key this manager does not hold.
    #[error("data key {id} is not held by this manager")]
    UnknownKey { id: u32 },
    /// Authentication failed: wrong key, or the ciphertext was altered.
    #[error("integrity check failed for {purpose}: wrong key or tampered ciphertext")]
    Integrity { purpose: String },
}

/// A value sealed with XChaCha20-Poly1305: the ID of the key that sealed it
/// (0 for a node-local key), a random 24-byte nonce and the ciphertext with its tag.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    key_id: u32,
    nonce: [u8; 24],
    /// As bytes, not a sequence of numbers: the same bincode encoding, (de)coded
    /// as one copy instead of byte by byte (a 500 KiB secret crosses raft,
    /// the log and the state machine several times).
    #[serde(with = "serde_bytes")]
    ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealed(key {}, {} bytes)", self.key_id, self.ciphertext.len())
    }
}

impl Sealed {
    /// The ID of the data key that sealed it.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }
    /// The plaintext length.
    pub fn plaintext_len(&self) -> usize {
        self.ciphertext.len().saturating_sub(16)
    }
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
        self.seal_as(0, purpose, plaintext)
    }

    fn seal_as(&self, key_id: u32, purpose: &str, plaintext: &[u8]) -> Sealed {
        let mut nonce = [0u8; 24];
        swarmd_certs::random_bytes(&mut nonce);
        let ciphertext = self
            .cipher()
            .encrypt(&XNonce::from(nonce), Payload { msg: plaintext, aad: purpose.as_bytes() })
            .expect("XChaCha20-Poly1305 encryption of an in-memory buffer cannot fail");
        Sealed { key_id, nonce, ciphertext }
    }

    /// Opens a value sealed for `purpose`.
    pub fn open(&self, purpose: &str, sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.cipher()
            .decrypt(&XNonce::from(sealed.nonce), Payload { msg: &sealed.ciphertext, aad: purpose.as_bytes() })
            .map(Zeroizing::new)
            .map_err(|_| KeyError::Integrity { purpose: purpose.to_owned() })
    }
}

/// An autolocked cluster's unlock key, `SWDKEY-1-<64 hex digits>`: it seals
/// each manager's KEK (and through it the node key and the data keys) on disk.
#[derive(Clone)]
pub struct UnlockKey(SymmetricKey);

impl fmt::Debug for UnlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UnlockKey(<redacted>)")
    }
}

const UNLOCK_PREFIX: &str = "SWDKEY-1-";

impl UnlockKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        Self(SymmetricKey::generate())
    }

    /// The text form operators keep.
    pub fn text(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("{UNLOCK_PREFIX}{}", hex::encode(self.0.expose())))
    }

    /// Parses the text form (surrounding whitespace ignored).
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let s = s.trim();
        let hexpart = s
            .strip_prefix(UNLOCK_PREFIX)
            .ok_or_else(|| KeyError::BadUnlockKey(format!("an unlock key starts with {UNLOCK_PREFIX}")))?;
        let raw = Zeroizing::new(
            hex::decode(hexpart).map_err(|_| KeyError::BadUnlockKey("malformed: expected 64 hex digits".into()))?,
        );
        SymmetricKey::from_slice(&raw)
            .map(Self)
            .ok_or_else(|| KeyError::BadUnlockKey("malformed: expected 64 hex digits".into()))
    }

    /// The key from its raw bytes (as sealed in the cluster record).
    pub fn from_bytes(raw: &[u8]) -> Option<Self> {
        SymmetricKey::from_slice(raw).map(Self)
    }

    /// The raw bytes, for sealing in the cluster record.
    pub fn expose(&self) -> &[u8; 32] {
        self.0.expose()
    }

    /// Whether two keys are the same.
    pub fn same_as(&self, other: &UnlockKey) -> bool {
        use subtle_eq::ct_eq;
        ct_eq(self.0.expose(), other.0.expose())
    }
}

mod subtle_eq {
    /// Constant-time equality of two keys.
    pub fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// The cluster's data keys by ID. Values are sealed with the key the cluster
/// record names as active; older keys stay only until a rotation has re-sealed
/// everything under the new one.
#[derive(Clone, Default)]
pub struct Keyring {
    keys: std::collections::BTreeMap<u32, SymmetricKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keyring(ids {:?}, <redacted>)", self.keys.keys().collect::<Vec<_>>())
    }
}

impl Keyring {
    /// A keyring holding one key.
    pub fn single(id: u32, key: SymmetricKey) -> Self {
        let mut k = Self::default();
        k.insert(id, key);
        k
    }

    /// Adds (or replaces) key `id`.
    pub fn insert(&mut self, id: u32, key: SymmetricKey) {
        self.keys.insert(id, key);
    }

    /// Drops every key for which `keep` is false.
    pub fn retain(&mut self, mut keep: impl FnMut(u32) -> bool) {
        self.keys.retain(|id, _| keep(*id));
    }

    /// Whether key `id` is here.
    pub fn contains(&self, id: u32) -> bool {
        self.keys.contains_key(&id)
    }

    /// Key `id`.
    pub fn get(&self, id: u32) -> Option<&SymmetricKey> {
        self.keys.get(&id)
    }

    /// The IDs held, ascending.
    pub fn ids(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// Seals `plaintext` under key `id`.
    pub fn seal(&self, id: u32, purpose: &str, plaintext: &[u8]) -> Result<Sealed, KeyError> {
        let key = self.keys.get(&id).ok_or(KeyError::UnknownKey { id })?;
        Ok(key.seal_as(id, purpose, plaintext))
    }

    /// Opens a value with the key that sealed it.
    pub fn open(&self, purpose: &str, sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let key = self.keys.get(&sealed.key_id).ok_or(KeyError::UnknownKey { id: sealed.key_id })?;
        key.open(purpose, sealed)
    }

    /// `[u32 id][32-byte key]...`, for the key file and for a joining manager.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(self.keys.len() * 36));
        for (id, k) in &self.keys {
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(k.expose());
        }
        out
    }

    /// The inverse of [`Keyring::encode`]; `None` if malformed or empty.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() || !bytes.len().is_multiple_of(36) {
            return None;
        }
        let mut k = Self::default();
        for chunk in bytes.chunks(36) {
            let id = u32::from_be_bytes(chunk[..4].try_into().ok()?);
            k.insert(id, SymmetricKey::from_slice(&chunk[4..])?);
        }
        Some(k)
    }
}

/// Purpose strings (associated data) of the values the DEK seals.
pub mod purpose {
    /// The cluster's data keys, sealed under the KEK.
    pub const DEK: &str = "swarmd/keyring/v1";
    /// The KEK, sealed under the unlock key (autolock).
    pub const LOCKED_KEK: &str = "swarmd/kek/locked/v1";
    /// The node's TLS key, sealed under the KEK (autolock).
    pub const NODE_KEY: &str = "swarmd/node-key/v1";
    /// The unlock key in the cluster record.
    pub fn unlock_key(cluster: &str) -> String {
        format!("swarmd/{cluster}/unlock-key")
    }
    /// The CA private key.
    pub fn ca_key(cluster: &str) -> String {
        format!("swarmd/{cluster}/ca-key")
    }
    /// A join-token secret.
    pub fn join_token(cluster: &str, role: swarmd_certs::Role) -> String {
        format!("swarmd/{cluster}/join-token/{role}")
    }
    /// The known value that proves a manager holds the right data key `id`.
    pub fn key_check(cluster: &str, id: u32) -> String {
        format!("swarmd/{cluster}/data-key-check/{id}")
    }
    /// One version of a secret's value: bound to the secret and the version, so
    /// a ciphertext moved to another record or version fails to open.
    pub fn secret(cluster: &str, id: &str, version: u32) -> String {
        format!("swarmd/{cluster}/secret/{id}/v{version}")
    }
}

/// The `keys/` directory of a manager.
#[derive(Clone)]
pub struct KeyDir {
    dir: PathBuf,
    /// The KEK once loaded or unlocked (with autolock it is not on disk in the clear).
    kek: Option<SymmetricKey>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io { path: path.to_owned(), source }
}

fn from_cert_err(path: &Path, e: swarmd_certs::CertError) -> KeyError {
    match e {
        swarmd_certs::CertError::Io { path, source } => KeyError::Io { path, source },
        other => KeyError::Io { path: path.to_owned(), source: std::io::Error::other(other.to_string()) },
    }
}

/// Writes a key file (0600) atomically; the file it replaces is overwritten
/// with zeros in place first (see [`swarmd_certs::replace_secret_file`]).
fn write_private(path: &Path, data: &[u8]) -> Result<(), KeyError> {
    swarmd_certs::replace_secret_file(path, data, 0o600).map_err(|e| from_cert_err(path, e))
}

/// Deletes a key file after overwriting it with zeros in place.
fn remove_synced(path: &Path) -> Result<(), KeyError> {
    swarmd_certs::erase_file(path).map_err(|e| from_cert_err(path, e))
}

impl KeyDir {
    /// The `keys/` directory below `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self { dir: data_dir.join("keys"), kek: None }
    }

    /// Whether the KEK on disk is sealed under an unlock key.
    pub fn is_locked(&self) -> bool {
        !self.dir.join("kek").exists() && self.dir.join("kek.locked").exists()
    }

    /// This directory with its KEK opened by `key`. Wrong key: `BadUnlockKey`,
    /// and nothing changes.
    pub fn unlock(&self, key: &UnlockKey) -> Result<KeyDir, KeyError> {
        let path = self.dir.join("kek.locked");
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let sealed: Sealed = bincode::deserialize(&bytes).map_err(|_| KeyError::Malformed { path: path.clone() })?;
        let raw = key.0.open(purpose::LOCKED_KEK, &sealed).map_err(|_| {
            KeyError::BadUnlockKey("this is not the key this manager is locked with; nothing changed".into())
        })?;
        let kek = SymmetricKey::from_slice(&raw).ok_or(KeyError::Malformed { path })?;
        Ok(KeyDir { dir: self.dir.clone(), kek: Some(kek) })
    }

    /// This directory with its KEK loaded from the plain `kek` file.
    pub fn loaded(&self) -> Result<KeyDir, KeyError> {
        Ok(KeyDir { dir: self.dir.clone(), kek: Some(self.kek()?) })
    }

    /// Seals the KEK under `key` on disk and deletes the plain copy, after
    /// overwriting it with zeros in place (its inode, not a new file renamed
    /// over it) and syncing that.
    pub fn lock(&self, key: &UnlockKey) -> Result<(), KeyError> {
        let kek = self.kek()?;
        let sealed = key.0.seal(purpose::LOCKED_KEK, kek.0.as_ref());
        write_private(&self.dir.join("kek.locked"), &bincode::serialize(&sealed).expect("serialize sealed key"))?;
        remove_synced(&self.dir.join("kek"))
    }

    /// Deletes the whole `keys/` directory (a demoted manager), every file in
    /// it overwritten with zeros in place first.
    pub fn erase(&self) -> Result<(), KeyError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(KeyError::Io { path: self.dir.clone(), source: e }),
        };
        for e in entries {
            let p = e.map_err(io_err(&self.dir))?.path();
            if fs::symlink_metadata(&p).map_err(io_err(&p))?.is_dir() {
                fs::remove_dir_all(&p).map_err(io_err(&p))?;
            } else {
                remove_synced(&p)?;
            }
        }
        fs::remove_dir(&self.dir).map_err(io_err(&self.dir))
    }

    /// Writes the KEK in the clear again (autolock turned off) and deletes the sealed copy.
    pub fn unlock_permanently(&self) -> Result<(), KeyError> {
        let kek = self.kek()?;
        write_private(&self.dir.join("kek"), kek.0.as_ref())?;
        remove_synced(&self.dir.join("kek.locked"))
    }

    /// The KEK (for sealing the node key).
    pub fn kek_key(&self) -> Result<SymmetricKey, KeyError> {
        self.kek()
    }

    /// Creates a KEK and seals `keyring` under it. Refuses to overwrite existing keys.
    pub fn create(&self, keyring: &Keyring) -> Result<(), KeyError> {
        if self.dir.join("kek").exists() {
            return Err(KeyError::Io {
                path: self.dir.join("kek"),
                source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "keys exist already"),
            });
        }
        swarmd_certs::create_private_dir(&self.dir).map_err(|e| from_cert_err(&self.dir, e))?;
        let kek = SymmetricKey::generate();
        write_private(&self.dir.join("kek"), kek.0.as_ref())?;
        self.write_keyring(&kek, keyring)
    }

    fn kek(&self) -> Result<SymmetricKey, KeyError> {
        if let Some(k) = &self.kek {
            return Ok(k.clone());
        }
        let kek_path = self.dir.join("kek");
        let kek_bytes = Zeroizing::new(fs::read(&kek_path).map_err(io_err(&kek_path))?);
        SymmetricKey::from_slice(&kek_bytes).ok_or(KeyError::Malformed { path: kek_path })
    }

    fn write_keyring(&self, kek: &SymmetricKey, keyring: &Keyring) -> Result<(), KeyError> {
        let sealed = kek.seal(purpose::DEK, &keyring.encode());
        let bytes = bincode::serialize(&sealed).expect("serialize sealed key");
        write_private(&self.dir.join("dek"), &bytes)
    }

    /// Replaces the stored keyring (after a rotation), atomically.
    pub fn save_keyring(&self, keyring: &Keyring) -> Result<(), KeyError> {
        self.write_keyring(&self.kek()?, keyring)
    }

    /// Loads the KEK and opens the keyring.
    pub fn load_keyring(&self) -> Result<Keyring, KeyError> {
        let kek = self.kek()?;
        let dek_path = self.dir.join("dek");
        let bytes = fs::read(&dek_path).map_err(io_err(&dek_path))?;
        let sealed: Sealed =
            bincode::deserialize(&bytes).map_err(|_| KeyError::Malformed { path: dek_path.clone() })?;
        let raw = kek.open(purpose::DEK, &sealed)?;
        Keyring::decode(&raw).ok_or(KeyError::Malformed { path: dek_path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn read_inode(f: &fs::File) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn sealed_values_keep_the_log_format_of_a_byte_vector() {
        // What the log and snapshots held before the ciphertext was (de)coded
        // as bytes: existing entries must decode, and new ones read the same.
        #[derive(Serialize, Deserialize)]
        struct Before {
            key_id: u32,
            nonce: [u8; 24],
            ciphertext: Vec<u8>,
        }
        let before = Before { key_id: 7, nonce: [9; 24], ciphertext: (0..=255u8).cycle().take(1000).collect() };
        let old = bincode::serialize(&before).unwrap();
        let sealed: Sealed = bincode::deserialize(&old).unwrap();
        assert_eq!((sealed.key_id, sealed.nonce, &sealed.ciphertext), (7, [9; 24], &before.ciphertext));
        assert_eq!(bincode::serialize(&sealed).unwrap(), old);
    }

    #[test]
    fn invariant_11_lock_and_erase_overwrite_the_old_key_inodes() {
        let d = tempfile::tempdir().unwrap();
        let kd = KeyDir::new(d.path());
        kd.create(&Keyring::single(1, SymmetricKey::generate())).unwrap();
        let kek = fs::File::open(d.path().join("keys/kek")).unwrap();
        let plain = read_inode(&kek);
        assert_eq!(plain.len(), 32);
        assert!(plain.iter().any(|b| *b != 0));
        kd.loaded().unwrap().lock(&UnlockKey::generate()).unwrap();
        assert!(!d.path().join("keys/kek").exists());
        assert_eq!(read_inode(&kek), vec![0u8; 32], "the plain KEK's blocks were not overwritten");

        let dek = fs::File::open(d.path().join("keys/dek")).unwrap();
        let locked = fs::File::open(d.path().join("keys/kek.locked")).unwrap();
        let (dek_len, locked_len) = (read_inode(&dek).len(), read_inode(&locked).len());
        kd.erase().unwrap();
        assert!(!d.path().join("keys").exists());
        assert_eq!(read_inode(&dek), vec![0u8; dek_len]);
        assert_eq!(read_inode(&locked), vec![0u8; locked_len]);
    }

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
    fn unlock_keys_parse_print_redacted_and_lock_the_kek() {
        let k = UnlockKey::generate();
        let text = k.text();
        assert!(text.starts_with("SWDKEY-1-") && text.len() == 9 + 64);
        assert!(UnlockKey::parse(&format!("  {}\n", &*text)).unwrap().same_as(&k));
        assert!(!format!("{k:?}").contains(&text[9..20]));
        for bad in ["", "SWDKEY-1-", "SWDKEY-1-zz", "SWDKEY-2-00", &format!("SWDKEY-1-{}", "0".repeat(62))] {
            assert!(matches!(UnlockKey::parse(bad), Err(KeyError::BadUnlockKey(_))), "{bad:?}");
        }
        let d = tempfile::tempdir().unwrap();
        let kd = KeyDir::new(d.path());
        kd.create(&Keyring::single(1, SymmetricKey::generate())).unwrap();
        let loaded = kd.loaded().unwrap();
        loaded.lock(&k).unwrap();
        assert!(KeyDir::new(d.path()).is_locked());
        assert!(KeyDir::new(d.path()).load_keyring().is_err(), "the keyring opens without the unlock key");
        assert!(matches!(KeyDir::new(d.path()).unlock(&UnlockKey::generate()), Err(KeyError::BadUnlockKey(_))));
        let unlocked = KeyDir::new(d.path()).unlock(&k).unwrap();
        assert_eq!(unlocked.load_keyring().unwrap().ids(), vec![1]);
        unlocked.unlock_permanently().unwrap();
        assert!(!KeyDir::new(d.path()).is_locked());
        assert_eq!(KeyDir::new(d.path()).load_keyring().unwrap().ids(), vec![1]);
    }

    #[test]
    fn key_dir_round_trip_and_modes() {
        let d = tempfile::tempdir().unwrap();
        let kd = KeyDir::new(d.path());
        let dek = SymmetricKey::generate();
        kd.create(&Keyring::single(1, dek.clone())).unwrap();
        assert!(kd.create(&Keyring::single(1, dek.clone())).is_err(), "never overwrites keys");
        for f in ["kek", "dek"] {
            let m = fs::metadata(d.path().join("keys").join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(m, 0o600, "{f}");
        }
        let mut back = kd.load_keyring().unwrap();
        assert_eq!(back.ids(), vec![1]);
        let s = back.seal(1, "p", b"v").unwrap();
        assert_eq!(s.key_id(), 1);
        assert_eq!(&dek.open("p", &s).unwrap()[..], b"v");
        assert!(!format!("{back:?}").contains(&format!("{:?}", &dek.0[..4])));
        back.insert(2, SymmetricKey::generate());
        back.retain(|id| id != 1);
        kd.save_keyring(&back).unwrap();
        let again = kd.load_keyring().unwrap();
        assert_eq!(again.ids(), vec![2]);
        assert!(matches!(again.open("p", &s), Err(KeyError::UnknownKey { id: 1 })));
        assert!(Keyring::decode(&[1, 2, 3]).is_none());
    }
}
