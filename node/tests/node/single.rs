//! One node: gRPC services, concurrency, registrations with allocations, probes, redirects.

use super::*;

#[tokio::test]
async fn health_serving_and_reflection_lists_every_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let (node, client) = node_in(dir.path(), |_| {}).await;
    // Every health name answers from the first call on (readiness may still say NOT_SERVING
    // while the health task catches up): never NOT_FOUND, which reads as a wrong name.
    for name in std::iter::once("").chain(portmesh_node::HEALTH_NAMES.iter().copied()) {
        client.health(name).await.unwrap_or_else(|e| panic!("health {name:?} right after start: {e}"));
    }
    let unknown = tokio::time::timeout(Duration::from_secs(5), client.wait_health("no.such.Service")).await;
    assert!(matches!(unknown, Ok(Err(_))), "waiting on an unknown name fails at once: {unknown:?}");
    portmesh_testkit::ready(&client).await;
    assert!(client.is_serving().await.unwrap());

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let msg = resp.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else { panic!("{msg:?}") };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "portmesh.v1.Allocator",
        "portmesh.v1.Leases",
        "portmesh.v1.Pools",
        "portmesh.v1.Cluster",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(s), "{s} missing from {names:?}");
    }
}

/// SPEC §3 invariant 1 under concurrency: 64 clients, 2,048 allocations with releases mixed in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_clients_never_share_a_port() {
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = node_in(dir.path(), |_| {}).await;
    let mut tasks = Vec::new();
    for c in 0..64u32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            for i in 0..32u32 {
                let pool = ["web", "db", "cache", "queue"][(c % 4) as usize];
                let r = client
                    .allocate(pb::AllocateRequest {
                        items: vec![item(&format!("c{c}"), pool)],
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                held.push(r.allocations[0].port);
                if i % 4 == 3 {
                    let port = held.remove(0);
                    client
                        .release(pb::ReleaseRequest { ports: vec![port], ..Default::default() })
                        .await
                        .unwrap();
                }
            }
            held
        }));
    }
    let mut mine = BTreeSet::new();
    for t in tasks {
        for p in t.await.unwrap() {
            assert!(mine.insert(p), "port {p} held by two clients");
        }
    }
    let listed: BTreeSet<u16> =
        client.list(Default::default()).await.unwrap().allocations.iter().map(|a| a.port as u16).collect();
    assert_eq!(
        listed,
        mine.iter().map(|p| *p as u16).collect::<BTreeSet<u16>>(),
        "every acknowledged, unreleased allocation is live and nothing else"
    );
    let st = node.api.node().state().read();
    assert_eq!(st.state.allocations().count(), 64 * 24);
}

/// Concurrent proposals share log entries (group commit) and each gets its own response back.
#[tokio::test]
async fn concurrent_proposals_share_entries_and_get_their_own_responses() {
    use portmesh_core::{Command, Response};
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let (node, _client) = node_in(dir.path(), |_| {}).await;
    let raft = node.api.node().clone();
    let stats = raft.store.stats();
    let (entries0, cmds0) =
        (stats.entries_flushed.load(Ordering::Relaxed), stats.commands_applied.load(Ordering::Relaxed));
    let ports: Vec<u16> = (20_000..20_050).collect();
    // Polled together on this one thread: all 50 are queued before the batcher runs.
    let results = futures::future::join_all(
        ports.iter().map(|p| raft.propose(Command::Reserve { port: *p, reason: "t".into() })),
    )
    .await;
    for (p, r) in ports.iter().zip(results) {
        match r.unwrap() {
            Response::Reserved(res) => assert_eq!(res.port, *p, "responses matched to their commands"),
            other => panic!("{other:?}"),
        }
    }
    let entries = stats.entries_flushed.load(Ordering::Relaxed) - entries0;
    let cmds = stats.commands_applied.load(Ordering::Relaxed) - cmds0;
    assert_eq!(cmds, 50);
    assert!(entries < 10, "50 concurrent commands took {entries} entries");
}

