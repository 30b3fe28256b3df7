//! Raft wiring: one [`RaftNode`] per process, its leader duties and its lease keeper.
//!
//! Owns: the openraft configuration, node identity, bootstrap, the one way to propose a command
//! ([`RaftNode::propose`], which stamps the leader's wall-clock time into the entry), the one way to
//! make a read linearizable ([`RaftNode::read_barrier`]), and the leader-only lease countdown
//! ([`keeper`]). Does not own: storage (`portmesh-store`), gRPC services (`portmesh-api`).
//!
//! Peers talk over the internal gRPC service `portmesh.raft.v1.Raft` ([`network`] is the client
//! side, [`RaftService`] the server side), kept apart from the public API.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

mod batcher;
mod compaction;
mod early;
pub mod faults;
pub mod keeper;
pub mod network;
mod service;

pub use service::RaftService;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, Config, Raft, RaftMetrics, ServerState, SnapshotPolicy};
use portmesh_core::{Command, Response};
use portmesh_proto::channel::PeerTls;
use portmesh_store::{StateReader, Store, StoreError, TypeConfig};
use tokio::sync::watch;

pub use keeper::LeaseKeeper;

/// The ticks of a node's periodic task (the lease keeper, compaction): one every `period`, a late
/// one delaying the next rather than bursting, until the node stops.
pub(crate) struct Ticks {
    tick: tokio::time::Interval,
    stop: watch::Receiver<bool>,
}

impl Ticks {
    pub(crate) fn new(period: Duration, stop: watch::Receiver<bool>) -> Self {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { tick, stop }
    }

    /// Waits for the next tick; false once the node stops.
    pub(crate) async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.tick.tick() => {}
            _ = self.stop.changed() => return false,
        }
        !*self.stop.borrow()
    }
}

/// Timing and sizing of the Raft node. Defaults suit a LAN or one machine under load.
#[derive(Debug, Clone)]
pub struct RaftOptions {
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    /// Build a snapshot (and purge the log behind it) after this many entries.
    pub snapshot_every: u64,
    /// Build a snapshot also once the log appended since the last one passes this many bytes
    /// (0: by entries only; see `compaction`).
    pub snapshot_log_bytes: u64,
    /// Log entries kept behind a snapshot, so a follower that lags by fewer catches up from the
    /// log rather than by snapshot.
    pub keep_after_snapshot: u64,
    /// How often the leader writes the remaining TTL of every lease into the log.
    pub lease_checkpoint: Duration,
    /// How often the leader looks for expired leases.
    pub lease_tick: Duration,
    /// Most leases expired by one log entry (a storm is spread over several entries).
    pub expiry_batch: usize,
    /// Joining nodes become voters while the cluster has fewer voters than this (3 or 5);
    /// the others stay learners.
    pub voters: usize,
    /// How long a write or a linearizable read may wait for a quorum before the caller gets a
    /// timeout (a leader cut off from the others cannot commit; its callers must not hang).
    pub write_timeout: Duration,
    /// How long a joining node may take to catch up as a learner before `Cluster.Join` answers
    /// that the change's outcome is unknown (it is in the membership; it may still catch up).
    pub catch_up_timeout: Duration,
    /// Test clusters only: the faults of the network between their nodes.
    pub faults: Option<Arc<faults::LinkFaults>>,
    /// How this node reaches other members: TLS with its node certificate, or plaintext.
    pub peer_tls: PeerTls,
}

impl RaftOptions {
    /// How often the leader actually checkpoints leases. The documented bound on an abandoned
    /// lease's life across a failover is TTL + `lease_checkpoint` + `election_max`. A failover
    /// costs more than one election timeout: openraft's followers refuse votes while their lease
    /// of the old leader runs (up to another election timeout), and the new leader's keeper takes
    /// a tick to notice it leads, a tick to notice the lapse, and a write to expire. So the
    /// leader checkpoints that much more often (every 3.7 s with the defaults), which keeps the
    /// whole within the bound.
    pub fn checkpoint_every(&self) -> Duration {
        self.lease_checkpoint.saturating_sub(self.election_max + self.lease_tick * 3).max(self.lease_tick)
    }
}

