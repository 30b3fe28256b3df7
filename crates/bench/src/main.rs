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
use portmesh_client::{Client, ClientOptions, pb};

mod deploy;
mod load;
mod logwrite;
mod scale;
mod startup;

use deploy::*;
use load::*;
use startup::*;

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
    /// Workloads: `fresh` (a new lease per allocation of the client's sticky key), `distinct`
    /// (a new lease per allocation without a key: each takes the lowest port that is neither
    /// allocated nor cooling down, and leaves it cooling for a minute when its lease is revoked;
    /// the 10,000-port pool bounds a round to 9,000 of them, shared by its phases, which end
    /// early when they have made their share; etcd runs its `fresh` loop),
    /// `reused` (one lease per client),
    /// `keepalive` (lease renewals: each client renews 100 leases on one stream, 32 in flight;
    /// an op is one renewal); `none` to run only the scale benchmarks below.
    #[arg(long, value_delimiter = ',', default_value = "fresh")]
    workloads: Vec<String>,
    /// Kill the leader of a loaded 3-node portmesh cluster this many times and report the time
    /// to the first acknowledged write after each kill.
    #[arg(long, default_value_t = 0)]
    failover: usize,
    /// Compare portmesh with TLS (mutual TLS between members, clients trusting the CA) against
    /// plaintext portmesh in the alternating rounds, instead of against etcd (workloads `fresh`
    /// and `reused`).
    #[arg(long)]
    tls_cost: bool,
    /// With --tls-cost: the TLS nodes also run with `--auth` and clients send a token, so the
    /// comparison is TLS + tokens against plaintext without.
    #[arg(long, requires = "tls_cost")]
    auth: bool,
    /// Compare --portmesh with this (older) portmesh binary in the alternating rounds, instead of
    /// against etcd: a change measured A/B, both builds in the same rounds ("portmesh" / "old").
    #[arg(long, conflicts_with = "tls_cost")]
    against: Option<PathBuf>,
    /// Also compare a one-shot `portmesh alloc` with an empty Rust binary using `hyperfine -N`.
    #[arg(long)]
    startup: bool,
    /// With --startup, --workflow or --restarts: also time this (older) portmesh binary, in the
    /// same rounds in alternating order, and print new/old ratios.
    #[arg(long)]
    startup_against: Option<PathBuf>,
    /// Restart of a single node: time from `portmesh serve` on an existing one-node data
    /// directory to its "listening" line, this many times (with --startup-against, that binary's
    /// too, alternating start by start).
    #[arg(long, default_value_t = 0)]
    restarts: usize,
    /// The Python package at start-up: `python/bench/startup.py` (--rounds x 10 rounds) in the
    /// venv `python/setup-tests.sh` makes (the package installed with `pip install ./python`,
    /// its `portmesh` built in the dev profile, as its tests use it).
    #[arg(long)]
    python: bool,
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
    /// Throughput as the state grows: fill to each of these numbers of live leased allocations
    /// (e.g. 0,10000,30000,50000) and run the `fresh` workload at the largest of --clients at
    /// each (portmesh only).
    #[arg(long, value_delimiter = ',')]
    state_sizes: Vec<usize>,
    /// Watch fan-out at these numbers of watchers (e.g. 100,1000), --rounds rounds of --secs.
    #[arg(long, value_delimiter = ',')]
    watchers: Vec<usize>,
    /// The log's write path alone, no node: this many durable writes of one entry through sled
    /// as the store makes them, and through a plain file, in --rounds alternating rounds.
    #[arg(long, default_value_t = 0)]
    log_writes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Portmesh,
    PortmeshTls,
    /// The binary of `--against`.
    PortmeshOld,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Portmesh => "portmesh",
            System::PortmeshTls => "tls",
            System::PortmeshOld => "old",
            System::Etcd => "etcd",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    Fresh,
    Distinct,
    Reused,
    Put,
    KeepAlive,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Fresh => "fresh",
            Workload::Distinct => "distinct",
            Workload::Reused => "reused",
            Workload::Put => "put",
            Workload::KeepAlive => "keepalive",
        }
    }

    fn parse(s: &str) -> Result<Workload> {
        match s {
            "fresh" => Ok(Workload::Fresh),
            "distinct" => Ok(Workload::Distinct),
            "reused" => Ok(Workload::Reused),
            "keepalive" => Ok(Workload::KeepAlive),
            other => bail!("unknown workload {other:?}: fresh, distinct, reused or keepalive"),
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) { (v[mid - 1] + v[mid]) / 2.0 } else { v[mid] }
}

