//! The one place where the manager's errors become gRPC statuses.
//!
//! Domain errors (`StoreError`, `ClusterError`, `StateError`) convert here
//! (`From` impls), and the answers several services give in the same words
//! (a manager not caught up, no leader, no session, a malformed ID) are built
//! here, so a client that branches on a code meets one code per cause.
//! Handlers keep their own wording only for what is specific to their RPC.

use tonic::Status;

use crate::cluster::ClusterError;
use crate::state::StateError;

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
