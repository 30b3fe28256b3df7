//! The state machine: [`State`] and its one mutator, [`State::apply`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::command::{
    AllocItem, AllocateBatch, ApplyCtx, Command, Grant, LeaseSpec, ReleaseSelector, Response,
};
use crate::rejection::{Overlap, Rejection};
use crate::rng::SplitMix64;
use crate::select::{Pick, PlanWidth, Selector};
use crate::types::{
    Allocation, CheckKind, Conflict, Cooldown, Event, EventKind, HealthStatus, HealthUpdate, Lease, Pool,
    PortRange, ReleaseCause, Reservation, Service, default_pools,
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
}

/// Names one persisted record. The store maps each key to a sled key and writes what
/// [`State::record`] returns for it (or deletes it when that is `None`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Meta,
    Pool(String, String),
    Alloc(u16),
    Reservation(u16),
    Lease(u64),
    Sticky(String, String),
    Cooldown(u16),
    Event(u64, u32),
    /// A registered service: team, id.
    Service(String, String),
}

/// One record of the state, owned. A state is exactly the set of its records; the store
/// persists each (in its own encoding, `portmesh_store::ondisk`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Meta(Meta),
    Pool(Pool),
    Reservation(Reservation),
    Lease(Lease),
    Sticky { team: String, key: String, port: u16 },
    Cooldown { port: u16, cooldown: Cooldown },
    Service(Box<Service>),
    Alloc(Allocation),
    Event(Event),
}

impl Record {
    pub fn key(&self) -> Key {
        match self {
            Record::Meta(_) => Key::Meta,
            Record::Pool(p) => Key::Pool(p.team.clone(), p.name.clone()),
            Record::Alloc(a) => Key::Alloc(a.port),
            Record::Reservation(r) => Key::Reservation(r.port),
            Record::Lease(l) => Key::Lease(l.id),
            Record::Sticky { team, key, .. } => Key::Sticky(team.clone(), key.clone()),
            Record::Cooldown { port, .. } => Key::Cooldown(*port),
            Record::Event(e) => Key::Event(e.revision, e.seq),
            Record::Service(svc) => Key::Service(svc.team.clone(), svc.id.clone()),
        }
    }
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
/// - `live_keys`, `lease_ports` and `cooldown_order` are exact indexes of the primary maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    meta: Meta,
    pools: BTreeMap<(String, String), Pool>,
    allocations: BTreeMap<u16, Allocation>,
    reservations: BTreeMap<u16, Reservation>,
    leases: BTreeMap<u64, Lease>,
    sticky: BTreeMap<(String, String), u16>,
    cooldowns: BTreeMap<u16, Cooldown>,
    events: VecDeque<Event>,
    services: BTreeMap<(String, String), Service>,
    // Derived indexes, rebuilt on load.
    live_keys: BTreeMap<(String, String), u16>,
    lease_ports: BTreeMap<u64, BTreeSet<u16>>,
    cooldown_order: BTreeSet<(u64, u16)>,
    /// Services attached to each lease: team, id.
    lease_services: BTreeMap<u64, BTreeSet<(String, String)>>,
    /// Records changed since the last [`State::take_dirty`].
    dirty: BTreeSet<Key>,
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    /// A fresh cluster's state: team `default` with the default pools, all marked dirty so the
    /// first write persists them.
    pub fn new() -> Self {
        let mut s = Self::empty();
        for (name, range) in default_pools() {
            let pool =
                Pool { team: DEFAULT_TEAM.into(), name: name.into(), ranges: vec![range], revision: 0 };
            s.dirty.insert(Key::Pool(pool.team.clone(), pool.name.clone()));
            s.pools.insert((pool.team.clone(), pool.name.clone()), pool);
        }
        s.dirty.insert(Key::Meta);
        s
    }

