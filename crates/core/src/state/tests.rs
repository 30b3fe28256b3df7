//! Table-driven tests of `apply`, plus property tests over random command sequences. After every
//! step the harness checks the state's invariants and that it survives a records round trip.

use super::*;
use crate::command::HostProbe;
use crate::types::{HealthCheck, Holder, ServicePort, Strategy};
use crate::{Rejection, Unavailable};
use proptest::prelude::{ProptestConfig, any, prop_assert, prop_assert_eq, prop_oneof, proptest};
#[allow(unused_imports)]
use proptest::strategy::Strategy as _;

/// Applies commands with a fake log: index and time advance by one step each.
struct Harness {
    st: State,
    index: u64,
    now: u64,
}

impl Harness {
    fn new() -> Self {
        Self { st: State::new(), index: 0, now: 1_000_000 }
    }

    /// Applies `cmd` as the next entry, without the checks of [`Harness::apply`].
    fn step(&mut self, cmd: &Command) -> Response {
        self.index += 1;
        self.now += 10;
        self.st.apply(ApplyCtx { now_ms: self.now, index: self.index, seq: 0 }, cmd)
    }

    fn apply(&mut self, cmd: Command) -> Response {
        let before = self.st.clone();
        let r = self.step(&cmd);
        if r.rejection().is_some() {
            let mut b = before;
            let mut a = self.st.clone();
            b.dirty.clear();
            a.dirty.clear();
            // A rejection changes nothing (apart from pruning ended cool-downs).
            b.prune_cooldowns(self.now);
            b.dirty.clear();
            assert_eq!(a, b, "rejected {cmd:?} changed the state");
        }
        check_invariants(&self.st);
        r
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
    }

    fn alloc(&mut self, items: Vec<AllocItem>) -> Response {
        self.alloc_with(items, LeaseSpec::None, None)
    }

    fn alloc_with(&mut self, items: Vec<AllocItem>, lease: LeaseSpec, probe: Option<HostProbe>) -> Response {
        self.apply(Command::Allocate(AllocateBatch { lease, probe, ..batch(items) }))
    }

    fn ports(&mut self, items: Vec<AllocItem>) -> Vec<u16> {
        match self.alloc(items) {
            Response::Allocated { grants, .. } => grants.iter().map(|g| g.allocation.port).collect(),
            other => panic!("expected allocation, got {other:?}"),
        }
    }

    fn one(&mut self, item: AllocItem) -> u16 {
        self.ports(vec![item])[0]
    }