impl Default for RaftOptions {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(500),
            election_max: Duration::from_millis(1000),
            snapshot_every: 10_000,
            snapshot_log_bytes: 4 << 20,
            keep_after_snapshot: 200,
            lease_checkpoint: Duration::from_secs(5),
            lease_tick: Duration::from_millis(100),
            expiry_batch: 1_000,
            voters: 3,
            write_timeout: Duration::from_secs(5),
            catch_up_timeout: Duration::from_secs(60),
            faults: None,
            peer_tls: PeerTls::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid Raft configuration: {0}")]
    Config(String),
    #[error("Raft failed to start: {0}")]
    Raft(String),
}

/// Why a proposal or read did not go through.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    #[error("this node is not the leader{}", leader_hint(.leader_id, .leader_addr))]
    NotLeader { leader_id: Option<u64>, leader_addr: Option<String> },
    #[error("the Raft node is unavailable: {0}")]
    Unavailable(String),
    /// No quorum confirmed the write or read in time. A write may still be applied later.
    #[error(
        "no quorum confirmed this within {0:?} (this node may be cut off from the rest of the cluster); \
         a write's outcome is unknown: check with `portmesh ls` before retrying it"
    )]
    Timeout(Duration),
    /// A membership change was not confirmed in time. It may still complete.
    #[error(
        "the membership change was not confirmed within {0:?}: its outcome is unknown (it may still complete); \
         check with `portmesh status` before retrying, and remove a member that never caught up with \
         `portmesh leave --id N`"
    )]
    MembershipTimeout(Duration),
}

/// Why a membership change was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MemberError {
    #[error("node {id} is not a member of this cluster (members: {members})")]
    NotMember { id: u64, members: String },
    #[error(
        "node {id} is the last voter of this cluster: removing it would leave nobody to decide; \
         add another node first, or stop this one instead"
    )]
    LastVoter { id: u64 },
    #[error(
        "node {id} at {addr} holds data of cluster {theirs}, but this is cluster {ours}: \
         move that node's data directory aside to join this cluster with it"
    )]
    ForeignCluster { id: u64, addr: String, theirs: String, ours: String },
    #[error(
        "removing node {id} would leave the voters {after}, and a majority of them (and of today's \
         voters) must answer for the change and every write after it, but {unreachable} did not answer \
         within {timeout:?}: start them again, or remove them first (`portmesh leave --id N`)"
    )]
    NoLiveQuorum { id: u64, after: String, unreachable: String, timeout: Duration },
    #[error(transparent)]
    Raft(#[from] ProposeError),
}

/// How long a voter has to answer before a membership change counts it as unreachable.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(1);

fn leader_hint(id: &Option<u64>, addr: &Option<String>) -> String {
    match (id, addr) {
        (Some(id), Some(addr)) => format!("; the leader is node {id} at {addr}"),
        (Some(id), None) => format!("; the leader is node {id}"),
        _ => "; no leader is known yet (an election may be under way): retry shortly".into(),
    }
}

/// Maps a failed Raft write (client write or membership change) to a [`ProposeError`].
pub(crate) fn write_error(e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> ProposeError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            ProposeError::NotLeader { leader_id: f.leader_id, leader_addr: f.leader_node.map(|n| n.addr) }
        }
        other => ProposeError::Unavailable(other.to_string()),
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    portmesh_core::unix_ms(SystemTime::now())
}