    fn empty() -> Self {
        Self {
            meta: Meta { revision: 0, next_lease_id: 1, cooldown_ms: DEFAULT_COOLDOWN_MS },
            pools: BTreeMap::new(),
            allocations: BTreeMap::new(),
            reservations: BTreeMap::new(),
            leases: BTreeMap::new(),
            sticky: BTreeMap::new(),
            cooldowns: BTreeMap::new(),
            events: VecDeque::new(),
            services: BTreeMap::new(),
            live_keys: BTreeMap::new(),
            lease_ports: BTreeMap::new(),
            cooldown_order: BTreeSet::new(),
            lease_services: BTreeMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// Rebuilds a state from its records. Without a `Meta` record the store held nothing yet and
    /// the result is [`State::new`].
    pub fn from_records(records: impl IntoIterator<Item = Record>) -> Self {
        let mut s = Self::empty();
        let mut has_meta = false;
        for r in records {
            match r {
                Record::Meta(m) => {
                    s.meta = m;
                    has_meta = true;
                }
                Record::Pool(p) => {
                    s.pools.insert((p.team.clone(), p.name.clone()), p);
                }
                Record::Alloc(a) => {
                    if let Some(k) = &a.key {
                        s.live_keys.insert((a.team.clone(), k.clone()), a.port);
                    }
                    if let Some(l) = a.lease_id {
                        s.lease_ports.entry(l).or_default().insert(a.port);
                    }
                    s.allocations.insert(a.port, a);
                }
                Record::Reservation(r) => {
                    s.reservations.insert(r.port, r);
                }
                Record::Lease(l) => {
                    s.leases.insert(l.id, l);
                }
                Record::Sticky { team, key, port } => {
                    s.sticky.insert((team, key), port);
                }
                Record::Cooldown { port, cooldown } => {
                    s.cooldown_order.insert((cooldown.until_ms, port));
                    s.cooldowns.insert(port, cooldown);
                }
                Record::Event(e) => s.events.push_back(e),
                Record::Service(svc) => s.insert_service_unmarked(*svc),
            }
        }
        if !has_meta {
            return Self::new();
        }
        s.events.make_contiguous().sort_by_key(|e| (e.revision, e.seq));
        s
    }

    /// Every record of the state, for snapshots.
    pub fn records(&self) -> impl Iterator<Item = Record> + '_ {
        std::iter::once(Record::Meta(self.meta.clone()))
            .chain(self.pools.values().cloned().map(Record::Pool))
            .chain(self.allocations.values().cloned().map(Record::Alloc))
            .chain(self.reservations.values().cloned().map(Record::Reservation))
            .chain(self.leases.values().cloned().map(Record::Lease))
            .chain(self.sticky.iter().map(|((team, key), port)| Record::Sticky {
                team: team.clone(),
                key: key.clone(),
                port: *port,
            }))
            .chain(self.cooldowns.iter().map(|(p, c)| Record::Cooldown { port: *p, cooldown: c.clone() }))
            .chain(self.events.iter().cloned().map(Record::Event))
            .chain(self.services.values().map(|svc| Record::Service(Box::new(svc.clone()))))
    }

    /// The current value of one record, `None` if it no longer exists.
    pub fn record(&self, key: &Key) -> Option<Record> {
        match key {
            Key::Meta => Some(Record::Meta(self.meta.clone())),
            Key::Pool(t, n) => self.pools.get(&(t.clone(), n.clone())).cloned().map(Record::Pool),
            Key::Alloc(p) => self.allocations.get(p).cloned().map(Record::Alloc),
            Key::Reservation(p) => self.reservations.get(p).cloned().map(Record::Reservation),
            Key::Lease(id) => self.leases.get(id).cloned().map(Record::Lease),
            Key::Sticky(t, k) => self.sticky.get(&(t.clone(), k.clone())).map(|p| Record::Sticky {
                team: t.clone(),
                key: k.clone(),
                port: *p,
            }),
            Key::Cooldown(p) => {
                self.cooldowns.get(p).map(|c| Record::Cooldown { port: *p, cooldown: c.clone() })
            }
            Key::Event(rev, seq) => self
                .events
                .binary_search_by_key(&(*rev, *seq), |e| (e.revision, e.seq))
                .ok()
                .map(|i| Record::Event(self.events[i].clone())),
            Key::Service(t, id) => {
                self.services.get(&(t.clone(), id.clone())).map(|svc| Record::Service(Box::new(svc.clone())))
            }
        }
    }

    /// The keys changed since the last call; the store persists exactly these.
    pub fn take_dirty(&mut self) -> BTreeSet<Key> {
        std::mem::take(&mut self.dirty)
    }

    // ----- reads -------------------------------------------------------------------------

    pub fn revision(&self) -> u64 {
        self.meta.revision
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    pub fn allocation(&self, port: u16) -> Option<&Allocation> {
        self.allocations.get(&port)
    }

    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.values()
    }

    pub fn reservation(&self, port: u16) -> Option<&Reservation> {
        self.reservations.get(&port)
    }

    pub fn reservations(&self) -> impl Iterator<Item = &Reservation> {
        self.reservations.values()
    }

    pub fn cooldown(&self, port: u16) -> Option<&Cooldown> {
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
        self.leases.get(&id)
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Ports attached to a lease.
    pub fn lease_ports(&self, id: u64) -> impl Iterator<Item = u16> + '_ {
        self.lease_ports.get(&id).into_iter().flatten().copied()
    }

    /// The ports of `pool` that no allocation holds, ascending. Walks the allocations alongside
    /// the pool's ranges: a run of allocated ports costs a comparison each, not a lookup.
    pub fn unallocated_ports<'a>(&'a self, pool: &'a Pool) -> impl Iterator<Item = u16> + 'a {
        pool.ranges.iter().flat_map(move |r| {
            let mut held = self.allocations.range(r.start()..=r.end()).map(|(p, _)| *p).peekable();
            r.ports().filter(move |p| {
                while held.next_if(|h| h < p).is_some() {}
                held.next_if_eq(p).is_none()
            })
        })
    }

    /// The port a sticky key last held (live or not).
    pub fn sticky_port(&self, team: &str, key: &str) -> Option<u16> {
        self.sticky.get(&(team.to_string(), key.to_string())).copied()
    }

    /// The live allocation of a sticky key.
    pub fn live_key(&self, team: &str, key: &str) -> Option<&Allocation> {
        self.live_keys.get(&(team.to_string(), key.to_string())).and_then(|p| self.allocations.get(p))
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
            u.allocated += self.allocations.range(r.start()..=r.end()).count() as u32;
            u.reserved += self.reservations.range(r.start()..=r.end()).count() as u32;
            u.cooling +=
                self.cooldowns.range(r.start()..=r.end()).filter(|(_, c)| c.until_ms > now_ms).count() as u32;
        }
        u
    }

