//! `portmesh-bench`: measures portmesh (one node, or a 3-node cluster) against etcd (Debian's
//! `etcd-server`, as many members) doing the same work, in alternating rounds of one run, and
//! prints figures and median ratios.
//!
//! Workloads, per client, in a loop until the phase ends:
//! - `fresh`: take a port under a fresh lease, then give it back by revoking the lease.
//!   portmesh: `Allocate` (sticky key per client, new lease in the same request), `Revoke`.
//!   etcd: `LeaseGrant`, `Txn` put-if-absent of `ports/<n>` attached to the lease (trying the
//!   next number if taken), `LeaseRevoke`.
//! - `reused`: each client holds one lease for the whole phase; take a port attached to it, then
//!   release it. portmesh: `Allocate` with `lease_id`, `Release`. etcd: the `Txn` above with the
//!   client's lease, `DeleteRange`.
//! - etcd `put` (1 client): a plain `Put`, the cheapest durable write etcd has: the floor any
//!   allocation is compared with.
//!
//! Latency is the time to hold a port (portmesh: one RPC; etcd fresh: grant + txn). Throughput
//! counts completed allocations per second. With `--failover N` (3 nodes), the leader of a
//! loaded portmesh cluster is killed N times and the time to the first acknowledged write after
//! the kill is reported. Nothing here asserts a speed: it reports.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use portmesh_client::{Client, pb};

mod scale;

#[allow(clippy::all, missing_debug_implementations, rust_2018_idioms)]
mod etcdpb {
    tonic::include_proto!("etcdserverpb");
}

#[derive(Debug, Parser)]
#[command(name = "portmesh-bench", about = "Benchmark portmesh against etcd, same run, alternating rounds")]
struct Args {
    /// The portmesh binary to benchmark (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/portmesh")]
    portmesh: PathBuf,
    /// The etcd binary for the baseline; `off` to skip it.
    #[arg(long, default_value = "etcd")]
    etcd: String,
    /// Nodes per cluster (portmesh nodes and etcd members): 1 or 3.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Rounds; each runs both systems, in alternating order.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per phase (one workload at one concurrency level of one system).
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Workloads: `fresh` (a new lease per allocation), `reused` (one lease per client),
    /// `keepalive` (lease renewals: each client renews 100 leases on one stream, 32 in flight;
    /// an op is one renewal); `none` to run only the scale benchmarks below.
    #[arg(long, value_delimiter = ',', default_value = "fresh")]
    workloads: Vec<String>,
    /// Kill the leader of a loaded 3-node portmesh cluster this many times and report the time
    /// to the first acknowledged write after each kill.
    #[arg(long, default_value_t = 0)]
    failover: usize,
    /// Also compare a one-shot `portmesh alloc` with an empty Rust binary using `hyperfine -N`.
    #[arg(long)]
    startup: bool,
    /// The developer workflow: `portmesh run -- /bin/true` against /bin/true and an empty Rust
    /// binary (`hyperfine -N`), and `portmesh up -d` of a 5-service stack (--rounds x 3 times).
    #[arg(long)]
    workflow: bool,
    /// Lease soak: grant this many leases and renew each every TTL/3 for --soak-secs, counting
    /// renewals answered "gone" and expiry events (portmesh only).
    #[arg(long, default_value_t = 0)]
    soak: usize,
    #[arg(long, default_value_t = 600.0)]
    soak_secs: f64,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    soak_ttl: Duration,
    /// Memory: this many live allocations, each under its own lease, on both systems (at most
    /// 64,512: one port each).
    #[arg(long, default_value_t = 0)]
    rss_allocations: usize,
    /// Watch fan-out at these numbers of watchers (e.g. 100,1000), --rounds rounds of --secs.
    #[arg(long, value_delimiter = ',')]
    watchers: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Portmesh,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Portmesh => "portmesh",
            System::Etcd => "etcd",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    Fresh,
    Reused,
    Put,
    KeepAlive,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Fresh => "fresh",
            Workload::Reused => "reused",
            Workload::Put => "put",
            Workload::KeepAlive => "keepalive",
        }
    }

    fn parse(s: &str) -> Result<Workload> {
        match s {
            "fresh" => Ok(Workload::Fresh),
            "reused" => Ok(Workload::Reused),
            "keepalive" => Ok(Workload::KeepAlive),
            other => bail!("unknown workload {other:?}: fresh, reused or keepalive"),
        }
    }
}

