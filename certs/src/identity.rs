//! A node's own key and certificate, and what a certificate says about its holder.
//!
//! On disk a node keeps `certs/ca.crt`, `certs/node.crt` and `certs/node.key`
//! (all mode 0600, in a 0700 directory). Writes go to a temporary file that is
//! synced and renamed, so a crash leaves either the old or the new file, never
//! half of one. A replaced or deleted key file is first overwritten with zeros
//! in place ([`replace_secret_file`], [`erase_file`]): a rename alone leaves the
//! old key in the blocks of an unlinked inode.

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

    /// What `secretctl ca show` tells of a root: the SHA-256 of its DER (as
    /// `openssl x509 -fingerprint -sha256` prints it, without colons) and
    /// its expiry (Unix seconds).
    pub fn describe_ca(pem: &str) -> Result<(String, i64), CertError> {
        use sha2::Digest;
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| CertError::InvalidCertificate { reason: e.to_string() })?;
        let (_, cert) =
            X509Certificate::from_der(&der).map_err(|e| CertError::InvalidCertificate { reason: e.to_string() })?;
        Ok((hex::encode(sha2::Sha256::digest(&der)), cert.validity().not_after.timestamp()))
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
    let written = (|| {
        let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        // Whatever reached the temporary file must not stay behind (it may be a key).
        let _ = erase_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), CertError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Opens an existing regular file for overwriting, without following a
/// symlink or blocking on a FIFO; `None` if there is nothing to overwrite.
fn open_for_overwrite(path: &Path) -> std::io::Result<Option<fs::File>> {
    match fs::OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path) {
        Ok(f) if f.metadata()?.is_file() => Ok(Some(f)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        // A symlink (ELOOP) is replaced or removed, never written through.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Overwrites the whole content of `f` with zeros, in place, and syncs it.
fn zero_fill(f: &fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata()?.len();
    let zeros = [0u8; 8192];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    f.sync_all()
}

/// Replaces `path` with `data` like [`write_atomic`] (crash-safe: the old or the
/// new content, never a mix), then overwrites the old file's content with zeros
/// through a descriptor kept on its inode, and syncs it. For key files: a
/// rename alone would leave the old key in the blocks of the unlinked inode.
/// (On copy-on-write filesystems and flash translation layers the old blocks
/// may survive anyway; full-disk encryption covers those.)
pub fn replace_secret_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let old = open_for_overwrite(path).map_err(io_err(path))?;
    write_atomic(path, data, mode)?;
    if let Some(f) = old {
        zero_fill(&f).map_err(io_err(path))?;
    }
    Ok(())
}

/// Deletes `path` after overwriting its content with zeros in place (synced),
/// then syncs its directory. Nothing to do if it does not exist.
pub fn erase_file(path: &Path) -> Result<(), CertError> {
    if let Some(f) = open_for_overwrite(path).map_err(io_err(path))? {
        zero_fill(&f).map_err(io_err(path))?;
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Creates `dir` (and any missing parent) with mode 0700, and makes `dir`
/// itself 0700 if it existed with a wider mode. Node state and run dirs are
/// private to the node (invariant 11): the process umask is not relied on.
pub fn create_private_dir(dir: &Path) -> Result<(), CertError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}

/// Takes group and other permissions away from every directory and file
/// below `dir` (and `dir` itself), without following symlinks: directories
/// become 0700, files lose every group and other bit. For state written by
/// an older version or by a library that does not set modes (sled).
pub fn restrict_tree(dir: &Path) -> Result<(), CertError> {
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let meta = fs::symlink_metadata(&d).map_err(io_err(&d))?;
        if !meta.is_dir() {
            continue;
        }
        if meta.permissions().mode() & 0o7777 != 0o700 {
            fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).map_err(io_err(&d))?;
        }
        for e in fs::read_dir(&d).map_err(io_err(&d))? {
            let e = e.map_err(io_err(&d))?;
            let p = e.path();
            let ft = e.file_type().map_err(io_err(&p))?;
            if ft.is_dir() {
                stack.push(p);
            } else if !ft.is_symlink() {
                let mode = e.metadata().map_err(io_err(&p))?.permissions().mode() & 0o7777;
                if mode & 0o077 != 0 {
                    match fs::set_permissions(&p, fs::Permissions::from_mode(mode & 0o700)) {
                        // Gone in between (a temporary file, a socket being replaced).
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        r => r.map_err(io_err(&p))?,
                    }
                }
            }
        }
    }
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

    /// Writes the three files into `dir` (made 0700), each with mode 0600.
    /// The key is written before the certificate.
    pub fn save(&self, dir: &Path) -> Result<(), CertError> {
        self.save_with(dir, None)
    }

    /// As [`NodeIdentity::save`], with the key sealed by `wrap` if it seals.
    ///
    /// Every file is 0600 (certificates too: the simplest rule), and the key
    /// it replaces is overwritten with zeros ([`replace_secret_file`]).
    pub fn save_with(&self, dir: &Path, wrap: Option<&dyn KeyWrap>) -> Result<(), CertError> {
        create_private_dir(dir)?;
        write_atomic(&dir.join("ca.crt"), self.ca_pem.as_bytes(), 0o600)?;
        match wrap.and_then(|w| w.seal(&self.key_pem)) {
            Some(sealed) => replace_secret_file(&dir.join("node.key"), sealed.as_bytes(), 0o600)?,
            None => replace_secret_file(&dir.join("node.key"), self.key_pem.as_bytes(), 0o600)?,
        }
        write_atomic(&dir.join("node.crt"), self.cert_pem.as_bytes(), 0o600)?;
        Ok(())
    }

    /// The certificate chain and signing key in rustls' form.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, CertError> {
        let chain = crate::tls::chain_from_pem(&self.cert_pem)?;
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
        let id = NodeIdentity::new(ca.cert_pem().into(), issued.pem, key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let certs = NodeIdentity::dir(dir.path());
        id.save(&certs).unwrap();
        let mode = fs::metadata(certs.join("node.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = NodeIdentity::load(&certs).unwrap();
        assert_eq!(back.info, id.info);
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// Reads the whole content of the inode behind `f`, from offset 0.
    fn read_inode(f: &fs::File) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn invariant_11_identity_files_are_private_and_a_replaced_key_is_zeroed() {
        let ca = RootCa::generate(&ClusterId::random()).unwrap();
        let node = NodeId::random();
        let issue = || {
            let (key, csr) = generate_key_and_csr().unwrap();
            let issued = ca.sign_node(&csr, &node, Role::Worker, CertValidity::DEFAULT).unwrap();
            NodeIdentity::new(ca.cert_pem().into(), issued.pem, key).unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let certs = NodeIdentity::dir(dir.path());
        let first = issue();
        first.save(&certs).unwrap();
        assert_eq!(mode(&certs), 0o700);
        for f in ["ca.crt", "node.crt", "node.key"] {
            assert_eq!(mode(&certs.join(f)), 0o600, "{f}");
        }
        // A descriptor on the old key's inode, as an attacker with the raw disk would see its blocks.
        let old = fs::File::open(certs.join("node.key")).unwrap();
        assert_eq!(read_inode(&old), first.key_pem.as_bytes());
        let second = issue();
        second.save(&certs).unwrap();
        let left = read_inode(&old);
        assert_eq!(left.len(), first.key_pem.len());
        assert!(left.iter().all(|b| *b == 0), "the replaced key's inode still holds data");
        assert_eq!(NodeIdentity::load(&certs).unwrap().info.serial, second.info.serial);
        assert!(fs::read_dir(&certs).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp")));
    }

    #[test]
    fn invariant_11_erased_files_are_zeroed_before_unlink() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kek");
        fs::write(&p, [7u8; 32]).unwrap();
        let fd = fs::File::open(&p).unwrap();
        erase_file(&p).unwrap();
        assert!(!p.exists());
        assert_eq!(read_inode(&fd), vec![0u8; 32]);
        erase_file(&p).unwrap(); // nothing there: fine
                                 // A symlink is removed, never written through.
        let target = dir.path().join("target");
        fs::write(&target, b"keep me").unwrap();
        std::os::unix::fs::symlink(&target, &p).unwrap();
        erase_file(&p).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"keep me");
        replace_secret_file(&p, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(mode(&p), 0o600);
    }

    #[test]
    fn restrict_tree_takes_group_and_other_bits_away() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("raft/wal");
        fs::create_dir_all(&sub).unwrap();
        fs::set_permissions(dir.path().join("raft"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(sub.join("1.log"), b"x").unwrap();
        fs::set_permissions(sub.join("1.log"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(dir.path().join("ro"), b"x").unwrap();
        fs::set_permissions(dir.path().join("ro"), fs::Permissions::from_mode(0o444)).unwrap();
        restrict_tree(dir.path()).unwrap();
        assert_eq!(mode(dir.path()), 0o700);
        assert_eq!(mode(&dir.path().join("raft")), 0o700);
        assert_eq!(mode(&sub), 0o700);
        assert_eq!(mode(&sub.join("1.log")), 0o600);
        assert_eq!(mode(&dir.path().join("ro")), 0o400);
        create_private_dir(&dir.path().join("a/b")).unwrap();
        assert_eq!((mode(&dir.path().join("a")), mode(&dir.path().join("a/b"))), (0o700, 0o700));
    }

    #[test]
    fn mismatched_key_is_refused() {
        let ca = RootCa::generate(&ClusterId::random()).unwrap();
        let (_key, csr) = generate_key_and_csr().unwrap();
        let (other_key, _) = generate_key_and_csr().unwrap();
        let issued = ca.sign_node(&csr, &NodeId::random(), Role::Worker, CertValidity::DEFAULT).unwrap();
        assert!(NodeIdentity::new(ca.cert_pem().into(), issued.pem, other_key).is_err());
    }
}