/// An allocation that carries its service's registration makes both in one step, over gRPC;
/// a bad registration is refused naming its field, and nothing is allocated or registered.
#[tokio::test]
async fn an_allocation_registers_its_service_in_the_same_write() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, client) = node_in(dir.path(), |_| {}).await;
    let pool = pb::AddPoolRequest {
        team: "default".into(),
        name: "reg".into(),
        ranges: vec![pb::PortRange { start: 23_300, end: 23_309 }],
    };
    client.add_pool(pool).await.unwrap();
    let registration = |ports: &[&str]| pb::Service {
        name: "api".into(),
        ports: ports.iter().map(|n| pb::ServicePort { name: (*n).into(), ..Default::default() }).collect(),
        tags: vec!["v2".into()],
        pid: 4242,
        ..Default::default()
    };
    let request = |register: pb::Service| pb::AllocateRequest {
        items: vec![item("api", "reg"), item("api-admin", "reg")],
        ttl_ms: 30_000,
        register: Some(register),
        ..Default::default()
    };
    let before = client.status().await.unwrap().revision;
    for (bad, field) in [
        (registration(&["http"]), "register.ports: 1 named for 2 items"),
        (pb::Service { team: "other".into(), ..registration(&["http", "admin"]) }, "register.team"),
        (
            pb::Service {
                ports: vec![
                    pb::ServicePort { name: "http".into(), port: 23_305, protocol: String::new() };
                    2
                ],
                ..registration(&[])
            },
            "register.ports.port",
        ),
    ] {
        let err = client.allocate(request(bad)).await.unwrap_err().to_string();
        assert!(err.contains(field), "want {field:?}: {err}");
    }
    let listed = client.list(pb::ListRequest { pool: "reg".into(), ..Default::default() }).await.unwrap();
    let found =
        client.discover(pb::DiscoverRequest { include_unhealthy: true, ..Default::default() }).await.unwrap();
    assert!(listed.allocations.is_empty() && found.services.is_empty(), "{listed:?} {found:?}");
    assert_eq!(client.status().await.unwrap().revision, before, "a refused allocation changes nothing");

    let r = client.allocate(request(registration(&["http", "admin"]))).await.unwrap();
    let svc = r.registered.expect("registered with the allocation");
    let ports: Vec<u32> = r.allocations.iter().map(|a| a.port).collect();
    assert_eq!(svc.ports.iter().map(|p| p.port).collect::<Vec<_>>(), ports);
    assert_eq!((svc.lease_id, svc.revision, svc.pid), (r.lease_id, r.revision, 4242));
    let found =
        client.discover(pb::DiscoverRequest { name: "api".into(), ..Default::default() }).await.unwrap();
    assert_eq!(found.services, vec![svc]);
    // Revoking the lease ends both.
    client.revoke_lease(pb::LeaseRevokeRequest { lease_id: r.lease_id, ..Default::default() }).await.unwrap();
    let found =
        client.discover(pb::DiscoverRequest { include_unhealthy: true, ..Default::default() }).await.unwrap();
    assert!(found.services.is_empty());
}

/// For a host no member runs on, `allocate_here` probes the new ports itself and asks again
/// past a busy one: the registration made on the busy port goes with it.
/// `List` narrowed to ports or sticky keys answers those allocations only, whatever else the
/// state holds; a filter that is not a port or a key is refused naming its field.
#[tokio::test]
async fn a_list_by_ports_or_keys_answers_those_allocations_only() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, client) = node_in(dir.path(), |_| {}).await;
    for (team, start) in [("default", 23_320), ("other", 23_325)] {
        let pool = pb::AddPoolRequest {
            team: team.into(),
            name: "lst".into(),
            ranges: vec![pb::PortRange { start, end: start + 4 }],
        };
        client.add_pool(pool).await.unwrap();
    }
    let mut by_key = std::collections::BTreeMap::new();
    for (team, key) in [("default", "a"), ("default", "b"), ("default", "c"), ("other", "a")] {
        let items = vec![pb::AllocItem { key: key.into(), ..item("svc", "lst") }];
        let r = client.allocate(pb::AllocateRequest { team: team.into(), items, ..Default::default() }).await;
        by_key.insert((team, key), r.unwrap().allocations[0].port);
    }
    let listed = |req: pb::ListRequest| {
        let client = client.clone();
        async move {
            let mut held: Vec<(String, String, u32)> = client
                .list(req)
                .await
                .unwrap()
                .allocations
                .into_iter()
                .map(|a| (a.team, a.key, a.port))
                .collect();
            held.sort();
            held
        }
    };
    let held = |team: &str, key: &str| (team.to_string(), key.to_string(), by_key[&(team, key)]);
    let (a, c) = (by_key[&("default", "a")], by_key[&("default", "c")]);
    // Ports: every team's holder of each, once, whatever the order or repeats asked for.
    let req = pb::ListRequest { ports: vec![c, a, c, 23_330], ..Default::default() };
    let mut want = vec![held("default", "a"), held("default", "c")];
    want.sort();
    assert_eq!(listed(req).await, want);
    // Keys: in every team, or in one.
    let req = pb::ListRequest { keys: vec!["a".into()], ..Default::default() };
    let mut want = vec![held("default", "a"), held("other", "a")];
    want.sort();
    assert_eq!(listed(req).await, want);
    let req =
        pb::ListRequest { team: "other".into(), keys: vec!["a".into(), "b".into()], ..Default::default() };
    assert_eq!(listed(req).await, vec![held("other", "a")]);
    // Both: the allocations that pass both.
    let req = pb::ListRequest { ports: vec![a, c], keys: vec!["c".into()], ..Default::default() };
    assert_eq!(listed(req).await, vec![held("default", "c")]);
    assert_eq!(listed(pb::ListRequest::default()).await.len(), 4, "no filter: every allocation");

    let before = client.status().await.unwrap().revision;
    for (req, field) in [
        (pb::ListRequest { ports: vec![a, 80], ..Default::default() }, "ports: port 80 is out of range"),
        (pb::ListRequest { ports: vec![70_000], ..Default::default() }, "ports: port 70000 is out of range"),
        (pb::ListRequest { keys: vec!["a".into(), "two words".into()], ..Default::default() }, "keys"),
    ] {
        let err = client.list(req).await.unwrap_err();
        assert_eq!(err.kind(), Some("invalid_argument"), "{err}");
        assert!(err.to_string().contains(field), "want {field:?}: {err}");
    }
    assert_eq!(client.status().await.unwrap().revision, before, "a refused list changes nothing");
}

