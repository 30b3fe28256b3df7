//! The gRPC API: code generated from `proto/portmesh/v1` and the conversions between its messages
//! and the domain types of `portmesh-core`.
//!
//! Owns: the wire types and boundary validation (`TryFrom<pb::X>` for core types), so `core` never
//! sees a prost type. Does not own: services, transport setup or error-to-status mapping
//! (that is `portmesh-api`).

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

#[allow(clippy::all, clippy::pedantic, missing_debug_implementations, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("portmesh.v1");
}

/// The node-to-node Raft transport (internal; not part of the public API).
pub mod raft {
    #[allow(clippy::all, clippy::pedantic, missing_debug_implementations, rust_2018_idioms)]
    pub mod v1 {
        tonic::include_proto!("portmesh.raft.v1");
    }
}

/// Encoded file descriptor set of the public API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/portmesh_descriptor.bin"));

pub mod channel;
mod convert;

pub use channel::endpoint_uri;

/// Metadata key carrying the leader's address on an UNAVAILABLE "not the leader" error.
pub const LEADER_METADATA: &str = "portmesh-leader";
/// Metadata key carrying the stable error category.
pub const ERROR_METADATA: &str = "portmesh-error";
/// Metadata key carrying the oldest revision still available on a `compacted` watch error.
pub const OLDEST_REVISION_METADATA: &str = "portmesh-oldest-revision";

pub use convert::{
    Allocate, AtHost, BadRequest, JOIN_TOKEN_TTL_MS, MAX_CHECK_COMMAND, MAX_JOIN_USES, MAX_REPORTED_BUSY,
    MAX_REPORTS, MAX_TOKEN_TTL_MS, TokenSpec, check_filters, health_from_pb, list_filters, required_port,
    strategy_from_pb, team,
};
