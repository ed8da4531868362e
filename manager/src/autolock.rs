//! Autolock: a manager's keys at rest sealed under an unlock key that only the
//! operator holds.
//!
//! With autolock on, `keys/kek` is replaced by `keys/kek.locked` (the KEK sealed
//! under the unlock key), and `certs/node.key` is sealed under the KEK. Since the
//! KEK seals the data keys too, nothing that needs a key can start after a
//! restart until `swarmd unlock` hands the unlock key to the waiting process
//! over the control socket. Until then the socket answers every control call
//! with "locked: run swarmd unlock", and the manager takes no part in raft.
//!
//! The unlock key itself is replicated sealed under the data key in the cluster
//! record, so every manager locks (and re-locks after a rotation) with the same
//! key, and `secretctl unlock-key` can show it.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use swarmd_certs::tls::TlsCredentials;
use swarmd_certs::{KeyWrap, NodeIdentity, NodeKey, SEALED_KEY_LABEL};
use swarmd_proto::control::lock_server::{Lock, LockServer};
use swarmd_proto::control::{UnlockRequest, UnlockResponse};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::cluster::SecretsCache;
use crate::config::ManagerConfig;
use crate::conn::unix_incoming;
use crate::error::ManagerError;
use crate::keys::{purpose, KeyDir, Sealed, SymmetricKey, UnlockKey};

/// What a locked manager answers.
pub const LOCKED: &str = "locked: run swarmd unlock (this manager restarted with autolock on)";

/// Seals the node key under the KEK while autolock is on.
pub struct NodeKeyWrap {
    kek: SymmetricKey,
    sealing: AtomicBool,
}

impl NodeKeyWrap {
    /// A wrap with `kek`, sealing from the start if `sealing`.
    pub fn new(kek: SymmetricKey, sealing: bool) -> Self {
        Self { kek, sealing: AtomicBool::new(sealing) }
    }
}

impl KeyWrap for NodeKeyWrap {
    fn seal(&self, key_pem: &str) -> Option<String> {
        if !self.sealing.load(Ordering::SeqCst) {
            return None;
        }
        let sealed = self.kek.seal(purpose::NODE_KEY, key_pem.as_bytes());
        let body = hex::encode(bincode::serialize(&sealed).expect("serialize sealed key"));
        let lines: Vec<&str> = body.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).expect("hex")).collect();
        Some(format!("-----BEGIN {SEALED_KEY_LABEL}-----\n{}\n-----END {SEALED_KEY_LABEL}-----\n", lines.join("\n")))
    }

    fn open(&self, stored: &str) -> Result<NodeKey, String> {
        let body: String = stored.lines().filter(|l| !l.starts_with("-----")).collect();
        let bytes = hex::decode(body.trim()).map_err(|_| "sealed node key: malformed".to_string())?;
        let sealed: Sealed = bincode::deserialize(&bytes).map_err(|_| "sealed node key: malformed".to_string())?;
        let plain = self.kek.open(purpose::NODE_KEY, &sealed).map_err(|e| format!("sealed node key: {e}"))?;
        let text = String::from_utf8(plain.to_vec()).map_err(|_| "sealed node key: not PEM".to_string())?;
        Ok(Zeroizing::new(text))
    }
}

/// Serves every control call with [`LOCKED`].
#[derive(Clone)]
struct LockedControl;

impl tonic::server::NamedService for LockedControl {
    const NAME: &'static str = "swarmd.control.Control";
}

impl tower::Service<http::Request<tonic::body::Body>> for LockedControl {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
        std::future::ready(Ok(Status::failed_precondition(LOCKED).into_http()))
    }
}

/// `Lock.Unlock` while locked: tries the key against `keys/kek.locked`.
struct Unlocker {
    keydir: KeyDir,
    done: mpsc::Sender<(KeyDir, UnlockKey)>,
    used: AtomicBool,
}

#[tonic::async_trait]
impl Lock for Unlocker {
    async fn unlock(&self, req: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let text = Zeroizing::new(req.into_inner().key);
        let key = UnlockKey::parse(&text).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let unlocked = self.keydir.unlock(&key).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self.used.swap(true, Ordering::SeqCst) {
            return Err(Status::failed_precondition("this manager is already unlocking"));
        }
        let _ = self.done.send((unlocked, key)).await;
        tracing::info!("manager unlocked");
        Ok(Response::new(UnlockResponse {}))
    }
}

/// `Lock.Unlock` on a running manager.
pub(crate) struct NotLocked;

