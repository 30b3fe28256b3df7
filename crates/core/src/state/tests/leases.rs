//! Leases: grant, attach, revoke, expiry and checkpoints.

use super::*;

#[test]
fn leases_release_everything_attached_exactly_once() {
    let mut h = Harness::new();
    let Response::Allocated { grants, lease: Some(lease), .. } =
        h.alloc_with(vec![in_pool("a", "web"), in_pool("b", "db")], LeaseSpec::New { ttl_ms: 10_000 }, None)
    else {
        panic!()
    };
    assert_eq!(grants.len(), 2);
    let other = h.one(in_pool("c", "web"));
    let Response::Expired { ids, released, revision } =
        h.apply(Command::ExpireLeases { ids: vec![lease.id, 999] })
    else {
        panic!()
    };
    assert_eq!(ids, [lease.id]);
    assert_eq!(released.len(), 2);
    let expired_events =
        h.st.events_since(revision)
            .filter(|e| matches!(e.kind, EventKind::Released { cause: ReleaseCause::LeaseExpired, .. }))
            .count();
    assert_eq!(expired_events, 2);
    assert!(h.st.allocation(other).is_some(), "unattached allocations stay");
    // A second expiry of the same lease (e.g. a new leader retrying) does nothing.
    let rev = h.st.revision();
    let Response::Expired { ids, released, .. } = h.apply(Command::ExpireLeases { ids: vec![lease.id] })
    else {
        panic!()
    };
    assert!(ids.is_empty() && released.is_empty());
    assert_eq!(h.st.revision(), rev);
}

#[test]
fn lease_grant_attach_revoke_and_errors() {
    let mut h = Harness::new();
    let Response::LeaseGranted(l) = h.apply(Command::GrantLease { team: "default".into(), ttl_ms: 5_000 })
    else {
        panic!()
    };
    let p = match h.alloc_with(vec![item("a")], LeaseSpec::Existing(l.id), None) {
        Response::Allocated { grants, .. } => grants[0].allocation.port,
        r => panic!("{r:?}"),
    };
    assert_eq!(h.st.lease_ports(l.id).collect::<Vec<_>>(), [p]);
    let r = h.reject(Command::RevokeLease { team: "other".into(), id: l.id });
    assert!(r.to_string().contains("unknown lease"), "another team cannot revoke it");
    let Response::LeaseRevoked { released, .. } =
        h.apply(Command::RevokeLease { team: "default".into(), id: l.id })
    else {
        panic!()
    };
    assert_eq!(released[0].port, p);
    assert!(
        h.reject(Command::RevokeLease { team: "default".into(), id: l.id })
            .to_string()
            .contains("unknown lease")
    );
    let r = h.alloc_with(vec![item("a")], LeaseSpec::Existing(l.id), None);
    assert!(matches!(r, Response::Rejected(Rejection::UnknownLease { .. })));
    for ttl in [0, 999, crate::MAX_TTL_MS + 1] {
        let r = h.reject(Command::GrantLease { team: "default".into(), ttl_ms: ttl });
        assert!(r.to_string().contains("out of bounds"), "{ttl}: {r}");
    }
}

#[test]
fn checkpoint_records_remaining_ttl() {
    let mut h = Harness::new();
    let Response::LeaseGranted(l) = h.apply(Command::GrantLease { team: "default".into(), ttl_ms: 9_000 })
    else {
        panic!()
    };
    let remaining = |h: &Harness| h.st.lease(l.id).map(|l| h.st.lease_remaining_ms(l));
    assert_eq!(remaining(&h), Some(9_000));
    assert_eq!(
        h.apply(Command::CheckpointLeases { clock_ms: 1_000, remaining: vec![(l.id, 4_000), (77, 1)] }),
        Response::Checkpointed { leases: 1 }
    );
    assert_eq!(remaining(&h), Some(4_000));

    // A lease nobody renewed counts down with the clock alone: its deadline stays.
    let deadline = h.st.lease(l.id).map(|l| l.deadline_ms);
    assert_eq!(
        h.apply(Command::CheckpointLeases { clock_ms: 3_000, remaining: vec![] }),
        Response::Checkpointed { leases: 0 }
    );
    assert_eq!(remaining(&h), Some(2_000));
    assert_eq!(h.st.lease(l.id).map(|l| l.deadline_ms), deadline, "only the clock moved");

    // The clock never goes back: an older or repeated reading changes nothing.
    h.apply(Command::CheckpointLeases { clock_ms: 2_000, remaining: vec![] });
    assert_eq!((h.st.meta().lease_clock_ms, remaining(&h)), (3_000, Some(2_000)));

    // A lease granted later starts from the clock as it stands.
    let Response::LeaseGranted(k) = h.apply(Command::GrantLease { team: "default".into(), ttl_ms: 5_000 })
    else {
        panic!()
    };
    assert_eq!((k.deadline_ms, h.st.lease_remaining_ms(&k)), (8_000, 5_000));

    h.apply(Command::CheckpointLeases { clock_ms: 3_000, remaining: vec![(l.id, 50_000)] });
    assert_eq!(remaining(&h), Some(9_000), "never above the TTL");
    h.apply(Command::CheckpointLeases { clock_ms: 20_000, remaining: vec![] });
    assert_eq!(remaining(&h), Some(0), "past its deadline: 0, not an underflow");
}
