//! Unit tests of the state machine's commands, one file per record family,
//! and the helpers they (and the scheduler's tests) share.
//!
//! Every command is applied through [`apply`]; every refusal through
//! [`refused`], which also proves that a refused command changes nothing.

use std::collections::BTreeMap;

use swarmd_certs::{ClusterId, NodeId, Role, SecretId, ServiceId, TaskId};

use super::*;
use crate::keys::Sealed;

mod ca_rotation;
mod certs;
mod cluster;
mod format;
mod images;
mod labels;
mod nodes;
mod secrets;
mod services;
mod tasks;
mod trust;
mod workload;

/// A fresh, empty state (the database lives as long as the view).
pub(crate) fn empty() -> StateView {
    let db = sled::Config::new().temporary(true).open().unwrap();
    StateView::new(db.open_tree("sm").unwrap())
}

/// A state holding a cluster and its first manager.
pub(crate) fn initialised() -> (StateView, NodeRecord) {
    let view = empty();
    let m = node(Role::Manager);
    apply(&view, &Command::InitCluster { cluster: Box::new(sample_cluster()), manager: m.clone() }).unwrap();
    // The services of these tests run a directory ([`spec`]).
    apply(&view, &Command::SetHostRootfs { allowed: true }).unwrap();
    (view, m)
}

/// A deterministic value sealed under data key `key_id`, `n` bytes of
/// plaintext (apply never opens it).
pub(crate) fn sealed(key_id: u32, n: u8) -> Sealed {
    let raw = bincode::serialize(&(key_id, [n; 24], vec![n; 16 + n as usize])).unwrap();
    bincode::deserialize(&raw).unwrap()
}

/// A cluster record whose sealed values are under data key 1, the active one.
pub(crate) fn sample_cluster() -> ClusterRecord {
    ClusterRecord {
        id: ClusterId::random(),
        ca_cert_pem: "pem".into(),
        ca_key: sealed(1, 1),
        worker_token: sealed(1, 2),
        manager_token: sealed(1, 3),
        cert_validity_secs: 86400,
        heartbeat_ms: 5000,
        created_at: 0,
        data_key_id: 1,
        data_key_check: None,
        retired_below: 0,
        unlock_key: None,
    }
}

/// A new node record with a random ID.
pub(crate) fn node(role: Role) -> NodeRecord {
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

/// Plans `cmd` and writes what it plans, or returns its rejection.
pub(crate) fn apply(view: &StateView, cmd: &Command) -> Result<(), Rejection> {
    let b = plan(view, cmd).unwrap()?;
    view.tree.apply_batch(b.into_sled()).unwrap();
    Ok(())
}

/// Applies `cmd`, which must be refused without any change to the state;
/// its rejection.
pub(crate) fn refused(view: &StateView, cmd: &Command) -> Rejection {
    let before = view.digest().unwrap();
    let why = apply(view, cmd).expect_err("the command was applied");
    assert_eq!(view.digest().unwrap(), before, "{why:?}: the refused command changed the state");
    why
}

/// A valid spec without secrets or constraints, one replica.
pub(crate) fn spec() -> ServiceSpec {
    ServiceSpec {
        image: "/srv/rootfs".into(),
        args: vec!["true".into()],
        env: vec!["A=1".into()],
        user: None,
        secrets: vec![],
        replicas: 1,
        constraints: vec![],
        memory: None,
        pids: None,
        network: Network::None,
        userns: Userns::Private,
    }
}

/// A new service record named `name` with `replicas` of [`spec`].
pub(crate) fn service(name: &str, replicas: u32) -> ServiceRecord {
    let mut spec = spec();
    spec.replicas = replicas;
    ServiceRecord { id: ServiceId::random(), name: name.into(), spec, version: 1, created_at: 1, updated_at: 1 }
}

/// A new task of `svc` in `slot` on `node`, assigned.
pub(crate) fn task(svc: &ServiceRecord, slot: u32, node: &NodeId) -> TaskRecord {
    TaskRecord {
        id: TaskId::random(),
        service: svc.id.clone(),
        slot,
        node: node.clone(),
        spec_version: svc.version,
        spec: svc.spec.clone(),
        desired_running: true,
        state: TaskState::Assigned,
        message: String::new(),
        created_at: 1,
        updated_at: 1,
    }
}
