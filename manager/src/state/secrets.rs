//! Secrets as the replicated state holds them: metadata records, versions and
//! Docker's rules for names and sizes. Values are stored apart, sealed.
//!
//! | key                         | value |
//! |-----------------------------|-------|
//! | `secret/<id>`               | [`SecretRecord`]: metadata only |
//! | `secretname/<name>`         | the secret's ID: names are unique |
//! | `secretdata/<id>/<version>` | the value, [`Sealed`] under a data key |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use swarmd_certs::SecretId;

use super::{check_label, encode, Command, Missing, ObjectKind, Rejection, StateError, StateView, WriteBatch};
use crate::keys::Sealed;

/// A secret's metadata; its values are stored apart, sealed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// Its ID.
    pub id: SecretId,
    /// Its unique name.
    pub name: String,
    /// Operator labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, unix seconds.
    pub created_at: i64,
    /// The versions whose values are kept, oldest first.
    pub versions: Vec<SecretVersion>,
}

impl SecretRecord {
    /// The newest version.
    pub fn latest(&self) -> &SecretVersion {
        self.versions.last().expect("a secret has at least one version")
    }
}

/// One version of a secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretVersion {
    /// 1, 2, … in order of creation.
    pub version: u32,
    /// When it was created, unix seconds.
    pub created_at: i64,
    /// Plaintext size in bytes.
    pub size: u32,
    /// The data key its value is sealed with.
    pub key_id: u32,
}

/// Largest secret value, exclusive (Docker's limit: 500 KiB).
pub const MAX_SECRET_SIZE: usize = 500 * 1024;
/// Versions kept per secret; older values are deleted as new ones arrive.
pub const MAX_SECRET_VERSIONS: usize = 10;

const SECRET_PREFIX: &str = "secret/";
const SECRET_NAME_PREFIX: &str = "secretname/";
const SECRET_DATA_PREFIX: &str = "secretdata/";

pub(super) fn secret_key(id: &SecretId) -> Vec<u8> {
    format!("{SECRET_PREFIX}{id}").into_bytes()
}
fn secret_name_key(name: &str) -> Vec<u8> {
    format!("{SECRET_NAME_PREFIX}{name}").into_bytes()
}
pub(super) fn secret_data_key(id: &SecretId, version: u32) -> Vec<u8> {
    format!("{SECRET_DATA_PREFIX}{id}/{version:010}").into_bytes()
}

/// Docker's secret name rules: 1–64 characters, `[a-zA-Z0-9]` at both ends,
/// `[a-zA-Z0-9-_.]` inside.
pub fn check_secret_name(name: &str) -> Result<(), String> {
    let edge = |c: char| c.is_ascii_alphanumeric();
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(edge)
        && name.chars().last().is_some_and(edge)
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid secret name {:?}: use 1-64 characters of [a-zA-Z0-9-_.], starting and ending with a letter or digit",
            name.chars().take(80).collect::<String>()
        ))
    }
}

/// Secret values must be 1 byte to 500 KiB - 1.
pub fn check_secret_size(len: usize) -> Result<(), String> {
    if len == 0 {
        Err("secret value is empty".into())
    } else if len >= MAX_SECRET_SIZE {
        Err(format!(
            "secret value of {len} bytes is too large: it must be smaller than 500 KiB ({MAX_SECRET_SIZE} bytes)"
        ))
    } else {
        Ok(())
    }
}

impl StateView {
    /// One secret by ID.
    pub fn secret(&self, id: &SecretId) -> Result<Option<SecretRecord>, StateError> {
        self.get(&secret_key(id))
    }

    /// The ID of the secret named `name`.
    pub fn secret_id_by_name(&self, name: &str) -> Result<Option<SecretId>, StateError> {
        self.get(&secret_name_key(name))
    }

    /// All secrets, ordered by ID.
    pub fn secrets(&self) -> Result<Vec<SecretRecord>, StateError> {
        self.scan(SECRET_PREFIX)
    }

