//! Assembles and runs one portmesh node.
//!
//! Owns: the boring, explicit assembly — config → store → Raft → services → gRPC and HTTP
//! servers — in [`start`], the node's home files (where the CLI finds a local node), health
//! reporting, and the one shutdown path ([`RunningNode::wait`]): stop serving, stop Raft, flush
//! storage, remove the address file. Does not own: what the services do (`portmesh-api`) or
//! command-line parsing (`portmesh` CLI).

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

mod auth;
mod checker;
mod health;
mod home;
mod http;
mod membership;
mod metrics;
mod seeds;
mod transport;
mod trim;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use portmesh_api::Api;
use portmesh_proto::channel::PeerTls;
use portmesh_raft::{RaftNode, RaftOptions, StartError};
use portmesh_store::{Store, StoreError, StoreOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use auth::new_token;
pub use health::{HEALTH_NAMES, READY_LAG};
pub use home::{NodeInfo, read_info, write_info};
pub use trim::configure_allocator;

/// Everything needed to start a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Data directory (sled files live in `DATA/sled`).
    pub data_dir: PathBuf,
    /// gRPC listen address. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// HTTP listen address (health, readiness, status). `None`: no HTTP.
    pub http: Option<SocketAddr>,
    /// Host names the HTTP server answers to besides IP addresses, `localhost`, this host's name
    /// and the advertised host (a browser's `Host` header must be one of them: DNS rebinding).
    pub http_allow_hosts: Vec<String>,
    /// Address peers and clients should use, if not the bound one.
    pub advertise: Option<String>,
    /// Start a new single-node cluster if this directory holds none.
    pub bootstrap: bool,
    /// Join the cluster that a member at this address belongs to, if this directory holds none.
    pub join: Option<String>,
    /// Directory where the node records its addresses (`node.json`) for local CLIs.
    pub home: Option<PathBuf>,
    pub raft: RaftOptions,
    pub store: StoreOptions,
    /// How long to wait for this node to see a leader after bootstrap.
    pub leader_timeout: Duration,
    /// The name of this node's host, as allocations record it [default: the OS host name].
    pub host: Option<String>,
    /// TLS for gRPC, HTTP and members' traffic (`None`: plaintext). Re-read when the files change.
    pub tls: Option<portmesh_tls::NodeFiles>,
    /// Ask callers for tokens (`serve --auth`). A node that bootstraps with it writes an admin
    /// token to `DATA/admin.token`. Needs `tls`: tokens are bearer secrets, and members prove
    /// themselves with certificates.
    pub auth: bool,
    /// The join token a joining node presents (`serve --join ADDR --join-token T`). The node
    /// that creates a cluster with `auth` registers it as a standing join token instead.
    pub join_token: Option<String>,
    /// The first admin token of a cluster this node creates with `auth`, when given (else one
    /// is made and written to `DATA/admin.token`).
    pub admin_token: Option<String>,
    /// The advertised addresses of the cluster's well-known members (a StatefulSet's first
    /// pods). A node with no cluster that has neither `bootstrap` nor `join` decides from them
    /// (see `seeds`); a node not among them leaves the cluster when it stops and empties its
    /// data directory (a scaled-down pod takes nothing with it).
    pub seeds: Vec<String>,
    /// How long a node with `seeds` waits for a seed that holds a cluster before it gives up.
    pub seed_timeout: Duration,
}

impl NodeConfig {
    /// A config with defaults for everything but the data directory and listen address.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            data_dir,
            listen,
            http: None,
            http_allow_hosts: Vec::new(),
            advertise: None,
            bootstrap: false,
            join: None,
            home: None,
            raft: RaftOptions::default(),
            store: StoreOptions::default(),
            leader_timeout: Duration::from_secs(30),
            host: None,
            tls: None,
            auth: false,
            join_token: None,
            admin_token: None,
            seeds: Vec::new(),
            seed_timeout: Duration::from_secs(120),
        }
    }
}

/// Streams a client opened and reset before this node accepted them, allowed per connection
/// (see the server builder in [`start`]).
const MAX_PENDING_RESETS: usize = 4096;

