//! `stats` and `doctor`: what the cluster's history says, and what could bite on this host.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use portmesh_client::{Client, pb};
use serde_json::json;

use crate::args::Cli;
use crate::node;
use crate::render::{human_ms, ranges_text};

pub async fn stats(c: &Client, team: &str, json: bool) -> Result<()> {
    let s = c.stats(pb::StatsRequest { team: team.into() }).await?;
    if json {
        let pools: Vec<_> = s
            .pools
            .iter()
            .map(|p| {
                json!({"team": p.team, "name": p.name, "ranges": p.ranges, "size": p.size, "in_use": p.in_use,
                       "reserved": p.reserved, "cooling": p.cooling, "peak": p.peak, "allocations": p.allocations,
                       "releases": p.releases, "net_per_hour": p.net_per_hour,
                       "exhaustion_ms": (p.exhaustion_ms != 0).then_some(p.exhaustion_ms)})
            })
            .collect();
        let contested: Vec<_> = s
            .contested
            .iter()
            .map(|c| json!({"port": c.port, "team": c.team, "pool": c.pool, "conflicts": c.conflicts, "holders": c.holders, "last_ms": c.last_ms}))
            .collect();
        let recs: Vec<_> = s
            .recommendations
            .iter()
            .map(|r| json!({"rule": r.rule, "reason": r.reason, "command": r.command}))
            .collect();
        println!(
            "{}",
            json!({"window_ms": s.window_ms, "pools": pools, "contested": contested, "recommendations": recs, "revision": s.revision})
        );
        return Ok(());
    }
    println!(
        "{:<12} {:<10} {:<14} {:>6} {:>6} {:>6} {:>11} {:>8}  RUNS OUT",
        "POOL", "TEAM", "RANGES", "SIZE", "IN USE", "PEAK", "CHURN +/-", "NET/H"
    );
    for p in &s.pools {
        println!(
            "{:<12} {:<10} {:<14} {:>6} {:>6} {:>6} {:>11} {:>+8.1}  {}",
            p.name,
            p.team,
            p.ranges,
            p.size,
            p.in_use,
            p.peak,
            format!("{}/{}", p.allocations, p.releases),
            p.net_per_hour,
            if p.exhaustion_ms == 0 { "-".to_string() } else { format!("in {}", human_ms(p.exhaustion_ms)) }
        );
    }
    if !s.contested.is_empty() {
        println!("\nmost contested ports (found taken by programs portmesh did not start):");
        for c in s.contested.iter().take(10) {
            println!("  {:>5}  {} time(s), pool {}: {}", c.port, c.conflicts, c.pool, c.holders.join("; "));
        }
    }
    if s.recommendations.is_empty() {
        println!("\nno recommendations");
    } else {
        println!("\nrecommendations:");
        for r in &s.recommendations {
            println!("  - {}: {}\n      $ {}", r.rule, r.reason, r.command);
        }
    }
    println!("\n(figures cover the last {} of history kept)", human_ms(s.window_ms));
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Ok,
    Warn,
    Error,
}

