//! Ports a probe found busy on a host, remembered for a few seconds so that allocations do not
//! probe them, and look up their holders, again and again.
//!
//! Automatic selection hands out the lowest free port, so a port some other program listens on
//! (say 2024 inside a pool starting at 1024) is the first candidate of every allocation in that
//! pool while it stays busy. Probing it is cheap; naming its holder is not: it asks the kernel
//! for its listening sockets and walks `/proc/*/fd` (before sock_diag, it read `/proc/net/tcp*`,
//! for which the kernel walks its whole connection table: 73 % of a node's CPU while filling a
//! pool, measured with `perf`, docs/benchmarks.md). Planning also walks past the ports
//! remembered here without counting them ([`Remembered`]). A port found busy is
//! therefore reported busy from this memory, holder included, for [`BUSY_FOR`]; ports an
//! allocation asks for by number, or a sticky key's last port, are always probed afresh (the
//! user may just have stopped the program that held it). Reporting a free port busy only skips
//! it for a while; a busy port is never reported free from here.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use portmesh_core::Holder;

/// How long a port found busy is taken to stay busy without a new probe.
pub(crate) const BUSY_FOR: Duration = Duration::from_secs(10);

/// How often one busy port is logged as a conflict (it is recorded with every allocation that
/// skips it; the log says it once a minute).
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(60);

/// A host's ports found busy: when, and who held each.
type Found = HashMap<u16, (Instant, Option<Holder>)>;

/// Remembered busy ports, by host: when each was found busy, and its holder.
#[derive(Debug, Default)]
pub(crate) struct BusyMemory {
    seen: Mutex<HashMap<String, Found>>,
    logged: Mutex<HashMap<String, HashMap<u16, Instant>>>,
}

/// What the memory held for one host at one moment, sorted by port: the plan walks past these
/// ports without counting them (`State::plan`), and the split takes them from here instead of
/// probing them. One read of the memory serves both.
#[derive(Debug, Default)]
pub(crate) struct Remembered(Vec<(u16, Option<Holder>)>);

impl Remembered {
    /// The remembered busy ports, sorted.
    pub(crate) fn ports(&self) -> Vec<u16> {
        self.0.iter().map(|(p, _)| *p).collect()
    }

    /// Splits `candidates` into the ports remembered busy (with their holders) and the ones to
    /// probe. Ports in `always_probe` are never taken from memory.
    pub(crate) fn split(
        &self,
        candidates: &[u16],
        always_probe: &[u16],
    ) -> (Vec<(u16, Option<Holder>)>, Vec<u16>) {
        let (mut known, mut probe) = (Vec::new(), Vec::new());
        for &port in candidates {
            match self.0.binary_search_by_key(&port, |(p, _)| *p) {
                Ok(i) if !always_probe.contains(&port) => known.push((port, self.0[i].1.clone())),
                _ => probe.push(port),
            }
        }
        (known, probe)
    }
}

impl BusyMemory {
    /// The ports remembered busy on `host` at `now` (those found within [`BUSY_FOR`]).
    pub(crate) fn remembered(&self, host: &str, now: Instant) -> Remembered {
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(ports) = seen.get_mut(host) else { return Remembered::default() };
        ports.retain(|_, (at, _)| now.duration_since(*at) < BUSY_FOR);
        let mut held: Vec<(u16, Option<Holder>)> = ports.iter().map(|(p, (_, h))| (*p, h.clone())).collect();
        held.sort_unstable_by_key(|(p, _)| *p);
        Remembered(held)
    }

    /// Remembers what a probe of `host` found busy at `now`.
    pub(crate) fn found(&self, host: &str, busy: &[u16], holders: &[(u16, Holder)], now: Instant) {
        if busy.is_empty() {
            return;
        }
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let ports = seen.entry(host.to_string()).or_default();
        for &port in busy {
            let holder = holders.iter().find(|(p, _)| *p == port).map(|(_, h)| h.clone());
            ports.insert(port, (now, holder));
        }
    }

    /// Whether a conflict on `port` of `host` is to be logged now: not if it was within
    /// [`LOG_EVERY`].
    pub(crate) fn log_now(&self, host: &str, port: u16, now: Instant) -> bool {
        let mut logged = self.logged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let ports = logged.entry(host.to_string()).or_default();
        ports.retain(|_, at| now.duration_since(*at) < LOG_EVERY);
        match ports.entry(port) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_ports_are_remembered_per_host_for_a_while_and_asked_for_ports_are_probed_again() {
        let m = BusyMemory::default();
        let t0 = Instant::now();
        let holder = Holder::new(42, "squatter");
        m.found("a", &[2025, 2024], &[(2024, holder.clone())], t0);
        let a = m.remembered("a", t0 + Duration::from_secs(1));
        assert_eq!(a.ports(), [2024, 2025], "sorted, for the plan");
        let (known, probe) = a.split(&[2023, 2024, 2025, 2026], &[]);
        assert_eq!(known, vec![(2024, Some(holder)), (2025, None)]);
        assert_eq!(probe, vec![2023, 2026]);
        // Another host's ports are its own.
        let (known, probe) = m.remembered("b", t0).split(&[2024], &[]);
        assert!(known.is_empty() && probe == [2024]);
        // A port asked for by number is probed afresh.
        let (known, probe) = a.split(&[2024, 2025], &[2025]);
        assert_eq!((known.len(), probe), (1, vec![2025]));
        // Forgotten after BUSY_FOR.
        let later = m.remembered("a", t0 + BUSY_FOR);
        assert!(later.ports().is_empty() && later.split(&[2024], &[]).1 == [2024]);
    }

    #[test]
    fn a_conflict_is_logged_once_a_minute() {
        let m = BusyMemory::default();
        let t0 = Instant::now();
        assert!(m.log_now("a", 2024, t0));
        assert!(!m.log_now("a", 2024, t0 + Duration::from_secs(59)));
        assert!(m.log_now("b", 2024, t0));
        assert!(m.log_now("a", 2024, t0 + LOG_EVERY));
    }
}
