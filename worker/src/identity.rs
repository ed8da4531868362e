//! A task's workload identity on the worker: getting it, and laying it out.
//!
//! For each task the worker generates an ECDSA P-256 key (it never leaves
//! this process and the task's tmpfs), sends a CSR with
//! `Dispatcher.IssueTaskIdentity`, checks that the certificate it gets back is
//! for that key and that task, and installs key, certificate and the cluster's
//! trust bundle in the task's secret tmpfs before the container starts; then
//! again at half the certificate's life ([`Issued::renew_after`]), with a fresh
//! key each time.
//!
//! Layout below the task's `secrets/` (what the container sees as
//! `/run/secrets`), the way Kubernetes swaps projected volumes:
//!
//! ```text
//! identity/                 0755, the task's root
//!   cert.pem -> ..data/cert.pem
//!   key.pem  -> ..data/key.pem
//!   bundle.pem -> ..data/bundle.pem
//!   ..data -> ..g7          one rename(2) swaps all three files at once
//!   ..g7/                   0755, the task's root
//!     cert.pem bundle.pem   0444
//!     key.pem               0400, the task's user
//! ```
//!
//! A renewal writes `..g8/` beside `..g7/`, points a new symlink at it and
//! renames it over `..data`, then zeroes and removes `..g7/`: a reader opens
//! either the old set or the new one, never half of each (once it has opened
//! both files of a pair). A failed write leaves the previous set in place.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use swarmd_certs::workload::{self, IdentityTtl, IDENTITY_DIR};
use swarmd_proto::dispatcher::dispatcher_client::DispatcherClient;
use swarmd_proto::dispatcher::IssueTaskIdentityRequest;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::executor::BoxFuture;

/// The files of one identity.
pub struct IdentityFiles {
    /// The task's certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM; wiped from memory on drop.
    pub key_pem: Zeroizing<String>,
    /// The cluster's trust bundle, PEM.
    pub bundle_pem: String,
}

impl std::fmt::Debug for IdentityFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityFiles").field("key_pem", &"<redacted>").finish_non_exhaustive()
    }
}

/// An identity as issued.
#[derive(Debug)]
pub struct Issued {
    /// What goes into the task's tmpfs.
    pub files: IdentityFiles,
    /// `spiffe://<cluster ID>/service/<service name>`.
    pub spiffe_id: String,
    /// The lifetime it was issued for.
    pub ttl: Duration,
}

impl Issued {
    /// How long after receiving it the identity is renewed: half its life.
    pub fn renew_after(&self) -> Duration {
        workload::renew_after(self.ttl)
    }
}

/// Why no identity came.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The manager refused (not a live task of this node, a bad request):
    /// asking again now changes nothing.
    #[error("the manager refused a workload identity: {0}")]
    Refused(String),
    /// No manager answered, or one asked to come back later.
    #[error("no workload identity yet: {0}")]
    Unavailable(String),
    /// The answer is unusable (not for this key or this task).
    #[error("the workload identity the manager sent is unusable: {0}")]
    Invalid(String),
    /// The cluster issues no workload identities (an external CA holds its
    /// key): the task runs without one.
    #[error("this cluster issues no workload identities (its CA is external)")]
    NotIssued,
}

impl IdentityError {
    /// Whether trying again soon cannot help.
    pub fn is_final(&self) -> bool {
        matches!(self, IdentityError::Refused(_))
    }
}

impl From<tonic::Status> for IdentityError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code::*;
        match s.code() {
            PermissionDenied | InvalidArgument | FailedPrecondition | Unimplemented | NotFound => {
                IdentityError::Refused(s.message().to_owned())
            }
            _ => IdentityError::Unavailable(format!("{:?}: {}", s.code(), s.message())),
        }
    }
}

/// Where the task agent gets identities: the managers, or a fake in unit tests.
pub(crate) trait IdentitySource: Send + Sync {
    /// A fresh key and a certificate for it, for task `task`.
    fn issue(&self, task: &str) -> BoxFuture<'static, Result<Issued, IdentityError>>;
}

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The real [`IdentitySource`]: `Dispatcher.IssueTaskIdentity` over the node's channel.
pub(crate) struct DispatcherIdentity {
    channel: Channel,
}

impl DispatcherIdentity {
    /// Asks over `channel` (the node's mTLS channel to its managers).
    pub(crate) fn new(channel: Channel) -> Self {
        Self { channel }
    }
}

impl IdentitySource for DispatcherIdentity {
    fn issue(&self, task: &str) -> BoxFuture<'static, Result<Issued, IdentityError>> {
        let (channel, task) = (self.channel.clone(), task.to_owned());
        Box::pin(async move {
            let (key_pem, csr_pem) =
                swarmd_certs::generate_key_and_csr().map_err(|e| IdentityError::Invalid(e.to_string()))?;
            let req = IssueTaskIdentityRequest { task_id: task.clone(), csr_pem };
            let r = tokio::time::timeout(REQUEST_TIMEOUT, DispatcherClient::new(channel).issue_task_identity(req))
                .await
                .map_err(|_| IdentityError::Unavailable("no answer within 10 s".into()))??
                .into_inner();
            if r.not_issued {
                return Err(IdentityError::NotIssued);
            }
            let invalid = |e: String| IdentityError::Invalid(e);
            let cert =
                workload::check_issued(&r.certificate_pem, &key_pem, &task).map_err(|e| invalid(e.to_string()))?;
            if cert.spiffe_id != r.spiffe_id {
                return Err(invalid(format!("it names {} but the answer says {}", cert.spiffe_id, r.spiffe_id)));
            }
            swarmd_certs::tls::roots_from_pem(&r.bundle_pem).map_err(|e| invalid(format!("trust bundle: {e}")))?;
            let ttl = IdentityTtl::from_secs(r.ttl_secs).map_err(invalid)?.duration();
            let files = IdentityFiles { cert_pem: r.certificate_pem, key_pem, bundle_pem: r.bundle_pem };
            Ok(Issued { files, spiffe_id: cert.spiffe_id, ttl })
        })
    }
}

