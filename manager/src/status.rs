//! The one place where the manager's errors become gRPC statuses.
//!
//! Domain errors (`StoreError`, `ClusterError`, `StateError`) convert here
//! (`From` impls), and the answers several services give in the same words
//! (a manager not caught up, no leader, no session, a malformed ID) are built
//! here, so a client that branches on a code meets one code per cause.
//! Handlers keep their own wording only for what is specific to their RPC.

use tonic::Status;

use crate::cluster::ClusterError;
use crate::state::{Missing, Rejection, StateError};
use crate::store::StoreError;

/// An error the caller can do nothing about (a store read, a task that died).
pub fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// A manager whose replicated state does not hold what it needs yet (a
/// joining manager before its store caught up): UNAVAILABLE, try again.
pub fn not_caught_up() -> Status {
    Status::unavailable("this manager has not caught up with the cluster yet; retry")
}

/// No raft leader to take or forward a write: UNAVAILABLE, try again.
pub fn no_leader() -> Status {
    Status::unavailable("no quorum: no raft leader right now")
}

/// A heartbeat, status report or log push for a session this manager does
/// not hold: NOT_FOUND, the node opens a new session.
pub fn no_session() -> Status {
    Status::not_found("no such session: open a new one")
}

/// A malformed ID in a request: INVALID_ARGUMENT.
pub fn bad_id(e: swarmd_certs::IdError) -> Status {
    Status::invalid_argument(e.to_string())
}

impl From<ClusterError> for Status {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::NotInitialised => {
                Status::unavailable("this manager has not caught up with the cluster yet; try another manager")
            }
            e => internal(e),
        }
    }
}

impl From<StateError> for Status {
    fn from(e: StateError) -> Self {
        internal(e)
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        match e {
            StoreError::NoQuorum(_)
            | StoreError::NotLeader { .. }
            | StoreError::QuorumStale { .. }
            | StoreError::Raft(_) => Status::unavailable(e.to_string()),
            StoreError::Rejected(r) => rejection_status(&r),
            StoreError::Timeout(_) => Status::deadline_exceeded(e.to_string()),
            StoreError::State(_) => Status::internal(e.to_string()),
        }
    }
}

/// The binary metadata key a FAILED_PRECONDITION status carries its
/// [`Rejection`] in (bincode), so that a manager that gets the status back
/// from another sees the same variant, not only its text.
pub(crate) const REJECTION_METADATA: &str = "swarmd-rejection-bin";

/// A rejection in the words users see: its text, with the hints that name
/// secretctl's verbs and flags (which the replicated state never names).
pub(crate) fn rejection_message(r: &Rejection) -> String {
    match r {
        Rejection::SecretInUse { .. } => format!("{r}: remove it from them first (service update --secret-rm)"),
        Rejection::ImageInUse { .. } => format!("{r}: update or remove them first"),
        Rejection::NotFound(Missing::AdminCert { .. }) => format!("{r}: see secretctl admin-cert ls"),
        Rejection::InvalidSerial { .. } => {
            format!("{r}: give the lowercase hex serial `secretctl admin-cert ls` shows")
        }
        Rejection::InvalidSpec(e) => crate::service_api::spec_message(e),
        _ => r.to_string(),
    }
}

/// FAILED_PRECONDITION with [`rejection_message`], the rejection itself in
/// [`REJECTION_METADATA`].
pub(crate) fn rejection_status(r: &Rejection) -> Status {
    let mut s = Status::failed_precondition(rejection_message(r));
    let bytes = tonic::metadata::MetadataValue::from_bytes(&crate::state::encode(r));
    s.metadata_mut().insert_bin(REJECTION_METADATA, bytes);
    s
}
