//! The node commands.

use super::*;

fn ready(node: &NodeId, reporter: &NodeId) -> StatusChange {
    StatusChange {
        node: node.clone(),
        status: NodeStatus::Ready,
        addr: Some("10.0.0.1:5".into()),
        reporter: reporter.clone(),
    }
}

#[test]
fn nodes_are_added_once_and_renewals_update_their_record() {
    let (view, _) = initialised();
    let w = node(Role::Worker);
    apply(&view, &Command::AddNode(w.clone())).unwrap();
    assert_eq!(refused(&view, &Command::AddNode(w.clone())), Rejection::NodeExists { node: w.id.clone() });
    let renewal = |node: &NodeId| Command::RecordCert {
        node: node.clone(),
        serial: "ff".into(),
        not_after: 9,
        role: Role::Worker,
        at: 1,
    };
    apply(&view, &renewal(&w.id)).unwrap();
    let got = view.node(&w.id).unwrap().unwrap();
    assert_eq!((got.cert_serial.as_str(), got.cert_not_after), ("ff", 9));
    let stranger = NodeId::random();
    assert_eq!(refused(&view, &renewal(&stranger)), Rejection::NotFound(Missing::Node(stranger)));
    assert!(view.node_certs(&w.id).unwrap().is_empty(), "a worker's renewals grow no state");
}

#[test]
fn liveness_follows_the_manager_holding_the_session_and_skips_removed_nodes() {
    let (view, m) = initialised();
    let w = node(Role::Worker);
    apply(&view, &Command::AddNode(w.clone())).unwrap();
    apply(&view, &Command::SetStatus(vec![ready(&w.id, &m.id)])).unwrap();
    let got = view.node(&w.id).unwrap().unwrap();
    assert_eq!(
        (got.status, got.addr.as_str(), got.session_manager),
        (NodeStatus::Ready, "10.0.0.1:5", Some(m.id.clone()))
    );
    // Another manager, which the node has left, cannot mark it down.
    let other = NodeId::random();
    let down = |reporter: &NodeId| {
        Command::SetStatus(vec![StatusChange {
            node: w.id.clone(),
            status: NodeStatus::Down,
            addr: None,
            reporter: reporter.clone(),
        }])
    };
    apply(&view, &down(&other)).unwrap();
    assert_eq!(view.node(&w.id).unwrap().unwrap().status, NodeStatus::Ready);
    apply(&view, &down(&m.id)).unwrap();
    assert_eq!(view.node(&w.id).unwrap().unwrap().status, NodeStatus::Down);
    // A node removed meanwhile is skipped, not an error.
    let before = view.digest().unwrap();
    apply(&view, &Command::SetStatus(vec![ready(&NodeId::random(), &m.id)])).unwrap();
    assert_eq!(view.digest().unwrap(), before);
}

#[test]
fn removal_denies_the_node_and_forgets_its_record() {
    let (view, _) = initialised();
    let w = node(Role::Worker);
    apply(&view, &Command::AddNode(w.clone())).unwrap();
    apply(&view, &Command::RemoveNodes { nodes: vec![w.id.clone()], deny_until: 77 }).unwrap();
    assert!(view.node(&w.id).unwrap().is_none());
    assert!(view.denied().unwrap().nodes.contains(&w.id));
    assert_eq!(view.get::<i64>(&deny_key(&w.id)).unwrap(), Some(77));
}