    /// Ports worth probing on the host before proposing `batch`: for each item, the wanted port
    /// and the ports `apply` would try next, in its order (see [`PlanWidth`]). Candidates for later
    /// items grow by the number of items, since earlier items of the batch take ports first.
    pub fn plan(&self, batch: &AllocateBatch, now_ms: u64, width: PlanWidth, seed: u64) -> Vec<u16> {
        let sel = self.selector(batch, now_ms);
        let mut rng = SplitMix64::new(seed);
        let mut out = BTreeSet::new();
        let k = batch.items.len();
        let width = PlanWidth { wanted_free: width.wanted_free, otherwise: width.otherwise + k };
        for item in &batch.items {
            if item.key.as_deref().is_some_and(|key| self.live_key(&batch.team, key).is_some()) {
                continue;
            }
            out.extend(sel.candidates(item, width, &mut rng));
        }
        out.into_iter().collect()
    }

    fn selector<'a>(&'a self, batch: &'a AllocateBatch, now_ms: u64) -> Selector<'a> {
        Selector {
            state: self,
            team: &batch.team,
            host: &batch.host,
            now_ms,
            probe: batch.probe.as_ref(),
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
            Command::CheckpointLeases { remaining } => Ok(self.checkpoint(remaining)),
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
        };
        result.unwrap_or_else(Response::Rejected)
    }

    fn bump(&mut self) -> u64 {
        self.meta.revision += 1;
        self.dirty.insert(Key::Meta);
        self.meta.revision
    }

    fn emit(&mut self, revision: u64, at_ms: u64, kind: EventKind) {
        let seq = match self.events.back() {
            Some(last) if last.revision == revision => last.seq + 1,
            _ => 0,
        };
        self.dirty.insert(Key::Event(revision, seq));
        self.events.push_back(Event { revision, seq, at_ms, kind });
        while self.events.len() > EVENT_RETENTION {
            if let Some(old) = self.events.pop_front() {
                self.dirty.insert(Key::Event(old.revision, old.seq));
            }
        }
    }

    /// Forgets cool-downs that ended (a bounded number per entry, so no entry does unbounded work).
    fn prune_cooldowns(&mut self, now_ms: u64) {
        for _ in 0..64 {
            match self.cooldown_order.first() {
                Some(&(until, port)) if until <= now_ms => {
                    self.cooldown_order.remove(&(until, port));
                    self.cooldowns.remove(&port);
                    self.dirty.insert(Key::Cooldown(port));
                }
                _ => break,
            }
        }
    }

