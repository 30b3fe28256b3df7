//! The `Registry` service: register, deregister and discover services; health reports from the
//! member nodes that run the checks (see `checks.rs`).

use portmesh_core::{Command, HealthUpdate, Response, Service};
use portmesh_proto::v1 as pb;
use portmesh_proto::{BadRequest, health_from_pb};
use tonic::{Request, Status};

use crate::{Api, ApiError};

type Result<T> = std::result::Result<tonic::Response<T>, Status>;

/// Most health reports one request may carry.
const MAX_REPORTS: usize = 4_096;

/// Whether a service matches a discovery request.
fn wanted(req: &pb::DiscoverRequest, s: &Service) -> bool {
    let eq = |want: &str, have: Option<&str>| want.is_empty() || have == Some(want);
    eq(&req.team, Some(&s.team))
        && eq(&req.name, Some(&s.name))
        && eq(&req.project, s.project.as_deref())
        && eq(&req.env, s.env.as_deref())
        && req.tags.iter().all(|t| s.tags.contains(t))
        && (req.include_unhealthy || s.status.is_healthy())
}

impl Api {
    pub fn registry(&self) -> pb::registry_server::RegistryServer<Self> {
        pb::registry_server::RegistryServer::new(self.clone())
    }

    /// Proposes health transitions (the leader's own checker, and `ReportHealth`).
    pub(crate) async fn set_health(
        &self,
        updates: Vec<HealthUpdate>,
    ) -> std::result::Result<(usize, u64), ApiError> {
        match self.propose(Command::SetHealth { updates }).await? {
            Response::HealthSet { changed, revision } => Ok((changed, revision)),
            other => Err(crate::api::unexpected(other)),
        }
    }
}

#[tonic::async_trait]
impl pb::registry_server::Registry for Api {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<pb::RegisterResponse> {
        let Some(svc) = req.into_inner().service else {
            return Err(ApiError::from(BadRequest("service: say what to register".into())).into());
        };
        let svc = svc.to_core(self.host()).map_err(ApiError::from)?;
        match self.propose(Command::Register(Box::new(svc))).await? {
            Response::Registered { service, replaced, revision } => {
                tracing::info!(team = %service.team, id = %service.id, host = %service.host, revision, "registered");
                Ok(tonic::Response::new(pb::RegisterResponse {
                    service: Some(service.as_ref().into()),
                    replaced,
                    revision,
                }))
            }
            other => Err(crate::api::unexpected(other).into()),
        }
    }

    async fn deregister(&self, req: Request<pb::DeregisterRequest>) -> Result<pb::DeregisterResponse> {
        let req = req.into_inner();
        let cmd = Command::Deregister { team: crate::api::team(&req.team), id: req.id };
        match self.propose(cmd).await? {
            Response::Deregistered { service, revision } => {
                tracing::info!(team = %service.team, id = %service.id, revision, "deregistered");
                Ok(tonic::Response::new(pb::DeregisterResponse {
                    service: Some(service.as_ref().into()),
                    revision,
                }))
            }
            other => Err(crate::api::unexpected(other).into()),
        }
    }

    async fn discover(&self, req: Request<pb::DiscoverRequest>) -> Result<pb::DiscoverResponse> {
        let req = req.into_inner();
        self.node().read_barrier(req.stale).await.map_err(ApiError::from)?;
        let sm = self.node().state().read();
        let mut found: Vec<&Service> = sm.state.services().filter(|s| wanted(&req, s)).collect();
        found.sort_by(|a, b| (&a.team, &a.name, &a.id).cmp(&(&b.team, &b.name, &b.id)));
        Ok(tonic::Response::new(pb::DiscoverResponse {
            services: found.into_iter().map(Into::into).collect(),
            revision: sm.state.revision(),
        }))
    }

    async fn report_health(&self, req: Request<pb::ReportHealthRequest>) -> Result<pb::ReportHealthResponse> {
        let reports = req.into_inner().reports;
        if reports.len() > MAX_REPORTS {
            return Err(ApiError::from(BadRequest(format!(
                "reports: {} reports, at most {MAX_REPORTS}",
                reports.len()
            )))
            .into());
        }
        let updates = reports
            .into_iter()
            .map(|r| {
                Ok(HealthUpdate {
                    team: crate::api::team(&r.team),
                    id: r.id,
                    status: health_from_pb(r.status)?,
                    output: r.output,
                })
            })
            .collect::<std::result::Result<Vec<_>, BadRequest>>()
            .map_err(ApiError::from)?;
        let (changed, revision) = self.set_health(updates).await?;
        Ok(tonic::Response::new(pb::ReportHealthResponse { changed: changed as u32, revision }))
    }
}
