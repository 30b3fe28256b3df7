//! Ports busy on their host: skipped, recorded as conflicts, and planned around.

use super::*;

#[test]
fn busy_ports_are_skipped_and_recorded() {
    let mut h = Harness::new();
    let probe = HostProbe::new(vec![8000, 8001, 8002], vec![8000, 8001]);
    let Response::Allocated { grants, revision, .. } =
        h.alloc_with(vec![in_pool("w", "web")], LeaseSpec::None, Some(probe))
    else {
        panic!()
    };
    assert_eq!(grants[0].allocation.port, 8002);
    let conflicts: Vec<u16> =
        h.st.events_since(revision)
            .filter_map(|e| match &e.kind {
                EventKind::Conflict(c) => Some(c.port),
                _ => None,
            })
            .collect();
    assert_eq!(conflicts, [8000, 8001]);
}

/// The `Conflict` events of the batch at `revision`, as (host, port, holder pid).
fn conflicts_at(st: &State, revision: u64) -> Vec<(String, u16, Option<u32>)> {
    st.events_since(revision)
        .take_while(|e| e.revision == revision)
        .filter_map(|e| match &e.kind {
            EventKind::Conflict(c) => Some((c.host.clone(), c.port, c.holder.as_ref().map(|h| h.pid))),
            _ => None,
        })
        .collect()
}

#[test]
fn a_busy_port_is_recorded_once_a_minute_per_host_and_holder() {
    let mut h = Harness::new();
    let squatter = |pid: u32| Holder { pid, command: "java -jar legacy.jar".into() };
    // Allocations in the web pool (8000-) while 8000 and 8001 are held on the allocating host.
    let take = |h: &mut Harness, host: &str, pid: u32| {
        let probe = HostProbe::new((8000..8010).collect(), vec![8000, 8001])
            .with_owners(vec![(8000, squatter(pid)), (8001, squatter(pid))]);
        let batch = AllocateBatch {
            host: host.into(),
            probe: Some(probe),
            ..batch(vec![at("w", 8000, Strategy::Next)])
        };
        let Response::Allocated { grants, revision, .. } = h.apply(Command::Allocate(batch)) else {
            panic!()
        };
        h.release(&[grants[0].allocation.port]);
        conflicts_at(&h.st, revision)
    };
    let h1 = |port, pid| ("h1".to_string(), port, Some(pid));
    assert_eq!(take(&mut h, "h1", 7), [h1(8000, 7), h1(8001, 7)]);
    // A burst walking past the same busy ports records nothing new...
    for _ in 0..5 {
        assert_eq!(take(&mut h, "h1", 7), []);
    }
    // ...but the same ports on another host are news, and so is another process holding them.
    assert_eq!(take(&mut h, "h2", 7).len(), 2);
    assert_eq!(take(&mut h, "h1", 8), [h1(8000, 8), h1(8001, 8)]);
    // A minute after the last record, the port is recorded again.
    h.advance(crate::CONFLICT_REPEAT_MS - 100);
    assert_eq!(take(&mut h, "h1", 8), []);
    h.advance(100);
    assert_eq!(take(&mut h, "h1", 8), [h1(8000, 8), h1(8001, 8)]);

    // When the record leaves the kept history, the rule forgets it too, as a replica rebuilt from
    // the kept events would (`check_invariants` checks that round trip). The filler goes in
    // through `step`, without the checks after every entry, which would take long here.
    let recorded = h.st.meta.revision;
    h.add_pool("default", "filler", "30000-39999");
    h.apply(Command::SetCooldown { ms: 0 }); // released filler ports are free again at once
    let mut rounds = 0;
    while h.st.oldest_event_revision() <= recorded {
        let items = (0..MAX_BATCH).map(|i| in_pool(&format!("f{i}"), "filler")).collect();
        let Response::Allocated { grants, .. } = h.step(&Command::Allocate(batch(items))) else { panic!() };
        let ports = grants.iter().map(|g| g.allocation.port).collect();
        let selector = ReleaseSelector::Ports(ports);
        let released = h.step(&Command::Release { team: "default".into(), selector });
        assert!(matches!(released, Response::Released { .. }), "{released:?}");
        rounds += 1;
        assert!(rounds < 20, "the history should have moved past revision {recorded}");
    }
    check_invariants(&h.st);
    assert!(h.st.last_conflicts.0.is_empty(), "no host left behind: {:?}", h.st.last_conflicts);
    assert_eq!(take(&mut h, "h1", 8).len(), 2, "forgotten, so recorded again within the minute");
}