    fn allocate(&mut self, ctx: ApplyCtx, batch: &AllocateBatch) -> Result<Response, Rejection> {
        if batch.items.is_empty() {
            return Err(Rejection::Invalid("an allocation needs at least one item".into()));
        }
        if batch.items.len() > MAX_BATCH {
            return Err(Rejection::Invalid(format!(
                "a batch holds at most {MAX_BATCH} items, this one has {}",
                batch.items.len()
            )));
        }
        let mut keys = BTreeSet::new();
        for item in &batch.items {
            if item.service.is_empty() {
                return Err(Rejection::Invalid("every allocation needs a service name".into()));
            }
            if let Some(k) = &item.key
                && !keys.insert(k.as_str())
            {
                return Err(Rejection::Invalid(format!("key {k:?} appears twice in one batch")));
            }
        }
        let lease_id = match batch.lease {
            LeaseSpec::None => None,
            LeaseSpec::Existing(id) => match self.leases.get(&id) {
                Some(l) if l.team == batch.team => Some(id),
                _ => return Err(Rejection::UnknownLease { team: batch.team.clone(), id }),
            },
            LeaseSpec::New { ttl_ms } => {
                check_ttl(ttl_ms)?;
                Some(self.meta.next_lease_id)
            }
        };

        // Phase 1: choose every port without touching the state.
        enum Plan<'i> {
            Existing(u16),
            New(&'i AllocItem, Pick),
        }
        let mut rng = SplitMix64::new(ctx.seed());
        let mut sel = self.selector(batch, ctx.now_ms);
        let mut plans = Vec::with_capacity(batch.items.len());
        for item in &batch.items {
            if let Some(a) = item.key.as_deref().and_then(|k| self.live_key(&batch.team, k)) {
                plans.push(Plan::Existing(a.port));
                continue;
            }
            let pick = sel.pick(item, &mut rng)?;
            sel.taken.insert(pick.port);
            plans.push(Plan::New(item, pick));
        }

        // Phase 2: commit.
        let revision = self.bump();
        let now = ctx.now_ms;
        let lease = match batch.lease {
            LeaseSpec::New { ttl_ms } => Some(self.insert_lease(revision, now, &batch.team, ttl_ms)),
            _ => None,
        };
        let mut grants = Vec::with_capacity(plans.len());
        for plan in plans {
            match plan {
                Plan::Existing(port) => {
                    if let Some(a) = self.allocations.get(&port) {
                        grants.push(Grant { allocation: a.clone(), existing: true });
                    }
                }
                Plan::New(item, pick) => {
                    for port in pick.conflicts {
                        let c = Conflict {
                            port,
                            team: batch.team.clone(),
                            pool: pick.pool.clone(),
                            service: item.service.clone(),
                            host: batch.host.clone(),
                            holder: batch.probe.as_ref().and_then(|p| p.owner(port)).cloned(),
                        };
                        self.emit(revision, now, EventKind::Conflict(c));
                    }
                    let a = Allocation {
                        port: pick.port,
                        team: batch.team.clone(),
                        pool: pick.pool,
                        service: item.service.clone(),
                        instance: item.instance.clone(),
                        env: item.env.clone(),
                        host: batch.host.clone(),
                        key: item.key.clone(),
                        lease_id,
                        created_ms: now,
                        revision,
                        holder: batch.holder.clone(),
                    };
                    self.insert_allocation(a.clone());
                    self.emit(revision, now, EventKind::Allocated(a.clone()));
                    grants.push(Grant { allocation: a, existing: false });
                }
            }
        }
        Ok(Response::Allocated { grants, lease, revision })
    }

    fn insert_allocation(&mut self, a: Allocation) {
        let port = a.port;
        if let Some(k) = &a.key {
            let tk = (a.team.clone(), k.clone());
            self.live_keys.insert(tk.clone(), port);
            self.sticky.insert(tk, port);
            self.dirty.insert(Key::Sticky(a.team.clone(), k.clone()));
        }
        if let Some(l) = a.lease_id {
            self.lease_ports.entry(l).or_default().insert(port);
        }
        if let Some(c) = self.cooldowns.remove(&port) {
            self.cooldown_order.remove(&(c.until_ms, port));
            self.dirty.insert(Key::Cooldown(port));
        }
        self.allocations.insert(port, a);
        self.dirty.insert(Key::Alloc(port));
    }

