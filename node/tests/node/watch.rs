//! Watch: every event kind, in order, resumed, compacted, shared encoding.

use super::*;

/// Collects a watch stream's events in the background until it has seen `until` (a revision)
/// or `stop` fires; returns the events and the last revision delivered.
fn collect_watch(
    mut stream: tonic::Streaming<pb::WatchResponse>,
) -> (
    tokio::sync::watch::Receiver<u64>,
    tokio::task::JoinHandle<Vec<pb::Event>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (seen_tx, seen_rx) = tokio::sync::watch::channel(0u64);
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut events = Vec::new();
        loop {
            tokio::select! {
                m = stream.message() => match m {
                    Ok(Some(m)) => {
                        events.extend(m.events);
                        seen_tx.send_replace(m.revision);
                    }
                    other => panic!("watch stream ended: {other:?}"),
                },
                _ = &mut stop_rx => return events,
            }
        }
    });
    (seen_rx, task, stop_tx)
}

async fn wait_seen(seen: &mut tokio::sync::watch::Receiver<u64>, rev: u64) {
    let reached = tokio::time::timeout(Duration::from_secs(20), seen.wait_for(|r| *r >= rev)).await.is_ok();
    assert!(reached, "the watcher never reached revision {rev} (at {})", *seen.borrow());
}

