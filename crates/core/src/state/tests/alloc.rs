//! Allocations: strategies, sticky keys, cool-downs, reservations and batches.

use super::*;

#[test]
fn fresh_state_has_default_pools_and_its_records_say_so() {
    let st = State::new();
    let names: Vec<_> = st.team_pools("default").map(|p| p.name.clone()).collect();
    assert_eq!(names, ["cache", "db", "default", "queue", "web"]);
    let keys: Vec<Key> = st.records().map(|r| r.key()).collect();
    assert!(keys.contains(&Key::Meta) && keys.contains(&Key::Pool("default".into(), "web".into())));
    assert_eq!(State::from_records(std::iter::empty()), State::new());
    assert_eq!(State::from_records(st.records()), st);
}

#[test]
fn lowest_free_port_by_default() {
    let mut h = Harness::new();
    assert_eq!(h.one(item("a")), 10000);
    assert_eq!(h.one(in_pool("w", "web")), 8000);
    assert_eq!(h.one(in_pool("w2", "web")), 8001);
    // Without a pool, a pool named like the service is used.
    assert_eq!(h.one(item("web")), 8002);
    assert_eq!(h.one(item("db")), 11000);
}

#[test]
fn strategies_table() {
    // (strategy, wanted, pre-allocated, expected port or error fragment)
    type Case<'a> = (Strategy, u16, &'a [u16], Result<u16, &'a str>);
    let cases: &[Case<'_>] = &[
        (Strategy::Sticky, 8100, &[], Ok(8100)),
        (Strategy::Sticky, 8100, &[8100], Ok(8000)),
        (Strategy::Next, 8100, &[8100, 8101], Ok(8102)),
        (Strategy::Next, 8999, &[8999], Ok(8000)),
        (Strategy::Fail, 8100, &[], Ok(8100)),
        (Strategy::Fail, 8100, &[8100], Err("port 8100 is not available: allocated to \"pre\"")),
        (Strategy::Random, 8100, &[], Ok(8100)),
    ];
    for (strategy, wanted, pre, expected) in cases {
        let mut h = Harness::new();
        for p in *pre {
            h.one(at("pre", *p, Strategy::Fail));
        }
        let r = h.alloc(vec![at("svc", *wanted, *strategy)]);
        match (expected, r) {
            (Ok(port), Response::Allocated { grants, .. }) => {
                assert_eq!(grants[0].allocation.port, *port, "{strategy} {wanted}")
            }
            (Err(msg), Response::Rejected(rej)) => assert!(rej.to_string().contains(msg), "{rej}"),
            (e, r) => panic!("{strategy} {wanted}: expected {e:?}, got {r:?}"),
        }
    }
}

#[test]
fn random_strategy_is_deterministic_per_index_and_stays_in_pool() {
    let run = || {
        let mut h = Harness::new();
        h.one(at("x", 8100, Strategy::Fail));
        (0..20)
            .map(|i| h.one(AllocItem { strategy: Strategy::Random, ..in_pool(&format!("s{i}"), "web") }))
            .collect::<Vec<_>>()
    };
    let a = run();
    assert_eq!(a, run(), "same log, same picks");
    assert!(a.iter().all(|p| (8000..=8999).contains(p) && *p != 8100));
    let mut sorted = a.clone();
    sorted.sort();
    assert_ne!(a, sorted, "random picks should not come out in order");
}