/// A running Raft node with its state machine.
#[derive(Clone)]
pub struct RaftNode {
    pub id: u64,
    pub addr: String,
    pub raft: Raft<TypeConfig>,
    pub store: Store,
    state: StateReader,
    keeper: Arc<LeaseKeeper>,
    batcher: batcher::Batcher,
    max_voters: usize,
    write_timeout: Duration,
    catch_up_timeout: Duration,
    peer_tls: PeerTls,
    stop: watch::Sender<bool>,
    /// Held while a membership change is decided and made ([`RaftNode::add_member`],
    /// [`RaftNode::remove_member`]): each reads the membership, then changes it, so two at once
    /// would each change the membership the other is replacing.
    membership: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode").field("id", &self.id).field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// 64 bits mixed from the clock and the pid: unique enough for ids made once.
fn fresh_bits() -> u64 {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    portmesh_core::SplitMix64::new(t ^ (u64::from(std::process::id()) << 32)).next_u64()
}

/// A fresh node id, never 0. Persisted in the data directory on first start.
fn fresh_node_id() -> u64 {
    // Keep ids readable (and JSON-safe): 1..2^53.
    (fresh_bits() & ((1 << 53) - 1)).max(1)
}

/// A fresh cluster id (16 hex digits), made once when a cluster is bootstrapped.
fn fresh_cluster_id() -> String {
    format!("{:016x}", fresh_bits().rotate_left(17) ^ fresh_node_id())
}

impl RaftNode {
    /// Starts Raft over `store`. `addr` is this node's advertised gRPC address.
    pub async fn start(store: Store, addr: String, opts: RaftOptions) -> Result<RaftNode, StartError> {
        let id = match store.node_id()? {
            Some(id) => id,
            None => {
                let id = fresh_node_id();
                store.set_node_id(id)?;
                id
            }
        };
        let config = Config {
            cluster_name: "portmesh".into(),
            heartbeat_interval: opts.heartbeat.as_millis() as u64,
            election_timeout_min: opts.election_min.as_millis() as u64,
            election_timeout_max: opts.election_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(opts.snapshot_every),
            max_in_snapshot_log_to_keep: opts.keep_after_snapshot,
            // Purge in batches, not entry by entry, but after every snapshot: snapshots come every
            // `snapshot_every` entries or `snapshot_log_bytes`, so a batch of a quarter of
            // `snapshot_every` (as before) kept a lease-checkpoint log unpurged for minutes after
            // the snapshots that covered it (docs/benchmarks.md, eleventh slice).
            purge_batch_size: (opts.snapshot_every / 4).clamp(1, 256),
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Config(e.to_string()))?;
        let sm = store.state_machine()?;
        let state = sm.reader();
        let network = network::GrpcNetwork::new(id, opts.faults.clone(), opts.peer_tls.clone());
        let raft = Raft::new(id, Arc::new(config), network.clone(), store.log_store(), sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let keeper = Arc::new(LeaseKeeper::new(opts.clone()));
        let (stop, _) = watch::channel(false);
        let batcher = batcher::Batcher::start(raft.clone());
        let max_voters = opts.voters;
        let write_timeout = opts.write_timeout;
        let catch_up_timeout = opts.catch_up_timeout;
        let peer_tls = opts.peer_tls.clone();
        let node = RaftNode {
            id,
            addr,
            raft,
            store,
            state,
            keeper,
            batcher,
            max_voters,
            write_timeout,
            catch_up_timeout,
            peer_tls,
            stop,
            membership: Arc::default(),
        };
        early::start(id, &node.store, node.raft.clone(), network, node.stop.subscribe());
        // The node's own vote is kept uncommitted on disk (early replication), so a restarted
        // single voter would wait for a tick (up to 150 ms) to elect itself: it elects at once.
        if node.alone().await {
            let _ = node.raft.trigger().elect().await;
        }
        tokio::spawn(keeper::run(node.clone(), node.stop.subscribe()));
        tokio::spawn(compaction::run(node.clone(), opts.snapshot_log_bytes, node.stop.subscribe()));
        Ok(node)
    }

    /// How this node reaches other members (TLS or plaintext), for every channel it opens to one.
    pub fn peer_tls(&self) -> &PeerTls {
        &self.peer_tls
    }

    /// Makes this node the single voter of a new cluster. Harmless on a node that is already
    /// initialised (a restart, or a second `--bootstrap`).
    ///
    /// A new cluster gets a fresh cluster id, recorded in the data directory; so does a cluster
    /// bootstrapped by a release that had none.
    pub async fn bootstrap(&self) -> Result<(), StartError> {
        let members = BTreeMap::from([(self.id, BasicNode { addr: self.addr.clone() })]);
        match self.raft.initialize(members).await {
            Ok(()) => {}
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
            Err(e) => return Err(StartError::Raft(e.to_string())),
        }
        if self.store.cluster_id()?.is_none() {
            self.store.set_cluster_id(&fresh_cluster_id())?;
        }
        Ok(())
    }

    /// The id of the cluster this node's data belongs to (empty before it joined one).
    pub fn cluster_id(&self) -> String {
        self.store.cluster_id().ok().flatten().unwrap_or_default()
    }

    /// Whether this node is the cluster's only voter (its own quorum), as Raft's own state says
    /// (metrics may lag just after start).
    pub async fn alone(&self) -> bool {
        let id = self.id;
        let alone = self.raft.with_raft_state(move |st| st.membership_state.effective().voter_ids().eq([id]));
        alone.await.unwrap_or(false)
    }

    /// Whether this node's log or state holds anything (i.e. it belongs to a cluster).
    pub async fn is_initialized(&self) -> bool {
        self.raft.is_initialized().await.unwrap_or(false)
    }

    /// Proposes a command through Raft and returns the applied response. Concurrent proposals
    /// share a log entry (see [`batcher`]); the leader's wall clock is stamped into each entry
    /// there, the only place time enters the state machine.
    ///
    /// Gives up after [`RaftOptions::write_timeout`] with [`ProposeError::Timeout`]: the command
    /// may still be applied later, so its outcome is unknown to the caller.
    pub async fn propose(&self, command: Command) -> Result<Response, ProposeError> {
        tokio::time::timeout(self.write_timeout, self.batcher.propose(command))
            .await
            .map_err(|_| ProposeError::Timeout(self.write_timeout))?
    }

    /// Waits until this node's state reflects every write acknowledged before the call: the
    /// leader confirms its leadership with a quorum and waits for its state machine to catch up.
    /// With `stale`, returns at once and the caller reads whatever this node has applied.
    pub async fn read_barrier(&self, stale: bool) -> Result<(), ProposeError> {
        if stale {
            return Ok(());
        }
        let confirmed = tokio::time::timeout(self.write_timeout, self.raft.ensure_linearizable())
            .await
            .map_err(|_| ProposeError::Timeout(self.write_timeout))?;
        match confirmed {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(ProposeError::NotLeader {
                    leader_id: f.leader_id,
                    leader_addr: f.leader_node.map(|n| n.addr),
                })
            }
            Err(e) => Err(ProposeError::Unavailable(e.to_string())),
        }
    }