/// Errors starting a node, each naming what it was doing and where.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Raft(#[from] StartError),
    #[error(
        "cannot listen for {what} on {addr}: {source} (is another process using it? pick another with --{flag})"
    )]
    Bind { what: &'static str, addr: SocketAddr, flag: &'static str, source: std::io::Error },
    #[error("TLS: {0}")]
    Tls(#[from] portmesh_tls::TlsError),
    #[error("authentication: {0}")]
    Auth(String),
    /// Raft stopped on its own (a storage failure: a full or failing disk): the node cannot
    /// write again in this process, so it stopped; a supervisor (or the next CLI command, for
    /// the local node) starts it again once the cause is gone.
    #[error(
        "the node stopped because Raft stopped: {0}. Fix the cause (free disk space, check the disk) and start it again"
    )]
    RaftStopped(String),
    #[error("no leader after {0:?}: the node cannot serve writes")]
    NoLeader(Duration),
    #[error("cannot write the node's address file in {dir}: {source}")]
    Home { dir: PathBuf, source: std::io::Error },
    #[error("cannot join the cluster at {addr}: {reason} (tried: {tried})")]
    Join { addr: String, reason: String, tried: String },
    #[error(
        "data directory {dir} belongs to cluster {ours}, but the node at {addr} belongs to cluster {theirs}: \
         start without --join to run with cluster {ours}, or move {dir} aside to join cluster {theirs}"
    )]
    ForeignCluster { dir: PathBuf, ours: String, addr: String, theirs: String },
    #[error(
        "node {id} is no longer a member of cluster {cluster} (the node at {addr} lists {members}): \
         it was removed; move {dir} aside to join again as a new node"
    )]
    Removed { id: u64, cluster: String, addr: String, members: String, dir: PathBuf },
    #[error(
        "no cluster to join or create after {waited:?} of asking the seeds: {why}. Start the other seeds (and check \
         that their names resolve), or start this node with --bootstrap or --join ADDR"
    )]
    Seeds { waited: Duration, why: String },
}

/// A started node. Drive it with [`RunningNode::wait`].
#[derive(Debug)]
pub struct RunningNode {
    pub grpc_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub api: Api,
    shutdown: watch::Sender<bool>,
    grpc_task: JoinHandle<Result<(), tonic::transport::Error>>,
    http_task: Option<JoinHandle<()>>,
    health_task: JoinHandle<()>,
    /// Why the node stopped on its own, if it did (see [`NodeError::RaftStopped`]).
    failure: Arc<std::sync::Mutex<Option<String>>>,
    /// Runs the health checks of this host's registered services.
    checks_task: JoinHandle<()>,
    home: Option<PathBuf>,
    /// Not a seed of a cluster with seeds: leave it at shutdown and empty `data_dir`.
    leave_on_stop: bool,
    data_dir: PathBuf,
}

