//! What each node's session carries: its tasks, and exactly the secrets those
//! tasks reference (invariant 4). Computed from the node's own task index after
//! every applied change and sent as a difference from what the session already
//! carried; the first message is complete. Secret values are opened here, on
//! the manager holding the session, only to be sent down that node's mTLS
//! stream, in buffers that are wiped when prost is done with them (the copies
//! tonic, h2 and rustls make while encoding and encrypting are not ours to
//! wipe).
//!
//! A set of assignments larger than [`CHUNK_BYTES`] goes as several messages,
//! each flagged `more` but the last; the node applies them together once the
//! last arrives, and acknowledges the `seq` of that last message in its
//! heartbeats (see [`crate::dispatcher`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use swarmd_certs::{NodeId, TaskId};
use swarmd_proto::dispatcher::{Assignments, SecretKey, SecretValue, SessionMessage, Task, TaskSecret, TaskSpec};
use tokio::sync::mpsc;
use tonic::Status;
use zeroize::Zeroizing;

use crate::cluster::SecretsCache;
use crate::keys::purpose;
use crate::services::{Network, TaskRecord, Userns};
use crate::state::{StateError, StateView};
use crate::store::Store;

type SecretKeyPair = (String, u32);

/// A node's assignment set: its tasks by ID and the secret versions they need.
struct Set {
    tasks: BTreeMap<String, Task>,
    secrets: BTreeSet<SecretKeyPair>,
}

fn to_wire(t: &TaskRecord, service: &str, view: &StateView) -> Result<(Task, Vec<SecretKeyPair>), StateError> {
    let mut needed = Vec::new();
    let mut secrets = Vec::new();
    if t.desired_running {
        for r in &t.spec.secrets {
            let Some(s) = view.secret(&r.secret)? else { continue };
            let version = r.pin.unwrap_or(s.latest().version);
            needed.push((r.secret.to_string(), version));
            secrets.push(TaskSecret {
                secret_id: r.secret.to_string(),
                version,
                name: s.name.clone(),
                target: r.target.clone(),
                uid: r.uid,
                gid: r.gid,
                mode: r.mode,
            });
        }
    }
    let (has_user, (uid, gid)) = match t.spec.user {
        Some(u) => (true, u),
        None => (false, (0, 0)),
    };
    let spec = TaskSpec {
        image: t.spec.image.clone(),
        args: t.spec.args.clone(),
        env: t.spec.env.clone(),
        has_user,
        uid,
        gid,
        secrets,
        memory: t.spec.memory.unwrap_or(0),
        pids: t.spec.pids.unwrap_or(0),
        host_network: t.spec.network == Network::Host,
        host_userns: t.spec.userns == Userns::Host,
        image_digest: crate::state::pinned_digest(&t.spec.image).unwrap_or_default().to_owned(),
        content_trust: false,
        trusted_signatures: Vec::new(),
    };
    let mut spec = spec;
    if view.content_trust_required()? {
        spec.content_trust = true;
        if let Some(d) = crate::state::pinned_digest(&t.spec.image) {
            spec.trusted_signatures = view
                .vouches(d, &view.repositories_of(&t.spec.image)?)?
                .into_iter()
                .map(|(_, s, k)| swarmd_proto::dispatcher::TrustedSignature {
                    payload: s.payload,
                    signature: s.signature,
                    public_key: k.public_key,
                })
                .collect();
        }
    }
    let task = Task {
        id: t.id.to_string(),
        service: service.to_owned(),
        slot: t.slot,
        desired_running: t.desired_running,
        spec: Some(spec),
    };
    Ok((task, needed))
}

fn compute(view: &StateView, node: &NodeId) -> Result<Set, StateError> {
    let mut tasks = BTreeMap::new();
    let mut secrets = BTreeSet::new();
    let mut names: HashMap<String, String> = HashMap::new();
    for t in view.node_tasks(node)? {
        // Stopped tasks stay until the node reports them ended.
        if !t.desired_running && t.state.is_terminal() {
            continue;
        }
        let sid = t.service.to_string();
        if !names.contains_key(&sid) {
            let name = view.service(&t.service)?.map(|s| s.name).unwrap_or_else(|| sid.clone());
            names.insert(sid.clone(), name);
        }
        let (task, needed) = to_wire(&t, &names[&sid], view)?;
        secrets.extend(needed);
        tasks.insert(task.id.clone(), task);
    }
    Ok(Set { tasks, secrets })
}

