//! `portmesh.v1.Cluster`: status, join, leave, probe, shutdown.

use std::sync::atomic::Ordering;

use portmesh_proto::v1 as pb;
use portmesh_proto::{BadRequest, required_port};
use tonic::Request;

use crate::api::Result;
use crate::placement::probe_here;
use crate::{Api, ApiError};

#[tonic::async_trait]
impl pb::cluster_server::Cluster for Api {
    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<pb::StatusResponse> {
        Ok(tonic::Response::new(Api::status(self)))
    }

    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<pb::JoinResponse> {
        let join_token = match crate::auth::caller(&req) {
            Some(crate::auth::Caller::Join { id }) => Some(id.clone()),
            _ => None,
        };
        let req = req.into_inner();
        if req.node_id == 0 || req.addr.is_empty() {
            return Err(ApiError::from(BadRequest("join needs the node's id and address".into())).into());
        }
        let node = &self.inner.node;
        node.admit(req.node_id, &req.addr, &req.cluster_id).map_err(ApiError::from)?;
        if let Some(id) = join_token {
            // Spent before the change: two nodes racing with a single-use token, one gets in.
            self.propose(portmesh_core::Command::UseToken { id }).await?;
        }
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
        let busy = probe_here(ports).await.map_err(|e| ApiError::Internal(format!("probe task: {e}")))?;
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
