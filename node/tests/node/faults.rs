//! Three-node clusters under faults: leader loss, partitions, dropped messages, snapshots.

use super::*;

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
