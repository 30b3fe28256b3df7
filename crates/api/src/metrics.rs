//! Counters the request path and the applied events feed, for `/metrics` (the node registers
//! them, with the figures it reads from the state at each scrape).

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::watch;

use portmesh_core::{EventKind, ReleaseCause};

use crate::Api;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok`, `rejected` (refused: a bad request, an exhausted pool…), `redirected` (sent to a
    /// follower, which named the leader) or `error` (not answered: no leader, a timeout…).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// What the node counts as it serves.
#[derive(Debug)]
pub struct RequestMetrics {
    /// `Allocate` requests by outcome.
    pub allocate_requests: Family<OutcomeLabels, Counter>,
    /// Time to answer an `Allocate`, in seconds (probe, Raft commit, apply).
    pub allocate_seconds: Histogram,
    /// Ports handed out by `Allocate` requests this node answered.
    pub ports_allocated: Counter,
    /// Open `Watch` streams.
    pub watch_streams: Gauge,
    /// Events converted to their wire form for watchers: once per event while it is among the
    /// newest (`watch.rs`), however many watchers send it.
    pub watch_events_encoded: Counter,
    /// Events this node applied, by kind: `allocated`, `released`, `expired` (released because a
    /// lease ended), `conflict`, `lease_granted`, `lease_revoked`, `lease_expired`, …
    pub events: Family<KindLabels, Counter>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics {
            allocate_requests: Family::default(),
            // 100 µs … ~3.3 s.
            allocate_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ports_allocated: Counter::default(),
            watch_streams: Gauge::default(),
            watch_events_encoded: Counter::default(),
            events: Family::default(),
        }
    }
}

impl RequestMetrics {
    /// Records one `Allocate` that took since `start`.
    pub fn allocate_done(&self, start: Instant, outcome: &str, ports: usize) {
        self.allocate_seconds.observe(start.elapsed().as_secs_f64());
        self.allocate_requests.get_or_create(&OutcomeLabels { outcome: outcome.into() }).inc();
        self.ports_allocated.inc_by(ports as u64);
    }
}

/// The outcome label of a request that was not answered with data.
pub(crate) fn outcome_of(s: &tonic::Status) -> &'static str {
    if s.metadata().get(crate::ERROR_METADATA).is_some_and(|k| k == "not_leader") {
        return "redirected";
    }
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Internal => "error",
        _ => "rejected",
    }
}

/// Keeps an open watch stream counted until dropped.
#[derive(Debug)]
pub(crate) struct StreamGuard(Arc<RequestMetrics>);

impl StreamGuard {
    pub(crate) fn new(m: Arc<RequestMetrics>) -> Self {
        m.watch_streams.inc();
        StreamGuard(m)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.watch_streams.dec();
    }
}

fn kind(e: &EventKind) -> &'static str {
    match e {
        EventKind::Allocated(_) => "allocated",
        EventKind::Released { cause: ReleaseCause::LeaseExpired, .. } => "expired",
        EventKind::Released { .. } => "released",
        EventKind::Reserved(_) => "reserved",
        EventKind::Unreserved { .. } => "unreserved",
        EventKind::PoolAdded(_) => "pool_added",
        EventKind::PoolRemoved { .. } => "pool_removed",
        EventKind::LeaseGranted { .. } => "lease_granted",
        EventKind::LeaseRevoked { .. } => "lease_revoked",
        EventKind::LeaseExpired { .. } => "lease_expired",
        EventKind::Conflict(_) => "conflict",
        EventKind::CooldownChanged { .. } => "cooldown_changed",
        EventKind::ServiceRegistered(_) => "service_registered",
        EventKind::ServiceDeregistered { .. } => "service_deregistered",
        EventKind::HealthChanged { .. } => "health_changed",
    }
}

/// Counts the events this node applies, by kind, until `shutdown`. It follows the applied
/// index; if more events than the history keeps were applied between two looks (far beyond
/// anything seen here), the ones dropped from the history are not counted.
pub async fn count_events(api: Api, mut shutdown: watch::Receiver<bool>) {
    let reader = api.node().state().clone();
    let mut applied = reader.applied_index();
    let mut next = reader.read().state.revision() + 1;
    loop {
        applied.borrow_and_update();
        {
            let sm = reader.read();
            for e in sm.state.events_since(next) {
                api.metrics().events.get_or_create(&KindLabels { kind: kind(&e.kind).into() }).inc();
            }
            next = sm.state.revision() + 1;
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