    fn reject(&mut self, cmd: Command) -> Rejection {
        match self.apply(cmd) {
            Response::Rejected(r) => r,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    fn release(&mut self, ports: &[u16]) {
        let r = self.apply(Command::Release {
            team: "default".into(),
            selector: ReleaseSelector::Ports(ports.to_vec()),
        });
        assert!(matches!(r, Response::Released { .. }), "{r:?}");
    }

    fn add_pool(&mut self, team: &str, name: &str, ranges: &str) -> Response {
        let ranges = PortRange::parse_list(ranges).unwrap();
        self.apply(Command::AddPool { team: team.into(), name: name.into(), ranges })
    }
}

/// A batch of team `default` for host `h1`, with no lease, probe or holder.
fn batch(items: Vec<AllocItem>) -> AllocateBatch {
    AllocateBatch {
        team: "default".into(),
        host: "h1".into(),
        lease: LeaseSpec::None,
        items,
        probe: None,
        holder: None,
    }
}

fn item(service: &str) -> AllocItem {
    AllocItem { service: service.into(), ..Default::default() }
}

fn in_pool(service: &str, pool: &str) -> AllocItem {
    AllocItem { pool: Some(pool.into()), ..item(service) }
}

fn at(service: &str, port: u16, strategy: Strategy) -> AllocItem {
    AllocItem { port: Some(port), strategy, ..item(service) }
}

fn keyed(service: &str, pool: &str, key: &str) -> AllocItem {
    AllocItem { key: Some(key.into()), ..in_pool(service, pool) }
}

/// The invariants of SPEC §3 that a single state can show, plus index consistency.
fn check_invariants(st: &State) {
    let pools: Vec<&Pool> = st.pools().collect();
    for (i, a) in pools.iter().enumerate() {
        for b in &pools[i + 1..] {
            for ra in &a.ranges {
                assert!(
                    !b.ranges.iter().any(|rb| rb.overlaps(ra)),
                    "pools {} and {} overlap",
                    a.name,
                    b.name
                );
            }
        }
    }
    for a in st.allocations() {
        assert!(a.port >= crate::MIN_PORT);
        assert!(
            st.team_pools(&a.team).any(|p| p.contains(a.port) && p.name == a.pool),
            "port {} outside pool {} of team {}",
            a.port,
            a.pool,
            a.team
        );
        assert!(st.reservation(a.port).is_none(), "reserved port {} is allocated", a.port);
        if let Some(l) = a.lease_id {
            assert!(st.lease(l).is_some(), "allocation {} attached to missing lease {l}", a.port);
        }
    }
    // The allocated-port bitmap is an exact index of the allocations.
    assert!(st.allocations().all(|a| st.allocated.contains(a.port)));
    assert_eq!(st.allocated.len(), st.allocations().count());
    // The cooling-port bitmap is an exact index of the cool-downs.
    assert!(st.cooldowns.keys().all(|p| st.cooling.contains(*p)));
    assert_eq!(st.cooling.len(), st.cooldowns.len());
    for svc in st.services() {
        if let Some(l) = svc.lease_id {
            assert!(st.lease(l).is_some(), "service {} attached to missing lease {l}", svc.id);
        }
    }
    // The persisted form rebuilds the exact same state, indexes included.
    let mut copy = st.clone();
    copy.dirty.clear();
    let rebuilt = State::from_records(st.records());
    assert_eq!(rebuilt, copy, "records round trip lost something");
    assert_eq!(st.record_count(), st.records().count(), "record_count disagrees with records");
}

#[test]
fn fresh_state_has_default_pools_and_persists_them() {
    let mut st = State::new();
    let names: Vec<_> = st.team_pools("default").map(|p| p.name.clone()).collect();
    assert_eq!(names, ["cache", "db", "default", "queue", "web"]);
    let dirty = st.take_dirty();
    assert!(dirty.contains(&Key::Meta) && dirty.contains(&Key::Pool("default".into(), "web".into())));
    assert_eq!(State::from_records(std::iter::empty()), State::new());
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
            lease: LeaseSpec::None,
            items: vec![it.clone()],
            probe: None,
            holder: None,
        }));
        assert!(r.to_string().contains(msg), "{it:?}: {r}");
    }
    let r = h.reject(Command::Allocate(AllocateBatch {
        team: "ghosts".into(),
        host: "h".into(),
        lease: LeaseSpec::None,
        items: vec![item("x")],
        probe: None,
        holder: None,
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
        lease: LeaseSpec::None,
        items: vec![at("b", p, Strategy::Fail)],
        probe: None,
        holder: None,
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
        lease: LeaseSpec::None,
        items: vec![at("w", 8001, Strategy::Fail)],
        probe: None,
        holder: None,
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
        lease: LeaseSpec::None,
        items: vec![in_pool("late", "tiny")],
        probe: None,
        holder: None,
    }));
    assert_eq!(
        r.to_string(),
        "pool \"tiny\" of team \"default\" exhausted: 5 ports, 5 unavailable (held 4: api: 3, web: 1; reserved 1); \
         release ports, wait for cool-downs, or add a range with `portmesh pools add`"
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
        items: vec![in_pool("a", "web"), in_pool("b", "tiny"), in_pool("c", "tiny"), in_pool("d", "tiny")],
        probe: None,
        holder: None,
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
        lease: LeaseSpec::None,
        items: vec![keyed("a", "web", "k"), keyed("b", "web", "k")],
        probe: None,
        holder: None,
    }));
    assert!(r.to_string().contains("key \"k\" appears twice"));
    let r = h.reject(Command::Allocate(AllocateBatch {
        team: "default".into(),
        host: "h".into(),
        lease: LeaseSpec::None,
        items: vec![item("a"); crate::MAX_BATCH + 1],
        probe: None,
        holder: None,
    }));
    assert!(r.to_string().contains("at most 1024 items"));
    let r = h.reject(Command::Allocate(AllocateBatch {
        team: "default".into(),
        host: "h".into(),
        lease: LeaseSpec::None,
        items: vec![],
        probe: None,
        holder: None,
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
    assert!(h.st.last_conflicts.is_empty(), "{:?}", h.st.last_conflicts);
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
            lease: LeaseSpec::None,
            items: vec![
                AllocItem { strategy, ..in_pool("a", "web") },
                in_pool("b", "web"),
                keyed("c", "db", "k"),
            ],
            probe: None,
            holder: None,
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
/// the head of every plan. Known busy ones are planned but not counted: a narrow plan still
/// reaches ports `apply` can take, where before it asked for another probe (issue 19).
#[test]
fn known_busy_ports_do_not_use_up_a_plan() {
    let mut h = Harness::new();
    h.add_pool("default", "wide", "40000-40999");
    let busy: Vec<u16> = (40000..40030).collect();
    let batch = batch(vec![in_pool("a", "wide")]);
    let width = crate::PlanWidth::uniform(4);
    let propose = |checked: Vec<u16>| {
        let mut b = batch.clone();
        b.probe = Some(HostProbe::new(checked, busy.clone()));
        h.st.clone().apply(ApplyCtx { now_ms: h.now, index: 1, seq: 0 }, &Command::Allocate(b))
    };
    // Unaware of them, the plan is all busy ports and `apply` reaches one it was not probed for.
    let blind = h.st.plan(&batch, h.now, width, 1, &[]);
    assert_eq!(blind, [40000, 40001, 40002, 40003, 40004]);
    assert!(matches!(propose(blind), Response::Rejected(Rejection::NeedProbe { port: 40030 })));
    // Aware of them: they are planned (so the proposal reports them) and four more besides.
    let planned = h.st.plan(&batch, h.now, width, 1, &busy);
    assert_eq!(planned.len(), 30 + 5, "{planned:?}");
    assert!(busy.iter().all(|p| planned.contains(p)));
    let r = propose(planned);
    assert!(matches!(&r, Response::Allocated { grants, .. } if grants[0].allocation.port == 40030), "{r:?}");
    // A random pick is drawn from ports probed free only.
    let random = AllocateBatch {
        items: vec![AllocItem { strategy: Strategy::Random, ..in_pool("r", "wide") }],
        ..batch.clone()
    };
    let drawn = h.st.plan(&random, h.now, width, 3, &busy);
    let sampled: Vec<&u16> = drawn.iter().filter(|p| !busy.contains(p)).collect();
    assert!(busy.iter().all(|p| drawn.contains(p)), "known busy ports are planned: {drawn:?}");
    assert!(!sampled.is_empty() && sampled.len() <= 5, "the sample is of the others: {drawn:?}");
    // A pool whose every free port is known busy is exhausted, not a probe asked for forever.
    let mut full = Harness::new();
    full.add_pool("default", "tiny", "41000-41002");
    let tiny = AllocateBatch {
        items: vec![AllocItem { strategy: Strategy::Random, ..in_pool("r", "tiny") }],
        ..batch.clone()
    };
    let all_busy = [41000, 41001, 41002];
    let planned = full.st.plan(&tiny, full.now, width, 3, &all_busy);
    let mut b = tiny.clone();
    b.probe = Some(HostProbe::new(planned, all_busy.to_vec()));
    let r = full.st.clone().apply(ApplyCtx { now_ms: full.now, index: 1, seq: 0 }, &Command::Allocate(b));
    assert!(matches!(r, Response::Rejected(Rejection::PoolExhausted { .. })), "{r:?}");
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
            lease: LeaseSpec::None,
            items: vec![AllocItem { strategy, ..at("w", 8100, strategy) }],
            probe: None,
            holder: None,
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

    // A lease nobody renewed counts down with the clock alone: its record is not rewritten.
    h.st.take_dirty();
    assert_eq!(
        h.apply(Command::CheckpointLeases { clock_ms: 3_000, remaining: vec![] }),
        Response::Checkpointed { leases: 0 }
    );
    assert_eq!(remaining(&h), Some(2_000));
    assert_eq!(h.st.take_dirty(), BTreeSet::from([Key::Meta]), "only the clock is rewritten");

    // The clock never goes back: an older or repeated reading changes nothing.
    h.apply(Command::CheckpointLeases { clock_ms: 2_000, remaining: vec![] });
    assert_eq!((h.st.meta().lease_clock_ms, remaining(&h)), (3_000, Some(2_000)));
    assert!(h.st.take_dirty().is_empty());

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
        lease: LeaseSpec::None,
        items: vec![in_pool("x", "web")],
        probe: None,
        holder: None,
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
        let batch = AllocateBatch {
            team: "default".into(),
            host: "h".into(),
            lease: LeaseSpec::None,
            items: vec![item("s")],
            probe: None,
            holder: None,
        };
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
        lease: LeaseSpec::None,
        items: vec![at("web", 8000, Strategy::Next)],
        probe: Some(HostProbe::new(vec![8000, 8001], vec![8000]).with_owners(vec![(8000, squatter.clone())])),
        holder: Some(me.clone()),
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

// ----- the registry --------------------------------------------------------------------------

fn service(id: &str, name: &str, port: u16) -> Service {
    Service {
        team: "default".into(),
        id: id.into(),
        name: name.into(),
        project: Some("shop".into()),
        env: Some("dev".into()),
        instance: None,
        host: "h1".into(),
        ports: vec![ServicePort { name: "http".into(), port, protocol: "http".into() }],
        tags: vec!["v1".into()],
        check: None,
        depends_on: Vec::new(),
        status: HealthStatus::Critical,
        output: "ignored".into(),
        lease_id: None,
        holder: Some(Holder { pid: 42, command: "gunicorn app".into() }),
        registered_ms: 0,
        revision: 0,
        status_ms: 0,
    }
}

fn tcp_check() -> HealthCheck {
    HealthCheck { kind: CheckKind::Tcp, port: None, interval_ms: 1_000, timeout_ms: 500, failures: 2 }
}

fn health(id: &str, status: HealthStatus) -> HealthUpdate {
    HealthUpdate { team: "default".into(), id: id.into(), status, output: format!("now {status}") }
}

#[test]
fn register_replace_deregister() {
    let mut h = Harness::new();
    let Response::Registered { service: s, replaced: false, revision } =
        h.apply(Command::Register(Box::new(service("api-1", "api", 8001))))
    else {
        panic!()
    };
    assert_eq!((s.status, s.output.as_str(), s.revision), (HealthStatus::Passing, "", revision));
    let mut checked = service("api-1", "api", 8001);
    checked.check = Some(tcp_check());
    let Response::Registered { service: s, replaced: true, .. } =
        h.apply(Command::Register(Box::new(checked.clone())))
    else {
        panic!()
    };
    assert_eq!(s.status, HealthStatus::Unknown, "a new check starts unknown");
    h.apply(Command::SetHealth { updates: vec![health("api-1", HealthStatus::Critical)] });
    // The same registration again (a restarted wrapper) keeps what the checks found.
    let Response::Registered { service: s, .. } = h.apply(Command::Register(Box::new(checked))) else {
        panic!()
    };
    assert_eq!((s.status, s.output.as_str()), (HealthStatus::Critical, "now critical"));
    assert_eq!(h.st.services().count(), 1);
    let Response::Deregistered { service: gone, revision } =
        h.apply(Command::Deregister { team: "default".into(), id: "api-1".into() })
    else {
        panic!()
    };
    assert_eq!(gone.id, "api-1");
    let kinds: Vec<_> = h.st.events_since(revision).map(|e| &e.kind).collect();
    assert!(
        matches!(kinds[..], [EventKind::ServiceDeregistered { cause: ReleaseCause::Released, .. }]),
        "{kinds:?}"
    );
    let r = h.reject(Command::Deregister { team: "default".into(), id: "api-1".into() });
    assert!(r.to_string().contains("no service \"api-1\" is registered"), "{r}");
    assert_eq!(r.kind(), "not_found");
}

#[test]
fn health_updates_record_only_transitions() {
    let mut h = Harness::new();
    let mut svc = service("db-1", "db", 11000);
    svc.check = Some(tcp_check());
    h.apply(Command::Register(Box::new(svc)));
    let rev = h.st.revision();
    let r = h.apply(Command::SetHealth {
        updates: vec![health("db-1", HealthStatus::Passing), health("gone", HealthStatus::Critical)],
    });
    assert_eq!(r, Response::HealthSet { changed: 1, revision: rev + 1 });
    // No change: no revision, no event.
    let r = h.apply(Command::SetHealth { updates: vec![health("db-1", HealthStatus::Passing)] });
    assert_eq!(r, Response::HealthSet { changed: 0, revision: rev + 1 });
    h.apply(Command::SetHealth {
        updates: vec![health("db-1", HealthStatus::Critical), health("db-1", HealthStatus::Critical)],
    });
    let changes: Vec<_> =
        h.st.events_since(rev)
            .filter_map(|e| match &e.kind {
                EventKind::HealthChanged { previous, status, .. } => Some((*previous, *status)),
                _ => None,
            })
            .collect();
    assert_eq!(
        changes,
        [(HealthStatus::Unknown, HealthStatus::Passing), (HealthStatus::Passing, HealthStatus::Critical)]
    );
    let long = HealthUpdate { output: "é".repeat(600), ..health("db-1", HealthStatus::Warning) };
    h.apply(Command::SetHealth { updates: vec![long] });
    let out = &h.st.service("default", "db-1").unwrap().output;
    assert!(out.len() <= crate::MAX_CHECK_OUTPUT && out.starts_with('é'), "cut at a char boundary");
}

#[test]
fn lease_end_removes_registrations_exactly_once() {
    let mut h = Harness::new();
    let Response::Allocated { grants, lease: Some(lease), .. } =
        h.alloc_with(vec![in_pool("api", "web")], LeaseSpec::New { ttl_ms: 10_000 }, None)
    else {
        panic!()
    };
    let mut svc = service("api-1", "api", grants[0].allocation.port);
    svc.lease_id = Some(lease.id);
    h.apply(Command::Register(Box::new(svc)));
    h.apply(Command::Register(Box::new(service("other", "api", 8999))));
    assert_eq!(h.st.lease_services(lease.id).count(), 1);
    let Response::Expired { revision, .. } = h.apply(Command::ExpireLeases { ids: vec![lease.id] }) else {
        panic!()
    };
    let gone: Vec<_> =
        h.st.events_since(revision)
            .filter_map(|e| match &e.kind {
                EventKind::ServiceDeregistered { service, cause } => Some((service.id.clone(), *cause)),
                _ => None,
            })
            .collect();
    assert_eq!(gone, [("api-1".to_string(), ReleaseCause::LeaseExpired)]);
    assert!(h.st.service("default", "api-1").is_none() && h.st.service("default", "other").is_some());
    assert_eq!(h.st.lease_services(lease.id).count(), 0);
    // Expiring again changes nothing.
    let rev = h.st.revision();
    h.apply(Command::ExpireLeases { ids: vec![lease.id] });
    assert_eq!(h.st.revision(), rev);
    // Registering on a dead lease or another team's lease is refused.
    let mut late = service("late", "api", 8001);
    late.lease_id = Some(lease.id);
    assert!(h.reject(Command::Register(Box::new(late))).to_string().contains("unknown lease"));
}

#[test]
fn bad_registrations_are_refused_and_change_nothing() {
    let mut h = Harness::new();
    let with = |f: &dyn Fn(&mut Service)| {
        let mut s = service("x", "api", 8001);
        f(&mut s);
        s
    };
    let check = |f: &dyn Fn(&mut HealthCheck)| {
        with(&|s| {
            let mut c = tcp_check();
            f(&mut c);
            s.check = Some(c);
        })
    };
    let table: Vec<(Service, &str)> = vec![
        (with(&|s| s.name = "bad name".into()), "service name \"bad name\" is not valid"),
        (with(&|s| s.id = String::new()), "service id \"\" is not valid"),
        (with(&|s| s.ports.clear()), "needs at least one port"),
        (with(&|s| s.ports[0].port = 80), "port 80 is out of range"),
        (with(&|s| s.host = String::new()), "needs the host"),
        (
            with(&|s| s.ports.push(ServicePort { name: "http".into(), port: 8002, protocol: String::new() })),
            "names port \"http\" twice",
        ),
        (with(&|s| s.project = Some("a/b".into())), "project name \"a/b\" is not valid"),
        (check(&|c| c.interval_ms = 10), "check interval 10 ms is too short"),
        (check(&|c| c.timeout_ms = 0), "check timeout 0 ms is not valid"),
        (check(&|c| c.failures = 0), "failures must be at least 1"),
        (
            check(&|c| c.port = Some("admin".into())),
            "the check names port \"admin\", but service \"api\" has ports: http",
        ),
        (check(&|c| c.kind = CheckKind::Http { path: "health".into() }), "must start with '/'"),
        (check(&|c| c.kind = CheckKind::Command { command: " ".into() }), "needs a command"),
        (with(&|s| s.lease_id = Some(77)), "unknown lease 77"),
    ];
    for (svc, msg) in table {
        let r = h.reject(Command::Register(Box::new(svc)));
        assert!(r.to_string().contains(msg), "want {msg:?}, got {r}");
    }
    assert_eq!(h.st.services().count(), 0);
}

// ----- property tests ------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Alloc {
        n: usize,
        pool: u8,
        port: Option<u16>,
        strategy: u8,
        key: Option<u8>,
        lease: bool,
        busy: Vec<u16>,
    },
    Release(u16),
    ReleaseKey(u8),
    Reserve(u16),
    Unreserve(u16),
    Expire(u64),
    Advance(u64),
    Register {
        id: u8,
        lease: Option<u64>,
    },
    Deregister(u8),
    Health(u8, u8),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    let port = prop_oneof![8000u16..8012, 10000u16..10012, 20000u16..20006, 1000u16..1100];
    prop_oneof![
        4 => (1usize..4, 0u8..4, proptest::option::of(port.clone()), 0u8..4, proptest::option::of(0u8..4), any::<bool>(),
              proptest::collection::vec(8000u16..8012, 0..4))
            .prop_map(|(n, pool, port, strategy, key, lease, busy)| Op::Alloc { n, pool, port, strategy, key, lease, busy }),
        2 => port.clone().prop_map(Op::Release),
        1 => (0u8..4).prop_map(Op::ReleaseKey),
        1 => port.clone().prop_map(Op::Reserve),
        1 => port.prop_map(Op::Unreserve),
        1 => (1u64..6).prop_map(Op::Expire),
        1 => (0u64..120_000).prop_map(Op::Advance),
        1 => (0u8..4, proptest::option::of(1u64..6)).prop_map(|(id, lease)| Op::Register { id, lease }),
        1 => (0u8..4).prop_map(Op::Deregister),
        1 => (0u8..4, 0u8..4).prop_map(|(id, s)| Op::Health(id, s)),
    ]
}

fn run_ops(ops: &[Op]) -> Harness {
    let mut h = Harness::new();
    h.add_pool("default", "tiny", "20000-20003");
    let pools = ["web", "default", "tiny", "db"];
    let strategies = [Strategy::Sticky, Strategy::Next, Strategy::Random, Strategy::Fail];
    for op in ops {
        let cmd = match op {
            Op::Alloc { n, pool, port, strategy, key, lease, busy } => {
                let items = (0..*n)
                    .map(|i| AllocItem {
                        pool: Some(pools[*pool as usize].into()),
                        service: format!("s{i}"),
                        key: key.filter(|_| i == 0).map(|k| format!("k{k}")),
                        port: port.filter(|_| i == 0),
                        strategy: strategies[*strategy as usize],
                        ..Default::default()
                    })
                    .collect();
                let mut batch = AllocateBatch {
                    team: "default".into(),
                    host: "h".into(),
                    lease: if *lease { LeaseSpec::New { ttl_ms: 5_000 } } else { LeaseSpec::None },
                    items,
                    probe: None,
                    holder: None,
                };
                if !busy.is_empty() {
                    let checked = h.st.plan(
                        &batch,
                        h.now + 10,
                        crate::PlanWidth { wanted_free: 1, otherwise: 8 },
                        h.index,
                        &[],
                    );
                    batch.probe = Some(HostProbe::new(checked, busy.clone()));
                }
                Command::Allocate(batch)
            }
            Op::Release(p) => {
                Command::Release { team: "default".into(), selector: ReleaseSelector::Ports(vec![*p]) }
            }
            Op::ReleaseKey(k) => {
                Command::Release { team: "default".into(), selector: ReleaseSelector::Key(format!("k{k}")) }
            }
            Op::Reserve(p) => Command::Reserve { port: *p, reason: "prop".into() },
            Op::Unreserve(p) => Command::Unreserve { port: *p },
            Op::Expire(id) => Command::ExpireLeases { ids: vec![*id] },
            Op::Advance(ms) => {
                h.advance(*ms);
                continue;
            }
            Op::Register { id, lease } => {
                let mut svc = service(&format!("s{id}"), "svc", 8000 + u16::from(*id));
                svc.lease_id = *lease;
                Command::Register(Box::new(svc))
            }
            Op::Deregister(id) => Command::Deregister { team: "default".into(), id: format!("s{id}") },
            Op::Health(id, s) => {
                let status = [
                    HealthStatus::Unknown,
                    HealthStatus::Passing,
                    HealthStatus::Warning,
                    HealthStatus::Critical,
                ][*s as usize];
                Command::SetHealth { updates: vec![health(&format!("s{id}"), status)] }
            }
        };
        let r = h.apply(cmd.clone());
        if let (Command::Allocate(b), Response::Allocated { grants, .. }) = (&cmd, &r) {
            // Invariant 8 in the state machine: a busy port is never handed out.
            if let Some(p) = &b.probe {
                for g in grants.iter().filter(|g| !g.existing) {
                    assert!(!p.is_busy(g.allocation.port), "busy port {} handed out", g.allocation.port);
                }
            }
        }
    }
    h
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// No sequence of commands yields two live allocations of one port, a reserved port in use,
    /// or a port outside its team's pools (checked after every step by the harness).
    #[test]
    fn no_sequence_breaks_the_invariants(ops in proptest::collection::vec(op(), 1..60)) {
        let h = run_ops(&ops);
        let mut seen = std::collections::BTreeSet::new();
        for a in h.st.allocations() {
            prop_assert!(seen.insert(a.port));
        }
    }

    /// Replaying the same log gives the same state on every replica.
    #[test]
    fn apply_is_deterministic(ops in proptest::collection::vec(op(), 1..40)) {
        let a = run_ops(&ops);
        let b = run_ops(&ops);
        prop_assert_eq!(a.st, b.st);
    }
}

#[test]
fn selectable_ports_skip_allocated_and_cooling_ports_until_the_cool_down_ends() {
    let mut h = Harness::new();
    h.add_pool("default", "two", "20000-20003,20010-20012");
    for p in [20000, 20001, 20003, 20011] {
        h.one(AllocItem { port: Some(p), pool: Some("two".into()), ..item("x") });
    }
    let pool = h.st.pool("default", "two").cloned().unwrap();
    let walk = |h: &Harness| h.st.selectable_ports(&pool, h.now).collect::<Vec<_>>();
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

fn token(id: &str, role: crate::Role, team: &str, uses: Option<u32>, expires: Option<u64>) -> Command {
    Command::AddToken(Box::new(crate::Token {
        id: id.into(),
        digest: [7; 32],
        role,
        team: team.into(),
        created_ms: 0,
        expires_ms: expires,
        uses_left: uses,
    }))
}

#[test]
fn tokens_are_added_spent_and_revoked_and_the_last_admin_stays() {
    use crate::Role;
    let mut h = Harness::new();
    assert!(!h.st.auth_on());
    let rev = h.st.revision();
    assert!(
        matches!(h.apply(token("adm", Role::Admin, "", None, None)), Response::TokenAdded(t) if t.created_ms == h.now)
    );
    assert!(h.st.auth_on());
    assert_eq!(h.st.revision(), rev, "tokens fence nothing: no revision");
    // Bad tokens are refused and change nothing (the harness checks that).
    assert_eq!(
        h.apply(token("adm", Role::Admin, "", None, None)).rejection().unwrap().kind(),
        "already_exists"
    );
    assert_eq!(
        h.apply(token("x", Role::Admin, "teama", None, None)).rejection().unwrap().kind(),
        "invalid_argument"
    );
    assert_eq!(
        h.apply(token("x", Role::Member, "bad team", None, None)).rejection().unwrap().kind(),
        "invalid_argument"
    );
    // The last admin token cannot be revoked.
    let r = h.apply(Command::RevokeToken { id: "adm".into() });
    assert!(matches!(r.rejection(), Some(Rejection::LastAdminToken { .. })), "{r:?}");
    // A single-use join token: one join, then gone.
    h.apply(token("j1", Role::Join, "", Some(1), None));
    assert!(matches!(h.apply(Command::UseToken { id: "j1".into() }), Response::TokenUsed { .. }));
    assert!(h.st.token("j1").is_none());
    assert_eq!(h.apply(Command::UseToken { id: "j1".into() }).rejection().unwrap().kind(), "not_found");
    // Two uses, then gone; an expired one is refused and kept (to say "expired", not "unknown").
    h.apply(token("j2", Role::Join, "", Some(2), None));
    h.apply(Command::UseToken { id: "j2".into() });
    assert_eq!(h.st.token("j2").unwrap().uses_left, Some(1));
    h.apply(token("j3", Role::Join, "", None, Some(h.now + 5)));
    h.advance(100);
    assert!(matches!(
        h.apply(Command::UseToken { id: "j3".into() }).rejection(),
        Some(Rejection::TokenExpired { .. })
    ));
    // Revoking a member token, and a second admin makes the first revocable.
    h.apply(token("m", Role::Member, "teama", None, None));
    assert!(matches!(h.apply(Command::RevokeToken { id: "m".into() }), Response::TokenRevoked { .. }));
    assert_eq!(h.apply(Command::RevokeToken { id: "m".into() }).rejection().unwrap().kind(), "not_found");
    h.apply(token("adm2", Role::Admin, "", None, None));
    assert!(matches!(h.apply(Command::RevokeToken { id: "adm".into() }), Response::TokenRevoked { .. }));
    assert!(h.st.auth_on());
    // Tokens survive a records round trip (snapshots, restarts).
    let back = State::from_records(h.st.records());
    assert_eq!(back.tokens().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["adm2", "j2", "j3"]);
}