    /// The applied state (read it, don't hold the guard across `.await`).
    pub fn state(&self) -> &StateReader {
        &self.state
    }

    pub fn metrics(&self) -> RaftMetrics<u64, BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    /// The Raft metrics as they change, to await a condition on them.
    pub fn metrics_changes(&self) -> watch::Receiver<RaftMetrics<u64, BasicNode>> {
        self.raft.metrics()
    }

    /// Whether this node currently believes it is the leader.
    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    /// The leader as this node knows it: id and address.
    pub fn leader(&self) -> Option<(u64, String)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id).map(|n| n.addr.clone()).unwrap_or_default();
        Some((id, addr))
    }

    /// Adds a node: as a learner (blocking until it caught up), then as a voter while the
    /// cluster has fewer voters than [`RaftOptions::voters`]. Leader only. Returns whether the
    /// node is a voter.
    pub async fn add_member(&self, id: u64, addr: String) -> Result<bool, ProposeError> {
        self.ensure_leader()?;
        // One change at a time: nodes joining at once each read the voters below, and a second
        // join proposing its whole set of voters removed the first joiner (the compose test saw a
        // cluster left with two voters, one of them stopped), or was refused while the first
        // change was in flight.
        let _one_at_a_time = self.membership.lock().await;
        self.bounded(
            self.catch_up_timeout,
            self.raft.add_learner(id, BasicNode { addr: addr.clone() }, true),
        )
        .await?;
        let membership = self.metrics().membership_config.membership().clone();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        if voters.contains(&id) {
            return Ok(true);
        }
        // Another member at this very address is gone for good: its address now answers as this
        // node (a StatefulSet pod recreated without its volume). This node takes its place.
        let replaced: BTreeSet<u64> = membership
            .nodes()
            .filter(|(other, n)| **other != id && n.addr == addr)
            .map(|(o, _)| *o)
            .collect();
        if !replaced.is_empty() {
            let was_voter = replaced.iter().any(|r| voters.contains(r));
            tracing::info!(node_id = id, %addr, replaced = ?replaced, "a new node at a member's address takes its place");
            let mut next: BTreeSet<u64> = voters.difference(&replaced).copied().collect();
            if was_voter {
                next.insert(id);
            }
            if next != voters {
                self.bounded(
                    self.write_timeout,
                    self.raft.change_membership(ChangeMembers::ReplaceAllVoters(next), false),
                )
                .await?;
            }
            let learners: BTreeSet<u64> = self
                .metrics()
                .membership_config
                .membership()
                .learner_ids()
                .filter(|l| replaced.contains(l))
                .collect();
            if !learners.is_empty() {
                self.bounded(
                    self.write_timeout,
                    self.raft.change_membership(ChangeMembers::RemoveNodes(learners), false),
                )
                .await?;
            }
            if was_voter {
                return Ok(true);
            }
        }
        let voters: BTreeSet<u64> = self.metrics().membership_config.membership().voter_ids().collect();
        if voters.len() >= self.max_voters {
            return Ok(false);
        }
        // A voter that does not answer would be needed for every commit after the change (in a
        // one-node cluster, at once): it stays a learner until it answers.
        if !self.answering(vec![(id, addr.clone())]).await.contains(&id) {
            return Err(ProposeError::Unavailable(format!(
                "node {id} at {addr} was added as a learner but does not answer, so it was not made a voter \
                 (every write would wait for it): start it, or remove it with `portmesh leave --id {id}`"
            )));
        }
        let add = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
        self.bounded(self.write_timeout, self.raft.change_membership(add, false)).await?;
        Ok(true)
    }

    /// Removes a member. Leader only. A voter's place goes to a learner when there is one (the
    /// most caught-up), so the voter count holds; the last voter cannot be removed. The removed
    /// node is dropped from the membership entirely (it is not kept as a learner).
    pub async fn remove_member(&self, id: u64) -> Result<(), MemberError> {
        self.ensure_leader()?;
        let _one_at_a_time = self.membership.lock().await;
        let m = self.metrics();
        let membership = m.membership_config.membership().clone();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let learners: BTreeSet<u64> = membership.learner_ids().collect();
        if learners.contains(&id) {
            let change = ChangeMembers::RemoveNodes(BTreeSet::from([id]));
            self.bounded(self.write_timeout, self.raft.change_membership(change, false)).await?;
            return Ok(());
        }
        if !voters.contains(&id) {
            let members = membership.nodes().map(|(id, _)| id.to_string()).collect::<Vec<_>>().join(", ");
            return Err(MemberError::NotMember { id, members });
        }
        if voters.len() == 1 {
            return Err(MemberError::LastVoter { id });
        }
        let matched = |l: &u64| {
            m.replication.as_ref().and_then(|r| r.get(l).copied().flatten()).map_or(0, |log| log.index)
        };
        let mut next: BTreeSet<u64> = voters.iter().copied().filter(|v| *v != id).collect();
        if let Some(successor) = learners.iter().max_by_key(|l| matched(l)) {
            next.insert(*successor);
        }
        // The change commits under both configurations (joint consensus), and the cluster lives
        // on under the new one: each needs a majority that answers now. A change without one
        // would wait for its quorum and leave every later write waiting too.
        let addr_of = |v: &u64| membership.get_node(v).map(|n| n.addr.clone()).unwrap_or_default();
        let live = self.answering(voters.union(&next).copied().map(|v| (v, addr_of(&v))).collect()).await;
        let majority = |set: &BTreeSet<u64>| set.iter().filter(|v| live.contains(v)).count() * 2 > set.len();
        if !majority(&voters) || !majority(&next) {
            let unreachable: Vec<String> = voters
                .union(&next)
                .filter(|v| !live.contains(v))
                .map(|v| format!("node {v} at {}", addr_of(v)))
                .collect();
            return Err(MemberError::NoLiveQuorum {
                id,
                after: next.iter().map(u64::to_string).collect::<Vec<_>>().join(", "),
                unreachable: unreachable.join(", "),
                timeout: LIVENESS_TIMEOUT,
            });
        }
        self.bounded(
            self.write_timeout,
            self.raft.change_membership(ChangeMembers::ReplaceAllVoters(next), false),
        )
        .await?;
        Ok(())
    }

    /// A membership change given at most `limit`: a change whose quorum went away (or whose
    /// learner never answers) would otherwise hold its caller forever.
    async fn bounded<T>(
        &self,
        limit: Duration,
        change: impl std::future::Future<Output = Result<T, RaftError<u64, ClientWriteError<u64, BasicNode>>>>,
    ) -> Result<T, ProposeError> {
        tokio::time::timeout(limit, change)
            .await
            .map_err(|_| ProposeError::MembershipTimeout(limit))?
            .map_err(write_error)
    }

    /// Which of `members` (id, address) answer a status request within [`LIVENESS_TIMEOUT`]; this
    /// node always counts.
    async fn answering(&self, members: Vec<(u64, String)>) -> BTreeSet<u64> {
        use portmesh_proto::v1::{StatusRequest, cluster_client::ClusterClient};
        let asks = members.into_iter().map(|(id, addr)| async move {
            if id == self.id {
                return Some(id);
            }
            let ask = async {
                let channel = self
                    .peer_tls
                    .endpoint(&addr, portmesh_proto::channel::Purpose::Ask)
                    .ok()?
                    .connect()
                    .await
                    .ok()?;
                ClusterClient::new(channel).status(StatusRequest {}).await.ok()
            };
            tokio::time::timeout(LIVENESS_TIMEOUT, ask).await.ok().flatten().map(|_| id)
        });
        futures::future::join_all(asks).await.into_iter().flatten().collect()
    }

    /// Checks that a node holding data of cluster `theirs` (empty: none) may join this one.
    pub fn admit(&self, id: u64, addr: &str, theirs: &str) -> Result<(), MemberError> {
        let ours = self.cluster_id();
        if theirs.is_empty() || theirs == ours {
            return Ok(());
        }
        Err(MemberError::ForeignCluster { id, addr: addr.into(), theirs: theirs.into(), ours })
    }

    /// Fails with [`ProposeError::NotLeader`] (naming the leader, if known) unless this node
    /// believes it leads: for work that only the leader may do, refused before it starts.
    pub fn ensure_leader(&self) -> Result<(), ProposeError> {
        if self.is_leader() {
            return Ok(());
        }
        let (leader_id, leader_addr) = self.leader().map_or((None, None), |(i, a)| (Some(i), Some(a)));
        Err(ProposeError::NotLeader { leader_id, leader_addr })
    }

    /// Renews a lease on the leader. `Ok(Some(ttl))` when renewed, `Ok(None)` when the lease is
    /// gone (expired, revoked, never existed, or another team's).
    pub fn keep_alive(&self, team: &str, id: u64) -> Result<Option<u64>, ProposeError> {
        self.ensure_leader()?;
        let ttl = {
            let sm = self.state.read();
            match sm.state.lease(id) {
                Some(l) if l.team == team => l.ttl_ms,
                _ => return Ok(None),
            }
        };
        Ok(self.keeper.renew(id, ttl))
    }

    /// Remaining milliseconds of a lease as the leader's countdown sees it.
    pub fn lease_remaining(&self, id: u64) -> Option<u64> {
        self.keeper.remaining(id)
    }

    /// Stops the leader duties (a leader checkpoints its leases first, see
    /// `keeper::last_checkpoint`) and Raft. Storage is flushed by the caller.
    pub async fn shutdown(&self) {
        keeper::last_checkpoint(self, Duration::from_secs(1)).await;
        self.stop.send_replace(true);
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}
