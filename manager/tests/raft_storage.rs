//! The sled-backed raft storage: openraft's own conformance suite, and a real
//! single-node raft that snapshots, compacts its log and restarts from disk.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::testing::{StoreBuilder, Suite};
use openraft::{BasicNode, StorageError};
use swarmd_certs::{ClusterId, NodeId, Role, RootCa};
use swarmd_manager::keys::SymmetricKey;
use swarmd_manager::raft::{self, LogStore, Network, RaftSettings, StateMachine, TypeConfig};
use swarmd_manager::state::{ClusterRecord, Command, NodeRecord, NodeStatus};
use swarmd_manager::Store;
use tokio::sync::watch;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let s = raft::open_storage(dir.path()).unwrap();
        Ok((dir, s.log, s.sm))
    }
}

#[test]
fn sled_storage_passes_openraft_conformance_suite() {
    Suite::test_all(SledBuilder).unwrap();
}

fn network() -> Network {
    swarmd_certs::install_crypto_provider();
    let ca = RootCa::generate(&ClusterId::random()).unwrap();
    let cfg = swarmd_certs::tls::anonymous_client_config(ca.cert_pem()).unwrap();
    let (_tx, rx) = watch::channel(Arc::new(cfg));
    Network::new(rx)
}

fn node(id: &NodeId) -> NodeRecord {
    NodeRecord {
        id: id.clone(),
        role: Role::Worker,
        status: NodeStatus::Unknown,
        addr: String::new(),
        hostname: "h".into(),
        cert_serial: "0".into(),
        cert_not_after: 0,
        created_at: 0,
        raft_id: None,
        labels: Default::default(),
        availability: Default::default(),
        session_manager: None,
    }
}

fn cluster_record() -> ClusterRecord {
    let k = SymmetricKey::generate();
    ClusterRecord {
        id: ClusterId::random(),
        ca_cert_pem: "pem".into(),
        ca_key: k.seal("a", b"k"),
        worker_token: k.seal("w", b"w"),
        manager_token: k.seal("m", b"m"),
        cert_validity_secs: 86400,
        heartbeat_ms: 5000,
        created_at: 0,
        data_key_id: 1,
        data_key_check: None,
        retired_below: 0,
        unlock_key: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_compact_the_log_and_state_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let settings = RaftSettings { snapshot_every: 200, keep_behind_snapshot: 50, ..RaftSettings::default() };
    let cluster = cluster_record();
    let mgr = NodeId::random();
    let workers: Vec<NodeId> = (0..10).map(|_| NodeId::random()).collect();
    {
        let storage = raft::open_storage(dir.path()).unwrap();
        let view = storage.sm.view();
        let applied = storage.sm.applied_watch();
        let r = raft::start(1, &settings, storage, network()).await.unwrap();
        r.initialize(BTreeMap::from([(1, BasicNode { addr: "127.0.0.1:1".into() })])).await.unwrap();
        r.wait(Some(Duration::from_secs(10))).metrics(|m| m.current_leader == Some(1), "leader").await.unwrap();
        let store = Store::new(r.clone(), view.clone(), applied.clone());
        let mut m = node(&mgr);
        m.role = Role::Manager;
        store.propose(Command::InitCluster { cluster: Box::new(cluster), manager: m }).await.unwrap();
        for w in &workers {
            store.propose(Command::AddNode(node(w))).await.unwrap();
        }
        for i in 0..600u32 {
            let w = &workers[(i as usize) % workers.len()];
            store
                .propose(Command::RecordCert {
                    node: w.clone(),
                    serial: format!("{i:x}"),
                    not_after: i as i64,
                    role: Role::Worker,
                    at: 0,
                })
                .await
                .unwrap();
        }
        // A refused command changes nothing and is reported.
        let dup = store.propose(Command::AddNode(node(&workers[0]))).await.unwrap_err();
        assert!(dup.to_string().contains("already exists"), "{dup}");

        let m = r
            .wait(Some(Duration::from_secs(20)))
            .metrics(|m| m.snapshot.is_some_and(|s| s.index >= 400) && m.purged.is_some(), "snapshot and purge")
            .await
            .unwrap();
        let purged = m.purged.unwrap().index;
        assert!(purged + 50 >= m.snapshot.unwrap().index, "log not compacted: purged {purged}");
        r.shutdown().await.unwrap();
    }
    // Restart from disk: same state, raft comes back as leader and takes writes.
    // (sled's background flusher may hold the file lock for a moment after the
    // last handle drops; a restarted process never sees this.)
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let storage = loop {
        match raft::open_storage(dir.path()) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("reopen: {e}"),
        }
    };
    let view = storage.sm.view();
    let applied = storage.sm.applied_watch();
    let r = raft::start(1, &settings, storage, network()).await.unwrap();
    r.wait(Some(Duration::from_secs(10))).metrics(|m| m.current_leader == Some(1), "leader again").await.unwrap();
    assert_eq!(view.nodes().unwrap().len(), 11);
    let last = view.node(&workers[599 % 10]).unwrap().unwrap();
    assert_eq!(last.cert_serial, format!("{:x}", 599));
    let store = Store::new(r.clone(), view.clone(), applied.clone());
    store.propose(Command::AddNode(node(&NodeId::random()))).await.unwrap();
    assert_eq!(view.nodes().unwrap().len(), 12);
    r.shutdown().await.unwrap();
}

