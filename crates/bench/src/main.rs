//! `portmesh-bench`: measures a single portmesh node against etcd (Debian's `etcd-server`) doing
//! the same work, in alternating rounds of one run, and prints figures and median ratios.
//!
//! The work, per client, in a loop until the phase ends: take a port under a fresh lease, then
//! give it back by revoking the lease.
//! - portmesh: `Allocate` (sticky key per client, new lease in the same request), `Revoke`.
//! - etcd: `LeaseGrant`, `Txn` put-if-absent of `ports/<n>` attached to the lease (trying the next
//!   number if taken), `LeaseRevoke`.
//!
//! Latency is the time to hold a port (portmesh: one RPC; etcd: grant + txn). Throughput counts
//! completed allocations per second. Nothing here asserts a speed: it reports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use portmesh_client::{Client, pb};

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
    /// Rounds; each runs both systems, in alternating order.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per phase (one concurrency level of one system).
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Also compare a one-shot `portmesh alloc` with an empty Rust binary using `hyperfine -N`.
    #[arg(long)]
    startup: bool,
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

/// A server process with its own fresh data directory.
struct Server {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

async fn start_portmesh(bin: &Path) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let log = std::fs::File::create(dir.path().join("node.log"))?;
    let child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--bootstrap", "--data"])
        .arg(dir.path().join("data"))
        .arg("--home")
        .arg(dir.path())
        .env("PORTMESH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let home = dir.path().to_path_buf();
    let addr = wait_for("portmesh to record its address", || {
        let home = home.clone();
        async move {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(home.join("node.json")).ok()?).ok()?;
            v["grpc"].as_str().map(str::to_string)
        }
    })
    .await?;
    let c = Client::connect(&addr).await?;
    c.add_pool("default", "bench", vec![pb::PortRange { start: 20000, end: 29999 }]).await?;
    Ok(Server { child, addr, _dir: dir })
}

