//! The commands that change the replicated state, their results, and the
//! format they are stored in.
//!
//! A [`Command`] is the application data of every raft entry: bincode'd into
//! the log (`raft/wal`), into raft messages and into forwarded writes. Its
//! encoding is versioned so that later versions can change the enum and still
//! read the log that earlier ones wrote:
//!
//! * version 1 (this one): `[u32 ENVELOPE_TAG][u32 version][command]`, the
//!   command in serde's derived bincode layout of [`Command`];
//! * version 0 (before the envelope): the bare derived layout, whose first
//!   four bytes are the variant index, always below [`ENVELOPE_TAG`].
//!
//! Decoding accepts both. A version that changes the enum keeps the old one
//! (renamed) to decode older versions with, and converts. Commands nested in a
//! [`Command::Batch`] carry their own envelope. The encoding is for bincode
//! only: it relies on enum variants being written as their u32 index.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, EnumAccess, SeqAccess, VariantAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use swarmd_certs::{NodeId, Role, SecretId, ServiceId, TaskId};

use super::trust::{SignatureRecord, TrustKeyRecord};
use super::{
    AdminCertRecord, Availability, CaRotation, ClusterRecord, ExternalCaRecord, ImageRecord, NodeRecord, Rejection,
    ResealField, ResealSecret, ServiceRecord, ServiceSpec, StatusChange, TaskRecord, TaskUpdate,
};
use crate::keys::Sealed;

/// A change to the replicated state: one raft log entry.
//
// `remote = "Self"` makes the derives generate inherent `Command::serialize`
// and `Command::deserialize` (the version 0 and 1 layout) instead of the
// trait impls, which wrap them in the envelope below.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub enum Command {
    /// Creates the cluster and its first manager. Only valid on an empty store.
    InitCluster { cluster: Box<ClusterRecord>, manager: NodeRecord },
    /// Adds a node that has just been issued its first certificate.
    AddNode(NodeRecord),
    /// Records a renewed certificate, issued at `at` for `role`.
    RecordCert { node: NodeId, serial: String, not_after: i64, role: Role, at: i64 },
    /// Liveness transitions, batched.
    SetStatus(Vec<StatusChange>),
    /// Replaces a join token.
    RotateJoinToken { role: Role, token: Sealed },
    /// Records a manager's raft ID and address as it joins raft.
    SetRaftMember { node: NodeId, raft_id: u64, addr: String },
    /// Removes nodes and refuses their certificates until `deny_until` (unix
    /// seconds, the expiry of their last certificate).
    RemoveNodes { nodes: Vec<NodeId>, deny_until: i64 },
    /// Changes a node's role (promotion or demotion); a worker has no raft ID.
    /// A demotion refuses every manager certificate the node holds, at once.
    SetRole { node: NodeId, role: Role },
    /// Operator changes to a node.
    UpdateNode {
        node: NodeId,
        availability: Option<Availability>,
        labels_add: Vec<(String, String)>,
        labels_rm: Vec<String>,
    },
    /// Creates a secret with its first version (sealed under the active data key).
    CreateSecret { id: SecretId, name: String, labels: BTreeMap<String, String>, created_at: i64, data: Sealed },
    /// Adds version `version` (the current one plus one) to a secret.
    AddSecretVersion { id: SecretId, version: u32, created_at: i64, data: Sealed },
    /// Deletes a secret, every version of it.
    RemoveSecret { id: SecretId },
    /// Makes data key `key_id` (the active one plus one) active; the key itself
    /// travels between managers over mTLS, never through the log.
    AddDataKey { key_id: u32, check: Sealed },
    /// Replaces sealed values with the same values sealed under the active key.
    /// Each item names the value it replaces (by nonce), and is skipped if that
    /// value changed or went away meanwhile.
    Reseal { cluster: Vec<ResealField>, secrets: Vec<ResealSecret> },
    /// Retires every data key below `below` (refused while anything is still
    /// sealed under one of them).
    RetireDataKeys { below: u32 },
    /// Turns autolock on (or rotates its key) with `Some`, off with `None`.
    SetAutolock { unlock_key: Option<Sealed> },
    /// Creates a service.
    CreateService(Box<ServiceRecord>),
    /// Replaces a service's spec if it is still at `expected_version`.
    UpdateService { id: ServiceId, spec: Box<ServiceSpec>, expected_version: u64, at: i64 },
    /// Deletes a service; its tasks are told to stop.
    RemoveService { id: ServiceId },
    /// The scheduler's decisions: tasks to create, to stop, and to forget.
    Schedule { create: Vec<TaskRecord>, stop: Vec<TaskId>, delete: Vec<TaskId> },
    /// Task states reported by the node running them.
    TaskStatus { node: NodeId, updates: Vec<TaskUpdate>, at: i64 },
    /// Records an admin certificate as it is issued.
    RecordAdminCert(AdminCertRecord),
    /// Revokes an admin certificate: its serial is refused cluster-wide.
    RevokeAdminCert { serial: String, at: i64 },
    /// Commands proposed concurrently, applied in order as one entry (group
    /// commit); each has its own result. Never nested.
    Batch(Vec<Command>),
    /// Starts a root CA rotation, or starts one over toward a newer root.
    StartCaRotation(Box<CaRotation>),
    /// The nodes the leader asks to renew now, for rotation `id`.
    CaRotationBatch { id: u64, nodes: Vec<NodeId>, at: i64 },
    /// `node` holds a certificate signed by rotation `id`'s root.
    CaConverged { node: NodeId, id: u64 },
    /// Ends rotation `id`: its root becomes the cluster's, with new join tokens.
    FinishCaRotation { id: u64, worker_token: Sealed, manager_token: Sealed, at: i64 },
    /// How long after expiry a node may recover its certificate (0: never).
    SetCertRecoveryWindow { secs: u64 },
    /// What the cluster CA appends to every certificate it signs: itself and
    /// the chain to an organisation's root (set once, at init).
    SetCaChain { chain_pem: String },
    /// Sets the lifetime of tasks' workload identities (seconds, within
    /// `IdentityTtl`'s bounds).
    SetIdentityTtl { secs: u64 },
    /// The external signer that holds the cluster CA's key (set once, at init).
    SetExternalCa(Box<ExternalCaRecord>),
    /// Another URL, TLS roots or auth key (sealed, in the cluster record's CA
    /// key field) for the external signer of a cluster that has one.
    UpdateExternalCa { record: Box<ExternalCaRecord>, auth_key: Sealed },
    /// Records an image whose blobs a majority of the managers hold (its
    /// `holders`), and points `name` at it.
    PutImage { image: Box<ImageRecord>, name: Option<String> },
    /// Manager `node` now holds every blob of image `digest`.
    ImageHeld { digest: String, node: NodeId },
    /// Forgets image `digest` and its names (refused while a service uses it).
    RemoveImage { digest: String },
    /// Whether a service's image may be a root filesystem directory on the
    /// workers (a development setting, off by default).
    SetHostRootfs { allowed: bool },
    /// Trusts a key to sign images.
    AddTrustKey(Box<TrustKeyRecord>),
    /// Stops trusting a key.
    RemoveTrustKey { name: String },
    /// Keeps a signature of image `digest`.
    AddImageSignature { digest: String, signature: Box<SignatureRecord> },
    /// Whether only signed images run.
    SetContentTrust { required: bool },
}

