//! The gRPC services of `portmesh.v1` and the single mapping from errors to `tonic::Status`.
//!
//! Owns: request handling — validation at the boundary (via `portmesh-proto` conversions),
//! probing the host before proposing an allocation, proposing through [`RaftNode::propose`],
//! linearizable reads through [`RaftNode::read_barrier`], and turning every failure into a status
//! with a message that says what, where and what to do. Does not own: transport setup, HTTP,
//! shutdown choreography (that is `portmesh-node`).

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

mod allocator;
mod api;
pub mod auth;
mod cluster;
mod error;
mod leases;
pub mod metrics;
mod placement;
mod pools;
mod registry;
mod tokens;
mod watch;

pub use api::{Api, ShutdownHandle};
pub use auth::Caller;
pub use error::ApiError;
pub use metrics::{RequestMetrics, count_events};
pub use watch::WatchServer;

pub use portmesh_proto::{ERROR_METADATA, LEADER_METADATA, OLDEST_REVISION_METADATA};
