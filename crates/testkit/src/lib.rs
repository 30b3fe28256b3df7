//! Invariant checkers and a client oracle shared by both tiers of fault tests: in-process
//! clusters (`node/tests`) and real processes of the built binary (`tests/e2e`).
//!
//! Owns: a load generator that records what the cluster acknowledged ([`Oracle`]), a way to read
//! every node's own view of the state ([`views`], [`converged`]), and one checker per SPEC §3
//! invariant 1–6 ([`check_all`] runs them all). Does not own: starting or breaking clusters —
//! each tier does that its own way.
//!
//! The oracle follows the rule every Jepsen-style checker follows: a write whose answer never
//! arrived (a timeout, a connection cut midway) is *unknown*. It may exist afterwards or not,
//! but never twice and never half.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]
#![allow(clippy::unwrap_used)] // test support: a failure here is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use nix::sys::signal::Signal;
use portmesh_client::{Client, ClientOptions, pb};

/// Ports per allocation batch in [`load`].
pub const BATCH: usize = 10;

/// What a client learnt about one batch of allocations.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Acknowledged: these allocations were granted.
    Acked(Vec<pb::Allocation>),
    /// The answer never arrived: `n` items for service `service` may or may not exist.
    Unknown { service: String, n: usize, error: String },
    /// Refused with an answer (nothing changed).
    Refused(String),
}

/// Everything clients were told, for the checkers to compare with the nodes' state.
#[derive(Debug, Clone, Default)]
pub struct Oracle {
    /// One entry per batch, keyed by the batch's service name (unique per batch).
    pub batches: BTreeMap<String, (usize, Outcome)>,
    /// Allocations (port, revision) the clients released with an acknowledged answer.
    pub released: BTreeSet<(u32, u64)>,
    /// Leases known to have ended (revoked with an answer, or left to expire and seen gone).
    pub ended_leases: BTreeSet<u64>,
}

impl Oracle {
    pub fn merge(&mut self, other: Oracle) {
        self.batches.extend(other.batches);
        self.released.extend(other.released);
        self.ended_leases.extend(other.ended_leases);
    }

    /// Acknowledged allocations that were not released since.
    pub fn live_acked(&self) -> impl Iterator<Item = &pb::Allocation> {
        self.batches
            .values()
            .filter_map(|(_, o)| match o {
                Outcome::Acked(a) => Some(a),
                _ => None,
            })
            .flatten()
            .filter(|a| !self.released.contains(&(a.port, a.revision)))
    }

    pub fn acked(&self) -> usize {
        self.batches.values().filter(|(_, o)| matches!(o, Outcome::Acked(_))).map(|(n, _)| n).sum()
    }

    pub fn unknown(&self) -> usize {
        self.batches.values().filter(|(_, o)| matches!(o, Outcome::Unknown { .. })).map(|(n, _)| n).sum()
    }

    /// Records one allocation attempt of `n` items for `service`.
    pub fn record(
        &mut self,
        service: String,
        n: usize,
        r: Result<pb::AllocateResponse, portmesh_client::ClientError>,
    ) {
        let outcome = match r {
            Ok(r) => Outcome::Acked(r.allocations),
            // A failed connection, an unavailable node or a timeout: the write may have been
            // applied. Any other answer from a node (a portmesh category) means nothing was.
            Err(e) if matches!(e.kind(), None | Some("unavailable" | "timeout" | "outcome_unknown")) => {
                Outcome::Unknown { service: service.clone(), n, error: e.to_string() }
            }
            Err(e) => Outcome::Refused(e.to_string()),
        };
        self.batches.insert(service, (n, outcome));
    }

    /// A one-line summary for test output.
    pub fn summary(&self) -> String {
        let refused = self.batches.values().filter(|(_, o)| matches!(o, Outcome::Refused(_))).count();
        format!(
            "{} allocations acknowledged, {} unknown, {} batches refused, {} released",
            self.acked(),
            self.unknown(),
            refused,
            self.released.len()
        )
    }
}

/// Waits (up to 10 s) until the node says it is ready: gRPC health SERVING for `portmesh`,
/// followed through the health `Watch` stream.
pub async fn ready(c: &Client) {
    tokio::time::timeout(Duration::from_secs(10), c.wait_health("portmesh"))
        .await
        .expect("the node became ready within 10 s")
        .expect("the node's health stream");
}

