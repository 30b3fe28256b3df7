//! Pools, releases, events, holders, and the ports a pool can still hand out.

use super::*;

#[test]
fn pools_add_remove_and_bad_ranges() {
    let mut h = Harness::new();
    assert!(matches!(h.add_pool("team-b", "web", "20000-20099,21000"), Response::PoolAdded(_)));
    let cases: &[(&str, &str, &str, &str)] = &[
        ("team-c", "web", "20050-20060", "overlaps pool \"web\" of team \"team-b\" (20000-20099)"),
        ("default", "x", "8500-8600", "overlaps pool \"web\" of team \"default\""),
        ("team-b", "web", "30000-30001", "pool \"web\" already exists in team \"team-b\""),
        ("team-b", "two", "30000-30010,30005-30020", "overlap each other"),
        ("team b", "x", "30000", "team name \"team b\" is not valid"),
    ];
    for (team, name, ranges, msg) in cases {
        let r = match h.add_pool(team, name, ranges) {
            Response::Rejected(r) => r,
            other => panic!("{team}/{name}: {other:?}"),
        };
        assert!(r.to_string().contains(msg), "{r}");
    }
    // A new team draws from its own pools only.
    let Response::Allocated { grants, .. } = h.apply(Command::Allocate(AllocateBatch {
        team: "team-b".into(),
        host: "h".into(),
        ..batch(vec![in_pool("x", "web")])
    })) else {
        panic!()
    };
    let p = grants[0].allocation.port;
    assert_eq!(p, 20000);
    let r = h.reject(Command::RemovePool { team: "team-b".into(), name: "web".into() });
    assert!(r.to_string().contains("still has 1 live allocation"), "{r}");
    let r = h.reject(Command::Release { team: "default".into(), selector: ReleaseSelector::Ports(vec![p]) });
    assert!(
        r.to_string().contains("port 20000 is not allocated in team \"default\""),
        "teams are isolated: {r}"
    );
    h.apply(Command::Release { team: "team-b".into(), selector: ReleaseSelector::Ports(vec![p]) });
    assert!(matches!(
        h.apply(Command::RemovePool { team: "team-b".into(), name: "web".into() }),
        Response::PoolRemoved { .. }
    ));
    assert!(
        h.reject(Command::RemovePool { team: "team-b".into(), name: "web".into() })
            .to_string()
            .contains("unknown pool")
    );
}

#[test]
fn release_errors_change_nothing() {
    let mut h = Harness::new();
    let p = h.one(keyed("a", "web", "k"));
    let cases = [
        (ReleaseSelector::Ports(vec![p, 8500]), "port 8500 is not allocated"),
        (ReleaseSelector::Ports(vec![]), "at least one port"),
        (ReleaseSelector::Ports(vec![80]), "out of range"),
        (ReleaseSelector::Key("nope".into()), "no live allocation has key \"nope\""),
    ];
    for (selector, msg) in cases {
        let r = h.reject(Command::Release { team: "default".into(), selector });
        assert!(r.to_string().contains(msg), "{r}");
    }
    assert!(h.st.allocation(p).is_some());
    let r = h.apply(Command::Release { team: "default".into(), selector: ReleaseSelector::Key("k".into()) });
    assert!(matches!(r, Response::Released { ref allocations, .. } if allocations[0].port == p));
}

