//! The replicated store as services use it: writes go through raft, reads come
//! from this manager's applied state.
//!
//! Reads are local: on the leader they reflect every acknowledged write; on a
//! follower they may lag by the replication delay. (Issue 3 adds read-index reads
//! for the control API.) gRPC status mapping for store errors lives here, once.

use openraft::error::{ClientWriteError, RaftError};
use tonic::Status;

use crate::raft::Raft;
use crate::state::{Command, CommandResult, StateError, StateView};

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// This manager is not the raft leader.
    #[error("this manager is not the raft leader (leader: {leader})")]
    NotLeader { leader: String },
    /// The command was valid raft-wise but refused by the state machine.
    #[error("{0}")]
    Rejected(String),
    /// raft itself failed (shutting down, storage error).
    #[error("raft: {0}")]
    Raft(String),
    /// Reading state failed.
    #[error(transparent)]
    State(#[from] StateError),
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        match e {
            StoreError::NotLeader { .. } => Status::unavailable(e.to_string()),
            StoreError::Rejected(why) => Status::failed_precondition(why),
            StoreError::Raft(_) => Status::unavailable(e.to_string()),
            StoreError::State(_) => Status::internal(e.to_string()),
        }
    }
}

/// Proposes commands and reads state.
#[derive(Clone)]
pub struct Store {
    raft: Raft,
    view: StateView,
}

impl Store {
    /// A store over a running raft node and its state machine's view.
    pub fn new(raft: Raft, view: StateView) -> Self {
        Self { raft, view }
    }

    /// The local applied state.
    pub fn view(&self) -> &StateView {
        &self.view
    }

    /// The raft handle.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Commits `cmd` through raft and returns once it is applied here.
    pub async fn propose(&self, cmd: Command) -> Result<(), StoreError> {
        match self.raft.client_write(cmd).await {
            Ok(resp) => match resp.data {
                CommandResult::Ok => Ok(()),
                CommandResult::Rejected(why) => Err(StoreError::Rejected(why)),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(StoreError::NotLeader {
                    leader: f
                        .leader_node
                        .map(|n| n.addr)
                        .unwrap_or_else(|| "unknown".into()),
                })
            }
            Err(e) => Err(StoreError::Raft(e.to_string())),
        }
    }
}