fn open_secret(view: &StateView, secrets: &SecretsCache, key: &SecretKeyPair) -> Option<Zeroizing<Vec<u8>>> {
    let id = key.0.parse().ok()?;
    let sealed = view.secret_data(&id, key.1).ok()??;
    let cid = secrets.record().ok()?.id.to_string();
    match secrets.open(&purpose::secret(&cid, &key.0, key.1), &sealed) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(secret.id = %key.0, version = key.1, error = %e, "cannot open a secret for delivery");
            None
        }
    }
}

/// Most bytes of assignments one session message carries (a node accepts
/// messages of 16 MiB; one secret is under 500 KiB).
pub(crate) const CHUNK_BYTES: usize = 2 << 20;

/// A secret value that is zeroed when the last `Bytes` pointing at it is dropped.
struct Wiped(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for Wiped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Splits `a` into messages of at most about [`CHUNK_BYTES`] each (one item
/// larger than that goes alone), every one but the last flagged `more`.
pub(crate) fn chunk(a: Assignments) -> Vec<Assignments> {
    use prost::Message;
    let full = a.full;
    let mut out = vec![Assignments { full, ..Default::default() }];
    let mut size = 0usize;
    let mut room = |out: &mut Vec<Assignments>, len: usize| {
        if size > 0 && size + len > CHUNK_BYTES {
            out.push(Assignments { full, ..Default::default() });
            size = 0;
        }
        size += len + 8;
    };
    for s in a.secrets {
        room(&mut out, s.encoded_len());
        out.last_mut().expect("a chunk").secrets.push(s);
    }
    for k in a.removed_secrets {
        room(&mut out, k.encoded_len());
        out.last_mut().expect("a chunk").removed_secrets.push(k);
    }
    for t in a.tasks {
        room(&mut out, t.encoded_len());
        out.last_mut().expect("a chunk").tasks.push(t);
    }
    for id in a.removed_tasks {
        room(&mut out, id.len());
        out.last_mut().expect("a chunk").removed_tasks.push(id);
    }
    let n = out.len();
    for (i, c) in out.iter_mut().enumerate() {
        c.more = i + 1 < n;
    }
    out
}

/// Streams `node`'s assignments down `tx` until the session ends, recording
/// in `progress` what was sent.
pub(crate) async fn stream(
    store: Store,
    secrets: SecretsCache,
    node: NodeId,
    tx: mpsc::Sender<Result<SessionMessage, Status>>,
    progress: Arc<Mutex<crate::dispatcher::Progress>>,
) {
    let mut applied = store.applied_watch();
    let mut seq = 0u64;
    let mut sent = Set { tasks: BTreeMap::new(), secrets: BTreeSet::new() };
    let mut full = true;
    // What the node was last told of the roots to trust and of renewing.
    let mut told_ca = None;
    loop {
        let view = store.view().clone();
        match crate::ca_rotation::node_view(&view, &node) {
            Ok(Some(ca)) if told_ca.as_ref() != Some(&ca) => {
                let out = SessionMessage {
                    trust_bundle_pem: ca.0.clone(),
                    renew_certificate: ca.1.is_some(),
                    ..Default::default()
                };
                if tx.send(Ok(out)).await.is_err() {
                    return;
                }
                told_ca = Some(ca);
            }
            Ok(_) => {}
            Err(e) => tracing::error!(node.id = %node, error = %e, "cannot read the trust bundle"),
        }
        let now = match compute(&view, &node) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(node.id = %node, error = %e, "cannot compute assignments");
                Set { tasks: sent.tasks.clone(), secrets: sent.secrets.clone() }
            }
        };
        let mut msg = Assignments { full, ..Default::default() };
        for (id, t) in &now.tasks {
            if full || sent.tasks.get(id) != Some(t) {
                msg.tasks.push(t.clone());
            }
        }
        if !full {
            msg.removed_tasks = sent.tasks.keys().filter(|id| !now.tasks.contains_key(*id)).cloned().collect();
        }
        let mut delivered = BTreeSet::new();
        for key in &now.secrets {
            if !full && sent.secrets.contains(key) {
                delivered.insert(key.clone());
                continue;
            }
            if let Some(data) = open_secret(&view, &secrets, key) {
                let data = bytes::Bytes::from_owner(Wiped(data));
                msg.secrets.push(SecretValue { id: key.0.clone(), version: key.1, data });
                delivered.insert(key.clone());
            }
        }
        if !full {
            msg.removed_secrets = sent
                .secrets
                .iter()
                .filter(|k| !now.secrets.contains(*k))
                .map(|k| SecretKey { id: k.0.clone(), version: k.1 })
                .collect();
        }
        let changed = full
            || !msg.tasks.is_empty()
            || !msg.removed_tasks.is_empty()
            || !msg.secrets.is_empty()
            || !msg.removed_secrets.is_empty();
        if changed {
            for s in &msg.secrets {
                tracing::info!(node.id = %node, secret.id = %s.id, version = s.version, "secret delivered to node");
            }
            for part in chunk(msg) {
                seq += 1;
                let out = SessionMessage { assignments: Some(part), seq, ..Default::default() };
                if tx.send(Ok(out)).await.is_err() {
                    return;
                }
            }
            progress.lock().expect("progress lock").sent(seq);
            sent = Set { tasks: now.tasks, secrets: delivered };
            full = false;
        }
        tokio::select! {
            r = applied.changed() => if r.is_err() { return },
            _ = tx.closed() => return,
        }
    }
}

