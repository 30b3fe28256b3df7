//! Early replication (`portmesh_raft`'s `early`): the leader sends a write to its followers while
//! its own flush of it runs, and a leader that loses such a write in a crash does not come back
//! as leader of the same term.

use super::*;

fn allocate(service: &str) -> pb::AllocateRequest {
    pb::AllocateRequest { items: vec![item(service, "web")], ..Default::default() }
}

/// With the leader's disk slow (every flush 300 ms longer, under the election timeout), a write
/// reaches both followers' logs while the leader still flushes it, and is acknowledged only after
/// that flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_sends_a_write_to_its_followers_while_it_flushes_it() {
    let c = Cluster::start(3).await;
    let l = c.leader_index();
    let leader = c.nodes[l].as_ref().unwrap().api.node().clone();
    let client = Client::connect(&c.addrs[l]).await.unwrap();
    client.allocate(allocate("warm")).await.unwrap();
    c.converged().await;
    let before = leader.metrics().last_log_index;

    let flushes = || leader.store.stats().flushes.load(std::sync::atomic::Ordering::Relaxed);
    let flushed_before = flushes();
    leader.store.inject_flush_delay(Duration::from_millis(300));
    let write = tokio::spawn(async move { client.allocate(allocate("early")).await });
    for f in c.live().filter(|n| n.api.node().id != leader.id) {
        let mut m = f.api.node().metrics_changes();
        tokio::time::timeout(Duration::from_secs(5), m.wait_for(|m| m.last_log_index > before))
            .await
            .expect("the follower never received the write")
            .unwrap();
    }
    // The flusher counts a flush once it ended: none has, so the followers got the write first.
    assert_eq!(flushes(), flushed_before, "the followers got the write only after the leader's flush");
    assert!(!write.is_finished(), "acknowledged before the leader's own flush ended");
    leader.store.inject_flush_delay(Duration::ZERO);
    let r = write.await.unwrap().unwrap();
    assert_eq!(r.allocations.len(), 1);
}

/// The hazard early replication brings, attacked: the leader's disk dies while it flushes a write
/// its followers already hold (the flush fails, the node stops, the write is not acknowledged),
/// and the entry is gone from its log (removed here, as a crash before the flush would lose it).
/// Then the whole cluster restarts while the followers still follow the old leader's term. Had
/// the old leader kept a committed vote for itself, it would lead that term again at once and
/// write the next entry under the log id the followers hold for the lost one: the logs would
/// diverge. It comes back as a follower instead; a follower holding the write leads and commits
/// it, and every node ends with the same allocations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_lost_a_write_its_followers_hold_does_not_lead_its_term_again() {
    use openraft::storage::RaftLogStorage;

    let mut c = Cluster::start(3).await;
    let l = c.leader_index();
    let client = Client::connect(&c.addrs[l]).await.unwrap();
    client.allocate(allocate("warm")).await.unwrap();
    c.converged().await;
    let before = c.nodes[l].as_ref().unwrap().api.node().metrics().last_log_index.unwrap();
    let followers: Vec<usize> = (0..3).filter(|i| *i != l).collect();
    let ids: Vec<u64> = followers.iter().map(|f| c.id(*f)).collect();
    // The followers cannot elect one of them meanwhile: they stay in the old leader's term.
    c.net.partition(&ids[..1], &ids[1..]);

    {
        let store = &c.nodes[l].as_ref().unwrap().api.node().store;
        store.inject_flush_delay(Duration::from_millis(150));
        store.inject_flush_failures(true);
    }
    client
        .allocate(allocate("unflushed"))
        .await
        .expect_err("a write the leader could not flush was acknowledged");
    for f in &followers {
        let mut m = c.nodes[*f].as_ref().unwrap().api.node().metrics_changes();
        tokio::time::timeout(Duration::from_secs(5), m.wait_for(|m| m.last_log_index > Some(before)))
            .await
            .expect("the follower never received the write early")
            .unwrap();
    }
    let node = c.nodes[l].take().unwrap();
    assert!(node.wait().await.is_err(), "the leader whose disk died must stop");
    {
        let store = portmesh_store::Store::open(c._dirs[l].path(), &Default::default()).unwrap();
        let mut log = store.log_store();
        if let Some(last) = log.get_log_state().await.unwrap().last_log_id.filter(|id| id.index > before) {
            log.truncate(last).await.unwrap();
        }
        let closed = store.closed();
        drop((log, store));
        closed.await;
    }
    for f in &followers {
        c.stop(*f).await;
    }
    c.net.heal();

    // All three at once: a node's start waits for a leader, which needs two of them.
    let starts = (0..3).map(|i| {
        let mut cfg = NodeConfig::new(c._dirs[i].path().to_path_buf(), c.addrs[i].parse().unwrap());
        fast_raft(&mut cfg);
        (c.tweak)(&mut cfg);
        start(cfg)
    });
    for (i, node) in futures::future::join_all(starts).await.into_iter().enumerate() {
        c.nodes[i] = Some(node.unwrap());
    }
    c.client().await.allocate(allocate("after")).await.unwrap();
    c.converged().await;
    for n in c.live() {
        let services: BTreeSet<String> =
            n.api.node().state().read().state.allocations().map(|a| a.service.to_string()).collect();
        assert_eq!(
            services,
            ["after", "unflushed", "warm"].map(String::from).into(),
            "node {} holds other allocations",
            n.api.node().id
        );
    }
}
