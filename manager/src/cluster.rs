//! The cluster's secrets in memory: the CA signing key and the join tokens,
//! opened from the replicated cluster record with the data key.
//!
//! They are re-opened whenever the record changes (token rotation, later CA
//! rotation), so every manager serves the same tokens and CA.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use swarmd_certs::{CertValidity, IssuedCert, JoinToken, NodeId, Role, RootCa};

use crate::external_ca::{ExternalCa, SignError};
use crate::keys::{purpose, KeyDir, KeyError, Keyring, Sealed, SymmetricKey};
use crate::state::{CaRotation, ClusterRecord, ExternalCaRecord, StateError, StateView};

/// Errors opening the cluster's secrets.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The store has no cluster record yet.
    #[error("cluster is not initialised")]
    NotInitialised,
    /// A sealed value did not open.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The record is unreadable.
    #[error(transparent)]
    State(#[from] StateError),
    /// The CA or a token inside does not parse.
    #[error("cluster record: {0}")]
    Invalid(String),
}

/// The opened secrets and settings of the cluster.
pub struct ClusterSecrets {
    /// The CA that signs node certificates: the cluster's root, or while a
    /// root rotation runs the new root (its leaves carry the cross-signed
    /// certificate).
    pub ca: RootCa,
    /// The cluster's root with its key: what join tokens pin and `GetRootCa`
    /// serves, and what cross-signs a new root. Without its key when an
    /// external CA holds it.
    pub anchor: RootCa,
    /// The external CA that signs instead of `ca`, if the cluster holds no CA key.
    pub external: Option<Arc<ExternalCa>>,
    /// The roots nodes trust, PEM: the anchor, and the new root during a rotation.
    pub trust_pem: String,
    /// The rotation in progress: its ID.
    pub rotation: Option<u64>,
    /// The worker join token.
    pub worker_token: JoinToken,
    /// The manager join token.
    pub manager_token: JoinToken,
    /// Node certificate lifetime.
    pub validity: CertValidity,
    /// Heartbeat period.
    pub heartbeat: Duration,
}

impl ClusterSecrets {
    /// Opens `record` (and `rotation`, if one runs) with the keys of `dek`;
    /// with an external CA, the record's CA key is not opened (it is empty).
    pub fn open(
        record: &ClusterRecord,
        rotation: Option<&CaRotation>,
        chain_pem: &str,
        external: Option<&ExternalCaRecord>,
        dek: &Keyring,
    ) -> Result<Self, ClusterError> {
        let cid = record.id.as_str();
        if let Some(ext) = external {
            let keyless = || {
                RootCa::without_key(&record.id, &record.ca_cert_pem).map_err(|e| ClusterError::Invalid(e.to_string()))
            };
            let (ca, anchor) = (keyless()?.with_chain(chain_pem.to_owned()), keyless()?);
            // With an external CA the record's CA key field holds the
            // signer's auth key.
            let auth_key = dek.open(&purpose::ca_key(cid), &record.ca_key)?;
            let signer = ExternalCa::new(ext, &record.ca_cert_pem, &auth_key).map_err(ClusterError::Invalid)?;
            return Self::with_cas(record, dek, (ca, anchor, Some(Arc::new(signer))), record.ca_cert_pem.clone(), None);
        }
        let open_ca = |cert: &str, sealed: &Sealed| -> Result<RootCa, ClusterError> {
            let key_pem = dek.open(&purpose::ca_key(cid), sealed)?;
            let key_pem =
                std::str::from_utf8(&key_pem).map_err(|_| ClusterError::Invalid("CA key is not UTF-8".into()))?;
            RootCa::from_pem_for(&record.id, cert, key_pem).map_err(|e| ClusterError::Invalid(e.to_string()))
        };
        let anchor = open_ca(&record.ca_cert_pem, &record.ca_key)?;
        let mut trust_pem = record.ca_cert_pem.clone();
        let ca = match rotation {
            Some(r) => {
                trust_pem.push_str(&r.target_cert_pem);
                open_ca(&r.target_cert_pem, &r.target_key)?.with_chain(r.cross_signed_pem.clone())
            }
            None => open_ca(&record.ca_cert_pem, &record.ca_key)?.with_chain(chain_pem.to_owned()),
        };
        Self::with_cas(record, dek, (ca, anchor, None), trust_pem, rotation.map(|r| r.id))
    }

