//! Real processes of the built binary forming one cluster: kill -9 the leader under load, restart
//! it, and check the SPEC §3 invariants against every node's state. A write whose outcome the
//! client could not learn is *unknown*: it may exist afterwards or not, but never twice.

use std::time::Duration;

use nix::sys::signal::Signal;
use portmesh_client::{Client, ClientOptions, pb};
use portmesh_testkit as testkit;

use crate::support::*;

pub(crate) struct ProcCluster {
    pub home: Home,
    pub nodes: Vec<Option<Served>>,
    pub addrs: Vec<String>,
    extra: Vec<String>,
    /// How clients connect (TLS for a TLS cluster).
    pub options: ClientOptions,
}

impl ProcCluster {
    /// `n` serve processes: the first bootstraps, the others join it; `extra` flags for all.
    fn start(n: usize, extra: &[&str]) -> ProcCluster {
        ProcCluster::start_in(Home::new(), n, extra, ClientOptions::default())
    }

    /// [`ProcCluster::start`] in `home`, its clients connecting with `options`.
    /// With `--auth` among `extra` (and TLS), clients send the first node's admin token and the
    /// others join with a join token made with it.
    pub fn start_in(home: Home, n: usize, extra: &[&str], mut options: ClientOptions) -> ProcCluster {
        let mut nodes = Vec::new();
        let mut addrs: Vec<String> = Vec::new();
        let mut join_token = String::new();
        for i in 0..n {
            let data = home.path().join(format!("node{i}"));
            let mut flags: Vec<&str> = extra.to_vec();
            if i == 0 {
                flags.push("--bootstrap");
            } else {
                flags.extend(["--join", addrs[0].as_str()]);
                if !join_token.is_empty() {
                    flags.extend(["--join-token", join_token.as_str()]);
                }
            }
            let s = serve(&home, &data, &flags);
            drop(flags);
            if i == 0 && extra.contains(&"--auth") {
                let admin = data.join("admin.token");
                options.token = Some(std::fs::read_to_string(&admin).unwrap().trim().to_string());
            }
            if i == 0 && n > 1 && extra.contains(&"--auth") {
                let admin = data.join("admin.token");
                let ca = options.tls.as_ref().expect("--auth needs TLS").ca_path();
                let uses = (n - 1).to_string();
                let made = home
                    .cmd(&["token", "create", "--join", "--uses", &uses])
                    .env("PORTMESH_NODE", &s.grpc)
                    .env("PORTMESH_TLS_CA", ca)
                    .env("PORTMESH_TOKEN_FILE", &admin)
                    .output()
                    .unwrap();
                assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
                join_token = String::from_utf8_lossy(&made.stdout).trim().to_string();
            }
            addrs.push(s.grpc.clone());
            nodes.push(Some(s));
        }
        let extra = extra.iter().map(|s| s.to_string()).collect();
        ProcCluster { home, nodes, addrs, extra, options }
    }

    /// A client of node `addr`, connected as this cluster's clients are.
    pub async fn client(&self, addr: &str) -> Client {
        Client::connect_with(&[addr], self.options.clone()).await.unwrap()
    }

    /// Restarts node `i` on its data and its address, with no cluster flags.
    pub fn restart(&mut self, i: usize) {
        let data = self.home.path().join(format!("node{i}"));
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let s = serve_at(&self.home, &data, &self.addrs[i], &extra);
        self.nodes[i] = Some(s);
    }

    pub fn signal(&self, i: usize, sig: Signal) {
        let pid = self.nodes[i].as_ref().unwrap().child.id() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
    }

    /// Replaces the default pool by one big enough for every scenario's allocations.
    pub async fn big_pool(&self) {
        testkit::big_default_pool(&self.client(&self.addrs[0]).await).await;
    }

