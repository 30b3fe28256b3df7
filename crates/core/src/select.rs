//! Port selection: which port an item gets, given the state, the batch so far and the probe.
//!
//! One candidate order per strategy is used both by `apply` (to pick) and by [`State::plan`] (to
//! tell the node which ports to probe before proposing), so the two can never disagree about
//! which ports matter.

use std::collections::{BTreeSet, HashMap};

use crate::command::{AllocItem, Finding, HostProbe};
use crate::rejection::{Rejection, Unavailable};
use crate::rng::SplitMix64;
use crate::state::State;
use crate::types::{Cooldown, Pool, PortRange, Strategy};
use crate::{DEFAULT_POOL, MIN_PORT};

/// A port chosen for one item, and the busy ports skipped on the way.
#[derive(Debug)]
pub(crate) struct Pick {
    pub port: u16,
    pub pool: String,
    pub conflicts: Vec<u16>,
}

/// Everything selection looks at, for one batch.
pub(crate) struct Selector<'a> {
    pub state: &'a State,
    pub team: &'a str,
    pub host: &'a str,
    pub now_ms: u64,
    pub probe: Option<&'a HostProbe>,
    /// Ranges known busy on the host ([`HostProbe::known_busy`]): walks skip them whole.
    pub known_busy: &'a [PortRange],
    /// Ports taken by earlier items of the same batch.
    pub taken: BTreeSet<u16>,
}

