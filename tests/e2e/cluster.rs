//! Real processes of the built binary forming one cluster: kill -9 the leader under load, restart
//! it, and check the SPEC §3 invariants against every node's state. A write whose outcome the
//! client could not learn is *unknown*: it may exist afterwards or not, but never twice.

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use portmesh_client::{Client, pb};

use crate::support::*;

struct ProcCluster {
    home: Home,
    nodes: Vec<Option<Served>>,
    addrs: Vec<String>,
}

impl ProcCluster {
    fn start(n: usize) -> ProcCluster {
        let home = Home::new();
        let mut nodes = Vec::new();
        let mut addrs: Vec<String> = Vec::new();
        for i in 0..n {
            let data = home.path().join(format!("node{i}"));
            let s = if i == 0 {
                serve(&home, &data, &["--bootstrap"])
            } else {
                serve(&home, &data, &["--join", &addrs[0]])
            };
            addrs.push(s.grpc.clone());
            nodes.push(Some(s));
        }
        ProcCluster { home, nodes, addrs }
    }

    /// Restarts node `i` on its data and its address, with no cluster flags.
    fn restart(&mut self, i: usize) {
        let data = self.home.path().join(format!("node{i}"));
        let s = serve_at(&self.home, &data, &self.addrs[i], &[]);
        self.nodes[i] = Some(s);
    }

    fn signal(&self, i: usize, sig: Signal) {
        let pid = self.nodes[i].as_ref().unwrap().child.id() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
    }

    /// Replaces the default pool by one big enough for every scenario's allocations.
    async fn big_pool(&self) {
        let admin = Client::connect(&self.addrs[0]).await.unwrap();
        admin.remove_pool("default", "default").await.unwrap();
        admin.add_pool("default", "default", vec![pb::PortRange { start: 20000, end: 24999 }]).await.unwrap();
    }

