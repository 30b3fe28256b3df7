//! Why a command was refused. A rejection changes nothing and is returned as data.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why one particular port cannot be handed out right now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unavailable {
    Allocated { team: String, service: String },
    Reserved { reason: String },
    BusyOnHost { host: String },
    CoolingDown { until_ms: u64 },
    TakenInBatch,
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Allocated { team, service } => write!(f, "allocated to {service:?} (team {team:?})"),
            Self::Reserved { reason } if reason.is_empty() => write!(f, "reserved"),
            Self::Reserved { reason } => write!(f, "reserved ({reason})"),
            Self::BusyOnHost { host } => {
                write!(f, "in use on host {host:?} by a process portmesh did not start")
            }
            Self::CoolingDown { until_ms } => {
                write!(f, "cooling down after release until {until_ms} ms since the epoch")
            }
            Self::TakenInBatch => write!(f, "taken by an earlier item of the same batch"),
        }
    }
}

/// A new pool range that overlaps an existing pool (pools never overlap, across all teams).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlap {
    pub team: String,
    pub pool: String,
    pub range: String,
    pub other_team: String,
    pub other_pool: String,
    pub other_range: String,
}

impl fmt::Display for Overlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "range {} of pool {:?} (team {:?}) overlaps pool {:?} of team {:?} ({}); pools never overlap: pick another range",
            self.range, self.pool, self.team, self.other_pool, self.other_team, self.other_range
        )
    }
}

/// A refused command. `Display` gives the message a person reads: what, where, what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("port {port} is out of range: ports must lie in 1024-65535")]
    PortOutOfRange { port: u32 },
    #[error("{0}")]
    InvalidRange(String),
    #[error("{0}")]
    RangeOverlap(Box<Overlap>),
    #[error("pool {pool:?} already exists in team {team:?} ({ranges})")]
    PoolExists { team: String, pool: String, ranges: String },
    #[error(
        "unknown team {team:?}: it has no pools; create one with `portmesh pools add NAME RANGE --team {team}`"
    )]
    UnknownTeam { team: String },
    #[error("unknown pool {pool:?} in team {team:?}; known pools: {known}")]
    UnknownPool { team: String, pool: String, known: String },
    #[error("unknown lease {id} in team {team:?}: it expired, was revoked or never existed")]
    UnknownLease { team: String, id: u64 },
    #[error("port {port} is not allocated in team {team:?}")]
    NotAllocated { team: String, port: u16 },
    #[error("no live allocation has key {key:?} in team {team:?}")]
    UnknownKey { team: String, key: String },
    #[error("port {port} is not reserved")]
    NotReserved { port: u16 },
    #[error("port {port} is already reserved ({reason})")]
    AlreadyReserved { port: u16, reason: String },
    #[error("port {port} is allocated to {service:?} (team {team:?}); release it before reserving")]
    ReserveAllocated { port: u16, team: String, service: String },
    #[error("port {port} is outside the pools of team {team:?} ({pools})")]
    PortOutsidePools { port: u16, team: String, pools: String },
    #[error("port {port} is not in pool {pool:?} ({ranges}) of team {team:?}")]
    PortNotInPool { port: u16, team: String, pool: String, ranges: String },
    #[error("port {port} is not available: {why} (strategy fail)")]
    PortUnavailable { port: u16, why: Unavailable },
    #[error(
        "pool {pool:?} of team {team:?} exhausted: {size} ports, {unavailable} unavailable ({detail}); \
         release ports, wait for cool-downs, or add a range with `portmesh pools add`"
    )]
    PoolExhausted { team: String, pool: String, size: u32, unavailable: u32, detail: String },
    #[error("pool {pool:?} of team {team:?} still has {live} live allocation(s); release them first")]
    PoolInUse { team: String, pool: String, live: usize },
    #[error("lease TTL {ttl_ms} ms is out of bounds: use 1s to 30d")]
    BadTtl { ttl_ms: u64 },
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The node's probe did not cover the port `apply` reached: the state moved since the node
    /// planned. The node probes again and re-proposes; users never see this.
    #[error("the host probe did not cover port {port}; probe again")]
    NeedProbe { port: u16 },
    #[error("no service {id:?} is registered in team {team:?}; `portmesh discover --all` lists them")]
    UnknownService { team: String, id: String },
    #[error("unknown token {id:?}: it was revoked, used up or never existed; `portmesh token ls` lists them")]
    UnknownToken { id: String },
    #[error("token {id:?} expired; ask an admin for a new one (`portmesh token create`)")]
    TokenExpired { id: String },
    #[error("token {id:?} already exists")]
    TokenExists { id: String },
    #[error(
        "token {id:?} is the last admin token: revoking it would lock every admin out; \
         create another with `portmesh token create --role admin` first"
    )]
    LastAdminToken { id: String },
}

impl Rejection {
    /// A short machine-readable category, used for gRPC status codes and JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PortOutOfRange { .. } | Self::InvalidRange(_) | Self::BadTtl { .. } | Self::Invalid(_) => {
                "invalid_argument"
            }
            Self::UnknownTeam { .. }
            | Self::UnknownPool { .. }
            | Self::UnknownLease { .. }
            | Self::NotAllocated { .. }
            | Self::UnknownKey { .. }
            | Self::NotReserved { .. }
            | Self::UnknownService { .. }
            | Self::UnknownToken { .. } => "not_found",
            Self::RangeOverlap(_)
            | Self::PoolExists { .. }
            | Self::AlreadyReserved { .. }
            | Self::TokenExists { .. } => "already_exists",
            Self::PoolExhausted { .. } => "exhausted",
            Self::ReserveAllocated { .. }
            | Self::PortOutsidePools { .. }
            | Self::PortNotInPool { .. }
            | Self::PortUnavailable { .. }
            | Self::PoolInUse { .. }
            | Self::TokenExpired { .. }
            | Self::LastAdminToken { .. } => "failed_precondition",
            Self::NeedProbe { .. } => "retry",
        }
    }
}
