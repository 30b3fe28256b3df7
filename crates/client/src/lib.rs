//! A typed async client for a portmesh cluster.
//!
//! A runnable example (it starts a node of its own; in real use, `addr` is any node of the
//! cluster, e.g. `"127.0.0.1:7400"`):
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let mut cfg = portmesh_node::NodeConfig::new(dir.path().to_path_buf(), "127.0.0.1:0".parse()?);
//! # cfg.bootstrap = true;
//! # let node = portmesh_node::start(cfg).await?;
//! # let addr = node.grpc_addr.to_string();
//! use std::time::Duration;
//! use portmesh_client::{Client, pb};
//!
//! let client = Client::connect(&addr).await?;
//! // Two ports for a stack, all or nothing, under a new lease of 30 s.
//! let stack = client
//!     .allocate(pb::AllocateRequest {
//!         items: vec![
//!             pb::AllocItem { service: "api".into(), pool: "web".into(), ..Default::default() },
//!             pb::AllocItem { service: "db".into(), pool: "db".into(), ..Default::default() },
//!         ],
//!         ttl_ms: 30_000,
//!         ..Default::default()
//!     })
//!     .await?;
//! let api = stack.allocations[0].port;
//! // Renew the lease every 10 s while the ports are in use; `keeper.lost()` says if it ends.
//! let keeper = client.keep_lease("default", stack.lease_id, Duration::from_secs(30));
//! // Say what runs there, on the same lease: the registration goes when the lease does.
//! let service = pb::Service {
//!     name: "api".into(),
//!     ports: vec![pb::ServicePort { name: "http".into(), port: api, protocol: "http".into() }],
//!     lease_id: stack.lease_id,
//!     ..Default::default()
//! };
//! client.register(pb::RegisterRequest { service: Some(service) }).await?;
//! let found = client.discover(pb::DiscoverRequest { name: "api".into(), ..Default::default() }).await?;
//! assert_eq!(found.services[0].ports[0].port, api);
//! // Done: stop renewing and revoke; the ports and the registration are given back at once.
//! drop(keeper);
//! client.revoke_lease(pb::LeaseRevokeRequest { team: "default".into(), lease_id: stack.lease_id }).await?;
//! assert!(client.discover(pb::DiscoverRequest::default()).await?.services.is_empty());
//! # Ok(()) }
//! ```
//!
//! Owns: connecting (with a bounded timeout and an error that names the address and what was
//! tried), following the leader and moving past unreachable nodes, one method per RPC (each
//! takes its request message and returns its reply, or the one message a reply carries), the
//! keep-alive helper ([`Client::keep_lease`]), and turning `tonic::Status` into [`ClientError`]
//! with the server's message and category.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

mod error;
mod follow;
mod lease;

use std::time::Duration;

pub use portmesh_proto::channel::CONNECT_TIMEOUT;
pub use portmesh_proto::strategy_from_pb;
pub use portmesh_proto::v1 as pb;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

pub use error::ClientError;
use error::missing;
pub use follow::CALL_TIMEOUT;
use follow::{Retry, open};
pub use lease::{LeaseKeeper, LeaseLost};

type Result<T> = std::result::Result<T, ClientError>;

/// One unary RPC through [`Client::call`] (leader following, retries as `retry` allows):
/// `rpc!(self, Retry::Safe, pools_client::PoolsClient, list, req)` calls `PoolsClient::list`.
macro_rules! rpc {
    ($client:ident, $retry:expr, $module:ident :: $stub:ident, $method:ident, $req:expr) => {{
        let req = $req;
        $client
            .call($retry, |ch| {
                let req = req.clone();
                async move { pb::$module::$stub::new(ch).$method(req).await }
            })
            .await
    }};
}

/// A connection to a cluster. Cheap to clone (clones share the connection).
///
/// Leader following: a write (or linearizable read) sent to a follower comes back as UNAVAILABLE
/// naming the leader; the client reconnects there and retries, which is always safe because the
/// follower applied nothing. With several endpoints ([`Client::connect_any`]), a node that cannot
/// be reached is replaced by the next one for reads and idempotent calls; a write whose
/// connection failed midway is reported as an error, since it may or may not have been applied.
#[derive(Debug, Clone)]
pub struct Client {
    conn: std::sync::Arc<std::sync::Mutex<(String, Channel)>>,
    endpoints: std::sync::Arc<Vec<String>>,
    options: std::sync::Arc<ClientOptions>,
    bearer: Bearer,
}

