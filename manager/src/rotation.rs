//! Data key rotation, without downtime.
//!
//! On the leader ([`rotate`]):
//! 1. a new data key is generated and saved (sealed under the KEK) here;
//! 2. `AddDataKey` makes it active: from that entry on, a write sealed under an
//!    older key is refused on apply and re-sealed by its writer;
//! 3. every value still sealed under an older key (the CA key, the join
//!    tokens, every secret version) is opened and re-sealed, proposed in
//!    batches of at most 4 MiB that each replace only the exact value they read;
//! 4. once a majority of managers hold the new key, `RetireDataKeys` retires
//!    the older ones, and every manager deletes them from its disk.
//!
//! The key itself never enters the log: other managers fetch it over mTLS
//! (manager-only `Cluster.GetDataKey`) when they apply step 2, and check it
//! against a value sealed under it in the cluster record ([`follow_keys`]). A
//! manager that was down fetches it when it comes back.

use std::time::Duration;

use swarmd_proto::cluster::cluster_client::ClusterClient;
use swarmd_proto::cluster::GetDataKeyRequest;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::cluster::SecretsCache;
use crate::keys::{purpose, Keyring, SymmetricKey};
use crate::state::{ClusterField, Command, Rejection, ResealField, ResealSecret};
use crate::store::{Peers, Store, StoreError};

/// The plaintext of a data key's check value.
const CHECK: &[u8] = b"swarmd data key check";
/// Largest batch of re-sealed values in one command.
const BATCH_BYTES: usize = 4 << 20;

/// What a rotation did.
pub(crate) struct Rotation {
    /// The new active key.
    pub key_id: u32,
    /// Values re-sealed.
    pub resealed: usize,
    /// Keys below this one are retired.
    pub retired_below: u32,
}

use crate::status::internal;

/// Rotates the data key. Runs on the leader.
pub(crate) async fn rotate(store: &Store, secrets: &SecretsCache, peers: &Peers) -> Result<Rotation, Status> {
    let record = secrets.record()?;
    let cid = record.id.to_string();
    let key_id = record.data_key_id + 1;
    let key = SymmetricKey::generate();
    secrets.add_data_key(key_id, key.clone()).map_err(internal)?;
    let check =
        Keyring::single(key_id, key).seal(key_id, &purpose::key_check(&cid, key_id), CHECK).map_err(internal)?;
    store.propose(Command::AddDataKey { key_id, check }).await?;
    tracing::info!(key_id, "data key rotated: re-sealing what the older keys sealed");

    let mut resealed = 0;
    let mut failures = Vec::new();
    for _pass in 0..3 {
        failures.clear();
        let (n, left) = reseal_pass(store, secrets, key_id, &cid, &mut failures).await?;
        resealed += n;
        if left == 0 {
            break;
        }
    }
    if !failures.is_empty() {
        return Err(Status::data_loss(format!(
            "data key {key_id} is active, but {} values did not open and stay under older keys, which are kept: {}",
            failures.len(),
            failures.join("; ")
        )));
    }

    let holders = wait_for_holders(store, peers, key_id).await;
    let members = store.view().manager_addrs().map_err(internal)?.len().max(1);
    if holders * 2 <= members {
        return Err(Status::unavailable(format!(
            "data key {key_id} is active and everything is re-sealed, but only {holders} of {members} managers hold it \
             yet: older keys are kept until a majority does (run keys rotate again later)"
        )));
    }
    store.propose(Command::RetireDataKeys { below: key_id }).await?;
    tracing::info!(key_id, resealed, "older data keys retired");
    Ok(Rotation { key_id, resealed, retired_below: key_id })
}

/// Re-seals every value under a key older than `key_id`; returns how many it
/// re-sealed and how many it found.
async fn reseal_pass(
    store: &Store,
    secrets: &SecretsCache,
    key_id: u32,
    cid: &str,
    failures: &mut Vec<String>,
) -> Result<(usize, usize), Status> {
    let view = store.view().clone();
    let record = secrets.record()?;
    let mut found: usize = 0;
    let mut fields = Vec::new();
    for (field, sealed, purpose) in [
        (ClusterField::CaKey, &record.ca_key, purpose::ca_key(cid)),
        (ClusterField::WorkerToken, &record.worker_token, purpose::join_token(cid, swarmd_certs::Role::Worker)),
        (ClusterField::ManagerToken, &record.manager_token, purpose::join_token(cid, swarmd_certs::Role::Manager)),
    ]
    .into_iter()
    .chain(record.unlock_key.as_ref().map(|k| (ClusterField::UnlockKey, k, purpose::unlock_key(cid))))
    {
        if sealed.key_id() >= key_id {
            continue;
        }
        found += 1;
        match secrets.open(&purpose, sealed) {
            Ok(plain) => {
                let new = secrets.seal(&purpose, &plain)?;
                fields.push(ResealField { field, old: sealed.clone(), new });
            }
            Err(e) => failures.push(format!("cluster {field:?}: {e}")),
        }
    }
    let mut resealed = 0;
    let mut batch: Vec<ResealSecret> = Vec::new();
    let mut bytes = 0;
    for rec in view.secrets().map_err(internal)? {
        for v in rec.versions.iter().filter(|v| v.key_id < key_id) {
            found += 1;
            let Some(old) = view.secret_data(&rec.id, v.version).map_err(internal)? else { continue };
            let purpose = purpose::secret(cid, rec.id.as_str(), v.version);
            match secrets.open(&purpose, &old) {
                Ok(plain) => {
                    let new = secrets.seal(&purpose, &plain)?;
                    bytes += new.len();
                    batch.push(ResealSecret { id: rec.id.clone(), version: v.version, old, new });
                }
                Err(e) => failures.push(format!("secret {} version {}: {e}", rec.name, v.version)),
            }
            if bytes >= BATCH_BYTES {
                resealed += batch.len();
                propose_reseal(store, std::mem::take(&mut fields), std::mem::take(&mut batch)).await?;
                bytes = 0;
            }
        }
    }
    if !fields.is_empty() || !batch.is_empty() {
        resealed += fields.len() + batch.len();
        propose_reseal(store, fields, batch).await?;
    }
    Ok((resealed, found.saturating_sub(resealed)))
}

