//! The persisted encoding: what the Raft log, the state-machine tree and snapshots hold, per
//! data version, and its conversion to and from the domain types of `portmesh-core`.
//!
//! Postcard encodes an enum variant by its position and a struct's fields in order, with no
//! names. So the enums here are the format: their variants are appended, never reordered or
//! removed, and each variant's fields keep their order. The domain types (`core::Command`,
//! `core::Record`) are free to change; only these mirrors are persisted.
//!
//! | data version | written by | what changed |
//! |---|---|---|
//! | 1 | 0.1.0 | first format ([`v1`]) |
//! | 2 | 0.2.0 on | holders on allocations and conflicts, probe owners on allocation batches (new variants `Alloc`, `Event`, `Allocate`), services |
//! | 3 | 0.2.0 on | tokens (new variants `Token`, `AddToken`, `RevokeToken`, `UseToken`) |
//! | 4 | 0.2.0 on | the lease clock: `Meta` with `lease_clock_ms` (new variant `Meta`), checkpoints that carry the clock and only renewed leases (new variant `CheckpointLeasesAt`) |
//! | 5 | 0.2.0 on | allocations that register a service in the same entry: `AllocateBatch` with `register` (new variant `Allocate`; the old shape is [`v2`]'s) |
//! | 6 | 0.2.0 on | the state lives in snapshots and the log only: no record is written to the `sm` tree any more; an older directory's tree is folded into a snapshot when it is opened (no encoding changed) |
//! | 7 | 0.2.0 on | the current snapshot is a file of its own (`DATA/snapshot`: a header, the metadata, the records, a checksum), no longer a value in sled's `snap` tree; an older directory's is moved there when it is opened (the records' encoding is unchanged) |
//! | 8 | 0.2.0 on | allocations whose probe carries the ranges known busy on the host (`HostProbe::known_busy`; new variant `Allocate`, the old shape is [`v5`]'s) |
//!
//! Where a change goes: when a persisted core type changes shape, copy its old shape into a new
//! `vN` module (with a `From` into the current type), give the enum here a new variant for the
//! new shape and point the old variant at the old shape, raise `DATA_VERSION`, and add a fixture
//! written by the last release (`tests/fixtures/`).

pub mod v1;
pub mod v2;
pub mod v5;

use portmesh_core::{
    self as core, AllocateBatch, Allocation, Cooldown, Event, HealthUpdate, Lease, Meta, Pool, PortRange,
    ReleaseSelector, Reservation, Service, Token,
};
use serde::{Deserialize, Serialize};

/// The application data of one Raft log entry, as persisted and as sent between members
/// (openraft's `D`): [`core::Request`] in its persisted form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRequest {
    pub time_ms: u64,
    pub commands: Vec<LogCommand>,
}

impl From<core::Request> for LogRequest {
    fn from(r: core::Request) -> Self {
        LogRequest { time_ms: r.time_ms, commands: r.commands.into_iter().map(Into::into).collect() }
    }
}

impl From<LogRequest> for core::Request {
    fn from(r: LogRequest) -> Self {
        core::Request { time_ms: r.time_ms, commands: r.commands.into_iter().map(Into::into).collect() }
    }
}

/// [`core::Command`] as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogCommand {
    /// An allocation as 0.1.0 logged it (no holder, no probe owners).
    AllocateV1(v1::AllocateBatchV1),
    Release {
        team: String,
        selector: ReleaseSelector,
    },
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
    RevokeLease {
        team: String,
        id: u64,
    },
    /// A checkpoint as data versions 1 to 3 logged it: every lease's remaining TTL, no clock.
    CheckpointLeases {
        remaining: Vec<(u64, u64)>,
    },
    ExpireLeases {
        ids: Vec<u64>,
    },
    SetCooldown {
        ms: u64,
    },
    Register(Box<Service>),
    Deregister {
        team: String,
        id: String,
    },
    SetHealth {
        updates: Vec<HealthUpdate>,
    },
    /// An allocation as data versions 2 to 4 logged it (no registration).
    AllocateV2(v2::AllocateBatchV2),
    AddToken(Box<Token>),
    RevokeToken {
        id: String,
    },
    UseToken {
        id: String,
    },
    CheckpointLeasesAt {
        clock_ms: u64,
        remaining: Vec<(u64, u64)>,
    },
    /// An allocation as data versions 5 to 7 logged it (no ranges known busy).
    AllocateV5(v5::AllocateBatchV5),
    Allocate(AllocateBatch),
}