    /// Removes one allocation, starts its cool-down and emits the event.
    fn remove_allocation(
        &mut self,
        port: u16,
        cause: ReleaseCause,
        revision: u64,
        now: u64,
    ) -> Option<Allocation> {
        let a = self.allocations.remove(&port)?;
        self.dirty.insert(Key::Alloc(port));
        if let Some(k) = &a.key {
            self.live_keys.remove(&(a.team.clone(), k.clone()));
        }
        if let Some(l) = a.lease_id
            && let Some(set) = self.lease_ports.get_mut(&l)
        {
            set.remove(&port);
            if set.is_empty() {
                self.lease_ports.remove(&l);
            }
        }
        if self.meta.cooldown_ms > 0 {
            let until_ms = now.saturating_add(self.meta.cooldown_ms);
            let c = Cooldown { until_ms, team: a.team.clone(), key: a.key.clone() };
            if let Some(old) = self.cooldowns.insert(port, c) {
                self.cooldown_order.remove(&(old.until_ms, port));
            }
            self.cooldown_order.insert((until_ms, port));
            self.dirty.insert(Key::Cooldown(port));
        }
        self.emit(revision, now, EventKind::Released { allocation: a.clone(), cause });
        Some(a)
    }

    fn release(
        &mut self,
        ctx: ApplyCtx,
        team: &str,
        selector: &ReleaseSelector,
    ) -> Result<Response, Rejection> {
        let ports: Vec<u16> = match selector {
            ReleaseSelector::Ports(ports) => {
                if ports.is_empty() {
                    return Err(Rejection::Invalid("name at least one port to release".into()));
                }
                for &port in ports {
                    if port < crate::MIN_PORT {
                        return Err(Rejection::PortOutOfRange { port: u32::from(port) });
                    }
                    match self.allocations.get(&port) {
                        Some(a) if a.team == team => {}
                        _ => return Err(Rejection::NotAllocated { team: team.to_string(), port }),
                    }
                }
                let mut p = ports.clone();
                p.sort_unstable();
                p.dedup();
                p
            }
            ReleaseSelector::Key(key) => match self.live_key(team, key) {
                Some(a) => vec![a.port],
                None => return Err(Rejection::UnknownKey { team: team.to_string(), key: key.clone() }),
            },
        };
        let revision = self.bump();
        let allocations = ports
            .into_iter()
            .filter_map(|p| self.remove_allocation(p, ReleaseCause::Released, revision, ctx.now_ms))
            .collect();
        Ok(Response::Released { allocations, revision })
    }

    fn reserve(&mut self, ctx: ApplyCtx, port: u16, reason: &str) -> Result<Response, Rejection> {
        if port < crate::MIN_PORT {
            return Err(Rejection::PortOutOfRange { port: u32::from(port) });
        }
        if let Some(r) = self.reservations.get(&port) {
            return Err(Rejection::AlreadyReserved { port, reason: r.reason.clone() });
        }
        if let Some(a) = self.allocations.get(&port) {
            return Err(Rejection::ReserveAllocated {
                port,
                team: a.team.clone(),
                service: a.service.clone(),
            });
        }
        let revision = self.bump();
        let r = Reservation { port, reason: reason.to_string(), created_ms: ctx.now_ms, revision };
        self.reservations.insert(port, r.clone());
        self.dirty.insert(Key::Reservation(port));
        self.emit(revision, ctx.now_ms, EventKind::Reserved(r.clone()));
        Ok(Response::Reserved(r))
    }

    fn unreserve(&mut self, ctx: ApplyCtx, port: u16) -> Result<Response, Rejection> {
        if self.reservations.remove(&port).is_none() {
            return Err(Rejection::NotReserved { port });
        }
        self.dirty.insert(Key::Reservation(port));
        let revision = self.bump();
        self.emit(revision, ctx.now_ms, EventKind::Unreserved { port });
        Ok(Response::Unreserved { port, revision })
    }