#[test]
fn events_are_ordered_and_bounded() {
    // Applied directly: the harness's per-step round trip would make this quadratic.
    let mut st = State::new();
    let ctx = |i: u64| ApplyCtx { now_ms: 1_000 + i, index: i, seq: 0 };
    st.apply(ctx(0), &Command::SetCooldown { ms: 0 });
    for i in 0..(crate::EVENT_RETENTION / 2 + 10) as u64 {
        let batch = AllocateBatch { team: "default".into(), host: "h".into(), ..batch(vec![item("s")]) };
        let Response::Allocated { grants, .. } = st.apply(ctx(2 * i + 1), &Command::Allocate(batch)) else {
            panic!()
        };
        let ports = vec![grants[0].allocation.port];
        st.apply(
            ctx(2 * i + 2),
            &Command::Release { team: "default".into(), selector: ReleaseSelector::Ports(ports) },
        );
    }
    let revs: Vec<(u64, u32)> = st.events_since(0).map(|e| (e.revision, e.seq)).collect();
    assert_eq!(revs.len(), crate::EVENT_RETENTION);
    assert!(revs.windows(2).all(|w| w[0] < w[1]));
    // The history never keeps room for more events than it retains.
    assert_eq!(st.events.capacity(), crate::EVENT_RETENTION);
    assert!(st.oldest_event_revision() > 1);
    check_invariants(&st);
}

#[test]
fn pool_usage_counts() {
    let mut h = Harness::new();
    h.ports(vec![in_pool("a", "web"), in_pool("b", "web")]);
    h.apply(Command::Reserve { port: 8500, reason: String::new() });
    h.release(&[8000]);
    let web = h.st.pool("default", "web").cloned().unwrap();
    let u = h.st.pool_usage(&web, h.now);
    assert_eq!((u.size, u.allocated, u.reserved, u.cooling), (1000, 1, 1, 1));
}

// ----- holders and data written by 0.1.0 ------------------------------------------------------

#[test]
fn allocations_and_conflicts_name_their_holders() {
    let mut h = Harness::new();
    let me = Holder { pid: 4242, command: "gunicorn shop:app".into() };
    let squatter = Holder { pid: 99, command: "python -m http.server 8000".into() };
    let batch = AllocateBatch {
        team: "default".into(),
        host: "h1".into(),
        probe: Some(HostProbe::new(vec![8000, 8001], vec![8000]).with_owners(vec![(8000, squatter.clone())])),
        holder: Some(me.clone()),
        ..batch(vec![at("web", 8000, Strategy::Next)])
    };
    let Response::Allocated { grants, revision, .. } = h.apply(Command::Allocate(batch)) else { panic!() };
    assert_eq!((grants[0].allocation.port, grants[0].allocation.holder.as_ref()), (8001, Some(&me)));
    let conflict =
        h.st.events_since(revision)
            .find_map(|e| match &e.kind {
                EventKind::Conflict(c) => Some(c.clone()),
                _ => None,
            })
            .unwrap();
    assert_eq!((conflict.port, conflict.holder), (8000, Some(squatter)));
    assert_eq!(me.to_string(), "pid 4242 (gunicorn shop:app)");
}

#[test]
fn selectable_ports_skip_allocated_and_cooling_ports_until_the_cool_down_ends() {
    let mut h = Harness::new();
    h.add_pool("default", "two", "20000-20003,20010-20012");
    for p in [20000, 20001, 20003, 20011] {
        h.one(AllocItem { port: Some(p), pool: Some("two".into()), ..item("x") });
    }
    let pool = h.st.pool("default", "two").cloned().unwrap();
    let walk = |h: &Harness| h.st.selectable_ports(&pool, h.now, &[]).collect::<Vec<_>>();
    assert_eq!(walk(&h), [20002, 20010, 20012]);
    h.release(&[20001, 20011]);
    assert_eq!(walk(&h), [20002, 20010, 20012], "cooling ports are skipped like allocated ones");
    // Ended cool-downs that no entry pruned yet are walked again, in port order...
    h.advance(DEFAULT_COOLDOWN_MS);
    assert_eq!(walk(&h), [20001, 20002, 20010, 20011, 20012]);
    // ...and once pruned (every entry prunes ended cool-downs first), the same.
    h.apply(Command::SetCooldown { ms: DEFAULT_COOLDOWN_MS });
    assert!(h.st.cooldown(20001).is_none(), "pruned");
    assert_eq!(walk(&h), [20001, 20002, 20010, 20011, 20012]);
    // The lowest free port after a long allocated run comes next.
    assert_eq!(h.one(in_pool("y", "two")), 20001);
}

