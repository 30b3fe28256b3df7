//! `portmesh.v1.Tokens`: create, list, revoke (admin only: see `auth::need`).

use portmesh_core::{Command, Response};
use portmesh_proto::TokenSpec;
use portmesh_proto::v1 as pb;
use tonic::Request;

use crate::api::{Result, unexpected};
use crate::{Api, ApiError};

#[tonic::async_trait]
impl pb::tokens_server::Tokens for Api {
    async fn create(&self, req: Request<pb::CreateTokenRequest>) -> Result<pb::CreateTokenResponse> {
        let spec = TokenSpec::try_from(req.get_ref()).map_err(ApiError::from)?;
        // Minted on the leader only, so the secret is not made where it cannot be recorded.
        self.inner.node.ensure_leader().map_err(ApiError::from)?;
        let expires_ms = spec.ttl_ms.map(|t| portmesh_raft::now_ms().saturating_add(t));
        let minted = crate::auth::mint(spec.role, spec.team, expires_ms, spec.uses)?;
        match self.propose(Command::AddToken(Box::new(minted.token))).await? {
            Response::TokenAdded(t) => {
                tracing::info!(id = %t.id, role = %t.role, team = %t.team, "token created");
                Ok(tonic::Response::new(pb::CreateTokenResponse {
                    token: Some(t.as_ref().into()),
                    secret: minted.secret,
                }))
            }
            other => Err(unexpected(other).into()),
        }
    }

    async fn list(&self, _req: Request<pb::ListTokensRequest>) -> Result<pb::ListTokensResponse> {
        self.inner.node.read_barrier(false).await.map_err(ApiError::from)?;
        let sm = self.inner.node.state().read();
        Ok(tonic::Response::new(pb::ListTokensResponse {
            tokens: sm.state.tokens().map(Into::into).collect(),
        }))
    }

    async fn revoke(&self, req: Request<pb::RevokeTokenRequest>) -> Result<pb::RevokeTokenResponse> {
        let id = req.into_inner().id;
        if id.is_empty() {
            return Err(ApiError::from(portmesh_proto::BadRequest(
                "id: name the token to revoke (`portmesh token ls`)".into(),
            ))
            .into());
        }
        portmesh_proto::check_filters(&[("id", &id)]).map_err(ApiError::from)?;
        match self.propose(Command::RevokeToken { id }).await? {
            Response::TokenRevoked { id } => {
                tracing::info!(%id, "token revoked");
                Ok(tonic::Response::new(pb::RevokeTokenResponse {}))
            }
            other => Err(unexpected(other).into()),
        }
    }
}
