//! The `Registry` service: register, deregister and discover services; health reports from the
//! member nodes that run the checks (see the node's `checker.rs`).

use portmesh_core::{Command, Response, Service};
use portmesh_proto::AtHost;
use portmesh_proto::v1 as pb;
use tonic::{Request, Status};

use crate::{Api, ApiError};

type Result<T> = std::result::Result<tonic::Response<T>, Status>;

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
}

#[tonic::async_trait]
impl pb::registry_server::Registry for Api {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<pb::RegisterResponse> {
        let cmd = Command::try_from(AtHost { msg: &self.scoped(req)?, host: self.host() })
            .map_err(ApiError::from)?;
        match self.propose(cmd).await? {
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
        match self.propose_request(&self.scoped(req)?).await? {
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
        let req = self.scoped(req)?;
        let filters =
            [("team", &req.team), ("name", &req.name), ("project", &req.project), ("env", &req.env)];
        portmesh_proto::check_filters(&filters.map(|(f, v)| (f, v.as_str()))).map_err(ApiError::from)?;
        req.tags
            .iter()
            .try_for_each(|t| portmesh_proto::check_filters(&[("tags", t)]))
            .map_err(ApiError::from)?;
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
        match self.propose_request(&req.into_inner()).await? {
            Response::HealthSet { changed, revision } => {
                Ok(tonic::Response::new(pb::ReportHealthResponse { changed: changed as u32, revision }))
            }
            other => Err(crate::api::unexpected(other).into()),
        }
    }
}