impl Selector<'_> {
    /// Why `port` cannot go to an item with sticky `key`, ignoring the host probe.
    pub fn state_unavailable(&self, port: u16, key: Option<&str>) -> Option<Unavailable> {
        let st = self.state;
        if self.taken.contains(&port) {
            return Some(Unavailable::TakenInBatch);
        }
        if let Some(a) = st.allocation(port) {
            return Some(Unavailable::Allocated { team: a.team.to_string(), service: a.service.to_string() });
        }
        if let Some(r) = st.reservation(port) {
            return Some(Unavailable::Reserved { reason: r.reason.clone() });
        }
        self.cooling_down(port, key).map(|c| Unavailable::CoolingDown { until_ms: c.until_ms })
    }

    /// The cool-down that keeps `port` from an item with sticky `key`: one that has not ended,
    /// unless it keeps the port for that very key of this team.
    fn cooling_down(&self, port: u16, key: Option<&str>) -> Option<&Cooldown> {
        let c = self.state.cooldown(port).filter(|c| c.until_ms > self.now_ms)?;
        let own = key.is_some() && c.key.as_deref() == key && c.team == self.team;
        (!own).then_some(c)
    }

    /// The pool an item draws from.
    pub fn resolve_pool(&self, item: &AllocItem) -> Result<&Pool, Rejection> {
        let st = self.state;
        let team_pools: Vec<&Pool> = st.team_pools(self.team).collect();
        if team_pools.is_empty() {
            return Err(Rejection::UnknownTeam { team: self.team.to_string() });
        }
        if let Some(port) = item.port
            && port < MIN_PORT
        {
            return Err(Rejection::PortOutOfRange { port: u32::from(port) });
        }
        let pool = match (&item.pool, item.port) {
            (Some(name), _) => st.pool(self.team, name).ok_or_else(|| Rejection::UnknownPool {
                team: self.team.to_string(),
                pool: name.clone(),
                known: team_pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", "),
            })?,
            (None, Some(port)) => team_pools.iter().copied().find(|p| p.contains(port)).ok_or_else(|| {
                Rejection::PortOutsidePools {
                    port,
                    team: self.team.to_string(),
                    pools: describe_pools(&team_pools),
                }
            })?,
            // A pool named like the service (`alloc web`), else the team's default pool.
            (None, None) => st
                .pool(self.team, &item.service)
                .or_else(|| st.pool(self.team, DEFAULT_POOL))
                .ok_or_else(|| Rejection::UnknownPool {
                    team: self.team.to_string(),
                    pool: DEFAULT_POOL.to_string(),
                    known: team_pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", "),
                })?,
        };
        if let Some(port) = item.port
            && !pool.contains(port)
        {
            return Err(Rejection::PortNotInPool {
                port,
                team: self.team.to_string(),
                pool: pool.name.clone(),
                ranges: pool.ranges_text(),
            });
        }
        Ok(pool)
    }

    /// The key's last port, if it still lies in `pool`.
    fn sticky_port(&self, item: &AllocItem, pool: &Pool) -> Option<u16> {
        let key = item.key.as_deref()?;
        self.state.sticky_port(self.team, key).filter(|p| pool.contains(*p))
    }

    /// Ports in the order a deterministic strategy tries them. Only the wanted and the sticky
    /// port may come twice (first, then where the pool's order meets them): callers skip their
    /// repeats with [`Repeats`].
    /// The wanted (and sticky) port come first whatever holds them, so a taken wanted port is
    /// seen and explained; the rest of the pool comes without its allocated and cooling ports
    /// (see [`State::selectable_ports`]), which could not be picked (skipping them in one walk
    /// keeps a nearly full pool, and one behind a minute of churn, cheap).
    fn ordered_candidates<'p>(&self, item: &AllocItem, pool: &'p Pool) -> Box<dyn Iterator<Item = u16> + 'p>
    where
        Self: 'p,
    {
        let sticky = self.sticky_port(item, pool);
        let wanted = item.port.or(sticky);
        match (item.strategy, wanted) {
            (Strategy::Fail, Some(w)) => Box::new(std::iter::once(w)),
            (Strategy::Next, Some(w)) => Box::new(
                std::iter::once(w)
                    .chain(self.walk(pool).filter(move |p| *p > w))
                    .chain(self.walk(pool).filter(move |p| *p < w)),
            ),
            (Strategy::Sticky, Some(w)) => {
                Box::new(std::iter::once(w).chain(sticky.filter(|s| *s != w)).chain(self.fresh_first(pool)))
            }
            (Strategy::Random, Some(w)) => Box::new(std::iter::once(w)),
            (Strategy::Random, None) => Box::new(std::iter::empty()),
            (_, None) => Box::new(self.fresh_first(pool)),
        }
    }

    /// The pool's selectable ports ([`State::selectable_ports`]) outside the ranges known busy.
    fn walk<'p>(&self, pool: &'p Pool) -> impl Iterator<Item = u16> + 'p
    where
        Self: 'p,
    {
        self.state.selectable_ports(pool, self.now_ms, self.known_busy)
    }

    /// The pool's walk ([`Self::walk`]), those no sticky key remembers first (lowest first),
    /// then the remembered ones: another key's last port is handed out only when nothing else is
    /// free, so `up` tomorrow gets yesterday's port back even after its cool-down ended.
    fn fresh_first<'p>(&self, pool: &'p Pool) -> impl Iterator<Item = u16> + 'p
    where
        Self: 'p,
    {
        let st = self.state;
        self.walk(pool)
            .filter(|p| !st.is_remembered(*p))
            .chain(self.walk(pool).filter(|p| st.is_remembered(*p)))
    }

    /// Chooses a port for one item (whose key has no live allocation).
    pub fn pick(&self, item: &AllocItem, rng: &mut SplitMix64) -> Result<Pick, Rejection> {
        let pool = self.resolve_pool(item)?;
        let key = item.key.as_deref();
        let sticky = self.sticky_port(item, pool);
        let wanted = item.port.or(sticky);
        let mut conflicts = Vec::new();
        let mut repeats = Repeats::new(wanted, sticky);
        for port in self.ordered_candidates(item, pool) {
            if repeats.seen_before(port) {
                continue;
            }
            // Why a port is unavailable is spelled out only for the rejection that names it: the
            // walk may pass hundreds of busy ports a probe just found (those the node remembers
            // busy are skipped as ranges).
            let held = self.state_unavailable(port, key);
            let free = held.is_none()
                && match self.probe.map(|pr| pr.finding(port)) {
                    Some(Finding::Busy) => {
                        conflicts.push(port);
                        false
                    }
                    Some(Finding::KnownBusy) => false,
                    Some(Finding::Unchecked) => return Err(Rejection::NeedProbe { port }),
                    Some(Finding::Free) | None => true,
                };
            if free {
                return Ok(Pick { port, pool: pool.name.clone(), conflicts });
            }
            if item.strategy == Strategy::Fail && Some(port) == wanted {
                let why = held.unwrap_or_else(|| Unavailable::BusyOnHost { host: self.host.to_string() });
                return Err(Rejection::PortUnavailable { port, why });
            }
        }
        if item.strategy == Strategy::Random {
            return self.pick_random(item, pool, conflicts, rng);
        }
        Err(self.exhausted(pool, key))
    }

    fn pick_random(
        &self,
        item: &AllocItem,
        pool: &Pool,
        conflicts: Vec<u16>,
        rng: &mut SplitMix64,
    ) -> Result<Pick, Rejection> {
        let key = item.key.as_deref();
        let mut unprobed = None;
        let eligible: Vec<u16> = self
            .walk(pool)
            .filter(|p| self.state_unavailable(*p, key).is_none())
            .filter(|p| match self.probe.map(|pr| pr.finding(*p)) {
                Some(Finding::Unchecked) => {
                    unprobed.get_or_insert(*p);
                    false
                }
                Some(Finding::Busy | Finding::KnownBusy) => false,
                Some(Finding::Free) | None => true,
            })
            .collect();
        if eligible.is_empty() {
            return Err(match unprobed {
                Some(port) => Rejection::NeedProbe { port },
                None => self.exhausted(pool, key),
            });
        }
        let port = eligible[rng.below(eligible.len())];
        Ok(Pick { port, pool: pool.name.clone(), conflicts })
    }

    /// The "pool exhausted" rejection, with a breakdown of what holds the pool.
    ///
    /// Every member's `apply` builds one for each item it rejects, so this walks what the pool
    /// holds (its allocations in port order, then the ports they leave, 64 allocated ports a
    /// step) and counts holders by name in a table sized once, with a fast fixed hash, without
    /// copying a name. At 35,536 held ports (as many holders) that is 1.1 ms; looking every
    /// port up and copying each holder's name was 10 ms (docs/benchmarks.md, tenth slice).
    fn exhausted(&self, pool: &Pool, key: Option<&str>) -> Rejection {
        let st = self.state;
        // At most one holder per port.
        let mut holders: HashMap<&str, u32, foldhash::fast::FixedState> =
            HashMap::with_capacity_and_hasher(pool.size() as usize, Default::default());
        let (mut reserved, mut cooling, mut busy, mut batch) = (0u32, 0u32, 0u32, 0u32);
        for r in &pool.ranges {
            for a in st.allocations_in(r.start(), r.end()) {
                if self.taken.contains(&a.port) {
                    batch += 1;
                } else {
                    *holders.entry(a.service.as_str()).or_default() += 1;
                }
            }
            for port in st.unallocated_ports(r.start(), r.end()) {
                if self.taken.contains(&port) {
                    batch += 1;
                } else if st.reservation(port).is_some() {
                    reserved += 1;
                } else if self.cooling_down(port, key).is_some() {
                    cooling += 1;
                } else if self
                    .probe
                    .is_some_and(|p| matches!(p.finding(port), Finding::Busy | Finding::KnownBusy))
                {
                    busy += 1;
                }
            }
        }
        let held: u32 = holders.values().sum();
        // The five largest holders, most ports first, then by name: a partial sort, since a
        // full pool may have as many holders as ports.
        let mut top: Vec<(&str, u32)> = holders.into_iter().collect();
        let by_size = |a: &(&str, u32), b: &(&str, u32)| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0));
        if top.len() > 5 {
            top.select_nth_unstable_by(5, by_size);
        }
        let shown = top.len().min(5);
        top[..shown].sort_by(by_size);
        let mut parts = Vec::new();
        if held > 0 {
            let names: Vec<String> = top[..shown].iter().map(|(s, n)| format!("{s}: {n}")).collect();
            let more = if top.len() > 5 { ", …" } else { "" };
            parts.push(format!("held {held}: {}{more}", names.join(", ")));
        }
        for (n, what) in [
            (reserved, "reserved"),
            (cooling, "cooling down"),
            (busy, "busy on host"),
            (batch, "taken in this batch"),
        ] {
            if n > 0 {
                parts.push(format!("{what} {n}"));
            }
        }
        Rejection::PoolExhausted {
            team: self.team.to_string(),
            pool: pool.name.clone(),
            size: pool.size(),
            unavailable: held + reserved + cooling + busy + batch,
            detail: parts.join("; "),
        }
    }

    /// Candidate ports for `item` that the state considers free, in the order `pick` would try
    /// them (random: a sample drawn from `rng`): the wanted port, if any, plus up to
    /// `width.wanted_free` others when the state holds the wanted port free, else up to
    /// `width.otherwise`. The ranges known busy are skipped, as `pick` skips them.
    pub fn candidates(&self, item: &AllocItem, width: PlanWidth, rng: &mut SplitMix64) -> Vec<u16> {
        let Ok(pool) = self.resolve_pool(item) else { return Vec::new() };
        let key = item.key.as_deref();
        let sticky = self.sticky_port(item, pool);
        let wanted = item.port.or(sticky);
        let mut out: Vec<u16> = Vec::new();
        // The wanted port is always probed, so a busy wanted port is seen and recorded.
        let n = match wanted {
            Some(w) => {
                out.push(w);
                if self.state_unavailable(w, key).is_none() { width.wanted_free } else { width.otherwise }
            }
            None => width.otherwise,
        };
        let others = |p: &u16| Some(*p) != wanted && self.state_unavailable(*p, key).is_none();
        if item.strategy == Strategy::Random {
            let free: Vec<u16> = self.walk(pool).filter(others).collect();
            if free.len() <= n {
                out.extend(free);
            } else {
                for _ in 0..n {
                    out.push(free[rng.below(free.len())]);
                }
            }
        } else {
            let mut repeats = Repeats::new(wanted, sticky);
            out.extend(
                self.ordered_candidates(item, pool)
                    .filter(others)
                    .filter(|p| !repeats.seen_before(*p))
                    .take(n),
            );
        }
        out
    }
}

