//! Wire types for swarmd's gRPC services, generated from `proto/*.proto`.
//!
//! This crate holds generated code only. Domain crates convert these types into
//! their own at the edge (`TryFrom`) and never pass them around inside.

#![allow(clippy::all, missing_docs)]

/// gRPC metadata key a manager sets on a PERMISSION_DENIED answer when the
/// calling node was removed from the cluster. With the TLS alert
/// `certificate_revoked` at the handshake, it is the only signal a node takes
/// as its removal; a manager that merely does not know the node yet never sets it.
pub const NODE_REMOVED_METADATA: &str = "swarmd-node-removed";

/// gRPC metadata key with the milliseconds a refused caller should wait
/// before it tries again (on RESOURCE_EXHAUSTED: a join or renewal budget).
pub const RETRY_AFTER_METADATA: &str = "retry-after-ms";

/// The encoded file-descriptor set of every service here (to enumerate RPCs).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/swarmd_descriptor.bin"));

/// The certificate authority: root CA download, join, renewal.
pub mod ca {
    tonic::include_proto!("swarmd.ca");
}

/// Node sessions and heartbeats.
pub mod dispatcher {
    tonic::include_proto!("swarmd.dispatcher");
}

/// The control API behind secretctl.
pub mod control {
    tonic::include_proto!("swarmd.control");
}

/// Raft transport between managers.
pub mod raft {
    tonic::include_proto!("swarmd.raft");
}

/// Manager-to-manager RPCs: data key hand-off, raft membership, forwarded writes.
pub mod cluster {
    tonic::include_proto!("swarmd.cluster");
}

/// etcd v3's KV.Put, to measure etcd as a peer in the benchmarks (not used by swarmd itself).
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
