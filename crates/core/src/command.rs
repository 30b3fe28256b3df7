//! What goes into the log ([`Request`]) and what comes out of `apply` ([`Response`]).

use serde::{Deserialize, Serialize};

use crate::rejection::Rejection;
use crate::types::{
    Allocation, HealthUpdate, Holder, Lease, Pool, PortRange, Reservation, Service, Strategy, Token,
};

/// The application payload of one Raft log entry: the commands proposed together (group
/// commit: concurrent proposals share one entry and one fsync), applied in order, each on its own.
/// The store persists it in its own encoding (`portmesh_store::ondisk::LogRequest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Wall-clock milliseconds since the Unix epoch, stamped by the leader when it proposed the
    /// entry. The only clock `apply` ever sees: every replica computes cool-downs from it alike.
    pub time_ms: u64,
    pub commands: Vec<Command>,
}

/// Everything `apply` needs besides the command: the entry's stamped time, its log index and the
/// command's position in the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyCtx {
    pub now_ms: u64,
    /// The log index of the entry.
    pub index: u64,
    /// Position of the command within the entry.
    pub seq: u32,
}

impl ApplyCtx {
    /// The seed of the generator behind the `random` strategy: the same on every replica.
    pub fn seed(&self) -> u64 {
        self.index.wrapping_mul(1 << 20) ^ u64::from(self.seq)
    }
}

/// What a log entry asks the state machine to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Release live allocations of a team.
    Release {
        team: String,
        selector: ReleaseSelector,
    },
    /// Keep a port out of automatic selection.
    Reserve {
        port: u16,
        reason: String,
    },
    Unreserve {
        port: u16,
    },
    AddPool {
        team: String,
        name: String,
        ranges: Vec<PortRange>,
    },
    RemovePool {
        team: String,
        name: String,
    },
    GrantLease {
        team: String,
        ttl_ms: u64,
    },
    /// Revoke a lease of `team`, releasing everything attached.
    RevokeLease {
        team: String,
        id: u64,
    },
    /// Leader-only: the lease clock as the leader's countdown reads it now (it only moves
    /// forward: an older or repeated reading changes nothing), and the remaining TTL of each
    /// lease whose deadline moved (renewed) since the last checkpoint.
    CheckpointLeases {
        clock_ms: u64,
        remaining: Vec<(u64, u64)>,
    },
    /// Leader-only: these leases ran out. Ids no longer present are ignored (exactly once).
    ExpireLeases {
        ids: Vec<u64>,
    },
    SetCooldown {
        ms: u64,
    },
    /// Register (or replace, same team and id) a service. Status, revision and times are set by
    /// `apply`; what the request put there is ignored.
    Register(Box<Service>),
    Deregister {
        team: String,
        id: String,
    },
    /// Health transitions seen by a host's node. Unknown ids (deregistered meanwhile) and
    /// updates that change nothing are ignored.
    SetHealth {
        updates: Vec<HealthUpdate>,
    },
    /// Allocate one or more ports, all or nothing.
    Allocate(AllocateBatch),
    /// Add a token (its digest; `created_ms` is set by `apply`). An id in use is refused.
    AddToken(Box<Token>),
    /// Remove a token. The last admin token cannot go: that would lock everyone out.
    RevokeToken {
        id: String,
    },
    /// Spend one use of a token (a join): refused when it is unknown, expired or used up; the
    /// last use removes it.
    UseToken {
        id: String,
    },
}

/// One atomic allocation request: every item gets a port or none does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocateBatch {
    pub team: String,
    /// Host the ports are for (its node ran the probe).
    pub host: String,
    pub lease: LeaseSpec,
    pub items: Vec<AllocItem>,
    /// What the host's bind probe saw, if one ran. With a probe, only probed ports that were
    /// found free may be handed out.
    pub probe: Option<HostProbe>,
    /// The process the ports are for, where the client said.
    pub holder: Option<Holder>,
    /// A service to register in the same step (one log entry instead of two), on the batch's
    /// lease, team and host, whatever it says for them. Its ports' numbers are filled in from
    /// the grants, in item order (one port per item); an empty id becomes
    /// [`Service::default_id`]. Made only when every port the batch returns is new or already
    /// on the batch's lease: a sticky key live under another lease returns that holder's port,
    /// which is not this registration's to describe (the response then carries none).
    #[serde(default)]
    pub register: Option<Box<Service>>,
}

