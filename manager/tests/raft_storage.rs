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
    let cfg = swarmd_certs::tls::anonymous_client_config(ca.bundle_pem()).unwrap();
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

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_compact_the_log_and_state_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let settings = RaftSettings { snapshot_every: 200, keep_behind_snapshot: 50, ..RaftSettings::default() };
    let k = SymmetricKey::generate();
    let cluster = ClusterRecord {
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
    };
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
                .propose(Command::RecordCert { node: w.clone(), serial: format!("{i:x}"), not_after: i as i64 })
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