#[test]
fn busy_wanted_port_with_fail_is_rejected_naming_the_host() {
    let mut h = Harness::new();
    let probe = HostProbe::new(vec![8080], vec![8080]);
    let r = h.alloc_with(vec![at("w", 8080, Strategy::Fail)], LeaseSpec::None, Some(probe));
    let Response::Rejected(r) = r else { panic!("{r:?}") };
    assert!(r.to_string().contains("in use on host \"h1\""), "{r}");
}

#[test]
fn an_unprobed_candidate_asks_for_another_probe() {
    let mut h = Harness::new();
    let probe = HostProbe::new(vec![8000], vec![8000]);
    let r = h.alloc_with(vec![in_pool("w", "web")], LeaseSpec::None, Some(probe.clone()));
    assert_eq!(r, Response::Rejected(Rejection::NeedProbe { port: 8001 }));
    let r = h.alloc_with(
        vec![AllocItem { strategy: Strategy::Random, ..in_pool("w", "web") }],
        LeaseSpec::None,
        Some(probe),
    );
    assert!(matches!(r, Response::Rejected(Rejection::NeedProbe { .. })));
}

#[test]
fn plan_covers_what_apply_picks() {
    let mut h = Harness::new();
    h.one(in_pool("x", "web"));
    h.apply(Command::Reserve { port: 8001, reason: String::new() });
    for strategy in [Strategy::Sticky, Strategy::Next, Strategy::Fail, Strategy::Random] {
        let batch = AllocateBatch {
            team: "default".into(),
            host: "h1".into(),
            items: vec![
                AllocItem { strategy, ..in_pool("a", "web") },
                in_pool("b", "web"),
                keyed("c", "db", "k"),
            ],
            ..batch(Vec::new())
        };
        let checked = h.st.plan(&batch, h.now, crate::PlanWidth::uniform(4), 99, &[]);
        assert!(!checked.contains(&8000) && !checked.contains(&8001), "{strategy}: {checked:?}");
        let mut with_probe = batch.clone();
        with_probe.probe = Some(HostProbe::new(checked, vec![]));
        let mut st = h.st.clone();
        let r = st.apply(ApplyCtx { now_ms: h.now, index: 1, seq: 0 }, &Command::Allocate(with_probe));
        assert!(matches!(r, Response::Allocated { .. }), "{strategy}: {r:?}");
    }
}

