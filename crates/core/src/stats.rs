//! Usage statistics and recommendations, computed from the state and the event history it keeps
//! (the latest events; see [`State::events_since`]). Pure: the caller passes the time and the
//! host's ephemeral port range.

use std::collections::BTreeMap;

use crate::state::State;
use crate::types::{EventKind, Pool};

/// A pool's usage over the history kept.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolStats {
    pub team: String,
    pub name: String,
    pub ranges: String,
    pub size: u32,
    pub in_use: u32,
    pub reserved: u32,
    pub cooling: u32,
    /// The most ports allocated at once within the window.
    pub peak: u32,
    /// Allocations and releases (any cause) within the window: the churn.
    pub allocations: u32,
    pub releases: u32,
    /// Net growth of allocations per hour over the window (negative: shrinking).
    pub net_per_hour: f64,
    /// When the pool runs out at that rate, from now; `None` if it is not growing.
    pub exhaustion_ms: Option<u64>,
}

/// A port the host probe found taken by someone else, again and again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contest {
    pub port: u16,
    pub team: String,
    pub pool: String,
    /// `Conflict` events kept for it: at most one per host a minute while the same process
    /// holds it ([`crate::CONFLICT_REPEAT_MS`]), so a count of 3 means found taken on three
    /// separate occasions, not by three allocations of one burst.
    pub conflicts: u32,
    /// Distinct holders as found: `host`, pid and command where the OS told.
    pub holders: Vec<String>,
    pub last_ms: u64,
}

/// What to change, why, and the command that does it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recommendation {
    /// `widen`, `reserve`, `ephemeral` or `airplay`.
    pub rule: &'static str,
    pub reason: String,
    pub command: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// The span of history the figures cover.
    pub window_ms: u64,
    pub pools: Vec<PoolStats>,
    /// Most contested first.
    pub contested: Vec<Contest>,
    pub recommendations: Vec<Recommendation>,
}

/// A pool this full (allocated + reserved) should grow.
pub const WIDEN_AT: f64 = 0.8;
/// A pool at least half full that runs out sooner than this at its current rate should grow
/// (an emptier pool's rate is too noisy to extrapolate: a burst of a few allocations on a quiet
/// node would predict exhaustion within hours).
pub const WIDEN_WITHIN_MS: u64 = 24 * 3600 * 1000;
pub const WIDEN_RATE_FROM: f64 = 0.5;
/// Exhaustion is predicted only from at least this much history...
pub const FORECAST_MIN_HISTORY_MS: u64 = 3600 * 1000;
/// ...in which the pool grew by at least this many ports: a few allocations right after a start
/// say nothing about a rate (4 of 1,000 ports after 2.5 minutes predicted "runs out in 10h 37m").
pub const FORECAST_MIN_GROWTH: u32 = 10;
/// A port found taken this often by programs portmesh did not start should be reserved.
pub const RESERVE_AFTER: u32 = 3;
/// Ports macOS's AirPlay Receiver listens on.
pub const AIRPLAY_PORTS: [u16; 2] = [5000, 7000];

