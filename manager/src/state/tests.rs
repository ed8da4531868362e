//! Unit tests of the state machine's commands.
use super::*;
use crate::keys::SymmetricKey;

fn sample_cluster() -> ClusterRecord {
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

fn node(role: Role) -> NodeRecord {
    NodeRecord {
        id: NodeId::random(),
        role,
        status: NodeStatus::Unknown,
        addr: "127.0.0.1:1".into(),
        hostname: "h".into(),
        cert_serial: "01".into(),
        cert_not_after: 0,
        created_at: 0,
        raft_id: None,
        labels: BTreeMap::new(),
        availability: Availability::Active,
        session_manager: None,
    }
}

fn apply(view: &StateView, cmd: &Command) -> Result<(), String> {
    let b = plan(view, cmd).unwrap()?;
    view.tree.apply_batch(b.into_sled()).unwrap();
    Ok(())
}

#[test]
fn commands_apply_and_refuse_without_changing_anything() {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let view = StateView::new(db.open_tree("sm").unwrap());
    let w = node(Role::Worker);
    assert!(apply(&view, &Command::AddNode(w.clone())).is_err(), "add before init");
    let m = node(Role::Manager);
    apply(&view, &Command::InitCluster { cluster: Box::new(sample_cluster()), manager: m.clone() }).unwrap();
    assert!(apply(&view, &Command::InitCluster { cluster: Box::new(sample_cluster()), manager: m }).is_err());
    apply(&view, &Command::AddNode(w.clone())).unwrap();
    let before = view.nodes().unwrap();
    assert!(apply(&view, &Command::AddNode(w.clone())).is_err(), "duplicate");
    assert_eq!(view.nodes().unwrap(), before);
    apply(
        &view,
        &Command::SetStatus(vec![StatusChange {
            node: w.id.clone(),
            status: NodeStatus::Ready,
            addr: Some("10.0.0.1:5".into()),
            hostname: None,
            reporter: NodeId::random(),
        }]),
    )
    .unwrap();
    let got = view.node(&w.id).unwrap().unwrap();
    assert_eq!(got.status, NodeStatus::Ready);
    assert_eq!(got.addr, "10.0.0.1:5");
    apply(&view, &Command::RecordCert { node: w.id.clone(), serial: "ff".into(), not_after: 9 }).unwrap();
    assert_eq!(view.node(&w.id).unwrap().unwrap().cert_serial, "ff");
    assert!(apply(&view, &Command::RecordCert { node: NodeId::random(), serial: "1".into(), not_after: 1 }).is_err());
}

#[test]
fn the_manager_index_follows_role_membership_and_removal() {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let view = StateView::new(db.open_tree("sm").unwrap());
    let m = node(Role::Manager);
    apply(&view, &Command::InitCluster { cluster: Box::new(sample_cluster()), manager: m.clone() }).unwrap();
    let w = node(Role::Worker);
    apply(&view, &Command::AddNode(w.clone())).unwrap();
    assert_eq!(view.managers().unwrap().iter().map(|e| e.id.clone()).collect::<Vec<_>>(), vec![m.id.clone()]);
    assert!(view.manager_addrs().unwrap().is_empty(), "no raft member yet");
    apply(&view, &Command::SetRaftMember { node: m.id.clone(), raft_id: 7, addr: "10.0.0.9:1".into() }).unwrap();
    assert_eq!(view.manager_addrs().unwrap(), vec!["10.0.0.9:1".to_string()]);
    apply(&view, &Command::SetRole { node: w.id.clone(), role: Role::Manager }).unwrap();
    let err = apply(&view, &Command::SetRaftMember { node: w.id.clone(), raft_id: 7, addr: "x:1".into() });
    assert!(err.unwrap_err().contains("already used"), "raft IDs are unique");
    apply(&view, &Command::SetRaftMember { node: w.id.clone(), raft_id: 8, addr: "10.0.0.8:1".into() }).unwrap();
    assert_eq!(view.manager_addrs().unwrap(), vec!["10.0.0.8:1".to_string(), "10.0.0.9:1".to_string()]);
    apply(&view, &Command::SetRole { node: w.id.clone(), role: Role::Worker }).unwrap();
    assert_eq!(view.manager_addrs().unwrap(), vec!["10.0.0.9:1".to_string()]);
    apply(&view, &Command::SetRole { node: w.id.clone(), role: Role::Manager }).unwrap();
    apply(&view, &Command::RemoveNodes { nodes: vec![w.id.clone()], deny_until: 0 }).unwrap();
    assert_eq!(view.managers().unwrap().len(), 1, "a removed manager leaves the index");
}

#[test]
fn secrets_reseal_only_what_they_read_and_old_keys_retire_only_when_unused() {
    use crate::keys::Keyring;
    let db = sled::Config::new().temporary(true).open().unwrap();
    let view = StateView::new(db.open_tree("sm").unwrap());
    let mut ring = Keyring::single(1, SymmetricKey::generate());
    let mut cluster = sample_cluster();
    cluster.ca_key = ring.seal(1, "a", b"k").unwrap();
    cluster.worker_token = ring.seal(1, "w", b"w").unwrap();
    cluster.manager_token = ring.seal(1, "m", b"m").unwrap();
    apply(&view, &Command::InitCluster { cluster: Box::new(cluster), manager: node(Role::Manager) }).unwrap();
    let id = SecretId::random();
    let v1 = ring.seal(1, "s1", b"one").unwrap();
    let create = |id: &SecretId, data| Command::CreateSecret {
        id: id.clone(),
        name: "s".into(),
        labels: BTreeMap::new(),
        created_at: 1,
        data,
    };
    apply(&view, &create(&id, v1.clone())).unwrap();
    assert!(apply(&view, &create(&SecretId::random(), v1.clone())).unwrap_err().contains("already in use"));
    ring.insert(2, SymmetricKey::generate());
    let check = ring.seal(2, "check", b"c").unwrap();
    assert!(apply(&view, &Command::AddDataKey { key_id: 3, check: check.clone() }).is_err(), "keys count up by one");
    apply(&view, &Command::AddDataKey { key_id: 2, check }).unwrap();
    // Writes sealed under the old key are refused from now on.
    let stale = ring.seal(1, "s2", b"two").unwrap();
    let add = |version, data| Command::AddSecretVersion { id: id.clone(), version, created_at: 2, data };
    assert_eq!(apply(&view, &add(2, stale)).unwrap_err(), STALE_DATA_KEY);
    assert!(apply(&view, &add(3, ring.seal(2, "s3", b"x").unwrap())).unwrap_err().contains("version 2 is next"));
    // Not retirable while anything is under key 1.
    assert!(apply(&view, &Command::RetireDataKeys { below: 2 }).unwrap_err().contains("still sealed"));
    // A re-seal that names a value other than the stored one is skipped.
    let wrong_old = ring.seal(1, "s1", b"one").unwrap();
    let new = ring.seal(2, "s1", b"one").unwrap();
    let reseal = |old: &crate::keys::Sealed| Command::Reseal {
        cluster: vec![],
        secrets: vec![ResealSecret { id: id.clone(), version: 1, old: old.clone(), new: new.clone() }],
    };
    apply(&view, &reseal(&wrong_old)).unwrap();
    assert_eq!(view.secret_data(&id, 1).unwrap().unwrap(), v1, "a re-seal replaced a value it did not read");
    apply(&view, &reseal(&v1)).unwrap();
    assert_eq!(view.secret_data(&id, 1).unwrap().unwrap(), new);
    assert_eq!(view.secret(&id).unwrap().unwrap().versions[0].key_id, 2);
    let c = view.cluster().unwrap().unwrap();
    let fields = [
        (ClusterField::CaKey, c.ca_key.clone()),
        (ClusterField::WorkerToken, c.worker_token.clone()),
        (ClusterField::ManagerToken, c.manager_token.clone()),
    ];
    let cluster = fields
        .into_iter()
        .map(|(field, old)| ResealField { field, old, new: ring.seal(2, "x", b"y").unwrap() })
        .collect();
    apply(&view, &Command::Reseal { cluster, secrets: vec![] }).unwrap();
    apply(&view, &Command::RetireDataKeys { below: 2 }).unwrap();
    assert_eq!(view.cluster().unwrap().unwrap().retired_below, 2);
}