    fn with_cas(
        record: &ClusterRecord,
        dek: &Keyring,
        (ca, anchor, external): (RootCa, RootCa, Option<Arc<ExternalCa>>),
        trust_pem: String,
        rotation: Option<u64>,
    ) -> Result<Self, ClusterError> {
        let cid = record.id.as_str();
        let token = |role: Role, sealed| -> Result<JoinToken, ClusterError> {
            let raw = dek.open(&purpose::join_token(cid, role), sealed)?;
            let text = std::str::from_utf8(&raw).map_err(|_| ClusterError::Invalid("token is not UTF-8".into()))?;
            text.parse().map_err(|e: swarmd_certs::TokenError| ClusterError::Invalid(e.to_string()))
        };
        Ok(Self {
            worker_token: token(Role::Worker, &record.worker_token)?,
            manager_token: token(Role::Manager, &record.manager_token)?,
            ca,
            anchor,
            external,
            trust_pem,
            rotation,
            validity: CertValidity::new(Duration::from_secs(record.cert_validity_secs))
                .map_err(ClusterError::Invalid)?,
            heartbeat: Duration::from_millis(record.heartbeat_ms),
        })
    }

    /// Signs a certificate for `node` in `role` for the cluster's
    /// certificate lifetime: with the cluster's CA, or through the external
    /// CA that holds its key (whose profile decides, within that lifetime).
    pub async fn sign_node(&self, csr_pem: &str, node: &NodeId, role: Role) -> Result<IssuedCert, SignError> {
        self.sign_for(csr_pem, node, role, self.validity).await
    }

    /// As [`ClusterSecrets::sign_node`], for `validity`.
    pub async fn sign_for(
        &self,
        csr_pem: &str,
        node: &NodeId,
        role: Role,
        validity: CertValidity,
    ) -> Result<IssuedCert, SignError> {
        match &self.external {
            Some(x) => x.sign(&self.ca, csr_pem, node, role, validity.duration()).await,
            None => Ok(self.ca.sign_node(csr_pem, node, role, validity)?),
        }
    }

    /// The root join tokens pin and `GetRootCa` serves, PEM.
    pub fn anchor_pem(&self) -> &str {
        self.anchor.cert_pem()
    }

    /// The join token for `role` (admins join with none).
    pub fn token(&self, role: Role) -> Option<&JoinToken> {
        match role {
            Role::Worker => Some(&self.worker_token),
            Role::Manager => Some(&self.manager_token),
            Role::Admin => None,
        }
    }
}

/// The encoded record the secrets were opened from, and the secrets.
type Opened = (Vec<u8>, Arc<ClusterSecrets>);

/// The current [`ClusterSecrets`], opened lazily and re-opened whenever the
/// replicated cluster record changes (so a token rotated through any manager
/// takes effect on every manager).
#[derive(Clone)]
pub struct SecretsCache {
    view: StateView,
    keyring: Arc<RwLock<Keyring>>,
    /// Where the keyring persists; writes to it are serialized by this lock.
    keydir: Arc<std::sync::Mutex<KeyDir>>,
    current: Arc<RwLock<Option<Opened>>>,
}

impl SecretsCache {
    /// A cache over the applied state; empty until the cluster record exists.
    pub fn new(view: StateView, keyring: Keyring, keydir: KeyDir) -> Self {
        let me = Self {
            view,
            keyring: Arc::new(RwLock::new(keyring)),
            keydir: Arc::new(std::sync::Mutex::new(keydir)),
            current: Arc::default(),
        };
        let _ = me.reload();
        me
    }

    /// The data keys this manager holds.
    pub fn keyring(&self) -> Keyring {
        self.keyring.read().expect("keyring lock").clone()
    }

