//! The state machine: [`State`] and its one mutator, [`State::apply`]. This file holds the
//! state, its reads and the dispatch of `apply`; the state as the records the store persists is
//! in `records`, and each family of commands is applied in a module of its own: `alloc`
//! (allocate, release), `pools` (pools, reservations), `leases`, `registry`, `tokens`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::command::{
    AllocItem, AllocateBatch, ApplyCtx, Command, Grant, LeaseSpec, ReleaseSelector, Response, in_ranges,
};
use crate::rejection::{Overlap, Rejection};
use crate::rng::SplitMix64;
use crate::select::{Pick, PlanWidth, Selector};
use crate::types::{
    Allocation, CheckKind, Conflict, Cooldown, Event, EventKind, HealthChange, HealthStatus, HealthUpdate,
    Lease, Pool, PortRange, ReleaseCause, Reservation, Role, Service, Token, default_pools,
};
use crate::{
    DEFAULT_COOLDOWN_MS, DEFAULT_TEAM, EVENT_RETENTION, MAX_BATCH, MAX_CHECK_OUTPUT, MAX_SERVICE_PORTS,
    MAX_TTL_MS, MIN_CHECK_INTERVAL_MS, MIN_TTL_MS,
};

/// Cluster-wide scalars.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The revision of the last state change.
    pub revision: u64,
    pub next_lease_id: u64,
    pub cooldown_ms: u64,
    /// The lease clock: milliseconds of lease countdown the leaders have checkpointed so far.
    /// A lease's deadline is a reading of this clock, so a checkpoint moves the clock and
    /// rewrites only the leases that were renewed (see `Lease::deadline_ms`).
    pub lease_clock_ms: u64,
}

/// How full a pool is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolUsage {
    pub size: u32,
    pub allocated: u32,
    pub reserved: u32,
    pub cooling: u32,
}

/// The whole replicated state.
///
/// Invariants (checked by `check_invariants` in tests after every step):
/// - `allocations` holds at most one allocation per port, each inside a pool of its team;
/// - no allocated port is reserved; pools never overlap;
/// - `live_keys`, `lease_ports`, `cooldown_order`, `allocated` and `cooling` are exact indexes
///   of the primary maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    meta: Meta,
    pools: BTreeMap<(String, String), Pool>,
    /// Boxed: a B-tree node then holds 11 pointers, not 11 allocations of ~220 bytes, and ports
    /// taken in ascending order leave nodes half full (see docs/benchmarks.md, memory).
    allocations: BTreeMap<u16, Box<Allocation>>,
    reservations: BTreeMap<u16, Reservation>,
    /// Boxed, like the allocations: ids ascend, which leaves B-tree nodes about half full.
    leases: BTreeMap<u64, Box<Lease>>,
    sticky: BTreeMap<(String, String), u16>,
    cooldowns: BTreeMap<u16, Cooldown>,
    events: VecDeque<Event>,
    services: BTreeMap<(String, String), Service>,
    /// Tokens by id (digests only).
    tokens: BTreeMap<String, Token>,
    // Derived indexes, rebuilt on load.
    live_keys: BTreeMap<(String, String), u16>,
    /// (lease, port) pairs: one flat set, not a set per lease (most leases hold one port).
    lease_ports: BTreeSet<(u64, u16)>,
    cooldown_order: BTreeSet<(u64, u16)>,
    /// How many sticky keys remember each port (their last port): selection hands these out
    /// last, so a key's port stays its own across `down`/`up` long after the cool-down.
    remembered: BTreeMap<u16, u32>,
    /// The ports `allocations` holds, as a bitmap: the lowest free port of a pool is found
    /// 64 ports a step.
    allocated: crate::portset::PortSet,
    /// The ports `cooldowns` holds (ended or not), as a bitmap, for the same walk.
    cooling: crate::portset::PortSet,
    /// Services attached to each lease: team, id.
    lease_services: BTreeMap<u64, BTreeSet<(String, String)>>,
    /// The latest kept `Conflict` event of each host and port: whether a busy port is recorded
    /// again (see [`crate::CONFLICT_REPEAT_MS`]). Derived from `events` alone, so every replica
    /// and every restart decides alike.
    last_conflicts: LastConflicts,
}

