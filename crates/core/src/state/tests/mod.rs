//! Table-driven tests of `apply`, plus property tests over random command sequences. After every
//! step the harness checks the state's invariants and that it survives a records round trip.

use super::*;
use crate::command::{Finding, HostProbe};
use crate::types::{HealthCheck, Holder, ServicePort, Strategy};
use crate::{Rejection, Unavailable};
use proptest::prelude::{ProptestConfig, any, prop_assert, prop_assert_eq, prop_oneof, proptest};
#[allow(unused_imports)]
use proptest::strategy::Strategy as _;

mod alloc;
mod busy;
mod leases;
mod pools;
mod props;
mod registry;
mod tokens;

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
            // A rejection changes nothing (apart from pruning ended cool-downs).
            b.prune_cooldowns(self.now);
            assert_eq!(self.st, b, "rejected {cmd:?} changed the state");
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
        register: None,
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
    let rebuilt = State::from_records(st.records());
    assert_eq!(&rebuilt, st, "records round trip lost something");
    assert_eq!(st.record_count(), st.records().count(), "record_count disagrees with records");
}

// Shared by the registry tests and the property tests.

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

/// A registration an allocation carries: port 0 and no id (filled in when applied), and the
/// team, host and lease left for the batch to decide.
fn riding(name: &str, ports: &[&str]) -> Box<Service> {
    let mut svc = service("", name, 0);
    svc.ports =
        ports.iter().map(|n| ServicePort { name: (*n).into(), port: 0, protocol: String::new() }).collect();
    (svc.team, svc.host) = ("ignored".into(), "ignored".into());
    Box::new(svc)
}
