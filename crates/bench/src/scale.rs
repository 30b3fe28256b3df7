//! Scale benchmarks of leases and watch (issue #4):
//! - `--soak N`: N leases on a portmesh cluster, each renewed every TTL/3 for `--soak-secs`;
//!   counts renewals answered "gone" and `LEASE_EXPIRED` events (both should stay 0).
//! - `--rss-allocations N`: N live allocations, each under its own lease, on both systems (etcd:
//!   N leases with one key each); reports every member's RSS.
//! - `--watchers W,...`: W watchers spread over the members while one client writes single-event
//!   changes as fast as it can; reports delivery latency (write sent → event received) and
//!   deliveries per second, on both systems.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use portmesh_client::{Client, pb};

use crate::{ChannelStream, Deployment, etcdpb, hwm_kb, median, rss_kb, start_etcd, start_portmesh};

/// Concurrent clients used to build up state.
const FILL_CLIENTS: usize = 16;
/// Keep-alive streams of the soak.
const SOAK_STREAMS: usize = 16;
/// Watchers per gRPC connection.
const WATCHERS_PER_CHANNEL: usize = 100;

async fn channel(addr: &str) -> Result<tonic::transport::Channel> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?)
}

/// Runs `total` jobs on `FILL_CLIENTS` tasks; `job(client_index, job_index)`.
async fn fan_out<F, Fut>(total: usize, job: F) -> Result<()>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let job = Arc::new(job);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..FILL_CLIENTS {
        let (job, next) = (job.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= total {
                    return Ok::<(), anyhow::Error>(());
                }
                job(c, i).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// `FILL_CLIENTS` connections to `addr`, one per filling task.
async fn fill_clients(addr: &str) -> Result<Arc<Vec<Client>>> {
    let mut v = Vec::new();
    for _ in 0..FILL_CLIENTS {
        v.push(Client::connect(addr).await?);
    }
    Ok(Arc::new(v))
}

fn member_rss(d: &Deployment) -> Vec<f64> {
    (0..d.addrs.len()).map(|i| rss_kb(d.pid(i)) as f64 / 1024.0).collect()
}

fn fmt_mb(v: &[f64]) -> String {
    v.iter().map(|m| format!("{m:.1}")).collect::<Vec<_>>().join(" / ")
}

/// Pools holding every port from 1024 up that the default pools and the bench pool leave free.
async fn add_scale_pools(c: &Client) -> Result<Vec<(String, usize)>> {
    let ranges = [(1024, 7999), (9000, 9999), (14000, 19999), (30000, 65535)];
    let pb_ranges = ranges.iter().map(|(s, e)| pb::PortRange { start: *s, end: *e }).collect();
    c.add_pool(pb::AddPoolRequest { team: "default".into(), name: "scale".into(), ranges: pb_ranges })
        .await?;
    let size = |s: u32, e: u32| (e - s + 1) as usize;
    let scale = ranges.iter().map(|(s, e)| size(*s, *e)).sum();
    Ok(vec![
        ("scale".into(), scale),
        ("bench".into(), 10_000),
        ("default".into(), 1000),
        ("web".into(), 1000),
        ("db".into(), 1000),
        ("cache".into(), 1000),
        ("queue".into(), 1000),
    ])
}

/// How many of this host's ports are held by connections in TIME_WAIT: busy to a probe with no
/// process listening (the fill's pools cross the ephemeral range, where the loopback connections
/// of a run just before leave them for a minute; docs/benchmarks.md, tenth slice).
fn ports_in_time_wait() -> usize {
    let mut ports = portmesh_probe::time_wait_ports();
    ports.dedup();
    ports.len()
}

/// Which pool the `i`-th allocation draws from.
fn pool_for(pools: &[(String, usize)], mut i: usize) -> Option<&str> {
    for (name, size) in pools {
        if i < *size {
            return Some(name);
        }
        i -= size;
    }
    None
}

/// Allocations `from..to` of a fill: each a distinct port under its own 1 h lease, from the
/// scale pools in order, on `FILL_CLIENTS` clients.
async fn fill(addr: &str, pools: Arc<Vec<(String, usize)>>, from: usize, to: usize) -> Result<()> {
    let capacity: usize = pools.iter().map(|p| p.1).sum();
    if to > capacity {
        bail!(
            "{to} allocations do not fit: ports 1024-65535 hold {capacity} once the pools are laid out \
             (every allocation is a distinct port)"
        );
    }
    let clients = fill_clients(addr).await?;
    // Pools before this index answered "exhausted": the fill asks them no more, as a client
    // would not (each such answer costs every member a walk of the full pool).
    let full = Arc::new(AtomicUsize::new(0));
    fan_out(to - from, move |c, j| {
        let (clients, pools, full) = (clients.clone(), pools.clone(), full.clone());
        let i = from + j;
        async move {
            // The pool the index falls in, else the next ones (ports busy on this host leave a
            // pool short of its size).
            let first = pools
                .iter()
                .position(|p| Some(p.0.as_str()) == pool_for(&pools, i))
                .context("out of pools")?
                .max(full.load(Ordering::Relaxed));
            for (k, (pool, _)) in pools.iter().enumerate().skip(first) {
                let r = clients[c]
                    .allocate(pb::AllocateRequest {
                        items: vec![pb::AllocItem {
                            service: format!("s{i}"),
                            pool: pool.clone(),
                            ..Default::default()
                        }],
                        ttl_ms: 3_600_000,
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == Some("exhausted") => {
                        full.fetch_max(k + 1, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            bail!("every pool is full")
        }
    })
    .await
}

/// Throughput as the state grows (issue 19): fills a cluster to each of `sizes` live leased
/// allocations (distinct ports: the fill rate of each step is the rate of taking fresh ports),
/// then runs the `fresh` workload (a sticky key per client, a new lease per allocation) at
/// `clients` for `dur` and reports both.
pub async fn state_sizes(
    bin: &std::path::Path,
    nodes: usize,
    sizes: &[usize],
    clients: usize,
    dur: Duration,
) -> Result<()> {
    println!(
        "\n# throughput as the state grows ({nodes} node(s), {clients} clients, {} s phases)",
        dur.as_secs_f64()
    );
    let d = start_portmesh(bin, nodes).await?;
    let c = Client::connect(d.leader_addr()).await?;
    let pools = Arc::new(add_scale_pools(&c).await?);
    let mut live = 0;
    let mut first = None;
    for &size in sizes {
        let fill_rate = if size > live {
            println!(
                "  (filling {live} -> {size}: {} ports of this host in TIME_WAIT)",
                ports_in_time_wait()
            );
            let t = Instant::now();
            let cpu = d.members_cpu_ms();
            fill(d.leader_addr(), pools.clone(), live, size).await?;
            let rate = (size - live) as f64 / t.elapsed().as_secs_f64();
            let cpu = (d.members_cpu_ms() - cpu) * 1000.0 / (size - live) as f64;
            live = size;
            format!("{rate:.0}/s (CPU {cpu:.0} ms per 1,000)")
        } else {
            "-".into()
        };
        let cpu = d.members_cpu_ms();
        let p = crate::run_phase(
            crate::System::Portmesh,
            crate::Workload::Fresh,
            d.leader_addr(),
            &d.options,
            clients,
            None,
            dur,
        )
        .await?;
        let cpu = (d.members_cpu_ms() - cpu) * 1000.0 / p.ops.max(1) as f64;
        let base = *first.get_or_insert(p.rate());
        println!(
            "{size:>6} live: fresh ports {fill_rate:>8} (filling to here, {FILL_CLIENTS} clients); sticky-key workload {:>6.0}/s ({:.2}x the empty state), p50 {:.2} ms, CPU {cpu:.0} ms per 1,000",
            p.rate(),
            p.rate() / base,
            p.pct(0.5).as_secs_f64() * 1e3
        );
    }
    Ok(())
}

pub async fn rss_allocations(
    bin: &std::path::Path,
    etcd: Option<&str>,
    nodes: usize,
    n: usize,
) -> Result<()> {
    println!("\n# RSS with {n} live allocations, each under its own lease ({nodes} node(s))");
    let d = start_portmesh(bin, nodes).await?;
    let c = Client::connect(d.leader_addr()).await?;
    let pools = add_scale_pools(&c).await?;
    let before = member_rss(&d);
    println!("(before the fill: {} ports of this host in TIME_WAIT)", ports_in_time_wait());
    let t = Instant::now();
    fill(d.leader_addr(), Arc::new(pools), 0, n).await?;
    // Let follower apply and allocator caches settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = member_rss(&d);
    // Counted after the RSS is read: a `List` of every allocation builds a response as big as
    // the state (~16 MB at 60,000), which the members' allocator keeps, and etcd is asked for
    // no such read.
    let live = c.list(pb::ListRequest::default()).await?.allocations.len();
    println!(
        "portmesh: {live} live allocations in {:.0} s; RSS per member before {} MB, after {} MB",
        t.elapsed().as_secs_f64(),
        fmt_mb(&before),
        fmt_mb(&after)
    );
    drop(d);
    let Some(etcd) = etcd else { return Ok(()) };
    let d = start_etcd(etcd, 0, nodes).await?;
    let before_e = member_rss(&d);
    let t = Instant::now();
    let addr = d.leader_addr().to_string();
    let chans: Arc<Vec<tonic::transport::Channel>> = Arc::new({
        let mut v = Vec::new();
        for _ in 0..FILL_CLIENTS {
            v.push(channel(&addr).await?);
        }
        v
    });
    fan_out(n, move |c, i| {
        let chans = chans.clone();
        async move {
            let ch = chans[c].clone();
            let lease = etcdpb::lease_client::LeaseClient::new(ch.clone())
                .lease_grant(etcdpb::LeaseGrantRequest { ttl: 3600, id: 0 })
                .await?
                .into_inner()
                .id;
            let put = etcdpb::PutRequest {
                key: format!("ports/{i}").into_bytes(),
                value: format!("s{i}").into_bytes(),
                lease,
            };
            etcdpb::kv_client::KvClient::new(ch).put(put).await?;
            Ok(())
        }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_e = member_rss(&d);
    println!(
        "etcd: {n} leased keys in {:.0} s; RSS per member before {} MB, after {} MB",
        t.elapsed().as_secs_f64(),
        fmt_mb(&before_e),
        fmt_mb(&after_e)
    );
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "RSS at {n} leased allocations: portmesh max member {:.1} MB, etcd max member {:.1} MB: {:.2}×",
        max(&after),
        max(&after_e),
        max(&after) / max(&after_e)
    );
    Ok(())
}

pub async fn soak(bin: &std::path::Path, nodes: usize, n: usize, ttl: Duration, secs: f64) -> Result<()> {
    println!(
        "\n# lease soak: {n} leases, TTL {} s, each renewed every TTL/3 for {secs:.0} s ({nodes} node(s))",
        ttl.as_secs()
    );
    let d = start_portmesh(bin, nodes).await?;
    let c = Client::connect(d.leader_addr()).await?;
    let addr = d.leader_addr().to_string();
    // Count expiries from before the first grant on (the history kept is shorter than the grants).
    let expired = Arc::new(AtomicU64::new(0));
    let mut stream = c.watch(pb::WatchRequest::default()).await?;
    let watch_expired = expired.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(Some(m)) = stream.message().await {
            let e = m.events.iter().filter(|e| e.r#type == pb::EventType::LeaseExpired as i32).count();
            watch_expired.fetch_add(e as u64, Ordering::Relaxed);
        }
    });
    // Granted ids, in grant order; the renewers pick them up as they come, so every lease is
    // renewed within TTL/3 of its grant even while the others are still being granted.
    let ids: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let lost = Arc::new(AtomicU64::new(0));
    let renewed = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let deadline = t + Duration::from_secs_f64(secs);
    let period = ttl / 3;
    let mut tasks = Vec::new();
    for s in 0..SOAK_STREAMS {
        let (lost, renewed, ids) = (lost.clone(), renewed.clone(), ids.clone());
        let ch = channel(&addr).await?;
        tasks.push(tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(1024);
            // The server sends the response headers with its first reply: open the stream with
            // a renewal of lease 0 (answered "gone", not counted).
            tx.send(pb::LeaseKeepAliveRequest { team: "default".into(), lease_id: 0 }).await?;
            let mut replies =
                pb::leases_client::LeasesClient::new(ch).keep_alive(ChannelStream(rx)).await?.into_inner();
            let reader = tokio::spawn(async move {
                while let Ok(Some(r)) = replies.message().await {
                    if r.lease_id == 0 {
                        continue;
                    }
                    renewed.fetch_add(1, Ordering::Relaxed);
                    if r.ttl_ms == 0 {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            // Each cycle renews this stream's share of the leases granted so far, spread over
            // the first half of the period in 20 slices.
            let slices = 20u32;
            while Instant::now() < deadline {
                let cycle = Instant::now();
                let mine: Vec<u64> = ids
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .skip(s)
                    .step_by(SOAK_STREAMS)
                    .copied()
                    .collect();
                for chunk in mine.chunks(mine.len().div_ceil(slices as usize).max(1)) {
                    for id in chunk {
                        tx.send(pb::LeaseKeepAliveRequest { team: "default".into(), lease_id: *id }).await?;
                    }
                    tokio::time::sleep(period / 2 / slices).await;
                }
                tokio::time::sleep(period.saturating_sub(cycle.elapsed())).await;
            }
            drop(tx);
            let _ = reader.await;
            Ok::<(), anyhow::Error>(())
        }));
    }
    {
        let ids = ids.clone();
        let clients = fill_clients(&addr).await?;
        fan_out(n, move |c, _| {
            let (ids, clients) = (ids.clone(), clients.clone());
            async move {
                let l = clients[c]
                    .grant_lease(pb::LeaseGrantRequest {
                        team: "default".into(),
                        ttl_ms: ttl.as_millis() as u64,
                    })
                    .await?;
                ids.lock().unwrap_or_else(|p| p.into_inner()).push(l.id);
                Ok(())
            }
        })
        .await?;
    }
    println!("granted {n} leases in {:.0} s (renewals running meanwhile)", t.elapsed().as_secs_f64());
    let first = ids.lock().unwrap_or_else(|p| p.into_inner()).first().copied().unwrap_or(0);
    // The members' CPU while every lease is only kept alive: renewals and the leader's countdown.
    let (cpu_from, cpu_at) = (d.members_cpu_ms(), Instant::now());
    let mut peak = vec![0.0f64; d.addrs.len()];
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let rss = member_rss(&d);
        for (p, now) in peak.iter_mut().zip(&rss) {
            *p = p.max(*now);
        }
        println!(
            "  {:>4.0} s: {} renewals, {} answered gone, {} LEASE_EXPIRED events; RSS {} MB",
            secs - deadline.saturating_duration_since(Instant::now()).as_secs_f64(),
            renewed.load(Ordering::Relaxed),
            lost.load(Ordering::Relaxed),
            expired.load(Ordering::Relaxed),
            fmt_mb(&rss)
        );
    }
    let cpu_per_s = (d.members_cpu_ms() - cpu_from) / cpu_at.elapsed().as_secs_f64();
    let hwm: Vec<f64> = (0..d.addrs.len()).map(|i| hwm_kb(d.pid(i)) as f64 / 1024.0).collect();
    for t in tasks {
        t.await??;
    }
    // Let the last events arrive; the leases themselves run out one TTL after their last renewal.
    tokio::time::sleep(Duration::from_secs(2)).await;
    watcher.abort();
    let still =
        c.time_to_live(pb::LeaseTimeToLiveRequest { team: "default".into(), lease_id: first }).await.is_ok();
    println!(
        "soak: {} renewals over {secs:.0} s ({:.0}/s); {} answered gone; {} LEASE_EXPIRED events while \
         every lease was kept ({} at the end); peak RSS per member {} MB sampled, {} MB high-water \
         mark (granting included); members' CPU while keeping them {cpu_per_s:.0} ms/s",
        renewed.load(Ordering::Relaxed),
        renewed.load(Ordering::Relaxed) as f64 / secs,
        lost.load(Ordering::Relaxed),
        expired.load(Ordering::Relaxed),
        if still { "first lease still live" } else { "first lease gone" },
        fmt_mb(&peak),
        fmt_mb(&hwm)
    );
    Ok(())
}

/// Delivery latencies and count of one fan-out phase.
struct FanOut {
    lat_ms: Vec<f64>,
    /// Median of (received − write acknowledged): negative when watchers see the change before
    /// the writer hears back.
    after_ack_p50: f64,
    deliveries: u64,
    secs: f64,
    writes: usize,
}

impl FanOut {
    fn pct(&self, p: f64) -> f64 {
        if self.lat_ms.is_empty() {
            return f64::NAN;
        }
        self.lat_ms[((self.lat_ms.len() as f64 - 1.0) * p).round() as usize]
    }
}

/// One fan-out phase's figures: deliveries/s, delivery p50 and p99 in ms.
type FanRow = (f64, f64, f64);

/// Per write revision: when the write was sent and when it was acknowledged.
type Sent = Arc<std::sync::Mutex<HashMap<i64, (Instant, Instant)>>>;

/// One watcher's deliveries: (revision, when received).
type Seen = Arc<std::sync::Mutex<Vec<(i64, Instant)>>>;

/// Connections for watchers: watcher `w` goes to member `w % members`, and each member's
/// watchers share one connection per `WATCHERS_PER_CHANNEL`.
#[derive(Default)]
struct WatcherChannels(HashMap<(usize, usize), tonic::transport::Channel>);

impl WatcherChannels {
    async fn for_watcher(&mut self, d: &Deployment, w: usize) -> Result<tonic::transport::Channel> {
        let member = w % d.addrs.len();
        let key = (member, w / d.addrs.len() / WATCHERS_PER_CHANNEL);
        if let Some(ch) = self.0.get(&key) {
            return Ok(ch.clone());
        }
        let ch = channel(&d.addrs[member]).await?;
        self.0.insert(key, ch.clone());
        Ok(ch)
    }
}

async fn portmesh_fanout(d: &Deployment, watchers: usize, dur: Duration) -> Result<FanOut> {
    let mut seen: Vec<Seen> = Vec::new();
    let mut tasks = Vec::new();
    let mut chans = WatcherChannels::default();
    for w in 0..watchers {
        let ch = chans.for_watcher(d, w).await?;
        let mut stream = pb::watch_client::WatchClient::new(ch)
            .watch(pb::WatchRequest { from_revision: 0, ..Default::default() })
            .await?
            .into_inner();
        let mine = Seen::default();
        seen.push(mine.clone());
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(m)) = stream.message().await {
                let now = Instant::now();
                mine.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(m.events.iter().map(|e| (e.revision as i64, now)));
            }
        }));
    }
    let client = Client::connect(d.leader_addr()).await?;
    let sent: Sent = Arc::default();
    let start = Instant::now();
    let mut writes = 0usize;
    let port = 64_000u16;
    while start.elapsed() < dur {
        let t0 = Instant::now();
        let rev = if writes.is_multiple_of(2) {
            client.reserve(pb::ReserveRequest { port: port.into(), reason: "fan-out".into() }).await?.revision
        } else {
            client.unreserve(pb::UnreserveRequest { port: port.into() }).await?.revision
        };
        sent.lock().unwrap_or_else(|p| p.into_inner()).insert(rev as i64, (t0, Instant::now()));
        writes += 1;
    }
    finish(tasks, seen, sent, start, writes).await
}

async fn finish(
    tasks: Vec<tokio::task::JoinHandle<()>>,
    seen: Vec<Seen>,
    sent: Sent,
    start: Instant,
    writes: usize,
) -> Result<FanOut> {
    let secs = start.elapsed().as_secs_f64();
    // Wait until every watcher has the last write (at most 10 s: a watcher that fell that far
    // behind is reported by its missing deliveries), then stop them.
    let last = sent.lock().unwrap_or_else(|p| p.into_inner()).keys().max().copied();
    let caught_up = |w: &Seen| {
        let got = w.lock().unwrap_or_else(|p| p.into_inner()).last().map(|(rev, _)| *rev);
        got >= last
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.iter().all(caught_up) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    let sent = sent.lock().unwrap_or_else(|p| p.into_inner());
    let mut lat_ms = Vec::new();
    let mut after_ack_ms = Vec::new();
    for w in &seen {
        for (rev, at) in w.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if let Some((t0, acked)) = sent.get(rev) {
                lat_ms.push(at.saturating_duration_since(*t0).as_secs_f64() * 1e3);
                let signed = at.saturating_duration_since(*acked).as_secs_f64()
                    - acked.saturating_duration_since(*at).as_secs_f64();
                after_ack_ms.push(signed * 1e3);
            }
        }
    }
    lat_ms.sort_by(f64::total_cmp);
    Ok(FanOut { deliveries: lat_ms.len() as u64, lat_ms, after_ack_p50: median(after_ack_ms), secs, writes })
}

async fn etcd_fanout(d: &Deployment, watchers: usize, dur: Duration) -> Result<FanOut> {
    let mut seen: Vec<Seen> = Vec::new();
    let mut tasks = Vec::new();
    let mut chans = WatcherChannels::default();
    for w in 0..watchers {
        let ch = chans.for_watcher(d, w).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let create = etcdpb::WatchRequest {
            request_union: Some(etcdpb::watch_request::RequestUnion::CreateRequest(
                etcdpb::WatchCreateRequest {
                    key: b"fan/".to_vec(),
                    range_end: b"fan0".to_vec(),
                    start_revision: 0,
                    progress_notify: false,
                },
            )),
        };
        tx.send(create).await.map_err(|_| anyhow::anyhow!("watch request channel closed"))?;
        let mut stream =
            etcdpb::watch_client::WatchClient::new(ch).watch(ChannelStream(rx)).await?.into_inner();
        // Wait for `created`, so no write happens before the watch exists.
        match stream.message().await? {
            Some(r) if r.created => {}
            other => bail!("etcd did not create the watch: {other:?}"),
        }
        let mine = Seen::default();
        seen.push(mine.clone());
        tasks.push(tokio::spawn(async move {
            let _keep_open = tx;
            while let Ok(Some(m)) = stream.message().await {
                let now = Instant::now();
                mine.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(m.events.iter().filter_map(|e| e.kv.as_ref()).map(|kv| (kv.mod_revision, now)));
            }
        }));
    }
    let mut kv = etcdpb::kv_client::KvClient::new(channel(d.leader_addr()).await?);
    let sent: Sent = Arc::default();
    let start = Instant::now();
    let mut writes = 0usize;
    while start.elapsed() < dur {
        let t0 = Instant::now();
        let put =
            etcdpb::PutRequest { key: b"fan/x".to_vec(), value: writes.to_string().into_bytes(), lease: 0 };
        let rev = kv.put(put).await?.into_inner().header.map_or(0, |h| h.revision);
        sent.lock().unwrap_or_else(|p| p.into_inner()).insert(rev, (t0, Instant::now()));
        writes += 1;
    }
    finish(tasks, seen, sent, start, writes).await
}

pub async fn watch_fanout(
    bin: &std::path::Path,
    etcd: Option<&str>,
    nodes: usize,
    watchers: &[usize],
    rounds: usize,
    dur: Duration,
) -> Result<()> {
    println!(
        "\n# watch fan-out: watchers spread over {nodes} member(s), one writer of single-event changes, {} s",
        dur.as_secs_f64()
    );
    // (system, watchers) → per round: deliveries/s, p50 ms, p99 ms.
    let mut rows: HashMap<(&str, usize), Vec<FanRow>> = HashMap::new();
    for round in 0..rounds.max(1) {
        let mut order = vec!["portmesh"];
        if etcd.is_some() {
            order.push("etcd");
        }
        if round % 2 == 1 {
            order.reverse();
        }
        for system in order {
            for &w in watchers {
                let f = if system == "portmesh" {
                    let d = start_portmesh(bin, nodes).await?;
                    portmesh_fanout(&d, w, dur).await?
                } else {
                    let d = start_etcd(etcd.unwrap_or("etcd"), round, nodes).await?;
                    etcd_fanout(&d, w, dur).await?
                };
                let per_s = f.deliveries as f64 / f.secs;
                println!(
                    "round {} {system:<8} watchers {w:>4}: {} writes, {} deliveries ({:.0}/s, {:.0}% of writes × watchers), \
                     delivery p50 {:.2} ms p99 {:.2} ms (p50 after the write's ack {:+.2} ms)",
                    round + 1,
                    f.writes,
                    f.deliveries,
                    per_s,
                    100.0 * f.deliveries as f64 / (f.writes * w).max(1) as f64,
                    f.pct(0.5),
                    f.pct(0.99),
                    f.after_ack_p50
                );
                rows.entry((system, w)).or_default().push((per_s, f.pct(0.5), f.pct(0.99)));
            }
        }
    }
    println!(
        "\n| watchers | portmesh deliveries/s | etcd deliveries/s | portmesh p50 / p99 ms | etcd p50 / p99 ms | p50 ratio |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for &w in watchers {
        let pm = rows.get(&("portmesh", w)).cloned().unwrap_or_default();
        let et = rows.get(&("etcd", w)).cloned().unwrap_or_default();
        let col = |v: &[FanRow], f: fn(&FanRow) -> f64| median(v.iter().map(f).collect());
        let ratios: Vec<f64> = pm.iter().zip(&et).map(|(a, b)| a.1 / b.1).collect();
        println!(
            "| {w} | {:.0} | {:.0} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2}× |",
            col(&pm, |r| r.0),
            col(&et, |r| r.0),
            col(&pm, |r| r.1),
            col(&pm, |r| r.2),
            col(&et, |r| r.1),
            col(&et, |r| r.2),
            median(ratios)
        );
    }
    Ok(())
}