#[test]
fn explicit_port_checks() {
    let mut h = Harness::new();
    let cases: &[(AllocItem, &str)] = &[
        (at("x", 80, Strategy::Fail), "port 80 is out of range"),
        (at("x", 30000, Strategy::Sticky), "port 30000 is outside the pools of team \"default\""),
        (
            AllocItem { pool: Some("db".into()), ..at("x", 8000, Strategy::Fail) },
            "port 8000 is not in pool \"db\"",
        ),
        (in_pool("x", "nosuch"), "unknown pool \"nosuch\" in team \"default\"; known pools: cache, db"),
        (item(""), "every allocation needs a service name"),
    ];
    for (it, msg) in cases {
        let r = h.reject(Command::Allocate(AllocateBatch {
            team: "default".into(),
            host: "h".into(),
            ..batch(vec![it.clone()])
        }));
        assert!(r.to_string().contains(msg), "{it:?}: {r}");
    }
    let r = h.reject(Command::Allocate(AllocateBatch {
        team: "ghosts".into(),
        host: "h".into(),
        ..batch(vec![item("x")])
    }));
    assert!(r.to_string().contains("unknown team \"ghosts\""), "{r}");
    assert_eq!(h.st.revision(), 0);
}

#[test]
fn sticky_key_is_idempotent_and_returns_after_release() {
    let mut h = Harness::new();
    let p = h.one(keyed("api", "web", "shop/dev/a/api"));
    let r = h.alloc(vec![keyed("api", "web", "shop/dev/a/api")]);
    let Response::Allocated { grants, .. } = r else { panic!() };
    assert!(grants[0].existing);
    assert_eq!(grants[0].allocation.port, p);
    h.one(in_pool("other", "web"));
    h.release(&[p]);
    // The key gets its port back at once, cool-down or not.
    assert_eq!(h.one(keyed("api", "web", "shop/dev/a/api")), p);
}

/// Bug: "sticky ports move silently". Once a key's cool-down ended, "lowest free port" handed
/// its remembered port to the next newcomer, and the key moved when it came back. Ports other
/// keys remember now go last.
#[test]
fn a_keys_remembered_port_is_not_handed_to_others_after_its_cool_down() {
    let mut h = Harness::new();
    let a = h.one(keyed("web", "web", "projA/web"));
    h.release(&[a]);
    h.advance(120_000); // past the cool-down
    let b = h.one(keyed("web", "web", "projB/web"));
    assert_ne!(b, a, "a newcomer does not take another key's port");
    let plain = h.one(in_pool("script", "web"));
    assert!(plain != a && plain != b, "nor does an allocation without a key");
    assert_eq!(h.one(keyed("web", "web", "projA/web")), a, "the key comes back to its port");
}