    fn add_pool(
        &mut self,
        ctx: ApplyCtx,
        team: &str,
        name: &str,
        ranges: &[PortRange],
    ) -> Result<Response, Rejection> {
        check_name("team", team)?;
        check_name("pool", name)?;
        if ranges.is_empty() {
            return Err(Rejection::InvalidRange(format!("pool {name:?} needs at least one range")));
        }
        let mut sorted = ranges.to_vec();
        sorted.sort();
        for w in sorted.windows(2) {
            if w[0].overlaps(&w[1]) {
                return Err(Rejection::InvalidRange(format!(
                    "ranges {} and {} of pool {name:?} overlap each other",
                    w[0], w[1]
                )));
            }
        }
        if let Some(p) = self.pool(team, name) {
            return Err(Rejection::PoolExists {
                team: team.into(),
                pool: name.into(),
                ranges: p.ranges_text(),
            });
        }
        for r in &sorted {
            for p in self.pools.values() {
                if let Some(o) = p.ranges.iter().find(|o| o.overlaps(r)) {
                    return Err(Rejection::RangeOverlap(Box::new(Overlap {
                        team: team.into(),
                        pool: name.into(),
                        range: r.to_string(),
                        other_team: p.team.clone(),
                        other_pool: p.name.clone(),
                        other_range: o.to_string(),
                    })));
                }
            }
        }
        let revision = self.bump();
        let pool = Pool { team: team.into(), name: name.into(), ranges: sorted, revision };
        self.pools.insert((team.into(), name.into()), pool.clone());
        self.dirty.insert(Key::Pool(team.into(), name.into()));
        self.emit(revision, ctx.now_ms, EventKind::PoolAdded(pool.clone()));
        Ok(Response::PoolAdded(pool))
    }

    fn remove_pool(&mut self, ctx: ApplyCtx, team: &str, name: &str) -> Result<Response, Rejection> {
        let Some(pool) = self.pool(team, name) else {
            let known = self.team_pools(team).map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ");
            return Err(Rejection::UnknownPool { team: team.into(), pool: name.into(), known });
        };
        let live = self.allocations.values().filter(|a| a.team == team && a.pool == name).count();
        if live > 0 {
            return Err(Rejection::PoolInUse { team: team.into(), pool: pool.name.clone(), live });
        }
        self.pools.remove(&(team.to_string(), name.to_string()));
        self.dirty.insert(Key::Pool(team.into(), name.into()));
        let revision = self.bump();
        self.emit(revision, ctx.now_ms, EventKind::PoolRemoved { team: team.into(), name: name.into() });
        Ok(Response::PoolRemoved { team: team.into(), name: name.into(), revision })
    }

    fn insert_lease(&mut self, revision: u64, now: u64, team: &str, ttl_ms: u64) -> Lease {
        let id = self.meta.next_lease_id;
        self.meta.next_lease_id += 1;
        let lease = Lease { id, team: team.into(), ttl_ms, remaining_ms: ttl_ms, granted_ms: now, revision };
        self.leases.insert(id, lease.clone());
        self.dirty.insert(Key::Lease(id));
        self.dirty.insert(Key::Meta);
        self.emit(revision, now, EventKind::LeaseGranted { id, team: team.into(), ttl_ms });
        lease
    }

    fn grant_lease(&mut self, ctx: ApplyCtx, team: &str, ttl_ms: u64) -> Result<Response, Rejection> {
        check_ttl(ttl_ms)?;
        check_name("team", team)?;
        let revision = self.bump();
        Ok(Response::LeaseGranted(self.insert_lease(revision, ctx.now_ms, team, ttl_ms)))
    }

    /// Drops a lease and releases everything attached, under one revision.
    fn end_lease(&mut self, id: u64, cause: ReleaseCause, revision: u64, now: u64) -> Vec<Allocation> {
        let Some(lease) = self.leases.remove(&id) else { return Vec::new() };
        self.dirty.insert(Key::Lease(id));
        let ports: Vec<u16> = self.lease_ports(id).collect();
        let released =
            ports.into_iter().filter_map(|p| self.remove_allocation(p, cause, revision, now)).collect();
        let services: Vec<(String, String)> =
            self.lease_services.get(&id).into_iter().flatten().cloned().collect();
        for key in services {
            self.remove_service(&key, cause, revision, now);
        }
        let kind = match cause {
            ReleaseCause::LeaseExpired => EventKind::LeaseExpired { id, team: lease.team },
            _ => EventKind::LeaseRevoked { id, team: lease.team },
        };
        self.emit(revision, now, kind);
        released
    }

    fn revoke_lease(&mut self, ctx: ApplyCtx, team: &str, id: u64) -> Result<Response, Rejection> {
        match self.leases.get(&id) {
            Some(l) if l.team == team => {}
            _ => return Err(Rejection::UnknownLease { team: team.into(), id }),
        }
        let revision = self.bump();
        let released = self.end_lease(id, ReleaseCause::LeaseRevoked, revision, ctx.now_ms);
        Ok(Response::LeaseRevoked { id, released, revision })
    }

    fn checkpoint(&mut self, remaining: &[(u64, u64)]) -> Response {
        let mut n = 0;
        for &(id, ms) in remaining {
            if let Some(l) = self.leases.get_mut(&id) {
                l.remaining_ms = ms.min(l.ttl_ms);
                self.dirty.insert(Key::Lease(id));
                n += 1;
            }
        }
        Response::Checkpointed { leases: n }
    }

