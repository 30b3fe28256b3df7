//! [`Api`]: the state every service of one node shares, and what more than one service needs
//! (proposing a command, the node's status and statistics, the tonic servers).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use portmesh_core::{Command, Response};
use portmesh_proto::BadRequest;
use portmesh_proto::v1 as pb;
use portmesh_raft::{RaftNode, now_ms};
use tokio::sync::watch;
use tonic::Status;

use crate::ApiError;

/// What every handler returns.
pub(crate) type Result<T> = std::result::Result<tonic::Response<T>, Status>;

/// Lets a client ask the node to shut down (the `Cluster.Shutdown` RPC).
pub type ShutdownHandle = watch::Sender<bool>;

/// Shared state of all services of one node.
#[derive(Debug, Clone)]
pub struct Api {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) node: RaftNode,
    /// This host's name, recorded in allocations the node probes for.
    pub(crate) host: String,
    pub(crate) data_dir: String,
    pub(crate) http_addr: String,
    pub(crate) shutdown: ShutdownHandle,
    /// Allocation items proposed but not yet applied: each one may take a port ahead of the next
    /// request, so the next plan must probe that many more candidates.
    pub(crate) in_flight: AtomicUsize,
    /// Which member runs on which host, for probing where an allocation is for.
    pub(crate) hosts: crate::placement::HostMap,
    /// What probes found lately, by host (see `placement/memory.rs`).
    pub(crate) probes: crate::placement::ProbeMemory,
    /// `Cluster.Probe` requests served (probes this node ran for other members).
    pub(crate) probes_served: std::sync::atomic::AtomicU64,
    pub(crate) metrics: Arc<crate::metrics::RequestMetrics>,
    /// Started with `--auth`: callers need tokens even before the state holds one.
    pub(crate) auth: bool,
    /// Events in their wire form, encoded once for all watchers (see `watch.rs`).
    pub(crate) wire_events: Arc<crate::watch::WireEvents>,
}

/// Resolves once the node is shutting down: streams end then, since a graceful shutdown waits
/// for every open stream.
pub(crate) async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: dropped here, before any other await.
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}

/// The team a request names (checked), else the default team.
pub(crate) fn team(t: &str) -> std::result::Result<String, ApiError> {
    Ok(portmesh_proto::team(t)?)
}

pub(crate) fn unexpected(r: Response) -> ApiError {
    ApiError::Internal(format!("unexpected state machine response {r:?}"))
}

/// Turns a rejection into an error, any other response into itself.
pub(crate) fn accepted(r: Response) -> std::result::Result<Response, ApiError> {
    match r {
        Response::Rejected(rej) => Err(rej.into()),
        other => Ok(other),
    }
}

impl Api {
    pub fn new(
        node: RaftNode,
        host: String,
        data_dir: String,
        http_addr: String,
        shutdown: ShutdownHandle,
        auth: bool,
    ) -> Self {
        let metrics = Arc::<crate::metrics::RequestMetrics>::default();
        let wire_events = Arc::new(crate::watch::WireEvents::new(metrics.watch_events_encoded.clone()));
        Api {
            inner: Arc::new(Inner {
                node,
                host,
                data_dir,
                http_addr,
                shutdown,
                in_flight: AtomicUsize::new(0),
                probes: crate::placement::ProbeMemory::default(),
                hosts: crate::placement::HostMap::default(),
                probes_served: std::sync::atomic::AtomicU64::new(0),
                metrics,
                auth,
                wire_events,
            }),
        }
    }

    pub fn node(&self) -> &RaftNode {
        &self.inner.node
    }

    /// What this node counts as it serves (see `metrics.rs`).
    pub fn metrics(&self) -> &Arc<crate::metrics::RequestMetrics> {
        &self.inner.metrics
    }

    /// The host this node runs on (and answers probes and runs health checks for).
    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// How many probes this node ran for other members (`Cluster.Probe`).
    pub fn probes_served(&self) -> u64 {
        self.inner.probes_served.load(Ordering::Relaxed)
    }

    pub(crate) async fn propose(&self, cmd: Command) -> std::result::Result<Response, ApiError> {
        accepted(self.inner.node.propose(cmd).await?)
    }

    /// Converts a request into its command at the boundary (a bad field is refused, nothing
    /// proposed) and proposes it.
    pub(crate) async fn propose_request<'r, R>(&self, req: &'r R) -> std::result::Result<Response, ApiError>
    where
        Command: TryFrom<&'r R, Error = BadRequest>,
    {
        self.propose(Command::try_from(req)?).await
    }

    pub fn allocator(&self) -> pb::allocator_server::AllocatorServer<Self> {
        pb::allocator_server::AllocatorServer::new(self.clone())
    }

    pub fn leases(&self) -> pb::leases_server::LeasesServer<Self> {
        pb::leases_server::LeasesServer::new(self.clone())
    }

    pub fn pools(&self) -> pb::pools_server::PoolsServer<Self> {
        pb::pools_server::PoolsServer::new(self.clone())
    }

    pub fn cluster(&self) -> pb::cluster_server::ClusterServer<Self> {
        pb::cluster_server::ClusterServer::new(self.clone())
    }

    pub fn tokens(&self) -> pb::tokens_server::TokensServer<Self> {
        pb::tokens_server::TokensServer::new(self.clone())
    }

    /// The node's status, as `Cluster.Status` and the HTTP status page report it.
    /// Usage and recommendations of `team` ("" = every team) from this node's applied state,
    /// judged against this host's ephemeral port range.
    pub fn stats(&self, team: &str) -> pb::StatsResponse {
        let sm = self.inner.node.state().read();
        let team = (!team.is_empty()).then_some(team);
        let s = portmesh_core::stats::stats(&sm.state, team, now_ms(), portmesh_probe::ephemeral_range());
        (&s, sm.state.revision()).into()
    }

    pub fn status(&self) -> pb::StatusResponse {
        let node = &self.inner.node;
        let m = node.metrics();
        let leader = m.current_leader;
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| {
                let role = if Some(*id) == leader {
                    "leader"
                } else if !voters.contains(id) {
                    "learner"
                } else if *id == node.id && m.state == openraft::ServerState::Candidate {
                    "candidate"
                } else {
                    "follower"
                };
                pb::Member { id: *id, addr: n.addr.clone(), role: role.into() }
            })
            .collect();
        let revision = node.state().read().state.revision();
        pb::StatusResponse {
            node_id: node.id,
            leader_id: leader.unwrap_or(0),
            term: m.current_term,
            members,
            // openraft 0.9's metrics do not expose the commit index; every applied entry is
            // committed, so the applied index is the highest index this node knows committed.
            commit_index: m.last_applied.map_or(0, |l| l.index),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            revision,
            data_dir: self.inner.data_dir.clone(),
            http_addr: self.inner.http_addr.clone(),
            addr: node.addr.clone(),
            fsyncs: node.store.stats().flushes.load(Ordering::Relaxed),
            entries_flushed: node.store.stats().entries_flushed.load(Ordering::Relaxed),
            data_size_bytes: node.store.size_on_disk(),
            now_ms: portmesh_raft::now_ms(),
            commands_applied: node.store.stats().commands_applied.load(Ordering::Relaxed),
            cluster_id: node.cluster_id(),
            host: self.inner.host.clone(),
        }
    }
}