    /// Waits until the cluster holds at least `n` allocations (the load is under way).
    pub async fn wait_for_load(&self, n: usize) {
        let refs: Vec<String> = self.live_addrs();
        let admin =
            Client::connect_with(&refs.iter().map(String::as_str).collect::<Vec<_>>(), self.options.clone())
                .await
                .unwrap();
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

    pub fn live_addrs(&self) -> Vec<String> {
        self.nodes.iter().zip(&self.addrs).filter(|(n, _)| n.is_some()).map(|(_, a)| a.clone()).collect()
    }

    /// Every live node's own view, once all agree; panics if they never do.
    pub async fn converged(&self) -> Vec<testkit::View> {
        testkit::converged_with(&self.live_addrs(), &self.options, Duration::from_secs(30)).await
    }

    pub async fn leader_index(&self) -> usize {
        let c = self.client(&self.live_addrs()[0]).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_under_load_loses_nothing_and_a_restart_rejoins() {
    let mut c = ProcCluster::start(3, &[]);
    // 64 clients x 4 batches x 10 ports = 2,560 allocations.
    c.big_pool().await;
    let addrs = c.addrs.clone();
    let load_task = tokio::spawn(async move { testkit::load(&addrs, 64, 4, "k").await });
    let leader = c.leader_index().await;
    // Let the load get going, then kill the leader without warning.
    c.wait_for_load(300).await;
    c.signal(leader, Signal::SIGKILL);
    drop(c.nodes[leader].take());
    let oracle = load_task.await.unwrap();
    eprintln!("kill -9 of the leader under 64-client load: {}", oracle.summary());
    assert!(oracle.acked() + oracle.unknown() >= 2_000);
    assert!(oracle.acked() >= 1_000, "the cluster kept serving: {}", oracle.summary());
    testkit::check_all(&c.converged().await, &oracle);

    // The killed node comes back on its data and address, rejoins and catches up.
    c.restart(leader);
    testkit::check_all(&c.converged().await, &oracle);
    let s = Client::connect(&c.addrs[leader]).await.unwrap().status().await.unwrap();
    assert_eq!(s.members.len(), 3);
    assert_ne!(s.leader_id, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_the_election_timeout_steps_down_and_nothing_is_lost() {
    let mut c = ProcCluster::start(3, &[]);
    c.big_pool().await;
    let addrs = c.addrs.clone();
    let load_task = tokio::spawn(async move { testkit::load(&addrs, 32, 7, "p").await });
    let leader = c.leader_index().await;
    c.wait_for_load(200).await;
    let pid = c.nodes[leader].as_ref().unwrap().child.id();
    testkit::pause(pid);
    // The others elect a new leader while it sleeps; the load carries on through them.
    let paused = c.nodes[leader].take();
    let new_leader = c.leader_index().await;
    assert_ne!(new_leader, leader);
    c.nodes[leader] = paused;
    testkit::resume(pid);
    let oracle = load_task.await.unwrap();
    eprintln!("SIGSTOP of the leader under 32-client load: {}", oracle.summary());
    assert!(oracle.acked() + oracle.unknown() >= 2_000);
    testkit::check_all(&c.converged().await, &oracle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_stopped_with_sigterm_exits_cleanly_and_rejoins() {
    let mut c = ProcCluster::start(3, &[]);
    c.big_pool().await;
    let addrs = c.addrs.clone();
    let load_task = tokio::spawn(async move { testkit::load(&addrs, 32, 7, "t").await });
    let leader = c.leader_index().await;
    let follower = (leader + 1) % 3;
    c.wait_for_load(200).await;
    c.signal(follower, Signal::SIGTERM);
    let mut stopped = c.nodes[follower].take().unwrap();
    let status = stopped.child.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    let oracle = load_task.await.unwrap();
    eprintln!("SIGTERM of a follower under 32-client load: {}", oracle.summary());
    assert!(oracle.acked() + oracle.unknown() >= 2_000);
    c.restart(follower);
    testkit::check_all(&c.converged().await, &oracle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_and_restarting_the_whole_cluster_keeps_every_acknowledged_allocation() {
    let mut c = ProcCluster::start(3, &[]);
    c.big_pool().await;
    let oracle = testkit::load(&c.addrs, 32, 7, "w").await;
    assert_eq!(oracle.unknown(), 0, "no fault yet: every write is acknowledged");
    let leader = c.leader_index().await;
    for i in 0..3 {
        c.signal(i, Signal::SIGKILL);
        drop(c.nodes[i].take());
    }
    // One at a time, as an operator or a service manager would, the old leader first. Alone it
    // has no quorum: it knows no leader (it does not resume its old term: early replication) and
    // still listens, not ready, rather than wait for one.
    let order = [leader, (leader + 1) % 3, (leader + 2) % 3];
    c.restart(order[0]);
    let alone = c.client(&c.addrs[order[0]]).await.status().await.unwrap();
    assert_eq!(alone.leader_id, 0, "no quorum, no leader: {alone:?}");
    for i in &order[1..] {
        c.restart(*i);
    }
    let views = c.converged().await;
    testkit::check_all(&views, &oracle);
    assert_eq!(views[0].list.allocations.len(), oracle.acked());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_missed_thousands_of_entries_catches_up_by_snapshot() {
    // Snapshot every 500 entries, so the leader purges what the follower missed.
    let mut c = ProcCluster::start(3, &["--snapshot-every", "500"]);
    c.big_pool().await;
    let leader = c.leader_index().await;
    let follower = (leader + 1) % 3;
    c.signal(follower, Signal::SIGKILL);
    drop(c.nodes[follower].take());
    // One port per request from four sequential clients: thousands of log entries.
    let live = c.live_addrs();
    let mut tasks = Vec::new();
    for k in 0..4 {
        let live = live.clone();
        tasks.push(tokio::spawn(async move {
            let refs: Vec<&str> = live.iter().map(String::as_str).collect();
            let client = Client::connect_any(&refs).await.unwrap();
            let mut oracle = testkit::Oracle::default();
            for i in 0..600 {
                let service = format!("m-{k}-{i}");
                let item =
                    pb::AllocItem { service: service.clone(), pool: "default".into(), ..Default::default() };
                let r =
                    client.allocate(pb::AllocateRequest { items: vec![item], ..Default::default() }).await;
                oracle.record(service, 1, r);
            }
            oracle
        }));
    }
    let mut oracle = testkit::Oracle::default();
    for t in tasks {
        oracle.merge(t.await.unwrap());
    }
    assert_eq!(oracle.acked(), 2_400, "{}", oracle.summary());
    let before = Client::connect(&live[0]).await.unwrap().status().await.unwrap();
    assert!(before.applied_index >= 1_000, "thousands of entries: {}", before.applied_index);
    c.restart(follower);
    testkit::check_all(&c.converged().await, &oracle);
}

/// A member cut off from its quorum is not ready, and `doctor` says why and exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_its_quorum_is_not_ready_and_doctor_says_so() {
    let mut c = ProcCluster::start(3, &[]);
    let http = c.nodes[0].as_ref().unwrap().http.clone();
    assert_eq!(http_get(&http, "/readyz").0, 200);
    c.nodes[1] = None; // killed
    c.nodes[2] = None;
    wait_until("node 0 to be unready", Duration::from_secs(20), || http_get(&http, "/readyz").0 == 503);
    let (_, body) = http_get(&http, "/readyz");
    assert!(body.contains("no leader known") || body.contains("not"), "{body}");
    let r = c.home.pm(&["doctor", "--node", &c.addrs[0]]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("error cluster: no leader") || r.stdout.contains("does not answer from here"),
        "{r:?}"
    );
}

/// Issue 15: a member down is one line in the leader's log when it goes, not lines per request
/// or per retry (openraft's own retry lines are filtered out by the node's default filter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_down_is_one_log_line_not_one_per_request() {
    let mut c = ProcCluster::start(3, &[]);
    // The tests' own range: the stock pool may hold ports this host's programs use, and each
    // busy port an allocation skips is logged.
    c.big_pool().await;
    // Counted from a settled cluster: the last joiner's promotion makes openraft warn once about
    // replies to the older membership, which is no request's doing.
    let admin = c.client(&c.addrs[0]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !admin
        .status()
        .await
        .is_ok_and(|s| s.members.len() == 3 && s.members.iter().all(|m| m.role != "learner"))
    {
        assert!(tokio::time::Instant::now() < deadline, "the third node never became a voter");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.converged().await;
    let leader = c.leader_index().await;
    let f = (leader + 1) % 3;
    let status = admin.status().await.unwrap();
    let gone = status.members.iter().find(|m| m.addr == c.addrs[f]).unwrap().id;
    let log = c.nodes[leader].as_ref().unwrap().later.clone();
    let before = log.lock().unwrap().len();
    c.signal(f, Signal::SIGKILL);
    drop(c.nodes[f].take());
    let since = || log.lock().unwrap()[before..].to_vec();
    // The killed member's lines (a live member's one slow answer on a loaded machine is another
    // state change, logged once too, and counted among the warnings below).
    let down_lines = || {
        since()
            .iter()
            .filter(|l| l.contains("member unreachable") && l.contains(&format!("member={gone} ")))
            .count()
    };
    wait_until("the leader to log the member as unreachable", Duration::from_secs(20), || down_lines() >= 1);
    let client = c.client(&c.addrs[leader]).await;
    for i in 0..50 {
        let item = pb::AllocItem { service: format!("q{i}"), pool: "default".into(), ..Default::default() };
        client.allocate(pb::AllocateRequest { items: vec![item], ..Default::default() }).await.unwrap();
        client.list(pb::ListRequest::default()).await.unwrap();
    }
    let lines = since();
    let noisy: Vec<&String> = lines.iter().filter(|l| l.contains("ERROR") || l.contains("WARN")).collect();
    assert_eq!(down_lines(), 1, "one line for the member going: {lines:#?}");
    assert!(noisy.len() <= 3, "100 requests with a member down log no more warnings: {noisy:#?}");
}

/// A member whose data directory was damaged refuses to start, and what its message says to do
/// works: move the directory aside, remove the old member, join a fresh one, which catches up
/// from the others with everything the cluster acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_member_refuses_to_start_and_a_fresh_one_rejoins_with_everything() {
    let mut c = ProcCluster::start(3, &[]);
    c.big_pool().await;
    let client = c.client(&c.addrs[0]).await;
    for i in 0..150 {
        let item = pb::AllocItem { service: format!("d{i}"), ..Default::default() };
        client.allocate(pb::AllocateRequest { items: vec![item], ..Default::default() }).await.unwrap();
    }
    let before = c.converged().await;
    let leader = c.leader_index().await;
    let f = (leader + 1) % 3;
    let status = c.client(&c.addrs[f]).await.status().await.unwrap();
    c.signal(f, Signal::SIGTERM);
    c.nodes[f].take().unwrap().child.wait().unwrap();

    // Damaged: half of its sled file gone.
    let dir = c.home.path().join(format!("node{f}"));
    let db = dir.join("sled").join("db");
    let len = std::fs::metadata(&db).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&db).unwrap().set_len(len / 2).unwrap();
    let mut child = c
        .home
        .cmd(&["serve", "--listen", &c.addrs[f], "--data", dir.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the damaged member to give up", Duration::from_secs(30), || {
        child.try_wait().unwrap().is_some()
    });
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a damaged member must not start: {stderr}");
    assert!(stderr.contains("is damaged") && stderr.contains("leave --id"), "{stderr}");

    // What the message says: aside, leave, join fresh.
    std::fs::rename(&dir, c.home.path().join(format!("node{f}-damaged"))).unwrap();
    let id = status.node_id.to_string();
    c.home.pm(&["--node", &c.addrs[leader], "leave", "--id", &id]).ok();
    let fresh = serve(&c.home, &c.home.path().join("fresh"), &["--join", &c.addrs[leader]]);
    c.addrs[f] = fresh.grpc.clone();
    c.nodes[f] = Some(fresh);
    let after = c.converged().await;
    assert_eq!(after.len(), 3);
    let ports = |v: &testkit::View| v.list.allocations.iter().map(|a| a.port).collect::<Vec<_>>();
    for v in &after {
        assert_eq!(ports(v), ports(&before[0]), "{} lacks what the cluster acknowledged", v.addr);
    }
}

/// Issue 16: a rolling restart, as Kubernetes' rolling update does it (one member at a time,
/// SIGTERM, the leader last, each back and ready before the next goes), while clients allocate
/// under leases of their own and keep other leases alive: zero errors returned to a caller (the
/// client library's retries are its own business) and zero leases lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_no_request_and_loses_no_lease() {
    let mut c = ProcCluster::start(3, &[]);
    c.big_pool().await;
    let addrs = c.addrs.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));

    // Kept leases, renewed by the client helper throughout.
    let keeper = Client::connect_any(&addrs.iter().map(String::as_str).collect::<Vec<_>>()).await.unwrap();
    let ttl = Duration::from_secs(5);
    let mut kept = Vec::new();
    for _ in 0..20 {
        let lease = keeper
            .grant_lease(pb::LeaseGrantRequest { team: "default".into(), ttl_ms: ttl.as_millis() as u64 })
            .await
            .unwrap();
        kept.push((lease.id, keeper.keep_lease("default", lease.id, ttl)));
    }

    // Writers: each allocation under a lease of its own, renewed once, until told to stop.
    let mut writers = Vec::new();
    for w in 0..8 {
        let (addrs, stop, progress) = (addrs.clone(), stop.clone(), progress.clone());
        writers.push(tokio::spawn(async move {
            let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            let client = Client::connect_any(&refs).await.unwrap();
            let (mut done, mut failed) = (0usize, Vec::new());
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let item = pb::AllocItem {
                    service: format!("roll-{w}-{i}"),
                    pool: "default".into(),
                    ..Default::default()
                };
                let req = pb::AllocateRequest { items: vec![item], ttl_ms: 60_000, ..Default::default() };
                match client.allocate(req).await {
                    Ok(r) => {
                        let renew =
                            pb::LeaseKeepAliveRequest { team: "default".into(), lease_id: r.lease_id };
                        match client.keep_alive_once(renew).await {
                            Ok(Some(_)) => {
                                done += 1;
                                progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Ok(None) => {
                                failed.push(format!("lease {} of roll-{w}-{i} gone at once", r.lease_id))
                            }
                            Err(e) => failed.push(format!("renew roll-{w}-{i}: {e}")),
                        }
                    }
                    Err(e) => failed.push(format!("allocate roll-{w}-{i}: {e}")),
                }
            }
            (done, failed)
        }));
    }

    // The rolling restart: followers first, the leader last.
    let leader = c.leader_index().await;
    let order: Vec<usize> = (0..3).filter(|i| *i != leader).chain([leader]).collect();
    let written = || progress.load(std::sync::atomic::Ordering::Relaxed);
    for i in order {
        // Under load: the writers have moved on since the last restart.
        let from = written();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while written() < from + 50 {
            assert!(tokio::time::Instant::now() < deadline, "the writers stalled before node {i}'s restart");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        c.signal(i, Signal::SIGTERM);
        let mut gone = c.nodes[i].take().unwrap();
        let status = gone.child.wait().unwrap();
        assert!(status.success(), "node {i} stopped cleanly on SIGTERM: {status:?}");
        c.restart(i);
        let client = c.client(&c.addrs[i]).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !client.health("portmesh").await.unwrap_or(false) {
            assert!(tokio::time::Instant::now() < deadline, "node {i} never ready after its restart");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let from = written();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while written() < from + 50 {
        assert!(tokio::time::Instant::now() < deadline, "the writers stalled after the restarts");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut done, mut failed) = (0, Vec::new());
    for w in writers {
        let (d, f) = w.await.unwrap();
        done += d;
        failed.extend(f);
    }
    eprintln!(
        "rolling restart of 3 members under 8 writers: {done} allocations and renewals, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "requests failed during the rolling restart: {failed:#?}");
    assert!(done >= 200, "the writers kept writing: {done}");
    for (id, k) in &kept {
        assert!(k.lost_now().is_none(), "kept lease {id} was lost: {:?}", k.lost_now());
        let t = keeper
            .time_to_live(pb::LeaseTimeToLiveRequest { team: "default".into(), lease_id: *id })
            .await
            .unwrap();
        assert!(t.lease.is_some_and(|l| l.remaining_ms > 0), "kept lease {id} is there");
    }
}
