//! Implementations of the `portmesh.v1` services over one [`RaftNode`].

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::Stream;
use portmesh_core::{AllocateBatch, Command, Holder, HostProbe, PlanWidth, Rejection, Response};
use portmesh_proto::v1 as pb;
use portmesh_proto::{BadRequest, required_port};
use portmesh_raft::{RaftNode, now_ms};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::{Request, Status, Streaming};

use crate::ApiError;

type Result<T> = std::result::Result<tonic::Response<T>, Status>;

/// Lets a client ask the node to shut down (the `Cluster.Shutdown` RPC).
pub type ShutdownHandle = watch::Sender<bool>;

/// Shared state of all services of one node.
#[derive(Debug, Clone)]
pub struct Api {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: RaftNode,
    /// This host's name, recorded in allocations the node probes for.
    host: String,
    data_dir: String,
    http_addr: String,
    shutdown: ShutdownHandle,
    /// Allocation items proposed but not yet applied: each one may take a port ahead of the next
    /// request, so the next plan must probe that many more candidates.
    in_flight: AtomicUsize,
    /// Which member runs on which host, for probing where an allocation is for.
    hosts: crate::hosts::HostMap,
    /// `Cluster.Probe` requests served (probes this node ran for other members).
    probes_served: std::sync::atomic::AtomicU64,
    metrics: Arc<crate::metrics::RequestMetrics>,
}

/// What a probe found busy on a host, and who holds those ports where the OS told.
#[derive(Debug, Default)]
pub(crate) struct Busy {
    pub(crate) ports: Vec<u16>,
    pub(crate) holders: Vec<(u16, Holder)>,
}

/// Probes `ports` on this host and looks up who listens on the busy ones (a conflict): one read
/// of the socket table for all of them, and of the process table only if some has a listener.
fn probe_here(ports: &[u16]) -> Busy {
    let busy = portmesh_probe::busy_ports(ports);
    if busy.is_empty() {
        return Busy::default();
    }
    // Several listeners of one port (IPv4 and IPv6) are narrowed to one by `HostProbe::with_owners`.
    let holders = portmesh_probe::owners_of(&busy)
        .into_iter()
        .filter_map(|(port, o)| Some((port, Holder { pid: o.pid?, command: o.command.unwrap_or_default() })))
        .collect();
    Busy { ports: busy, holders }
}

/// Candidate ports probed per item beyond the ones in flight.
const BASE_CANDIDATES: usize = 4;
/// Rounds of plan-probe-propose before giving up (the last ones probe whole pools).
const MAX_ROUNDS: usize = 6;

pub(crate) fn team(t: &str) -> String {
    portmesh_core::team_or_default(t).to_string()
}

pub(crate) fn unexpected(r: Response) -> ApiError {
    ApiError::Internal(format!("unexpected state machine response {r:?}"))
}

/// Turns a rejection into an error, any other response into itself.
fn accepted(r: Response) -> std::result::Result<Response, ApiError> {
    match r {
        Response::Rejected(rej) => Err(rej.into()),
        other => Ok(other),
    }
}

struct InFlight<'a>(&'a AtomicUsize, usize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

impl Api {
    pub fn new(
        node: RaftNode,
        host: String,
        data_dir: String,
        http_addr: String,
        shutdown: ShutdownHandle,
    ) -> Self {
        Api {
            inner: Arc::new(Inner {
                node,
                host,
                data_dir,
                http_addr,
                shutdown,
                in_flight: AtomicUsize::new(0),
                hosts: crate::hosts::HostMap::default(),
                probes_served: std::sync::atomic::AtomicU64::new(0),
                metrics: Arc::default(),
            }),
        }
    }

    pub fn node(&self) -> &RaftNode {
        &self.inner.node
    }

    /// `Allocator.Allocate`, less the bookkeeping of its time and outcome.
    async fn allocate_timed(
        &self,
        req: pb::AllocateRequest,
    ) -> std::result::Result<pb::AllocateResponse, Status> {
        let reported = req.reported_busy().map_err(ApiError::from)?;
        let batch = AllocateBatch {
            team: team(&req.team),
            host: if req.host.is_empty() { self.inner.host.clone() } else { req.host.clone() },
            lease: req.lease_spec().map_err(ApiError::from)?,
            items: req.core_items().map_err(ApiError::from)?,
            probe: None,
            holder: req.holder(),
        };
        match self.allocate_batch(batch, &reported).await? {
            (Response::Allocated { grants, lease, revision }, host_probed) => {
                let lease_id = lease.map_or(req.lease_id, |l| l.id);
                for g in grants.iter().filter(|g| !g.existing) {
                    let a = &g.allocation;
                    let holder = a.holder.as_ref().map(ToString::to_string);
                    tracing::info!(port = a.port, team = %a.team, pool = %a.pool, service = %a.service,
                        host = %a.host, holder = holder.as_deref().unwrap_or("-"), revision, "allocated");
                }
                self.log_conflicts_and_fallbacks(&req, &grants, revision);
                Ok(pb::AllocateResponse {
                    existing: grants.iter().map(|g| g.existing).collect(),
                    allocations: grants.iter().map(|g| (&g.allocation).into()).collect(),
                    lease_id,
                    revision,
                    host_probed,
                })
            }
            (other, _) => Err(unexpected(other).into()),
        }
    }

