//! The portmesh allocator: a pure, deterministic state machine.
//!
//! This crate owns the domain (teams, pools, allocations, reservations, leases, sticky keys,
//! cool-downs, revisions, events) and the single function that changes it, [`State::apply`].
//!
//! It does **not** own storage (nor how its types are persisted: `portmesh-store`'s `ondisk`),
//! networking, clocks or randomness from the environment:
//! - time enters only as [`ApplyCtx::now_ms`], stamped by the Raft leader into the log entry;
//! - randomness comes from a generator seeded by the log index ([`ApplyCtx::index`]), so every
//!   replica picks the same "random" port;
//! - what the host's bind probe saw travels inside the command ([`HostProbe`]), gathered by the
//!   node before proposing.
//!
//! Invariants kept by `apply` (each has tests in `state/tests/`):
//! - no two live allocations share a port;
//! - a reserved port is never handed out;
//! - every allocated port lies in a pool range of its team, within 1024–65535;
//! - pools never overlap, across all teams;
//! - a batch allocation is all-or-nothing;
//! - expiring or revoking a lease releases everything attached exactly once, with events.
//!
//! Business rejections ("pool exhausted", "port reserved") are values ([`Rejection`]) inside the
//! [`Response`], never errors: in openraft an error from `apply` stops the node.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

mod command;
mod portset;
mod rejection;
mod rng;
mod select;
mod state;
pub mod stats;
pub mod text;
mod types;

pub use command::{
    AllocItem, AllocateBatch, ApplyCtx, Command, Finding, Grant, HostProbe, LeaseSpec, ReleaseSelector,
    Request, Response,
};
pub use rejection::{Overlap, Rejection, Unavailable};
pub use rng::SplitMix64;
pub use select::PlanWidth;
pub use state::{Key, Meta, PoolUsage, Record, State, clip_output};
pub use types::{
    Allocation, CheckKind, CompactString, Conflict, Cooldown, Event, EventKind, HealthChange, HealthCheck,
    HealthStatus, HealthUpdate, Holder, Lease, Pool, PortRange, RangeError, ReleaseCause, Reservation, Role,
    Service, ServicePort, Strategy, Token, default_pools,
};

/// Lowest port portmesh will ever hand out or accept: ports below need privileges.
pub const MIN_PORT: u16 = 1024;
/// The team used when a request names none.
pub const DEFAULT_TEAM: &str = "default";

/// The team a request acts for: the one it names, else [`DEFAULT_TEAM`]. Every layer (the
/// request boundary, the CLI, project files) defaults the team through this.
pub fn team_or_default(team: &str) -> &str {
    if team.is_empty() { DEFAULT_TEAM } else { team }
}

/// Milliseconds since the Unix epoch of `t` (0 before it). The core reads no clock: the node
/// stamps `unix_ms(SystemTime::now())` into each log entry, and the CLI converts the same way.
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
/// The pool used when a request names none and no port pins one.
pub const DEFAULT_POOL: &str = "default";
/// Default cool-down before a released port goes to a different owner: long enough for an old
/// process's sockets to leave `TIME_WAIT` (60 s on Linux).
pub const DEFAULT_COOLDOWN_MS: u64 = 60_000;
/// Longest cool-down accepted (one day): a released port out of reach for longer than its
/// holder could plausibly still hold it only shrinks the pool.
pub const MAX_COOLDOWN_MS: u64 = 24 * 3600 * 1000;
/// How many events the state machine keeps for watchers and the audit log.
pub const EVENT_RETENTION: usize = 10_000;
/// A port found busy on a host is recorded as a `Conflict` event at most once in this long
/// (again sooner only when another process holds it), however many allocations walk past it.
pub const CONFLICT_REPEAT_MS: u64 = 60_000;
/// Shortest and longest lease TTL accepted.
pub const MIN_TTL_MS: u64 = 1_000;
/// Longest lease TTL accepted (30 days).
pub const MAX_TTL_MS: u64 = 30 * 24 * 3600 * 1000;
/// Most items one allocation batch may carry.
pub const MAX_BATCH: usize = 1024;
/// Most named ports (and most tags) one service registration may carry.
pub const MAX_SERVICE_PORTS: usize = 64;
/// Shortest health check interval accepted.
pub const MIN_CHECK_INTERVAL_MS: u64 = 100;
/// Longest check output kept in the state (longer output is cut).
pub const MAX_CHECK_OUTPUT: usize = 512;
