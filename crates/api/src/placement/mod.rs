//! Where an allocation's ports come from: plan candidates from the applied state, probe them on
//! the host the allocation is for (here, or through the member running there: [`hosts`]), and
//! propose the batch with what the probe found busy; the state machine re-checks the plan and
//! asks for another round if the state moved under it.

mod hosts;
mod memory;

pub(crate) use hosts::HostMap;
pub(crate) use memory::ProbeMemory;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use portmesh_core::{AllocateBatch, Command, Holder, HostProbe, PlanWidth, Rejection, Response};
use portmesh_raft::now_ms;

use crate::api::accepted;
use crate::{Api, ApiError};

/// What a probe found busy on a host, and who holds those ports where the OS told.
#[derive(Debug, Default)]
pub(crate) struct Busy {
    pub(crate) ports: Vec<u16>,
    pub(crate) holders: Vec<(u16, Holder)>,
}

/// Probes `ports` on this host and looks up who listens on the busy ones (a conflict): one read
/// of the socket table for all of them, and of the process table only if some has a listener.
///
/// A probe of up to [`INLINE_PROBE_PORTS`] ports binds on the calling async worker: two
/// `socket`+`bind`+`close` per port take microseconds, less than handing the work to a blocking
/// thread and waking the worker again (docs/benchmarks.md, thirteenth slice). Larger probes, and
/// the owner lookup (which reads `/proc`), run on a blocking thread.
pub(crate) async fn probe_here(ports: Vec<u16>) -> Result<Busy, tokio::task::JoinError> {
    if ports.len() > INLINE_PROBE_PORTS {
        return tokio::task::spawn_blocking(move || with_holders(portmesh_probe::busy_ports(&ports))).await;
    }
    let busy = portmesh_probe::busy_ports(&ports);
    if busy.is_empty() {
        return Ok(Busy::default());
    }
    tokio::task::spawn_blocking(move || with_holders(busy)).await
}

/// Ports bound on the async worker itself by [`probe_here`].
const INLINE_PROBE_PORTS: usize = 16;

/// `busy` ports with their holders, where the OS tells.
fn with_holders(busy: Vec<u16>) -> Busy {
    if busy.is_empty() {
        return Busy::default();
    }
    // Several listeners of one port (IPv4 and IPv6) are narrowed to one by `HostProbe::with_owners`.
    let holders = portmesh_probe::owners_of(&busy)
        .into_iter()
        .filter_map(|(port, o)| Some((port, Holder::new(o.pid?, o.command.as_deref().unwrap_or_default()))))
        .collect();
    Busy { ports: busy, holders }
}

/// Candidate ports probed per item beyond the ones in flight.
const BASE_CANDIDATES: usize = 4;

/// Rounds of plan-probe-propose before giving up (the last ones probe whole pools).
const MAX_ROUNDS: usize = 6;

struct InFlight<'a>(&'a AtomicUsize, usize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

impl Api {
    /// Probes `candidates` on `host`: here if it is this node's host, else through the member
    /// node running there. Returns what was found busy (and who holds it) and whether anyone
    /// probed.
    async fn probe_host(&self, host: &str, candidates: &[u16]) -> (Busy, bool) {
        let inner = &self.inner;
        if host == inner.host {
            return match probe_here(candidates.to_vec()).await {
                Ok(busy) => (busy, true),
                Err(e) => {
                    tracing::warn!(error = %e, "the probe task failed; granting unprobed");
                    (Busy::default(), false)
                }
            };
        }
        match inner.hosts.probe(&inner.node, host, candidates).await {
            Some(busy) => (busy, true),
            None => (Busy::default(), false),
        }
    }

