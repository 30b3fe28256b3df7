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
//! client
//!     .register(pb::Service {
//!         name: "api".into(),
//!         ports: vec![pb::ServicePort { name: "http".into(), port: api, protocol: "http".into() }],
//!         lease_id: stack.lease_id,
//!         ..Default::default()
//!     })
//!     .await?;
//! let found = client.discover(pb::DiscoverRequest { name: "api".into(), ..Default::default() }).await?;
//! assert_eq!(found.services[0].ports[0].port, api);
//! // Done: stop renewing and revoke; the ports and the registration are given back at once.
//! drop(keeper);
//! client.revoke_lease("default", stack.lease_id).await?;
//! assert!(client.discover(pb::DiscoverRequest::default()).await?.services.is_empty());
//! # Ok(()) }
//! ```
//!
//! Owns: connecting (with a bounded timeout and an error that names the address and what was
//! tried), following the leader and moving past unreachable nodes, one method per RPC, the
//! keep-alive helper ([`Client::keep_lease`]), and turning `tonic::Status` into [`ClientError`]
//! with the server's message and category.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

use std::time::Duration;

use portmesh_proto::channel::{self, Purpose};
pub use portmesh_proto::strategy_from_pb;
pub use portmesh_proto::v1 as pb;
use portmesh_proto::{ERROR_METADATA, LEADER_METADATA, OLDEST_REVISION_METADATA};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

pub use portmesh_proto::channel::CONNECT_TIMEOUT;

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
        /// On a `compacted` watch error: the oldest revision the node still has.
        oldest_revision: Option<u64>,
    },
    #[error("invalid node address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: String },
}

impl ClientError {
    /// On a `compacted` watch error: the oldest revision still available.
    pub fn oldest_revision(&self) -> Option<u64> {
        match self {
            ClientError::Status { oldest_revision, .. } => *oldest_revision,
            _ => None,
        }
    }

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
        let kind = s.metadata().get(ERROR_METADATA).and_then(|v| v.to_str().ok()).map(str::to_string);
        let message =
            if s.message().is_empty() { format!("{:?}", s.code()) } else { s.message().to_string() };
        let oldest_revision = s
            .metadata()
            .get(OLDEST_REVISION_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        ClientError::Status { code: s.code(), message, kind, oldest_revision }
    }
}

type Result<T> = std::result::Result<T, ClientError>;

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
}

/// Why a kept lease was lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseLost {
    #[error("lease {id} no longer exists (it expired or was revoked): its ports are gone")]
    Gone { id: u64 },
    #[error(
        "lease {id} was not renewed for a whole TTL ({ttl:?}): no node answered ({last_error}); assume it expired"
    )]
    Unrenewed { id: u64, ttl: Duration, last_error: String },
}

/// Renews a lease in the background (see [`Client::keep_lease`]). Dropping it stops renewing.
#[derive(Debug)]
pub struct LeaseKeeper {
    id: u64,
    lost: tokio::sync::watch::Receiver<Option<LeaseLost>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    /// Waits until the lease is lost.
    pub async fn lost(&mut self) -> LeaseLost {
        loop {
            if let Some(l) = self.lost.borrow_and_update().clone() {
                return l;
            }
            if self.lost.changed().await.is_err() {
                // The renewing task ended without a report (it cannot, short of a panic).
                return LeaseLost::Gone { id: self.id };
            }
        }
    }