/// A cluster of server processes, each with its own fresh data directory.
struct Deployment {
    children: Vec<Option<Child>>,
    /// Client addresses of the members, in start order.
    addrs: Vec<String>,
    /// The member clients send to (the leader).
    leader: usize,
    _dir: tempfile::TempDir,
}

impl Deployment {
    fn leader_addr(&self) -> &str {
        &self.addrs[self.leader]
    }

    fn pid(&self, i: usize) -> u32 {
        self.children[i].as_ref().map_or(0, Child::id)
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
        if std::env::var_os("PORTMESH_BENCH_KEEP").is_some() {
            // Leave the logs for a look after the run (PORTMESH_BENCH_KEEP set).
            let dir = std::mem::replace(
                &mut self._dir,
                tempfile::TempDir::new().unwrap_or_else(|_| std::process::abort()),
            );
            let _ = dir.keep();
        }
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `nodes` portmesh processes on loopback: the first bootstraps, the others join it.
async fn start_portmesh(bin: &Path, nodes: usize) -> Result<Deployment> {
    let dir = tempfile::tempdir()?;
    if std::env::var_os("PORTMESH_BENCH_KEEP").is_some() {
        println!("(node logs and data in {})", dir.path().display());
    }
    let mut children = Vec::new();
    let mut addrs: Vec<String> = Vec::new();
    for i in 0..nodes {
        let home = dir.path().join(format!("node{i}"));
        std::fs::create_dir_all(&home)?;
        let log = std::fs::File::create(home.join("node.log"))?;
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(home.join("data"))
            .arg("--home")
            .arg(&home);
        match addrs.first() {
            None => cmd.arg("--bootstrap"),
            Some(first) => cmd.args(["--join", first]),
        };
        let child = cmd
            .env("PORTMESH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        children.push(Some(child));
        let addr = wait_for("portmesh to record its address", || {
            let home = home.clone();
            async move {
                let v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(home.join("node.json")).ok()?).ok()?;
                v["grpc"].as_str().map(str::to_string)
            }
        })
        .await?;
        addrs.push(addr);
    }
    let c = Client::connect(&addrs[0]).await?;
    c.add_pool(pb::AddPoolRequest {
        team: "default".into(),
        name: "bench".into(),
        ranges: vec![pb::PortRange { start: 20000, end: 29999 }],
    })
    .await?;
    let s = c.status().await?;
    let leader_addr =
        s.members.iter().find(|m| m.id == s.leader_id).map(|m| m.addr.clone()).unwrap_or_default();
    let leader = addrs.iter().position(|a| *a == leader_addr).unwrap_or(0);
    Ok(Deployment { children: children.into_iter().collect(), addrs, leader, _dir: dir })
}

/// `nodes` etcd members on loopback, started together as one cluster.
async fn start_etcd(bin: &str, round: usize, nodes: usize) -> Result<Deployment> {
    let dir = tempfile::tempdir()?;
    let mut ports = Vec::new();
    for _ in 0..nodes {
        ports.push((free_port()?, free_port()?));
    }
    let initial: Vec<String> =
        ports.iter().enumerate().map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}")).collect();
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    for (i, (cport, pport)) in ports.iter().enumerate() {
        let client_url = format!("http://127.0.0.1:{cport}");
        let peer_url = format!("http://127.0.0.1:{pport}");
        let log = std::fs::File::create(dir.path().join(format!("etcd{i}.log")))?;
        let child = Command::new(bin)
            .args(["--name", &format!("m{i}"), "--data-dir"])
            .arg(dir.path().join(format!("data{i}")))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", &format!("portmesh-bench-{round}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {bin} (install Debian's etcd-server, or pass --etcd off)"))?;
        children.push(Some(child));
        addrs.push(format!("127.0.0.1:{cport}"));
    }
    // The member whose id is the leader's, as every member's status reports it.
    let leader = wait_for("etcd to elect a leader", || {
        let addrs = addrs.clone();
        async move {
            let mut leader_id = None;
            let mut ids = Vec::new();
            for a in &addrs {
                let ch = tonic::transport::Endpoint::from_shared(format!("http://{a}"))
                    .ok()?
                    .connect()
                    .await
                    .ok()?;
                let s = etcdpb::maintenance_client::MaintenanceClient::new(ch)
                    .status(etcdpb::StatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                if s.leader == 0 {
                    return None;
                }
                leader_id = Some(s.leader);
                ids.push(s.header?.member_id);
            }
            ids.iter().position(|id| Some(*id) == leader_id)
        }
    })
    .await?;
    Ok(Deployment { children, addrs, leader, _dir: dir })
}

/// Latencies and count of one phase.
struct Phase {
    ops: usize,
    elapsed: Duration,
    lat: Vec<Duration>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn pct(&self, p: f64) -> Duration {
        if self.lat.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.lat.len() as f64 - 1.0) * p).round() as usize;
        self.lat[i]
    }
}

async fn run_phase(
    system: System,
    work: Workload,
    addr: &str,
    clients: usize,
    dur: Duration,
) -> Result<Phase> {
    let deadline = Instant::now() + dur;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let addr = addr.to_string();
        tasks.push(tokio::spawn(async move {
            match system {
                System::Portmesh => portmesh_client_loop(&addr, work, c, deadline).await,
                System::Etcd => etcd_client_loop(&addr, work, c, deadline).await,
            }
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = start.elapsed();
    lat.sort_unstable();
    Ok(Phase { ops: lat.len(), elapsed, lat })
}

/// Leases each keep-alive client renews, and renewals it keeps in flight on its stream.
const KEEPALIVE_LEASES: usize = 100;
const KEEPALIVE_WINDOW: usize = 32;

/// A request stream fed by a channel (what tonic's streaming calls take).
struct ChannelStream<T>(tokio::sync::mpsc::Receiver<T>);

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
fn prefill<Req>(
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
async fn keepalive_loop<Req, Resp>(
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

async fn portmesh_keepalive(addr: &str, deadline: Instant) -> Result<Vec<Duration>> {
    let client = Client::connect(addr).await?;
    let mut ids = Vec::new();
    for _ in 0..KEEPALIVE_LEASES {
        ids.push(
            client
                .grant_lease(pb::LeaseGrantRequest {
                    team: "default".into(),
                    ttl_ms: Duration::from_secs(600).as_millis() as u64,
                })
                .await?
                .id as i64,
        );
    }
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let (tx, rx) = tokio::sync::mpsc::channel(KEEPALIVE_WINDOW);
    let req = |id: i64| pb::LeaseKeepAliveRequest { team: "default".into(), lease_id: id as u64 };
    let sent = prefill(&tx, &ids, req)?;
    let replies = pb::leases_client::LeasesClient::new(ch).keep_alive(ChannelStream(rx)).await?.into_inner();
    keepalive_loop(ids, req, tx, replies, sent, |r| r.ttl_ms > 0, deadline).await
}

async fn etcd_keepalive(addr: &str, deadline: Instant) -> Result<Vec<Duration>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut leases = etcdpb::lease_client::LeaseClient::new(ch);
    let mut ids = Vec::new();
    for _ in 0..KEEPALIVE_LEASES {
        ids.push(leases.lease_grant(etcdpb::LeaseGrantRequest { ttl: 600, id: 0 }).await?.into_inner().id);
    }
    let (tx, rx) = tokio::sync::mpsc::channel(KEEPALIVE_WINDOW);
    let req = |id: i64| etcdpb::LeaseKeepAliveRequest { id };
    let sent = prefill(&tx, &ids, req)?;
    let replies = leases.lease_keep_alive(ChannelStream(rx)).await?.into_inner();
    keepalive_loop(ids, req, tx, replies, sent, |r| r.ttl > 0, deadline).await
}

async fn portmesh_client_loop(
    addr: &str,
    work: Workload,
    c: usize,
    deadline: Instant,
) -> Result<Vec<Duration>> {
    if work == Workload::KeepAlive {
        return portmesh_keepalive(addr, deadline).await;
    }
    let client = Client::connect(addr).await?;
    let held = match work {
        Workload::Reused => {
            client
                .grant_lease(pb::LeaseGrantRequest {
                    team: "default".into(),
                    ttl_ms: Duration::from_secs(600).as_millis() as u64,
                })
                .await?
                .id
        }
        _ => 0,
    };
    let mut lat = Vec::new();
    while Instant::now() < deadline {
        let t0 = Instant::now();
        let r = client
            .allocate(pb::AllocateRequest {
                items: vec![pb::AllocItem {
                    service: format!("bench-{c}"),
                    pool: "bench".into(),
                    key: format!("bench/{c}"),
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

async fn etcd_client_loop(addr: &str, work: Workload, c: usize, deadline: Instant) -> Result<Vec<Duration>> {
    if work == Workload::KeepAlive {
        return etcd_keepalive(addr, deadline).await;
    }
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut kv = etcdpb::kv_client::KvClient::new(ch.clone());
    let mut leases = etcdpb::lease_client::LeaseClient::new(ch);
    let held = match work {
        Workload::Reused => {
            leases.lease_grant(etcdpb::LeaseGrantRequest { ttl: 600, id: 0 }).await?.into_inner().id
        }
        _ => 0,
    };
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

/// Kills the leader of a 3-node portmesh cluster under a steady writer and measures the time
/// from the kill to the first write acknowledged after it.
async fn failover_once(bin: &Path, nodes: usize) -> Result<Duration> {
    let mut d = start_portmesh(bin, nodes).await?;
    let addrs = d.addrs.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let writer = tokio::spawn(async move {
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let Ok(client) = Client::connect_any(&refs).await else { return };
        for i in 0.. {
            let req = pb::AllocateRequest {
                items: vec![pb::AllocItem {
                    service: "failover".into(),
                    pool: "bench".into(),
                    key: format!("failover/{i}"),
                    ..Default::default()
                }],
                ..Default::default()
            };
            if client.allocate(req).await.is_ok() && tx.send(Instant::now()).is_err() {
                return;
            }
        }
    });
    // Let the writer get going, then kill the leader.
    rx.recv().await.context("the writer never wrote")?;
    let killed = Instant::now();
    let leader = d.leader;
    d.kill(leader);
    let first = loop {
        let t = rx.recv().await.context("the writer stopped")?;
        if t > killed {
            break t;
        }
    };
    writer.abort();
    Ok(first - killed)
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One phase's figures: allocations per second, then p50, p90 and p99 latency in ms.
type Row = (f64, f64, f64, f64);

#[derive(Default)]
struct Results {
    /// (system, workload, clients) -> one row per round
    rows: std::collections::BTreeMap<(&'static str, Workload, usize), Vec<Row>>,
    idle_rss_kb: Vec<u64>,
    loaded_rss_kb: Vec<u64>,
    etcd_rss_kb: Vec<u64>,
    entries_per_fsync: Vec<f64>,
    commands_per_fsync: Vec<f64>,
    data_bytes: Vec<u64>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dur = Duration::from_secs_f64(args.secs);
    let with_etcd = args.etcd != "off";
    let workloads: Vec<Workload> =
        args.workloads.iter().filter(|w| *w != "none").map(|w| Workload::parse(w)).collect::<Result<_>>()?;
    if workloads.is_empty() {
        return scale_runs(&args, dur).await;
    }
    let max_clients = args.clients.iter().copied().max().unwrap_or(1);
    let mut res = Results::default();
    println!(
        "# portmesh-bench: {} node(s) each, {} round(s), {}s per phase, clients {:?}, workloads {:?}",
        args.nodes, args.rounds, args.secs, args.clients, args.workloads
    );
    for round in 0..args.rounds {
        let mut order = vec![System::Portmesh];
        if with_etcd {
            order.push(System::Etcd);
        }
        if round % 2 == 1 {
            order.reverse();
        }
        for system in order {
            let d = match system {
                System::Portmesh => start_portmesh(&args.portmesh, args.nodes).await?,
                System::Etcd => start_etcd(&args.etcd, round, args.nodes).await?,
            };
            let pid = d.pid(d.leader);
            if system == System::Portmesh {
                tokio::time::sleep(Duration::from_secs(1)).await; // let start-up settle
                res.idle_rss_kb.push(rss_kb(pid));
            }
            let mut phases: Vec<(Workload, usize)> =
                workloads.iter().flat_map(|w| args.clients.iter().map(move |c| (*w, *c))).collect();
            if system == System::Etcd {
                phases.push((Workload::Put, 1));
            }
            for (work, c) in phases {
                let before = match system {
                    System::Portmesh => Some(Client::connect(d.leader_addr()).await?.status().await?),
                    System::Etcd => None,
                };
                let p = run_phase(system, work, d.leader_addr(), c, dur).await?;
                println!(
                    "round {} {:<8} {:<6} clients {:>3}: {:>8.0} op/s  p50 {} ms  p90 {} ms  p99 {} ms  ({} ops)",
                    round + 1,
                    system.name(),
                    work.name(),
                    c,
                    p.rate(),
                    ms(p.pct(0.5)),
                    ms(p.pct(0.9)),
                    ms(p.pct(0.99)),
                    p.ops
                );
                res.rows.entry((system.name(), work, c)).or_default().push((
                    p.rate(),
                    p.pct(0.5).as_secs_f64() * 1e3,
                    p.pct(0.9).as_secs_f64() * 1e3,
                    p.pct(0.99).as_secs_f64() * 1e3,
                ));
                if let Some(b) = before {
                    let a = Client::connect(d.leader_addr()).await?.status().await?;
                    let f = a.fsyncs.saturating_sub(b.fsyncs);
                    if c == max_clients && work == workloads[0] && f > 0 {
                        let e = a.entries_flushed.saturating_sub(b.entries_flushed) as f64 / f as f64;
                        let k = a.commands_applied.saturating_sub(b.commands_applied) as f64 / f as f64;
                        println!(
                            "round {} portmesh clients {c:>3}: {e:.1} log entries and {k:.1} commands per fsync (leader)",
                            round + 1
                        );
                        res.entries_per_fsync.push(e);
                        res.commands_per_fsync.push(k);
                    }
                    res.data_bytes.push(a.data_size_bytes);
                }
            }
            match system {
                System::Portmesh => res.loaded_rss_kb.push(rss_kb(pid)),
                System::Etcd => res.etcd_rss_kb.push(rss_kb(pid)),
            }
        }
    }

    println!("\n# medians over {} round(s), {} node(s) each", args.rounds, args.nodes);
    println!(
        "| workload | clients | portmesh alloc/s | etcd alloc/s | ratio | portmesh p50/p90/p99 ms | etcd p50/p90/p99 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let col = |v: &[Row], f: fn(&Row) -> f64| median(v.iter().map(f).collect());
    for w in &workloads {
        for &c in &args.clients {
            let pm = res.rows.get(&("portmesh", *w, c)).cloned().unwrap_or_default();
            let et = res.rows.get(&("etcd", *w, c)).cloned().unwrap_or_default();
            // Ratio of medians over per-round ratios: same-round pairs cancel the machine's noise.
            let ratios: Vec<f64> = pm.iter().zip(&et).map(|(a, b)| a.0 / b.0).collect();
            println!(
                "| {} | {c} | {:.0} | {:.0} | {:.2}× | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} / {:.2} |",
                w.name(),
                col(&pm, |r| r.0),
                col(&et, |r| r.0),
                median(ratios),
                col(&pm, |r| r.1),
                col(&pm, |r| r.2),
                col(&pm, |r| r.3),
                col(&et, |r| r.1),
                col(&et, |r| r.2),
                col(&et, |r| r.3),
            );
        }
    }
    if let (Some(pm), Some(put)) =
        (res.rows.get(&("portmesh", Workload::Fresh, 1)), res.rows.get(&("etcd", Workload::Put, 1)))
    {
        let ratios: Vec<f64> = pm.iter().zip(put).map(|(a, b)| a.1 / b.1).collect();
        println!(
            "\n1 client: portmesh allocation p50 {:.2} ms vs etcd put p50 {:.2} ms: {:.2}× (median of per-round ratios)",
            col(pm, |r| r.1),
            col(put, |r| r.1),
            median(ratios)
        );
    }
    let mb = |v: &[u64]| median(v.iter().map(|k| *k as f64 / 1024.0).collect());
    println!(
        "\nportmesh leader idle RSS: {:.1} MB; after load: {:.1} MB",
        mb(&res.idle_rss_kb),
        mb(&res.loaded_rss_kb)
    );
    if with_etcd {
        println!("etcd leader RSS after load: {:.1} MB", mb(&res.etcd_rss_kb));
    }
    println!(
        "portmesh at {max_clients} clients: {:.1} log entries per fsync, {:.1} commands per fsync",
        median(res.entries_per_fsync.clone()),
        median(res.commands_per_fsync.clone())
    );
    println!(
        "portmesh leader data dir after a round: {:.1} MB",
        median(res.data_bytes.iter().map(|b| *b as f64 / 1e6).collect())
    );
    if args.failover > 0 {
        if args.nodes < 3 {
            bail!("--failover needs --nodes 3");
        }
        let mut times = Vec::new();
        for i in 0..args.failover {
            let t = failover_once(&args.portmesh, args.nodes).await?;
            println!("failover {}: first acknowledged write {} ms after the leader was killed", i + 1, ms(t));
            times.push(t.as_secs_f64() * 1e3);
        }
        println!("failover: median {:.0} ms over {} kills", median(times), args.failover);
    }
    scale_runs(&args, dur).await
}

/// The start-up, workflow, lease and watch scale benchmarks asked for (see `scale.rs`).
async fn scale_runs(args: &Args, dur: Duration) -> Result<()> {
    if args.startup {
        startup(&args.portmesh).await?;
    }
    if args.workflow {
        workflow(&args.portmesh, args.rounds * 3).await?;
    }
    let etcd = (args.etcd != "off").then_some(args.etcd.as_str());
    if args.rss_allocations > 0 {
        scale::rss_allocations(&args.portmesh, etcd, args.nodes, args.rss_allocations).await?;
    }
    if !args.watchers.is_empty() {
        scale::watch_fanout(&args.portmesh, etcd, args.nodes, &args.watchers, args.rounds, dur).await?;
    }
    if args.soak > 0 {
        scale::soak(&args.portmesh, args.nodes, args.soak, args.soak_ttl, args.soak_secs).await?;
    }
    Ok(())
}

/// Builds `fn main() {}` with rustc -O in `dir`: the start-up cost of any Rust binary.
fn build_empty(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("empty.rs");
    std::fs::write(&src, "fn main() {}\n")?;
    let empty = dir.join("empty");
    let ok = Command::new("rustc").args(["-O", "-o"]).arg(&empty).arg(&src).status()?.success();
    if !ok {
        bail!("rustc could not build the empty binary");
    }
    Ok(empty)
}

/// Runs `hyperfine -N` on `commands` (with `home` as PORTMESH_HOME); the mean of each, in ms.
fn hyperfine(dir: &Path, home: &Path, commands: &[String]) -> Result<Vec<f64>> {
    let json = dir.join("hyperfine.json");
    let status = Command::new("hyperfine")
        .args(["-N", "--warmup", "20", "--runs", "300", "--export-json"])
        .arg(&json)
        .args(commands)
        .env("PORTMESH_HOME", home)
        .status()
        .context("running hyperfine (install Debian's hyperfine)")?;
    if !status.success() {
        bail!("hyperfine failed");
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    Ok((0..commands.len()).map(|i| v["results"][i]["mean"].as_f64().unwrap_or(f64::NAN) * 1e3).collect())
}

/// `portmesh run -- /bin/true` (its cost over /bin/true, against an empty Rust binary's start-up)
/// and `portmesh up -d` of five services that are ready at once, against a warm node.
async fn workflow(bin: &Path, ups: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let empty = build_empty(dir.path())?;
    let server = start_portmesh(bin, 1).await?;
    let node = server.leader_addr().to_string();
    let home = dir.path().join("home");
    let run = format!("{} --node {node} run -- /bin/true", bin.display());
    let means = hyperfine(dir.path(), &home, &["/bin/true".to_string(), empty.display().to_string(), run])?;
    let (t, e, r) = (means[0], means[1], means[2]);
    println!(
        "\nrun: /bin/true {t:.2} ms, empty Rust binary {e:.2} ms, `portmesh run -- /bin/true` {r:.2} ms: \
         run adds {:.2} ms = {:.2}× the empty binary's start-up",
        r - t,
        (r - t) / e
    );

    let project = dir.path().join("portmesh.toml");
    let mut text = String::from("project = \"bench\"\n");
    for i in 1..=5 {
        text.push_str(&format!("[services.s{i}]\ncommand = \"sleep 600\"\ncheck = \"cmd:true\"\n"));
    }
    std::fs::write(&project, text)?;
    let pm = |args: &[&str]| -> Result<Duration> {
        let t0 = Instant::now();
        let out = Command::new(bin)
            .arg("--node")
            .arg(&node)
            .args(args)
            .arg("-f")
            .arg(&project)
            .env("PORTMESH_HOME", &home)
            .output()?;
        if !out.status.success() {
            bail!("portmesh {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(t0.elapsed())
    };
    let mut times = Vec::new();
    for _ in 0..ups {
        times.push(pm(&["up", "-d"])?.as_secs_f64() * 1e3);
        pm(&["down"])?;
    }
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let max = times.iter().copied().fold(0.0, f64::max);
    println!(
        "up: 5 services ready at once, command to all healthy: median {:.1} ms (min {min:.1}, max {max:.1}) over {ups} runs",
        median(times)
    );
    Ok(())
}

/// One-shot `portmesh alloc` against a warm node vs an empty Rust binary, with `hyperfine -N`.
async fn startup(bin: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let empty = build_empty(dir.path())?;
    let server = start_portmesh(bin, 1).await?;
    let alloc = format!("{} --node {} alloc bench --key hyperfine", bin.display(), server.leader_addr());
    let means = hyperfine(dir.path(), &dir.path().join("home"), &[empty.display().to_string(), alloc])?;
    let (e, a) = (means[0], means[1]);
    println!(
        "\nstart-up: empty Rust binary {e:.2} ms, one-shot `portmesh alloc` (warm node) {a:.2} ms: {:.2}×",
        a / e
    );
    Ok(())
}