#[tonic::async_trait]
impl Lock for NotLocked {
    async fn unlock(&self, _: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        Err(Status::failed_precondition("this manager is not locked"))
    }
}

/// The `Lock` service of a running manager.
pub(crate) fn not_locked_service() -> LockServer<NotLocked> {
    LockServer::new(NotLocked)
}

/// Serves the control socket of a locked manager until the right unlock key
/// arrives; returns the key directory with its KEK open, and the key.
pub(crate) async fn wait_for_unlock(cfg: &ManagerConfig, keydir: KeyDir) -> Result<(KeyDir, UnlockKey), ManagerError> {
    let sock = &cfg.control_socket;
    let io = |source| ManagerError::Io { path: sock.clone(), source };
    if sock.exists() {
        std::fs::remove_file(sock).map_err(io)?;
    }
    let unix = UnixListener::bind(sock).map_err(io)?;
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    let (tx, mut rx) = mpsc::channel(1);
    let stop = CancellationToken::new();
    tracing::warn!(control = %sock.display(), "{LOCKED}");
    let server = tonic::transport::Server::builder()
        .add_service(LockServer::new(Unlocker { keydir, done: tx, used: AtomicBool::new(false) }))
        .add_service(LockedControl)
        .serve_with_incoming_shutdown(unix_incoming(unix), stop.clone().cancelled_owned());
    let serving = swarmd_certs::spawn_loop("unlock-socket", server);
    let got = rx.recv().await;
    // Let the unlock reply reach the caller before the socket goes away.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    stop.cancel();
    let _ = serving.await;
    let _ = std::fs::remove_file(sock);
    got.ok_or_else(|| ManagerError::Invalid("the unlock server stopped".into()))
}

/// The files autolock seals, and what seals them.
pub(crate) struct LockedFiles {
    /// `keys/`, with the KEK open.
    pub keydir: KeyDir,
    /// Seals the node key.
    pub wrap: Arc<NodeKeyWrap>,
    /// The node's current identity (re-saved when the setting changes).
    pub creds: Arc<TlsCredentials>,
    /// `certs/`.
    pub certs_dir: std::path::PathBuf,
}

/// Keeps this manager's files locked exactly when the cluster record says so,
/// with the record's unlock key: on every applied change, (re-)seals or
/// un-seals the KEK and the node key. `current` is the key the files are
/// locked with now, if any.
pub(crate) async fn follow_autolock(
    secrets: SecretsCache,
    files: LockedFiles,
    mut current: Option<UnlockKey>,
    mut applied: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    let LockedFiles { keydir, wrap, creds, certs_dir } = files;
    loop {
        if let Err(e) = sync(&secrets, &keydir, &wrap, &creds, &certs_dir, &mut current) {
            tracing::error!(error = %e, "cannot apply the cluster's autolock setting to this manager's files");
        }
        tokio::select! {
            r = applied.changed() => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

fn sync(
    secrets: &SecretsCache,
    keydir: &KeyDir,
    wrap: &NodeKeyWrap,
    creds: &TlsCredentials,
    certs_dir: &std::path::Path,
    current: &mut Option<UnlockKey>,
) -> Result<(), String> {
    let Ok(record) = secrets.record() else { return Ok(()) };
    let wanted = match &record.unlock_key {
        None => None,
        Some(sealed) => {
            let raw = secrets.open(&purpose::unlock_key(record.id.as_str()), sealed).map_err(|e| e.to_string())?;
            Some(UnlockKey::from_bytes(&raw).ok_or("the stored unlock key is malformed")?)
        }
    };
    let same = match (&wanted, &*current) {
        (None, None) => true,
        (Some(a), Some(b)) => a.same_as(b),
        _ => false,
    };
    if same {
        return Ok(());
    }
    match &wanted {
        Some(key) => {
            keydir.lock(key).map_err(|e| e.to_string())?;
            wrap.sealing.store(true, Ordering::SeqCst);
            tracing::info!("autolock: this manager's keys are sealed under the unlock key");
        }
        None => {
            keydir.unlock_permanently().map_err(|e| e.to_string())?;
            wrap.sealing.store(false, Ordering::SeqCst);
            tracing::info!("autolock off: this manager's keys are no longer sealed under an unlock key");
        }
    }
    let identity: NodeIdentity = (*creds.identity()).clone();
    identity.save_with(certs_dir, Some(wrap)).map_err(|e| e.to_string())?;
    *current = wanted;
    Ok(())
}
