//! A typed async client for a portmesh node.
//!
//! ```no_run
//! # async fn demo() -> Result<(), portmesh_client::ClientError> {
//! use portmesh_client::{Client, pb};
//! let client = Client::connect("127.0.0.1:7400").await?;
//! let resp = client
//!     .allocate(pb::AllocateRequest {
//!         items: vec![pb::AllocItem { service: "api".into(), pool: "web".into(), ..Default::default() }],
//!         ..Default::default()
//!     })
//!     .await?;
//! println!("port {}", resp.allocations[0].port);
//! # Ok(()) }
//! ```
//!
//! Owns: connecting (with a bounded timeout and an error that names the address and what was
//! tried), one method per RPC, and turning `tonic::Status` into [`ClientError`] with the server's
//! message and category. Does not own: leader discovery across a cluster (a later release).

use std::time::Duration;

pub use portmesh_proto::v1 as pb;
pub use portmesh_proto::{strategy_from_pb, strategy_to_pb};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

/// How long to wait for a TCP + HTTP/2 connection to a node.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach a portmesh node at {addr} (tried a gRPC connection, timeout {timeout:?}): {reason}"
    )]
    Unreachable { addr: String, timeout: Duration, reason: String },
    #[error("{message}")]
    Status {
        code: tonic::Code,
        message: String,
        /// The server's stable error category (`portmesh-error` metadata), if any.
        kind: Option<String>,
    },
    #[error("invalid node address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: String },
}

impl ClientError {
    /// The server's error category, e.g. `exhausted` or `not_found`.
    pub fn kind(&self) -> Option<&str> {
        match self {
            ClientError::Status { kind, .. } => kind.as_deref(),
            _ => None,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        let kind = s.metadata().get("portmesh-error").and_then(|v| v.to_str().ok()).map(str::to_string);
        let message =
            if s.message().is_empty() { format!("{:?}", s.code()) } else { s.message().to_string() };
        ClientError::Status { code: s.code(), message, kind }
    }
}

type Result<T> = std::result::Result<T, ClientError>;

/// A connection to one node. Cheap to clone (clones share the HTTP/2 connection).
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    addr: String,
}