    /// Waits until the cluster holds at least `n` allocations (the load is under way).
    async fn wait_for_load(&self, n: usize) {
        let refs: Vec<String> = self.live_addrs();
        let admin = Client::connect_any(&refs.iter().map(String::as_str).collect::<Vec<_>>()).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while admin
            .list(pb::ListRequest { stale: true, ..Default::default() })
            .await
            .map_or(0, |r| r.allocations.len())
            < n
        {
            assert!(tokio::time::Instant::now() < deadline, "load never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn live_addrs(&self) -> Vec<String> {
        self.nodes.iter().zip(&self.addrs).filter(|(n, _)| n.is_some()).map(|(_, a)| a.clone()).collect()
    }

    /// Each live node's own view (stale read), once all agree; panics if they never do.
    async fn converged(&self) -> BTreeSet<u16> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut views = Vec::new();
            for a in self.live_addrs() {
                let c = Client::connect(&a).await.unwrap();
                let r = c.list(pb::ListRequest { stale: true, ..Default::default() }).await.unwrap();
                views.push((
                    r.revision,
                    r.allocations.iter().map(|a| a.port as u16).collect::<BTreeSet<u16>>(),
                ));
            }
            if views.windows(2).all(|w| w[0] == w[1]) {
                return views.swap_remove(0).1;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nodes never converged: {:?}",
                views.iter().map(|v| v.0).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn leader_index(&self) -> usize {
        let c = Client::connect(&self.live_addrs()[0]).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let s = c.status().await.unwrap();
            if let Some(m) = s.members.iter().find(|m| m.id == s.leader_id)
                && let Some(i) = self.addrs.iter().position(|a| *a == m.addr)
                && self.nodes[i].is_some()
            {
                return i;
            }
            assert!(tokio::time::Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Acknowledged ports (each holder's) and the number of writes with an unknown outcome.
async fn load(addrs: Vec<String>, clients: usize, batches: usize, tag: &str) -> (Vec<u16>, usize) {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let addrs = addrs.clone();
        let tag = format!("{tag}{c}");
        tasks.push(tokio::spawn(async move {
            let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            let client = Client::connect_any(&refs).await.unwrap();
            let (mut acked, mut unknown) = (Vec::new(), 0);
            for _ in 0..batches {
                let items = (0..10)
                    .map(|_| pb::AllocItem {
                        service: tag.clone(),
                        pool: "default".into(),
                        ..Default::default()
                    })
                    .collect();
                match client.allocate(pb::AllocateRequest { items, ..Default::default() }).await {
                    Ok(r) => acked.extend(r.allocations.iter().map(|a| a.port as u16)),
                    Err(e) => {
                        if std::env::var("PORTMESH_TEST_ERRORS").is_ok() {
                            eprintln!("unknown outcome: {e}");
                        }
                        unknown += 10
                    }
                }
            }
            (acked, unknown)
        }));
    }
    let (mut acked, mut unknown) = (Vec::new(), 0);
    for t in tasks {
        let (a, u) = t.await.unwrap();
        acked.extend(a);
        unknown += u;
    }
    (acked, unknown)
}

/// Invariant 1: no port acknowledged to two holders. Invariant 4: every acknowledged allocation
/// is in every node's state. Unknown writes may add at most their own count.
fn check(acked: &[u16], unknown: usize, state: &BTreeSet<u16>) {
    let mut seen = BTreeSet::new();
    for p in acked {
        assert!(seen.insert(*p), "port {p} acknowledged twice");
    }
    let lost: Vec<_> = seen.difference(state).collect();
    assert!(lost.is_empty(), "acknowledged allocations lost: {lost:?}");
    assert!(
        state.len() <= seen.len() + unknown,
        "{} live allocations from {} acked + {unknown} unknown",
        state.len(),
        seen.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_under_load_loses_nothing_and_a_restart_rejoins() {
    let mut c = ProcCluster::start(3);
    let addrs = c.addrs.clone();
    // 64 clients x 4 batches x 10 ports = 2,560 allocations.
    c.big_pool().await;
    let load_task = tokio::spawn(load(addrs.clone(), 64, 4, "a"));
    let leader = c.leader_index().await;
    // Let the load get going, then kill the leader without warning.
    c.wait_for_load(300).await;
    c.signal(leader, Signal::SIGKILL);
    drop(c.nodes[leader].take());
    let (acked, unknown) = load_task.await.unwrap();
    eprintln!("kill -9 of the leader under 64-client load: {} acknowledged, {unknown} unknown", acked.len());
    assert!(acked.len() + unknown >= 2_000);
    assert!(acked.len() >= 1_000, "the cluster kept serving: {} acked, {unknown} unknown", acked.len());
    let state = c.converged().await;
    check(&acked, unknown, &state);

    // The killed node comes back on its data, with no flags, and catches up.
    c.restart(leader);
    let state = c.converged().await;
    check(&acked, unknown, &state);
    let s = Client::connect(&c.addrs[leader]).await.unwrap().status().await.unwrap();
    assert_eq!(s.members.len(), 3);
    assert_ne!(s.leader_id, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_the_election_timeout_steps_down_and_nothing_is_lost() {
    let mut c = ProcCluster::start(3);
    c.big_pool().await;
    let load_task = tokio::spawn(load(c.addrs.clone(), 32, 7, "p"));
    let leader = c.leader_index().await;
    c.wait_for_load(200).await;
    c.signal(leader, Signal::SIGSTOP);
    // Others elect a new leader while it sleeps; the load carries on through them.
    let paused = c.nodes[leader].take();
    let new_leader = c.leader_index().await;
    assert_ne!(new_leader, leader);
    c.nodes[leader] = paused;
    c.signal(leader, Signal::SIGCONT);
    let (acked, unknown) = load_task.await.unwrap();
    eprintln!("SIGSTOP of the leader under 32-client load: {} acknowledged, {unknown} unknown", acked.len());
    assert!(acked.len() + unknown >= 2_000);
    let state = c.converged().await;
    check(&acked, unknown, &state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_stopped_with_sigterm_exits_cleanly_and_rejoins() {
    let mut c = ProcCluster::start(3);
    c.big_pool().await;
    let load_task = tokio::spawn(load(c.addrs.clone(), 32, 7, "t"));
    let leader = c.leader_index().await;
    let follower = (leader + 1) % 3;
    c.wait_for_load(200).await;
    c.signal(follower, Signal::SIGTERM);
    let mut stopped = c.nodes[follower].take().unwrap();
    let status = stopped.child.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    let (acked, unknown) = load_task.await.unwrap();
    eprintln!("SIGTERM of a follower under 32-client load: {} acknowledged, {unknown} unknown", acked.len());
    assert!(acked.len() + unknown >= 2_000);
    c.restart(follower);
    let state = c.converged().await;
    check(&acked, unknown, &state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_and_restarting_the_whole_cluster_keeps_every_acknowledged_allocation() {
    let mut c = ProcCluster::start(3);
    c.big_pool().await;
    let (acked, unknown) = load(c.addrs.clone(), 32, 7, "w").await;
    assert_eq!(unknown, 0, "no fault yet: every write is acknowledged");
    for i in 0..3 {
        c.signal(i, Signal::SIGKILL);
        drop(c.nodes[i].take());
    }
    for i in 0..3 {
        c.restart(i);
    }
    let state = c.converged().await;
    check(&acked, unknown, &state);
    assert_eq!(state.len(), acked.len());
}