/// How a client connects: plaintext (the default, for the local node) or TLS, with or without a
/// token.
#[derive(Clone, Default)]
pub struct ClientOptions {
    /// TLS: the cluster's CA and, for clusters that require client certificates, this client's
    /// certificate and key.
    pub tls: Option<portmesh_tls::ClientTls>,
    /// The bearer token sent with every call, for clusters that run with authentication.
    pub token: Option<String>,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: never printed.
        f.debug_struct("ClientOptions")
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .finish()
    }
}

/// What every call goes through: the connection and the token it carries.
pub type Conn = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// Puts the client's token into every call (`authorization: Bearer <token>`).
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// The interceptor for `token` (none: calls carry no token). A token with characters no
    /// token has (a line break, non-ASCII) is [`ClientError::BadToken`]. The value is marked
    /// sensitive, so it is kept out of HTTP/2 header compression tables and debug output.
    pub fn new(token: Option<&str>) -> Result<Bearer> {
        let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(Bearer(None));
        };
        let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {token}").parse().map_err(|_| ClientError::BadToken)?;
        value.set_sensitive(true);
        Ok(Bearer(Some(value)))
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Bearer(set)" } else { "Bearer(none)" })
    }
}

impl Bearer {
    /// Puts the token into one request (for calls made without [`Client`], e.g. a node's join).
    pub fn apply<T>(&self, req: &mut tonic::Request<T>) {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        self.apply(&mut req);
        Ok(req)
    }
}

/// How often [`Client::allocate_here`] asks again after finding granted ports busy here.
pub const HERE_ROUNDS: usize = 3;

impl Client {
    /// Connects to the node at `addr` (`host:port` or a URL).
    pub async fn connect(addr: &str) -> Result<Client> {
        Client::connect_any(&[addr]).await
    }

    /// Connects to the first reachable of several nodes of one cluster.
    pub async fn connect_any(addrs: &[&str]) -> Result<Client> {
        Client::connect_with(addrs, ClientOptions::default()).await
    }