/// Copies directory `from` (files and subdirectories) to `to`: a data directory as it was.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read the directory") {
        let entry = entry.expect("read an entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("an entry's type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

/// Replaces team `default`'s pool `default` by 20000–24999, big enough for every allocation a
/// fault scenario makes (the tests' own range: no host program is expected there).
pub async fn big_default_pool(client: &Client) {
    client
        .remove_pool(pb::RemovePoolRequest { team: "default".into(), name: "default".into() })
        .await
        .expect("remove pool default");
    client
        .add_pool(pb::AddPoolRequest {
            team: "default".into(),
            name: "default".into(),
            ranges: vec![pb::PortRange { start: 20000, end: 24999 }],
        })
        .await
        .expect("add the big pool default");
}

/// `clients` concurrent clients, each allocating `batches` batches of [`BATCH`] ports from pool
/// `default` through any of `addrs`. Every batch has its own service name (`{tag}-{client}-{i}`),
/// so its atomicity can be checked.
pub async fn load(addrs: &[String], clients: usize, batches: usize, tag: &str) -> Oracle {
    load_with(addrs, &ClientOptions::default(), clients, batches, tag).await
}

/// [`load`], connecting with `options` (TLS).
pub async fn load_with(
    addrs: &[String],
    options: &ClientOptions,
    clients: usize,
    batches: usize,
    tag: &str,
) -> Oracle {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let addrs = addrs.to_vec();
        let tag = tag.to_string();
        let options = options.clone();
        tasks.push(tokio::spawn(async move {
            let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            let client = Client::connect_with(&refs, options).await.unwrap();
            let mut oracle = Oracle::default();
            for b in 0..batches {
                let service = format!("{tag}-{c}-{b}");
                let items = (0..BATCH)
                    .map(|_| pb::AllocItem {
                        service: service.clone(),
                        pool: "default".into(),
                        ..Default::default()
                    })
                    .collect();
                let r = client.allocate(pb::AllocateRequest { items, ..Default::default() }).await;
                if let Err(e) = &r
                    && std::env::var_os("PORTMESH_TEST_ERRORS").is_some()
                {
                    eprintln!("{service}: {e}");
                }
                oracle.record(service, BATCH, r);
            }
            oracle
        }));
    }
    let mut oracle = Oracle::default();
    for t in tasks {
        oracle.merge(t.await.unwrap());
    }
    oracle
}

/// One node's own view of the state (a stale read: what it has applied).
#[derive(Debug, Clone)]
pub struct View {
    pub addr: String,
    pub list: pb::ListResponse,
    pub pools: Vec<pb::Pool>,
}

/// Reads every node's own view; `None` for a node that does not answer.
pub async fn views(addrs: &[String]) -> Vec<Option<View>> {
    views_with(addrs, &ClientOptions::default()).await
}

/// [`views`], connecting with `options` (TLS).
pub async fn views_with(addrs: &[String], options: &ClientOptions) -> Vec<Option<View>> {
    let mut out = Vec::new();
    for a in addrs {
        out.push(view(a, options).await.ok());
    }
    out
}

async fn view(addr: &str, options: &ClientOptions) -> Result<View, portmesh_client::ClientError> {
    let c = Client::connect_with(&[addr], options.clone()).await?;
    let list = c.list(pb::ListRequest { stale: true, ..Default::default() }).await?;
    let pools = c.list_pools(pb::ListPoolsRequest { team: String::new(), stale: true }).await?.pools;
    Ok(View { addr: addr.to_string(), list, pools })
}

/// Waits until a leader answers a linearizable read (so it has committed an entry of its term,
/// and with it every entry any member acknowledged before), then until every node in `addrs`
/// answers with the same revision and allocations; panics after `timeout` naming each node's
/// revision. A member's own (stale) view may be behind what was acknowledged until then: one
/// that restarted applies its log up to the last committed index it had made durable, and a
/// leader commits the rest (docs/architecture.md, "State in snapshots").
pub async fn converged(addrs: &[String], timeout: Duration) -> Vec<View> {
    converged_with(addrs, &ClientOptions::default(), timeout).await
}

