//! The server side of the node-to-node transport: hands each message to the local Raft and
//! returns openraft's own result.

use openraft::Raft;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use portmesh_proto::raft::v1 as rpb;
use portmesh_store::TypeConfig;
use tonic::{Request, Response, Status};

use crate::network::{decode, encode};

/// The `portmesh.raft.v1.Raft` service of one node.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft<TypeConfig>,
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RaftService")
    }
}

impl RaftService {
    pub fn new(raft: Raft<TypeConfig>) -> Self {
        Self { raft }
    }

    pub fn server(self) -> rpb::raft_server::RaftServer<Self> {
        // Log batches and snapshot chunks are larger than tonic's 4 MiB default allows.
        rpb::raft_server::RaftServer::new(self).max_decoding_message_size(64 * 1024 * 1024)
    }
}

fn bad(e: String) -> Status {
    Status::failed_precondition(e)
}

fn reply<T: serde::Serialize>(v: &T) -> Result<Response<rpb::RaftMessage>, Status> {
    encode(v).map(Response::new).map_err(|e| Status::internal(format!("encoding a Raft reply: {e}")))
}

#[tonic::async_trait]
impl rpb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        req: Request<rpb::RaftMessage>,
    ) -> Result<Response<rpb::RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.get_ref()).map_err(bad)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<rpb::RaftMessage>) -> Result<Response<rpb::RaftMessage>, Status> {
        let rpc: VoteRequest<u64> = decode(req.get_ref()).map_err(bad)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<rpb::RaftMessage>,
    ) -> Result<Response<rpb::RaftMessage>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref()).map_err(bad)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }
}