/// Starts a node: opens storage, starts Raft, binds and serves gRPC and HTTP.
pub async fn start(mut cfg: NodeConfig) -> Result<RunningNode, NodeError> {
    // Certificates first: a bad file is named before anything else happens.
    let tls = cfg.tls.as_ref().map(portmesh_tls::NodeFiles::load).transpose()?;
    cfg.raft.peer_tls = PeerTls::new(tls.as_ref().map(|t| t.client().clone()));
    let (serving_tls, serving_tls_rx) = match tls {
        Some(t) => {
            let (tx, rx) = watch::channel(t);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    portmesh_probe::private::create_dir(&cfg.data_dir)
        .map_err(|source| NodeError::Home { dir: cfg.data_dir.clone(), source })?;
    let store = Store::open(&cfg.data_dir, &cfg.store)?;
    // The data directory is the owner's alone (0700, files 0600), also one an older release made.
    if let Err(e) = portmesh_probe::private::restrict_tree(&cfg.data_dir) {
        tracing::warn!(dir = %cfg.data_dir.display(), error = %e, "cannot restrict the data directory to its owner");
    }

    let grpc_listener = TcpListener::bind(cfg.listen).await.map_err(|source| NodeError::Bind {
        what: "gRPC",
        addr: cfg.listen,
        flag: "listen",
        source,
    })?;
    let grpc_addr = grpc_listener.local_addr().map_err(|source| NodeError::Bind {
        what: "gRPC",
        addr: cfg.listen,
        flag: "listen",
        source,
    })?;
    let http_listener = match cfg.http {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| NodeError::Bind {
            what: "HTTP",
            addr,
            flag: "http",
            source,
        })?),
        None => None,
    };
    let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());
    let advertise = cfg.advertise.clone().unwrap_or_else(|| grpc_addr.to_string());

    let node = RaftNode::start(store, advertise.clone(), cfg.raft.clone()).await?;
    if cfg.bootstrap && cfg.join.is_none() {
        node.bootstrap().await?;
    }
    let initialized = node.is_initialized().await;
    if !initialized && cfg.join.is_none() {
        tracing::warn!(
            data_dir = %cfg.data_dir.display(),
            "this node belongs to no cluster yet; start it with --bootstrap to create one or --join ADDR to join one"
        );
    }

    let (shutdown, _) = watch::channel(false);
    let api = Api::new(
        node.clone(),
        cfg.host.clone().unwrap_or_else(portmesh_probe::hostname),
        cfg.data_dir.display().to_string(),
        http_addr.map(|a| a.to_string()).unwrap_or_default(),
        shutdown.clone(),
        cfg.auth || cfg.join_token.is_some(),
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    health::set_initial(&health).await;
    let failure = Arc::new(std::sync::Mutex::new(None));
    let health_task =
        tokio::spawn(health::report_health(node.clone(), health, shutdown.clone(), failure.clone()));
    // Reflection in both versions: grpc.reflection.v1, and v1alpha, the only one grpcurl before
    // 1.9, Python's grpcio-reflection and several GUI clients speak.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(portmesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_error = |e| NodeError::Raft(StartError::Config(format!("reflection: {e}")));
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;
    let reflection = reflection().build_v1().map_err(reflection_error)?;

    let mut stop = shutdown.subscribe();
    let grpc_incoming = transport::grpc_stream(transport::accept(
        grpc_listener,
        transport::Listener::Grpc,
        serving_tls_rx.clone(),
        shutdown.subscribe(),
    ));
    let grpc = tonic::transport::Server::builder()
        // Calls a client gave up on while this node was stalled (paused, or its disk slow) arrive
        // as opened-then-reset streams when it reads again. h2 counts those toward its guard
        // against reset floods (CVE-2023-44487) and, past 20 on one connection, sends
        // `GOAWAY too_many_resets`, failing every other call on it. A bound stays, raised above
        // what a stall of a busy connection produces.
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .layer(wire::WireLayer(api.clone()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(api.allocator())
        .add_service(api.leases())
        .add_service(api.pools())
        .add_service(api.cluster())
        .add_service(api.watch())
        .add_service(api.registry())
        .add_service(api.tokens())
        .add_service(portmesh_raft::RaftService::new(node.raft.clone()).server())
        // Accepted connections have TCP_NODELAY (transport::accept): small request/response
        // messages would otherwise stall up to 40 ms on Nagle's algorithm and delayed ACKs.
        .serve_with_incoming_shutdown(grpc_incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        });
    let grpc_task = tokio::spawn(grpc);
    let checks_task = tokio::spawn(checker::run_health_checks(api.clone(), shutdown.subscribe()));
    tokio::spawn(portmesh_api::count_events(api.clone(), shutdown.subscribe()));
    tokio::spawn(trim::run(shutdown.subscribe()));
    let hosts = http::AllowedHosts::new(
        [api.host(), &advertise].into_iter().chain(cfg.http_allow_hosts.iter().map(String::as_str)),
    );
    let http_task = match (http_listener, http_addr) {
        (Some(l), Some(local)) => {
            let rx = transport::accept(l, transport::Listener::Http, serving_tls_rx, shutdown.subscribe());
            let incoming = transport::HttpIncoming { rx, local };
            Some(tokio::spawn(http::serve(incoming, api.clone(), hosts, shutdown.subscribe())))
        }
        _ => None,
    };
    if let (Some(files), Some(serving)) = (cfg.tls.clone(), serving_tls) {
        // SIGHUP is taken over here, before the node says it listens.
        let hangup = transport::hangup();
        tokio::spawn(transport::reload(
            files,
            serving,
            node.peer_tls().clone(),
            hangup,
            shutdown.subscribe(),
        ));
    }

    let mut bootstrapped = cfg.bootstrap && cfg.join.is_none();
    let mut join_at = cfg.join.clone();
    if !initialized && !bootstrapped && join_at.is_none() && !cfg.seeds.is_empty() {
        match seeds::decide(&node, &cfg.seeds, &advertise, cfg.seed_timeout).await? {
            seeds::Start::Bootstrap => {
                node.bootstrap().await?;
                bootstrapped = true;
            }
            seeds::Start::Join(seed) => join_at = Some(seed),
        }
    }
    match (&join_at, initialized) {
        (Some(cluster), false) => {
            membership::join(cluster, &node, &advertise, cfg.join_token.as_deref(), cfg.leader_timeout)
                .await?
        }
        (Some(cluster), true) => membership::same_cluster(cluster, &node).await?,
        _ => {}
    }
    // This start made the node a member, or writes follow, or it is its own quorum: a leader must
    // be known before the node says it listens.
    let made_member = !initialized && (join_at.is_some() || bootstrapped);
    let sets_up_auth = cfg.auth && bootstrapped && !api.node().state().read().state.auth_on();
    if made_member || initialized && (sets_up_auth || node.alone().await) {
        node.raft
            .wait(Some(cfg.leader_timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .map_err(|_| NodeError::NoLeader(cfg.leader_timeout))?;
    } else if initialized {
        // A member of a cluster coming back: the others may be restarting one at a time, each
        // waiting for this one to be up, so it listens now (not ready) and awaits a leader aside.
        tokio::spawn(await_leader(node.clone(), cfg.leader_timeout, shutdown.subscribe()));
    }
    if cfg.auth && bootstrapped {
        // The join token first: once the admin token is in, the cluster is set up and a join
        // token an admin revoked later must stay revoked across restarts.
        if let Some(t) = &cfg.join_token
            && !api.node().state().read().state.auth_on()
        {
            auth::standing_join_token(&api, t, cfg.leader_timeout).await?;
        }
        auth::first_admin_token(&api, &cfg.data_dir, cfg.admin_token.as_deref(), cfg.leader_timeout).await?;
    }
    tracing::info!(
        node_id = node.id,
        grpc = %grpc_addr,
        http = ?http_addr,
        advertise = %advertise,
        data_dir = %cfg.data_dir.display(),
        "portmesh node listening"
    );
    if advertise != grpc_addr.to_string() {
        tracing::info!(bound = %grpc_addr, advertised = %advertise,
            "members and clients are told the advertised address, not the bound one");
    }
    if let Some(home) = &cfg.home {
        let info =
            NodeInfo::of_this_process(grpc_addr.to_string(), http_addr.map(|a| a.to_string()), node.id);
        write_info(home, &info).map_err(|source| NodeError::Home { dir: home.clone(), source })?;
    }
    Ok(RunningNode {
        grpc_addr,
        http_addr,
        api,
        shutdown,
        grpc_task,
        http_task,
        health_task,
        failure,
        checks_task,
        home: cfg.home,
        leave_on_stop: !cfg.seeds.is_empty() && !cfg.seeds.contains(&advertise),
        data_dir: cfg.data_dir,
    })
}

/// Logs when a restarted member first knows a leader, and once, if none is known within
/// `patience`, what it waits for. Ends at shutdown.
async fn await_leader(node: RaftNode, patience: Duration, mut stop: watch::Receiver<bool>) {
    let known = |patience| {
        let wait = node.raft.wait(patience);
        async move { wait.metrics(|m| m.current_leader.is_some(), "a leader is known").await }
    };
    tokio::select! {
        _ = stop.wait_for(|s| *s) => return,
        found = known(Some(patience)) => if found.is_err() {
            tracing::warn!(node_id = node.id, waited = ?patience,
                "no leader known yet: this member is not ready until a majority of the members run and reach each other");
        },
    }
    tokio::select! {
        _ = stop.wait_for(|s| *s) => {}
        found = known(None) => if let Ok(m) = found {
            tracing::info!(node_id = node.id, leader = ?m.current_leader, term = m.current_term, "a leader is known");
        },
    }
}

impl RunningNode {
    /// A handle that shuts the node down when set to `true`.
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }

    /// Runs until shutdown is requested (SIGTERM, SIGINT, the `Cluster.Shutdown` RPC or the
    /// handle) or Raft stops on its own, then shuts down gracefully: stop serving, stop Raft,
    /// flush storage, remove the address file. `Err` when Raft stopped on its own.
    pub async fn wait(self) -> Result<(), NodeError> {
        let mut stop = self.shutdown.subscribe();
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {}
            _ = termination() => tracing::info!("termination signal received"),
        }
        self.shutdown.send_replace(true);
        if let Ok(Err(e)) = self.grpc_task.await {
            tracing::warn!(error = %e, "gRPC server ended with an error");
        }
        if let Some(t) = self.http_task {
            let _ = t.await;
        }
        self.health_task.abort();
        self.checks_task.abort();
        let node = self.api.node().clone();
        let id = node.id;
        let left = self.leave_on_stop && seeds::leave(&node).await;
        node.shutdown().await;
        if let Err(e) = node.store.flush() {
            tracing::error!(error = %e, "flushing storage at shutdown failed");
        }
        // The data directory is closed once the tasks that still hold the store (aborted or told
        // to stop above) have ended: a caller may open it again as soon as this returns.
        let closed = node.store.closed();
        drop((node, self.api));
        if tokio::time::timeout(CLOSE_PATIENCE, closed).await.is_err() {
            tracing::warn!(dir = %self.data_dir.display(), waited = ?CLOSE_PATIENCE,
                "the data directory is still open after shutdown: a task still holds it");
        }
        if left {
            seeds::empty_dir(&self.data_dir);
        }
        if let Some(home) = &self.home {
            home::remove_info_if_ours(home);
        }
        tracing::info!(node_id = id, "portmesh node stopped");
        match self.failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(why) => Err(NodeError::RaftStopped(why)),
            None => Ok(()),
        }
    }
}

/// How long [`RunningNode::wait`] waits for the last tasks of a stopped node to let go of its
/// data directory.
const CLOSE_PATIENCE: Duration = Duration::from_secs(10);

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