/// Statistics of `teams` (empty: every team) at `now_ms`; `ephemeral` is the host's ephemeral
/// port range.
pub fn stats(state: &State, team: Option<&str>, now_ms: u64, ephemeral: (u16, u16)) -> Stats {
    let wanted = |t: &str| team.is_none_or(|w| w == t);
    let events: Vec<_> = state.events_since(0).collect();
    let first_ms = events.first().map_or(now_ms, |e| e.at_ms);
    let history_ms = now_ms.saturating_sub(first_ms);
    // At least a minute, so a burst right after start is not extrapolated wildly.
    let window_ms = now_ms.saturating_sub(first_ms).max(60_000);

    // Per pool: allocations/releases in the window, and the running count for the peak.
    #[derive(Default)]
    struct Tally {
        allocs: u32,
        releases: u32,
        delta: i64,
        high: i64,
    }
    let mut tally: BTreeMap<(String, String), Tally> = BTreeMap::new();
    let mut contests: BTreeMap<u16, Contest> = BTreeMap::new();
    for e in &events {
        match &e.kind {
            EventKind::Allocated(a) if wanted(&a.team) => {
                let t = tally.entry((a.team.to_string(), a.pool.to_string())).or_default();
                t.allocs += 1;
                t.delta += 1;
                t.high = t.high.max(t.delta);
            }
            EventKind::Released { allocation: a, .. } if wanted(&a.team) => {
                let t = tally.entry((a.team.to_string(), a.pool.to_string())).or_default();
                t.releases += 1;
                t.delta -= 1;
            }
            EventKind::Conflict(c) if wanted(&c.team) => {
                let entry = contests.entry(c.port).or_insert_with(|| Contest {
                    port: c.port,
                    team: c.team.clone(),
                    pool: c.pool.clone(),
                    conflicts: 0,
                    holders: Vec::new(),
                    last_ms: 0,
                });
                entry.conflicts += 1;
                entry.last_ms = e.at_ms;
                let who = match &c.holder {
                    Some(h) => format!("{h} on {}", c.host),
                    None => format!("a process on {}", c.host),
                };
                if !entry.holders.contains(&who) {
                    entry.holders.push(who);
                }
            }
            _ => {}
        }
    }

    let mut pools = Vec::new();
    let mut recommendations = Vec::new();
    let all_pools: Vec<&Pool> = state.pools().collect();
    for p in all_pools.iter().filter(|p| wanted(&p.team)) {
        let u = state.pool_usage(p, now_ms);
        let t = tally.remove(&(p.team.clone(), p.name.clone())).unwrap_or_default();
        // The count at the start of the window, then its highest point since.
        let start = i64::from(u.allocated) - t.delta;
        let peak = (start + t.high).max(i64::from(u.allocated)).max(0) as u32;
        let net = f64::from(t.allocs) - f64::from(t.releases);
        let net_per_hour = net * 3_600_000.0 / window_ms as f64;
        let free = u.size.saturating_sub(u.allocated + u.reserved);
        let enough = history_ms >= FORECAST_MIN_HISTORY_MS && net >= f64::from(FORECAST_MIN_GROWTH);
        let exhaustion_ms = enough.then(|| (f64::from(free) * window_ms as f64 / net) as u64);
        let used = f64::from(u.allocated + u.reserved) / f64::from(u.size.max(1));
        let soon = used >= WIDEN_RATE_FROM && exhaustion_ms.is_some_and(|ms| ms < WIDEN_WITHIN_MS);
        if used >= WIDEN_AT || soon {
            let why = if used >= WIDEN_AT {
                format!(
                    "pool {} of team {} is {:.0} % full ({} of {} ports)",
                    p.name,
                    p.team,
                    used * 100.0,
                    u.allocated + u.reserved,
                    u.size
                )
            } else {
                format!(
                    "pool {} of team {} grows by {net_per_hour:.0} ports an hour and runs out in about {}",
                    p.name,
                    p.team,
                    human_ms(exhaustion_ms.unwrap_or(0))
                )
            };
            recommendations.push(Recommendation {
                rule: "widen",
                reason: format!("{why}: add a range before it runs out"),
                command: match free_range(&all_pools, p.size().max(100), ephemeral) {
                    Some((lo, hi)) => format!("portmesh pools add {}-2 {lo}-{hi} --team {}", p.name, p.team),
                    None => format!("portmesh pools add {}-2 START-END --team {} (no free range below the ephemeral range)", p.name, p.team),
                },
            });
        }
        let (elo, ehi) = ephemeral;
        if p.ranges.iter().any(|r| r.meets(ephemeral)) {
            let fix = match free_range(&all_pools, p.size(), ephemeral) {
                Some((lo, hi)) => {
                    let (name, team) = (&p.name, &p.team);
                    let first = if u.allocated == 0 {
                        String::new()
                    } else {
                        format!("release its {} port(s), then: ", u.allocated)
                    };
                    format!(
                        "{first}portmesh pools rm {name} --team {team} && portmesh pools add {name} {lo}-{hi} --team {team}"
                    )
                }
                None => {
                    format!("portmesh pools rm {} --team {} (and add it back below {elo})", p.name, p.team)
                }
            };
            recommendations.push(Recommendation {
                rule: "ephemeral",
                reason: format!(
                    "pool {} of team {} ({}) lies in this host's ephemeral range {elo}-{ehi}: outgoing connections take ports from it at any time",
                    p.name,
                    p.team,
                    p.ranges_text()
                ),
                command: fix,
            });
        }
        for port in AIRPLAY_PORTS {
            if p.contains(port) && state.reservation(port).is_none() {
                recommendations.push(Recommendation {
                    rule: "airplay",
                    reason: format!(
                        "pool {} of team {} contains port {port}, which macOS's AirPlay Receiver listens on: on a Mac it is often taken",
                        p.name, p.team
                    ),
                    command: format!("portmesh reserve {port} --reason \"macOS AirPlay Receiver\""),
                });
            }
        }
        pools.push(PoolStats {
            team: p.team.clone(),
            name: p.name.clone(),
            ranges: p.ranges_text(),
            size: u.size,
            in_use: u.allocated,
            reserved: u.reserved,
            cooling: u.cooling,
            peak,
            allocations: t.allocs,
            releases: t.releases,
            net_per_hour,
            exhaustion_ms,
        });
    }

    let mut contested: Vec<Contest> = contests.into_values().collect();
    contested.sort_by(|a, b| b.conflicts.cmp(&a.conflicts).then(a.port.cmp(&b.port)));
    for c in &contested {
        if c.conflicts >= RESERVE_AFTER
            && state.reservation(c.port).is_none()
            && state.allocation(c.port).is_none()
        {
            let by = c.holders.first().cloned().unwrap_or_default();
            recommendations.push(Recommendation {
                rule: "reserve",
                reason: format!(
                    "port {} was found taken {} times by programs portmesh did not start ({by}): keep it out of selection",
                    c.port, c.conflicts
                ),
                command: format!("portmesh reserve {} --reason \"taken by {}\"", c.port, by.replace('"', "'")),
            });
        }
    }
    Stats { window_ms, pools, contested, recommendations }
}

/// The lowest block of `len` ports below the ephemeral range that overlaps no pool.
fn free_range(pools: &[&Pool], len: u32, ephemeral: (u16, u16)) -> Option<(u16, u16)> {
    let mut taken: Vec<(u32, u32)> = pools
        .iter()
        .flat_map(|p| p.ranges.iter().map(|r| (u32::from(r.start()), u32::from(r.end()))))
        .collect();
    taken.sort();
    let limit = u32::from(ephemeral.0);
    // Above the default pools (8000-13999), below the ephemeral range; else anywhere from 1024.
    let start = if u32::from(ephemeral.0) > 14_000 + len { 14_000 } else { 1024 };
    let mut lo = start;
    for (s, e) in taken {
        if e < lo {
            continue;
        }
        if s > lo && s - lo >= len {
            break;
        }
        lo = lo.max(e + 1);
    }
    let hi = lo + len - 1;
    (hi < limit).then_some((lo as u16, hi as u16))
}

fn human_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}