impl Level {
    fn word(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

#[derive(Debug)]
struct Finding {
    level: Level,
    check: &'static str,
    message: String,
    fix: Option<String>,
}

fn finding(level: Level, check: &'static str, message: String, fix: Option<String>) -> Finding {
    Finding { level, check, message, fix }
}

/// Clock difference above which members disagree enough to matter (lease TTLs, logs).
const MAX_SKEW_MS: i64 = 1000;
/// A data directory this big deserves a look.
const BIG_DATA: u64 = 1 << 30;

pub async fn doctor(cli: &Cli) -> Result<i32> {
    let mut out = Vec::new();
    match node::connect(cli).await {
        Err(e) => out.push(finding(
            Level::Error,
            "cluster",
            format!("no node answers: {e:#}"),
            Some(
                "start the node (`portmesh serve`), or point --node / PORTMESH_NODE at a running member"
                    .into(),
            ),
        )),
        Ok(c) => check_cluster(&c, &mut out).await,
    }
    let worst = out.iter().map(|f| f.level).max().unwrap_or(Level::Ok);
    if cli.json {
        let list: Vec<_> = out
            .iter()
            .map(|f| json!({"level": f.level.word(), "check": f.check, "message": f.message, "fix": f.fix}))
            .collect();
        println!("{}", json!({"ok": worst == Level::Ok, "findings": list}));
    } else {
        for f in &out {
            println!("{:<5} {}: {}", f.level.word(), f.check, f.message);
            if let Some(fix) = &f.fix {
                println!("      fix: {fix}");
            }
        }
        let problems = out.iter().filter(|f| f.level != Level::Ok).count();
        println!(
            "{}",
            if problems == 0 {
                "nothing wrong found".to_string()
            } else {
                format!("{problems} problem(s) found")
            }
        );
    }
    Ok(if worst == Level::Ok { 0 } else { 1 })
}

async fn check_cluster(c: &Client, out: &mut Vec<Finding>) {
    let s = match c.status().await {
        Ok(s) => s,
        Err(e) => {
            out.push(finding(
                Level::Error,
                "cluster",
                format!("the node at {} does not answer status: {e:#}", c.addr()),
                None,
            ));
            return;
        }
    };
    if s.leader_id == 0 {
        out.push(finding(
            Level::Error,
            "cluster",
            format!("no leader: {} member(s), term {}; writes and linearizable reads fail", s.members.len(), s.term),
            Some("a majority of the voters must run and reach each other: start the stopped ones (`portmesh status` lists them)".into()),
        ));
    } else {
        let leader = s.members.iter().find(|m| m.id == s.leader_id).map_or("?", |m| m.addr.as_str());
        out.push(finding(
            Level::Ok,
            "cluster",
            format!("leader {} at {leader}, {} member(s), term {}", s.leader_id, s.members.len(), s.term),
            None,
        ));
    }
    check_clocks(c, &s, out).await;
    if s.data_size_bytes > BIG_DATA {
        out.push(finding(
            Level::Warn,
            "data",
            format!("the data directory {} holds {} MB", s.data_dir, s.data_size_bytes >> 20),
            Some("snapshot more often (`portmesh serve --snapshot-every 2000`) so the log behind snapshots is purged".into()),
        ));
    } else {
        out.push(finding(Level::Ok, "data", format!("data directory {} MB", s.data_size_bytes >> 20), None));
    }
    let Ok(pools) = c.list_pools(pb::ListPoolsRequest { team: String::new(), stale: true }).await else {
        return;
    };
    check_pools(&pools.pools, out);
    check_holders(c, &s.host, &pools.pools, out).await;
}

/// Each member's clock against ours, corrected by half the round trip.
async fn check_clocks(c: &Client, s: &pb::StatusResponse, out: &mut Vec<Finding>) {
    let mut worst: Option<(String, i64)> = None;
    for m in &s.members {
        let t0 = Instant::now();
        let sent = portmesh_core::unix_ms(std::time::SystemTime::now());
        let answer =
            tokio::time::timeout(Duration::from_secs(3), async { c.member(&m.addr).await?.status().await })
                .await;
        let rtt = t0.elapsed().as_millis() as u64;
        match answer {
            Ok(Ok(ms)) if ms.now_ms != 0 => {
                let skew = ms.now_ms as i64 - (sent + rtt / 2) as i64;
                if worst.as_ref().is_none_or(|(_, w)| skew.abs() > w.abs()) {
                    worst = Some((m.addr.clone(), skew));
                }
            }
            Ok(Ok(_)) => {}
            _ => out.push(finding(
                Level::Warn,
                "members",
                format!("member {} at {} does not answer from here", m.id, m.addr),
                Some("check that it runs and that this machine reaches its address".into()),
            )),
        }
    }
    match worst {
        Some((addr, skew)) if skew.abs() > MAX_SKEW_MS => out.push(finding(
            Level::Warn,
            "clock",
            format!("the clock of {addr} is {skew:+} ms off this machine's"),
            Some("run NTP (chrony, systemd-timesyncd) on every member: lease times and logs rely on the clocks".into()),
        )),
        Some((_, skew)) => out.push(finding(
            Level::Ok,
            "clock",
            format!("members' clocks within {} ms of this machine's", skew.abs()),
            None,
        )),
        None => {}
    }
}

fn check_pools(pools: &[pb::Pool], out: &mut Vec<Finding>) {
    let (lo, hi) = portmesh_probe::ephemeral_range();
    let mut fine = true;
    for p in pools {
        let overlaps = p
            .ranges
            .iter()
            .any(|rg| portmesh_core::PortRange::try_from(rg).is_ok_and(|rg| rg.meets((lo, hi))));
        if overlaps {
            fine = false;
            out.push(finding(
                Level::Warn,
                "pools",
                format!(
                    "pool {} of team {} ({}) lies in this host's ephemeral range {lo}-{hi} (ip_local_port_range): outgoing connections take ports from it",
                    p.name,
                    p.team,
                    ranges_text(&p.ranges)
                ),
                Some(format!("`portmesh stats` proposes a range: move the pool below {lo}")),
            ));
        }
        if cfg!(target_os = "macos") {
            for port in portmesh_core::stats::AIRPLAY_PORTS {
                if p.ranges.iter().any(|rg| rg.start <= u32::from(port) && rg.end >= u32::from(port)) {
                    fine = false;
                    out.push(finding(
                        Level::Warn,
                        "pools",
                        format!("pool {} contains {port}, which macOS's AirPlay Receiver listens on", p.name),
                        Some(format!("portmesh reserve {port} --reason \"macOS AirPlay Receiver\"")),
                    ));
                }
            }
        }
    }
    if fine {
        out.push(finding(
            Level::Ok,
            "pools",
            format!("{} pool(s), none in the ephemeral range {lo}-{hi}", pools.len()),
            None,
        ));
    }
}

/// Allocations on this host whose holder is gone, and listeners in pools with no allocation.
async fn check_holders(c: &Client, host: &str, pools: &[pb::Pool], out: &mut Vec<Finding>) {
    let Ok(live) = c.list(pb::ListRequest { stale: true, ..Default::default() }).await else {
        return;
    };
    let mut fine = true;
    let this_host = portmesh_probe::hostname();
    let here = |h: &str| h == host || h == this_host;
    // One finding per kind (and team), with the ports listed and one command that cleans up.
    let mut no_lease: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    let mut stale: BTreeMap<&str, BTreeMap<u64, Vec<u32>>> = BTreeMap::new();
    for a in live.allocations.iter().filter(|a| here(&a.host) && a.pid != 0) {
        if crate::process::alive(a.pid) {
            continue;
        }
        fine = false;
        match a.lease_id {
            0 => no_lease.entry(&a.team).or_default().push(a.port),
            l => stale.entry(&a.team).or_default().entry(l).or_default().push(a.port),
        }
    }
    for (team, ports) in &no_lease {
        let list: Vec<String> = ports.iter().map(ToString::to_string).collect();
        out.push(finding(
            Level::Warn,
            "holders",
            format!(
                "{} port(s) of team {team} held with no lease by processes that no longer run: {}",
                ports.len(),
                shortened(&list)
            ),
            Some(format!("portmesh release {} --team {team}", list.join(" "))),
        ));
    }
    for (team, leases) in &stale {
        let described: Vec<String> = leases
            .iter()
            .map(|(l, ports)| {
                format!("{l} (port {})", ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
            })
            .collect();
        let fix: Vec<String> =
            leases.keys().map(|l| format!("portmesh release --lease {l} --team {team}")).collect();
        out.push(finding(
            Level::Warn,
            "leases",
            format!(
                "{} stale lease(s) of team {team} hold ports for processes that no longer run: {}; they end when \
                 their TTL runs out",
                leases.len(),
                shortened(&described)
            ),
            Some(fix.join(" && ")),
        ));
    }
    // Listeners inside pools that portmesh did not hand out: each allocation near them is probed
    // and skipped; a reservation says so once and for all.
    let accounted: std::collections::HashSet<u32> =
        live.allocations.iter().map(|a| a.port).chain(live.reservations.iter().map(|r| r.port)).collect();
    let ports: Vec<u16> = pools
        .iter()
        .flat_map(|p| p.ranges.iter().flat_map(|r| r.start..=r.end))
        .filter(|p| !accounted.contains(p))
        .filter_map(|p| u16::try_from(p).ok())
        .collect();
    let owners =
        tokio::task::spawn_blocking(move || portmesh_probe::owners_of(&ports)).await.unwrap_or_default();
    let mut foreign: BTreeMap<u16, String> = BTreeMap::new();
    for (port, o) in owners {
        foreign.entry(port).or_insert_with(|| o.to_string());
    }
    if !foreign.is_empty() {
        fine = false;
        let described: Vec<String> = foreign.iter().map(|(p, who)| format!("{p} ({who})")).collect();
        let fix: Vec<String> = foreign
            .iter()
            .map(|(p, who)| format!("portmesh reserve {p} --reason \"used by {}\"", who.replace('"', "'")))
            .collect();
        out.push(finding(
            Level::Warn,
            "holders",
            format!(
                "{} port(s) lie in pools but are held by processes with no allocation for them: {}",
                foreign.len(),
                shortened(&described)
            ),
            Some(format!("{} (or stop those processes)", fix.join(" && "))),
        ));
    }
    if fine {
        out.push(finding(
            Level::Ok,
            "holders",
            "every port in the pools is held by a live process with an allocation, or free".into(),
            None,
        ));
    }
}

/// A list as a finding shows it: the first 20, then how many more.
fn shortened(items: &[String]) -> String {
    const SHOWN: usize = 20;
    if items.len() <= SHOWN {
        return items.join(", ");
    }
    format!("{}, and {} more", items[..SHOWN].join(", "), items.len() - SHOWN)
}
