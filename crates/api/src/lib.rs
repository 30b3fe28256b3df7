//! The gRPC services of `portmesh.v1` and the single mapping from errors to `tonic::Status`.
//!
//! Owns: request handling — validation at the boundary (via `portmesh-proto` conversions),
//! probing the host before proposing an allocation, proposing through [`RaftNode::propose`],
//! linearizable reads through [`RaftNode::read_barrier`], and turning every failure into a status
//! with a message that says what, where and what to do. Does not own: transport setup, HTTP,
//! shutdown choreography (that is `portmesh-node`).

mod error;
mod hosts;
mod services;
mod watch;

pub use error::ApiError;
pub use services::{Api, ShutdownHandle};

/// Metadata key carrying the leader's address on an UNAVAILABLE "not the leader" error.
pub const LEADER_METADATA: &str = "portmesh-leader";
/// Metadata key carrying the stable error category.
pub const ERROR_METADATA: &str = "portmesh-error";
/// Metadata key carrying the oldest revision still available on a `compacted` watch error.
pub const OLDEST_REVISION_METADATA: &str = "portmesh-oldest-revision";