/// One phase's figures: allocations per second, p50, p90 and p99 latency in ms, then the CPU
/// time (user + system, summed over all members) per 1,000 allocations in ms.
type Row = (f64, f64, f64, f64, f64);

#[derive(Default)]
struct Results {
    /// (system, workload, clients) -> one row per round
    rows: std::collections::BTreeMap<(&'static str, Workload, usize), Vec<Row>>,
    /// Each system's leader RSS, by [`System::name`], once per round: settled after start-up
    /// (portmesh builds only), and after the round's load.
    idle_rss_kb: std::collections::BTreeMap<&'static str, Vec<u64>>,
    loaded_rss_kb: std::collections::BTreeMap<&'static str, Vec<u64>>,
    entries_per_fsync: Vec<f64>,
    commands_per_fsync: Vec<f64>,
    data_bytes: Vec<u64>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dur = Duration::from_secs_f64(args.secs);
    let with_etcd = args.etcd != "off" && !args.tls_cost && args.against.is_none();
    let workloads: Vec<Workload> =
        args.workloads.iter().filter(|w| *w != "none").map(|w| Workload::parse(w)).collect::<Result<_>>()?;
    if workloads.is_empty() {
        if args.against.is_some() {
            bail!(
                "--against compares the load phases of --workloads; for --startup, --workflow and \
                 --restarts, name the older binary with --startup-against"
            );
        }
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
        if args.tls_cost {
            order.push(System::PortmeshTls);
        }
        if args.against.is_some() {
            order.push(System::PortmeshOld);
        }
        if round % 2 == 1 {
            order.reverse();
        }
        for system in order {
            let d = match system {
                System::Portmesh => start_portmesh(&args.portmesh, args.nodes).await?,
                System::PortmeshTls => start_portmesh_tls(&args.portmesh, args.nodes, args.auth).await?,
                System::PortmeshOld => {
                    let old = args.against.as_deref().context("the old binary of --against")?;
                    start_portmesh(old, args.nodes).await?
                }
                System::Etcd => start_etcd(&args.etcd, round, args.nodes).await?,
            };
            let pid = d.pid(d.leader);
            if matches!(system, System::Portmesh | System::PortmeshOld) {
                tokio::time::sleep(Duration::from_secs(1)).await; // let start-up settle
                res.idle_rss_kb.entry(system.name()).or_default().push(rss_kb(pid));
            }
            let mut phases: Vec<(Workload, usize)> =
                workloads.iter().flat_map(|w| args.clients.iter().map(move |c| (*w, *c))).collect();
            if system == System::Etcd {
                phases.push((Workload::Put, 1));
            }
            for (work, c) in phases {
                let before = match system {
                    System::Portmesh => Some(d.leader_client().await?.status().await?),
                    System::PortmeshTls | System::PortmeshOld | System::Etcd => None,
                };
                let cpu_before = d.members_cpu_ms();
                let limit =
                    (work == Workload::Distinct).then(|| DISTINCT_PER_ROUND / args.clients.len().max(1));
                let p = run_phase(system, work, d.leader_addr(), &d.options, c, limit, dur).await?;
                let cpu = (d.members_cpu_ms() - cpu_before) * 1000.0 / p.ops.max(1) as f64;
                println!(
                    "round {} {:<8} {:<6} clients {:>3}: {:>8.0} op/s  p50 {} ms  p90 {} ms  p99 {} ms  ({} ops, CPU {cpu:.0} ms per 1,000)",
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
                    cpu,
                ));
                if let Some(b) = before {
                    let a = d.leader_client().await?.status().await?;
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
            res.loaded_rss_kb.entry(system.name()).or_default().push(rss_kb(pid));
        }
    }

    println!("\n# medians over {} round(s), {} node(s) each", args.rounds, args.nodes);
    // The measured system and its baseline: portmesh vs etcd, TLS vs plaintext portmesh, or this
    // build vs the older one of --against.
    let (a, b) = match (args.tls_cost, &args.against) {
        (true, _) => ("tls", "portmesh"),
        (false, Some(_)) => ("portmesh", "old"),
        (false, None) => ("portmesh", "etcd"),
    };
    println!(
        "| workload | clients | {a} alloc/s | {b} alloc/s | ratio | {a} p50/p90/p99 ms | {b} p50/p90/p99 ms | CPU ms per 1,000 {a} / {b} | CPU ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let col = |v: &[Row], f: fn(&Row) -> f64| median(v.iter().map(f).collect());
    for w in &workloads {
        for &c in &args.clients {
            let pm = res.rows.get(&(a, *w, c)).cloned().unwrap_or_default();
            let et = res.rows.get(&(b, *w, c)).cloned().unwrap_or_default();
            // Ratio of medians over per-round ratios: same-round pairs cancel the machine's noise.
            let ratios: Vec<f64> = pm.iter().zip(&et).map(|(a, b)| a.0 / b.0).collect();
            let cpu_ratios: Vec<f64> = pm.iter().zip(&et).map(|(a, b)| a.4 / b.4).collect();
            // A figure, or a dash where the baseline did not run (`--etcd off`).
            let fig =
                |v: f64, digits: usize| if v.is_nan() { "—".to_string() } else { format!("{v:.digits$}") };
            let times = |v: f64| if v.is_nan() { "—".to_string() } else { format!("{v:.2}×") };
            println!(
                "| {} | {c} | {} | {} | {} | {} / {} / {} | {} / {} / {} | {} / {} | {} |",
                w.name(),
                fig(col(&pm, |r| r.0), 0),
                fig(col(&et, |r| r.0), 0),
                times(median(ratios)),
                fig(col(&pm, |r| r.1), 2),
                fig(col(&pm, |r| r.2), 2),
                fig(col(&pm, |r| r.3), 2),
                fig(col(&et, |r| r.1), 2),
                fig(col(&et, |r| r.2), 2),
                fig(col(&et, |r| r.3), 2),
                fig(col(&pm, |r| r.4), 0),
                fig(col(&et, |r| r.4), 0),
                times(median(cpu_ratios)),
            );
        }
    }
    // Taking a new, distinct port against the sticky key's own port, same concurrency, same rounds.
    for &c in &args.clients {
        if let (Some(d), Some(f)) =
            (res.rows.get(&(a, Workload::Distinct, c)), res.rows.get(&(a, Workload::Fresh, c)))
        {
            let ratios: Vec<f64> = d.iter().zip(f).map(|(d, f)| d.0 / f.0).collect();
            println!(
                "{a} at {c} clients: distinct / fresh throughput {:.2}× (median of per-round ratios)",
                median(ratios)
            );
        }
    }
    if let (Some(tls), Some(plain)) =
        (res.rows.get(&("tls", Workload::Fresh, 1)), res.rows.get(&("portmesh", Workload::Fresh, 1)))
    {
        let extra: Vec<f64> = tls.iter().zip(plain).map(|(t, p)| t.1 - p.1).collect();
        println!(
            "\n1 client: TLS adds {:.3} ms to the allocation p50 (median of per-round differences)",
            median(extra)
        );
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
    println!();
    for (name, loaded) in &res.loaded_rss_kb {
        match res.idle_rss_kb.get(name) {
            Some(idle) => {
                println!("{name} leader idle RSS: {:.1} MB; after load: {:.1} MB", mb(idle), mb(loaded))
            }
            None => println!("{name} leader RSS after load: {:.1} MB", mb(loaded)),
        }
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
        startup(&args.portmesh, args.startup_against.as_deref(), args.rounds).await?;
    }
    if args.workflow {
        workflow(&args.portmesh, args.startup_against.as_deref(), args.rounds, args.rounds * 3).await?;
    }
    if args.restarts > 0 {
        restarts(&args.portmesh, args.startup_against.as_deref(), args.restarts)?;
    }
    if args.python {
        python_startup(args.rounds * 10)?;
    }
    let etcd = (args.etcd != "off").then_some(args.etcd.as_str());
    if args.rss_allocations > 0 {
        scale::rss_allocations(&args.portmesh, etcd, args.nodes, args.rss_allocations).await?;
    }
    if !args.state_sizes.is_empty() {
        let clients = args.clients.iter().copied().max().unwrap_or(16);
        scale::state_sizes(&args.portmesh, args.nodes, &args.state_sizes, clients, dur).await?;
    }
    if !args.watchers.is_empty() {
        scale::watch_fanout(&args.portmesh, etcd, args.nodes, &args.watchers, args.rounds, dur).await?;
    }
    if args.log_writes > 0 {
        logwrite::log_writes(args.log_writes, args.rounds)?;
    }
    if args.soak > 0 {
        scale::soak(&args.portmesh, args.nodes, args.soak, args.soak_ttl, args.soak_secs).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![4.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