/// Ports busy on the host stay free in the state, so below the lowest free port they pile up at
/// the head of every plan. The ranges known busy are skipped whole, by the plan and by `apply`:
/// a narrow plan still reaches ports `apply` can take, where before it asked for another probe,
/// and the entry carries one range instead of every busy port (issue 19).
#[test]
fn ranges_known_busy_are_skipped_by_the_plan_and_by_apply() {
    let mut h = Harness::new();
    h.add_pool("default", "wide", "40000-40999");
    let busy: Vec<u16> = (40000..40030).collect();
    let known = h.st.busy_runs(&busy, h.now);
    assert_eq!(known, [PortRange::new(40000, 40029).unwrap()]);
    let batch = batch(vec![in_pool("a", "wide")]);
    let width = crate::PlanWidth::uniform(4);
    let propose = |probe: HostProbe| {
        let mut b = batch.clone();
        b.probe = Some(probe);
        let mut st = h.st.clone();
        let r = st.apply(ApplyCtx { now_ms: h.now, index: 1, seq: 0 }, &Command::Allocate(b));
        (r, conflicts_at(&st, h.st.meta().revision + 1))
    };
    // Unaware of them, the plan is all busy ports and `apply` reaches one it was not probed for.
    let blind = h.st.plan(&batch, h.now, width, 1, &[]);
    assert_eq!(blind, [40000, 40001, 40002, 40003, 40004]);
    let (r, _) = propose(HostProbe::new(blind, busy.clone()));
    assert!(matches!(r, Response::Rejected(Rejection::NeedProbe { port: 40030 })), "{r:?}");
    // Aware of them: the plan starts past them, and `apply` skips them without a conflict (a
    // probe that found them busy was the occasion for one).
    let planned = h.st.plan(&batch, h.now, width, 1, &known);
    assert_eq!(planned, [40030, 40031, 40032, 40033, 40034]);
    let (r, conflicts) = propose(HostProbe::new(planned.clone(), vec![]).with_known_busy(known.clone()));
    assert!(matches!(&r, Response::Allocated { grants, .. } if grants[0].allocation.port == 40030), "{r:?}");
    assert_eq!(conflicts, []);
    // The walk does not stop inside a range for a port probed there: past it, 40030 was not
    // probed.
    let (r, _) = propose(HostProbe::new(vec![40010], vec![]).with_known_busy(known.clone()));
    assert!(matches!(r, Response::Rejected(Rejection::NeedProbe { port: 40030 })), "{r:?}");
    // A port asked for by number inside a range is what the probe found: found free, it is
    // taken; not probed, it is busy on the host.
    let wanted = |checked: Vec<u16>| {
        let mut b = AllocateBatch { items: vec![at("w", 40010, Strategy::Fail)], ..batch.clone() };
        b.probe = Some(HostProbe::new(checked, vec![]).with_known_busy(known.clone()));
        h.st.clone().apply(ApplyCtx { now_ms: h.now, index: 1, seq: 0 }, &Command::Allocate(b))
    };
    let r = wanted(vec![40010]);
    assert!(matches!(&r, Response::Allocated { grants, .. } if grants[0].allocation.port == 40010), "{r:?}");
    let r = wanted(vec![]);
    assert!(
        matches!(
            &r,
            Response::Rejected(Rejection::PortUnavailable {
                port: 40010,
                why: Unavailable::BusyOnHost { .. }
            })
        ),
        "{r:?}"
    );
    // A random pick is drawn from the ports outside the ranges.
    let random = AllocateBatch {
        items: vec![AllocItem { strategy: Strategy::Random, ..in_pool("r", "wide") }],
        ..batch.clone()
    };
    let drawn = h.st.plan(&random, h.now, width, 3, &known);
    assert!(!drawn.is_empty() && drawn.iter().all(|p| !busy.contains(p)), "{drawn:?}");
    let mut b = random.clone();
    b.probe = Some(HostProbe::new(drawn.clone(), vec![]).with_known_busy(known.clone()));
    let r = h.st.clone().apply(ApplyCtx { now_ms: h.now, index: 1, seq: 0 }, &Command::Allocate(b));
    assert!(
        matches!(&r, Response::Allocated { grants, .. } if drawn.contains(&grants[0].allocation.port)),
        "{r:?}"
    );
    // A pool whose every free port is known busy is exhausted, not a probe asked for forever.
    let mut full = Harness::new();
    full.add_pool("default", "tiny", "41000-41002");
    let known = full.st.busy_runs(&[41000, 41001, 41002], full.now);
    for strategy in [Strategy::Random, Strategy::Sticky] {
        let tiny =
            AllocateBatch { items: vec![AllocItem { strategy, ..in_pool("r", "tiny") }], ..batch.clone() };
        let planned = full.st.plan(&tiny, full.now, width, 3, &known);
        assert!(planned.is_empty(), "{strategy}: {planned:?}");
        let mut b = tiny.clone();
        b.probe = Some(HostProbe::new(planned, vec![]).with_known_busy(known.clone()));
        let r = full.st.clone().apply(ApplyCtx { now_ms: full.now, index: 1, seq: 0 }, &Command::Allocate(b));
        assert!(
            matches!(&r, Response::Rejected(Rejection::PoolExhausted { detail, .. }) if detail == "busy on host 3"),
            "{strategy}: {r:?}"
        );
    }
}

