//! What probes found on each host, remembered for a short while so that allocations do not probe
//! the same ports, and look up their holders, again and again.
//!
//! Automatic selection hands out the lowest free port, so a port some other program listens on
//! (say 2024 inside a pool starting at 1024) is the first candidate of every allocation in that
//! pool while it stays busy. Probing it is cheap; naming its holder is not: it asks the kernel
//! for its listening sockets and walks `/proc/*/fd` (before sock_diag, it read `/proc/net/tcp*`,
//! for which the kernel walks its whole connection table: 73 % of a node's CPU while filling a
//! pool, measured with `perf`, docs/benchmarks.md). A port found busy is therefore reported busy
//! from this memory for [`BUSY_FOR`], as part of the ranges known busy that the allocation
//! carries (`State::busy_runs`, `HostProbe::known_busy`): planning and `apply` skip those ranges
//! whole. Reporting a free port busy only skips it for a while.
//!
//! Concurrent allocations plan overlapping candidates (every plan covers the ports the others in
//! flight may take), so each port was probed once per allocation in flight: a third of a node's
//! CPU in `socket`/`bind`/`close` at 16 clients taking distinct ports (`perf`,
//! docs/benchmarks.md). A port found free is therefore reported free for [`FREE_FOR`], a
//! window shorter than an allocation's own way from probe to commit to the client's bind.
//!
//! Ports an allocation asks for by number, or a sticky key's last port, are always probed afresh
//! (the user may just have stopped, or started, the program that holds it).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a port found busy is taken to stay busy without a new probe.
pub(crate) const BUSY_FOR: Duration = Duration::from_secs(10);

/// How long a port found free is taken to stay free without a new probe.
pub(crate) const FREE_FOR: Duration = Duration::from_millis(20);

/// How often a host's busy ports are swept of the expired ones (between sweeps, reads skip
/// them).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Recent probe results, by host.
#[derive(Debug, Default)]
pub(crate) struct ProbeMemory {
    hosts: Mutex<HashMap<String, HostMemory>>,
}

/// What probes found on one host: each port is in at most one of the two maps, as its latest
/// probe found it. Busy ports are kept in port order: every allocation reads them all, sorted,
/// and in a pool across the host's ephemeral range they are hundreds; sorting them, and sweeping
/// the expired ones out, on every read was 9 % of a filling node's CPU (docs/benchmarks.md,
/// eighteenth slice).
#[derive(Debug, Default)]
struct HostMemory {
    /// Found busy: when.
    busy: BTreeMap<u16, Instant>,
    /// Found free: when (few: they expire within [`FREE_FOR`]).
    free: HashMap<u16, Instant>,
    /// When `busy` was last swept of expired ports.
    swept: Option<Instant>,
}

/// What the memory held for one host at one moment, sorted by port: the busy ports become the
/// ranges the plan and the proposal skip, and the free ones are left out of the probe. One read of
/// the memory serves both.
#[derive(Debug, Default)]
pub(crate) struct Remembered {
    busy: Vec<u16>,
    free: Vec<u16>,
}

impl Remembered {
    /// The remembered busy ports but `always_probe`, sorted: the ports the allocation may report
    /// busy without probing them.
    pub(crate) fn busy_but(&self, always_probe: &[u16]) -> Vec<u16> {
        self.busy.iter().copied().filter(|p| !always_probe.contains(p)).collect()
    }

    /// The `candidates` to probe now: all but those remembered free (left out: the proposal
    /// reports every candidate checked and only the ones found busy busy), and every port in
    /// `always_probe`. A plan walks none of the ports remembered busy but those in
    /// `always_probe` (the others are in the ranges it skips); one that did would be probed
    /// again, never reported free from memory.
    pub(crate) fn to_probe(&self, candidates: &[u16], always_probe: &[u16]) -> Vec<u16> {
        let free = |port: &u16| self.free.binary_search(port).is_ok();
        candidates.iter().copied().filter(|p| always_probe.contains(p) || !free(p)).collect()
    }
}

impl ProbeMemory {
    /// What is remembered of `host` at `now` (busy ports found within [`BUSY_FOR`], free ones
    /// within [`FREE_FOR`]).
    pub(crate) fn remembered(&self, host: &str, now: Instant) -> Remembered {
        let mut hosts = self.hosts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(mem) = hosts.get_mut(host) else { return Remembered::default() };
        let busy_now = |at: &Instant| now.saturating_duration_since(*at) < BUSY_FOR;
        if mem.swept.is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_EVERY) {
            mem.busy.retain(|_, at| busy_now(at));
            mem.swept = Some(now);
        }
        mem.free.retain(|_, at| now.saturating_duration_since(*at) < FREE_FOR);
        let busy = mem.busy.iter().filter(|(_, at)| busy_now(at)).map(|(port, _)| *port).collect();
        let mut free: Vec<u16> = mem.free.keys().copied().collect();
        free.sort_unstable();
        Remembered { busy, free }
    }

    /// Remembers what a probe of `probed` on `host` found at `now`: the ports in `busy` busy,
    /// the others free.
    pub(crate) fn found(&self, host: &str, probed: &[u16], busy: &[u16], now: Instant) {
        if probed.is_empty() {
            return;
        }
        let mut hosts = self.hosts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mem = hosts.entry(host.to_string()).or_default();
        for &port in probed {
            if busy.contains(&port) {
                mem.busy.insert(port, now);
                mem.free.remove(&port);
            } else {
                mem.free.insert(port, now);
                mem.busy.remove(&port);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_results_are_remembered_per_host_for_a_while_and_asked_for_ports_are_probed_again() {
        let m = ProbeMemory::default();
        let t0 = Instant::now();
        m.found("a", &[2023, 2024, 2025, 2026], &[2025, 2024], t0);
        let a = m.remembered("a", t0 + Duration::from_millis(1));
        assert_eq!(a.busy_but(&[]), [2024, 2025], "sorted, for the ranges known busy");
        assert_eq!(
            a.to_probe(&[2022, 2023, 2024, 2025, 2026], &[]),
            [2022, 2024, 2025],
            "2023 and 2026 were just found free; a busy port is never taken from memory as checked"
        );
        // Another host's ports are its own.
        assert_eq!(m.remembered("b", t0).to_probe(&[2023, 2024], &[]), [2023, 2024]);
        // A port asked for by number is probed afresh, busy or free, and is not reported busy.
        assert_eq!(a.to_probe(&[2023, 2024, 2025, 2026], &[2023, 2025]), [2023, 2024, 2025]);
        assert_eq!(a.busy_but(&[2023, 2025]), [2024]);
        // Free ports are forgotten after FREE_FOR, busy ones after BUSY_FOR.
        let soon = m.remembered("a", t0 + FREE_FOR);
        assert_eq!(
            (soon.busy_but(&[]), soon.to_probe(&[2023, 2024], &[])),
            (vec![2024, 2025], vec![2023, 2024])
        );
        let later = m.remembered("a", t0 + BUSY_FOR);
        assert!(later.busy_but(&[]).is_empty());
        let kept = |m: &ProbeMemory| m.hosts.lock().unwrap().get("a").map(|h| (h.busy.len(), h.free.len()));
        assert_eq!(kept(&m), Some((0, 0)), "expired ports are swept out, not only skipped");
        // A new probe overrides: a port found busy again is busy, one found free is free.
        m.found("a", &[2024, 2023], &[2023], t0 + BUSY_FOR);
        let now = m.remembered("a", t0 + BUSY_FOR);
        assert_eq!((now.busy_but(&[]), now.to_probe(&[2023, 2024], &[])), (vec![2023], vec![2023]));
    }
}