    /// Plans, probes on the batch's host and proposes, re-planning when the state moved under
    /// the plan (`NeedProbe`). Every port handed out was probed free just before the proposal
    /// (within `memory::FREE_FOR`), unless no node runs on the batch's host (then `false` comes
    /// back with the response and only the ports the client `reported` busy are skipped).
    pub(crate) async fn allocate_batch(
        &self,
        mut batch: AllocateBatch,
        reported: &[u16],
    ) -> std::result::Result<(Response, bool), ApiError> {
        let inner = &self.inner;
        let items = batch.items.len();
        inner.in_flight.fetch_add(items, Ordering::Relaxed);
        let _guard = InFlight(&inner.in_flight, items);
        // First round: narrow for a free wanted port, and as wide as the allocations in flight
        // otherwise. Every further round widens both fourfold (the last ones cover whole pools).
        let mut width = PlanWidth {
            wanted_free: 1,
            otherwise: BASE_CANDIDATES + inner.in_flight.load(Ordering::Relaxed),
        };
        for round in 0..MAX_ROUNDS {
            let seed = now_ms() ^ ((round as u64) << 48);
            let remembered = inner.probes.remembered(&batch.host, Instant::now());
            let (candidates, asked, known_busy) = {
                let sm = inner.node.state().read();
                let now = now_ms();
                let asked = sm.state.asked_for(&batch);
                let known_busy = sm.state.busy_runs(&remembered.busy_but(&asked), now);
                (sm.state.plan(&batch, now, width, seed, &known_busy), asked, known_busy)
            };
            let probe = remembered.to_probe(&candidates, &asked);
            let (Busy { mut ports, holders }, probed) = if probe.is_empty() {
                (Busy::default(), true)
            } else {
                self.probe_host(&batch.host, &probe).await
            };
            if probed {
                inner.probes.found(&batch.host, &probe, &ports, Instant::now());
            }
            if !ports.is_empty() {
                tracing::info!(host = %batch.host, busy = ?ports, "ports busy on the host will be skipped");
            }
            ports.extend_from_slice(reported);
            let mut checked = candidates;
            checked.extend_from_slice(reported);
            batch.probe =
                Some(HostProbe::new(checked, ports).with_owners(holders).with_known_busy(known_busy));
            match inner.node.propose(Command::Allocate(batch.clone())).await? {
                Response::Rejected(Rejection::NeedProbe { port }) => {
                    tracing::debug!(port, round, "state moved under the plan; probing again");
                    let wider = width.otherwise.max(width.wanted_free).saturating_mul(4);
                    width = PlanWidth::uniform(wider);
                }
                other => return accepted(other).map(|r| (r, probed)),
            }
        }
        Err(ApiError::Raft(portmesh_raft::ProposeError::Unavailable(format!(
            "could not settle an allocation after {MAX_ROUNDS} probe rounds (the pool changes faster than this node \
             can probe it): retry"
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener's port is found busy, with this process as its holder, whether the probe is
    /// small enough to bind on the async worker or large enough to go to a blocking thread.
    #[tokio::test]
    async fn a_listener_is_found_busy_with_its_holder_by_small_and_large_probes() {
        let listener = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        // Free ports beside it, found by binding and closing (the OS picks them).
        let free: Vec<u16> = (0..INLINE_PROBE_PORTS + 4)
            .map(|_| std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap().local_addr().unwrap().port())
            .filter(|p| *p != port)
            .collect();
        for size in [1, INLINE_PROBE_PORTS + 1] {
            let mut ports: Vec<u16> = free.iter().copied().take(size - 1).collect();
            ports.push(port);
            let busy = probe_here(ports).await.unwrap();
            // Another program could take one of the free ports meanwhile: only the listener's
            // port, and that not all were found busy, are certain.
            assert!(
                busy.ports.contains(&port) && busy.ports.len() < size.max(2),
                "probe of {size} ports: {busy:?}"
            );
            let ours = busy.holders.iter().any(|(p, h)| *p == port && h.pid == std::process::id());
            assert!(ours, "probe of {size} ports: holders {:?}", busy.holders);
        }
    }
}
