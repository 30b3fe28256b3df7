//! The state as records: what the store persists ([`Key`], [`Record`]), every record for a
//! snapshot, one record for a changed key, and the state rebuilt from them.

use super::*;

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
    /// A token: its id.
    Token(String),
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
    Token(Box<Token>),
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
            Record::Token(t) => Key::Token(t.id.clone()),
        }
    }
}

impl State {
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
                        s.live_keys.insert((a.team.to_string(), k.to_string()), a.port);
                    }
                    if let Some(l) = a.lease_id {
                        s.lease_ports.insert((l, a.port));
                    }
                    s.allocated.insert(a.port);
                    s.allocations.insert(a.port, Box::new(a));
                }
                Record::Reservation(r) => {
                    s.reservations.insert(r.port, r);
                }
                Record::Lease(l) => {
                    s.leases.insert(l.id, Box::new(l));
                }
                Record::Sticky { team, key, port } => s.remember((team, key), port),
                Record::Cooldown { port, cooldown } => {
                    s.cooldown_order.insert((cooldown.until_ms, port));
                    s.cooling.insert(port);
                    s.cooldowns.insert(port, cooldown);
                }
                Record::Event(e) => s.events.push_back(e),
                Record::Service(svc) => s.insert_service_unmarked(*svc),
                Record::Token(t) => {
                    s.tokens.insert(t.id.clone(), *t);
                }
            }
        }
        if !has_meta {
            return Self::new();
        }
        s.events.make_contiguous().sort_by_key(|e| (e.revision, e.seq));
        for e in &s.events {
            if let EventKind::Conflict(c) = &e.kind {
                s.last_conflicts.note(e, c);
            }
        }
        s
    }

    /// Every record of the state, for snapshots.
    pub fn records(&self) -> impl Iterator<Item = Record> + '_ {
        std::iter::once(Record::Meta(self.meta.clone()))
            .chain(self.pools.values().cloned().map(Record::Pool))
            .chain(self.allocations.values().map(|a| Record::Alloc((**a).clone())))
            .chain(self.reservations.values().cloned().map(Record::Reservation))
            .chain(self.leases.values().map(|l| Record::Lease((**l).clone())))
            .chain(self.sticky.iter().map(|((team, key), port)| Record::Sticky {
                team: team.clone(),
                key: key.clone(),
                port: *port,
            }))
            .chain(self.cooldowns.iter().map(|(p, c)| Record::Cooldown { port: *p, cooldown: c.clone() }))
            .chain(self.events.iter().cloned().map(Record::Event))
            .chain(self.services.values().map(|svc| Record::Service(Box::new(svc.clone()))))
            .chain(self.tokens.values().map(|t| Record::Token(Box::new(t.clone()))))
    }

    /// How many records [`State::records`] yields, without cloning them.
    pub fn record_count(&self) -> usize {
        1 + self.pools.len()
            + self.allocations.len()
            + self.reservations.len()
            + self.leases.len()
            + self.sticky.len()
            + self.cooldowns.len()
            + self.events.len()
            + self.services.len()
            + self.tokens.len()
    }

    /// The current value of one record, `None` if it no longer exists.
    pub fn record(&self, key: &Key) -> Option<Record> {
        match key {
            Key::Meta => Some(Record::Meta(self.meta.clone())),
            Key::Pool(t, n) => self.pools.get(&(t.clone(), n.clone())).cloned().map(Record::Pool),
            Key::Alloc(p) => self.allocations.get(p).map(|a| Record::Alloc((**a).clone())),
            Key::Reservation(p) => self.reservations.get(p).cloned().map(Record::Reservation),
            Key::Lease(id) => self.leases.get(id).map(|l| Record::Lease((**l).clone())),
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
            Key::Token(id) => self.tokens.get(id).map(|t| Record::Token(Box::new(t.clone()))),
        }
    }
}
