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
            reporter: NodeId::random(),
        }]),
    )
    .unwrap();
    let got = view.node(&w.id).unwrap().unwrap();
    assert_eq!(got.status, NodeStatus::Ready);
    assert_eq!(got.addr, "10.0.0.1:5");
    let renewal = |node: &NodeId, serial: &str| Command::RecordCert {
        node: node.clone(),
        serial: serial.into(),
        not_after: 9,
        role: Role::Worker,
        at: 1,
    };
    apply(&view, &renewal(&w.id, "ff")).unwrap();
    assert_eq!(view.node(&w.id).unwrap().unwrap().cert_serial, "ff");
    assert!(apply(&view, &renewal(&NodeId::random(), "1")).is_err());
    assert!(view.node_certs(&w.id).unwrap().is_empty(), "a worker's renewals grow no state");
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

#[test]
fn demotion_refuses_every_manager_certificate_and_removal_every_certificate() {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let view = StateView::new(db.open_tree("sm").unwrap());
    let first = node(Role::Manager);
    apply(&view, &Command::InitCluster { cluster: Box::new(sample_cluster()), manager: first }).unwrap();
    let mut m = node(Role::Manager);
    m.cert_serial = "a1".into();
    m.cert_not_after = 100;
    apply(&view, &Command::AddNode(m.clone())).unwrap();
    let renewal = |serial: &str, not_after, role, at| Command::RecordCert {
        node: m.id.clone(),
        serial: serial.into(),
        not_after,
        role,
        at,
    };
    apply(&view, &renewal("a2", 200, Role::Manager, 50)).unwrap();
    apply(&view, &renewal("a3", 300, Role::Manager, 150)).unwrap();
    let held: Vec<String> = view.node_certs(&m.id).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(held, ["a2", "a3"], "certificates expired before the renewal are forgotten");
    assert!(view.denied().unwrap().serials.is_empty());

    apply(&view, &Command::SetRole { node: m.id.clone(), role: Role::Worker }).unwrap();
    let denied = view.denied().unwrap();
    assert_eq!(denied.serials, ["a2".to_string(), "a3".to_string()].into_iter().collect());
    assert!(denied.nodes.is_empty(), "a demoted node is still a member");
    // A manager certificate that raced the demotion is refused from the start.
    apply(&view, &renewal("a4", 400, Role::Manager, 160)).unwrap();
    assert!(view.denied().unwrap().serials.contains("a4"));
    // Its worker certificate is not.
    apply(&view, &renewal("b1", 400, Role::Worker, 160)).unwrap();
    assert!(!view.denied().unwrap().serials.contains("b1"));

    apply(&view, &Command::RemoveNodes { nodes: vec![m.id.clone()], deny_until: 500 }).unwrap();
    assert!(view.denied().unwrap().nodes.contains(&m.id));
    assert!(view.node_certs(&m.id).unwrap().is_empty());
}

#[test]
fn admin_certificates_are_recorded_revoked_and_pruned() {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let view = StateView::new(db.open_tree("sm").unwrap());
    apply(&view, &Command::InitCluster { cluster: Box::new(sample_cluster()), manager: node(Role::Manager) }).unwrap();
    let rec = |serial: &str, issued_at, not_after| AdminCertRecord {
        serial: serial.into(),
        id: NodeId::random(),
        issued_at,
        not_after,
        revoked_at: None,
    };
    apply(&view, &Command::RecordAdminCert(rec("0a", 10, 100))).unwrap();
    assert!(apply(&view, &Command::RecordAdminCert(rec("0a", 11, 100))).is_err(), "a serial is recorded once");
    assert!(apply(&view, &Command::RecordAdminCert(rec("NOT-HEX", 11, 100))).is_err());
    let err = apply(&view, &Command::RevokeAdminCert { serial: "0b".into(), at: 20 }).unwrap_err();
    assert!(err.contains("no admin certificate"), "{err}");
    apply(&view, &Command::RevokeAdminCert { serial: "0a".into(), at: 20 }).unwrap();
    assert_eq!(view.admin_cert("0a").unwrap().unwrap().revoked_at, Some(20));
    assert!(view.denied().unwrap().serials.contains("0a"));
    // Issuing after it expired forgets it and its denial.
    apply(&view, &Command::RecordAdminCert(rec("0c", 200, 300))).unwrap();
    assert!(view.admin_cert("0a").unwrap().is_none());
    assert!(!view.denied().unwrap().serials.contains("0a"));
    assert_eq!(view.admin_certs().unwrap().len(), 1);
}