    /// Connects to the first reachable of several nodes of one cluster, with `options` (TLS).
    /// A TLS handshake that fails says why ([`ClientError::Tls`]).
    pub async fn connect_with(addrs: &[&str], options: ClientOptions) -> Result<Client> {
        let bearer = Bearer::new(options.token.as_deref())?;
        let mut last = None;
        for a in addrs {
            match open(a, &options).await {
                Ok(channel) => {
                    return Ok(Client {
                        conn: std::sync::Arc::new(std::sync::Mutex::new((a.to_string(), channel))),
                        endpoints: std::sync::Arc::new(addrs.iter().map(|s| s.to_string()).collect()),
                        options: std::sync::Arc::new(options),
                        bearer,
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::BadAddress {
            addr: String::new(),
            reason: "no address given".into(),
        }))
    }

    /// A client of another node of the same cluster (a member's address from `status`), connected
    /// the way this one is (the same TLS).
    pub async fn member(&self, addr: &str) -> Result<Client> {
        Client::connect_with(&[addr], (*self.options).clone()).await
    }

    /// The address of the node this client currently talks to.
    pub fn addr(&self) -> String {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    fn channel(&self) -> Conn {
        let channel = self.conn.lock().unwrap_or_else(|p| p.into_inner()).1.clone();
        Conn::new(channel, self.bearer.clone())
    }

    pub async fn allocate(&self, req: pb::AllocateRequest) -> Result<pb::AllocateResponse> {
        // Keyed allocations are idempotent (the same key returns the same live allocation).
        let retry =
            if req.items.iter().all(|i| !i.key.is_empty()) { Retry::Safe } else { Retry::OnlyOnRedirect };
        rpc!(self, retry, allocator_client::AllocatorClient, allocate, req)
    }

    /// Allocates ports for this host: names it in the request, so the member node running here
    /// probes the candidates; if none runs here (the cluster is elsewhere), probes the new ports
    /// itself and, if any is busy, releases them and asks again with them reported busy, up to
    /// [`HERE_ROUNDS`] times (deregistering what `req.register` registered on them). Ports of
    /// live sticky keys (`existing`) are left alone: the process holding them is usually their
    /// owner.
    pub async fn allocate_here(&self, mut req: pb::AllocateRequest) -> Result<pb::AllocateResponse> {
        if req.host.is_empty() {
            req.host = portmesh_probe::hostname();
        }
        let mut round = 0;
        loop {
            let r = self.allocate(req.clone()).await?;
            let fresh: Vec<u16> = r
                .allocations
                .iter()
                .zip(r.existing.iter().chain(std::iter::repeat(&false)))
                .filter(|(_, existing)| !**existing)
                .filter_map(|(a, _)| u16::try_from(a.port).ok())
                .collect();
            round += 1;
            if r.host_probed || round > HERE_ROUNDS {
                return Ok(r);
            }
            let busy = portmesh_probe::busy_ports(&fresh);
            if busy.is_empty() {
                return Ok(r);
            }
            // Give back every new port of the batch (it was granted atomically), and the
            // registration made on them, and ask again; live sticky keys keep theirs.
            let ports = fresh.iter().map(|p| u32::from(*p)).collect();
            self.release(pb::ReleaseRequest { team: req.team.clone(), ports, ..Default::default() }).await?;
            if let Some(s) = &r.registered {
                self.deregister(pb::DeregisterRequest { team: s.team.clone(), id: s.id.clone() }).await?;
            }
            req.busy_ports.extend(busy.iter().map(|p| u32::from(*p)));
        }
    }

    pub async fn release(&self, req: pb::ReleaseRequest) -> Result<pb::ReleaseResponse> {
        rpc!(self, Retry::OnlyOnRedirect, allocator_client::AllocatorClient, release, req)
    }

    /// Keeps a port out of automatic selection.
    pub async fn reserve(&self, req: pb::ReserveRequest) -> Result<pb::Reservation> {
        let r = rpc!(self, Retry::OnlyOnRedirect, allocator_client::AllocatorClient, reserve, req)?;
        r.reservation.ok_or_else(|| missing("reservation"))
    }

    pub async fn unreserve(&self, req: pb::UnreserveRequest) -> Result<pb::UnreserveResponse> {
        rpc!(self, Retry::OnlyOnRedirect, allocator_client::AllocatorClient, unreserve, req)
    }

    pub async fn list(&self, req: pb::ListRequest) -> Result<pb::ListResponse> {
        rpc!(self, Retry::Safe, allocator_client::AllocatorClient, list, req)
    }

    /// Pools of a team (every team when `req.team` is empty), linearizable unless `req.stale`.
    pub async fn list_pools(&self, req: pb::ListPoolsRequest) -> Result<pb::ListPoolsResponse> {
        rpc!(self, Retry::Safe, pools_client::PoolsClient, list, req)
    }

    /// Usage statistics and recommendations of `req.team` ("" = every team), as the node
    /// answering sees them.
    pub async fn stats(&self, req: pb::StatsRequest) -> Result<pb::StatsResponse> {
        rpc!(self, Retry::Safe, pools_client::PoolsClient, stats, req)
    }

    pub async fn add_pool(&self, req: pb::AddPoolRequest) -> Result<pb::Pool> {
        let r = rpc!(self, Retry::OnlyOnRedirect, pools_client::PoolsClient, add, req)?;
        r.pool.ok_or_else(|| missing("pool"))
    }

    pub async fn remove_pool(&self, req: pb::RemovePoolRequest) -> Result<pb::RemovePoolResponse> {
        rpc!(self, Retry::OnlyOnRedirect, pools_client::PoolsClient, remove, req)
    }

    /// Sets the cluster's cool-down after release (admin).
    pub async fn set_cooldown(&self, req: pb::SetCooldownRequest) -> Result<pb::SetCooldownResponse> {
        rpc!(self, Retry::OnlyOnRedirect, pools_client::PoolsClient, set_cooldown, req)
    }

    pub async fn grant_lease(&self, req: pb::LeaseGrantRequest) -> Result<pb::Lease> {
        let r = rpc!(self, Retry::OnlyOnRedirect, leases_client::LeasesClient, grant, req)?;
        r.lease.ok_or_else(|| missing("lease"))
    }

    pub async fn revoke_lease(&self, req: pb::LeaseRevokeRequest) -> Result<pb::LeaseRevokeResponse> {
        rpc!(self, Retry::OnlyOnRedirect, leases_client::LeasesClient, revoke, req)
    }

    /// Renews a lease once. Returns the new TTL; `None` when the lease no longer exists.
    pub async fn keep_alive_once(&self, req: pb::LeaseKeepAliveRequest) -> Result<Option<Duration>> {
        let first = self
            .call(Retry::Safe, |ch| {
                let req = req.clone();
                async move {
                    let mut stream = pb::leases_client::LeasesClient::new(ch)
                        .keep_alive(tokio_stream::iter([req]))
                        .await?
                        .into_inner();
                    match stream.message().await? {
                        Some(reply) => Ok(tonic::Response::new(reply)),
                        // A node that is stopping ends its streams: ask another (a renewal is
                        // safe to repeat).
                        None => Err(tonic::Status::unavailable(
                            "the node ended the keep-alive stream without a reply (it is stopping)",
                        )),
                    }
                }
            })
            .await?;
        Ok((first.ttl_ms > 0).then(|| Duration::from_millis(first.ttl_ms)))
    }

    /// The lease as the leader counts it, with what is attached.
    pub async fn time_to_live(&self, req: pb::LeaseTimeToLiveRequest) -> Result<pb::LeaseTimeToLiveResponse> {
        rpc!(self, Retry::Safe, leases_client::LeasesClient, time_to_live, req)
    }

    /// Registers a service (or replaces the registration with the same id); see
    /// `pb::RegisterRequest` for the defaults of empty fields.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), portmesh_client::ClientError> {
    /// use portmesh_client::{Client, pb};
    /// let client = Client::connect("127.0.0.1:7400").await?;
    /// let service = pb::Service {
    ///     name: "api".into(),
    ///     project: "shop".into(),
    ///     ports: vec![pb::ServicePort { name: "http".into(), port: 8001, protocol: "http".into() }],
    ///     check: Some(pb::HealthCheck {
    ///         r#type: pb::CheckType::CheckHttp as i32,
    ///         path: "/health".into(),
    ///         interval_ms: 1_000,
    ///         ..Default::default()
    ///     }),
    ///     ..Default::default()
    /// };
    /// let api = client.register(pb::RegisterRequest { service: Some(service) }).await?;
    /// println!("registered {}", api.id);
    /// # Ok(()) }
    /// ```
    pub async fn register(&self, req: pb::RegisterRequest) -> Result<pb::Service> {
        let r = rpc!(self, Retry::Safe, registry_client::RegistryClient, register, req)?;
        r.service.ok_or_else(|| missing("service"))
    }

    /// Reports health changes of services (what a node's checker found); the leader applies
    /// them. Setting a status is idempotent, so the call is repeated wherever that is needed.
    pub async fn report_health(&self, req: pb::ReportHealthRequest) -> Result<pb::ReportHealthResponse> {
        rpc!(self, Retry::Safe, registry_client::RegistryClient, report_health, req)
    }

    /// Removes a registration; returns what was removed.
    pub async fn deregister(&self, req: pb::DeregisterRequest) -> Result<pb::Service> {
        let r = rpc!(self, Retry::OnlyOnRedirect, registry_client::RegistryClient, deregister, req)?;
        r.service.ok_or_else(|| missing("service"))
    }

    /// Finds services; only healthy ones unless `req.include_unhealthy`.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), portmesh_client::ClientError> {
    /// use portmesh_client::{Client, pb};
    /// let client = Client::connect("127.0.0.1:7400").await?;
    /// let found = client.discover(pb::DiscoverRequest { name: "api".into(), ..Default::default() }).await?;
    /// for s in &found.services {
    ///     println!("{} on {}:{}", s.name, s.host, s.ports[0].port);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn discover(&self, req: pb::DiscoverRequest) -> Result<pb::DiscoverResponse> {
        rpc!(self, Retry::Safe, registry_client::RegistryClient, discover, req)
    }

    pub async fn status(&self) -> Result<pb::StatusResponse> {
        let channel = self.channel();
        Ok(pb::cluster_client::ClusterClient::new(channel).status(pb::StatusRequest {}).await?.into_inner())
    }

    /// Removes member `req.node_id` from the cluster (sent to the leader). Returns the members
    /// left.
    pub async fn leave(&self, req: pb::LeaveRequest) -> Result<Vec<pb::Member>> {
        let r = rpc!(self, Retry::OnlyOnRedirect, cluster_client::ClusterClient, leave, req)?;
        Ok(r.members)
    }

    /// Creates a token (admin only); the reply holds the token, shown this once.
    pub async fn create_token(&self, req: pb::CreateTokenRequest) -> Result<pb::CreateTokenResponse> {
        rpc!(self, Retry::OnlyOnRedirect, tokens_client::TokensClient, create, req)
    }

    /// The cluster's tokens, without their secrets (admin only).
    pub async fn list_tokens(&self) -> Result<Vec<pb::TokenInfo>> {
        Ok(rpc!(self, Retry::Safe, tokens_client::TokensClient, list, pb::ListTokensRequest {})?.tokens)
    }

    /// Revokes a token by id (admin only).
    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        let req = pb::RevokeTokenRequest { id: id.to_string() };
        rpc!(self, Retry::OnlyOnRedirect, tokens_client::TokensClient, revoke, req)?;
        Ok(())
    }

    /// Follows the state's changes from `req.from_revision` (see the `Watch` service). To resume
    /// after the stream ends, watch again from the last `revision` + 1, on any node.
    pub async fn watch(&self, req: pb::WatchRequest) -> Result<tonic::Streaming<pb::WatchResponse>> {
        rpc!(self, Retry::Safe, watch_client::WatchClient, watch, req)
    }

    pub async fn shutdown(&self) -> Result<()> {
        pb::cluster_client::ClusterClient::new(self.channel()).shutdown(pb::ShutdownRequest {}).await?;
        Ok(())
    }

    /// Whether the node is ready: gRPC health says SERVING for `portmesh` (it knows a leader and
    /// has applied its log).
    pub async fn is_serving(&self) -> Result<bool> {
        self.health("portmesh").await
    }

    /// Whether the node reports SERVING for `service` on gRPC health (`""`: the process serves,
    /// liveness; `portmesh` or a service name: part of a cluster with a leader and caught up,
    /// readiness).
    pub async fn health(&self, service: &str) -> Result<bool> {
        let mut h = HealthClient::new(self.channel());
        let r = h.check(HealthCheckRequest { service: service.to_string() }).await?.into_inner();
        Ok(r.status == ServingStatus::Serving as i32)
    }

    /// Waits until the node reports SERVING for `service` (see [`Client::health`]), following
    /// gRPC health's `Watch` stream rather than asking again and again. Bound it with a timeout:
    /// a node that never becomes ready keeps this waiting. An unknown name fails at once
    /// (NOT_FOUND); a stream the node ends fails with what it said.
    pub async fn wait_health(&self, service: &str) -> Result<()> {
        let mut h = HealthClient::new(self.channel());
        let mut updates = h.watch(HealthCheckRequest { service: service.to_string() }).await?.into_inner();
        while let Some(r) = updates.message().await? {
            if r.status == ServingStatus::Serving as i32 {
                return Ok(());
            }
        }
        Err(tonic::Status::unavailable(format!(
            "the node ended the health stream of {service:?} before it was SERVING"
        ))
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portmesh_proto::ERROR_METADATA;

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
        s.metadata_mut().insert(ERROR_METADATA, "not_found".parse().unwrap());
        let e = ClientError::from(s);
        assert_eq!(e.to_string(), "unknown lease 4");
        assert_eq!(e.kind(), Some("not_found"));
    }
}