    /// The sealed value of one version of a secret.
    pub fn secret_data(&self, id: &SecretId, version: u32) -> Result<Option<Sealed>, StateError> {
        self.get(&secret_data_key(id, version))
    }
}

/// The secret commands of [`super::plan`]: `CreateSecret`,
/// `AddSecretVersion`, `RemoveSecret`.
pub(super) fn plan_secrets(view: &StateView, cmd: &Command) -> Result<Result<WriteBatch, Rejection>, StateError> {
    let mut batch = WriteBatch::default();
    match cmd {
        Command::CreateSecret { id, name, labels, created_at, data } => {
            let Some(cluster) = view.cluster()? else {
                return Ok(Err(Rejection::NotInitialised));
            };
            if let Err(why) = check_secret_name(name)
                .and_then(|_| check_secret_size(data.plaintext_len()))
                .and_then(|_| labels.iter().try_for_each(|(k, v)| check_label(k, v)))
            {
                return Ok(Err(Rejection::Invalid(why)));
            }
            if data.key_id() != cluster.data_key_id {
                return Ok(Err(Rejection::StaleDataKey));
            }
            if let Some(other) = view.secret_id_by_name(name)? {
                let holder = other.to_string();
                return Ok(Err(Rejection::NameInUse { kind: ObjectKind::Secret, name: name.clone(), holder }));
            }
            if view.secret(id)?.is_some() {
                return Ok(Err(Rejection::IdInUse { kind: ObjectKind::Secret, id: id.to_string() }));
            }
            let v = SecretVersion {
                version: 1,
                created_at: *created_at,
                size: data.plaintext_len() as u32,
                key_id: data.key_id(),
            };
            let rec = SecretRecord {
                id: id.clone(),
                name: name.clone(),
                labels: labels.clone(),
                created_at: *created_at,
                versions: vec![v],
            };
            batch.insert(secret_key(id), encode(&rec));
            batch.insert(secret_name_key(name), encode(id));
            batch.insert(secret_data_key(id, 1), encode(data));
        }
        Command::AddSecretVersion { id, version, created_at, data } => {
            let Some(cluster) = view.cluster()? else {
                return Ok(Err(Rejection::NotInitialised));
            };
            let Some(mut rec) = view.secret(id)? else {
                return Ok(Err(Missing::Secret(id.clone()).into()));
            };
            if let Err(why) = check_secret_size(data.plaintext_len()) {
                return Ok(Err(Rejection::Invalid(why)));
            }
            if data.key_id() != cluster.data_key_id {
                return Ok(Err(Rejection::StaleDataKey));
            }
            let next = rec.latest().version + 1;
            if *version != next {
                return Ok(Err(Rejection::SecretUpdatedMeanwhile { name: rec.name, next, proposed: *version }));
            }
            rec.versions.push(SecretVersion {
                version: next,
                created_at: *created_at,
                size: data.plaintext_len() as u32,
                key_id: data.key_id(),
            });
            batch.insert(secret_data_key(id, next), encode(data));
            while rec.versions.len() > MAX_SECRET_VERSIONS {
                let old = rec.versions.remove(0);
                batch.remove(secret_data_key(id, old.version));
            }
            batch.insert(secret_key(id), encode(&rec));
        }
        Command::RemoveSecret { id } => {
            let Some(rec) = view.secret(id)? else {
                return Ok(Err(Missing::Secret(id.clone()).into()));
            };
            let users = view.services_using(id)?;
            if !users.is_empty() {
                return Ok(Err(Rejection::SecretInUse { name: rec.name, services: users }));
            }
            batch.remove(secret_key(id));
            batch.remove(secret_name_key(&rec.name));
            for v in &rec.versions {
                batch.remove(secret_data_key(id, v.version));
            }
        }
        _ => unreachable!("not a secret command"),
    }
    Ok(Ok(batch))
}