    /// The loss, if the lease was lost already.
    pub fn lost_now(&self) -> Option<LeaseLost> {
        self.lost.borrow().clone()
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How often [`Client::allocate_here`] asks again after finding granted ports busy here.
pub const HERE_ROUNDS: usize = 3;

/// How long one attempt of a call may wait for the node's answer (the node itself gives up on a
/// write after its write timeout, 5 s by default, so an answer normally comes first).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(12);

/// How long a call keeps following the leader or moving past dead endpoints: longer than an
/// election takes.
const FOLLOW_BUDGET: Duration = Duration::from_secs(10);
/// Pause before asking again while a cluster has no reachable leader.
const PAUSE: Duration = Duration::from_millis(100);

async fn open(addr: &str) -> Result<Channel> {
    let endpoint = channel::endpoint(addr, Purpose::Client)
        .map_err(|e| ClientError::BadAddress { addr: e.addr, reason: e.reason })?;
    endpoint.connect().await.map_err(|e| ClientError::Unreachable {
        addr: addr.to_string(),
        timeout: CONNECT_TIMEOUT,
        reason: error_chain(&e),
    })
}

/// Whether a failed call never reached a node: no connection could be made, so nothing was
/// sent and repeating it elsewhere is safe.
fn never_sent(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Whether a call may be repeated on another node after a transport failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    Safe,
    OnlyOnRedirect,
}

impl Client {
    /// Connects to the node at `addr` (`host:port` or a URL).
    pub async fn connect(addr: &str) -> Result<Client> {
        Client::connect_any(&[addr]).await
    }

    /// Connects to the first reachable of several nodes of one cluster.
    pub async fn connect_any(addrs: &[&str]) -> Result<Client> {
        let mut last = None;
        for a in addrs {
            match open(a).await {
                Ok(channel) => {
                    return Ok(Client {
                        conn: std::sync::Arc::new(std::sync::Mutex::new((a.to_string(), channel))),
                        endpoints: std::sync::Arc::new(addrs.iter().map(|s| s.to_string()).collect()),
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

    /// The address of the node this client currently talks to.
    pub fn addr(&self) -> String {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    fn channel(&self) -> Channel {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).1.clone()
    }

    async fn switch_to(&self, addr: &str) -> Result<()> {
        let channel = open(addr).await?;
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = (addr.to_string(), channel);
        Ok(())
    }

    /// Runs one RPC, following the leader and (when `retry` allows) moving past dead endpoints,
    /// for at most [`FOLLOW_BUDGET`] — long enough to ride out an election.
    async fn call<T, F, Fut>(&self, retry: Retry, f: F) -> Result<T>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + FOLLOW_BUDGET;
        let mut hop = 0usize;
        loop {
            let status = match tokio::time::timeout(CALL_TIMEOUT, f(self.channel())).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) => s,
                // No answer at all: the node or the path to it is gone. Like a connection cut
                // off midway, the outcome of a write is unknown.
                Err(_) => tonic::Status::cancelled(format!(
                    "no answer from the node at {} within {CALL_TIMEOUT:?}",
                    self.addr()
                )),
            };
            let leader =
                status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()).map(str::to_string);
            let category =
                status.metadata().get(ERROR_METADATA).and_then(|v| v.to_str().ok()).map(str::to_string);
            // Without a portmesh category, the error came from the connection, not the node: a
            // refused connect is UNAVAILABLE, a request cut off midway UNKNOWN or CANCELLED.
            let transport = category.is_none()
                && matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                );
            let unsent = transport && never_sent(&status);
            let err = ClientError::from(status);
            if tokio::time::Instant::now() >= deadline {
                return Err(err);
            }
            hop += 1;
            match (leader, category.as_deref()) {
                (Some(leader), _) if leader != self.addr() => {
                    // The named leader may itself be gone (the others have not noticed yet):
                    // pause, and ask another node.
                    if self.switch_to(&leader).await.is_err() {
                        tokio::time::sleep(PAUSE).await;
                        self.next_endpoint(hop).await;
                    }
                }
                // No leader known yet (an election): give it a moment, then ask again.
                (_, Some("not_leader")) => {
                    tokio::time::sleep(PAUSE).await;
                    self.next_endpoint(hop).await;
                }
                // No quorum answered this node in time: it may be cut off. Later calls go
                // elsewhere; this one is repeated only if that is safe (its outcome is unknown).
                (_, Some("timeout")) if self.endpoints.len() > 1 => {
                    self.next_endpoint(hop).await;
                    if retry != Retry::Safe {
                        return Err(err);
                    }
                }
                _ if transport && self.endpoints.len() > 1 => {
                    // The node is gone: later calls go elsewhere. This call is repeated only if
                    // that is safe (idempotent, or it never left this process); otherwise its
                    // outcome is unknown and the caller must know.
                    self.next_endpoint(hop).await;
                    if retry != Retry::Safe && !unsent {
                        return Err(err);
                    }
                }
                _ => return Err(err),
            }
        }
    }

    /// Moves to another endpoint (best effort; stays put when none answers).
    async fn next_endpoint(&self, hop: usize) {
        let n = self.endpoints.len();
        let current = self.addr();
        for i in 0..n {
            let a = &self.endpoints[(hop + 1 + i) % n];
            if *a != current && self.switch_to(a).await.is_ok() {
                return;
            }
        }
    }

    pub async fn allocate(&self, req: pb::AllocateRequest) -> Result<pb::AllocateResponse> {
        // Keyed allocations are idempotent (the same key returns the same live allocation).
        let retry =
            if req.items.iter().all(|i| !i.key.is_empty()) { Retry::Safe } else { Retry::OnlyOnRedirect };
        self.call(retry, |ch| {
            let req = req.clone();
            async move { pb::allocator_client::AllocatorClient::new(ch).allocate(req).await }
        })
        .await
    }

    /// Allocates ports for this host: names it in the request, so the member node running here
    /// probes the candidates; if none runs here (the cluster is elsewhere), probes the new ports
    /// itself and, if any is busy, releases them and asks again with them reported busy, up to
    /// [`HERE_ROUNDS`] times. Ports of live sticky keys (`existing`) are left alone: the process
    /// holding them is usually their owner.
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
            // Give back every new port of the batch (it was granted atomically) and ask again;
            // live sticky keys keep theirs.
            let ports = fresh.iter().map(|p| u32::from(*p)).collect();
            self.release(pb::ReleaseRequest { team: req.team.clone(), ports, ..Default::default() }).await?;
            req.busy_ports.extend(busy.iter().map(|p| u32::from(*p)));
        }
    }

    pub async fn release(&self, req: pb::ReleaseRequest) -> Result<pb::ReleaseResponse> {
        self.call(Retry::OnlyOnRedirect, |ch| {
            let req = req.clone();
            async move { pb::allocator_client::AllocatorClient::new(ch).release(req).await }
        })
        .await
    }

    pub async fn reserve(&self, port: u16, reason: &str) -> Result<pb::Reservation> {
        let req = pb::ReserveRequest { port: port.into(), reason: reason.to_string() };
        let r = self
            .call(Retry::OnlyOnRedirect, |ch| {
                let req = req.clone();
                async move { pb::allocator_client::AllocatorClient::new(ch).reserve(req).await }
            })
            .await?;
        r.reservation.ok_or_else(|| missing("reservation"))
    }

    pub async fn unreserve(&self, port: u16) -> Result<pb::UnreserveResponse> {
        let req = pb::UnreserveRequest { port: port.into() };
        self.call(Retry::OnlyOnRedirect, |ch| async move {
            pb::allocator_client::AllocatorClient::new(ch).unreserve(req).await
        })
        .await
    }

    pub async fn list(&self, req: pb::ListRequest) -> Result<pb::ListResponse> {
        self.call(Retry::Safe, |ch| {
            let req = req.clone();
            async move { pb::allocator_client::AllocatorClient::new(ch).list(req).await }
        })
        .await
    }

    /// Pools of a team (every team when `req.team` is empty), linearizable unless `req.stale`.
    pub async fn list_pools(&self, req: pb::ListPoolsRequest) -> Result<pb::ListPoolsResponse> {
        self.call(Retry::Safe, |ch| {
            let req = req.clone();
            async move { pb::pools_client::PoolsClient::new(ch).list(req).await }
        })
        .await
    }

    /// Usage statistics and recommendations of `team` ("" = every team), as the node answering
    /// sees them.
    pub async fn stats(&self, team: &str) -> Result<pb::StatsResponse> {
        let req = pb::StatsRequest { team: team.to_string() };
        self.call(Retry::Safe, |ch| {
            let req = req.clone();
            async move { pb::pools_client::PoolsClient::new(ch).stats(req).await }
        })
        .await
    }

    pub async fn add_pool(&self, team: &str, name: &str, ranges: Vec<pb::PortRange>) -> Result<pb::Pool> {
        let req = pb::AddPoolRequest { team: team.to_string(), name: name.to_string(), ranges };
        let r = self
            .call(Retry::OnlyOnRedirect, |ch| {
                let req = req.clone();
                async move { pb::pools_client::PoolsClient::new(ch).add(req).await }
            })
            .await?;
        r.pool.ok_or_else(|| missing("pool"))
    }

    pub async fn remove_pool(&self, team: &str, name: &str) -> Result<pb::RemovePoolResponse> {
        let req = pb::RemovePoolRequest { team: team.to_string(), name: name.to_string() };
        self.call(Retry::OnlyOnRedirect, |ch| {
            let req = req.clone();
            async move { pb::pools_client::PoolsClient::new(ch).remove(req).await }
        })
        .await
    }

    pub async fn grant_lease(&self, team: &str, ttl: Duration) -> Result<pb::Lease> {
        let req = pb::LeaseGrantRequest { team: team.to_string(), ttl_ms: ttl.as_millis() as u64 };
        let r = self
            .call(Retry::OnlyOnRedirect, |ch| {
                let req = req.clone();
                async move { pb::leases_client::LeasesClient::new(ch).grant(req).await }
            })
            .await?;
        r.lease.ok_or_else(|| missing("lease"))
    }

    pub async fn revoke_lease(&self, team: &str, id: u64) -> Result<pb::LeaseRevokeResponse> {
        let req = pb::LeaseRevokeRequest { team: team.to_string(), lease_id: id };
        self.call(Retry::OnlyOnRedirect, |ch| {
            let req = req.clone();
            async move { pb::leases_client::LeasesClient::new(ch).revoke(req).await }
        })
        .await
    }

    /// Renews a lease once. Returns the new TTL; `None` when the lease no longer exists.
    pub async fn keep_alive_once(&self, team: &str, id: u64) -> Result<Option<Duration>> {
        let req = pb::LeaseKeepAliveRequest { team: team.to_string(), lease_id: id };
        let first = self
            .call(Retry::Safe, |ch| {
                let req = req.clone();
                async move {
                    let mut stream = pb::leases_client::LeasesClient::new(ch)
                        .keep_alive(tokio_stream::iter([req]))
                        .await?
                        .into_inner();
                    let reply = stream.message().await?;
                    Ok(tonic::Response::new(reply))
                }
            })
            .await?;
        match first {
            Some(r) if r.ttl_ms > 0 => Ok(Some(Duration::from_millis(r.ttl_ms))),
            Some(_) => Ok(None),
            None => Err(missing("keep-alive reply")),
        }
    }

    /// The lease as the leader counts it, with what is attached.
    pub async fn time_to_live(&self, team: &str, id: u64) -> Result<pb::LeaseTimeToLiveResponse> {
        let req = pb::LeaseTimeToLiveRequest { team: team.to_string(), lease_id: id };
        self.call(Retry::Safe, |ch| {
            let req = req.clone();
            async move { pb::leases_client::LeasesClient::new(ch).time_to_live(req).await }
        })
        .await
    }

    /// Keeps a lease alive in the background: renews it every `ttl / 3` until the returned
    /// handle is dropped, and reports through the handle when the lease is lost (gone, or not
    /// renewed for a whole TTL because no node answered).
    ///
    /// ```no_run
    /// # async fn demo(client: portmesh_client::Client) -> Result<(), portmesh_client::ClientError> {
    /// use std::time::Duration;
    /// let lease = client.grant_lease("default", Duration::from_secs(30)).await?;
    /// let mut kept = client.keep_lease("default", lease.id, Duration::from_secs(30));
    /// // ... run the work that needs the ports ...
    /// if let Some(lost) = kept.lost_now() {
    ///     eprintln!("lost the lease: {lost}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn keep_lease(&self, team: &str, id: u64, ttl: Duration) -> LeaseKeeper {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let client = self.clone();
        let team = team.to_string();
        let every = (ttl / 3).max(Duration::from_millis(100));
        let task = tokio::spawn(async move {
            let mut renewed = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(every).await;
                match client.keep_alive_once(&team, id).await {
                    Ok(Some(_)) => renewed = tokio::time::Instant::now(),
                    Ok(None) => {
                        tx.send_replace(Some(LeaseLost::Gone { id }));
                        return;
                    }
                    Err(e) if renewed.elapsed() >= ttl => {
                        tx.send_replace(Some(LeaseLost::Unrenewed { id, ttl, last_error: e.to_string() }));
                        return;
                    }
                    // A failed renewal with time left: try again at the next turn.
                    Err(_) => {}
                }
            }
        });
        LeaseKeeper { id, lost: rx, task }
    }

    /// Registers a service (or replaces the registration with the same id); see
    /// `pb::RegisterRequest` for the defaults of empty fields.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), portmesh_client::ClientError> {
    /// use portmesh_client::{Client, pb};
    /// let client = Client::connect("127.0.0.1:7400").await?;
    /// let api = client
    ///     .register(pb::Service {
    ///         name: "api".into(),
    ///         project: "shop".into(),
    ///         ports: vec![pb::ServicePort { name: "http".into(), port: 8001, protocol: "http".into() }],
    ///         check: Some(pb::HealthCheck {
    ///             r#type: pb::CheckType::CheckHttp as i32,
    ///             path: "/health".into(),
    ///             interval_ms: 1_000,
    ///             ..Default::default()
    ///         }),
    ///         ..Default::default()
    ///     })
    ///     .await?;
    /// println!("registered {}", api.id);
    /// # Ok(()) }
    /// ```
    pub async fn register(&self, service: pb::Service) -> Result<pb::Service> {
        let req = pb::RegisterRequest { service: Some(service) };
        let r = self
            .call(Retry::Safe, |ch| {
                let req = req.clone();
                async move { pb::registry_client::RegistryClient::new(ch).register(req).await }
            })
            .await?;
        r.service.ok_or_else(|| missing("service"))
    }

    /// Reports health changes of services (what a node's checker found); the leader applies
    /// them. Setting a status is idempotent, so the call is repeated wherever that is needed.
    pub async fn report_health(&self, reports: Vec<pb::HealthReport>) -> Result<()> {
        let req = pb::ReportHealthRequest { reports };
        self.call(Retry::Safe, |ch| {
            let req = req.clone();
            async move { pb::registry_client::RegistryClient::new(ch).report_health(req).await }
        })
        .await
        .map(drop)
    }

    /// Removes a registration; returns what was removed.
    pub async fn deregister(&self, team: &str, id: &str) -> Result<pb::Service> {
        let req = pb::DeregisterRequest { team: team.to_string(), id: id.to_string() };
        let r = self
            .call(Retry::OnlyOnRedirect, |ch| {
                let req = req.clone();
                async move { pb::registry_client::RegistryClient::new(ch).deregister(req).await }
            })
            .await?;
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
        self.call(Retry::Safe, |ch| {
            let req = req.clone();
            async move { pb::registry_client::RegistryClient::new(ch).discover(req).await }
        })
        .await
    }

    pub async fn status(&self) -> Result<pb::StatusResponse> {
        let channel = self.channel();
        Ok(pb::cluster_client::ClusterClient::new(channel).status(pb::StatusRequest {}).await?.into_inner())
    }

    /// Removes member `node_id` from the cluster (sent to the leader). Returns the members left.
    pub async fn leave(&self, node_id: u64) -> Result<Vec<pb::Member>> {
        let r = self
            .call(Retry::OnlyOnRedirect, |ch| async move {
                pb::cluster_client::ClusterClient::new(ch).leave(pb::LeaveRequest { node_id }).await
            })
            .await?;
        Ok(r.members)
    }

    /// Follows the state's changes from `req.from_revision` (see the `Watch` service). To resume
    /// after the stream ends, watch again from the last `revision` + 1, on any node.
    pub async fn watch(&self, req: pb::WatchRequest) -> Result<tonic::Streaming<pb::WatchResponse>> {
        self.call(Retry::Safe, |ch| {
            let req = req.clone();
            async move { pb::watch_client::WatchClient::new(ch).watch(req).await }
        })
        .await
    }

    pub async fn shutdown(&self) -> Result<()> {
        pb::cluster_client::ClusterClient::new(self.channel()).shutdown(pb::ShutdownRequest {}).await?;
        Ok(())
    }

    /// Whether the node reports SERVING on the standard gRPC health service.
    pub async fn is_serving(&self) -> Result<bool> {
        let mut h = HealthClient::new(self.channel());
        let r = h.check(HealthCheckRequest { service: String::new() }).await?.into_inner();
        Ok(r.status == ServingStatus::Serving as i32)
    }
}

fn missing(what: &str) -> ClientError {
    ClientError::Status {
        code: tonic::Code::Internal,
        message: format!("the node's reply lacks the {what}"),
        kind: Some("internal".into()),
        oldest_revision: None,
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
        s.metadata_mut().insert(ERROR_METADATA, "not_found".parse().unwrap());
        let e = ClientError::from(s);
        assert_eq!(e.to_string(), "unknown lease 4");
        assert_eq!(e.kind(), Some("not_found"));
    }
}
