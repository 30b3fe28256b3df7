//! `portmesh.v1.Allocator`: allocate, release, reserve, unreserve, list.

use portmesh_core::Response;
use portmesh_proto::v1 as pb;
use portmesh_proto::{Allocate, AtHost};
use tonic::{Request, Status};

use crate::api::{Result, unexpected};
use crate::{Api, ApiError};

impl Api {
    /// `Allocator.Allocate`, less the bookkeeping of its time and outcome.
    async fn allocate_timed(
        &self,
        req: pb::AllocateRequest,
    ) -> std::result::Result<pb::AllocateResponse, Status> {
        let Allocate { batch, reported_busy } =
            Allocate::try_from(AtHost { msg: &req, host: &self.inner.host }).map_err(ApiError::from)?;
        // Only the leader plans and probes: a follower would plan on a state that may be behind
        // and then be refused anyway. The client follows the leader this names.
        self.inner.node.ensure_leader().map_err(ApiError::from)?;
        match self.allocate_batch(batch, &reported_busy).await? {
            (Response::Allocated { grants, lease, revision, registered }, host_probed) => {
                let lease_id = lease.map_or(req.lease_id, |l| l.id);
                for g in grants.iter().filter(|g| !g.existing) {
                    let a = &g.allocation;
                    let holder = a.holder.as_ref().map(ToString::to_string);
                    tracing::info!(port = a.port, team = %a.team, pool = %a.pool, service = %a.service,
                        host = %a.host, holder = holder.as_deref().unwrap_or("-"), revision, "allocated");
                }
                self.log_conflicts_and_fallbacks(&req, &grants, revision);
                if let Some(s) = &registered {
                    tracing::info!(team = %s.team, id = %s.id, host = %s.host, revision, "registered");
                }
                Ok(pb::AllocateResponse {
                    existing: grants.iter().map(|g| g.existing).collect(),
                    moved_from: grants.iter().map(|g| g.moved_from.map_or(0, u32::from)).collect(),
                    allocations: grants.iter().map(|g| (&g.allocation).into()).collect(),
                    lease_id,
                    revision,
                    host_probed,
                    registered: registered.as_deref().map(Into::into),
                })
            }
            (other, _) => Err(unexpected(other).into()),
        }
    }

    /// Logs each conflict the allocation at `revision` recorded (a warning naming the port and
    /// its holder; the state records one at most once a minute per host, port and holder) and
    /// each item that got another port than the one it asked for.
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
}

#[tonic::async_trait]
impl pb::allocator_server::Allocator for Api {
    async fn allocate(&self, req: Request<pb::AllocateRequest>) -> Result<pb::AllocateResponse> {
        let start = std::time::Instant::now();
        let answer = match self.scoped(req) {
            Ok(req) => self.allocate_timed(req).await,
            Err(refused) => Err(refused),
        };
        let (outcome, ports) = match &answer {
            Ok(r) => ("ok", r.allocations.iter().zip(&r.existing).filter(|(_, e)| !**e).count()),
            Err(s) => (crate::metrics::outcome_of(s), 0),
        };
        self.metrics().allocate_done(start, outcome, ports);
        answer.map(tonic::Response::new)
    }

    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Result<pb::ReleaseResponse> {
        let req = self.scoped(req)?;
        match self.propose_request(&req).await? {
            Response::Released { allocations, revision } => Ok(tonic::Response::new(pb::ReleaseResponse {
                released: allocations.iter().map(Into::into).collect(),
                revision,
            })),
            other => Err(unexpected(other).into()),
        }
    }

    async fn reserve(&self, req: Request<pb::ReserveRequest>) -> Result<pb::ReserveResponse> {
        match self.propose_request(&req.into_inner()).await? {
            Response::Reserved(r) => {
                Ok(tonic::Response::new(pb::ReserveResponse { reservation: Some((&r).into()) }))
            }
            other => Err(unexpected(other).into()),
        }
    }

    async fn unreserve(&self, req: Request<pb::UnreserveRequest>) -> Result<pb::UnreserveResponse> {
        match self.propose_request(&req.into_inner()).await? {
            Response::Unreserved { revision, .. } => {
                Ok(tonic::Response::new(pb::UnreserveResponse { revision }))
            }
            other => Err(unexpected(other).into()),
        }
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<pb::ListResponse> {
        let req = self.scoped(req)?;
        portmesh_proto::check_filters(&[("team", &req.team), ("pool", &req.pool)]).map_err(ApiError::from)?;
        let ports = portmesh_proto::list_filters(&req.ports, &req.keys).map_err(ApiError::from)?;
        self.inner.node.read_barrier(req.stale).await.map_err(ApiError::from)?;
        let sm = self.inner.node.state().read();
        let picked: Box<dyn Iterator<Item = &portmesh_core::Allocation>> = if ports.is_empty() {
            Box::new(sm.state.allocations())
        } else {
            Box::new(ports.iter().filter_map(|p| sm.state.allocation(*p)))
        };
        let allocations = picked
            .filter(|a| req.team.is_empty() || a.team == req.team)
            .filter(|a| req.pool.is_empty() || a.pool == req.pool)
            .filter(|a| {
                req.keys.is_empty()
                    || a.key.as_ref().is_some_and(|k| req.keys.iter().any(|w| w == k.as_str()))
            })
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
