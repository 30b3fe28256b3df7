//! Property tests over random command sequences.

use super::*;

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
        /// The busy ports come as ranges known busy (a node's memory), not as probed.
        remembered: bool,
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
              (proptest::collection::vec(8000u16..8012, 0..4), any::<bool>()))
            .prop_map(|(n, pool, port, strategy, key, lease, (busy, remembered))| {
                Op::Alloc { n, pool, port, strategy, key, lease, busy, remembered }
            }),
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
            Op::Alloc { n, pool, port, strategy, key, lease, busy, remembered } => {
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
                    // A leased batch registers its service in the same step (as `run` does).
                    register: lease.then(|| {
                        let names: Vec<String> = (0..*n).map(|i| format!("p{i}")).collect();
                        riding("svc", &names.iter().map(String::as_str).collect::<Vec<_>>())
                    }),
                    items,
                    ..batch(Vec::new())
                };
                let width = crate::PlanWidth { wanted_free: 1, otherwise: 8 };
                if *remembered {
                    // As a node does: the busy ports it remembers go as ranges, but for the ports
                    // asked for by number or as a key's last port, which are probed afresh.
                    let asked = h.st.asked_for(&batch);
                    let mut known: Vec<u16> = busy.iter().copied().filter(|p| !asked.contains(p)).collect();
                    known.sort_unstable();
                    let known = h.st.busy_runs(&known, h.now + 10);
                    let checked = h.st.plan(&batch, h.now + 10, width, h.index, &known);
                    let found = checked.iter().copied().filter(|p| busy.contains(p)).collect();
                    batch.probe = Some(HostProbe::new(checked, found).with_known_busy(known));
                } else if !busy.is_empty() {
                    let checked = h.st.plan(&batch, h.now + 10, width, h.index, &[]);
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
            // Invariant 8 in the state machine: a busy port is never handed out, and a port handed
            // out was probed free.
            if let (Some(p), Op::Alloc { busy, .. }) = (&b.probe, op) {
                for g in grants.iter().filter(|g| !g.existing) {
                    let port = g.allocation.port;
                    assert!(!busy.contains(&port), "busy port {port} handed out");
                    assert_eq!(p.finding(port), Finding::Free, "port {port} handed out");
                }
            }
        }
        if let Response::Allocated { grants, registered: Some(svc), .. } = &r {
            // A registration made with an allocation names exactly its ports, on its lease.
            let ports: Vec<u16> = grants.iter().map(|g| g.allocation.port).collect();
            assert_eq!(svc.ports.iter().map(|p| p.port).collect::<Vec<_>>(), ports);
            assert!(grants.iter().all(|g| g.allocation.lease_id == svc.lease_id));
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