#[test]
fn role_and_raft_membership_changes_are_checked() {
    let (view, m) = initialised();
    let w = node(Role::Worker);
    apply(&view, &Command::AddNode(w.clone())).unwrap();
    let stranger = NodeId::random();
    for cmd in [
        Command::SetRole { node: stranger.clone(), role: Role::Manager },
        Command::SetRaftMember { node: stranger.clone(), raft_id: 9, addr: "x:1".into() },
        Command::UpdateNode { node: stranger.clone(), availability: None, labels_add: vec![], labels_rm: vec![] },
    ] {
        assert_eq!(refused(&view, &cmd), Rejection::NotFound(Missing::Node(stranger.clone())), "{cmd:?}");
    }
    let admin = Command::SetRole { node: w.id.clone(), role: Role::Admin };
    assert_eq!(refused(&view, &admin), Rejection::Invalid("admin is not a node role".into()));
    let member =
        |node: &NodeRecord, raft_id| Command::SetRaftMember { node: node.id.clone(), raft_id, addr: "x:1".into() };
    assert_eq!(refused(&view, &member(&w, 8)), Rejection::NotAManager { node: w.id.clone() });
    apply(&view, &member(&m, 7)).unwrap();
    apply(&view, &Command::SetRole { node: w.id.clone(), role: Role::Manager }).unwrap();
    assert_eq!(refused(&view, &member(&w, 7)), Rejection::RaftIdInUse { raft_id: 7, holder: m.id.clone() });
    apply(&view, &member(&w, 8)).unwrap();
    assert_eq!(view.node(&w.id).unwrap().unwrap().raft_id, Some(8));
}

#[test]
fn the_manager_index_follows_role_membership_and_removal() {
    let (view, m) = initialised();
    let w = node(Role::Worker);
    apply(&view, &Command::AddNode(w.clone())).unwrap();
    assert_eq!(view.managers().unwrap().iter().map(|e| e.id.clone()).collect::<Vec<_>>(), vec![m.id.clone()]);
    assert!(view.manager_addrs().unwrap().is_empty(), "no raft member yet");
    apply(&view, &Command::SetRaftMember { node: m.id.clone(), raft_id: 7, addr: "10.0.0.9:1".into() }).unwrap();
    assert_eq!(view.manager_addrs().unwrap(), vec!["10.0.0.9:1".to_string()]);
    apply(&view, &Command::SetRole { node: w.id.clone(), role: Role::Manager }).unwrap();
    apply(&view, &Command::SetRaftMember { node: w.id.clone(), raft_id: 8, addr: "10.0.0.8:1".into() }).unwrap();
    assert_eq!(view.manager_addrs().unwrap(), vec!["10.0.0.8:1".to_string(), "10.0.0.9:1".to_string()]);
    apply(&view, &Command::SetRole { node: w.id.clone(), role: Role::Worker }).unwrap();
    assert_eq!(view.manager_addrs().unwrap(), vec!["10.0.0.9:1".to_string()]);
    assert_eq!(view.node(&w.id).unwrap().unwrap().raft_id, None, "a worker has no raft ID");
    apply(&view, &Command::SetRole { node: w.id.clone(), role: Role::Manager }).unwrap();
    apply(&view, &Command::RemoveNodes { nodes: vec![w.id.clone()], deny_until: 0 }).unwrap();
    assert_eq!(view.managers().unwrap().len(), 1, "a removed manager leaves the index");
}

#[test]
fn operators_drain_and_label_nodes_within_the_label_rules() {
    let (view, _) = initialised();
    let mut w = node(Role::Worker);
    w.labels.insert("zone".into(), "eu".into());
    apply(&view, &Command::AddNode(w.clone())).unwrap();
    let update = |add: Vec<(String, String)>, rm: Vec<String>| Command::UpdateNode {
        node: w.id.clone(),
        availability: Some(Availability::Drain),
        labels_add: add,
        labels_rm: rm,
    };
    apply(&view, &update(vec![("disk".into(), "ssd".into())], vec!["zone".into()])).unwrap();
    let got = view.node(&w.id).unwrap().unwrap();
    assert_eq!(got.availability, Availability::Drain);
    assert_eq!(got.labels, BTreeMap::from([("disk".to_string(), "ssd".to_string())]));
    match refused(&view, &update(vec![("-bad".into(), "x".into())], vec![])) {
        Rejection::Invalid(why) => assert!(why.starts_with("invalid label key \"-bad\""), "{why}"),
        other => panic!("{other:?}"),
    }
    let many = (0..MAX_NODE_LABELS).map(|i| (format!("k{i}"), "v".to_string())).collect();
    assert_eq!(refused(&view, &update(many, vec![])), Rejection::Invalid("a node may carry at most 256 labels".into()));
}
