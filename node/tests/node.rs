//! In-process node tests: a real node (Raft over sled in a temp dir, gRPC on 127.0.0.1:0) driven
//! through the real client.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use portmesh_client::{Client, pb};
use portmesh_core::{EventKind, ReleaseCause};
use portmesh_node::{NodeConfig, RunningNode, start};
use portmesh_raft::faults::LinkFaults;
use portmesh_testkit as testkit;
use std::sync::Arc;
use tokio_stream::StreamExt;

/// Logs to the test output when `PORTMESH_TEST_LOG` holds a filter (e.g. `info,openraft=debug`).
fn logs() {
    if let Ok(f) = std::env::var("PORTMESH_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(f))
            .with_test_writer()
            .try_init();
    }
}

async fn node_in(dir: &std::path::Path, tweak: impl FnOnce(&mut NodeConfig)) -> (RunningNode, Client) {
    let mut cfg = NodeConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.bootstrap = true;
    tweak(&mut cfg);
    let node = start(cfg).await.unwrap();
    let client = Client::connect(&node.grpc_addr.to_string()).await.unwrap();
    (node, client)
}

/// Waits for `cond` on the node's applied state, re-checking each time an entry is applied.
async fn applied_until(
    node: &RunningNode,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&portmesh_core::State) -> bool,
) {
    let reader = node.api.node().state().clone();
    let mut applied = reader.applied_index();
    let wait = async {
        loop {
            if cond(&reader.read().state) {
                return;
            }
            if applied.changed().await.is_err() {
                panic!("node stopped while waiting for {what}");
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn item(service: &str, pool: &str) -> pb::AllocItem {
    pb::AllocItem { service: service.into(), pool: pool.into(), ..Default::default() }
}

#[tokio::test]
async fn health_serving_and_reflection_lists_every_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let (node, client) = node_in(dir.path(), |_| {}).await;
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

#[tokio::test]
async fn keep_alive_stream_renews_many_leases_and_reports_lost_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, client) = node_in(dir.path(), |_| {}).await;
    let a =
        client.grant_lease(pb::LeaseGrantRequest { team: "default".into(), ttl_ms: 10_000 }).await.unwrap();
    let b =
        client.grant_lease(pb::LeaseGrantRequest { team: "default".into(), ttl_ms: 20_000 }).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", client.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut leases = pb::leases_client::LeasesClient::new(channel);
    let reqs = [(a.id, "default"), (b.id, "default"), (999, "default"), (a.id, "other-team")]
        .map(|(id, team)| pb::LeaseKeepAliveRequest { team: team.into(), lease_id: id });
    let mut stream = leases.keep_alive(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        got.push((r.lease_id, r.ttl_ms));
    }
    assert_eq!(got, [(a.id, 10_000), (b.id, 20_000), (999, 0), (a.id, 0)]);
    assert_eq!(
        client
            .keep_alive_once(pb::LeaseKeepAliveRequest { team: "default".into(), lease_id: a.id })
            .await
            .unwrap(),
        Some(Duration::from_secs(10))
    );
}

/// SPEC §3 invariant 5: expiry releases everything attached, exactly once, with events.
#[tokio::test]
async fn an_abandoned_lease_is_expired_once_releasing_everything_with_events() {
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = node_in(dir.path(), |_| {}).await;
    let r = client
        .allocate(pb::AllocateRequest {
            items: vec![item("a", "web"), item("b", "db"), item("c", "cache")],
            ttl_ms: 1_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let lease = r.lease_id;
    let stay = client
        .allocate(pb::AllocateRequest { items: vec![item("stay", "web")], ..Default::default() })
        .await
        .unwrap();
    applied_until(&node, "the lease to expire", Duration::from_secs(15), |s| s.lease(lease).is_none()).await;
    let st = node.api.node().state().read();
    let expired = st
        .state
        .events_since(0)
        .filter(|e| matches!(&e.kind, EventKind::LeaseExpired { id, .. } if *id == lease))
        .count();
    let released: Vec<u16> = st
        .state
        .events_since(0)
        .filter_map(|e| match &e.kind {
            EventKind::Released { allocation, cause: ReleaseCause::LeaseExpired } => Some(allocation.port),
            _ => None,
        })
        .collect();
    assert_eq!(expired, 1);
    let mut want: Vec<u16> = r.allocations.iter().map(|a| a.port as u16).collect();
    want.sort();
    let mut released_sorted = released.clone();
    released_sorted.sort();
    assert_eq!(released_sorted, want, "each attached port released exactly once");
    assert_eq!(st.state.allocations().map(|a| a.port).collect::<Vec<_>>(), [stay.allocations[0].port as u16]);
}

/// A restarted leader resumes each countdown from the last checkpoint instead of the full TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_countdowns_resume_from_the_checkpoint_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fast = |c: &mut NodeConfig| c.raft.lease_checkpoint = Duration::from_millis(200);
    let (node, client) = node_in(dir.path(), fast).await;
    let lease =
        client.grant_lease(pb::LeaseGrantRequest { team: "default".into(), ttl_ms: 60_000 }).await.unwrap();
    applied_until(&node, "a checkpoint below the TTL", Duration::from_secs(10), |s| {
        s.lease(lease.id).is_some_and(|l| s.lease_remaining_ms(l) < 59_500)
    })
    .await;
    drop(client);
    node.shutdown_handle().send_replace(true);
    node.wait().await.unwrap();

    // Reopen the same directory (waiting for the old handles to let go of sled's lock).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (node2, _client2) = loop {
        let mut cfg = NodeConfig::new(dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
        cfg.bootstrap = true;
        fast(&mut cfg);
        match start(cfg).await {
            Ok(n) => {
                let c = Client::connect(&n.grpc_addr.to_string()).await.unwrap();
                break (n, c);
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("retrying open: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let checkpointed = {
        let sm = node2.api.node().state().read();
        sm.state.lease(lease.id).map(|l| sm.state.lease_remaining_ms(l)).unwrap()
    };
    assert!(checkpointed < 59_500, "the checkpoint was persisted: {checkpointed}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let remaining = loop {
        if let Some(r) = node2.api.node().lease_remaining(lease.id) {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "the new leader never took up the lease");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        remaining <= checkpointed,
        "resumed from the checkpoint ({checkpointed} ms), not reset: {remaining} ms"
    );
    assert!(remaining > 0);
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

// ----- clusters -------------------------------------------------------------------------------

/// Raft timings for tests on a busy two-core machine: quick, but not twitchy.
fn fast_raft(c: &mut NodeConfig) {
    c.raft.heartbeat = Duration::from_millis(50);
    c.raft.election_min = Duration::from_millis(400);
    c.raft.election_max = Duration::from_millis(800);
    c.leader_timeout = Duration::from_secs(20);
}

struct Cluster {
    /// The network between the nodes: cut, drop or delay their Raft messages.
    net: Arc<LinkFaults>,
    _dirs: Vec<tempfile::TempDir>,
    nodes: Vec<Option<RunningNode>>,
    addrs: Vec<String>,
    tweak: Box<dyn Fn(&mut NodeConfig) + Send + Sync>,
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
        Cluster::start_with(n, |_| {}).await
    }

    async fn start_with(n: usize, tweak: impl Fn(&mut NodeConfig) + Send + Sync + 'static) -> Cluster {
        logs();
        let net = Arc::new(LinkFaults::new());
        let tweak = {
            let net = net.clone();
            move |c: &mut NodeConfig| {
                c.raft.faults = Some(net.clone());
                tweak(c)
            }
        };
        let mut dirs = Vec::new();
        let mut nodes = Vec::new();
        let mut addrs: Vec<String> = Vec::new();
        for i in 0..n {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = NodeConfig::new(dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
            fast_raft(&mut cfg);
            tweak(&mut cfg);
            if i == 0 {
                cfg.bootstrap = true;
            } else {
                cfg.join = Some(addrs[0].clone());
            }
            let node = start(cfg).await.unwrap();
            addrs.push(node.grpc_addr.to_string());
            nodes.push(Some(node));
            dirs.push(dir);
        }
        Cluster { net, _dirs: dirs, nodes, addrs, tweak: Box::new(tweak) }
    }

    fn leader_index(&self) -> usize {
        self.nodes.iter().position(|n| n.as_ref().is_some_and(|n| n.api.node().is_leader())).unwrap()
    }

    async fn stop(&mut self, i: usize) {
        let n = self.nodes[i].take().unwrap();
        n.shutdown_handle().send_replace(true);
        n.wait().await.unwrap();
    }

    async fn wait_leader_other_than(&self, old: u64) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(i) = self
                .nodes
                .iter()
                .position(|n| n.as_ref().is_some_and(|n| n.api.node().is_leader() && n.api.node().id != old))
            {
                return i;
            }
            assert!(tokio::time::Instant::now() < deadline, "no new leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Restarts node `i` on its directory and address (retrying while the old handles let go
    /// of sled's lock).
    async fn restart(&mut self, i: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut cfg = NodeConfig::new(self._dirs[i].path().to_path_buf(), self.addrs[i].parse().unwrap());
            fast_raft(&mut cfg);
            (self.tweak)(&mut cfg);
            match start(cfg).await {
                Ok(n) => {
                    self.nodes[i] = Some(n);
                    return;
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("retrying restart: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn id(&self, i: usize) -> u64 {
        self.nodes[i].as_ref().unwrap().api.node().id
    }

    fn live_addrs(&self) -> Vec<String> {
        self.nodes.iter().zip(&self.addrs).filter(|(n, _)| n.is_some()).map(|(_, a)| a.clone()).collect()
    }

    /// Waits until some node other than `old` leads and is confirmed by every live node but
    /// `except`.
    async fn leader_agreed_by_others(&self, old: u64, except: usize) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let leaders: BTreeSet<Option<u64>> = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, n)| *i != except && n.is_some())
                .map(|(_, n)| n.as_ref().unwrap().api.node().metrics().current_leader)
                .collect();
            if let [Some(l)] = leaders.iter().copied().collect::<Vec<_>>()[..]
                && l != old
                && let Some(i) = (0..self.nodes.len()).find(|i| self.nodes[*i].is_some() && self.id(*i) == l)
            {
                return i;
            }
            assert!(tokio::time::Instant::now() < deadline, "no new leader agreed on: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the cluster holds at least `n` allocations (a load is under way).
    async fn wait_for_allocations(&self, n: usize) {
        let node = self.live().next().unwrap();
        applied_until(node, "the load to get going", Duration::from_secs(20), |s| {
            s.allocations().count() >= n
        })
        .await;
    }

    fn live(&self) -> impl Iterator<Item = &RunningNode> {
        self.nodes.iter().flatten()
    }

    async fn client(&self) -> Client {
        let addrs: Vec<&str> = self.addrs.iter().map(String::as_str).collect();
        Client::connect_any(&addrs).await.unwrap()
    }

    /// Waits until every live node has applied the same index and holds the same allocations.
    async fn converged(&self) -> BTreeSet<u16> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let views: Vec<(u64, BTreeSet<u16>)> = self
                .live()
                .map(|n| {
                    let sm = n.api.node().state().read();
                    (sm.last_applied.map_or(0, |l| l.index), sm.state.allocations().map(|a| a.port).collect())
                })
                .collect();
            if views.windows(2).all(|w| w[0] == w[1]) {
                return views[0].1.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nodes did not converge: {:?}",
                views.iter().map(|v| v.0).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_join_replicate_and_agree_on_the_leader() {
    let c = Cluster::start(3).await;
    let leader = c.nodes[0].as_ref().unwrap();
    let voters: BTreeSet<u64> =
        leader.api.node().metrics().membership_config.membership().voter_ids().collect();
    assert_eq!(voters.len(), 3, "both joiners became voters");

    // A client connected to a follower is redirected to the leader.
    let l = c.leader_index();
    let f = (0..3).find(|i| *i != l).unwrap();
    let follower = Client::connect(&c.addrs[f]).await.unwrap();
    let mut acked = BTreeSet::new();
    for i in 0..50 {
        let r = follower
            .allocate(pb::AllocateRequest {
                items: vec![item(&format!("s{i}"), "web")],
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(acked.insert(r.allocations[0].port as u16));
    }
    assert_eq!(c.converged().await, acked, "every node holds exactly the acknowledged allocations");
    // The follower counted the request it redirected as such; the leader answered all 50.
    let outcome = |i: usize, o: &str| {
        let m = c.nodes[i].as_ref().unwrap().api.metrics().clone();
        m.allocate_requests.get_or_create(&portmesh_api::metrics::OutcomeLabels { outcome: o.into() }).get()
    };
    assert!(outcome(f, "redirected") >= 1);
    assert_eq!((outcome(f, "ok"), outcome(f, "error")), (0, 0));
    assert_eq!(outcome(l, "ok"), 50);
    let statuses: Vec<_> = c.live().map(|n| n.api.status()).collect();
    assert!(statuses.iter().all(|s| s.leader_id == statuses[0].leader_id && s.leader_id != 0));
    assert!(statuses.iter().all(|s| s.members.len() == 3));
    assert!(
        statuses.iter().all(|s| s.cluster_id == statuses[0].cluster_id && s.cluster_id.len() == 16),
        "every member records the cluster's id: {:?}",
        statuses.iter().map(|s| &s.cluster_id).collect::<Vec<_>>()
    );
    assert_eq!(
        statuses.iter().filter(|s| s.members.iter().any(|m| m.id == s.node_id && m.role == "leader")).count(),
        1
    );
}

/// SPEC §3 invariants 1–6 across a leader that stops under load: acknowledged allocations
/// survive, none is acknowledged twice, batches are whole, and the cluster keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_leader_under_load_keeps_every_invariant() {
    let mut c = Cluster::start(3).await;
    testkit::big_default_pool(&c.client().await).await;
    let addrs = c.addrs.clone();
    let load = tokio::spawn(async move { testkit::load(&addrs, 16, 13, "l").await });
    c.wait_for_allocations(200).await;
    let leader = c.leader_index();
    let old_id = c.id(leader);
    c.stop(leader).await;
    let oracle = load.await.unwrap();
    eprintln!("leader stopped under 16-client load: {}", oracle.summary());
    assert!(oracle.acked() + oracle.unknown() >= 2_000);
    assert!(oracle.acked() >= 1_000, "the cluster kept serving: {}", oracle.summary());
    testkit::check_all(&testkit::converged(&c.live_addrs(), Duration::from_secs(20)).await, &oracle);
    let new_leader = c.live().find(|n| n.api.node().is_leader()).expect("a new leader");
    assert_ne!(new_leader.api.node().id, old_id);
}

/// A leader cut off from both followers under load: the majority elects another and carries on;
/// writes stuck on the old leader end without being applied twice; after the partition heals the
/// old leader steps down, catches up, and every node agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_is_replaced_and_the_healed_cluster_keeps_every_invariant() {
    let c = Cluster::start(3).await;
    testkit::big_default_pool(&c.client().await).await;
    let addrs = c.addrs.clone();
    let load = tokio::spawn(async move { testkit::load(&addrs, 16, 13, "p").await });
    c.wait_for_allocations(200).await;
    let leader = c.leader_index();
    let old = c.id(leader);
    let others: Vec<u64> = (0..3).filter(|i| *i != leader).map(|i| c.id(i)).collect();
    c.net.partition(&[old], &others);
    let new_leader = c.leader_agreed_by_others(old, leader).await;
    // The majority side takes writes while the old leader is cut off (its own writes time out).
    let during = Client::connect(&c.addrs[new_leader])
        .await
        .unwrap()
        .allocate(pb::AllocateRequest { items: vec![item("during", "default")], ..Default::default() })
        .await
        .unwrap();
    assert!(during.revision > 0);
    let term = c.nodes[new_leader].as_ref().unwrap().api.node().metrics().current_term;
    c.net.heal();
    let oracle = load.await.unwrap();
    eprintln!("leader partitioned under 16-client load: {}", oracle.summary());
    assert!(oracle.acked() + oracle.unknown() >= 2_000);
    let views = testkit::converged(&c.addrs, Duration::from_secs(30)).await;
    testkit::check_all(&views, &oracle);
    assert!(views[0].list.allocations.iter().any(|a| a.port == during.allocations[0].port));
    let old_term = c.nodes[leader].as_ref().unwrap().api.node().metrics().current_term;
    assert!(old_term >= term, "the old leader learned the new term ({old_term} < {term})");
}

/// A follower cut off from the others: it cannot confirm linearizable reads or take writes, it
/// keeps serving stale reads of what it has, and it catches up once healed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_follower_serves_only_stale_reads_and_catches_up_when_healed() {
    let c = Cluster::start(3).await;
    testkit::big_default_pool(&c.client().await).await;
    let leader = c.leader_index();
    let f = (leader + 1) % 3;
    let fid = c.id(f);
    let rest: Vec<u64> = (0..3).filter(|i| *i != f).map(|i| c.id(i)).collect();
    c.net.partition(&[fid], &rest);
    // Clients of every node, the isolated one included (it names the leader it knew).
    let oracle = testkit::load(&c.addrs, 16, 13, "i").await;
    eprintln!("a follower isolated under 16-client load: {}", oracle.summary());
    assert_eq!(oracle.acked(), 2_080, "the majority serves every write: {}", oracle.summary());
    let isolated = c.nodes[f].as_ref().unwrap();
    let stale = isolated.api.node().state().read().state.allocations().count();
    assert_eq!(stale, 0, "the isolated follower saw none of the writes");
    let read = isolated.api.node().read_barrier(false).await;
    assert!(read.is_err(), "a linearizable read on the isolated follower must not succeed: {read:?}");
    c.net.heal();
    testkit::check_all(&testkit::converged(&c.addrs, Duration::from_secs(30)).await, &oracle);
}

/// Dropped requests, dropped replies and delays on every Raft link under load: nothing
/// acknowledged is lost, nothing is applied twice, and the replicas end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_and_delayed_raft_messages_lose_and_duplicate_nothing() {
    let c = Cluster::start(3).await;
    testkit::big_default_pool(&c.client().await).await;
    c.net.set_drop(100, 42);
    c.net.set_delay(Duration::from_millis(2));
    let oracle = testkit::load(&c.addrs, 16, 13, "d").await;
    c.net.heal();
    eprintln!("10% drops and 2 ms delays under 16-client load: {}", oracle.summary());
    assert!(oracle.acked() + oracle.unknown() >= 2_000);
    testkit::check_all(&testkit::converged(&c.addrs, Duration::from_secs(30)).await, &oracle);
}

/// A follower that was down while the log moved past it (snapshots taken, log purged) catches up
/// by snapshot over the Raft transport when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_missed_purged_entries_catches_up_by_snapshot() {
    let mut c = Cluster::start_with(3, |cfg| {
        cfg.raft.snapshot_every = 20;
        cfg.raft.keep_after_snapshot = 5;
    })
    .await;
    let follower = c.nodes.iter().position(|n| !n.as_ref().unwrap().api.node().is_leader()).unwrap();
    c.stop(follower).await;
    let client = c.client().await;
    let mut acked = BTreeSet::new();
    for i in 0..120 {
        let req =
            pb::AllocateRequest { items: vec![item(&format!("s{i}"), "default")], ..Default::default() };
        acked.insert(client.allocate(req).await.unwrap().allocations[0].port as u16);
    }
    let leader = c.leader_index();
    let purged = c.nodes[leader].as_ref().unwrap().api.node().metrics().purged.map_or(0, |l| l.index);
    assert!(purged > 0, "the leader purged its log behind a snapshot");

    c.restart(follower).await;
    let back = c.nodes[follower].as_ref().unwrap();
    applied_until(back, "the returning follower to catch up", Duration::from_secs(30), |s| {
        acked.iter().all(|p| s.allocation(*p).is_some())
    })
    .await;
    assert!(
        back.api.node().metrics().snapshot.is_some_and(|l| l.index > 0),
        "it caught up through a snapshot"
    );
}

/// Leases across leader changes: a lease kept alive (renewed at about TTL/3, as a holder does)
/// through three leader changes never expires, and each new leader resumes an abandoned lease's
/// countdown from the last checkpoint, never from more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_lease_survives_three_leader_changes_and_countdowns_resume_from_checkpoints() {
    let mut c = Cluster::start_with(3, |cfg| cfg.raft.lease_checkpoint = Duration::from_millis(500)).await;
    let client = c.client().await;
    let kept = client
        .allocate(pb::AllocateRequest {
            items: vec![item("kept", "web")],
            ttl_ms: 6_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let abandoned =
        client.grant_lease(pb::LeaseGrantRequest { team: "default".into(), ttl_ms: 60_000 }).await.unwrap();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let renewer = {
        let client = client.clone();
        let id = kept.lease_id;
        tokio::spawn(async move {
            let mut lost = 0;
            loop {
                match client
                    .keep_alive_once(pb::LeaseKeepAliveRequest { team: "default".into(), lease_id: id })
                    .await
                {
                    Ok(Some(_)) => {}
                    Ok(None) => lost += 1,
                    Err(e) => eprintln!("renewal failed (retrying): {e}"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(2_000)) => {}
                    _ = stop_rx.changed() => return lost,
                }
            }
        })
    };
    for round in 0..3 {
        let old = c.leader_index();
        let old_id = c.nodes[old].as_ref().unwrap().api.node().id;
        c.stop(old).await;
        let leader = c.wait_leader_other_than(old_id).await;
        // The new leader counts the abandoned lease down from its checkpoint, not a fresh TTL.
        let n = c.nodes[leader].as_ref().unwrap().api.node().clone();
        let checkpointed = {
            let sm = n.state().read();
            sm.state.lease(abandoned.id).map(|l| sm.state.lease_remaining_ms(l)).unwrap()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let remaining = loop {
            if let Some(r) = n.lease_remaining(abandoned.id) {
                break r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: the new leader did not take up the lease"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(remaining <= checkpointed, "round {round}: {remaining} ms > checkpointed {checkpointed} ms");
        c.restart(old).await;
    }
    stop_tx.send_replace(true);
    assert_eq!(renewer.await.unwrap(), 0, "the kept lease was never reported lost");
    let live = client.list(Default::default()).await.unwrap();
    assert!(
        live.allocations.iter().any(|a| a.lease_id == kept.lease_id),
        "the kept lease's port is still held"
    );
}

/// SPEC §2 lease policy: a lease abandoned just before a failover expires no earlier than its TTL
/// and no later than TTL + checkpoint interval + election timeout (plus the expiry tick and the
/// time to apply, allowed for below) after its last renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_abandoned_before_a_failover_expires_within_the_documented_bound() {
    // Long enough to hold a second election timeout and the keeper's ticks (see
    // `RaftOptions::checkpoint_every`): checkpoints every 0.9 s.
    let checkpoint = Duration::from_secs(2);
    let c = Cluster::start_with(3, move |cfg| cfg.raft.lease_checkpoint = checkpoint).await;
    let election_max = Duration::from_millis(800);
    let ttl = Duration::from_secs(3);
    let client = c.client().await;
    let lease = client
        .grant_lease(pb::LeaseGrantRequest { team: "default".into(), ttl_ms: ttl.as_millis() as u64 })
        .await
        .unwrap();
    // The last renewal: from here on nobody renews it.
    assert!(
        client
            .keep_alive_once(pb::LeaseKeepAliveRequest { team: "default".into(), lease_id: lease.id })
            .await
            .unwrap()
            .is_some()
    );
    let renewed = tokio::time::Instant::now();
    // Fail over just before the checkpoint after the one that recorded the lease: the worst case.
    let leader = c.leader_index();
    let old_id = c.id(leader);
    applied_until(
        c.nodes[leader].as_ref().unwrap(),
        "a checkpoint of the lease",
        Duration::from_secs(10),
        |s| s.lease(lease.id).is_some_and(|l| s.lease_remaining_ms(l) < ttl.as_millis() as u64),
    )
    .await;
    let opts =
        portmesh_raft::RaftOptions { lease_checkpoint: checkpoint, election_max, ..Default::default() };
    tokio::time::sleep(opts.checkpoint_every() - Duration::from_millis(150)).await;
    // Cut off, as by a crash: a leader stopping on purpose checkpoints first, which is not the
    // worst case.
    let others: Vec<u64> = (0..3).filter(|i| *i != leader).map(|i| c.id(i)).collect();
    c.net.partition(&[old_id], &others);
    let new_leader = c.wait_leader_other_than(old_id).await;
    let n = c.nodes[new_leader].as_ref().unwrap();
    applied_until(n, "the abandoned lease to expire", Duration::from_secs(20), |s| {
        s.lease(lease.id).is_none()
    })
    .await;
    let lived = renewed.elapsed();
    // Slack for proposing and applying the expiry on a loaded two-core machine.
    let slack = Duration::from_millis(500);
    eprintln!("abandoned lease (TTL {ttl:?}) lived {lived:?} after its last renewal across a failover");
    assert!(lived + Duration::from_millis(50) >= ttl, "expired early: {lived:?} < TTL {ttl:?}");
    assert!(
        lived <= ttl + checkpoint + election_max + slack,
        "lived {lived:?}, beyond TTL {ttl:?} + checkpoint {checkpoint:?} + election {election_max:?} (+{slack:?})"
    );
}

/// A lease-expiry storm: 10,000 leases lapse within seconds on a 3-node cluster. The leader
/// expires them in bounded batches (here at most 100 per log entry, so that the bound binds while
/// the leases are still being granted), every one exactly once, while allocations keep being
/// served in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_storm_of_ten_thousand_leases_goes_in_bounded_batches_while_allocations_flow() {
    const LEASES: usize = 10_000;
    const CAP: usize = 100;
    let c = Cluster::start_with(3, |cfg| cfg.raft.expiry_batch = CAP).await;
    let client = c.client().await;
    let mut grants = Vec::new();
    for _ in 0..50 {
        let client = client.clone();
        grants.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..LEASES / 50 {
                ids.push(
                    client
                        .grant_lease(pb::LeaseGrantRequest { team: "default".into(), ttl_ms: 2_000 })
                        .await
                        .unwrap()
                        .id,
                );
            }
            ids
        }));
    }
    let mut ids = BTreeSet::new();
    for g in grants {
        ids.extend(g.await.unwrap());
    }
    assert_eq!(ids.len(), LEASES);
    // Allocate while the storm runs.
    let leader = c.nodes[c.leader_index()].as_ref().unwrap();
    let mut allocated = Vec::new();
    let mut i = 0;
    let storming = || leader.api.node().state().read().state.leases().next().is_some();
    // At most half the pool: a slow (instrumented) build may take longer to expire them all.
    while storming() && i < 500 {
        let r = client
            .allocate(pb::AllocateRequest {
                items: vec![item(&format!("storm{i}"), "default")],
                ..Default::default()
            })
            .await
            .unwrap();
        allocated.push(r.revision);
        i += 1;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while storming() {
        assert!(tokio::time::Instant::now() < deadline, "the leases did not all expire within 2 minutes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let views = testkit::converged(&c.addrs, Duration::from_secs(30)).await;
    assert_eq!(views[0].list.allocations.len(), allocated.len());
    let st = leader.api.node().state().read();
    let mut per_revision: std::collections::BTreeMap<u64, usize> = Default::default();
    let mut expired = BTreeSet::new();
    for e in st.state.events_since(0) {
        if let EventKind::LeaseExpired { id, .. } = &e.kind {
            assert!(expired.insert(*id), "lease {id} expired twice");
            *per_revision.entry(e.revision).or_default() += 1;
        }
    }
    assert_eq!(st.state.leases().count(), 0, "every lease ended");
    // The event history keeps the last 10,000 events: at least the storm's tail is there.
    assert!(expired.len() >= 2_000, "{} expiries in the history", expired.len());
    let biggest = per_revision.values().max().copied().unwrap_or(0);
    eprintln!("{} expiries in {} entries, at most {biggest} per entry", expired.len(), per_revision.len());
    assert!(biggest <= CAP, "one entry expired {biggest} leases");
    assert_eq!(biggest, CAP, "the storm was big enough for the bound to matter");
    let (first, last) = (per_revision.keys().next().unwrap(), per_revision.keys().last().unwrap());
    assert!(
        allocated.iter().any(|r| r > first && r < last),
        "no allocation was served between expiry batches {first}..{last}: {allocated:?}"
    );
}

// ----- membership -----------------------------------------------------------------------------

/// Voters per node as each live node sees them, and whether they all agree.
fn voters_seen(c: &Cluster) -> Vec<BTreeSet<u64>> {
    c.live().map(|n| n.api.node().metrics().membership_config.membership().voter_ids().collect()).collect()
}

/// Waits until every live node but those in `except` sees `voters` as the voters and knows a leader.
async fn wait_membership(c: &Cluster, voters: &BTreeSet<u64>, except: &[u64]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ok = c.live().filter(|n| !except.contains(&n.api.node().id)).all(|n| {
            let m = n.api.node().metrics();
            m.current_leader.is_some_and(|l| voters.contains(&l))
                && m.membership_config.membership().voter_ids().collect::<BTreeSet<_>>() == *voters
        });
        if ok {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "membership did not settle on {voters:?}: {:?}",
            voters_seen(c)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 4 nodes with `--voters 3`: the fourth stays a learner. Removing a voter promotes the learner;
/// removing the leader itself hands over to the rest; the last voter cannot be removed, nor can
/// a node that is not a member; writes keep flowing after every change.
/// Issue 15: five voters, two dead for good: each is removed in turn (three of four, then three of
/// three answer) and the cluster writes throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_voters_with_two_dead_shrink_to_three_and_keep_writing() {
    let mut c = Cluster::start_with(5, |cfg| {
        fast_raft(cfg);
        cfg.raft.voters = 5;
    })
    .await;
    let ids: Vec<u64> = (0..5).map(|i| c.id(i)).collect();
    let all: BTreeSet<u64> = ids.iter().copied().collect();
    wait_membership(&c, &all, &[]).await;
    let leader = c.leader_index();
    let dead: Vec<usize> = (0..5).filter(|i| *i != leader).take(2).collect();
    for &d in &dead {
        c.stop(d).await;
    }
    let client = c.client().await;
    let mut voters = all.clone();
    for &d in &dead {
        client.leave(pb::LeaveRequest { node_id: ids[d] }).await.unwrap();
        voters.remove(&ids[d]);
        let gone: Vec<u64> = dead.iter().map(|i| ids[*i]).collect();
        wait_membership(&c, &voters, &gone).await;
        client
            .allocate(pb::AllocateRequest {
                items: vec![item(&format!("w{d}"), "default")],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert_eq!(client.status().await.unwrap().members.len(), 3);
}

/// Issue 15: with one member dead, the leader leaving would leave two voters of which one
/// answers: the change is refused, naming the dead member, and nothing is stranded; removing the
/// dead member first works, and then the leader may leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_change_without_a_live_quorum_is_refused_and_names_who_is_missing() {
    let mut c = Cluster::start_with(3, fast_raft).await;
    let ids: Vec<u64> = (0..3).map(|i| c.id(i)).collect();
    let all: BTreeSet<u64> = ids.iter().copied().collect();
    wait_membership(&c, &all, &[]).await;
    let client = c.client().await;
    let leader = c.leader_index();
    let dead = (0..3).find(|i| *i != leader).unwrap();
    let dead_addr = c.addrs[dead].clone();
    c.stop(dead).await;
    let before = client.status().await.unwrap();

    let err = client.leave(pb::LeaveRequest { node_id: ids[leader] }).await.unwrap_err();
    assert_eq!(err.kind(), Some("failed_precondition"), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("node {} at {dead_addr}", ids[dead])) && msg.contains("leave --id"),
        "{msg}"
    );
    let after = client.status().await.unwrap();
    assert_eq!(after.members.len(), 3, "nothing changed");
    assert_eq!(after.revision, before.revision);
    // Writes go on: the cluster was not stranded.
    client
        .allocate(pb::AllocateRequest { items: vec![item("still", "default")], ..Default::default() })
        .await
        .unwrap();

    // The dead member first, then the leader.
    client.leave(pb::LeaveRequest { node_id: ids[dead] }).await.unwrap();
    let two: BTreeSet<u64> = all.iter().copied().filter(|i| *i != ids[dead]).collect();
    wait_membership(&c, &two, &[ids[dead]]).await;
    client
        .allocate(pb::AllocateRequest { items: vec![item("after", "default")], ..Default::default() })
        .await
        .unwrap();
}

/// A membership change whose quorum answers status requests (so the liveness check passes) but
/// is cut off from Raft: the change cannot commit, and the caller is told after the write timeout
/// that its outcome is unknown and how to see it, instead of waiting forever. Healed, the
/// cluster agrees on one membership and writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_change_that_cannot_commit_is_reported_as_unknown_in_bounded_time() {
    let write_timeout = Duration::from_secs(2);
    let c = Cluster::start_with(3, move |cfg| cfg.raft.write_timeout = write_timeout).await;
    let ids: Vec<u64> = (0..3).map(|i| c.id(i)).collect();
    wait_membership(&c, &ids.iter().copied().collect(), &[]).await;
    let leader = c.leader_index();
    let followers: Vec<u64> = ids.iter().copied().filter(|i| *i != ids[leader]).collect();
    let client = portmesh_client::Client::connect(&c.addrs[leader]).await.unwrap();

    c.net.partition(&[ids[leader]], &followers);
    let started = std::time::Instant::now();
    let err = client.leave(pb::LeaveRequest { node_id: followers[0] }).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.kind(), Some("timeout"), "{err}");
    assert!(
        err.to_string().contains("its outcome is unknown") && err.to_string().contains("portmesh status")
    );
    assert!(took < write_timeout + Duration::from_secs(5), "bounded by the write timeout: {took:?}");

    c.net.heal();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let views: Vec<_> =
            c.live().map(|n| (n.api.node().metrics().current_leader, n.api.status().members.len())).collect();
        if views.iter().all(|v| v.0.is_some() && *v == views[0]) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the members never agreed: {views:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.client()
        .await
        .allocate(pb::AllocateRequest { items: vec![item("healed", "default")], ..Default::default() })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_leave_voters_are_replaced_and_the_last_voter_stays() {
    let mut c = Cluster::start(4).await;
    let ids: Vec<u64> = (0..4).map(|i| c.id(i)).collect();
    let client = c.client().await;
    let write = |tag: String| {
        let client = client.clone();
        async move {
            client
                .allocate(pb::AllocateRequest { items: vec![item(&tag, "default")], ..Default::default() })
                .await
                .unwrap_or_else(|e| panic!("write {tag} after a membership change: {e}"))
        }
    };
    let first: BTreeSet<u64> = ids[..3].iter().copied().collect();
    wait_membership(&c, &first, &[]).await;
    write("w0".into()).await;

    // A follower voter leaves: the learner takes its place.
    let leader = c.leader_index();
    let f = (0..3).find(|i| *i != leader).unwrap();
    let left = client.leave(pb::LeaveRequest { node_id: ids[f] }).await.unwrap();
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(left.iter().all(|m| m.id != ids[f] && m.role != "learner"), "{left:?}");
    let second: BTreeSet<u64> = ids.iter().copied().filter(|i| *i != ids[f]).collect();
    c.stop(f).await;
    wait_membership(&c, &second, &[]).await;
    write("w1".into()).await;
    // The removed node, started again with --join, is told it was removed.
    let mut cfg = NodeConfig::new(c._dirs[f].path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
    fast_raft(&mut cfg);
    cfg.join = Some(c.addrs[c.leader_index()].clone());
    let err = start(cfg).await.unwrap_err().to_string();
    assert!(err.contains(&format!("node {} is no longer a member", ids[f])), "{err}");

    // The leader removes itself: the other two carry on with a leader of their own.
    let leader = c.leader_index();
    let old = c.id(leader);
    client.leave(pb::LeaveRequest { node_id: old }).await.unwrap();
    let third: BTreeSet<u64> = second.iter().copied().filter(|i| *i != old).collect();
    wait_membership(&c, &third, &[old]).await;
    c.stop(leader).await;
    write("w2".into()).await;

    // Down to one voter, which cannot be removed.
    let leader = c.leader_index();
    let other = third.iter().copied().find(|i| *i != c.id(leader)).unwrap();
    client.leave(pb::LeaveRequest { node_id: other }).await.unwrap();
    let last = c.id(leader);
    wait_membership(&c, &BTreeSet::from([last]), &[other]).await;
    let err = client.leave(pb::LeaveRequest { node_id: last }).await.unwrap_err();
    assert_eq!(err.kind(), Some("failed_precondition"), "{err}");
    assert!(err.to_string().contains(&format!("node {last} is the last voter")), "{err}");
    let err = client.leave(pb::LeaveRequest { node_id: 12_345 }).await.unwrap_err();
    assert_eq!(err.kind(), Some("not_found"), "{err}");
    assert!(
        err.to_string().contains("12345 is not a member") && err.to_string().contains(&last.to_string()),
        "{err}"
    );
    let ports = write("w3".into()).await;
    assert!(ports.revision > 0);
    let members = c.nodes[leader].as_ref().unwrap().api.status().members;
    assert_eq!(members.iter().map(|m| m.id).collect::<Vec<_>>(), vec![last], "nothing changed: {members:?}");
}

/// A node whose data belongs to another cluster is refused, by the cluster (Join) and by the
/// node itself at start (`--join` with foreign data), both naming the two cluster ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holding_another_clusters_data_is_refused_naming_both_ids() {
    let team = Cluster::start(1).await;
    let team_id = team.nodes[0].as_ref().unwrap().api.status().cluster_id;
    let other_dir = tempfile::tempdir().unwrap();
    let (other, _) = node_in(other_dir.path(), fast_raft).await;
    let other_status = other.api.status();
    assert_ne!(other_status.cluster_id, team_id, "two bootstraps make two clusters");

    // The cluster refuses a join request that carries another cluster's id.
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", team.addrs[0]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = pb::cluster_client::ClusterClient::new(ch)
        .join(pb::JoinRequest {
            node_id: other_status.node_id,
            addr: other_status.addr.clone(),
            cluster_id: other_status.cluster_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(&team_id) && err.message().contains(&other_status.cluster_id), "{err:?}");
    assert_eq!(team.nodes[0].as_ref().unwrap().api.status().members.len(), 1, "nothing changed");

    // The node with foreign data refuses to start with --join to the team.
    other.shutdown_handle().send_replace(true);
    other.wait().await.unwrap();
    let mut cfg = NodeConfig::new(other_dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
    fast_raft(&mut cfg);
    cfg.join = Some(team.addrs[0].clone());
    let err = start(cfg).await.unwrap_err().to_string();
    assert!(err.contains(&team_id) && err.contains(&other_status.cluster_id), "{err}");
    assert!(err.contains(&other_dir.path().display().to_string()), "names the directory: {err}");
    assert_eq!(team.nodes[0].as_ref().unwrap().api.status().members.len(), 1, "nothing changed");
}

/// Joining an address where nothing answers fails within the timeout, naming the address and
/// every address tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_an_unreachable_address_names_it_and_what_was_tried() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut cfg = NodeConfig::new(dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.join = Some(closed.to_string());
    cfg.leader_timeout = Duration::from_secs(1);
    let err = start(cfg).await.unwrap_err().to_string();
    assert!(err.contains(&format!("cannot join the cluster at {closed}")), "{err}");
    assert!(err.contains(&format!("tried: {closed}")), "{err}");
    assert!(err.contains("cannot connect"), "{err}");
}

// ----- probes where the client is -------------------------------------------------------------

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

// ----- watch ----------------------------------------------------------------------------------

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

/// `TimeToLive` shows the leader's countdown and what is attached; a follower redirects to the
/// leader; `keep_lease` keeps a short lease alive for several TTLs and reports its loss once it
/// is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_to_live_and_a_kept_lease_that_is_lost() {
    let c = Cluster::start(3).await;
    let leader = c.leader_index();
    let follower = Client::connect(&c.addrs[(leader + 1) % 3]).await.unwrap();
    let ttl = Duration::from_millis(1_500);
    let lease = follower
        .grant_lease(pb::LeaseGrantRequest { team: "default".into(), ttl_ms: ttl.as_millis() as u64 })
        .await
        .unwrap();
    let mut req = pb::AllocateRequest {
        items: vec![item("kept", "default"), item("kept2", "default")],
        ..Default::default()
    };
    req.lease_id = lease.id;
    let granted = follower.allocate(req).await.unwrap();
    let svc = pb::Service {
        name: "kept".into(),
        ports: vec![pb::ServicePort { port: granted.allocations[0].port, ..Default::default() }],
        lease_id: lease.id,
        ..Default::default()
    };
    let registered = follower.register(pb::RegisterRequest { service: Some(svc) }).await.unwrap();
    let kept = follower.keep_lease("default", lease.id, ttl);
    // Four TTLs pass: the renewals keep it (waiting out time is what this checks).
    let until = tokio::time::Instant::now() + ttl * 4;
    while tokio::time::Instant::now() < until {
        let t = follower
            .time_to_live(pb::LeaseTimeToLiveRequest { team: "default".into(), lease_id: lease.id })
            .await
            .unwrap();
        let l = t.lease.unwrap();
        assert!(l.remaining_ms <= 1_500 && l.remaining_ms > 0, "{l:?}");
        let mut ports: Vec<u32> = t.allocations.iter().map(|a| a.port).collect();
        ports.sort_unstable();
        let mut want: Vec<u32> = granted.allocations.iter().map(|a| a.port).collect();
        want.sort_unstable();
        assert_eq!(ports, want);
        assert_eq!(t.services.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), [registered.id.as_str()]);
        assert!(kept.lost_now().is_none());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut kept = kept;
    follower
        .revoke_lease(pb::LeaseRevokeRequest { team: "default".into(), lease_id: lease.id })
        .await
        .unwrap();
    let lost = tokio::time::timeout(Duration::from_secs(5), kept.lost()).await.unwrap();
    assert_eq!(lost, portmesh_client::LeaseLost::Gone { id: lease.id });
    let err = follower
        .time_to_live(pb::LeaseTimeToLiveRequest { team: "default".into(), lease_id: lease.id })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some("not_found"), "{err}");
    let err = follower
        .time_to_live(pb::LeaseTimeToLiveRequest { team: "other-team".into(), lease_id: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some("not_found"), "{err}");
}

/// `keep_lease` keeps renewing through two leader changes: the lease and its port survive, and
/// the new leaders count it down from their own renewals, never letting it lapse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_lease_survives_leader_changes_through_the_client_helper() {
    let mut c = Cluster::start_with(3, |cfg| cfg.raft.lease_checkpoint = Duration::from_millis(500)).await;
    let client = c.client().await;
    let ttl = Duration::from_secs(3);
    let lease = client
        .grant_lease(pb::LeaseGrantRequest { team: "default".into(), ttl_ms: ttl.as_millis() as u64 })
        .await
        .unwrap();
    let mut req = pb::AllocateRequest { items: vec![item("held", "default")], ..Default::default() };
    req.lease_id = lease.id;
    let port = client.allocate(req).await.unwrap().allocations[0].port;
    let kept = client.keep_lease("default", lease.id, ttl);
    for round in 0..2 {
        let old = c.leader_index();
        let old_id = c.id(old);
        c.stop(old).await;
        c.wait_leader_other_than(old_id).await;
        // Two TTLs under the new leader: only renewals through it keep the lease.
        let until = tokio::time::Instant::now() + ttl * 2;
        while tokio::time::Instant::now() < until {
            assert!(kept.lost_now().is_none(), "round {round}: {:?}", kept.lost_now());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let t = client
            .time_to_live(pb::LeaseTimeToLiveRequest { team: "default".into(), lease_id: lease.id })
            .await
            .unwrap();
        assert_eq!(t.allocations.iter().map(|a| a.port).collect::<Vec<_>>(), vec![port], "round {round}");
        c.restart(old).await;
    }
    assert!(kept.lost_now().is_none());
}

/// Bad registry requests are refused with a message naming the field, and change nothing;
/// health reports that name gone services or repeat the status change nothing either.
#[tokio::test]
async fn bad_registry_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = node_in(dir.path(), |_| {}).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = pb::registry_client::RegistryClient::new(ch);
    let svc = client
        .register(pb::RegisterRequest {
            service: Some(pb::Service {
                name: "api".into(),
                ports: vec![pb::ServicePort { port: 18001, ..Default::default() }],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let before = client.status().await.unwrap().revision;

    let e = raw.register(pb::RegisterRequest { service: None }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("service: say what to register"), "{e:?}");
    let report = |status: i32, n: usize| pb::ReportHealthRequest {
        reports: vec![
            pb::HealthReport { team: String::new(), id: svc.id.clone(), status, output: "x".into() };
            n
        ],
    };
    let e = raw.report_health(report(9, 1)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("unknown health status 9"), "{e:?}");
    let e = raw.report_health(report(pb::HealthStatus::Critical as i32, 4_097)).await.unwrap_err();
    assert!(e.message().contains("4097 reports, at most 4096"), "{e:?}");
    // The same status, or a service that is not registered: accepted, nothing changes.
    let same = raw.report_health(report(pb::HealthStatus::Passing as i32, 1)).await.unwrap().into_inner();
    assert_eq!((same.changed, same.revision), (0, before));
    let gone = pb::ReportHealthRequest {
        reports: vec![pb::HealthReport {
            id: "nobody".into(),
            status: pb::HealthStatus::Critical as i32,
            ..Default::default()
        }],
    };
    assert_eq!(raw.report_health(gone).await.unwrap().into_inner().changed, 0);

    assert_eq!(client.status().await.unwrap().revision, before, "nothing was written");
    let found = client.discover(pb::DiscoverRequest::default()).await.unwrap().services;
    assert_eq!((found.len(), found[0].status()), (1, pb::HealthStatus::Passing));
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

/// Sends raw bytes as the body of a unary call, whatever the method expects.
#[derive(Debug, Clone, Copy, Default)]
struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;
    fn encoder(&mut self) -> Self::Encoder {
        RawBytes
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// A raw gRPC client of `node` and `path` (e.g. `/portmesh.v1.Allocator/Allocate`), for bodies
/// and methods no typed client would send.
async fn raw_call(
    node: &RunningNode,
    path: &'static str,
) -> (tonic::client::Grpc<tonic::transport::Channel>, tonic::codegen::http::uri::PathAndQuery) {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    (grpc, tonic::codegen::http::uri::PathAndQuery::from_static(path))
}

/// Issue 15: two request messages on a one-message call are refused before anything is applied
/// (tonic alone applied the first and dropped the second).
#[tokio::test]
async fn two_messages_on_a_one_message_call_are_refused_and_change_nothing() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = node_in(dir.path(), |_| {}).await;
    let before = client.status().await.unwrap().revision;
    let (mut grpc, path) = raw_call(&node, "/portmesh.v1.Allocator/Allocate").await;
    let one =
        pb::AllocateRequest { items: vec![item("twice", "default")], ..Default::default() }.encode_to_vec();
    let two = tokio_stream::iter(vec![one.clone(), one]);
    let status = grpc.client_streaming(tonic::Request::new(two), path, RawBytes).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("takes one request message"), "{status:?}");
    assert_eq!(client.status().await.unwrap().revision, before, "nothing was applied");
    assert!(client.list(pb::ListRequest::default()).await.unwrap().allocations.is_empty());
}

/// A body that is not the method's protobuf message is the caller's mistake: INVALID_ARGUMENT
/// with the `invalid_argument` category (tonic alone says INTERNAL), and nothing changes.
#[tokio::test]
async fn a_malformed_protobuf_body_is_an_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = node_in(dir.path(), |_| {}).await;
    let before = client.status().await.unwrap().revision;
    let (mut grpc, path) = raw_call(&node, "/portmesh.v1.Allocator/Allocate").await;
    let status = grpc.unary(tonic::Request::new(vec![0xff, 0xff, 0xff]), path, RawBytes).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let category = status.metadata().get("portmesh-error").and_then(|v| v.to_str().ok());
    assert_eq!(category, Some("invalid_argument"), "{status:?}");
    assert_eq!(client.status().await.unwrap().revision, before, "a malformed request changed the state");
}

/// The hand-written `Watch` service refuses what the generated ones refuse: a method it does not
/// have is UNIMPLEMENTED naming the path, and a body that is not a `WatchRequest` is
/// INVALID_ARGUMENT with its category; neither opens a stream.
#[tokio::test]
async fn the_watch_service_refuses_unknown_methods_and_malformed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _client) = node_in(dir.path(), |_| {}).await;
    let streams = || node.api.metrics().watch_streams.get();

    let (mut grpc, path) = raw_call(&node, "/portmesh.v1.Watch/Subscribe").await;
    let status = grpc.unary(tonic::Request::new(Vec::new()), path, RawBytes).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert!(status.message().contains("/portmesh.v1.Watch/Subscribe"), "{status:?}");

    let (mut grpc, path) = raw_call(&node, "/portmesh.v1.Watch/Watch").await;
    let status =
        grpc.server_streaming(tonic::Request::new(vec![0xff, 0xff, 0xff]), path, RawBytes).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let category = status.metadata().get("portmesh-error").and_then(|v| v.to_str().ok());
    assert_eq!(category, Some("invalid_argument"), "{status:?}");
    assert_eq!(streams(), 0, "a refused watch left a stream open");
}

/// Stock gRPC tools can talk to a node: reflection answers in v1alpha too (grpcurl before 1.9,
/// Python's grpcio-reflection), and gRPC health knows the node and each service by name, so a
/// readiness probe naming one is answered (and an unknown name is NOT_FOUND).
#[tokio::test]
async fn reflection_v1alpha_and_named_health_services_answer() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let (node, _client) = node_in(dir.path(), |_| {}).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut refl = ServerReflectionClient::new(channel.clone());
    let mut resp = refl.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let msg = resp.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else { panic!("{msg:?}") };
    let listed: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();

    let mut health = HealthClient::new(channel);
    for name in portmesh_node::HEALTH_NAMES {
        assert!(
            *name == "portmesh" || listed.contains(*name),
            "{name} is no service of the node: {listed:?}"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r =
                health.check(HealthCheckRequest { service: name.to_string() }).await.unwrap().into_inner();
            if r.status() == ServingStatus::Serving {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{name} never SERVING");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let unknown = health.check(HealthCheckRequest { service: "nope.Nothing".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
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

/// A joining node that stops answering after it asked to join (here: nobody at its address)
/// is left a learner, not made a voter that every later write would wait for; the answer says
/// so, bounded in time, and what it says to do works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_that_does_not_answer_is_not_made_a_voter() {
    let c = Cluster::start_with(1, |cfg| cfg.raft.catch_up_timeout = Duration::from_secs(2)).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.addrs[0]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let req = pb::JoinRequest { node_id: 77, addr: "127.0.0.1:1".into(), cluster_id: String::new() };
    let err = pb::cluster_client::ClusterClient::new(ch).join(req).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "bounded: {:?}", started.elapsed());
    assert!(
        err.message().contains("node 77 at 127.0.0.1:1 was added as a learner but does not answer")
            && err.message().contains("leave --id 77"),
        "{err:?}"
    );
    let api = &c.nodes[0].as_ref().unwrap().api;
    let m = api.status().members;
    assert!(m.iter().any(|m| m.id == 77 && m.role == "learner"), "{m:?}");
    // Writes go on (the single voter is still a majority), and the advice works.
    let client = portmesh_client::Client::connect(&c.addrs[0]).await.unwrap();
    let item = pb::AllocItem { service: "after".into(), ..Default::default() };
    client.allocate(pb::AllocateRequest { items: vec![item], ..Default::default() }).await.unwrap();
    client.leave(pb::LeaveRequest { node_id: 77 }).await.unwrap();
    assert_eq!(api.status().members.len(), 1);
}

/// Health semantics (issue 16): gRPC health `""` is liveness (the process serves), a named
/// service is readiness (a leader known, the log applied, and a leader's quorum confirmed). A
/// leader cut off from its followers goes on naming itself leader, but stops being ready while
/// staying live; healed, it is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_stays_while_readiness_follows_the_quorum() {
    let c = Cluster::start(3).await;
    let ids: Vec<u64> = (0..3).map(|i| c.id(i)).collect();
    wait_membership(&c, &ids.iter().copied().collect(), &[]).await;
    let leader = c.leader_index();
    let client = portmesh_client::Client::connect(&c.addrs[leader]).await.unwrap();
    let health = |name: &'static str| {
        let client = client.clone();
        async move { client.health(name).await.unwrap() }
    };
    assert!(health("").await && health("portmesh").await && health("portmesh.v1.Allocator").await);
    let unknown = client.health("no.such.Service").await;
    assert!(unknown.is_err(), "an unknown name is NOT_FOUND, not an answer: {unknown:?}");

    let followers: Vec<u64> = ids.iter().copied().filter(|i| *i != ids[leader]).collect();
    c.net.partition(&[ids[leader]], &followers);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while health("portmesh").await {
        assert!(tokio::time::Instant::now() < deadline, "a leader without its quorum stayed ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(c.nodes[leader].as_ref().unwrap().api.node().is_leader(), "it still names itself leader");
    assert!(health("").await, "not ready, but live: no reason to restart it");
    assert!(!health("portmesh.v1.Leases").await);

    c.net.heal();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !health("portmesh").await {
        assert!(tokio::time::Instant::now() < deadline, "never ready again after healing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `--seeds` (issue 16, a StatefulSet's start logic): three seeds started together with the same
/// configuration make one cluster (the first creates it, the others join); a node that is not a
/// seed joins and, when it stops, leaves and empties its data directory; the first seed
/// recreated without its data joins the running cluster in its old place instead of creating a
/// second cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_make_one_cluster_and_a_first_seed_without_data_rejoins_it() {
    logs();
    let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addrs: Vec<String> = (0..4).map(|_| format!("127.0.0.1:{}", port())).collect();
    let mut seeds: Vec<String> = addrs[..3].to_vec();
    seeds.push("nobody.invalid:7400".into()); // never resolves: a pod that does not exist
    let config = |i: usize, dir: &std::path::Path| {
        let mut cfg = NodeConfig::new(dir.to_path_buf(), addrs[i].parse().unwrap());
        fast_raft(&mut cfg);
        cfg.seeds = seeds.clone();
        cfg.seed_timeout = Duration::from_secs(30);
        cfg
    };
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = tokio::join!(
        start(config(0, dirs[0].path())),
        start(config(1, dirs[1].path())),
        start(config(2, dirs[2].path()))
    );
    let mut nodes = vec![a.unwrap(), b.unwrap(), c.unwrap()];
    let cluster = nodes[0].api.status().cluster_id;
    assert!(!cluster.is_empty());
    let members = |n: &RunningNode| {
        let mut m: Vec<(u64, String)> =
            n.api.status().members.iter().map(|m| (m.id, m.addr.clone())).collect();
        m.sort();
        m
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while members(&nodes[0]).len() != 3 || nodes.iter().any(|n| n.api.status().cluster_id != cluster) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the seeds never made one cluster: {:?}",
            members(&nodes[0])
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A node that is not a seed joins, and leaves (emptying its data) when it stops.
    let extra = start(config(3, dirs[3].path())).await.unwrap();
    assert_eq!(extra.api.status().cluster_id, cluster);
    assert!(members(&nodes[0]).iter().any(|m| m.1 == addrs[3]));
    extra.shutdown_handle().send_replace(true);
    extra.wait().await.unwrap();
    assert!(!members(&nodes[0]).iter().any(|m| m.1 == addrs[3]), "it left: {:?}", members(&nodes[0]));
    assert_eq!(std::fs::read_dir(dirs[3].path()).unwrap().count(), 0, "its data directory is empty");

    // The first seed loses its data: it joins the cluster again in its old place.
    let old_id = nodes[0].api.node().id;
    let first = nodes.remove(0);
    first.shutdown_handle().send_replace(true);
    first.wait().await.unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let again = start(config(0, fresh.path())).await.unwrap();
    assert_eq!(again.api.status().cluster_id, cluster, "joined, not a second cluster");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = members(&nodes[0]);
        if m.len() == 3
            && !m.iter().any(|(id, _)| *id == old_id)
            && m.iter().any(|(id, _)| *id == again.api.node().id)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the new node never took the old one's place: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = portmesh_client::Client::connect(&addrs[0]).await.unwrap();
    client
        .allocate(pb::AllocateRequest { items: vec![item("after", "default")], ..Default::default() })
        .await
        .unwrap();
}
