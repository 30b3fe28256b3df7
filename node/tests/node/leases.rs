//! Leases: keep-alive, expiry, checkpoints and countdowns across restarts and leader changes.

use super::*;

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