    fn expire(&mut self, ctx: ApplyCtx, ids: &[u64]) -> Response {
        let live: Vec<u64> = ids.iter().copied().filter(|id| self.leases.contains_key(id)).collect();
        if live.is_empty() {
            return Response::Expired { ids: Vec::new(), released: Vec::new(), revision: self.meta.revision };
        }
        let revision = self.bump();
        let mut released = Vec::new();
        for id in &live {
            released.extend(self.end_lease(*id, ReleaseCause::LeaseExpired, revision, ctx.now_ms));
        }
        Response::Expired { ids: live, released, revision }
    }
}

impl State {
    // ----- the registry ------------------------------------------------------------------

    /// Inserts a service and indexes it, without marking it dirty (loading).
    fn insert_service_unmarked(&mut self, svc: Service) {
        let key = (svc.team.clone(), svc.id.clone());
        if let Some(l) = svc.lease_id {
            self.lease_services.entry(l).or_default().insert(key.clone());
        }
        self.services.insert(key, svc);
    }

    /// Removes a service and its index entry; marks it dirty.
    fn take_service(&mut self, key: &(String, String)) -> Option<Service> {
        let svc = self.services.remove(key)?;
        self.dirty.insert(Key::Service(key.0.clone(), key.1.clone()));
        if let Some(l) = svc.lease_id
            && let Some(set) = self.lease_services.get_mut(&l)
        {
            set.remove(key);
            if set.is_empty() {
                self.lease_services.remove(&l);
            }
        }
        Some(svc)
    }

    fn remove_service(&mut self, key: &(String, String), cause: ReleaseCause, revision: u64, now: u64) {
        if let Some(svc) = self.take_service(key) {
            self.emit(revision, now, EventKind::ServiceDeregistered { service: Box::new(svc), cause });
        }
    }

    fn register(&mut self, ctx: ApplyCtx, svc: &Service) -> Result<Response, Rejection> {
        check_service(svc)?;
        if let Some(id) = svc.lease_id {
            match self.leases.get(&id) {
                Some(l) if l.team == svc.team => {}
                _ => return Err(Rejection::UnknownLease { team: svc.team.clone(), id }),
            }
        }
        let key = (svc.team.clone(), svc.id.clone());
        let previous = self.take_service(&key);
        let revision = self.bump();
        let now = ctx.now_ms;
        let mut new = svc.clone();
        new.registered_ms = now;
        new.revision = revision;
        // Re-registering the same service with the same check keeps what its checks found.
        match previous.as_ref().filter(|p| p.check == new.check && p.host == new.host && p.ports == new.ports)
        {
            Some(p) => {
                new.status = p.status;
                new.output = p.output.clone();
                new.status_ms = p.status_ms;
            }
            None => {
                new.status = if new.check.is_some() { HealthStatus::Unknown } else { HealthStatus::Passing };
                new.output = String::new();
                new.status_ms = now;
            }
        }
        self.dirty.insert(Key::Service(key.0.clone(), key.1.clone()));
        self.insert_service_unmarked(new.clone());
        self.emit(revision, now, EventKind::ServiceRegistered(Box::new(new.clone())));
        Ok(Response::Registered { service: Box::new(new), replaced: previous.is_some(), revision })
    }

    fn deregister(&mut self, ctx: ApplyCtx, team: &str, id: &str) -> Result<Response, Rejection> {
        let Some(svc) = self.take_service(&(team.to_string(), id.to_string())) else {
            return Err(Rejection::UnknownService { team: team.into(), id: id.into() });
        };
        let revision = self.bump();
        let kind =
            EventKind::ServiceDeregistered { service: Box::new(svc.clone()), cause: ReleaseCause::Released };
        self.emit(revision, ctx.now_ms, kind);
        Ok(Response::Deregistered { service: Box::new(svc), revision })
    }