impl From<core::Command> for LogCommand {
    fn from(c: core::Command) -> Self {
        use core::Command as C;
        match c {
            C::Allocate(b) => LogCommand::Allocate(b),
            C::Release { team, selector } => LogCommand::Release { team, selector },
            C::Reserve { port, reason } => LogCommand::Reserve { port, reason },
            C::Unreserve { port } => LogCommand::Unreserve { port },
            C::AddPool { team, name, ranges } => LogCommand::AddPool { team, name, ranges },
            C::RemovePool { team, name } => LogCommand::RemovePool { team, name },
            C::GrantLease { team, ttl_ms } => LogCommand::GrantLease { team, ttl_ms },
            C::RevokeLease { team, id } => LogCommand::RevokeLease { team, id },
            C::CheckpointLeases { clock_ms, remaining } => {
                LogCommand::CheckpointLeasesAt { clock_ms, remaining }
            }
            C::ExpireLeases { ids } => LogCommand::ExpireLeases { ids },
            C::SetCooldown { ms } => LogCommand::SetCooldown { ms },
            C::Register(s) => LogCommand::Register(s),
            C::Deregister { team, id } => LogCommand::Deregister { team, id },
            C::SetHealth { updates } => LogCommand::SetHealth { updates },
            C::AddToken(t) => LogCommand::AddToken(t),
            C::RevokeToken { id } => LogCommand::RevokeToken { id },
            C::UseToken { id } => LogCommand::UseToken { id },
        }
    }
}

impl From<LogCommand> for core::Command {
    fn from(c: LogCommand) -> Self {
        use core::Command as C;
        match c {
            LogCommand::AllocateV1(b) => C::Allocate(b.into()),
            LogCommand::AllocateV2(b) => C::Allocate(b.into()),
            LogCommand::AllocateV5(b) => C::Allocate(b.into()),
            LogCommand::Allocate(b) => C::Allocate(b),
            LogCommand::Release { team, selector } => C::Release { team, selector },
            LogCommand::Reserve { port, reason } => C::Reserve { port, reason },
            LogCommand::Unreserve { port } => C::Unreserve { port },
            LogCommand::AddPool { team, name, ranges } => C::AddPool { team, name, ranges },
            LogCommand::RemovePool { team, name } => C::RemovePool { team, name },
            LogCommand::GrantLease { team, ttl_ms } => C::GrantLease { team, ttl_ms },
            LogCommand::RevokeLease { team, id } => C::RevokeLease { team, id },
            // The clock stays where it is: the remaining TTLs are read against it.
            LogCommand::CheckpointLeases { remaining } => C::CheckpointLeases { clock_ms: 0, remaining },
            LogCommand::CheckpointLeasesAt { clock_ms, remaining } => {
                C::CheckpointLeases { clock_ms, remaining }
            }
            LogCommand::ExpireLeases { ids } => C::ExpireLeases { ids },
            LogCommand::SetCooldown { ms } => C::SetCooldown { ms },
            LogCommand::Register(s) => C::Register(s),
            LogCommand::Deregister { team, id } => C::Deregister { team, id },
            LogCommand::SetHealth { updates } => C::SetHealth { updates },
            LogCommand::AddToken(t) => C::AddToken(t),
            LogCommand::RevokeToken { id } => C::RevokeToken { id },
            LogCommand::UseToken { id } => C::UseToken { id },
        }
    }
}

/// [`core::Record`] as persisted in snapshots (and in the `sm` tree up to data version 5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredRecord {
    /// `Meta` as data versions 1 to 3 wrote it.
    MetaV1(v1::MetaV1),
    Pool(Pool),
    /// An allocation as 0.1.0 wrote it.
    AllocV1(v1::AllocationV1),
    Reservation(Reservation),
    Lease(Lease),
    Sticky {
        team: String,
        key: String,
        port: u16,
    },
    Cooldown {
        port: u16,
        cooldown: Cooldown,
    },
    /// An event as 0.1.0 wrote it.
    EventV1(v1::EventV1),
    Service(Box<Service>),
    Alloc(Allocation),
    Event(Event),
    Token(Box<Token>),
    Meta(Meta),
}