/// A key that gets another port than its last one is told which one it had: the client says so.
#[test]
fn a_key_that_moves_is_told_its_old_port() {
    let mut h = Harness::new();
    let a = h.one(keyed("web", "web", "projA/web"));
    h.release(&[a]);
    h.apply(Command::Reserve { port: a, reason: "nginx".into() });
    let moved = match h.alloc(vec![keyed("web", "web", "projA/web")]) {
        Response::Allocated { grants, .. } => grants[0].clone(),
        other => panic!("{other:?}"),
    };
    assert_ne!(moved.allocation.port, a);
    assert_eq!(moved.moved_from, Some(a));
    let b = moved.allocation.port;
    h.release(&[b]);
    let kept = match h.alloc(vec![keyed("web", "web", "projA/web")]) {
        Response::Allocated { grants, .. } => grants[0].clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!((kept.allocation.port, kept.moved_from), (b, None), "back on its (new) last port: no move");
}

/// When nothing else is free, remembered ports are handed out after all (lowest first).
#[test]
fn remembered_ports_go_last_not_never() {
    let mut h = Harness::new();
    h.apply(Command::AddPool {
        team: "default".into(),
        name: "two".into(),
        ranges: vec![PortRange::new(30000, 30001).unwrap()],
    });
    let a = h.one(keyed("a", "two", "ka"));
    let b = h.one(keyed("b", "two", "kb"));
    h.release(&[a, b]);
    h.advance(120_000);
    assert_eq!(h.one(in_pool("c", "two")), a.min(b));
    assert!(h.st.is_remembered(a) && h.st.is_remembered(b));
}

#[test]
fn sticky_falls_back_when_its_port_is_taken() {
    let mut h = Harness::new();
    let p = h.one(keyed("api", "web", "k"));
    h.release(&[p]);
    h.advance(120_000); // past the cool-down
    let q = h.one(at("intruder", p, Strategy::Fail));
    assert_eq!(q, p);
    let fallback = h.one(keyed("api", "web", "k"));
    assert_ne!(fallback, p);
    assert_eq!(h.st.sticky_port("default", "k"), Some(fallback), "the key now remembers its new port");
}

#[test]
fn cooldown_keeps_released_port_from_others() {
    let mut h = Harness::new();
    let p = h.one(keyed("a", "web", "ka"));
    h.release(&[p]);
    let r = h.reject(Command::Allocate(AllocateBatch {
        team: "default".into(),
        host: "h".into(),
        ..batch(vec![at("b", p, Strategy::Fail)])
    }));
    assert!(matches!(r, Rejection::PortUnavailable { why: Unavailable::CoolingDown { .. }, .. }), "{r}");
    assert_ne!(h.one(in_pool("b", "web")), p, "automatic selection skips a cooling port");
    h.advance(crate::DEFAULT_COOLDOWN_MS);
    assert_eq!(h.one(at("b", p, Strategy::Fail)), p, "after the cool-down anyone may take it");
}

#[test]
fn cooldown_can_be_turned_off() {
    let mut h = Harness::new();
    assert!(matches!(h.apply(Command::SetCooldown { ms: 0 }), Response::CooldownSet { ms: 0, .. }));
    let p = h.one(in_pool("a", "web"));
    h.release(&[p]);
    assert_eq!(h.one(in_pool("b", "web")), p);
}

#[test]
fn reserved_ports_are_never_handed_out() {
    let mut h = Harness::new();
    for p in 8000..8005 {
        assert!(matches!(
            h.apply(Command::Reserve { port: p, reason: "nginx".into() }),
            Response::Reserved(_)
        ));
    }
    assert_eq!(h.one(in_pool("w", "web")), 8005);
    let r = h.reject(Command::Allocate(AllocateBatch {
        team: "default".into(),
        host: "h".into(),
        ..batch(vec![at("w", 8001, Strategy::Fail)])
    }));
    assert_eq!(r.to_string(), "port 8001 is not available: reserved (nginx) (strategy fail)");
    assert_eq!(h.one(at("w", 8001, Strategy::Next)), 8006);
    // Reserve errors.
    assert!(
        h.reject(Command::Reserve { port: 8000, reason: String::new() })
            .to_string()
            .contains("already reserved (nginx)")
    );
    assert!(
        h.reject(Command::Reserve { port: 8005, reason: String::new() })
            .to_string()
            .contains("allocated to \"w\"")
    );
    assert!(
        h.reject(Command::Reserve { port: 22, reason: String::new() }).to_string().contains("out of range")
    );
    assert!(h.reject(Command::Unreserve { port: 9999 }).to_string().contains("port 9999 is not reserved"));
    assert!(matches!(h.apply(Command::Unreserve { port: 8001 }), Response::Unreserved { port: 8001, .. }));
}

#[test]
fn exhaustion_names_pool_size_and_holders() {
    let mut h = Harness::new();
    h.add_pool("default", "tiny", "20000-20004");
    h.ports(vec![in_pool("api", "tiny"), in_pool("api", "tiny"), in_pool("web", "tiny")]);
    h.apply(Command::Reserve { port: 20003, reason: "x".into() });
    h.one(in_pool("api", "tiny"));
    let r = h.reject(Command::Allocate(AllocateBatch {
        team: "default".into(),
        host: "h".into(),
        ..batch(vec![in_pool("late", "tiny")])
    }));
    assert_eq!(
        r.to_string(),
        "pool \"tiny\" of team \"default\" exhausted: 5 ports, 5 unavailable (held 4: api: 3, web: 1; reserved 1); \
         release ports, wait for cool-downs, or add a range with `portmesh pools add`"
    );
}

/// Every cause of a full pool is counted once, in the order selection checks them, and only the
/// five largest holders are named, most ports first, then by name.
#[test]
fn exhaustion_counts_each_cause_and_names_the_five_largest_holders() {
    let mut h = Harness::new();
    h.add_pool("default", "mid", "20000-20012");
    let held: Vec<AllocItem> =
        ["web", "api", "d", "api", "c", "web", "b", "api", "a"].iter().map(|s| in_pool(s, "mid")).collect();
    assert_eq!(h.ports(held), (20000..=20008).collect::<Vec<u16>>());
    h.apply(Command::Reserve { port: 20009, reason: "x".into() });
    let gone = h.one(in_pool("gone", "mid"));
    h.release(&[gone]);
    // 20011 is busy on the host; the batch's first item takes 20012, the last free port.
    let probe = HostProbe::new(vec![20011, 20012], vec![20011]);
    let r = match h.alloc_with(
        vec![in_pool("late", "mid"), in_pool("later", "mid")],
        LeaseSpec::None,
        Some(probe),
    ) {
        Response::Rejected(r) => r,
        other => panic!("expected a rejection, got {other:?}"),
    };
    assert_eq!(
        r.to_string(),
        "pool \"mid\" of team \"default\" exhausted: 13 ports, 13 unavailable (held 9: api: 3, web: 2, a: 1, \
         b: 1, c: 1, …; reserved 1; cooling down 1; busy on host 1; taken in this batch 1); release ports, wait \
         for cool-downs, or add a range with `portmesh pools add`"
    );
}

#[test]
fn batch_is_all_or_nothing() {
    let mut h = Harness::new();
    h.add_pool("default", "tiny", "20000-20001");
    let rev = h.st.revision();
    let r = h.reject(Command::Allocate(AllocateBatch {
        team: "default".into(),
        host: "h".into(),
        lease: LeaseSpec::New { ttl_ms: 5_000 },
        ..batch(vec![in_pool("a", "web"), in_pool("b", "tiny"), in_pool("c", "tiny"), in_pool("d", "tiny")])
    }));
    assert!(r.to_string().contains("taken in this batch 2"), "{r}");
    assert_eq!(h.st.revision(), rev);
    assert_eq!(h.st.allocations().count(), 0);
    assert_eq!(h.st.leases().count(), 0, "the batch's new lease is not granted either");
    let ports = h.ports(vec![in_pool("a", "web"), in_pool("b", "tiny"), in_pool("c", "tiny")]);
    assert_eq!(ports, [8000, 20000, 20001]);
}

#[test]
fn batch_rejects_duplicate_keys_and_oversize() {
    let mut h = Harness::new();
    let r = h.reject(Command::Allocate(AllocateBatch {
        team: "default".into(),
        host: "h".into(),
        ..batch(vec![keyed("a", "web", "k"), keyed("b", "web", "k")])
    }));
    assert!(r.to_string().contains("key \"k\" appears twice"));
    let r = h.reject(Command::Allocate(AllocateBatch {
        team: "default".into(),
        host: "h".into(),
        ..batch(vec![item("a"); crate::MAX_BATCH + 1])
    }));
    assert!(r.to_string().contains("at most 1024 items"));
    let r = h.reject(Command::Allocate(AllocateBatch {
        team: "default".into(),
        host: "h".into(),
        ..batch(vec![])
    }));
    assert!(r.to_string().contains("at least one item"));
}

#[test]
fn revisions_are_fencing_tokens() {
    let mut h = Harness::new();
    let Response::Allocated { grants: g1, revision: r1, .. } = h.alloc(vec![item("a")]) else { panic!() };
    let Response::Allocated { grants: g2, revision: r2, .. } = h.alloc(vec![item("b")]) else { panic!() };
    assert!(r2 > r1);
    assert_eq!(g1[0].allocation.revision, r1);
    assert_eq!(g2[0].allocation.revision, r2);
}