async fn start_etcd(bin: &str, round: usize) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let (cport, pport) = (free_port()?, free_port()?);
    let client_url = format!("http://127.0.0.1:{cport}");
    let peer_url = format!("http://127.0.0.1:{pport}");
    let log = std::fs::File::create(dir.path().join("etcd.log"))?;
    let child = Command::new(bin)
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("bench={peer_url}")])
        .args(["--initial-cluster-token", &format!("portmesh-bench-{round}")])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {bin} (install Debian's etcd-server, or pass --etcd off)"))?;
    let addr = format!("127.0.0.1:{cport}");
    let a = addr.clone();
    wait_for("etcd to answer", || {
        let a = a.clone();
        async move {
            let ch =
                tonic::transport::Endpoint::from_shared(format!("http://{a}")).ok()?.connect().await.ok()?;
            let mut l = etcdpb::lease_client::LeaseClient::new(ch);
            l.lease_grant(etcdpb::LeaseGrantRequest { ttl: 5, id: 0 }).await.ok().map(|_| ())
        }
    })
    .await?;
    Ok(Server { child, addr, _dir: dir })
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

async fn run_phase(system: System, addr: &str, clients: usize, dur: Duration) -> Result<Phase> {
    let deadline = Instant::now() + dur;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let addr = addr.to_string();
        tasks.push(tokio::spawn(async move {
            match system {
                System::Portmesh => portmesh_client_loop(&addr, c, deadline).await,
                System::Etcd => etcd_client_loop(&addr, c, deadline).await,
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

async fn portmesh_client_loop(addr: &str, c: usize, deadline: Instant) -> Result<Vec<Duration>> {
    let client = Client::connect(addr).await?;
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
                ttl_ms: 60_000,
                ..Default::default()
            })
            .await?;
        lat.push(t0.elapsed());
        client.revoke_lease("default", r.lease_id).await?;
    }
    Ok(lat)
}

async fn etcd_client_loop(addr: &str, c: usize, deadline: Instant) -> Result<Vec<Duration>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut kv = etcdpb::kv_client::KvClient::new(ch.clone());
    let mut leases = etcdpb::lease_client::LeaseClient::new(ch);
    let mut lat = Vec::new();
    while Instant::now() < deadline {
        let t0 = Instant::now();
        let lease = leases.lease_grant(etcdpb::LeaseGrantRequest { ttl: 60, id: 0 }).await?.into_inner().id;
        let mut port = 20_000 + c as u32;
        loop {
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
                        key,
                        value: format!("bench-{c}").into_bytes(),
                        lease,
                    })),
                }],
                failure: vec![],
            };
            if kv.txn(txn).await?.into_inner().succeeded {
                break;
            }
            port = 20_000 + (port - 20_000 + 64) % 10_000;
        }
        lat.push(t0.elapsed());
        leases.lease_revoke(etcdpb::LeaseRevokeRequest { id: lease }).await?;
    }
    Ok(lat)
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
    /// (system, clients) -> one row per round
    rows: std::collections::BTreeMap<(&'static str, usize), Vec<Row>>,
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
    let mut res = Results::default();
    println!(
        "# portmesh-bench: {} round(s), {}s per phase, clients {:?}",
        args.rounds, args.secs, args.clients
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
            let server = match system {
                System::Portmesh => start_portmesh(&args.portmesh).await?,
                System::Etcd => start_etcd(&args.etcd, round).await?,
            };
            let pid = server.child.id();
            if system == System::Portmesh {
                tokio::time::sleep(Duration::from_secs(1)).await; // let start-up allocations settle
                res.idle_rss_kb.push(rss_kb(pid));
            }
            for &c in &args.clients {
                let before = if system == System::Portmesh {
                    Some(Client::connect(&server.addr).await?.status().await?)
                } else {
                    None
                };
                let p = run_phase(system, &server.addr, c, dur).await?;
                println!(
                    "round {} {:<8} clients {:>3}: {:>8.0} alloc/s  p50 {} ms  p90 {} ms  p99 {} ms  ({} allocations)",
                    round + 1,
                    system.name(),
                    c,
                    p.rate(),
                    ms(p.pct(0.5)),
                    ms(p.pct(0.9)),
                    ms(p.pct(0.99)),
                    p.ops
                );
                res.rows.entry((system.name(), c)).or_default().push((
                    p.rate(),
                    p.pct(0.5).as_secs_f64() * 1e3,
                    p.pct(0.9).as_secs_f64() * 1e3,
                    p.pct(0.99).as_secs_f64() * 1e3,
                ));
                if let Some(b) = before {
                    let a = Client::connect(&server.addr).await?.status().await?;
                    let f = a.fsyncs.saturating_sub(b.fsyncs);
                    if c == *args.clients.iter().max().unwrap_or(&c) && f > 0 {
                        let e = a.entries_flushed.saturating_sub(b.entries_flushed) as f64 / f as f64;
                        let k = a.commands_applied.saturating_sub(b.commands_applied) as f64 / f as f64;
                        println!(
                            "round {} portmesh clients {c:>3}: {e:.1} log entries and {k:.1} commands per fsync",
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

    println!("\n# medians over {} round(s)", args.rounds);
    println!(
        "| clients | portmesh alloc/s | etcd alloc/s | ratio | portmesh p50/p90/p99 ms | etcd p50/p90/p99 ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for &c in &args.clients {
        let pm = res.rows.get(&("portmesh", c)).cloned().unwrap_or_default();
        let et = res.rows.get(&("etcd", c)).cloned().unwrap_or_default();
        let col = |v: &[Row], f: fn(&Row) -> f64| median(v.iter().map(f).collect());
        // Ratio of medians over per-round ratios: same-round pairs cancel the machine's noise.
        let ratios: Vec<f64> = pm.iter().zip(&et).map(|(a, b)| a.0 / b.0).collect();
        println!(
            "| {c} | {:.0} | {:.0} | {:.2}× | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} / {:.2} |",
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
    let mb = |v: &[u64]| median(v.iter().map(|k| *k as f64 / 1024.0).collect());
    println!(
        "\nportmesh idle RSS: {:.1} MB; after load: {:.1} MB",
        mb(&res.idle_rss_kb),
        mb(&res.loaded_rss_kb)
    );
    if with_etcd {
        println!("etcd RSS after load: {:.1} MB", mb(&res.etcd_rss_kb));
    }
    println!(
        "portmesh at {} clients: {:.1} log entries per fsync, {:.1} commands per fsync",
        args.clients.iter().max().unwrap_or(&0),
        median(res.entries_per_fsync.clone()),
        median(res.commands_per_fsync.clone())
    );
    println!(
        "portmesh data dir after a round: {:.1} MB",
        median(res.data_bytes.iter().map(|b| *b as f64 / 1e6).collect())
    );
    if args.startup {
        startup(&args.portmesh).await?;
    }
    Ok(())
}

/// One-shot `portmesh alloc` against a warm node vs an empty Rust binary, with `hyperfine -N`.
async fn startup(bin: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("empty.rs");
    std::fs::write(&src, "fn main() {}\n")?;
    let empty = dir.path().join("empty");
    let ok = Command::new("rustc").args(["-O", "-o"]).arg(&empty).arg(&src).status()?.success();
    if !ok {
        bail!("rustc could not build the empty binary");
    }
    let server = start_portmesh(bin).await?;
    let json = dir.path().join("hyperfine.json");
    let alloc = format!("{} --node {} alloc bench --key hyperfine", bin.display(), server.addr);
    let status = Command::new("hyperfine")
        .args(["-N", "--warmup", "20", "--runs", "300", "--export-json"])
        .arg(&json)
        .arg(empty.display().to_string())
        .arg(&alloc)
        .status()
        .context("running hyperfine (install Debian's hyperfine)")?;
    if !status.success() {
        bail!("hyperfine failed");
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    let mean = |i: usize| v["results"][i]["mean"].as_f64().unwrap_or(f64::NAN) * 1e3;
    let (e, a) = (mean(0), mean(1));
    println!(
        "\nstart-up: empty Rust binary {e:.2} ms, one-shot `portmesh alloc` (warm node) {a:.2} ms: {:.2}×",
        a / e
    );
    Ok(())
}
