//! The load: one phase of clients looping on a workload, against portmesh or etcd, and the
//! lease keep-alive load.

use super::*;

/// Latencies and count of one phase.
pub(crate) struct Phase {
    pub(crate) ops: usize,
    pub(crate) elapsed: Duration,
    pub(crate) lat: Vec<Duration>,
}

impl Phase {
    pub(crate) fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    pub(crate) fn pct(&self, p: f64) -> Duration {
        if self.lat.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.lat.len() as f64 - 1.0) * p).round() as usize;
        self.lat[i]
    }
}

/// Allocations of the `distinct` workload per round on portmesh, shared by its phases: its pool
/// has 10,000 ports and a revoked port cools down for a minute, so a phase that ran for its
/// whole time at thousands per second would exhaust it. 9,000 leaves room for the other
/// workloads' sticky ports.
pub(crate) const DISTINCT_PER_ROUND: usize = 9_000;

/// Runs `clients` loops of `work` for `dur`, or (portmesh) until `limit` operations were made
/// among them; the rate is operations over the time from the start (once every client has
/// connected and set up) until the last loop ended.
pub(crate) async fn run_phase(
    system: System,
    work: Workload,
    addr: &str,
    options: &ClientOptions,
    clients: usize,
    limit: Option<usize>,
    dur: Duration,
) -> Result<Phase> {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(clients + 1));
    let left = limit.map(|n| std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(n)));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let addr = addr.to_string();
        let options = options.clone();
        let left = left.clone();
        let mut gate = Gate { barrier: barrier.clone(), dur, passed: false };
        tasks.push(tokio::spawn(async move {
            let g = &mut gate;
            let lat = match system {
                System::Portmesh | System::PortmeshOld if work == Workload::KeepAlive => {
                    portmesh_keepalive(&addr, g).await
                }
                System::Etcd if work == Workload::KeepAlive => etcd_keepalive(&addr, g).await,
                System::PortmeshTls if work == Workload::KeepAlive => {
                    Err(anyhow::anyhow!("--tls-cost measures the fresh and reused workloads"))
                }
                System::Portmesh | System::PortmeshTls | System::PortmeshOld => {
                    portmesh_client_loop(&addr, &options, work, left, c, g).await
                }
                System::Etcd => etcd_client_loop(&addr, work, c, g).await,
            };
            // A client that failed before the start still lets the others (and the timer) go.
            if !gate.passed {
                gate.barrier.wait().await;
            }
            lat
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = start.elapsed();
    lat.sort_unstable();
    Ok(Phase { ops: lat.len(), elapsed, lat })
}

/// Holds a phase's clients until every one has connected and set up (granted the leases it
/// keeps), so the timed part starts together and counts operations only: a connect inside it
/// lowered the rate of short phases (a `distinct` phase that ends at its share).
pub(crate) struct Gate {
    barrier: std::sync::Arc<tokio::sync::Barrier>,
    dur: Duration,
    passed: bool,
}

impl Gate {
    /// Waits for the phase's other clients; returns when this client's loop must end.
    pub(crate) async fn pass(&mut self) -> Instant {
        self.passed = true;
        self.barrier.wait().await;
        Instant::now() + self.dur
    }
}

/// Leases each keep-alive client renews, and renewals it keeps in flight on its stream.
pub(crate) const KEEPALIVE_LEASES: usize = 100;

pub(crate) const KEEPALIVE_WINDOW: usize = 32;

/// A request stream fed by a channel (what tonic's streaming calls take).
pub(crate) struct ChannelStream<T>(pub(crate) tokio::sync::mpsc::Receiver<T>);

impl<T> futures::Stream for ChannelStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

/// Renews `ids` round-robin on the stream `replies` answers, feeding requests into `tx` with
/// `KEEPALIVE_WINDOW` in flight, until `deadline`; returns each renewal's round-trip time.
/// Fills the window before the call is opened: a gRPC server may send the response headers only
/// with its first reply (etcd does), so the call would not return before a request went out.
pub(crate) fn prefill<Req>(
    tx: &tokio::sync::mpsc::Sender<Req>,
    ids: &[i64],
    req: fn(i64) -> Req,
) -> Result<Vec<Instant>> {
    let mut sent = Vec::new();
    for id in ids.iter().cycle().take(KEEPALIVE_WINDOW) {
        tx.try_send(req(*id)).map_err(|_| anyhow::anyhow!("the keep-alive window is full"))?;
        sent.push(Instant::now());
    }
    Ok(sent)
}

/// Renews `ids` round-robin on the stream `replies` answers, feeding requests into `tx` with
/// `KEEPALIVE_WINDOW` in flight (the first window already sent at `sent`), until `deadline`;
/// returns each renewal's round-trip time.
pub(crate) async fn keepalive_loop<Req, Resp>(
    ids: Vec<i64>,
    req: fn(i64) -> Req,
    tx: tokio::sync::mpsc::Sender<Req>,
    mut replies: tonic::Streaming<Resp>,
    sent: Vec<Instant>,
    alive: fn(&Resp) -> bool,
    deadline: Instant,
) -> Result<Vec<Duration>> {
    let mut sent: std::collections::VecDeque<Instant> = sent.into();
    let mut lat = Vec::new();
    let mut next = sent.len();
    while Instant::now() < deadline {
        while sent.len() < KEEPALIVE_WINDOW {
            tx.send(req(ids[next % ids.len()]))
                .await
                .map_err(|_| anyhow::anyhow!("the keep-alive stream closed"))?;
            sent.push_back(Instant::now());
            next += 1;
        }
        match replies.message().await? {
            Some(r) => {
                if !alive(&r) {
                    bail!("a renewal answered that its lease is gone: the figures would count failures");
                }
                if let Some(t) = sent.pop_front() {
                    lat.push(t.elapsed());
                }
            }
            None => bail!("the keep-alive stream ended"),
        }
    }
    Ok(lat)
}

pub(crate) async fn portmesh_keepalive(addr: &str, gate: &mut Gate) -> Result<Vec<Duration>> {
    let client = Client::connect(addr).await?;
    let mut ids = Vec::new();
    for _ in 0..KEEPALIVE_LEASES {
        ids.push(
            client.grant_lease(pb::LeaseGrantRequest { team: "default".into(), ttl_ms: 600_000 }).await?.id
                as i64,
        );
    }
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let (tx, rx) = tokio::sync::mpsc::channel(KEEPALIVE_WINDOW);
    let req = |id: i64| pb::LeaseKeepAliveRequest { team: "default".into(), lease_id: id as u64 };
    let deadline = gate.pass().await;
    let sent = prefill(&tx, &ids, req)?;
    let replies = pb::leases_client::LeasesClient::new(ch).keep_alive(ChannelStream(rx)).await?.into_inner();
    keepalive_loop(ids, req, tx, replies, sent, |r| r.ttl_ms > 0, deadline).await
}

pub(crate) async fn etcd_keepalive(addr: &str, gate: &mut Gate) -> Result<Vec<Duration>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut leases = etcdpb::lease_client::LeaseClient::new(ch);
    let mut ids = Vec::new();
    for _ in 0..KEEPALIVE_LEASES {
        ids.push(leases.lease_grant(etcdpb::LeaseGrantRequest { ttl: 600, id: 0 }).await?.into_inner().id);
    }
    let (tx, rx) = tokio::sync::mpsc::channel(KEEPALIVE_WINDOW);
    let req = |id: i64| etcdpb::LeaseKeepAliveRequest { id };
    let deadline = gate.pass().await;
    let sent = prefill(&tx, &ids, req)?;
    let replies = leases.lease_keep_alive(ChannelStream(rx)).await?.into_inner();
    keepalive_loop(ids, req, tx, replies, sent, |r| r.ttl > 0, deadline).await
}

pub(crate) async fn portmesh_client_loop(
    addr: &str,
    options: &ClientOptions,
    work: Workload,
    left: Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
    c: usize,
    gate: &mut Gate,
) -> Result<Vec<Duration>> {
    use std::sync::atomic::Ordering;
    // One more operation of the phase's limit, if it has one and it is not spent.
    let take = || {
        left.as_ref().is_none_or(|n| {
            n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1)).is_ok()
        })
    };
    let client = Client::connect_with(&[addr], options.clone()).await?;
    let held = match work {
        Workload::Reused => {
            client.grant_lease(pb::LeaseGrantRequest { team: "default".into(), ttl_ms: 600_000 }).await?.id
        }
        _ => 0,
    };
    let deadline = gate.pass().await;
    let mut lat = Vec::new();
    while Instant::now() < deadline && take() {
        let t0 = Instant::now();
        let r = client
            .allocate(pb::AllocateRequest {
                items: vec![pb::AllocItem {
                    service: format!("bench-{c}"),
                    pool: "bench".into(),
                    key: if work == Workload::Distinct { String::new() } else { format!("bench/{c}") },
                    ..Default::default()
                }],
                lease_id: held,
                ttl_ms: if held == 0 { 60_000 } else { 0 },
                ..Default::default()
            })
            .await?;
        lat.push(t0.elapsed());
        if held == 0 {
            client
                .revoke_lease(pb::LeaseRevokeRequest { team: "default".into(), lease_id: r.lease_id })
                .await?;
        } else {
            let req = pb::ReleaseRequest { key: format!("bench/{c}"), ..Default::default() };
            client.release(req).await?;
        }
    }
    Ok(lat)
}