fn uri(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

impl Client {
    /// Connects to the node at `addr` (`host:port` or a URL).
    pub async fn connect(addr: &str) -> Result<Client> {
        let endpoint = Endpoint::from_shared(uri(addr))
            .map_err(|e| ClientError::BadAddress { addr: addr.to_string(), reason: e.to_string() })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let channel = endpoint.connect().await.map_err(|e| ClientError::Unreachable {
            addr: addr.to_string(),
            timeout: CONNECT_TIMEOUT,
            reason: error_chain(&e),
        })?;
        Ok(Client { channel, addr: addr.to_string() })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn allocator(&self) -> pb::allocator_client::AllocatorClient<Channel> {
        pb::allocator_client::AllocatorClient::new(self.channel.clone())
    }

    fn leases(&self) -> pb::leases_client::LeasesClient<Channel> {
        pb::leases_client::LeasesClient::new(self.channel.clone())
    }

    fn pools(&self) -> pb::pools_client::PoolsClient<Channel> {
        pb::pools_client::PoolsClient::new(self.channel.clone())
    }

    fn cluster(&self) -> pb::cluster_client::ClusterClient<Channel> {
        pb::cluster_client::ClusterClient::new(self.channel.clone())
    }

    pub async fn allocate(&self, req: pb::AllocateRequest) -> Result<pb::AllocateResponse> {
        Ok(self.allocator().allocate(req).await?.into_inner())
    }

    pub async fn release(&self, req: pb::ReleaseRequest) -> Result<pb::ReleaseResponse> {
        Ok(self.allocator().release(req).await?.into_inner())
    }

    pub async fn reserve(&self, port: u16, reason: &str) -> Result<pb::Reservation> {
        let req = pb::ReserveRequest { port: port.into(), reason: reason.to_string() };
        let r = self.allocator().reserve(req).await?.into_inner();
        r.reservation.ok_or_else(|| missing("reservation"))
    }

    pub async fn unreserve(&self, port: u16) -> Result<pb::UnreserveResponse> {
        Ok(self.allocator().unreserve(pb::UnreserveRequest { port: port.into() }).await?.into_inner())
    }

    pub async fn list(&self, req: pb::ListRequest) -> Result<pb::ListResponse> {
        Ok(self.allocator().list(req).await?.into_inner())
    }

    pub async fn list_pools(&self, team: &str) -> Result<pb::ListPoolsResponse> {
        let req = pb::ListPoolsRequest { team: team.to_string(), stale: false };
        Ok(self.pools().list(req).await?.into_inner())
    }

    pub async fn add_pool(&self, team: &str, name: &str, ranges: Vec<pb::PortRange>) -> Result<pb::Pool> {
        let req = pb::AddPoolRequest { team: team.to_string(), name: name.to_string(), ranges };
        self.pools().add(req).await?.into_inner().pool.ok_or_else(|| missing("pool"))
    }

    pub async fn remove_pool(&self, team: &str, name: &str) -> Result<pb::RemovePoolResponse> {
        let req = pb::RemovePoolRequest { team: team.to_string(), name: name.to_string() };
        Ok(self.pools().remove(req).await?.into_inner())
    }

    pub async fn grant_lease(&self, team: &str, ttl: Duration) -> Result<pb::Lease> {
        let req = pb::LeaseGrantRequest { team: team.to_string(), ttl_ms: ttl.as_millis() as u64 };
        self.leases().grant(req).await?.into_inner().lease.ok_or_else(|| missing("lease"))
    }

    pub async fn revoke_lease(&self, team: &str, id: u64) -> Result<pb::LeaseRevokeResponse> {
        let req = pb::LeaseRevokeRequest { team: team.to_string(), lease_id: id };
        Ok(self.leases().revoke(req).await?.into_inner())
    }

    /// Renews a lease once. Returns the new TTL; `None` when the lease no longer exists.
    pub async fn keep_alive_once(&self, team: &str, id: u64) -> Result<Option<Duration>> {
        let req = pb::LeaseKeepAliveRequest { team: team.to_string(), lease_id: id };
        let mut stream = self.leases().keep_alive(tokio_stream::iter([req])).await?.into_inner();
        match stream.message().await? {
            Some(r) if r.ttl_ms > 0 => Ok(Some(Duration::from_millis(r.ttl_ms))),
            Some(_) => Ok(None),
            None => Err(missing("keep-alive reply")),
        }
    }

    pub async fn status(&self) -> Result<pb::StatusResponse> {
        Ok(self.cluster().status(pb::StatusRequest {}).await?.into_inner())
    }

    pub async fn shutdown(&self) -> Result<()> {
        self.cluster().shutdown(pb::ShutdownRequest {}).await?;
        Ok(())
    }

    /// Whether the node reports SERVING on the standard gRPC health service.
    pub async fn is_serving(&self) -> Result<bool> {
        let mut h = HealthClient::new(self.channel.clone());
        let r = h.check(HealthCheckRequest { service: String::new() }).await?.into_inner();
        Ok(r.status == ServingStatus::Serving as i32)
    }
}

fn missing(what: &str) -> ClientError {
    ClientError::Status {
        code: tonic::Code::Internal,
        message: format!("the node's reply lacks the {what}"),
        kind: Some("internal".into()),
    }
}

/// An error and its sources, joined: transport errors hide the useful part in the chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unreachable_names_the_address_and_what_was_tried() {
        // A port nothing listens on: bind, note it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let e = Client::connect(&addr).await.unwrap_err().to_string();
        assert!(e.contains(&addr) && e.contains("tried a gRPC connection"), "{e}");
        assert!(e.to_lowercase().contains("refused"), "{e}");
        let e = Client::connect("not a uri at all").await.unwrap_err().to_string();
        assert!(e.contains("invalid node address"), "{e}");
    }

    #[test]
    fn status_keeps_message_and_category() {
        let mut s = tonic::Status::not_found("unknown lease 4");
        s.metadata_mut().insert("portmesh-error", "not_found".parse().unwrap());
        let e = ClientError::from(s);
        assert_eq!(e.to_string(), "unknown lease 4");
        assert_eq!(e.kind(), Some("not_found"));
    }
}
