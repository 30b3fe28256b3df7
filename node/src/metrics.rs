//! `/metrics`: the node's state and Raft progress in the Prometheus (OpenMetrics) text format,
//! built with `prometheus-client` from the replicated state and the node's counters at each
//! scrape, so nothing has to be kept in step with the state machine.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use portmesh_api::Api;
use portmesh_core::{EventKind, HealthStatus};
use portmesh_raft::now_ms;

/// The content type of the OpenMetrics text format `prometheus-client` writes.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    team: String,
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: i64) {
    r.register(name, help, ConstGauge::new(v));
}

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    r.register(name, help, ConstCounter::new(v));
}

/// The metrics text of this node.
pub(crate) fn render(api: &Api) -> Result<String, std::fmt::Error> {
    let s = api.status();
    let mut r = Registry::default();
    let now = now_ms();
    {
        let sm = api.node().state().read();
        let st = &sm.state;
        let size = Family::<PoolLabels, Gauge>::default();
        let allocated = Family::<PoolLabels, Gauge>::default();
        let reserved = Family::<PoolLabels, Gauge>::default();
        let cooling = Family::<PoolLabels, Gauge>::default();
        let utilization = Family::<PoolLabels, Gauge<f64, AtomicU64>>::default();
        for p in st.pools() {
            let u = st.pool_usage(p, now);
            let l = PoolLabels { team: p.team.clone(), pool: p.name.clone() };
            size.get_or_create(&l).set(i64::from(u.size));
            allocated.get_or_create(&l).set(i64::from(u.allocated));
            reserved.get_or_create(&l).set(i64::from(u.reserved));
            cooling.get_or_create(&l).set(i64::from(u.cooling));
            let ratio = if u.size == 0 { 0.0 } else { f64::from(u.allocated) / f64::from(u.size) };
            utilization.get_or_create(&l).set(ratio);
        }
        r.register("portmesh_pool_size_ports", "Ports in the pool", size);
        r.register("portmesh_pool_allocated_ports", "Live allocations in the pool", allocated);
        r.register("portmesh_pool_reserved_ports", "Reserved ports in the pool", reserved);
        r.register("portmesh_pool_cooling_ports", "Released ports of the pool still cooling down", cooling);
        r.register("portmesh_pool_utilization_ratio", "Allocated ports over pool size", utilization);
        gauge(&mut r, "portmesh_leases", "Live leases", st.lease_count() as i64);
        let services = Family::<StatusLabels, Gauge>::default();
        // Every status is shown, zero or not; one pass counts them.
        for h in [HealthStatus::Unknown, HealthStatus::Passing, HealthStatus::Warning, HealthStatus::Critical]
        {
            services.get_or_create(&StatusLabels { status: h.to_string() }).set(0);
        }
        for svc in st.services() {
            services.get_or_create(&StatusLabels { status: svc.status.to_string() }).inc();
        }
        r.register("portmesh_services", "Registered services by health", services);
        let conflicts = st.events_since(0).filter(|e| matches!(e.kind, EventKind::Conflict(_))).count();
        gauge(&mut r, "portmesh_recent_conflicts", "Conflicts in the kept event history", conflicts as i64);
        gauge(&mut r, "portmesh_revision", "Revision of the applied state", s.revision as i64);
    }
    gauge(&mut r, "portmesh_raft_term", "Current Raft term", s.term as i64);
    gauge(
        &mut r,
        "portmesh_raft_leader_id",
        "Id of the leader this node knows (0: none)",
        s.leader_id as i64,
    );
    let running = api.node().metrics().running_state.is_ok();
    gauge(
        &mut r,
        "portmesh_raft_running",
        "1 while Raft runs; 0 once it stopped on a storage error (the node then shuts down)",
        i64::from(running),
    );
    gauge(
        &mut r,
        "portmesh_raft_is_leader",
        "1 if this node leads",
        i64::from(running && s.leader_id == s.node_id),
    );
    gauge(&mut r, "portmesh_raft_commit_index", "Highest log index known committed", s.commit_index as i64);
    gauge(&mut r, "portmesh_raft_applied_index", "Highest log index applied", s.applied_index as i64);
    gauge(&mut r, "portmesh_raft_members", "Members of the cluster", s.members.len() as i64);
    counter(&mut r, "portmesh_fsyncs", "Log fsyncs", s.fsyncs);
    counter(&mut r, "portmesh_log_entries_flushed", "Log entries made durable", s.entries_flushed);
    counter(&mut r, "portmesh_commands_applied", "Commands applied by the state machine", s.commands_applied);
    let per_fsync = if s.fsyncs == 0 { 0.0 } else { s.entries_flushed as f64 / s.fsyncs as f64 };
    r.register(
        "portmesh_log_entries_per_fsync",
        "Log entries made durable per fsync since start (group commit)",
        ConstGauge::new(per_fsync),
    );
    let m = api.metrics();
    r.register(
        "portmesh_allocate_requests",
        "Allocate requests answered, by outcome",
        m.allocate_requests.clone(),
    );
    r.register(
        "portmesh_allocate_duration_seconds",
        "Time to answer an Allocate request",
        m.allocate_seconds.clone(),
    );
    r.register(
        "portmesh_ports_allocated",
        "Ports handed out by Allocate requests this node answered",
        m.ports_allocated.clone(),
    );
    r.register("portmesh_watch_streams", "Open Watch streams", m.watch_streams.clone());
    r.register(
        "portmesh_watch_events_encoded",
        "Events converted to their wire form for watchers (once per event, however many watchers send it)",
        m.watch_events_encoded.clone(),
    );
    r.register(
        "portmesh_events",
        "Events this node applied since start, by kind (lease_granted, lease_expired, conflict, ...)",
        m.events.clone(),
    );
    gauge(&mut r, "portmesh_data_size_bytes", "Size of the data directory on disk", s.data_size_bytes as i64);
    gauge(&mut r, "portmesh_process_resident_memory_bytes", "Resident memory of this process", rss_bytes());
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r)?;
    Ok(out)
}

/// This process's resident set size (Linux; 0 elsewhere).
fn rss_bytes() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<i64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