/// The repeats of a walk of [`Selector::ordered_candidates`]: only its first ports (the wanted
/// and the sticky one) come again, so only they are remembered. A set of every port walked cost
/// an insertion per port, and a walk passes every port found busy below the first free one
/// (hundreds, in a pool across the host's ephemeral range: docs/benchmarks.md, sixteenth slice).
struct Repeats {
    heads: [Option<u16>; 2],
    seen: [bool; 2],
}

impl Repeats {
    fn new(wanted: Option<u16>, sticky: Option<u16>) -> Self {
        Self { heads: [wanted, sticky], seen: [false; 2] }
    }

    /// Whether `port` was walked already.
    fn seen_before(&mut self, port: u16) -> bool {
        let mut before = false;
        for (head, seen) in self.heads.iter().zip(self.seen.iter_mut()) {
            if *head == Some(port) {
                before |= *seen;
                *seen = true;
            }
        }
        before
    }
}

/// How many candidate ports to probe per item besides the wanted one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanWidth {
    /// When the state holds the wanted port free, `apply` will very likely take it: a narrow
    /// plan (one spare) keeps the common sticky case cheap.
    pub wanted_free: usize,
    /// Otherwise (no wanted port, or it is taken).
    pub otherwise: usize,
}

impl PlanWidth {
    /// The same width in both cases.
    pub fn uniform(n: usize) -> Self {
        Self { wanted_free: n, otherwise: n }
    }
}

fn describe_pools(pools: &[&Pool]) -> String {
    pools.iter().map(|p| format!("{} {}", p.name, p.ranges_text())).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::Repeats;

    /// A walk meets the wanted and sticky ports first and may meet them again where the pool's
    /// order does; only those second meetings are repeats. Any other port is never one, however
    /// often it is asked about (the walk's tail holds each port once).
    #[test]
    fn only_the_head_ports_repeat() {
        let mut r = Repeats::new(Some(8000), Some(8005));
        assert!(!r.seen_before(8000));
        assert!(!r.seen_before(8005));
        assert!(!r.seen_before(8001));
        assert!(!r.seen_before(8001), "a tail port is not remembered");
        assert!(r.seen_before(8000));
        assert!(r.seen_before(8005));

        let mut same = Repeats::new(Some(8000), Some(8000));
        assert!(!same.seen_before(8000));
        assert!(same.seen_before(8000), "wanted and sticky the same port: met twice, a repeat");

        let mut none = Repeats::new(None, None);
        assert!(!none.seen_before(8000));
        assert!(!none.seen_before(8000));
    }
}
