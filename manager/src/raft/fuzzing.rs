//! Raft storage entry points for the fuzz targets in `fuzz/` (feature
//! `fuzzing`, off by default: nothing here is part of the manager's API).
//!
//! The log's segment files and the state machine are crate-private; these
//! wrappers let a fuzz target write segments, recover them, and apply commands
//! to a fresh state machine exactly as raft would, without a running node.

use std::io;
use std::ops::Bound::Unbounded;
use std::path::Path;

use openraft::storage::RaftStateMachine;
use openraft::Entry;

use super::state_machine::StateMachine;
use super::wal::Wal;
use super::TypeConfig;
use crate::state::CommandResult;

/// Appends `batches` to the log in `dir` (each batch one `append`), after
/// truncating from `truncate_at` and purging up to `purge_to` if given, with
/// segments of `segment_bytes`.
pub fn wal_write(
    dir: &Path,
    segment_bytes: u64,
    batches: Vec<Vec<Entry<TypeConfig>>>,
    truncate_at: Option<u64>,
    purge_to: Option<u64>,
) -> io::Result<()> {
    let mut wal = Wal::open_with(dir, segment_bytes, purge_to)?;
    if let Some(index) = truncate_at {
        wal.truncate(index)?;
    }
    if let Some(index) = purge_to {
        wal.purge(index)?;
    }
    for b in batches {
        wal.append(b)?;
    }
    Ok(())
}

/// Opens the log in `dir` as a restarting manager would (with `purged`, the
/// index of the last purged entry) and reads back every entry it recovered,
/// in order.
pub fn wal_recover(dir: &Path, purged: Option<u64>) -> io::Result<Vec<Entry<TypeConfig>>> {
    let wal = Wal::open(dir, purged)?;
    let entries = wal.read((Unbounded, Unbounded))?;
    if wal.last().map(|l| l.index) != entries.last().map(|e| e.log_id.index) {
        return Err(io::Error::other("the last log ID disagrees with the entries read back"));
    }
    Ok(entries)
}

/// A state machine on its own temporary sled database.
pub struct FuzzStateMachine {
    sm: StateMachine,
    _dir: tempfile::TempDir,
}

impl FuzzStateMachine {
    /// A fresh, empty state machine in a new temporary directory.
    pub fn new() -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let db = sled::Config::new().path(dir.path()).temporary(true).open().map_err(io::Error::other)?;
        let sm = StateMachine::open(&db, dir.path()).map_err(io::Error::other)?;
        Ok(Self { sm, _dir: dir })
    }

    /// Applies `entries` in one call, as raft does when several are committed together.
    pub fn apply(&mut self, entries: Vec<Entry<TypeConfig>>) -> Result<Vec<CommandResult>, String> {
        futures::executor::block_on(self.sm.apply(entries)).map_err(|e| e.to_string())
    }

    /// Read access to the applied state.
    pub fn view(&self) -> crate::state::StateView {
        self.sm.view()
    }

    /// [`crate::state::StateView::digest`] of the applied state.
    pub fn digest(&self) -> Result<String, String> {
        self.sm.view().digest().map_err(|e| e.to_string())
    }
}

/// A deterministic ID of kind `T` numbered `n` (fuzz inputs must replay alike).
fn id<T: std::str::FromStr>(n: u32) -> T
where
    T::Err: std::fmt::Debug,
{
    format!("{n:025}").parse().expect("25 digits make an ID")
}

/// A deterministic sealed value (its bytes need not decrypt: apply never opens them).
fn sealed(key_id: u32, n: u8) -> crate::keys::Sealed {
    let raw = bincode::serialize(&(key_id, [n; 24], vec![n; 16 + n as usize])).expect("encode");
    bincode::deserialize(&raw).expect("decode a sealed value")
}