/// Which lease, if any, the allocations of a batch attach to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseSpec {
    #[default]
    None,
    Existing(u64),
    /// Grant a new lease with this TTL in the same command.
    New {
        ttl_ms: u64,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocItem {
    /// Pool to draw from; when absent, the pool holding `port`, else the pool named like the
    /// service, else `default`.
    pub pool: Option<String>,
    pub service: String,
    pub instance: Option<String>,
    pub env: Option<String>,
    pub key: Option<String>,
    /// The wanted port.
    pub port: Option<u16>,
    pub strategy: Strategy,
}

/// The result of probing candidate ports on a host: which were checked and which were busy,
/// and which the host's node already knew busy without probing them again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostProbe {
    /// Sorted, deduplicated.
    pub checked: Vec<u16>,
    /// Sorted, deduplicated subset of `checked`.
    pub busy: Vec<u16>,
    /// Who holds busy ports, where the OS told; sorted by port.
    pub owners: Vec<(u16, Holder)>,
    /// Ranges whose every port the state could hand out was found busy on the host by an
    /// earlier probe, still remembered by its node (see [`State::busy_runs`]); sorted,
    /// non-overlapping. Selection skips them whole, without walking them port by port, and
    /// records no conflict for them: a conflict is recorded when a probe finds a port busy, not
    /// while a node remembers it. A port in `checked` is what the probe found, range or not.
    /// Data version 8 on; empty before.
    ///
    /// [`State::busy_runs`]: crate::State::busy_runs
    pub known_busy: Vec<PortRange>,
}

/// What a [`HostProbe`] says of one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    /// Probed and found free.
    Free,
    /// Probed and found busy (a conflict, if it is news).
    Busy,
    /// Not probed this time: remembered busy from an earlier probe.
    KnownBusy,
    /// Not probed, not known: `apply` asks for a probe rather than guess.
    Unchecked,
}

impl HostProbe {
    pub fn new(mut checked: Vec<u16>, mut busy: Vec<u16>) -> Self {
        checked.sort_unstable();
        checked.dedup();
        busy.sort_unstable();
        busy.dedup();
        Self { checked, busy, owners: Vec::new(), known_busy: Vec::new() }
    }

    /// Adds the ranges known busy on the host (sorted, non-overlapping; see [`Self::known_busy`]).
    pub fn with_known_busy(mut self, known_busy: Vec<PortRange>) -> Self {
        self.known_busy = known_busy;
        self
    }

    /// Records who holds busy ports.
    pub fn with_owners(mut self, mut owners: Vec<(u16, Holder)>) -> Self {
        owners.sort_by_key(|(p, _)| *p);
        owners.dedup_by_key(|(p, _)| *p);
        self.owners = owners;
        self
    }

    /// Who holds `port`, if the probe found out.
    pub fn owner(&self, port: u16) -> Option<&Holder> {
        self.owners.binary_search_by_key(&port, |(p, _)| *p).ok().map(|i| &self.owners[i].1)
    }

    /// What the probe says of `port`: what it found, if it probed the port, else whether the
    /// port lies in a range known busy.
    pub fn finding(&self, port: u16) -> Finding {
        if self.busy.binary_search(&port).is_ok() {
            Finding::Busy
        } else if self.checked.binary_search(&port).is_ok() {
            Finding::Free
        } else if in_ranges(&self.known_busy, port) {
            Finding::KnownBusy
        } else {
            Finding::Unchecked
        }
    }
}

/// Whether `port` lies in one of `ranges` (sorted, non-overlapping).
pub(crate) fn in_ranges(ranges: &[PortRange], port: u16) -> bool {
    let i = ranges.partition_point(|r| r.end() < port);
    ranges.get(i).is_some_and(|r| r.start() <= port)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleaseSelector {
    Ports(Vec<u16>),
    Key(String),
}

/// One port handed out by an allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub allocation: Allocation,
    /// True when a live allocation of the same sticky key was returned (idempotent retry).
    pub existing: bool,
    /// The port the sticky key had last, when it got another one this time (its old port was
    /// taken, reserved or busy).
    #[serde(default)]
    pub moved_from: Option<u16>,
}

/// The outcome of applying one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Entries that carry no command (blank, membership).
    Noop,
    Allocated {
        grants: Vec<Grant>,
        lease: Option<Lease>,
        revision: u64,
        /// The registration the batch carried, as stored (`None`: it carried none, or it was
        /// not made; see [`AllocateBatch::register`]).
        #[serde(default)]
        registered: Option<Box<Service>>,
    },
    Released {
        allocations: Vec<Allocation>,
        revision: u64,
    },
    Reserved(Reservation),
    Unreserved {
        port: u16,
        revision: u64,
    },
    PoolAdded(Pool),
    PoolRemoved {
        team: String,
        name: String,
        revision: u64,
    },
    LeaseGranted(Lease),
    LeaseRevoked {
        id: u64,
        released: Vec<Allocation>,
        revision: u64,
    },
    Checkpointed {
        leases: usize,
    },
    Expired {
        ids: Vec<u64>,
        released: Vec<Allocation>,
        revision: u64,
    },
    CooldownSet {
        ms: u64,
        revision: u64,
    },
    Rejected(Rejection),
    Registered {
        service: Box<Service>,
        /// True when an entry with the same id was replaced.
        replaced: bool,
        revision: u64,
    },
    Deregistered {
        service: Box<Service>,
        revision: u64,
    },
    HealthSet {
        /// How many updates changed a status.
        changed: usize,
        revision: u64,
    },
    TokenAdded(Box<Token>),
    TokenRevoked {
        id: String,
    },
    TokenUsed {
        id: String,
    },
}

impl Response {
    /// The rejection, if the command was refused.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            Response::Rejected(r) => Some(r),
            _ => None,
        }
    }
}
