//! The secrets half of the control API: create, update, list, inspect, remove
//! and verify. Values are sealed here, on the manager the request reaches,
//! under the cluster's active data key with the secret's ID and version bound
//! as associated data; only ciphertext is proposed to raft. No function here
//! returns a value.

use swarmd_certs::SecretId;
use swarmd_proto::control::{
    CreateSecretRequest, ListSecretsRequest, Secret, SecretCheck, SecretVersion as WireVersion, UpdateSecretRequest,
};
use tonic::Status;
use zeroize::Zeroizing;

use crate::cluster::SecretsCache;
use crate::keys::purpose;
use crate::state::{Command, Rejection, SecretRecord, StateView};
use crate::store::{Store, StoreError};
use swarmd_certs::now_unix;

/// How often a write is re-sealed and retried when a key rotation or a
/// concurrent update overtook it.
const RETRIES: usize = 5;

use crate::status::internal;

/// The wire form of a record.
pub(crate) fn to_wire(r: SecretRecord) -> Secret {
    Secret {
        id: r.id.to_string(),
        name: r.name,
        labels: r.labels.into_iter().collect(),
        created_at: r.created_at,
        updated_at: r.versions.last().map_or(r.created_at, |v| v.created_at),
        versions: r
            .versions
            .into_iter()
            .map(|v| WireVersion {
                version: v.version,
                created_at: v.created_at,
                size: v.size as u64,
                key_id: v.key_id,
            })
            .collect(),
    }
}

/// Resolves `key` as Docker does: an exact ID, then an exact name, then a
/// unique ID prefix. `kind` names the object in errors.
pub(crate) fn resolve<T>(
    kind: &str,
    key: &str,
    by_id: impl Fn(&str) -> Result<Option<T>, crate::state::StateError>,
    by_name: impl Fn(&str) -> Result<Option<T>, crate::state::StateError>,
    all: impl Fn() -> Result<Vec<T>, crate::state::StateError>,
    id_of: impl Fn(&T) -> &str,
) -> Result<T, Status> {
    let key = key.trim();
    if key.is_empty() {
        return Err(Status::invalid_argument(format!("{kind} name or ID must not be empty")));
    }
    if let Some(r) = by_id(key).map_err(internal)? {
        return Ok(r);
    }
    if let Some(r) = by_name(key).map_err(internal)? {
        return Ok(r);
    }
    let mut matches: Vec<T> = all().map_err(internal)?.into_iter().filter(|r| id_of(r).starts_with(key)).collect();
    match matches.len() {
        0 => Err(Status::not_found(format!("no such {kind}: {key}"))),
        1 => Ok(matches.remove(0)),
        n => Err(Status::invalid_argument(format!("{key:?} matches {n} {kind}s: give more of the ID"))),
    }
}

/// The secret `key` names: an ID, a name, or a unique ID prefix (as Docker).
pub fn find(view: &StateView, key: &str) -> Result<SecretRecord, Status> {
    resolve(
        "secret",
        key,
        |k| match k.parse::<SecretId>() {
            Ok(id) => view.secret(&id),
            Err(_) => Ok(None),
        },
        |k| match view.secret_id_by_name(k)? {
            Some(id) => view.secret(&id),
            None => Ok(None),
        },
        || view.secrets(),
        |r| r.id.as_str(),
    )
}

/// Takes the value out of a request into memory that is wiped on drop.
/// The value of a request, in memory that is wiped on drop. (The decoding
/// buffer it is copied from belongs to tonic and is freed without wiping.)
fn take_value(data: &mut bytes::Bytes) -> Zeroizing<Vec<u8>> {
    let value = Zeroizing::new(data.to_vec());
    *data = bytes::Bytes::new();
    value
}

/// Seals under the active data key; right after a rotation this manager may
/// still be fetching that key, so it waits for it (up to 5 s).
async fn seal_active(secrets: &SecretsCache, purpose: &str, value: &[u8]) -> Result<crate::keys::Sealed, Status> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match secrets.seal(purpose, value) {
            Err(crate::cluster::ClusterError::Key(crate::keys::KeyError::UnknownKey { .. }))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            other => return Ok(other?),
        }
    }
}

fn cluster_id(secrets: &SecretsCache) -> Result<String, Status> {
    Ok(secrets.get()?.ca.cluster_id().to_string())
}