    /// Adds data key `id`: on disk first (sealed under the KEK), then in memory;
    /// re-opens the cluster record, which may need it.
    pub fn add_data_key(&self, id: u32, key: SymmetricKey) -> Result<(), KeyError> {
        let dir = self.keydir.lock().expect("keydir lock");
        let mut ring = self.keyring();
        ring.insert(id, key);
        dir.save_keyring(&ring)?;
        *self.keyring.write().expect("keyring lock") = ring;
        drop(dir);
        let _ = self.reload();
        Ok(())
    }

    /// Deletes every data key below `below`, from disk and memory. Returns
    /// whether any was deleted.
    pub fn retire_below(&self, below: u32) -> Result<bool, KeyError> {
        let dir = self.keydir.lock().expect("keydir lock");
        let mut ring = self.keyring();
        let before = ring.ids().len();
        ring.retain(|id| id >= below);
        if ring.ids().len() == before {
            return Ok(false);
        }
        dir.save_keyring(&ring)?;
        *self.keyring.write().expect("keyring lock") = ring;
        Ok(true)
    }

    /// The cluster record as applied here.
    pub fn record(&self) -> Result<ClusterRecord, ClusterError> {
        self.view.cluster()?.ok_or(ClusterError::NotInitialised)
    }

    /// Seals `plaintext` under the cluster's active data key.
    pub fn seal(&self, purpose: &str, plaintext: &[u8]) -> Result<Sealed, ClusterError> {
        // From the applied record, not the cached secrets: they are re-opened
        // a moment after a rotation is applied.
        let active = self.record()?.data_key_id;
        Ok(self.keyring.read().expect("keyring lock").seal(active, purpose, plaintext)?)
    }

    /// Opens a value sealed under any data key this manager holds.
    pub fn open(&self, purpose: &str, sealed: &Sealed) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyError> {
        self.keyring.read().expect("keyring lock").open(purpose, sealed)
    }

    /// The current secrets; `NotInitialised` while this manager has not caught up.
    pub fn get(&self) -> Result<Arc<ClusterSecrets>, ClusterError> {
        if let Some((_, s)) = self.current.read().expect("secrets lock").as_ref() {
            return Ok(s.clone());
        }
        self.reload()?;
        self.current.read().expect("secrets lock").as_ref().map(|(_, s)| s.clone()).ok_or(ClusterError::NotInitialised)
    }

    /// Re-reads the cluster record, re-opening it only if it changed.
    pub fn reload(&self) -> Result<(), ClusterError> {
        // The record and the rotation, as one value to compare.
        let mut raw = self.view.cluster_raw()?.ok_or(ClusterError::NotInitialised)?;
        let rotation = self.view.ca_rotation()?;
        if let Some(r) = &rotation {
            raw.extend_from_slice(&crate::state::encode(r));
        }
        let chain = self.view.leaf_chain()?;
        raw.extend_from_slice(chain.as_bytes());
        let external = self.view.external_ca()?;
        if let Some(x) = &external {
            raw.extend_from_slice(&crate::state::encode(x));
        }
        if let Some((old, _)) = self.current.read().expect("secrets lock").as_ref() {
            if *old == raw {
                return Ok(());
            }
        }
        let record = self.view.cluster()?.ok_or(ClusterError::NotInitialised)?;
        let s = ClusterSecrets::open(&record, rotation.as_ref(), &chain, external.as_ref(), &self.keyring())?;
        *self.current.write().expect("secrets lock") = Some((raw, Arc::new(s)));
        Ok(())
    }

    /// Re-opens the secrets after every applied change, until cancelled.
    pub async fn follow(
        self,
        mut applied: tokio::sync::watch::Receiver<u64>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                r = applied.changed() => if r.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
            match self.reload() {
                Ok(()) | Err(ClusterError::NotInitialised) => {}
                Err(e) => tracing::error!(error = %e, "cannot open the cluster record"),
            }
        }
    }
}