/// Busy ports fall in one range when nothing between them could be handed out: allocated,
/// reserved and cooling ports join them; a free port, or one whose cool-down ended, parts them.
#[test]
fn busy_runs_join_over_ports_nobody_could_take() {
    let mut h = Harness::new();
    h.add_pool("default", "wide", "40000-40999");
    for p in [40001, 40002, 40011, 40021] {
        h.one(AllocItem { port: Some(p), ..in_pool("x", "wide") });
    }
    h.apply(Command::Reserve { port: 40003, reason: String::new() });
    h.release(&[40011]);
    let run = |a: u32, b: u32| PortRange::new(a, b).unwrap();
    let busy = [40000, 40004, 40005, 40010, 40012, 40020, 40022, 40040];
    // 40001-40003 held or reserved: one range to 40005; 40006-40009 free: a new one; 40011
    // cooling: 40010-40012; 40013-40019 free; 40021 held: 40020-40022; then 40040 alone.
    assert_eq!(
        h.st.busy_runs(&busy, h.now),
        [run(40000, 40005), run(40010, 40012), run(40020, 40022), run(40040, 40040)]
    );
    // Once 40011's cool-down ends, it could be handed out again: it parts its neighbours.
    h.advance(DEFAULT_COOLDOWN_MS);
    assert_eq!(h.st.busy_runs(&busy, h.now)[1..3], [run(40010, 40010), run(40012, 40012)]);
    assert_eq!(h.st.busy_runs(&[], h.now), []);
    assert_eq!(h.st.busy_runs(&[1000, 40000, 40000], h.now), [run(40000, 40000)], "below 1024, twice");
}

proptest! {
    /// The walk with ranges left out is the walk without them, filtered: the ranges are skipped
    /// whole, and nothing else moves.
    #[test]
    fn a_walk_skipping_ranges_is_the_walk_filtered(
        held in proptest::collection::btree_set(20000u16..20200, 0..80),
        cuts in proptest::collection::btree_set(19990u16..20210, 0..12),
        cooled in 0usize..10,
    ) {
        let mut h = Harness::new();
        h.add_pool("default", "two", "20000-20099,20120-20199");
        let held: Vec<u16> = held.into_iter().filter(|p| !(20100..20120).contains(p)).collect();
        for p in &held {
            h.one(AllocItem { port: Some(*p), pool: Some("two".into()), ..item("x") });
        }
        // Some cool-downs ended (walked again, not pruned yet), some not.
        let ended: Vec<u16> = held.iter().copied().take(cooled).collect();
        let cooling: Vec<u16> = held.iter().copied().skip(cooled).take(cooled).collect();
        for ports in [&ended, &cooling] {
            if !ports.is_empty() {
                h.release(ports);
            }
            h.advance(DEFAULT_COOLDOWN_MS / 2);
        }
        // Pairs of cuts as ranges, sorted and apart.
        let cuts: Vec<u16> = cuts.into_iter().collect();
        let skip: Vec<PortRange> = cuts
            .chunks(2)
            .filter(|c| c.len() == 2 && c[0] < c[1])
            .map(|c| PortRange::new(c[0].into(), (c[1] - 1).into()).unwrap())
            .collect();
        let pool = h.st.pool("default", "two").cloned().unwrap();
        let skipped: Vec<u16> = h.st.selectable_ports(&pool, h.now, &skip).collect();
        let filtered: Vec<u16> = h
            .st
            .selectable_ports(&pool, h.now, &[])
            .filter(|p| !skip.iter().any(|r| r.contains(*p)))
            .collect();
        prop_assert_eq!(skipped, filtered);
    }
}

/// Regression: with a narrow plan, the one spare of a free wanted port was the wanted port itself,
/// so a wanted port busy on the host asked for another probe forever instead of falling back.
#[test]
fn a_busy_wanted_port_falls_back_after_one_wider_probe() {
    let h = Harness::new();
    for strategy in [Strategy::Sticky, Strategy::Next, Strategy::Random] {
        let batch = AllocateBatch {
            team: "default".into(),
            host: "h1".into(),
            ..batch(vec![AllocItem { strategy, ..at("w", 8100, strategy) }])
        };
        let narrow = crate::PlanWidth { wanted_free: 1, otherwise: 4 };
        let checked = h.st.plan(&batch, h.now, narrow, 7, &[]);
        assert!(
            checked.contains(&8100) && checked.len() >= 2,
            "{strategy}: the spare is another port: {checked:?}"
        );
        // The host says the wanted port is busy: the spare (probed free) is taken.
        let mut b = batch.clone();
        b.probe = Some(HostProbe::new(checked, vec![8100]));
        let r = h.st.clone().apply(ApplyCtx { now_ms: h.now, index: 1, seq: 0 }, &Command::Allocate(b));
        assert!(
            matches!(&r, Response::Allocated { grants, .. } if grants[0].allocation.port != 8100),
            "{strategy}: {r:?}"
        );
    }
}