/// The commands a real cluster's life proposes, in a valid order and with
/// deterministic IDs, values and times: the material the `apply` fuzz target
/// picks, repeats, reorders and mutates (a fuzzer rarely builds a valid
/// `InitCluster` from nothing).
pub fn sample_commands() -> Vec<crate::state::Command> {
    use std::collections::BTreeMap;

    use swarmd_certs::Role;

    use crate::services::{
        Constraint, ConstraintKey, Network, SecretRef, ServiceRecord, ServiceSpec, TaskRecord, TaskState, TaskUpdate,
    };
    use crate::state::{
        AdminCertRecord, Availability, ClusterField, ClusterRecord, Command, NodeRecord, NodeStatus, ResealField,
        ResealSecret, StatusChange,
    };

    let node = |n: u32, role: Role| NodeRecord {
        id: id(n),
        role,
        status: NodeStatus::Unknown,
        addr: format!("127.0.0.1:{}", 4000 + n),
        hostname: format!("host{n}"),
        cert_serial: format!("{n:02x}"),
        cert_not_after: 1_000_000 + n as i64,
        created_at: 100,
        raft_id: (role == Role::Manager).then_some(n as u64),
        labels: BTreeMap::new(),
        availability: Availability::Active,
        session_manager: None,
    };
    let cluster = ClusterRecord {
        id: id(9),
        ca_cert_pem: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
        ca_key: sealed(1, 1),
        worker_token: sealed(1, 2),
        manager_token: sealed(1, 3),
        cert_validity_secs: 86400,
        heartbeat_ms: 5000,
        created_at: 100,
        data_key_id: 1,
        data_key_check: None,
        retired_below: 0,
        unlock_key: None,
    };
    let spec = ServiceSpec {
        image: "/srv/rootfs".into(),
        args: vec!["/bin/sh".into(), "-c".into(), "sleep 1".into()],
        env: vec!["A=1".into()],
        user: None,
        secrets: vec![SecretRef {
            secret: id(20),
            name: "db-pass".into(),
            target: "db-pass".into(),
            uid: 0,
            gid: 0,
            mode: 0o444,
            pin: None,
        }],
        replicas: 2,
        userns: Default::default(),
        constraints: vec![Constraint { key: ConstraintKey::Role, equal: true, value: "worker".into() }],
        memory: Some(64 << 20),
        pids: Some(64),
        network: Network::None,
    };
    let task = |n: u32, slot: u32, node: u32| TaskRecord {
        id: id(n),
        service: id(30),
        slot,
        node: id(node),
        spec_version: 1,
        spec: spec.clone(),
        desired_running: true,
        state: TaskState::Assigned,
        message: String::new(),
        created_at: 200,
        updated_at: 200,
    };
    let (m, w1, w2) = (1, 2, 3);
    vec![
        Command::InitCluster { cluster: Box::new(cluster), manager: node(m, Role::Manager) },
        Command::AddNode(node(w1, Role::Worker)),
        Command::AddNode(node(w2, Role::Worker)),
        Command::SetStatus(vec![
            StatusChange { node: id(w1), status: NodeStatus::Ready, addr: Some("10.0.0.2:1".into()), reporter: id(m) },
            StatusChange { node: id(w2), status: NodeStatus::Ready, addr: None, reporter: id(m) },
        ]),
        Command::RecordCert { node: id(w1), serial: "aa".into(), not_after: 2_000_000, role: Role::Worker, at: 150 },
        Command::CreateSecret {
            id: id(20),
            name: "db-pass".into(),
            labels: BTreeMap::from([("env".into(), "prod".into())]),
            created_at: 160,
            data: sealed(1, 4),
        },
        Command::AddSecretVersion { id: id(20), version: 2, created_at: 170, data: sealed(1, 5) },
        Command::SetHostRootfs { allowed: true },
        Command::CreateService(Box::new(ServiceRecord {
            id: id(30),
            name: "web".into(),
            spec: spec.clone(),
            version: 1,
            created_at: 180,
            updated_at: 180,
        })),
        Command::Schedule { create: vec![task(40, 1, w1), task(41, 2, w2)], stop: vec![], delete: vec![] },
        Command::TaskStatus {
            node: id(w1),
            updates: vec![TaskUpdate { task: id(40), state: TaskState::Running, message: "started".into() }],
            at: 210,
        },
        Command::UpdateNode {
            node: id(w2),
            availability: Some(Availability::Drain),
            labels_add: vec![("zone".into(), "a".into())],
            labels_rm: vec![],
        },
        Command::UpdateService { id: id(30), spec: Box::new(spec.clone()), expected_version: 1, at: 220 },
        Command::RotateJoinToken { role: Role::Worker, token: sealed(1, 6) },
        Command::AddDataKey { key_id: 2, check: sealed(2, 7) },
        Command::Reseal {
            cluster: vec![ResealField { field: ClusterField::CaKey, old: sealed(1, 1), new: sealed(2, 8) }],
            secrets: vec![ResealSecret { id: id(20), version: 2, old: sealed(1, 5), new: sealed(2, 9) }],
        },
        Command::RetireDataKeys { below: 2 },
        Command::SetAutolock { unlock_key: Some(sealed(2, 10)) },
        Command::SetIdentityTtl { secs: 600 },
        Command::RecordAdminCert(AdminCertRecord {
            serial: "bb".into(),
            id: id(50),
            issued_at: 230,
            not_after: 3_000_000,
            revoked_at: None,
        }),
        Command::RevokeAdminCert { serial: "bb".into(), at: 240 },
        Command::SetRole { node: id(w1), role: Role::Manager },
        Command::SetRaftMember { node: id(w1), raft_id: 7, addr: "127.0.0.1:4242".into() },
        Command::SetRole { node: id(w1), role: Role::Worker },
        Command::Schedule { create: vec![], stop: vec![id(41)], delete: vec![id(40)] },
        Command::RemoveService { id: id(30) },
        Command::RemoveSecret { id: id(20) },
        Command::RemoveNodes { nodes: vec![id(w2)], deny_until: 2_000_000 },
        Command::Batch(vec![
            Command::AddNode(node(4, Role::Worker)),
            Command::RemoveNodes { nodes: vec![id(4)], deny_until: 5 },
        ]),
    ]
}

/// A sealed value under data key `key_id` (see [`sample_commands`]).
pub fn sample_sealed(key_id: u32, n: u8) -> crate::keys::Sealed {
    sealed(key_id, n)
}

/// Whether the state machine would accept `cmd` against `view` (planned, not
/// written): `Err` with the refusal.
pub fn plan_accepts(view: &crate::state::StateView, cmd: &crate::state::Command) -> Result<(), String> {
    match crate::state::plan(view, cmd) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(why)) => Err(why.to_string()),
        Err(e) => Err(format!("storage: {e}")),
    }
}
