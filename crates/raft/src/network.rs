//! Node-to-node Raft transport over gRPC (`proto/portmesh/raft/v1`).
//!
//! - One HTTP/2 channel per peer address, created lazily and shared by every Raft client of that
//!   peer; tonic reconnects it by itself after the peer restarts.
//! - Each RPC carries an openraft message encoded with postcard and the sender's data version.
//!   The answer is the `Result` openraft produced on the peer, so a peer's Raft error arrives as
//!   `RPCError::RemoteError` and a transport failure as `Unreachable`/`Network`/`Timeout`.
//! - Snapshots travel as openraft's own chunks (`snapshot_max_chunk_size`), one RPC per chunk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Timeout, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RPCTypes, RaftNetwork, RaftNetworkFactory};
use portmesh_proto::channel::{PeerTls, Purpose};
use portmesh_proto::raft::v1 as rpb;
use portmesh_store::{DATA_VERSION, TypeConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use crate::faults::{LinkFaults, Verdict};

/// Encodes a message for the wire.
pub(crate) fn encode<T: Serialize>(v: &T) -> Result<rpb::RaftMessage, postcard::Error> {
    Ok(rpb::RaftMessage { data_version: DATA_VERSION, payload: postcard::to_allocvec(v)? })
}

/// Decodes a message from the wire, refusing another data version.
pub(crate) fn decode<T: DeserializeOwned>(m: &rpb::RaftMessage) -> Result<T, String> {
    if m.data_version != DATA_VERSION {
        return Err(format!(
            "peer speaks portmesh data version {}, this node version {DATA_VERSION}: run the same release on every node",
            m.data_version
        ));
    }
    postcard::from_bytes(&m.payload).map_err(|e| format!("undecodable Raft message: {e}"))
}

/// The factory of Raft clients: one per peer, sharing channels by address.
#[derive(Debug, Clone)]
pub struct GrpcNetwork {
    id: u64,
    /// The channels, and the generation of the TLS they were opened with.
    channels: Arc<Mutex<(u64, HashMap<String, Channel>)>>,
    faults: Option<Arc<LinkFaults>>,
    tls: PeerTls,
    /// Peers whose last RPC failed: logged once when they go, once when they are back.
    down: Arc<Mutex<std::collections::HashSet<u64>>>,
}

impl GrpcNetwork {
    /// The network of node `id`, reaching peers with `tls`; `faults` (tests only) cuts, drops or
    /// delays its messages.
    pub fn new(id: u64, faults: Option<Arc<LinkFaults>>, tls: PeerTls) -> Self {
        Self { id, channels: Arc::default(), faults, tls, down: Arc::default() }
    }

    /// Records how an RPC to `target` went (`Some(error)`: it did not reach it), logging a line
    /// only when that changes. openraft itself logs every failed attempt (several lines every
    /// 200 ms per unreachable peer); the node's default filter silences those.
    fn note(&self, target: u64, addr: &str, failure: Option<String>) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        match failure {
            Some(error) if down.insert(target) => {
                tracing::warn!(member = target, %addr, %error, "member unreachable; Raft keeps trying it (logged again when it answers)");
            }
            None if down.remove(&target) => tracing::info!(member = target, %addr, "member reachable again"),
            _ => {}
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, String> {
        // Per Raft RPC: only the generation is read here; the TLS is copied only to open a channel.
        let generation = self.tls.generation();
        let mut guard = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let (seen, map) = &mut *guard;
        // Renewed certificates: new connections present the new ones.
        if *seen != generation {
            map.clear();
            *seen = generation;
        }
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let channel =
            self.tls.endpoint(addr, Purpose::Peer).map_err(|e| format!("peer: {e}"))?.connect_lazy();
        map.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// A Raft client of one peer. The channel is looked up at each call, so that after renewed
/// certificates the peer is reached on a new connection that presents them.
#[derive(Debug)]
pub struct GrpcPeer {
    id: u64,
    target: u64,
    addr: String,
    network: GrpcNetwork,
    faults: Option<Arc<LinkFaults>>,
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = GrpcPeer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        GrpcPeer {
            id: self.id,
            target,
            addr: node.addr.clone(),
            network: self.clone(),
            faults: self.faults.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl GrpcPeer {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result = self.attempt(rpc, req, option).await;
        let failure = match &result {
            Ok(_) | Err(RPCError::RemoteError(_)) => None,
            Err(e) => Some(e.to_string()),
        };
        self.network.note(self.target, &self.addr, failure);
        result
    }

    async fn attempt<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let unreachable = |why: String| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(why)));
        let mut client = match self.network.channel(&self.addr) {
            Ok(c) => rpb::raft_client::RaftClient::new(c),
            Err(e) => return Err(unreachable(e)),
        };
        let msg = encode(req).map_err(|e| unreachable(format!("encoding a Raft message: {e}")))?;
        let verdict = match &self.faults {
            None => Verdict::Deliver,
            Some(f) => {
                let (verdict, delay) = f.verdict(self.id, self.target);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                verdict
            }
        };
        if verdict == Verdict::DropRequest {
            return Err(unreachable(format!("link {} -> {} is cut (test fault)", self.id, self.target)));
        }
        let ttl = option.hard_ttl();
        let fut = async {
            match rpc {
                Rpc::Append => client.append_entries(msg).await,
                Rpc::Vote => client.vote(msg).await,
                Rpc::Snapshot => client.install_snapshot(msg).await,
            }
        };
        let reply = match tokio::time::timeout(ttl, fut).await {
            Err(_) => {
                let action = match rpc {
                    Rpc::Append => RPCTypes::AppendEntries,
                    Rpc::Vote => RPCTypes::Vote,
                    Rpc::Snapshot => RPCTypes::InstallSnapshot,
                };
                return Err(RPCError::Timeout(Timeout {
                    action,
                    id: self.id,
                    target: self.target,
                    timeout: ttl,
                }));
            }
            // Every failure short of a timeout is reported as `Unreachable`: openraft retries
            // `NetworkError` at once, in a tight loop, but backs off after `Unreachable`.
            Ok(Err(status)) => {
                return Err(unreachable(format!(
                    "node {} at {}: {:?}: {}",
                    self.target,
                    self.addr,
                    status.code(),
                    status.message()
                )));
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        if verdict == Verdict::DropReply {
            return Err(unreachable(format!("reply {} -> {} lost (test fault)", self.target, self.id)));
        }
        let result: Result<Resp, E> = decode(&reply).map_err(unreachable)?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for GrpcPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Rpc::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>>
    {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }

    /// After a failed RPC, wait this long before the next try to that peer.
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}