/// [`converged`], connecting with `options` (TLS).
pub async fn converged_with(addrs: &[String], options: &ClientOptions, timeout: Duration) -> Vec<View> {
    let deadline = tokio::time::Instant::now() + timeout;
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    loop {
        let read = async {
            let c = Client::connect_with(&refs, options.clone()).await?;
            c.list(pb::ListRequest::default()).await
        };
        match read.await {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("no leader answered a linearizable read within {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    loop {
        let vs = views_with(addrs, options).await;
        if vs.iter().all(Option::is_some) {
            let vs: Vec<View> = vs.into_iter().flatten().collect();
            let key = |v: &View| (v.list.revision, ports(v));
            if vs.windows(2).all(|w| key(&w[0]) == key(&w[1])) {
                return vs;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let revs: Vec<String> = views_with(addrs, options)
                .await
                .iter()
                .zip(addrs)
                .map(|(v, a)| match v {
                    Some(v) => format!("{a}: revision {}", v.list.revision),
                    None => format!("{a}: no answer"),
                })
                .collect();
            panic!("nodes never converged within {timeout:?}: {}", revs.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ports(v: &View) -> Vec<u32> {
    v.list.allocations.iter().map(|a| a.port).collect()
}

/// Invariant 1: no two live allocations share a port — within each node's state, and among the
/// allocations clients were told they hold.
pub fn no_shared_port(views: &[View], oracle: &Oracle) -> Result<(), String> {
    for v in views {
        let mut seen = BTreeSet::new();
        for a in &v.list.allocations {
            if !seen.insert(a.port) {
                return Err(format!("{}: port {} is allocated twice", v.addr, a.port));
            }
        }
    }
    let mut held = BTreeMap::new();
    for a in oracle.live_acked() {
        if let Some(other) = held.insert(a.port, a) {
            return Err(format!(
                "port {} acknowledged to two live holders: {} (revision {}) and {} (revision {})",
                a.port, other.service, other.revision, a.service, a.revision
            ));
        }
    }
    Ok(())
}

/// Invariant 2: a reserved port is never allocated.
pub fn reserved_never_allocated(views: &[View]) -> Result<(), String> {
    for v in views {
        let reserved: BTreeSet<u32> = v.list.reservations.iter().map(|r| r.port).collect();
        if let Some(a) = v.list.allocations.iter().find(|a| reserved.contains(&a.port)) {
            return Err(format!("{}: reserved port {} is allocated to {}", v.addr, a.port, a.service));
        }
    }
    Ok(())
}

/// Invariant 3: every allocated port lies in a range of its team's pool, within 1024–65535.
pub fn in_pool_range(views: &[View]) -> Result<(), String> {
    for v in views {
        for a in &v.list.allocations {
            if !(1024..=65535).contains(&a.port) {
                return Err(format!("{}: port {} is outside 1024-65535", v.addr, a.port));
            }
            let pool = v.pools.iter().find(|p| p.team == a.team && p.name == a.pool);
            let inside = pool.is_some_and(|p| p.ranges.iter().any(|r| (r.start..=r.end).contains(&a.port)));
            if !inside {
                return Err(format!(
                    "{}: port {} of {} lies outside pool {:?} of team {:?}",
                    v.addr, a.port, a.service, a.pool, a.team
                ));
            }
        }
    }
    Ok(())
}

/// Invariant 4: every acknowledged allocation that was not released is in every node's state,
/// with the revision that granted it; and no more allocations exist than were acknowledged plus
/// those of unknown outcome.
pub fn acknowledged_survive(views: &[View], oracle: &Oracle) -> Result<(), String> {
    for v in views {
        let have: BTreeSet<(u32, u64)> = v.list.allocations.iter().map(|a| (a.port, a.revision)).collect();
        let lost: Vec<u32> =
            oracle.live_acked().filter(|a| !have.contains(&(a.port, a.revision))).map(|a| a.port).collect();
        if !lost.is_empty() {
            return Err(format!("{}: {} acknowledged allocations lost: {:?}", v.addr, lost.len(), lost));
        }
        let from_load = v.list.allocations.iter().filter(|a| oracle.batches.contains_key(&a.service)).count();
        let bound = oracle.live_acked().count() + oracle.unknown();
        if from_load > bound {
            return Err(format!(
                "{}: {from_load} allocations from the load, but only {} acknowledged and {} unknown",
                v.addr,
                oracle.live_acked().count(),
                oracle.unknown()
            ));
        }
    }
    Ok(())
}

/// Invariant 5: nothing stays attached to a lease that ended.
pub fn ended_leases_release_everything(views: &[View], oracle: &Oracle) -> Result<(), String> {
    for v in views {
        if let Some(a) =
            v.list.allocations.iter().find(|a| a.lease_id != 0 && oracle.ended_leases.contains(&a.lease_id))
        {
            return Err(format!(
                "{}: port {} is still attached to ended lease {}",
                v.addr, a.port, a.lease_id
            ));
        }
    }
    Ok(())
}

/// Invariant 6: a batch exists whole or not at all.
pub fn batches_atomic(views: &[View], oracle: &Oracle) -> Result<(), String> {
    for v in views {
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for a in &v.list.allocations {
            *count.entry(a.service.as_str()).or_default() += 1;
        }
        for (service, (n, outcome)) in &oracle.batches {
            let released = matches!(outcome, Outcome::Acked(a) if a.iter().any(|a| oracle.released.contains(&(a.port, a.revision))));
            let have = count.get(service.as_str()).copied().unwrap_or(0);
            if !released && have != 0 && have != *n {
                return Err(format!("{}: batch {service} of {n} ports exists in part: {have}", v.addr));
            }
        }
    }
    Ok(())
}

/// Every node's state equals every other's (same revision, same allocations).
pub fn views_agree(views: &[View]) -> Result<(), String> {
    for w in views.windows(2) {
        if w[0].list.revision != w[1].list.revision || ports(&w[0]) != ports(&w[1]) {
            return Err(format!(
                "{} (revision {}) and {} (revision {}) disagree",
                w[0].addr, w[0].list.revision, w[1].addr, w[1].list.revision
            ));
        }
    }
    Ok(())
}

/// Runs every checker; panics listing each invariant that does not hold.
#[track_caller]
pub fn check_all(views: &[View], oracle: &Oracle) {
    let results = [
        ("1 no shared port", no_shared_port(views, oracle)),
        ("2 reserved never allocated", reserved_never_allocated(views)),
        ("3 inside a pool of the team", in_pool_range(views)),
        ("4 acknowledged writes survive", acknowledged_survive(views, oracle)),
        ("5 ended leases release everything", ended_leases_release_everything(views, oracle)),
        ("6 batches are atomic", batches_atomic(views, oracle)),
        ("replicas agree", views_agree(views)),
    ];
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|(name, r)| r.err().map(|e| format!("invariant {name}: {e}")))
        .collect();
    assert!(failed.is_empty(), "{}\n({})", failed.join("\n"), oracle.summary());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(port: u32, service: &str, revision: u64) -> pb::Allocation {
        pb::Allocation {
            port,
            team: "default".into(),
            pool: "default".into(),
            service: service.into(),
            revision,
            ..Default::default()
        }
    }

    fn view(allocations: Vec<pb::Allocation>) -> View {
        View {
            addr: "n1".into(),
            list: pb::ListResponse { allocations, reservations: vec![], revision: 7 },
            pools: vec![pb::Pool {
                team: "default".into(),
                name: "default".into(),
                ranges: vec![pb::PortRange { start: 10000, end: 10999 }],
                ..Default::default()
            }],
        }
    }

    fn oracle(batches: Vec<(&str, usize, Outcome)>) -> Oracle {
        Oracle {
            batches: batches.into_iter().map(|(s, n, o)| (s.to_string(), (n, o))).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn each_checker_catches_its_violation() {
        let a = alloc(10000, "b1", 3);
        let b = alloc(10001, "b1", 3);
        let good = oracle(vec![("b1", 2, Outcome::Acked(vec![a.clone(), b.clone()]))]);
        check_all(&[view(vec![a.clone(), b.clone()])], &good);

        // 1: the same port twice in one state, or acknowledged twice.
        assert!(no_shared_port(&[view(vec![a.clone(), a.clone()])], &good).is_err());
        let twice = oracle(vec![
            ("b1", 1, Outcome::Acked(vec![a.clone()])),
            ("b2", 1, Outcome::Acked(vec![alloc(10000, "b2", 4)])),
        ]);
        assert!(no_shared_port(&[], &twice).is_err());
        // 2: a reserved port allocated.
        let mut v = view(vec![a.clone()]);
        v.list.reservations.push(pb::Reservation { port: 10000, ..Default::default() });
        assert!(reserved_never_allocated(&[v]).is_err());
        // 3: outside the pool, or outside 1024-65535.
        assert!(in_pool_range(&[view(vec![alloc(20000, "b1", 3)])]).is_err());
        assert!(in_pool_range(&[view(vec![alloc(80, "b1", 3)])]).is_err());
        // 4: an acknowledged allocation missing, or more than acknowledged + unknown.
        assert!(acknowledged_survive(&[view(vec![a.clone()])], &good).is_err());
        let extra = view(vec![a.clone(), b.clone(), alloc(10002, "b1", 3)]);
        assert!(acknowledged_survive(&[extra], &good).is_err());
        let unknown =
            oracle(vec![("u", 2, Outcome::Unknown { service: "u".into(), n: 2, error: String::new() })]);
        assert!(
            acknowledged_survive(&[view(vec![alloc(10000, "u", 5), alloc(10001, "u", 5)])], &unknown).is_ok()
        );
        // 5: still attached to an ended lease.
        let mut leased = a.clone();
        leased.lease_id = 9;
        let mut ended = good.clone();
        ended.ended_leases.insert(9);
        assert!(ended_leases_release_everything(&[view(vec![leased])], &ended).is_err());
        // 6: half a batch of unknown outcome.
        assert!(batches_atomic(&[view(vec![alloc(10000, "u", 5)])], &unknown).is_err());
        assert!(batches_atomic(&[view(vec![])], &unknown).is_ok());
        // Replicas disagreeing.
        let mut other = view(vec![a.clone()]);
        other.list.revision = 8;
        assert!(views_agree(&[view(vec![a]), other]).is_err());
    }

    #[test]
    fn released_allocations_are_not_expected_back() {
        let a = alloc(10000, "b1", 3);
        let mut o = oracle(vec![("b1", 1, Outcome::Acked(vec![a.clone()]))]);
        o.released.insert((a.port, a.revision));
        check_all(&[view(vec![])], &o);
    }
}

/// A port that refuses connections for as long as the value lives: a socket bound to it that does
/// not listen, so no other program (or concurrent test) can take it and start answering. A port
/// bound and closed again ("nothing listens there now") can be taken by a parallel test at once.
#[derive(Debug)]
pub struct Refusing {
    _socket: socket2::Socket,
    pub port: u16,
}

/// Binds 127.0.0.1 on a port the kernel picks, without listening.
pub fn refusing_port() -> Refusing {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("a TCP socket for a refusing port");
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind 127.0.0.1:0 for a refusing port");
    let port = socket.local_addr().ok().and_then(|a| a.as_socket()).map(|a| a.port()).expect("its port");
    Refusing { _socket: socket, port }
}

/// Pauses process `pid` with SIGSTOP and returns once every one of its threads has stopped.
/// `kill` only queues the signal: until each thread has been scheduled and has taken it, the
/// running ones go on answering calls, which on a loaded machine can take milliseconds.
pub fn pause(pid: u32) {
    signal(pid, Signal::SIGSTOP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !all_threads_stopped(pid) {
        assert!(std::time::Instant::now() < deadline, "process {pid} did not stop within 10 s of SIGSTOP");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Resumes a process [`pause`] stopped.
pub fn resume(pid: u32) {
    signal(pid, Signal::SIGCONT);
}

fn signal(pid: u32, sig: Signal) {
    let target = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid fits i32"));
    nix::sys::signal::kill(target, sig).unwrap_or_else(|e| panic!("{sig} to process {pid}: {e}"));
}

/// Whether every thread of `pid` is in state T (stopped), from `/proc/<pid>/task/*/stat`.
fn all_threads_stopped(pid: u32) -> bool {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads in /proc");
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            // The state follows the command name, which is in parentheses and may hold spaces.
            .map(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T')))
            // A thread that ended meanwhile does not answer either.
            .unwrap_or(true)
    })
}