/// Concurrent proposals share raft entries (group commit), yet each gets its
/// own result, and a later command of a batch sees the earlier ones.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_proposals_share_entries_and_keep_their_own_results() {
    let dir = tempfile::tempdir().unwrap();
    let storage = raft::open_storage(dir.path()).unwrap();
    let view = storage.sm.view();
    let applied = storage.sm.applied_watch();
    let r = raft::start(1, &RaftSettings::default(), storage, network()).await.unwrap();
    r.initialize(BTreeMap::from([(1, BasicNode { addr: "127.0.0.1:1".into() })])).await.unwrap();
    r.wait(Some(Duration::from_secs(10))).metrics(|m| m.current_leader == Some(1), "leader").await.unwrap();
    let store = Store::new(r.clone(), view.clone(), applied.clone());
    let mut m = node(&NodeId::random());
    m.role = Role::Manager;
    store.propose(Command::InitCluster { cluster: Box::new(cluster_record()), manager: m }).await.unwrap();
    let before = r.metrics().borrow().last_log_index.unwrap();

    // 400 proposals at once; node 0 is proposed twice.
    let ids: Vec<NodeId> = (0..399).map(|_| NodeId::random()).collect();
    let mut all: Vec<NodeId> = ids.clone();
    all.push(ids[0].clone());
    let calls = all.into_iter().map(|id| {
        let store = store.clone();
        tokio::spawn(async move { store.propose(Command::AddNode(node(&id))).await })
    });
    let results: Vec<_> = futures::future::join_all(calls).await.into_iter().map(|r| r.unwrap()).collect();
    let refused: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().map(|e| e.to_string())).collect();
    assert_eq!(refused.len(), 1, "exactly the duplicate is refused: {refused:?}");
    assert!(refused[0].contains("already exists"), "{}", refused[0]);
    assert_eq!(view.nodes().unwrap().len(), 400, "the manager and 399 workers");
    let entries = r.metrics().borrow().last_log_index.unwrap() - before;
    assert!(entries < 400, "400 concurrent proposals took {entries} raft entries: no group commit");
    r.shutdown().await.unwrap();
}

/// Entries applied in one call, and the commands of a batch entry, are
/// planned against the writes of the ones before them; each keeps its result.
#[tokio::test]
async fn commands_applied_together_see_each_other_and_keep_their_own_results() {
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    use swarmd_manager::state::{CommandResult, Rejection};
    let dir = tempfile::tempdir().unwrap();
    let mut s = raft::open_storage(dir.path()).unwrap();
    let entry = |index: u64, cmd: Command| Entry::<TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(cmd),
    };
    let mut m = node(&NodeId::random());
    m.role = Role::Manager;
    let init = Command::InitCluster { cluster: Box::new(cluster_record()), manager: m };
    let (a, b) = (NodeId::random(), NodeId::random());
    let batch = Command::Batch(vec![
        Command::AddNode(node(&a)),
        Command::AddNode(node(&a)),
        Command::Batch(vec![]),
        Command::AddNode(node(&b)),
    ]);
    // The cluster record the batch needs exists only in the same call's first entry.
    let out = s.sm.apply(vec![entry(1, init), entry(2, batch), entry(3, Command::AddNode(node(&b)))]).await.unwrap();
    assert_eq!(out[0], CommandResult::Ok);
    let CommandResult::Batch(results) = &out[1] else { panic!("{out:?}") };
    assert_eq!(results[0], CommandResult::Ok);
    assert_eq!(results[1], CommandResult::Rejected(Rejection::NodeExists { node: a.clone() }));
    assert_eq!(results[2], CommandResult::Rejected(Rejection::NestedBatch));
    assert_eq!(results[3], CommandResult::Ok);
    assert_eq!(out[2], CommandResult::Rejected(Rejection::NodeExists { node: b.clone() }));
    let view = s.sm.view();
    assert_eq!(view.nodes().unwrap().len(), 3);
    let (last, _) = s.sm.applied_state().await.unwrap();
    assert_eq!(last.unwrap().index, 3);
    drop((view, s));
    // All of it is on disk, under the same last-applied mark.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut s = loop {
        match raft::open_storage(dir.path()) {
            Ok(s) => break s,
            Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("reopen: {e}"),
        }
    };
    assert_eq!(s.sm.view().nodes().unwrap().len(), 3);
    assert_eq!(s.sm.applied_state().await.unwrap().0.unwrap().index, 3);
}