#[tokio::test]
async fn a_port_found_busy_by_the_client_takes_its_registration_along() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, client) = node_in(dir.path(), |_| {}).await;
    // A listening port whose neighbour is free: the pool is the two.
    let (_busy, port) = (0..50)
        .find_map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            let next_free = port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok();
            next_free.then_some((l, port))
        })
        .unwrap();
    let ranges = vec![pb::PortRange { start: port.into(), end: u32::from(port) + 1 }];
    client.add_pool(pb::AddPoolRequest { team: "default".into(), name: "far".into(), ranges }).await.unwrap();
    let r = client
        .allocate_here(pb::AllocateRequest {
            items: vec![pb::AllocItem { strategy: pb::Strategy::Next as i32, ..item("api", "far") }],
            host: "no-member-runs-here".into(),
            ttl_ms: 30_000,
            register: Some(pb::Service {
                name: "api".into(),
                ports: vec![pb::ServicePort::default()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = r.allocations[0].port;
    assert!(!r.host_probed && got == u32::from(port) + 1, "{r:?}");
    assert_eq!(r.registered.as_ref().map(|s| s.ports[0].port), Some(got));
    let found =
        client.discover(pb::DiscoverRequest { include_unhealthy: true, ..Default::default() }).await.unwrap();
    assert_eq!(found.services.len(), 1, "the registration on the busy port is gone: {found:?}");
}

/// An allocation for another member's host is probed by that member (the leader asks it); one
/// for a host no member runs on is granted unprobed, and `allocate_here` then probes locally,
/// gives busy ports back and asks again with them reported busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_are_probed_on_the_host_they_are_for() {
    let hosts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = Cluster::start_with(3, move |cfg| {
        cfg.host = Some(format!("h{}", hosts.fetch_add(1, std::sync::atomic::Ordering::SeqCst)));
    })
    .await;
    let client = c.client().await;
    // A small pool whose first port is held by a process on this machine (all three "hosts").
    let held = std::net::TcpListener::bind("0.0.0.0:23100").ok();
    assert!(!portmesh_probe::is_free(23100).unwrap(), "port 23100 is held ({held:?})");
    client
        .add_pool(pb::AddPoolRequest {
            team: "default".into(),
            name: "probe".into(),
            ranges: vec![pb::PortRange { start: 23100, end: 23109 }],
        })
        .await
        .unwrap();
    let want = |host: &str| pb::AllocateRequest {
        items: vec![pb::AllocItem {
            service: format!("for-{host}"),
            pool: "probe".into(),
            port: 23100,
            strategy: pb::Strategy::Next as i32,
            ..Default::default()
        }],
        host: host.into(),
        ..Default::default()
    };
    let leader = c.leader_index();
    let other = (leader + 1) % 3;
    let other_host = c.nodes[other].as_ref().unwrap().api.status().host;
    let before = c.nodes[other].as_ref().unwrap().api.probes_served();
    let r = client.allocate(want(&other_host)).await.unwrap();
    assert!(r.host_probed);
    let a = &r.allocations[0];
    assert_eq!((a.port, a.host.as_str()), (23101, other_host.as_str()), "23100 is busy there: {a:?}");
    assert!(
        c.nodes[other].as_ref().unwrap().api.probes_served() > before,
        "the member on {other_host} probed"
    );
    let conflict = |host: &str| {
        let sm = c.nodes[leader].as_ref().unwrap().api.node().state().read();
        sm.state
            .events_since(0)
            .any(|e| matches!(&e.kind, EventKind::Conflict(x) if x.port == 23100 && x.host == host))
    };
    assert!(conflict(&other_host), "the conflict is recorded with the host");

    // No member runs on "laptop": granted unprobed, then corrected by the client.
    let unprobed = client.allocate(want("laptop")).await.unwrap();
    assert!(!unprobed.host_probed);
    assert_eq!(unprobed.allocations[0].port, 23100, "nobody probed the laptop");
    client.release(pb::ReleaseRequest { ports: vec![23100], ..Default::default() }).await.unwrap();
    let fixed = client.allocate_here(want("laptop")).await.unwrap();
    assert_eq!(fixed.allocations[0].port, 23102, "23100 found busy locally and skipped: {fixed:?}");
    let live: BTreeSet<u16> = c.converged().await;
    assert_eq!(live, BTreeSet::from([23101, 23102]), "the busy port was given back");
    // A port the client reports busy is skipped and recorded as a conflict on its host.
    let mut req = want("laptop");
    req.items[0].port = 23103;
    req.busy_ports = vec![23103];
    let r = client.allocate(req).await.unwrap();
    assert_eq!(r.allocations[0].port, 23104);
    let sm = c.nodes[leader].as_ref().unwrap().api.node().state().read();
    assert!(
        sm.state
            .events_since(0)
            .any(|e| matches!(&e.kind, EventKind::Conflict(x) if x.port == 23103 && x.host == "laptop")),
        "the reported port is recorded as a conflict on the laptop"
    );
    drop(sm);
    drop(held);
}

/// An allocation sent straight to a follower (not through the client, which would follow) is
/// refused before the follower plans or probes it: UNAVAILABLE, category `not_leader`, the
/// leader's address in the metadata, and no port taken anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_refuses_an_allocation_naming_the_leader() {
    let c = Cluster::start(3).await;
    let leader = c.leader_index();
    let f = (leader + 1) % 3;
    // The follower has heard from the leader once it applied the membership.
    let follower = c.nodes[f].as_ref().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while follower.api.node().metrics().current_leader.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "the follower never learned the leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = c.nodes[leader].as_ref().unwrap().api.node().state().read().state.allocations().count();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.addrs[f]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let req = pb::AllocateRequest { items: vec![item("direct", "default")], ..Default::default() };
    let status = pb::allocator_client::AllocatorClient::new(channel).allocate(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let meta = |key: &str| status.metadata().get(key).and_then(|v| v.to_str().ok()).map(str::to_string);
    assert_eq!(meta("portmesh-error").as_deref(), Some("not_leader"), "{status:?}");
    assert_eq!(meta("portmesh-leader"), Some(c.addrs[leader].clone()), "{status:?}");
    let after = c.nodes[leader].as_ref().unwrap().api.node().state().read().state.allocations().count();
    assert_eq!(before, after, "a refused allocation took a port");
}

/// A log that grows by bytes rather than by entries (lease checkpoints are such entries) is
/// snapshotted once the bytes appended since the last snapshot pass `snapshot_log_bytes`, long
/// before it reaches `snapshot_every` entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_past_its_byte_limit_is_snapshotted_before_its_entry_count() {
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = node_in(dir.path(), |cfg| {
        cfg.raft.snapshot_every = 1_000_000;
        cfg.raft.snapshot_log_bytes = 64 * 1024;
    })
    .await;
    testkit::big_default_pool(&client).await;
    let mut metrics = node.api.node().metrics_changes();
    assert!(metrics.borrow().snapshot.is_none(), "no snapshot before the writes");
    // 20 entries of 64 allocations with long names: a few KB each, ~150 KB in all.
    for b in 0..20 {
        let items = (0..64)
            .map(|i| pb::AllocItem {
                service: format!("service-{b:02}-{i:02}-{}", "x".repeat(40)),
                pool: "default".into(),
                ..Default::default()
            })
            .collect();
        client.allocate(pb::AllocateRequest { items, ..Default::default() }).await.unwrap();
    }
    let m = tokio::time::timeout(Duration::from_secs(20), metrics.wait_for(|m| m.snapshot.is_some()))
        .await
        .expect("a snapshot within 20 s of the log passing 64 KiB")
        .unwrap()
        .clone();
    let (snapshot, last) = (m.snapshot.unwrap().index, m.last_log_index.unwrap_or(0));
    assert!(last < 100, "{last} entries, far fewer than snapshot_every");
    assert!(snapshot > 0 && dir.path().join("snapshot").is_file(), "snapshot at {snapshot}");
}