pub(crate) async fn etcd_client_loop(
    addr: &str,
    work: Workload,
    c: usize,
    gate: &mut Gate,
) -> Result<Vec<Duration>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut kv = etcdpb::kv_client::KvClient::new(ch.clone());
    let mut leases = etcdpb::lease_client::LeaseClient::new(ch);
    let held = match work {
        Workload::Reused => {
            leases.lease_grant(etcdpb::LeaseGrantRequest { ttl: 600, id: 0 }).await?.into_inner().id
        }
        _ => 0,
    };
    let deadline = gate.pass().await;
    let mut lat = Vec::new();
    while Instant::now() < deadline {
        let t0 = Instant::now();
        if work == Workload::Put {
            let put =
                etcdpb::PutRequest { key: format!("bench/{c}").into_bytes(), value: b"x".to_vec(), lease: 0 };
            kv.put(put).await?;
            lat.push(t0.elapsed());
            continue;
        }
        let lease = if held != 0 {
            held
        } else {
            leases.lease_grant(etcdpb::LeaseGrantRequest { ttl: 60, id: 0 }).await?.into_inner().id
        };
        let mut port = 20_000 + c as u32;
        let key = loop {
            let key = format!("ports/{port}").into_bytes();
            let txn = etcdpb::TxnRequest {
                compare: vec![etcdpb::Compare {
                    result: etcdpb::compare::CompareResult::Equal as i32,
                    target: etcdpb::compare::CompareTarget::Create as i32,
                    key: key.clone(),
                    target_union: Some(etcdpb::compare::TargetUnion::CreateRevision(0)),
                }],
                success: vec![etcdpb::RequestOp {
                    request: Some(etcdpb::request_op::Request::RequestPut(etcdpb::PutRequest {
                        key: key.clone(),
                        value: format!("bench-{c}").into_bytes(),
                        lease,
                    })),
                }],
                failure: vec![],
            };
            if kv.txn(txn).await?.into_inner().succeeded {
                break key;
            }
            port = 20_000 + (port - 20_000 + 64) % 10_000;
        };
        lat.push(t0.elapsed());
        if held == 0 {
            leases.lease_revoke(etcdpb::LeaseRevokeRequest { id: lease }).await?;
        } else {
            kv.delete_range(etcdpb::DeleteRangeRequest { key, range_end: vec![] }).await?;
        }
    }
    Ok(lat)
}