/// The latest kept `Conflict` of each host and port, by host, then port: a host's are read in
/// port order against the busy ports an allocation's walk passes (docs/benchmarks.md, sixteenth
/// and eighteenth slices).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct LastConflicts(BTreeMap<String, BTreeMap<u16, ConflictSeen>>);

impl LastConflicts {
    /// Records `c` (of event `e`) as its host and port's latest.
    fn note(&mut self, e: &Event, c: &Conflict) {
        self.0.entry(c.host.clone()).or_default().insert(c.port, ConflictSeen::of(e, c));
    }

    /// Whether finding `port` busy on `host` at `now_ms`, held by `pid` if known, is news: the
    /// host and port have no kept `Conflict` from the last [`crate::CONFLICT_REPEAT_MS`], or
    /// another process held the port then. Asked before a `Conflict` is built.
    fn is_news(&self, host: &str, port: u16, pid: Option<u32>, now_ms: u64) -> bool {
        self.0.get(host).and_then(|ports| ports.get(&port)).is_none_or(|last| {
            now_ms.saturating_sub(last.at_ms) >= crate::CONFLICT_REPEAT_MS || last.pid != pid
        })
    }

    /// Forgets `c` (of event `e`, leaving the history) if it is still its host and port's latest.
    fn forget(&mut self, e: &Event, c: &Conflict) {
        let Some(ports) = self.0.get_mut(c.host.as_str()) else { return };
        if ports.get(&c.port).is_some_and(|l| l.is(e)) {
            ports.remove(&c.port);
            if ports.is_empty() {
                self.0.remove(c.host.as_str());
            }
        }
    }
}

/// Where and when a host's port was last recorded busy, and by which process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConflictSeen {
    revision: u64,
    seq: u32,
    at_ms: u64,
    pid: Option<u32>,
}

impl ConflictSeen {
    fn of(e: &Event, c: &Conflict) -> Self {
        Self { revision: e.revision, seq: e.seq, at_ms: e.at_ms, pid: c.holder.as_ref().map(|h| h.pid) }
    }

    fn is(&self, e: &Event) -> bool {
        (self.revision, self.seq) == (e.revision, e.seq)
    }
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    /// A fresh cluster's state: team `default` with the default pools.
    pub fn new() -> Self {
        let mut s = Self::empty();
        for (name, range) in default_pools() {
            let pool =
                Pool { team: DEFAULT_TEAM.into(), name: name.into(), ranges: vec![range], revision: 0 };
            s.pools.insert((pool.team.clone(), pool.name.clone()), pool);
        }
        s
    }

    fn empty() -> Self {
        Self {
            meta: Meta { revision: 0, next_lease_id: 1, cooldown_ms: DEFAULT_COOLDOWN_MS, lease_clock_ms: 0 },
            pools: BTreeMap::new(),
            allocations: BTreeMap::new(),
            reservations: BTreeMap::new(),
            leases: BTreeMap::new(),
            sticky: BTreeMap::new(),
            cooldowns: BTreeMap::new(),
            events: VecDeque::new(),
            services: BTreeMap::new(),
            tokens: BTreeMap::new(),
            live_keys: BTreeMap::new(),
            lease_ports: BTreeSet::new(),
            cooldown_order: BTreeSet::new(),
            remembered: BTreeMap::new(),
            allocated: crate::portset::PortSet::default(),
            cooling: crate::portset::PortSet::default(),
            lease_services: BTreeMap::new(),
            last_conflicts: LastConflicts::default(),
        }
    }

    // ----- reads -------------------------------------------------------------------------

    pub fn revision(&self) -> u64 {
        self.meta.revision
    }

    /// How long a released port stays out of reach of every key but its own, in ms (0: off).
    pub fn cooldown_ms(&self) -> u64 {
        self.meta.cooldown_ms
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    pub fn allocation(&self, port: u16) -> Option<&Allocation> {
        // The bitmap says "none" without a walk of the map: an allocation's walk asks about every
        // free port it passes, most of them never allocated.
        if !self.allocated.contains(port) {
            return None;
        }
        self.allocations.get(&port).map(|a| &**a)
    }

    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.values().map(|a| &**a)
    }