mod stats {
    use super::*;
    use crate::stats::{Stats, stats};

    const EPHEMERAL: (u16, u16) = (32768, 60999);

    fn of(h: &Harness) -> Stats {
        stats(&h.st, Some("default"), h.now, EPHEMERAL)
    }

    fn rules(s: &Stats) -> Vec<&'static str> {
        s.recommendations.iter().map(|r| r.rule).collect()
    }

    #[test]
    fn a_fresh_state_needs_nothing() {
        let h = Harness::new();
        let s = of(&h);
        assert!(s.recommendations.is_empty(), "{:?}", s.recommendations);
        let web = s.pools.iter().find(|p| p.name == "web").unwrap();
        assert_eq!((web.size, web.in_use, web.peak, web.allocations), (1000, 0, 0, 0));
        assert_eq!(web.exhaustion_ms, None);
    }

    #[test]
    fn peak_churn_and_time_to_exhaustion_come_from_the_history() {
        let mut h = Harness::new();
        h.add_pool("default", "small", "20000-20009");
        let ports = h.ports((0..6).map(|i| in_pool(&format!("s{i}"), "small")).collect());
        h.release(&ports[..4]);
        h.one(in_pool("late", "small"));
        let s = of(&h);
        let p = s.pools.iter().find(|p| p.name == "small").unwrap();
        assert_eq!((p.in_use, p.peak, p.allocations, p.releases), (3, 6, 7, 4));
        assert!(p.net_per_hour > 0.0);
        // Minutes of history and a growth of 3 ports predict nothing.
        assert_eq!(p.exhaustion_ms, None, "{p:?}");
        // An hour later, 10 more: now a rate worth extrapolating.
        h.add_pool("default", "big", "20100-20199");
        h.advance(crate::stats::FORECAST_MIN_HISTORY_MS);
        h.ports((0..10).map(|i| in_pool(&format!("b{i}"), "big")).collect());
        let s = of(&h);
        let p = s.pools.iter().find(|p| p.name == "big").unwrap();
        assert!(p.exhaustion_ms.is_some_and(|ms| ms > 0), "{p:?}");
    }

    #[test]
    fn widen_when_a_pool_is_nearly_full_or_runs_out_soon() {
        let mut h = Harness::new();
        h.add_pool("default", "small", "20000-20009");
        let ports = h.ports((0..7).map(|i| in_pool(&format!("s{i}"), "small")).collect());
        h.release(&ports);
        assert!(!rules(&of(&h)).contains(&"widen"), "empty again: {:?}", of(&h).recommendations);
        h.advance(61_000); // past the cool-down
        h.ports((0..8).map(|i| in_pool(&format!("t{i}"), "small")).collect());
        let s = of(&h);
        let r = s.recommendations.iter().find(|r| r.rule == "widen").expect("widen");
        assert!(r.reason.contains("pool small of team default is 80 % full (8 of 10 ports)"), "{r:?}");
        assert_eq!(r.command, "portmesh pools add small-2 14000-14099 --team default");

        // A burst on an almost empty pool predicts nothing worth acting on...
        let mut h = Harness::new();
        h.add_pool("default", "big", "20000-20099");
        h.ports((0..10).map(|i| in_pool(&format!("b{i}"), "big")).collect());
        assert!(!rules(&of(&h)).contains(&"widen"), "{:?}", of(&h).recommendations);
        // ...but a pool half full and still growing, over an hour, runs out within a day.
        h.advance(crate::stats::FORECAST_MIN_HISTORY_MS);
        h.ports((10..60).map(|i| in_pool(&format!("b{i}"), "big")).collect());
        let r = of(&h).recommendations.into_iter().find(|r| r.rule == "widen").expect("widen by rate");
        assert!(r.reason.contains("runs out in about"), "{r:?}");
    }

    #[test]
    fn reserve_a_port_external_programs_keep_taking() {
        let mut h = Harness::new();
        h.add_pool("default", "t", "20100-20199");
        let squatter = Holder { pid: 4242, command: "java -jar legacy.jar".into() };
        let taken = |h: &mut Harness, i: usize| {
            let probe = HostProbe::new(vec![20100, 20101 + i as u16], vec![20100])
                .with_owners(vec![(20100, squatter.clone())]);
            h.alloc_with(vec![at(&format!("svc{i}"), 20100, Strategy::Next)], LeaseSpec::None, Some(probe));
        };
        // Each time found taken on a separate occasion: a burst counts once (see CONFLICT_REPEAT_MS).
        taken(&mut h, 0);
        taken(&mut h, 1);
        assert_eq!(of(&h).contested[0].conflicts, 1, "one occasion");
        h.advance(crate::CONFLICT_REPEAT_MS);
        taken(&mut h, 2);
        let s = of(&h);
        assert_eq!(s.contested[0].port, 20100);
        assert_eq!(s.contested[0].conflicts, 2);
        assert!(
            s.contested[0].holders[0].contains("pid 4242 (java -jar legacy.jar) on h1"),
            "{:?}",
            s.contested
        );
        assert!(!rules(&s).contains(&"reserve"), "twice is not yet a habit");
        h.advance(crate::CONFLICT_REPEAT_MS);
        taken(&mut h, 3);
        let s = of(&h);
        let r = s.recommendations.iter().find(|r| r.rule == "reserve").expect("reserve");
        assert!(r.reason.contains("port 20100 was found taken 3 times"), "{r:?}");
        assert!(r.command.starts_with("portmesh reserve 20100 --reason \"taken by pid 4242"), "{r:?}");
        h.apply(Command::Reserve { port: 20100, reason: "legacy".into() });
        assert!(!rules(&of(&h)).contains(&"reserve"), "reserved now");
    }

    #[test]
    fn move_a_pool_out_of_the_ephemeral_range() {
        let mut h = Harness::new();
        h.add_pool("default", "low", "20000-20099");
        assert!(!rules(&of(&h)).contains(&"ephemeral"));
        h.add_pool("default", "high", "40000-40099");
        let s = of(&h);
        let r = s.recommendations.iter().find(|r| r.rule == "ephemeral").expect("ephemeral");
        assert!(
            r.reason.contains(
                "pool high of team default (40000-40099) lies in this host's ephemeral range 32768-60999"
            ),
            "{r:?}"
        );
        assert_eq!(
            r.command,
            "portmesh pools rm high --team default && portmesh pools add high 14000-14099 --team default"
        );
        h.one(in_pool("x", "high"));
        let r = of(&h).recommendations.into_iter().find(|r| r.rule == "ephemeral").unwrap();
        assert!(r.command.starts_with("release its 1 port(s), then: "), "{r:?}");
        // On a host whose ephemeral range is elsewhere, the pool is fine.
        assert!(
            !stats(&h.st, None, h.now, (50000, 60999)).recommendations.iter().any(|r| r.rule == "ephemeral")
        );
    }

    #[test]
    fn keep_airplay_ports_out_of_pools() {
        let mut h = Harness::new();
        h.add_pool("default", "flask", "4900-5099");
        let s = of(&h);
        let r = s.recommendations.iter().find(|r| r.rule == "airplay").expect("airplay");
        assert!(r.reason.contains("contains port 5000"), "{r:?}");
        assert_eq!(r.command, "portmesh reserve 5000 --reason \"macOS AirPlay Receiver\"");
        h.apply(Command::Reserve { port: 5000, reason: "AirPlay".into() });
        assert!(!rules(&of(&h)).contains(&"airplay"));
    }
}