impl From<core::Record> for StoredRecord {
    fn from(r: core::Record) -> Self {
        use core::Record as R;
        match r {
            R::Meta(m) => StoredRecord::Meta(m),
            R::Pool(p) => StoredRecord::Pool(p),
            R::Reservation(r) => StoredRecord::Reservation(r),
            R::Lease(l) => StoredRecord::Lease(l),
            R::Sticky { team, key, port } => StoredRecord::Sticky { team, key, port },
            R::Cooldown { port, cooldown } => StoredRecord::Cooldown { port, cooldown },
            R::Service(s) => StoredRecord::Service(s),
            R::Alloc(a) => StoredRecord::Alloc(a),
            R::Event(e) => StoredRecord::Event(e),
            R::Token(t) => StoredRecord::Token(t),
        }
    }
}

impl From<StoredRecord> for core::Record {
    fn from(r: StoredRecord) -> Self {
        use core::Record as R;
        match r {
            StoredRecord::MetaV1(m) => R::Meta(m.into()),
            StoredRecord::Meta(m) => R::Meta(m),
            StoredRecord::Pool(p) => R::Pool(p),
            StoredRecord::AllocV1(a) => R::Alloc(a.into()),
            StoredRecord::Reservation(r) => R::Reservation(r),
            StoredRecord::Lease(l) => R::Lease(l),
            StoredRecord::Sticky { team, key, port } => R::Sticky { team, key, port },
            StoredRecord::Cooldown { port, cooldown } => R::Cooldown { port, cooldown },
            StoredRecord::EventV1(e) => R::Event(e.into()),
            StoredRecord::Service(s) => R::Service(s),
            StoredRecord::Alloc(a) => R::Alloc(a),
            StoredRecord::Event(e) => R::Event(e),
            StoredRecord::Token(t) => R::Token(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use portmesh_core::{
        AllocItem, ApplyCtx, EventKind, Holder, HostProbe, Key, LeaseSpec, Record, Response, State, Strategy,
    };

    use super::v1::{AllocateBatchV1, AllocationV1, ConflictV1, EventKindV1, EventV1, HostProbeV1};
    use super::*;

    fn alloc_v1() -> AllocationV1 {
        AllocationV1 {
            port: 8000,
            team: "default".into(),
            pool: "web".into(),
            service: "api".into(),
            instance: None,
            env: Some("dev".into()),
            host: "h1".into(),
            key: Some("k".into()),
            lease_id: None,
            created_ms: 5,
            revision: 3,
        }
    }

    /// Records and log entries of a 0.1.0 data directory (postcard bytes of the old shapes, as
    /// 0.1.0's enums numbered them) load, and come out with no holder.
    #[test]
    fn data_written_by_0_1_0_still_loads() {
        // 0.1.0's record enum: variant 2 was an allocation, variant 7 an event.
        let mut bytes = vec![2u8];
        bytes.extend(postcard::to_allocvec(&alloc_v1()).unwrap());
        let rec: Record = postcard::from_bytes::<StoredRecord>(&bytes).unwrap().into();
        let Record::Alloc(a) = &rec else { panic!("{rec:?}") };
        assert_eq!((a.port, a.key.as_deref(), a.revision, a.holder.clone()), (8000, Some("k"), 3, None));
        let ev = EventV1 {
            revision: 3,
            seq: 1,
            at_ms: 5,
            kind: EventKindV1::Conflict(ConflictV1 {
                port: 8001,
                team: "default".into(),
                pool: "web".into(),
                service: "api".into(),
                host: "h1".into(),
            }),
        };
        let mut bytes = vec![7u8];
        bytes.extend(postcard::to_allocvec(&ev).unwrap());
        let rec: Record = postcard::from_bytes::<StoredRecord>(&bytes).unwrap().into();
        assert_eq!(rec.key(), Key::Event(3, 1));
        let st = State::from_records([Record::Meta(State::new().meta().clone()), rec]);
        let e = st.events_since(0).next().unwrap();
        assert!(matches!(&e.kind, EventKind::Conflict(c) if c.port == 8001 && c.holder.is_none()), "{e:?}");

        // A 0.1.0 log entry: command variant 0 with the old batch.
        let batch = AllocateBatchV1 {
            team: "default".into(),
            host: "h1".into(),
            lease: LeaseSpec::None,
            items: vec![AllocItem {
                pool: Some("web".into()),
                service: "api".into(),
                instance: None,
                env: None,
                key: None,
                port: None,
                strategy: Strategy::Sticky,
            }],
            probe: Some(HostProbeV1 { checked: vec![8000], busy: vec![] }),
        };
        let mut bytes = vec![0u8];
        bytes.extend(postcard::to_allocvec(&batch).unwrap());
        let cmd: core::Command = postcard::from_bytes::<LogCommand>(&bytes).unwrap().into();
        let mut st = State::new();
        st.apply(
            ApplyCtx { now_ms: 1, index: 1, seq: 0 },
            &core::Command::AddPool {
                team: "default".into(),
                name: "web".into(),
                ranges: vec![PortRange::new(8000, 8009).unwrap()],
            },
        );
        let Response::Allocated { grants, .. } = st.apply(ApplyCtx { now_ms: 2, index: 2, seq: 0 }, &cmd)
        else {
            panic!("{cmd:?} was not applied as an allocation")
        };
        assert_eq!((grants[0].allocation.port, &grants[0].allocation.holder), (8000, &None));
    }

    /// A `Meta` record and a lease checkpoint as data versions 1 to 3 wrote them load with the
    /// lease clock at 0, so every lease's stored value still reads as its remaining TTL.
    #[test]
    fn data_written_before_the_lease_clock_still_loads() {
        let old = v1::MetaV1 { revision: 7, next_lease_id: 3, cooldown_ms: 100 };
        let mut bytes = vec![0u8];
        bytes.extend(postcard::to_allocvec(&old).unwrap());
        let Record::Meta(meta) = postcard::from_bytes::<StoredRecord>(&bytes).unwrap().into() else {
            panic!("not a meta record")
        };
        assert_eq!(
            (meta.revision, meta.next_lease_id, meta.cooldown_ms, meta.lease_clock_ms),
            (7, 3, 100, 0)
        );
        let lease = Lease {
            id: 2,
            team: "default".into(),
            ttl_ms: 9_000,
            deadline_ms: 9_000,
            granted_ms: 1,
            revision: 5,
        };
        let mut st = State::from_records([Record::Meta(meta), Record::Lease(lease)]);
        // Variant 8: the old checkpoint, every lease's remaining TTL against the clock as it is.
        let mut bytes = vec![8u8];
        bytes.extend(postcard::to_allocvec(&vec![(2u64, 4_000u64)]).unwrap());
        let cmd: core::Command = postcard::from_bytes::<LogCommand>(&bytes).unwrap().into();
        assert_eq!(cmd, core::Command::CheckpointLeases { clock_ms: 0, remaining: vec![(2, 4_000)] });
        st.apply(ApplyCtx { now_ms: 2, index: 9, seq: 0 }, &cmd);
        let l = st.lease(2).unwrap();
        assert_eq!((st.meta().lease_clock_ms, st.lease_remaining_ms(l)), (0, 4_000));
    }

    fn token() -> Token {
        Token {
            id: "0123456789abcdef".into(),
            digest: [9; 32],
            role: core::Role::Member,
            team: "teama".into(),
            created_ms: 5,
            expires_ms: Some(6),
            uses_left: None,
        }
    }

    /// Events are stored as they are (`StoredRecord::Event`): keeping a large variant's content
    /// boxed, and the health change as a struct of its own, changed nothing on disk. A boxed
    /// value encodes as the value; a variant holding a struct as the struct variant it was
    /// (its index, then the fields in order).
    #[test]
    fn boxed_event_contents_keep_their_encoding() {
        let alloc: Allocation = alloc_v1().into();
        let event = |kind| Record::Event(Event { revision: 3, seq: 1, at_ms: 2, kind });
        let head = [3u8, 1, 2];
        let bytes =
            postcard::to_allocvec(&StoredRecord::from(event(EventKind::Allocated(Box::new(alloc.clone())))))
                .unwrap();
        let inline = [&head[..], &[0], &postcard::to_allocvec(&alloc).unwrap()].concat();
        assert_eq!(&bytes[1..], &inline[..], "Allocated: variant 0, then the allocation");

        let h = core::HealthChange {
            team: "t".into(),
            id: "db-1".into(),
            name: "db".into(),
            host: "h".into(),
            previous: core::HealthStatus::Passing,
            status: core::HealthStatus::Critical,
            output: "refused".into(),
        };
        let rec = event(EventKind::HealthChanged(Box::new(h.clone())));
        let bytes = postcard::to_allocvec(&StoredRecord::from(rec.clone())).unwrap();
        let fields = (&h.team, &h.id, &h.name, &h.host, h.previous, h.status, &h.output);
        let as_struct_variant = [&head[..], &[13], &postcard::to_allocvec(&fields).unwrap()].concat();
        assert_eq!(&bytes[1..], &as_struct_variant[..], "HealthChanged: variant 13, then its fields");
        assert_eq!(core::Record::from(postcard::from_bytes::<StoredRecord>(&bytes).unwrap()), rec);
    }

    /// The variant positions are the format: today's records and commands keep theirs, and
    /// every current shape round-trips.
    #[test]
    fn variant_positions_are_pinned() {
        let alloc: Allocation = alloc_v1().into();
        let holder = Some(Holder { pid: 7, command: "make".into() });
        let alloc = Allocation { holder: holder.clone(), ..alloc };
        for (rec, position) in [
            (Record::Meta(State::new().meta().clone()), 12u8),
            (Record::Sticky { team: "t".into(), key: "k".into(), port: 8000 }, 5),
            (Record::Alloc(alloc.clone()), 9),
            (Record::Token(Box::new(token())), 11),
        ] {
            let bytes = postcard::to_allocvec(&StoredRecord::from(rec.clone())).unwrap();
            assert_eq!(bytes[0], position, "{rec:?}");
            assert_eq!(core::Record::from(postcard::from_bytes::<StoredRecord>(&bytes).unwrap()), rec);
        }
        let batch = AllocateBatch {
            team: "t".into(),
            host: "h".into(),
            lease: LeaseSpec::New { ttl_ms: 5_000 },
            items: Vec::new(),
            probe: Some(HostProbe::new(vec![8000], vec![])),
            holder,
            register: None,
        };
        let old_probe = Some(v2::HostProbeV2 { checked: vec![8000], busy: vec![], owners: Vec::new() });
        // Data versions 2 to 4 logged allocations without a registration at position 14: they
        // still load, with none.
        let old = v2::AllocateBatchV2 {
            team: batch.team.clone(),
            host: batch.host.clone(),
            lease: batch.lease,
            items: batch.items.clone(),
            probe: old_probe.clone(),
            holder: batch.holder.clone(),
        };
        let old = LogRequest { time_ms: 9, commands: vec![LogCommand::AllocateV2(old)] };
        let bytes = postcard::to_allocvec(&old).unwrap();
        assert_eq!(bytes[2], 14);
        let loaded = core::Request::from(postcard::from_bytes::<LogRequest>(&bytes).unwrap());
        assert_eq!(loaded.commands, vec![core::Command::Allocate(batch.clone())]);
        let registering =
            AllocateBatch { register: Some(Box::new(crate::tests::service())), ..batch.clone() };
        // Data versions 5 to 7 logged allocations without ranges known busy at position 19: they
        // still load, with none.
        let old = v5::AllocateBatchV5 {
            team: batch.team.clone(),
            host: batch.host.clone(),
            lease: batch.lease,
            items: batch.items.clone(),
            probe: old_probe,
            holder: batch.holder.clone(),
            register: registering.register.clone(),
        };
        let old = LogRequest { time_ms: 9, commands: vec![LogCommand::AllocateV5(old)] };
        let bytes = postcard::to_allocvec(&old).unwrap();
        assert_eq!(bytes[2], 19);
        let loaded = core::Request::from(postcard::from_bytes::<LogRequest>(&bytes).unwrap());
        assert_eq!(loaded.commands, vec![core::Command::Allocate(registering.clone())]);
        let known = AllocateBatch {
            probe: batch
                .probe
                .clone()
                .map(|p| p.with_known_busy(vec![PortRange::new(40000, 40999).unwrap()])),
            ..batch.clone()
        };
        for (cmd, position) in [
            (core::Command::Release { team: "t".into(), selector: ReleaseSelector::Key("k".into()) }, 1u8),
            (core::Command::SetCooldown { ms: 5 }, 10),
            (core::Command::Deregister { team: "t".into(), id: "x".into() }, 12),
            (core::Command::Allocate(batch), 20),
            (core::Command::Allocate(registering), 20),
            (core::Command::Allocate(known), 20),
            (core::Command::AddToken(Box::new(token())), 15),
            (core::Command::RevokeToken { id: "t".into() }, 16),
            (core::Command::UseToken { id: "t".into() }, 17),
            (core::Command::CheckpointLeases { clock_ms: 5, remaining: vec![(1, 2)] }, 18),
        ] {
            let req = core::Request { time_ms: 9, commands: vec![cmd.clone()] };
            let bytes = postcard::to_allocvec(&LogRequest::from(req.clone())).unwrap();
            // time_ms (one varint byte), the command count, then the variant.
            assert_eq!(bytes[2], position, "{cmd:?}");
            assert_eq!(core::Request::from(postcard::from_bytes::<LogRequest>(&bytes).unwrap()), req);
        }
    }
}