const FILES: [&str; 3] = ["cert.pem", "key.pem", "bundle.pem"];
const DATA_LINK: &str = "..data";
const GENERATION_PREFIX: &str = "..g";

/// Installs `files` as the identity below `secrets` (a task's `secrets/`
/// directory, writable): directories owned by `root` (host uid = gid),
/// `key.pem` by `user` (host uid, gid). The previous identity, if any, is
/// replaced atomically and then zeroed.
pub fn install(secrets: &Path, files: &IdentityFiles, root: u32, user: (u32, u32)) -> std::io::Result<()> {
    let dir = secrets.join(IDENTITY_DIR);
    if !dir.is_dir() {
        make_dir(&dir, root)?;
    }
    let current = fs::read_link(dir.join(DATA_LINK)).ok();
    let generation = current
        .as_ref()
        .and_then(|c| c.to_str()?.strip_prefix(GENERATION_PREFIX)?.parse::<u64>().ok())
        .map_or(1, |g| g + 1);
    let name = format!("{GENERATION_PREFIX}{generation}");
    let new = dir.join(&name);
    let written = (|| {
        if new.exists() {
            wipe_dir(&new);
        }
        make_dir(&new, root)?;
        write_file(&new.join("cert.pem"), files.cert_pem.as_bytes(), (root, root), 0o444)?;
        write_file(&new.join("bundle.pem"), files.bundle_pem.as_bytes(), (root, root), 0o444)?;
        write_file(&new.join("key.pem"), files.key_pem.as_bytes(), user, 0o400)?;
        let tmp = dir.join("..data.new");
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp)?;
        fs::rename(&tmp, dir.join(DATA_LINK))
    })();
    if let Err(e) = written {
        wipe_dir(&new);
        return Err(e);
    }
    for f in FILES {
        let link = dir.join(f);
        if fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new(DATA_LINK).join(f), &link)?;
        }
    }
    if let Some(old) = current.filter(|c| *c != Path::new(&name)) {
        wipe_dir(&dir.join(old));
    }
    Ok(())
}

/// Zeroes and removes the identity below `secrets`, if there is one.
pub fn remove(secrets: &Path) {
    let dir = secrets.join(IDENTITY_DIR);
    if fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        wipe_dir(&dir);
    }
}

fn make_dir(dir: &Path, owner: u32) -> std::io::Result<()> {
    fs::create_dir(dir)?;
    std::os::unix::fs::chown(dir, Some(owner), Some(owner))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
}

/// Writes a new file: created 0600 and owned by root until its content is
/// complete, then given to `owner` with `mode`.
fn write_file(path: &Path, data: &[u8], owner: (u32, u32), mode: u32) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(data)?;
    drop(f);
    std::os::unix::fs::chown(path, Some(owner.0), Some(owner.1))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Zeroes every regular file below `dir` (no symlink is followed), then
/// removes the tree.
fn wipe_dir(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => wipe_dir(&p),
                Ok(m) if m.is_file() => {
                    if let Ok(mut f) = fs::OpenOptions::new().write(true).custom_flags(nix::libc::O_NOFOLLOW).open(&p) {
                        let _ = f.write_all(&vec![0u8; m.len() as usize]);
                    }
                }
                _ => {}
            }
        }
    }
    let _ = fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(n: u8) -> IdentityFiles {
        IdentityFiles {
            cert_pem: format!("cert {n}"),
            key_pem: Zeroizing::new(format!("key {n}")),
            bundle_pem: format!("bundle {n}"),
        }
    }

    fn me() -> (u32, (u32, u32)) {
        let (u, g) = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
        (u, (u, g))
    }

    #[test]
    fn an_identity_is_replaced_as_a_set_and_the_old_one_removed() {
        let d = tempfile::tempdir().unwrap();
        let (root, user) = me();
        install(d.path(), &files(1), root, user).unwrap();
        let id = d.path().join(IDENTITY_DIR);
        let read = |f: &str| fs::read_to_string(id.join(f)).unwrap();
        assert_eq!(
            (read("cert.pem"), read("key.pem"), read("bundle.pem")),
            ("cert 1".into(), "key 1".into(), "bundle 1".into())
        );
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&id.join("key.pem")), 0o400);
        assert_eq!(mode(&id.join("cert.pem")), 0o444);
        assert_eq!(mode(&id), 0o755);
        install(d.path(), &files(2), root, user).unwrap();
        assert_eq!((read("cert.pem"), read("key.pem")), ("cert 2".into(), "key 2".into()));
        let mut names: Vec<String> =
            fs::read_dir(&id).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, ["..data", "..g2", "bundle.pem", "cert.pem", "key.pem"]);
        remove(d.path());
        assert!(!id.exists());
    }

    #[test]
    fn a_refusal_is_final_and_an_outage_is_not() {
        assert!(IdentityError::from(tonic::Status::permission_denied("x")).is_final());
        assert!(IdentityError::from(tonic::Status::invalid_argument("x")).is_final());
        assert!(!IdentityError::from(tonic::Status::unavailable("x")).is_final());
        assert!(!IdentityError::from(tonic::Status::resource_exhausted("x")).is_final());
        let f = files(3);
        assert!(!format!("{f:?}").contains("key 3"), "{f:?}");
    }
}