/// Waits until the registration `id` has `status`.
async fn wait_health(client: &Client, id: &str, status: pb::HealthStatus) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let req = pb::DiscoverRequest { include_unhealthy: true, ..Default::default() };
        let found = client.discover(req).await.unwrap();
        let now = found.services.iter().find(|s| s.id == id).map(|s| s.status());
        if now == Some(status) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id} never became {status:?} (is {now:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn in_order(events: &[pb::Event]) {
    for w in events.windows(2) {
        assert!(
            (w[0].revision, w[0].seq) < (w[1].revision, w[1].seq),
            "out of order: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
}

/// Every event kind the API can cause reaches a watcher on a follower, in order, across a
/// leader change; a second watcher reading the whole history afterwards sees the same list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_kind_reaches_a_watcher_in_order_across_a_leader_change() {
    let mut c = Cluster::start(3).await;
    let leader = c.leader_index();
    let f = (leader + 1) % 3;
    let watcher = Client::connect(&c.addrs[f]).await.unwrap();
    let stream = watcher.watch(pb::WatchRequest { from_revision: 1, ..Default::default() }).await.unwrap();
    let (mut seen, task, stop) = collect_watch(stream);
    let client = c.client().await;
    let one =
        |service: &str| pb::AllocateRequest { items: vec![item(service, "default")], ..Default::default() };
    let a = client.allocate(one("a")).await.unwrap().allocations[0].port;
    client.release(pb::ReleaseRequest { ports: vec![a], ..Default::default() }).await.unwrap();
    client.reserve(pb::ReserveRequest { port: 22_222, reason: "watch test".into() }).await.unwrap();
    client.unreserve(pb::UnreserveRequest { port: 22_222 }).await.unwrap();
    client
        .add_pool(pb::AddPoolRequest {
            team: "default".into(),
            name: "extra".into(),
            ranges: vec![pb::PortRange { start: 23_200, end: 23_209 }],
        })
        .await
        .unwrap();
    client.remove_pool(pb::RemovePoolRequest { team: "default".into(), name: "extra".into() }).await.unwrap();
    let lease =
        client.grant_lease(pb::LeaseGrantRequest { team: "default".into(), ttl_ms: 60_000 }).await.unwrap();
    let mut req = one("leased");
    req.lease_id = lease.id;
    client.allocate(req).await.unwrap();
    client.revoke_lease(pb::LeaseRevokeRequest { team: "default".into(), lease_id: lease.id }).await.unwrap();
    let mut req = one("expiring");
    req.ttl_ms = 1_000;
    let expiring = client.allocate(req).await.unwrap();
    // A registration on the 1 s lease, and one with a health check on a real listener.
    client
        .register(pb::RegisterRequest {
            service: Some(pb::Service {
                name: "leased-svc".into(),
                ports: vec![pb::ServicePort { port: expiring.allocations[0].port, ..Default::default() }],
                lease_id: expiring.lease_id,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let checked = client
        .register(pb::RegisterRequest {
            service: Some(pb::Service {
                name: "checked".into(),
                ports: vec![pb::ServicePort {
                    port: u32::from(listener.local_addr().unwrap().port()),
                    ..Default::default()
                }],
                check: Some(pb::HealthCheck {
                    r#type: pb::CheckType::CheckTcp as i32,
                    interval_ms: 100,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    wait_health(&client, &checked.id, pb::HealthStatus::Passing).await;
    let held = std::net::TcpListener::bind("0.0.0.0:10990").ok();
    let mut req = one("conflicted");
    req.items[0].port = 10_990;
    req.items[0].strategy = pb::Strategy::Next as i32;
    client.allocate(req).await.unwrap();
    drop(held);
    // The leader changes; the stream on the follower goes on.
    c.stop(leader).await;
    let after = client.allocate(one("after")).await.unwrap();
    // Health reports reach the new leader.
    drop(listener);
    wait_health(&client, &checked.id, pb::HealthStatus::Critical).await;
    client
        .deregister(pb::DeregisterRequest { team: "default".into(), id: checked.id.to_string() })
        .await
        .unwrap();
    // The node that applied the deregistration (the leader the client follows) is at least at
    // its revision; under load the lease below may have expired before it.
    let deregistered_at = client.status().await.unwrap().revision;
    // The 1 s lease expires under the new leader.
    // The revision to wait for is read from the node that applied the expiry (another node's
    // status may still lag behind it).
    let expired_at = loop {
        let applied = {
            let sm = c.live().next().unwrap().api.node().state().read();
            (sm.state.leases().count() == 0).then(|| sm.state.revision())
        };
        if let Some(revision) = applied {
            break revision;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let last = expired_at.max(after.revision).max(deregistered_at);
    wait_seen(&mut seen, last).await;
    stop.send(()).unwrap();
    let events = task.await.unwrap();
    in_order(&events);
    let kinds: BTreeSet<i32> = events.iter().map(|e| e.r#type).collect();
    use pb::EventType as T;
    for k in [
        T::Allocated,
        T::Released,
        T::Expired,
        T::Reserved,
        T::Unreserved,
        T::PoolAdded,
        T::PoolRemoved,
        T::LeaseGranted,
        T::LeaseRevoked,
        T::LeaseExpired,
        T::ConflictObserved,
        T::ServiceRegistered,
        T::ServiceDeregistered,
        T::HealthChanged,
    ] {
        assert!(kinds.contains(&(k as i32)), "no {k:?} event among {} events", events.len());
    }
    // The conflict the test made (the host's own programs may hold other ports of the pool).
    let conflicts: Vec<u32> = events.iter().filter_map(|e| e.conflict.as_ref()).map(|c| c.port).collect();
    assert!(conflicts.contains(&10_990), "{conflicts:?}");
    let health: Vec<(i32, i32)> = events
        .iter()
        .filter(|e| e.r#type == T::HealthChanged as i32 && e.service_id == checked.id)
        .map(|e| (e.previous, e.status))
        .collect();
    use pb::HealthStatus as H;
    assert_eq!(
        health,
        [(H::Unknown as i32, H::Passing as i32), (H::Passing as i32, H::Critical as i32)],
        "each transition once, though three nodes on this host check it"
    );
    let mut gone: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e.r#type == T::ServiceDeregistered as i32)
        .map(|e| (e.service.as_ref().unwrap().name.as_str(), e.cause.as_str()))
        .collect();
    gone.sort();
    assert_eq!(gone, [("checked", "released"), ("leased-svc", "lease expired")], "each once");
    // The whole history, read afterwards from another node, is the same list.
    let other = c.live().map(|n| n.grpc_addr.to_string()).find(|a| *a != c.addrs[f]).unwrap();
    let stream = Client::connect(&other)
        .await
        .unwrap()
        .watch(pb::WatchRequest { from_revision: 1, ..Default::default() })
        .await
        .unwrap();
    let (mut seen2, task2, stop2) = collect_watch(stream);
    wait_seen(&mut seen2, last).await;
    stop2.send(()).unwrap();
    let history: Vec<pb::Event> = task2.await.unwrap().into_iter().filter(|e| e.revision <= last).collect();
    let live: Vec<pb::Event> = events.into_iter().filter(|e| e.revision <= last).collect();
    assert_eq!(history, live);
}

/// A watcher that stops midway and resumes on another node with its last revision + 1 misses
/// nothing and sees nothing twice, while a load runs; filters keep only what was asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_resuming_on_another_node_misses_nothing_and_sees_nothing_twice() {
    let c = Cluster::start(3).await;
    testkit::big_default_pool(&c.client().await).await;
    let start = c.client().await.status().await.unwrap().revision + 1;
    let addrs = c.addrs.clone();
    let load = tokio::spawn(async move { testkit::load(&addrs, 8, 25, "w").await });
    // First watcher on node 0: read until past the first few hundred events, then hang up.
    let mut first = Client::connect(&c.addrs[0])
        .await
        .unwrap()
        .watch(pb::WatchRequest { from_revision: start, ..Default::default() })
        .await
        .unwrap();
    let mut got: Vec<pb::Event> = Vec::new();
    let mut upto = start - 1;
    while got.len() < 300 {
        let m = first.message().await.unwrap().unwrap();
        got.extend(m.events);
        upto = m.revision;
    }
    drop(first);
    // Resume on node 1.
    let stream = Client::connect(&c.addrs[1])
        .await
        .unwrap()
        .watch(pb::WatchRequest { from_revision: upto + 1, ..Default::default() })
        .await
        .unwrap();
    let (mut seen, task, stop) = collect_watch(stream);
    let oracle = load.await.unwrap();
    let end = c.client().await.status().await.unwrap().revision;
    wait_seen(&mut seen, end).await;
    stop.send(()).unwrap();
    got.extend(task.await.unwrap());
    in_order(&got);
    // The full history from node 2 is exactly the concatenation.
    let stream = Client::connect(&c.addrs[2])
        .await
        .unwrap()
        .watch(pb::WatchRequest { from_revision: start, ..Default::default() })
        .await
        .unwrap();
    let (mut seen, task, stop) = collect_watch(stream);
    wait_seen(&mut seen, end).await;
    stop.send(()).unwrap();
    let full: Vec<pb::Event> = task.await.unwrap().into_iter().filter(|e| e.revision <= end).collect();
    let got: Vec<pb::Event> = got.into_iter().filter(|e| e.revision <= end).collect();
    assert_eq!(got.len(), full.len());
    assert!(got == full, "the resumed watch differs from the full history");
    let allocated = full.iter().filter(|e| e.r#type == pb::EventType::Allocated as i32).count();
    assert_eq!(allocated, oracle.acked(), "one event per acknowledged allocation");
    // A filter by service keeps only that service's events.
    let service = "w-3-7";
    let stream = Client::connect(&c.addrs[0])
        .await
        .unwrap()
        .watch(pb::WatchRequest { from_revision: start, service: service.into(), ..Default::default() })
        .await
        .unwrap();
    let (mut seen, task, stop) = collect_watch(stream);
    wait_seen(&mut seen, end).await;
    stop.send(()).unwrap();
    let only = task.await.unwrap();
    assert_eq!(only.len(), 10, "one batch of 10 ports: {only:?}");
    assert!(only.iter().all(|e| e.allocation.as_ref().is_some_and(|a| a.service == service)));
}

/// History is kept for the latest 10,000 events: a watch from before that fails with
/// `compacted`, naming the oldest revision still available; from there it works, and an idle
/// watcher gets progress notifications with the current revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_revision_names_the_oldest_available() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, client) = node_in(dir.path(), |_| {}).await;
    testkit::big_default_pool(&client).await;
    for round in 0..6 {
        // The same sticky keys every round: a key gets its port back at once (no cool-down).
        let items = (0..1024)
            .map(|i| pb::AllocItem { key: format!("k{i}"), ..item(&format!("c{round}-{i}"), "default") })
            .collect();
        let r = client.allocate(pb::AllocateRequest { items, ..Default::default() }).await.unwrap();
        let ports = r.allocations.iter().map(|a| a.port).collect();
        client.release(pb::ReleaseRequest { ports, ..Default::default() }).await.unwrap();
    }
    let err = client.watch(pb::WatchRequest { from_revision: 1, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.kind(), Some("compacted"), "{err}");
    let msg = err.to_string();
    let oldest: u64 = msg
        .split("from revision ")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(oldest > 1, "{msg}");
    let mut s = client.watch(pb::WatchRequest { from_revision: oldest, ..Default::default() }).await.unwrap();
    let m = s.message().await.unwrap().unwrap();
    assert_eq!(m.events[0].revision, oldest);
    // Idle: progress notifications carry the current revision.
    let current = client.status().await.unwrap().revision;
    let mut s = client
        .watch(pb::WatchRequest {
            from_revision: current + 1,
            progress_interval_ms: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), s.message()).await.unwrap().unwrap().unwrap();
    assert!(m.progress && m.events.is_empty(), "{m:?}");
    assert_eq!(m.revision, current);
    let err =
        client.watch(pb::WatchRequest { progress_interval_ms: 10, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.kind(), Some("invalid_argument"), "{err}");
}

/// A watch from a revision the cluster has not reached waits for it, and its progress messages
/// report no more than the node's own revision (a watch from 2^64−1 reported 2^64−2).
#[tokio::test]
async fn a_watch_from_the_future_invents_no_revision() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, client) = node_in(dir.path(), |_| {}).await;
    let now = client.status().await.unwrap().revision;
    let req = pb::WatchRequest { from_revision: u64::MAX, progress_interval_ms: 100, ..Default::default() };
    let mut stream = client.watch(req).await.unwrap();
    for _ in 0..2 {
        let msg = stream.message().await.unwrap().expect("a progress message");
        assert!(msg.progress && msg.events.is_empty(), "{msg:?}");
        assert!(msg.revision <= now + 1, "progress at {} while the node is at {now}", msg.revision);
    }
}

/// Watchers of one node share the conversion of each event to its wire form: 24 watchers (a
/// third filtered on a service) each get what they asked for, in order, and every event of the
/// writes was encoded once, not once per watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_share_one_encoding_of_each_event() {
    let c = Cluster::start(1).await;
    let api = c.nodes[0].as_ref().unwrap().api.clone();
    let client = c.client().await;
    let mut watchers = Vec::new();
    for i in 0..24 {
        let service = if i % 3 == 0 { "a".to_owned() } else { String::new() };
        let req = pb::WatchRequest { service: service.clone(), ..Default::default() };
        let stream = Client::connect(&c.addrs[0]).await.unwrap().watch(req).await.unwrap();
        watchers.push((service, collect_watch(stream)));
    }
    let before = api.node().state().read().state.revision();
    let encoded_before = api.metrics().watch_events_encoded.get();
    let one =
        |service: &str| pb::AllocateRequest { items: vec![item(service, "default")], ..Default::default() };
    let a = client.allocate(one("a")).await.unwrap().allocations[0].port;
    client.allocate(one("b")).await.unwrap();
    client.release(pb::ReleaseRequest { ports: vec![a], ..Default::default() }).await.unwrap();
    let (after, written) = {
        let sm = api.node().state().read();
        (sm.state.revision(), sm.state.events_since(before + 1).count() as u64)
    };
    assert!(written >= 3, "three writes, {written} events");
    for (service, (mut seen, task, stop)) in watchers {
        wait_seen(&mut seen, after).await;
        stop.send(()).unwrap();
        let events = task.await.unwrap();
        in_order(&events);
        let services: Vec<&str> =
            events.iter().filter_map(|e| e.allocation.as_ref()).map(|a| a.service.as_str()).collect();
        let want: &[&str] = if service.is_empty() { &["a", "b", "a"] } else { &["a", "a"] };
        assert_eq!(services, want, "watcher filtered on {service:?}");
    }
    let encoded = api.metrics().watch_events_encoded.get() - encoded_before;
    assert_eq!(encoded, written, "{written} events were encoded {encoded} times for 24 watchers");
}