    /// Logs each conflict the allocation at `revision` recorded (a warning naming the port and
    /// its holder) and each item that got another port than the one it asked for.
    fn log_conflicts_and_fallbacks(
        &self,
        req: &pb::AllocateRequest,
        grants: &[portmesh_core::Grant],
        revision: u64,
    ) {
        for (item, g) in req.items.iter().zip(grants) {
            let got = g.allocation.port;
            if item.port != 0 && item.port != u32::from(got) && !g.existing {
                tracing::info!(wanted = item.port, port = got, service = %g.allocation.service,
                    pool = %g.allocation.pool, "wanted port not available: fell back to another");
            }
        }
        let sm = self.inner.node.state().read();
        for e in sm.state.events_since(revision).take_while(|e| e.revision == revision) {
            if let portmesh_core::EventKind::Conflict(c) = &e.kind {
                let holder = c.holder.as_ref().map(ToString::to_string);
                tracing::warn!(port = c.port, host = %c.host, holder = holder.as_deref().unwrap_or("unknown process"),
                    service = %c.service, pool = %c.pool, "port busy on its host: skipped (conflict)");
            }
        }
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

    /// Probes `candidates` on `host`: here if it is this node's host, else through the member
    /// node running there. Returns what was found busy (and who holds it) and whether anyone
    /// probed.
    async fn probe_host(&self, host: &str, candidates: &[u16]) -> (Busy, bool) {
        let inner = &self.inner;
        if host == inner.host {
            // Binds and reads /proc: blocking work, off the async workers.
            let ports = candidates.to_vec();
            return match tokio::task::spawn_blocking(move || probe_here(&ports)).await {
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
    /// the plan (`NeedProbe`). Every port handed out was probed free just before the proposal,
    /// unless no node runs on the batch's host (then `false` comes back with the response and
    /// only the ports the client `reported` busy are skipped).
    async fn allocate_batch(
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
            let candidates = {
                let sm = inner.node.state().read();
                sm.state.plan(&batch, now_ms(), width, seed)
            };
            let (Busy { mut ports, holders }, probed) = self.probe_host(&batch.host, &candidates).await;
            ports.extend_from_slice(reported);
            if !ports.is_empty() {
                tracing::info!(host = %batch.host, busy = ?ports, "ports busy on the host will be skipped");
            }
            let mut checked = candidates;
            checked.extend_from_slice(reported);
            batch.probe = Some(HostProbe::new(checked, ports).with_owners(holders));
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

    /// The node's status, as `Cluster.Status` and the HTTP status page report it.
    /// Usage and recommendations of `team` ("" = every team) from this node's applied state,
    /// judged against this host's ephemeral port range.
    pub fn stats(&self, team: &str) -> pb::StatsResponse {
        let sm = self.inner.node.state().read();
        let team = (!team.is_empty()).then_some(team);
        let s = portmesh_core::stats::stats(&sm.state, team, now_ms(), portmesh_probe::ephemeral_range());
        pb::StatsResponse::from_core(&s, sm.state.revision())
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

#[tonic::async_trait]
impl pb::allocator_server::Allocator for Api {
    async fn allocate(&self, req: Request<pb::AllocateRequest>) -> Result<pb::AllocateResponse> {
        let start = std::time::Instant::now();
        let answer = self.allocate_timed(req.into_inner()).await;
        let (outcome, ports) = match &answer {
            Ok(r) => ("ok", r.allocations.iter().zip(&r.existing).filter(|(_, e)| !**e).count()),
            Err(s) => (crate::metrics::outcome_of(s), 0),
        };
        self.metrics().allocate_done(start, outcome, ports);
        answer.map(tonic::Response::new)
    }

    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Result<pb::ReleaseResponse> {
        let req = req.into_inner();
        let cmd =
            Command::Release { team: team(&req.team), selector: req.selector().map_err(ApiError::from)? };
        match self.propose(cmd).await? {
            Response::Released { allocations, revision } => Ok(tonic::Response::new(pb::ReleaseResponse {
                released: allocations.iter().map(Into::into).collect(),
                revision,
            })),
            other => Err(unexpected(other).into()),
        }
    }

    async fn reserve(&self, req: Request<pb::ReserveRequest>) -> Result<pb::ReserveResponse> {
        let req = req.into_inner();
        let port = required_port(req.port, "port").map_err(ApiError::from)?;
        match self.propose(Command::Reserve { port, reason: req.reason }).await? {
            Response::Reserved(r) => {
                Ok(tonic::Response::new(pb::ReserveResponse { reservation: Some((&r).into()) }))
            }
            other => Err(unexpected(other).into()),
        }
    }

    async fn unreserve(&self, req: Request<pb::UnreserveRequest>) -> Result<pb::UnreserveResponse> {
        let port = required_port(req.into_inner().port, "port").map_err(ApiError::from)?;
        match self.propose(Command::Unreserve { port }).await? {
            Response::Unreserved { revision, .. } => {
                Ok(tonic::Response::new(pb::UnreserveResponse { revision }))
            }
            other => Err(unexpected(other).into()),
        }
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<pb::ListResponse> {
        let req = req.into_inner();
        self.inner.node.read_barrier(req.stale).await.map_err(ApiError::from)?;
        let sm = self.inner.node.state().read();
        let allocations = sm
            .state
            .allocations()
            .filter(|a| req.team.is_empty() || a.team == req.team)
            .filter(|a| req.pool.is_empty() || a.pool == req.pool)
            .map(Into::into)
            .collect();
        let reservations = sm.state.reservations().map(Into::into).collect();
        Ok(tonic::Response::new(pb::ListResponse {
            allocations,
            reservations,
            revision: sm.state.revision(),
        }))
    }
}

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = std::result::Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::leases_server::Leases for Api {
    async fn grant(&self, req: Request<pb::LeaseGrantRequest>) -> Result<pb::LeaseGrantResponse> {
        let req = req.into_inner();
        match self.propose(Command::GrantLease { team: team(&req.team), ttl_ms: req.ttl_ms }).await? {
            Response::LeaseGranted(l) => {
                Ok(tonic::Response::new(pb::LeaseGrantResponse { lease: Some(pb::Lease::from_core(&l, [])) }))
            }
            other => Err(unexpected(other).into()),
        }
    }

    type KeepAliveStream = KeepAliveStream;

    async fn keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Self::KeepAliveStream> {
        let mut incoming = req.into_inner();
        let node = self.inner.node.clone();
        let out = async_stream(move |tx| async move {
            while let Some(msg) = incoming.next().await {
                let reply = msg.and_then(|m| {
                    let ttl = node.keep_alive(&team(&m.team), m.lease_id).map_err(ApiError::from)?;
                    Ok(pb::LeaseKeepAliveResponse { lease_id: m.lease_id, ttl_ms: ttl.unwrap_or(0) })
                });
                let stop = reply.is_err();
                if tx.send(reply).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(out))
    }

    async fn time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<pb::LeaseTimeToLiveResponse> {
        let req = req.into_inner();
        let node = &self.inner.node;
        // Leader only: the countdown lives there. The barrier also makes the read linearizable.
        node.read_barrier(false).await.map_err(ApiError::from)?;
        let team = team(&req.team);
        let sm = node.state().read();
        let Some(lease) = sm.state.lease(req.lease_id).filter(|l| l.team == team) else {
            return Err(ApiError::from(Rejection::UnknownLease { team, id: req.lease_id }).into());
        };
        let ports: Vec<u16> = sm.state.lease_ports(lease.id).collect();
        let mut out = pb::Lease::from_core(lease, ports.iter().copied());
        if let Some(left) = node.lease_remaining(lease.id) {
            out.remaining_ms = left;
        }
        let allocations = ports.iter().filter_map(|p| sm.state.allocation(*p)).map(Into::into).collect();
        let services = sm.state.lease_services(lease.id).map(Into::into).collect();
        Ok(tonic::Response::new(pb::LeaseTimeToLiveResponse { lease: Some(out), allocations, services }))
    }

    async fn revoke(&self, req: Request<pb::LeaseRevokeRequest>) -> Result<pb::LeaseRevokeResponse> {
        let req = req.into_inner();
        match self.propose(Command::RevokeLease { team: team(&req.team), id: req.lease_id }).await? {
            Response::LeaseRevoked { released, revision, .. } => {
                Ok(tonic::Response::new(pb::LeaseRevokeResponse {
                    released: released.iter().map(Into::into).collect(),
                    revision,
                }))
            }
            other => Err(unexpected(other).into()),
        }
    }
}

/// A response stream fed by a task through a bounded channel.
fn async_stream<F, Fut>(f: F) -> KeepAliveStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<std::result::Result<pb::LeaseKeepAliveResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl pb::pools_server::Pools for Api {
    async fn list(&self, req: Request<pb::ListPoolsRequest>) -> Result<pb::ListPoolsResponse> {
        let req = req.into_inner();
        self.inner.node.read_barrier(req.stale).await.map_err(ApiError::from)?;
        let now = now_ms();
        let sm = self.inner.node.state().read();
        let pools = sm
            .state
            .pools()
            .filter(|p| req.team.is_empty() || p.team == req.team)
            .map(|p| pb::Pool::from_core(p, &sm.state.pool_usage(p, now)))
            .collect();
        Ok(tonic::Response::new(pb::ListPoolsResponse { pools, revision: sm.state.revision() }))
    }

    async fn add(&self, req: Request<pb::AddPoolRequest>) -> Result<pb::AddPoolResponse> {
        let req = req.into_inner();
        if req.ranges.is_empty() {
            return Err(ApiError::from(BadRequest("ranges: give at least one range".into())).into());
        }
        let ranges = req.ranges.iter().map(TryInto::try_into).collect::<std::result::Result<Vec<_>, _>>();
        let cmd = Command::AddPool {
            team: team(&req.team),
            name: req.name,
            ranges: ranges.map_err(ApiError::from)?,
        };
        match self.propose(cmd).await? {
            Response::PoolAdded(p) => {
                let usage = self.inner.node.state().read().state.pool_usage(&p, now_ms());
                Ok(tonic::Response::new(pb::AddPoolResponse { pool: Some(pb::Pool::from_core(&p, &usage)) }))
            }
            other => Err(unexpected(other).into()),
        }
    }

    async fn stats(&self, req: Request<pb::StatsRequest>) -> Result<pb::StatsResponse> {
        Ok(tonic::Response::new(self.stats(&req.into_inner().team)))
    }

    async fn remove(&self, req: Request<pb::RemovePoolRequest>) -> Result<pb::RemovePoolResponse> {
        let req = req.into_inner();
        match self.propose(Command::RemovePool { team: team(&req.team), name: req.name }).await? {
            Response::PoolRemoved { revision, .. } => {
                Ok(tonic::Response::new(pb::RemovePoolResponse { revision }))
            }
            other => Err(unexpected(other).into()),
        }
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for Api {
    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<pb::StatusResponse> {
        Ok(tonic::Response::new(Api::status(self)))
    }

    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<pb::JoinResponse> {
        let req = req.into_inner();
        if req.node_id == 0 || req.addr.is_empty() {
            return Err(ApiError::from(BadRequest("join needs the node's id and address".into())).into());
        }
        let node = &self.inner.node;
        node.admit(req.node_id, &req.addr, &req.cluster_id).map_err(ApiError::from)?;
        tracing::info!(node_id = req.node_id, addr = %req.addr, "adding a member");
        let voter = node.add_member(req.node_id, req.addr).await.map_err(ApiError::from)?;
        let s = Api::status(self);
        Ok(tonic::Response::new(pb::JoinResponse {
            leader_id: s.leader_id,
            voter,
            members: s.members,
            cluster_id: s.cluster_id,
        }))
    }

    async fn leave(&self, req: Request<pb::LeaveRequest>) -> Result<pb::LeaveResponse> {
        let id = req.into_inner().node_id;
        if id == 0 {
            return Err(
                ApiError::from(BadRequest("leave needs the id of the member to remove".into())).into()
            );
        }
        tracing::info!(node_id = id, "removing a member");
        self.inner.node.remove_member(id).await.map_err(ApiError::from)?;
        Ok(tonic::Response::new(pb::LeaveResponse { members: Api::status(self).members }))
    }

    async fn probe(&self, req: Request<pb::ProbeRequest>) -> Result<pb::ProbeResponse> {
        let req = req.into_inner();
        if req.ports.len() > 65_536 {
            return Err(ApiError::from(BadRequest(format!(
                "probe: {} ports, at most 65536",
                req.ports.len()
            )))
            .into());
        }
        let ports: Vec<u16> = req
            .ports
            .iter()
            .map(|p| required_port(*p, "ports"))
            .collect::<std::result::Result<_, _>>()
            .map_err(ApiError::from)?;
        self.inner.probes_served.fetch_add(1, Ordering::Relaxed);
        let busy = tokio::task::spawn_blocking(move || probe_here(&ports))
            .await
            .map_err(|e| ApiError::Internal(format!("probe task: {e}")))?;
        Ok(tonic::Response::new(pb::ProbeResponse {
            host: self.inner.host.clone(),
            busy: busy.ports.into_iter().map(u32::from).collect(),
            holders: busy
                .holders
                .into_iter()
                .map(|(port, h)| pb::PortHolder { port: port.into(), pid: h.pid, command: h.command })
                .collect(),
        }))
    }

    async fn shutdown(&self, _req: Request<pb::ShutdownRequest>) -> Result<pb::ShutdownResponse> {
        tracing::info!("shutdown requested over gRPC");
        self.inner.shutdown.send_replace(true);
        Ok(tonic::Response::new(pb::ShutdownResponse {}))
    }
}
