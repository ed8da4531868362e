//! Secrets as the replicated state holds them: metadata records, versions and
//! Docker's rules for names and sizes. Values are stored apart, sealed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use swarmd_certs::SecretId;

use super::{
    check_label, encode, secret_data_key, secret_key, secret_name_key, Command, StateError, StateView, WriteBatch,
};

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
/// The rejection a write sealed under a retired data key gets (the writer
/// re-seals under the new key and retries).
pub const STALE_DATA_KEY: &str = "the value was sealed under a data key that is no longer active";

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

/// The secret commands of [`super::plan`].
pub(super) fn plan(view: &StateView, cmd: &Command) -> Result<Result<WriteBatch, String>, StateError> {
    let mut batch = WriteBatch::default();
    match cmd {
        Command::CreateSecret { id, name, labels, created_at, data } => {
            let Some(cluster) = view.cluster()? else {
                return Ok(Err("cluster is not initialised".into()));
            };
            if let Err(why) = check_secret_name(name)
                .and_then(|_| check_secret_size(data.plaintext_len()))
                .and_then(|_| labels.iter().try_for_each(|(k, v)| check_label(k, v)))
            {
                return Ok(Err(why));
            }
            if data.key_id() != cluster.data_key_id {
                return Ok(Err(STALE_DATA_KEY.into()));
            }
            if let Some(other) = view.secret_id_by_name(name)? {
                return Ok(Err(format!("secret name {name:?} is already in use by secret {other}")));
            }
            if view.secret(id)?.is_some() {
                return Ok(Err(format!("secret ID {id} is already in use")));
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
                return Ok(Err("cluster is not initialised".into()));
            };
            let Some(mut rec) = view.secret(id)? else {
                return Ok(Err(format!("secret {id} does not exist")));
            };
            if let Err(why) = check_secret_size(data.plaintext_len()) {
                return Ok(Err(why));
            }
            if data.key_id() != cluster.data_key_id {
                return Ok(Err(STALE_DATA_KEY.into()));
            }
            let next = rec.latest().version + 1;
            if *version != next {
                return Ok(Err(format!(
                    "secret {} was updated meanwhile: version {next} is next, not {version}",
                    rec.name
                )));
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
                return Ok(Err(format!("secret {id} does not exist")));
            };
            let users = view.services_using(id)?;
            if !users.is_empty() {
                return Ok(Err(format!(
                    "secret {} is in use by service(s) {}: remove it from them first (service update --secret-rm)",
                    rec.name,
                    users.join(", ")
                )));
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
