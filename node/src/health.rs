//! What the node says of its health: gRPC health (liveness `""`, readiness per name), and the
//! node stopping itself when Raft stops on a storage failure.

use std::sync::Arc;
use std::time::Duration;

use portmesh_raft::RaftNode;
use tokio::sync::watch;

/// The names gRPC health answers for besides `""`: the node as a whole (`portmesh`) and each
/// public service. `""` is liveness: SERVING while the process serves and its Raft runs. The
/// names are readiness: SERVING exactly while this node belongs to a cluster (a joining node:
/// once it caught up), knows a leader and has applied what it holds of the log (within
/// [`READY_LAG`] entries), so a probe naming any of them (Kubernetes'
/// gRPC readiness probe sends the name in the manifest) tells "part of a cluster with a leader,
/// caught up" from "process up". Other names are NOT_FOUND. `/healthz` and `/readyz` mean the
/// same.
pub const HEALTH_NAMES: &[&str] = &[
    "portmesh",
    "portmesh.v1.Allocator",
    "portmesh.v1.Leases",
    "portmesh.v1.Pools",
    "portmesh.v1.Cluster",
    "portmesh.v1.Watch",
    "portmesh.v1.Registry",
];

/// Log entries a ready node may hold unapplied: entries in flight under load, not a node that
/// replays or catches up a long log.
pub const READY_LAG: u64 = 1024;

/// The statuses a node answers with from its first accepted call, set before it serves: liveness
/// SERVING, every readiness name NOT_SERVING until [`report_health`] says otherwise. A name in
/// [`HEALTH_NAMES`] is never NOT_FOUND, which a probe or a client reads as "wrong service name"
/// rather than "not ready yet".
pub(crate) async fn set_initial(reporter: &tonic_health::server::HealthReporter) {
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    set_readiness(reporter, tonic_health::ServingStatus::NotServing).await;
}

/// Sets every readiness name of [`HEALTH_NAMES`] to `status`.
async fn set_readiness(reporter: &tonic_health::server::HealthReporter, status: tonic_health::ServingStatus) {
    for name in HEALTH_NAMES {
        reporter.set_service_status(*name, status).await;
    }
}

/// Keeps the gRPC health status in line with the node's state (see [`HEALTH_NAMES`]).
///
/// Raft stopping on its own (openraft stops at a storage error: a full or failing disk) is told
/// here too: NOT_SERVING, one ERROR line naming the cause, and the node shuts down, since this
/// process can write no more (its metrics would otherwise go on naming a leader).
pub(crate) async fn report_health(
    node: RaftNode,
    reporter: tonic_health::server::HealthReporter,
    shutdown: watch::Sender<bool>,
    failure: Arc<std::sync::Mutex<Option<String>>>,
) {
    let mut metrics = node.raft.metrics();
    // A leader cut off from its quorum goes on naming itself (openraft 0.9 has no check-quorum):
    // while leading, the quorum is confirmed every QUORUM_CHECK.
    let mut check = tokio::time::interval(QUORUM_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quorum_ok = true;
    // A joining node knows the leader (it replicates to it) before it has caught up and been
    // told the cluster's id: it is ready once it has.
    let mut in_cluster = false;
    let mut was = None;
    loop {
        in_cluster = in_cluster || !node.cluster_id().is_empty();
        let (ready, leading, stopped) = {
            let m = metrics.borrow_and_update();
            let applied = m.last_applied.map_or(0, |l| l.index);
            let behind = m.last_log_index.unwrap_or(0).saturating_sub(applied);
            let stopped = m.running_state.as_ref().err().map(ToString::to_string);
            (m.current_leader.is_some() && behind <= READY_LAG, m.current_leader == Some(node.id), stopped)
        };
        if let Some(why) = stopped {
            tracing::error!(error = %why, "Raft stopped: this node cannot write any more; shutting down (start it again once the cause is fixed)");
            *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
            reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            set_readiness(&reporter, tonic_health::ServingStatus::NotServing).await;
            shutdown.send_replace(true);
            return;
        }
        let ready = ready && in_cluster && (!leading || quorum_ok);
        if was != Some(ready) {
            was = Some(ready);
            let status = if ready {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            set_readiness(&reporter, status).await;
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = check.tick() => {
                quorum_ok = !node.is_leader()
                    || matches!(tokio::time::timeout(QUORUM_CHECK, node.read_barrier(false)).await, Ok(Ok(_)));
            }
        }
    }
}

/// How often a leader confirms it still has its quorum, for readiness.
const QUORUM_CHECK: Duration = Duration::from_secs(1);