/// Tasks' output, in memory on the manager holding each node's session:
/// the last [`LINES`] lines and at most [`BYTES`] per task. Never written to
/// disk (it may echo secrets).
#[derive(Clone, Default)]
pub struct TaskLogs(Arc<Mutex<HashMap<TaskId, TaskOutput>>>);

/// One task's lines, and their bytes.
type TaskOutput = (VecDeque<String>, usize);

/// Lines kept per task.
pub const LINES: usize = 1000;
/// Bytes kept per task.
pub const BYTES: usize = 1 << 20;

impl TaskLogs {
    /// Appends lines of `task` (each cut to 4 KiB), dropping its oldest ones
    /// beyond [`LINES`] or [`BYTES`].
    pub fn push(&self, task: TaskId, lines: Vec<String>) {
        let mut m = self.0.lock().expect("logs lock");
        let (q, bytes) = m.entry(task).or_default();
        for l in lines {
            let l = crate::limits::truncate(&l, crate::limits::MAX_LOG_LINE);
            *bytes += l.len();
            q.push_back(l);
            while q.len() > LINES || *bytes > BYTES {
                match q.pop_front() {
                    Some(old) => *bytes -= old.len(),
                    None => break,
                }
            }
        }
    }

    /// The lines of `task`.
    pub fn get(&self, task: &TaskId) -> Vec<String> {
        self.0.lock().expect("logs lock").get(task).map(|(q, _)| q.iter().cloned().collect()).unwrap_or_default()
    }

    /// Whether no output is held.
    pub fn is_empty(&self) -> bool {
        self.0.lock().expect("logs lock").is_empty()
    }

    /// Forgets tasks not in `keep`.
    pub fn retain(&self, keep: &BTreeSet<TaskId>) {
        self.0.lock().expect("logs lock").retain(|t, _| keep.contains(t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn large_assignments_are_cut_into_chunks_that_add_up_to_the_whole() {
        let secret =
            |i: u8| SecretValue { id: format!("s{i}"), version: 1, data: bytes::Bytes::from(vec![i; 500 * 1024 - 1]) };
        let a = Assignments {
            full: true,
            secrets: (0..12).map(secret).collect(),
            tasks: vec![Task { id: "t".into(), ..Default::default() }],
            removed_tasks: vec!["old".into()],
            ..Default::default()
        };
        let chunks = chunk(a.clone());
        assert!(chunks.len() >= 3, "{} chunks", chunks.len());
        for (i, c) in chunks.iter().enumerate() {
            assert!(c.encoded_len() < 4 << 20, "chunk {i} of {} bytes", c.encoded_len());
            assert!(c.full, "every chunk says whether the set is complete");
            assert_eq!(c.more, i + 1 < chunks.len());
        }
        let ids: Vec<String> = chunks.iter().flat_map(|c| c.secrets.iter().map(|s| s.id.clone())).collect();
        assert_eq!(ids, a.secrets.iter().map(|s| s.id.clone()).collect::<Vec<_>>());
        assert_eq!(chunks.iter().map(|c| c.tasks.len()).sum::<usize>(), 1);
        assert_eq!(chunks.last().unwrap().removed_tasks, ["old"]);
        // A small set goes as one message.
        let small = chunk(Assignments { tasks: a.tasks.clone(), ..Default::default() });
        assert_eq!(small.len(), 1);
        assert!(!small[0].more);
    }
}
