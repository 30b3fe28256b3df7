//! Data version 1 (portmesh 0.1.0): the shapes that changed since, kept so that its data
//! directories, Raft logs and snapshots still load. Each converts to the current core type.
//! Nothing here is ever written.

use serde::{Deserialize, Serialize};

use portmesh_core::{
    AllocItem, AllocateBatch, Allocation, Conflict, Event, EventKind, HostProbe, LeaseSpec, Meta, Pool,
    ReleaseCause, Reservation,
};

/// `Allocation` as 0.1.0 wrote it (no holder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationV1 {
    pub port: u16,
    pub team: String,
    pub pool: String,
    pub service: String,
    pub instance: Option<String>,
    pub env: Option<String>,
    pub host: String,
    pub key: Option<String>,
    pub lease_id: Option<u64>,
    pub created_ms: u64,
    pub revision: u64,
}

impl From<AllocationV1> for Allocation {
    fn from(a: AllocationV1) -> Self {
        Allocation {
            port: a.port,
            team: a.team.into(),
            pool: a.pool.into(),
            service: a.service.into(),
            instance: a.instance.map(Into::into),
            env: a.env.map(Into::into),
            host: a.host.into(),
            key: a.key.map(Into::into),
            lease_id: a.lease_id,
            created_ms: a.created_ms,
            revision: a.revision,
            holder: None,
        }
    }
}

/// `Conflict` as 0.1.0 wrote it (no holder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictV1 {
    pub port: u16,
    pub team: String,
    pub pool: String,
    pub service: String,
    pub host: String,
}

/// `EventKind` as 0.1.0 wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKindV1 {
    Allocated(AllocationV1),
    Released { allocation: AllocationV1, cause: ReleaseCause },
    Reserved(Reservation),
    Unreserved { port: u16 },
    PoolAdded(Pool),
    PoolRemoved { team: String, name: String },
    LeaseGranted { id: u64, team: String, ttl_ms: u64 },
    LeaseRevoked { id: u64, team: String },
    LeaseExpired { id: u64, team: String },
    Conflict(ConflictV1),
    CooldownChanged { ms: u64 },
}

/// `Event` as 0.1.0 wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventV1 {
    pub revision: u64,
    pub seq: u32,
    pub at_ms: u64,
    pub kind: EventKindV1,
}

impl From<EventV1> for Event {
    fn from(e: EventV1) -> Self {
        use EventKindV1 as K;
        let kind = match e.kind {
            K::Allocated(a) => EventKind::Allocated(Box::new(a.into())),
            K::Released { allocation, cause } => {
                EventKind::Released { allocation: Box::new(allocation.into()), cause }
            }
            K::Reserved(r) => EventKind::Reserved(r),
            K::Unreserved { port } => EventKind::Unreserved { port },
            K::PoolAdded(p) => EventKind::PoolAdded(Box::new(p)),
            K::PoolRemoved { team, name } => EventKind::PoolRemoved { team, name },
            K::LeaseGranted { id, team, ttl_ms } => EventKind::LeaseGranted { id, team, ttl_ms },
            K::LeaseRevoked { id, team } => EventKind::LeaseRevoked { id, team },
            K::LeaseExpired { id, team } => EventKind::LeaseExpired { id, team },
            K::Conflict(c) => EventKind::Conflict(Box::new(Conflict {
                port: c.port,
                team: c.team,
                pool: c.pool,
                service: c.service,
                host: c.host,
                holder: None,
            })),
            K::CooldownChanged { ms } => EventKind::CooldownChanged { ms },
        };
        Event { revision: e.revision, seq: e.seq, at_ms: e.at_ms, kind }
    }
}

/// `HostProbe` as 0.1.0 wrote it (no owners).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostProbeV1 {
    pub checked: Vec<u16>,
    pub busy: Vec<u16>,
}

/// `AllocateBatch` as 0.1.0 wrote it (no holder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocateBatchV1 {
    pub team: String,
    pub host: String,
    pub lease: LeaseSpec,
    pub items: Vec<AllocItem>,
    pub probe: Option<HostProbeV1>,
}

impl From<AllocateBatchV1> for AllocateBatch {
    fn from(b: AllocateBatchV1) -> Self {
        AllocateBatch {
            team: b.team,
            host: b.host,
            lease: b.lease,
            items: b.items,
            probe: b.probe.map(|p| HostProbe::new(p.checked, p.busy)),
            holder: None,
            register: None,
        }
    }
}

/// `Meta` as data versions 1 to 3 wrote it (no lease clock: every lease's deadline field held
/// its remaining TTL, which is the same reading with the clock at 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaV1 {
    pub revision: u64,
    pub next_lease_id: u64,
    pub cooldown_ms: u64,
}

impl From<MetaV1> for Meta {
    fn from(m: MetaV1) -> Self {
        Meta {
            revision: m.revision,
            next_lease_id: m.next_lease_id,
            cooldown_ms: m.cooldown_ms,
            lease_clock_ms: 0,
        }
    }
}
