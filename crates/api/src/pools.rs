//! `portmesh.v1.Pools`: list, add, remove, stats, the cool-down.

use portmesh_core::Response;
use portmesh_proto::v1 as pb;
use portmesh_raft::now_ms;
use tonic::Request;

use crate::api::{Result, unexpected};
use crate::{Api, ApiError};

#[tonic::async_trait]
impl pb::pools_server::Pools for Api {
    async fn list(&self, req: Request<pb::ListPoolsRequest>) -> Result<pb::ListPoolsResponse> {
        let req = self.scoped(req)?;
        portmesh_proto::check_filters(&[("team", &req.team)]).map_err(ApiError::from)?;
        self.inner.node.read_barrier(req.stale).await.map_err(ApiError::from)?;
        let now = now_ms();
        let sm = self.inner.node.state().read();
        let pools = sm
            .state
            .pools()
            .filter(|p| req.team.is_empty() || p.team == req.team)
            .map(|p| (p, &sm.state.pool_usage(p, now)).into())
            .collect();
        Ok(tonic::Response::new(pb::ListPoolsResponse {
            pools,
            revision: sm.state.revision(),
            cooldown_ms: sm.state.cooldown_ms(),
        }))
    }

    async fn add(&self, req: Request<pb::AddPoolRequest>) -> Result<pb::AddPoolResponse> {
        match self.propose_request(&req.into_inner()).await? {
            Response::PoolAdded(p) => {
                let usage = self.inner.node.state().read().state.pool_usage(&p, now_ms());
                Ok(tonic::Response::new(pb::AddPoolResponse { pool: Some((&p, &usage).into()) }))
            }
            other => Err(unexpected(other).into()),
        }
    }

    async fn stats(&self, req: Request<pb::StatsRequest>) -> Result<pb::StatsResponse> {
        let req = self.scoped(req)?;
        portmesh_proto::check_filters(&[("team", &req.team)]).map_err(ApiError::from)?;
        Ok(tonic::Response::new(self.stats(&req.team)))
    }

    async fn set_cooldown(&self, req: Request<pb::SetCooldownRequest>) -> Result<pb::SetCooldownResponse> {
        match self.propose_request(&req.into_inner()).await? {
            Response::CooldownSet { ms, revision } => {
                Ok(tonic::Response::new(pb::SetCooldownResponse { cooldown_ms: ms, revision }))
            }
            other => Err(unexpected(other).into()),
        }
    }

    async fn remove(&self, req: Request<pb::RemovePoolRequest>) -> Result<pb::RemovePoolResponse> {
        match self.propose_request(&req.into_inner()).await? {
            Response::PoolRemoved { revision, .. } => {
                Ok(tonic::Response::new(pb::RemovePoolResponse { revision }))
            }
            other => Err(unexpected(other).into()),
        }
    }
}