/// Creates a secret; retries (re-sealed) if a key rotation overtook it.
pub(crate) async fn create(
    store: &Store,
    secrets: &SecretsCache,
    mut req: CreateSecretRequest,
) -> Result<Secret, Status> {
    let validated = crate::validate::validate_create_secret(store.view(), &req);
    let value = take_value(&mut req.data);
    let (name, labels) = validated?;
    let cid = cluster_id(secrets)?;
    let id = SecretId::random();
    let mut last = None;
    for _ in 0..RETRIES {
        let data = seal_active(secrets, &purpose::secret(&cid, id.as_str(), 1), &value).await?;
        let cmd = Command::CreateSecret {
            id: id.clone(),
            name: name.clone(),
            labels: labels.clone(),
            created_at: now_unix(),
            data,
        };
        match store.propose(cmd).await {
            Ok(()) => {
                tracing::info!(secret.id = %id, secret.name = %name, "secret created");
                let r = store
                    .view()
                    .secret(&id)
                    .map_err(internal)?
                    .ok_or_else(|| Status::not_found("secret was removed"))?;
                return Ok(to_wire(r));
            }
            Err(StoreError::Rejected(r @ Rejection::StaleDataKey)) => last = Some(r.to_string()),
            Err(StoreError::Rejected(r @ (Rejection::NameInUse { .. } | Rejection::IdInUse { .. }))) => {
                return Err(Status::already_exists(r.to_string()))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Status::aborted(last.unwrap_or_default()))
}

/// Adds a version; retries (re-sealed) if a concurrent update or a key rotation overtook it.
pub(crate) async fn update(
    store: &Store,
    secrets: &SecretsCache,
    mut req: UpdateSecretRequest,
) -> Result<Secret, Status> {
    let validated = crate::validate::validate_update_secret(store.view(), &req);
    let value = take_value(&mut req.data);
    validated?;
    let cid = cluster_id(secrets)?;
    let mut last = String::new();
    for _ in 0..RETRIES {
        let rec = find(store.view(), &req.name_or_id)?;
        let version = rec.latest().version + 1;
        let data = seal_active(secrets, &purpose::secret(&cid, rec.id.as_str(), version), &value).await?;
        let cmd = Command::AddSecretVersion { id: rec.id.clone(), version, created_at: now_unix(), data };
        match store.propose(cmd).await {
            Ok(()) => {
                tracing::info!(secret.id = %rec.id, secret.name = %rec.name, version, "secret updated");
                let r = store
                    .view()
                    .secret(&rec.id)
                    .map_err(internal)?
                    .ok_or_else(|| Status::not_found("secret was removed"))?;
                return Ok(to_wire(r));
            }
            Err(StoreError::Rejected(r @ (Rejection::StaleDataKey | Rejection::SecretUpdatedMeanwhile { .. }))) => {
                last = r.to_string()
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Status::aborted(last))
}

/// Secrets matching every label filter (`K` or `K=V`) and the name prefix.
pub fn list(view: &StateView, req: &ListSecretsRequest) -> Result<Vec<Secret>, Status> {
    let filters: Vec<(String, Option<String>)> = req
        .label_filters
        .iter()
        .map(|f| match f.split_once('=') {
            Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
            None => (f.clone(), None),
        })
        .collect();
    let mut out: Vec<SecretRecord> = view
        .secrets()
        .map_err(internal)?
        .into_iter()
        .filter(|s| s.name.starts_with(&req.name_prefix))
        .filter(|s| {
            filters.iter().all(|(k, v)| match (s.labels.get(k), v) {
                (Some(have), Some(want)) => have == want,
                (Some(_), None) => true,
                (None, _) => false,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out.into_iter().map(to_wire).collect())
}

/// Removes one secret.
pub(crate) async fn remove(store: &Store, key: &str) -> Result<SecretId, Status> {
    let rec = find(store.view(), key)?;
    store.propose(Command::RemoveSecret { id: rec.id.clone() }).await?;
    tracing::info!(secret.id = %rec.id, secret.name = %rec.name, "secret removed");
    Ok(rec.id)
}

/// Opens every stored version with this manager's keys; reports failures by
/// secret and version (never the values, which are wiped at once).
pub(crate) fn verify(view: &StateView, secrets: &SecretsCache) -> Result<Vec<SecretCheck>, Status> {
    let cid = cluster_id(secrets)?;
    let mut out = Vec::new();
    for rec in view.secrets().map_err(internal)? {
        for v in &rec.versions {
            let error = match view.secret_data(&rec.id, v.version) {
                Ok(Some(sealed)) => match secrets.open(&purpose::secret(&cid, rec.id.as_str(), v.version), &sealed) {
                    Ok(plain) if plain.len() == v.size as usize => String::new(),
                    Ok(_) => "opened, but its size differs from the record".into(),
                    Err(e) => e.to_string(),
                },
                Ok(None) => "the value is missing".into(),
                Err(e) => e.to_string(),
            };
            if !error.is_empty() {
                tracing::warn!(secret.id = %rec.id, secret.name = %rec.name, version = v.version, %error, "secret does not open");
            }
            out.push(SecretCheck {
                id: rec.id.to_string(),
                name: rec.name.clone(),
                version: v.version,
                key_id: v.key_id,
                error,
            });
        }
    }
    Ok(out)
}