/// The outcome of applying one command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Applied.
    Ok,
    /// Refused; nothing changed.
    Rejected(Rejection),
    /// The results of a [`Command::Batch`], in its order.
    Batch(Vec<CommandResult>),
}

/// The format version commands are written in.
pub const FORMAT_VERSION: u32 = 1;
/// The first four bytes of an enveloped command: a variant index no version
/// 0 command has (there are 24).
pub const ENVELOPE_TAG: u32 = u32::MAX;

/// The derived layout of a command, as the trait impls read and write it.
struct Layout<'a>(&'a Command);

impl Serialize for Layout<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Command::serialize(self.0, s)
    }
}

impl Serialize for Command {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_newtype_variant("Command", ENVELOPE_TAG, "Versioned", &(FORMAT_VERSION, Layout(self)))
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let _depth = Nesting::enter().map_err(de::Error::custom)?;
        d.deserialize_enum("Command", &[], CommandVisitor)
    }
}

/// How many levels of commands one entry may hold when decoded: a command,
/// the commands of a [`Command::Batch`], and those of a batch inside it
/// (which decodes, and is refused as `NestedBatch` when applied). Deeper is
/// refused here, before the decoder's recursion can exhaust the stack on a
/// hostile entry (a forwarded command or an append from a peer).
const MAX_LEVELS: u32 = 3;

thread_local! {
    static NESTING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// One level of command decoding on this thread, left on drop.
struct Nesting;

impl Nesting {
    fn enter() -> Result<Nesting, String> {
        NESTING.with(|n| {
            if n.get() >= MAX_LEVELS {
                return Err(format!("commands nest more than {MAX_LEVELS} levels deep"));
            }
            n.set(n.get() + 1);
            Ok(Nesting)
        })
    }
}

impl Drop for Nesting {
    fn drop(&mut self) {
        NESTING.with(|n| n.set(n.get() - 1));
    }
}

struct CommandVisitor;

impl<'de> Visitor<'de> for CommandVisitor {
    type Value = Command;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a swarmd command, versioned or not")
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Command, A::Error> {
        let (index, variant): (u32, A::Variant) = data.variant()?;
        if index == ENVELOPE_TAG {
            variant.newtype_variant_seed(Versioned)
        } else {
            // Version 0: `index` was the variant of the command itself.
            Command::deserialize(Replay { index, variant })
        }
    }
}

/// Reads `(version, command)` and dispatches on the version.
struct Versioned;

impl<'de> DeserializeSeed<'de> for Versioned {
    type Value = Command;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Command, D::Error> {
        d.deserialize_tuple(2, self)
    }
}

impl<'de> Visitor<'de> for Versioned {
    type Value = Command;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a format version and a command")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Command, A::Error> {
        let version: u32 = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(0, &self))?;
        match version {
            1 => seq.next_element_seed(V1)?.ok_or_else(|| de::Error::invalid_length(1, &self)),
            v => Err(de::Error::custom(format!(
                "command format version {v} is newer than this manager understands (up to {FORMAT_VERSION})"
            ))),
        }
    }
}

/// The version 1 layout.
struct V1;

impl<'de> DeserializeSeed<'de> for V1 {
    type Value = Command;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Command, D::Error> {
        Command::deserialize(d)
    }
}

/// Hands an enum whose variant index was already read to a derived
/// `Deserialize`, as if it were read now.
struct Replay<V> {
    index: u32,
    variant: V,
}

impl<'de, A: VariantAccess<'de>> Deserializer<'de> for Replay<A> {
    type Error = A::Error;

    fn deserialize_any<W: Visitor<'de>>(self, _: W) -> Result<W::Value, A::Error> {
        Err(de::Error::custom("a version 0 command is an enum"))
    }

    fn deserialize_enum<W: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: W,
    ) -> Result<W::Value, A::Error> {
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

impl<'de, A: VariantAccess<'de>> EnumAccess<'de> for Replay<A> {
    type Error = A::Error;
    type Variant = A;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, A), A::Error> {
        let value = seed.deserialize(de::value::U32Deserializer::<A::Error>::new(self.index))?;
        Ok((value, self.variant))
    }
}
