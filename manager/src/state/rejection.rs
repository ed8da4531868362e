//! Why the state machine refused a command: one typed variant per reason a
//! caller branches on, carrying what it needs (the conflicting name, the
//! version that is next, …), and [`Rejection::Invalid`] for plain validation
//! messages that callers only show.
//!
//! A rejection travels as part of [`super::CommandResult`]: bincode'd from the
//! leader to a follower that forwarded the write, so every manager sees the
//! same variant. Its `Display` is the message users see (through the control
//! API's FAILED_PRECONDITION status); it never names a command-line flag or
//! verb — the control API adds those hints (see [`crate::store`]).

use serde::{Deserialize, Serialize};
use swarmd_certs::{NodeId, SecretId, ServiceId};

use super::services::SpecError;

/// The kind of object a name or ID belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectKind {
    /// A secret.
    Secret,
    /// A service.
    Service,
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ObjectKind::Secret => "secret",
            ObjectKind::Service => "service",
        })
    }
}

/// What a command referred to that is not there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Missing {
    /// A node.
    #[error("node {0} does not exist")]
    Node(NodeId),
    /// A secret, by ID.
    #[error("secret {0} does not exist")]
    Secret(SecretId),
    /// A secret a service spec references.
    #[error("secret {name} ({id}) does not exist")]
    SecretRef { name: String, id: SecretId },
    /// A pinned version of a secret (only the newest ones are kept).
    #[error("secret {name} has no version {version} (kept: the ten newest)")]
    SecretVersion { name: String, version: u32 },
    /// A service.
    #[error("service {0} does not exist")]
    Service(ServiceId),
    /// An admin certificate, by serial.
    #[error("no admin certificate with serial {serial}")]
    AdminCert { serial: String },
}

/// Why a command was refused; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// A plain validation failure (bad name, label, size or spec): the text
    /// says what is wrong; there is nothing to branch on.
    #[error("{0}")]
    Invalid(String),
    /// `InitCluster` on a store that holds a cluster.
    #[error("cluster is already initialised")]
    AlreadyInitialised,
    /// A command that needs the cluster record, before `InitCluster`.
    #[error("cluster is not initialised")]
    NotInitialised,
    /// What the command names does not exist.
    #[error(transparent)]
    NotFound(Missing),
    /// `AddNode` for a node that is a member already.
    #[error("node {node} already exists")]
    NodeExists { node: NodeId },
    /// A raft role change for a node that is not a manager.
    #[error("node {node} is not a manager")]
    NotAManager { node: NodeId },
    /// Another manager holds this raft ID.
    #[error("raft ID {raft_id} is already used by {holder}")]
    RaftIdInUse { raft_id: u64, holder: NodeId },
    /// The value was sealed under a data key that is no longer the active
    /// one: the writer re-seals under the new key and retries.
    #[error("the value was sealed under a data key that is no longer active")]
    StaleDataKey,
    /// A data key that is not the active one plus one.
    #[error("data key {key_id} cannot follow data key {active} (another rotation ran meanwhile?)")]
    DataKeyOutOfOrder { key_id: u32, active: u32 },
    /// Retiring keys up to (and including) the active one.
    #[error("data key {active} is active: keys below {below} cannot all retire")]
    RetiresActiveKey { active: u32, below: u32 },
    /// A field of the cluster record is still sealed under a key to retire.
    #[error("the {field} is still sealed under an older data key")]
    FieldUnderOldKey { field: String },
    /// Secret versions are still sealed under a key to retire.
    #[error("{versions} secret versions are still sealed under an older data key")]
    SecretsUnderOldKey { versions: usize },
    /// The name belongs to another object of the kind.
    #[error("{kind} name {name:?} is already in use by {kind} {holder}")]
    NameInUse { kind: ObjectKind, name: String, holder: String },
    /// The ID belongs to another object of the kind.
    #[error("{kind} ID {id} is already in use")]
    IdInUse { kind: ObjectKind, id: String },
    /// A secret version that is not the next one: another update won.
    #[error("secret {name} was updated meanwhile: version {next} is next, not {proposed}")]
    SecretUpdatedMeanwhile { name: String, next: u32, proposed: u32 },
    /// A service update against a version that is no longer current.
    #[error("service {name} was updated meanwhile; try again")]
    ServiceUpdatedMeanwhile { name: String },
    /// Removing a secret that services still reference.
    #[error("secret {name} is in use by service(s) {}", services.join(", "))]
    SecretInUse { name: String, services: Vec<String> },
    /// An admin certificate serial recorded twice.
    #[error("an admin certificate with serial {serial} is already recorded")]
    AdminCertExists { serial: String },
    /// A serial that is not 1–64 lowercase hex digits.
    #[error("invalid certificate serial {serial:?}")]
    InvalidSerial { serial: String },
    /// A service spec breaks its own rules.
    #[error(transparent)]
    InvalidSpec(SpecError),
    /// A `Batch` inside a `Batch`.
    #[error("a batch of commands cannot be nested")]
    NestedBatch,
    /// A data key rotation while a root CA rotation runs (the new root's key
    /// is sealed under the active data key until the rotation ends).
    #[error("a root CA rotation is in progress: rotate the data key once it has finished (secretctl ca show)")]
    CaRotationRunning,
    /// A command for a root CA rotation that is no longer the current one.
    #[error("that root CA rotation was superseded or has finished")]
    CaRotationSuperseded,
    /// Removing an image that services still run.
    #[error("image {image} is in use by service(s) {}", services.join(", "))]
    ImageInUse { image: String, services: Vec<String> },
}

impl From<Missing> for Rejection {
    fn from(m: Missing) -> Self {
        Rejection::NotFound(m)
    }
}