    /// The allocations of ports `start..=end`, by port.
    pub fn allocations_in(&self, start: u16, end: u16) -> impl Iterator<Item = &Allocation> {
        self.allocations.range(start..=end).map(|(_, a)| &**a)
    }

    /// The ports of `start..=end` that no allocation holds, ascending (the allocated bitmap's
    /// gaps: a run of 64 allocated ports costs one step).
    pub fn unallocated_ports(&self, start: u16, end: u16) -> impl Iterator<Item = u16> + '_ {
        self.allocated.absent(start, end)
    }

    pub fn reservation(&self, port: u16) -> Option<&Reservation> {
        self.reservations.get(&port)
    }

    pub fn reservations(&self) -> impl Iterator<Item = &Reservation> {
        self.reservations.values()
    }

    pub fn cooldown(&self, port: u16) -> Option<&Cooldown> {
        // As for allocations: the bitmap answers for the ports that are not cooling.
        if !self.cooling.contains(port) {
            return None;
        }
        self.cooldowns.get(&port)
    }

    pub fn pool(&self, team: &str, name: &str) -> Option<&Pool> {
        self.pools.get(&(team.to_string(), name.to_string()))
    }

    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.values()
    }

    pub fn team_pools<'a>(&'a self, team: &'a str) -> impl Iterator<Item = &'a Pool> + 'a {
        self.pools.values().filter(move |p| p.team == team)
    }

    pub fn lease(&self, id: u64) -> Option<&Lease> {
        self.leases.get(&id).map(|l| &**l)
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values().map(|l| &**l)
    }

    /// How many leases are live.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// A lease's remaining TTL as of the last checkpoint: its deadline less the lease clock.
    pub fn lease_remaining_ms(&self, lease: &Lease) -> u64 {
        lease.deadline_ms.saturating_sub(self.meta.lease_clock_ms).min(lease.ttl_ms)
    }

    /// Ports attached to a lease.
    pub fn lease_ports(&self, id: u64) -> impl Iterator<Item = u16> + '_ {
        self.lease_ports.range((id, 0)..=(id, u16::MAX)).map(|&(_, port)| port)
    }

    /// The ports of `pool` that selection walks at `now_ms`, ascending: neither allocated nor
    /// cooling down, plus those whose cool-down ended and is not pruned yet (pruning is bounded
    /// per entry). Reads the allocated and cooling bitmaps: a run of 64 such ports costs one
    /// step, so the lowest free port of a pool with 50,000 allocations, or behind 10,000 ports
    /// released in the last minute, is found in ~1,000 steps, not 50,000. A port cooling down for
    /// a sticky key is that key's last port, which selection tries before walking the pool.
    ///
    /// Ports in `skip` (sorted, non-overlapping ranges: those known busy on the host,
    /// [`HostProbe::known_busy`](crate::HostProbe::known_busy)) are left out whole, not walked.
    pub fn selectable_ports<'a>(
        &'a self,
        pool: &'a Pool,
        now_ms: u64,
        skip: &'a [PortRange],
    ) -> impl Iterator<Item = u16> + 'a {
        let mut ended: Vec<u16> = self
            .ended_cooldowns(now_ms)
            .filter(|port| pool.contains(*port) && !in_ranges(skip, *port))
            .collect();
        ended.sort_unstable();
        let mut ended = ended.into_iter().peekable();
        let mut open = pool
            .ranges
            .iter()
            .flat_map(move |r| outside(r.start(), r.end(), skip))
            .flat_map(move |(start, end)| self.allocated.absent_from_both(&self.cooling, start, end))
            .peekable();
        std::iter::from_fn(move || match (open.peek(), ended.peek()) {
            (Some(o), Some(e)) if e < o => ended.next(),
            (Some(_), _) => open.next(),
            (None, _) => ended.next(),
        })
    }

    /// The ports `batch` asks for by number, and its keys' last ports: a node probes them afresh
    /// on every allocation, never takes them from what it remembers, and leaves them out of the
    /// ranges known busy (the user may just have stopped, or started, the program holding one).
    pub fn asked_for(&self, batch: &AllocateBatch) -> Vec<u16> {
        let sticky = |key: &String| self.sticky_port(&batch.team, key);
        batch.items.iter().flat_map(|i| i.port.into_iter().chain(i.key.as_ref().and_then(sticky))).collect()
    }

    /// Ports whose cool-down ended by `now_ms` and is not pruned yet, in the order they ended.
    fn ended_cooldowns(&self, now_ms: u64) -> impl Iterator<Item = u16> + '_ {
        self.cooldown_order.iter().take_while(move |(until, _)| *until <= now_ms).map(|&(_, port)| port)
    }

    /// `busy` (sorted: ports found busy on a host by an earlier probe) as ranges for
    /// [`HostProbe::known_busy`](crate::HostProbe::known_busy): two busy ports fall in one range when no port between them
    /// could be handed out (each is allocated, reserved, or cooling down), so a range holds
    /// nothing selection could pick but ports known busy. A pool filled past the host's ephemeral
    /// range has hundreds of busy ports below its lowest free one, between allocated ones: one
    /// range, skipped whole, instead of hundreds of ports carried in every allocation's entry and
    /// walked by every member (docs/architecture.md §1.2).
    pub fn busy_runs(&self, busy: &[u16], now_ms: u64) -> Vec<PortRange> {
        let mut ended: Vec<u16> = self.ended_cooldowns(now_ms).collect();
        ended.sort_unstable();
        // Whether nothing strictly between `a` and `b` (a < b) could be handed out.
        let closed_between = |a: u16, b: u16| {
            let (from, to) = (a + 1, b - 1);
            from > to
                || (self
                    .allocated
                    .absent_from_both(&self.cooling, from, to)
                    .all(|p| self.reservations.contains_key(&p))
                    && ended.get(ended.partition_point(|p| *p < from)).is_none_or(|p| *p > to))
        };
        let mut runs = Vec::new();
        let mut ports = busy.iter().copied().filter(|p| *p >= crate::MIN_PORT);
        let Some(first) = ports.next() else { return runs };
        let (mut start, mut end) = (first, first);
        for port in ports {
            if port <= end {
                continue;
            }
            if !closed_between(end, port) {
                runs.extend(PortRange::new(start.into(), end.into()).ok());
                start = port;
            }
            end = port;
        }
        runs.extend(PortRange::new(start.into(), end.into()).ok());
        runs
    }

    /// Records that sticky key `tk` now remembers `port` (and no longer its previous port).
    pub(crate) fn remember(&mut self, tk: (String, String), port: u16) {
        if let Some(old) = self.sticky.insert(tk, port)
            && let Some(n) = self.remembered.get_mut(&old)
        {
            *n -= 1;
            if *n == 0 {
                self.remembered.remove(&old);
            }
        }
        *self.remembered.entry(port).or_default() += 1;
    }

    /// Whether some sticky key remembers `port` as its last port.
    pub fn is_remembered(&self, port: u16) -> bool {
        self.remembered.contains_key(&port)
    }

    /// The port a sticky key last held (live or not).
    pub fn sticky_port(&self, team: &str, key: &str) -> Option<u16> {
        self.sticky.get(&(team.to_string(), key.to_string())).copied()
    }

    /// The live allocation of a sticky key.
    pub fn live_key(&self, team: &str, key: &str) -> Option<&Allocation> {
        self.live_keys.get(&(team.to_string(), key.to_string())).and_then(|p| self.allocation(*p))
    }

    pub fn service(&self, team: &str, id: &str) -> Option<&Service> {
        self.services.get(&(team.to_string(), id.to_string()))
    }

    /// Every registered service, by team and id.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    /// Services attached to a lease.
    pub fn lease_services(&self, id: u64) -> impl Iterator<Item = &Service> + '_ {
        self.lease_services.get(&id).into_iter().flatten().filter_map(|k| self.services.get(k))
    }

    pub fn token(&self, id: &str) -> Option<&Token> {
        self.tokens.get(id)
    }

    pub fn tokens(&self) -> impl Iterator<Item = &Token> {
        self.tokens.values()
    }

    /// Whether the cluster runs with authentication: it does from its first admin token on (and
    /// the last admin token cannot be revoked, so it never turns off by itself).
    pub fn auth_on(&self) -> bool {
        self.tokens.values().any(|t| t.role == Role::Admin)
    }

    /// Events with revision `>= from`, oldest first.
    pub fn events_since(&self, from: u64) -> impl DoubleEndedIterator<Item = &Event> {
        let start = self.events.partition_point(|e| e.revision < from);
        self.events.range(start..)
    }

    /// The oldest revision whose events are still kept (0 when none were ever dropped).
    pub fn oldest_event_revision(&self) -> u64 {
        self.events.front().map_or(0, |e| e.revision)
    }

    /// How full a pool is at time `now_ms`.
    pub fn pool_usage(&self, pool: &Pool, now_ms: u64) -> PoolUsage {
        let mut u = PoolUsage { size: pool.size(), allocated: 0, reserved: 0, cooling: 0 };
        for r in &pool.ranges {
            u.allocated += self.allocations_in(r.start(), r.end()).count() as u32;
            u.reserved += self.reservations.range(r.start()..=r.end()).count() as u32;
            u.cooling +=
                self.cooldowns.range(r.start()..=r.end()).filter(|(_, c)| c.until_ms > now_ms).count() as u32;
        }
        u
    }

    /// Ports worth probing on the host before proposing `batch`: for each item, the wanted port
    /// and the ports `apply` would try next, in its order (see [`PlanWidth`]). Candidates for later
    /// items grow by the number of items, since earlier items of the batch take ports first.
    ///
    /// `known_busy` are the ranges the proposal will carry as [`HostProbe::known_busy`](crate::HostProbe::known_busy) (from
    /// [`State::busy_runs`]): the plan skips them as `apply` will. Busy ports are never allocated
    /// and so stay free in the state; below the lowest free port they would otherwise fill every
    /// plan, which then misses the ports `apply` reaches and asks for another probe (measured: a
    /// fill past 30 busy ports of the ephemeral range retried most allocations twice;
    /// docs/benchmarks.md).
    pub fn plan(
        &self,
        batch: &AllocateBatch,
        now_ms: u64,
        width: PlanWidth,
        seed: u64,
        known_busy: &[PortRange],
    ) -> Vec<u16> {
        // Not the batch's own probe: that is the previous round's, if any.
        let sel = self.selector(batch, now_ms, known_busy);
        let mut rng = SplitMix64::new(seed);
        // A vector sorted once, not a set: when plans still held every port known busy below
        // the first free one, inserting each into a B-tree was 15 % of a filling node's CPU
        // (docs/benchmarks.md, eighteenth slice); a vector costs no more for the few left.
        let mut out = Vec::new();
        let k = batch.items.len();
        let width = PlanWidth { wanted_free: width.wanted_free, otherwise: width.otherwise + k };
        for item in &batch.items {
            if item.key.as_deref().is_some_and(|key| self.live_key(&batch.team, key).is_some()) {
                continue;
            }
            out.extend(sel.candidates(item, width, &mut rng));
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The selector for `batch`, whose walks skip `known_busy`.
    fn selector<'a>(
        &'a self,
        batch: &'a AllocateBatch,
        now_ms: u64,
        known_busy: &'a [PortRange],
    ) -> Selector<'a> {
        Selector {
            state: self,
            team: &batch.team,
            host: &batch.host,
            now_ms,
            probe: batch.probe.as_ref(),
            known_busy,
            taken: BTreeSet::new(),
        }
    }

    // ----- the mutator -------------------------------------------------------------------

    /// Applies one command. Deterministic: the same state, context and command give the same
    /// result on every replica. Rejections change nothing.
    pub fn apply(&mut self, ctx: ApplyCtx, cmd: &Command) -> Response {
        self.prune_cooldowns(ctx.now_ms);
        let result = match cmd {
            Command::Allocate(batch) => self.allocate(ctx, batch),
            Command::Release { team, selector } => self.release(ctx, team, selector),
            Command::Reserve { port, reason } => self.reserve(ctx, *port, reason),
            Command::Unreserve { port } => self.unreserve(ctx, *port),
            Command::AddPool { team, name, ranges } => self.add_pool(ctx, team, name, ranges),
            Command::RemovePool { team, name } => self.remove_pool(ctx, team, name),
            Command::GrantLease { team, ttl_ms } => self.grant_lease(ctx, team, *ttl_ms),
            Command::RevokeLease { team, id } => self.revoke_lease(ctx, team, *id),
            Command::CheckpointLeases { clock_ms, remaining } => Ok(self.checkpoint(*clock_ms, remaining)),
            Command::ExpireLeases { ids } => Ok(self.expire(ctx, ids)),
            Command::SetCooldown { ms } => {
                self.meta.cooldown_ms = *ms;
                let revision = self.bump();
                self.emit(revision, ctx.now_ms, EventKind::CooldownChanged { ms: *ms });
                Ok(Response::CooldownSet { ms: *ms, revision })
            }
            Command::Register(svc) => self.register(ctx, svc),
            Command::Deregister { team, id } => self.deregister(ctx, team, id),
            Command::SetHealth { updates } => Ok(self.set_health(ctx, updates)),
            Command::AddToken(t) => self.add_token(ctx, t),
            Command::RevokeToken { id } => self.revoke_token(id),
            Command::UseToken { id } => self.use_token(ctx, id),
        };
        result.unwrap_or_else(Response::Rejected)
    }

    fn bump(&mut self) -> u64 {
        self.meta.revision += 1;
        self.meta.revision
    }

    fn emit(&mut self, revision: u64, at_ms: u64, kind: EventKind) {
        let seq = match self.events.back() {
            Some(last) if last.revision == revision => last.seq + 1,
            _ => 0,
        };
        let event = Event { revision, seq, at_ms, kind };
        if let EventKind::Conflict(c) = &event.kind {
            self.last_conflicts.note(&event, c);
        }
        // Room for the event before it goes in, and the history's capacity grown by doubling but
        // never past the retention: doubling from 8,192 kept room for 16,384 events, 1.5 MB
        // that were never used.
        while self.events.len() >= EVENT_RETENTION {
            if let Some(old) = self.events.pop_front()
                && let EventKind::Conflict(c) = &old.kind
            {
                self.last_conflicts.forget(&old, c);
            }
        }
        if self.events.len() == self.events.capacity() {
            self.events.reserve_exact(self.events.len().max(16).min(EVENT_RETENTION - self.events.len()));
        }
        self.events.push_back(event);
    }

    /// Forgets cool-downs that ended (a bounded number per entry, so no entry does unbounded work).
    fn prune_cooldowns(&mut self, now_ms: u64) {
        for _ in 0..64 {
            match self.cooldown_order.first() {
                Some(&(until, port)) if until <= now_ms => {
                    self.cooldown_order.remove(&(until, port));
                    self.cooldowns.remove(&port);
                    self.cooling.remove(port);
                }
                _ => break,
            }
        }
    }
}