async fn propose_reseal(store: &Store, cluster: Vec<ResealField>, secrets: Vec<ResealSecret>) -> Result<(), Status> {
    match store.propose(Command::Reseal { cluster, secrets }).await {
        Ok(()) => Ok(()),
        // Sealed under a key that another rotation has since replaced.
        Err(StoreError::Rejected(why @ Rejection::StaleDataKey)) => {
            Err(Status::aborted(format!("re-sealing was overtaken ({why}): another rotation ran; run it again")))
        }
        Err(e) => Err(e.into()),
    }
}

/// How many managers (this one included) hold key `key_id`, waiting up to 10 s
/// for the others to fetch it.
async fn wait_for_holders(store: &Store, peers: &Peers, key_id: u32) -> usize {
    let me = store.leader_addr();
    let others: Vec<String> =
        store.view().manager_addrs().unwrap_or_default().into_iter().filter(|a| Some(a) != me.as_ref()).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut holders = 1;
        for addr in &others {
            let mut c = ClusterClient::new(peers.channel(addr));
            let got = tokio::time::timeout(Duration::from_secs(1), c.get_data_key(GetDataKeyRequest {})).await;
            if let Ok(Ok(r)) = got {
                let ring = Keyring::decode(&zeroize::Zeroizing::new(r.into_inner().key));
                if ring.is_some_and(|r| r.contains(key_id)) {
                    holders += 1;
                }
            }
        }
        if holders == others.len() + 1 || tokio::time::Instant::now() >= deadline {
            return holders;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// On every manager: fetches the active data key when this manager lacks it,
/// and deletes retired keys once it holds the active one. Runs until cancelled.
pub(crate) async fn follow_keys(
    store: Store,
    secrets: SecretsCache,
    peers: Peers,
    mut applied: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    loop {
        let missing = match sync_keys(&store, &secrets, &peers).await {
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch the active data key yet; retrying");
                true
            }
        };
        tokio::select! {
            r = applied.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)), if missing => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn sync_keys(store: &Store, secrets: &SecretsCache, peers: &Peers) -> Result<(), String> {
    let record = match secrets.record() {
        Ok(r) => r,
        Err(_) => return Ok(()),
    };
    let active = record.data_key_id;
    let cid = record.id.to_string();
    // A key this manager holds under the active ID may still be the wrong one:
    // one generated for a rotation that never committed here.
    let holds = match (secrets.keyring().get(active), &record.data_key_check) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(k), Some(check)) => k.open(&purpose::key_check(&cid, active), check).is_ok(),
    };
    if !holds {
        let check = record.data_key_check.clone().ok_or("the cluster record has no check for its data key")?;
        let mut tried = Vec::new();
        let mut addrs: Vec<String> = store.leader_addr().into_iter().collect();
        addrs.extend(store.view().manager_addrs().unwrap_or_default());
        addrs.dedup();
        let mut got = None;
        for addr in addrs {
            let mut c = ClusterClient::new(peers.channel(&addr));
            match tokio::time::timeout(Duration::from_secs(2), c.get_data_key(GetDataKeyRequest {})).await {
                Ok(Ok(r)) => {
                    let bytes = zeroize::Zeroizing::new(r.into_inner().key);
                    let key = Keyring::decode(&bytes).and_then(|ring| ring.get(active).cloned());
                    match key {
                        Some(k) if k.open(&purpose::key_check(&cid, active), &check).is_ok() => {
                            got = Some(k);
                            break;
                        }
                        Some(_) => tried.push(format!("{addr}: its key {active} fails the check")),
                        None => tried.push(format!("{addr}: does not hold key {active} yet")),
                    }
                }
                Ok(Err(s)) => tried.push(format!("{addr}: {}", s.message())),
                Err(_) => tried.push(format!("{addr}: timed out")),
            }
        }
        let key = got.ok_or_else(|| format!("data key {active}: {}", tried.join("; ")))?;
        secrets.add_data_key(active, key).map_err(|e| e.to_string())?;
        tracing::info!(key_id = active, "fetched the active data key");
    }
    if record.retired_below > 0 && secrets.retire_below(record.retired_below).map_err(|e| e.to_string())? {
        tracing::info!(below = record.retired_below, "retired data keys deleted from this manager");
    }
    Ok(())
}