    /// Applies the updates that change a status (one revision for all of them); the others,
    /// and updates of services that are gone, are ignored.
    fn set_health(&mut self, ctx: ApplyCtx, updates: &[HealthUpdate]) -> Response {
        let mut revision = None;
        let mut changed = 0;
        for u in updates {
            let key = (u.team.clone(), u.id.clone());
            if self.services.get(&key).is_none_or(|svc| svc.status == u.status) {
                continue;
            }
            let rev = *revision.get_or_insert_with(|| self.bump());
            let Some(svc) = self.services.get_mut(&key) else { continue };
            let previous = svc.status;
            svc.status = u.status;
            svc.output = clip_output(&u.output);
            svc.status_ms = ctx.now_ms;
            let kind = EventKind::HealthChanged {
                team: svc.team.clone(),
                id: svc.id.clone(),
                name: svc.name.clone(),
                host: svc.host.clone(),
                previous,
                status: u.status,
                output: svc.output.clone(),
            };
            self.dirty.insert(Key::Service(key.0, key.1));
            self.emit(rev, ctx.now_ms, kind);
            changed += 1;
        }
        Response::HealthSet { changed, revision: revision.unwrap_or(self.meta.revision) }
    }
}

/// At most [`MAX_CHECK_OUTPUT`] bytes of a check's output, cut at a character boundary.
pub fn clip_output(s: &str) -> String {
    let mut end = s.len().min(MAX_CHECK_OUTPUT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn check_service(svc: &Service) -> Result<(), Rejection> {
    check_name("team", &svc.team)?;
    check_name("service", &svc.name)?;
    if svc.id.is_empty() || svc.id.len() > 255 || svc.id.chars().any(char::is_control) {
        return Err(Rejection::Invalid(format!(
            "service id {:?} is not valid: use 1-255 printable characters",
            svc.id
        )));
    }
    for (what, v) in [("project", &svc.project), ("env", &svc.env), ("instance", &svc.instance)] {
        if let Some(v) = v {
            check_name(what, v)?;
        }
    }
    if svc.host.is_empty() {
        return Err(Rejection::Invalid(format!("service {:?} needs the host it runs on", svc.name)));
    }
    if svc.ports.is_empty() {
        return Err(Rejection::Invalid(format!("service {:?} needs at least one port", svc.name)));
    }
    if svc.ports.len() > MAX_SERVICE_PORTS || svc.tags.len() > MAX_SERVICE_PORTS {
        return Err(Rejection::Invalid(format!(
            "service {:?}: at most {MAX_SERVICE_PORTS} ports and {MAX_SERVICE_PORTS} tags",
            svc.name
        )));
    }
    let mut names = BTreeSet::new();
    for p in &svc.ports {
        check_name("port", &p.name)?;
        if p.port < crate::MIN_PORT {
            return Err(Rejection::PortOutOfRange { port: u32::from(p.port) });
        }
        if !names.insert(p.name.as_str()) {
            return Err(Rejection::Invalid(format!(
                "service {:?} names port {:?} twice: port names must be unique",
                svc.name, p.name
            )));
        }
    }
    if let Some(c) = &svc.check {
        if c.interval_ms < MIN_CHECK_INTERVAL_MS {
            return Err(Rejection::Invalid(format!(
                "check interval {} ms is too short: use at least {MIN_CHECK_INTERVAL_MS} ms",
                c.interval_ms
            )));
        }
        if c.timeout_ms == 0 || c.timeout_ms > c.interval_ms.max(MIN_CHECK_INTERVAL_MS) * 10 {
            return Err(Rejection::Invalid(format!(
                "check timeout {} ms is not valid: use more than 0 and at most ten intervals",
                c.timeout_ms
            )));
        }
        if c.failures == 0 {
            return Err(Rejection::Invalid("check failures must be at least 1".into()));
        }
        if let Some(name) = &c.port
            && svc.port(name).is_none()
        {
            let known = svc.ports.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ");
            return Err(Rejection::Invalid(format!(
                "the check names port {name:?}, but service {:?} has ports: {known}",
                svc.name
            )));
        }
        match &c.kind {
            CheckKind::Http { path } if !path.starts_with('/') => {
                return Err(Rejection::Invalid(format!("http check path {path:?} must start with '/'")));
            }
            CheckKind::Command { command } if command.trim().is_empty() => {
                return Err(Rejection::Invalid("a command check needs a command".into()));
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_ttl(ttl_ms: u64) -> Result<(), Rejection> {
    if (MIN_TTL_MS..=MAX_TTL_MS).contains(&ttl_ms) { Ok(()) } else { Err(Rejection::BadTtl { ttl_ms }) }
}

fn check_name(what: &str, name: &str) -> Result<(), Rejection> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(Rejection::Invalid(format!(
            "{what} name {name:?} is not valid: use 1-63 letters, digits, '-', '_' or '.'"
        )))
    }
}

#[cfg(test)]
mod tests;