pub use records::{Key, Record};
pub use registry::clip_output;

/// The parts of `start..=end` outside `skip` (sorted, non-overlapping ranges), ascending.
fn outside(start: u16, end: u16, skip: &[PortRange]) -> impl Iterator<Item = (u16, u16)> + '_ {
    let mut rest = skip[skip.partition_point(|r| r.end() < start)..].iter();
    // Where the next part may start; none once `end` is covered.
    let mut from = Some(start);
    std::iter::from_fn(move || {
        loop {
            let at = from?;
            match rest.next() {
                Some(r) if r.start() <= end => {
                    from = r.end().checked_add(1).filter(|next| *next <= end);
                    if r.start() > at {
                        return Some((at, r.start() - 1));
                    }
                }
                _ => {
                    from = None;
                    return Some((at, end));
                }
            }
        }
    })
}

pub(crate) fn check_ttl(ttl_ms: u64) -> Result<(), Rejection> {
    if (MIN_TTL_MS..=MAX_TTL_MS).contains(&ttl_ms) { Ok(()) } else { Err(Rejection::BadTtl { ttl_ms }) }
}

/// The name rule of `crate::text` (the boundary checks it first; `apply` checks again).
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), Rejection> {
    crate::text::check_name(what, name).map_err(|_| {
        Rejection::Invalid(format!(
            "{what} name {name:?} is not valid: use 1-{} letters, digits, '-', '_' or '.'",
            crate::text::MAX_NAME
        ))
    })
}

mod alloc;
mod leases;
mod pools;
mod records;
mod registry;
#[cfg(test)]
mod tests;
mod tokens;
