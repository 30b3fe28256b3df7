//! Early replication: the leader sends each batch of entries to its followers as soon as it has
//! written the batch to its own log, while its own flush of it runs.
//!
//! openraft 0.9 awaits the leader's flush of an entry before its replication streams send it, so
//! a write on three nodes waits for two flushes one after the other: the leader's, then a
//! follower's. Here the store tells this module of every batch it appends
//! ([`Store::on_append`]); on the leader a task sends the batch at once to every voter as an
//! ordinary AppendEntries request (the leader's vote, the entry before the batch as
//! `prev_log_id`, no commit index) and drops the answer. A follower writes and flushes the
//! entries while the leader flushes its own copy; openraft's stream sends the same entries once
//! the leader's flush ends, and the follower, holding them already, answers at once. What counts
//! toward the commit is unchanged: the leader once its own flush ended, a follower once it
//! answered openraft's own request.
//!
//! Why it is safe: an early request is one the leader could have sent itself (its log, its vote,
//! a commit index lower than any it sends), so a follower handles it as it would a delayed or a
//! repeated one. What is new is only that a follower may hold an entry which the leader, crashing
//! before its flush ended, lost. Were the leader to come back as leader of the same term, it
//! would write other entries under the same log ids and the logs would diverge; the log store
//! therefore keeps the node's own vote uncommitted on disk (`save_vote` in `portmesh_store`), so
//! a restarted leader leads again only after an election, in a higher term.
//!
//! docs/architecture.md §2 ("early replication") has the decision and its measurements.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use openraft::network::RPCOption;
use openraft::raft::AppendEntriesRequest;
use openraft::{BasicNode, Entry, LogId, Raft, RaftNetwork, RaftNetworkFactory, ServerState, Vote};
use portmesh_store::{Store, TypeConfig};
use tokio::sync::{mpsc, watch};

use crate::network::GrpcNetwork;

/// Batches queued for one follower while its previous early request is out; past that, batches
/// are left to openraft's own stream (a slow or unreachable follower must not pile them up).
const QUEUE: usize = 8;
/// A follower whose last acknowledged entry is further behind than this gets nothing early: it
/// would refuse a batch whose previous entry it lacks.
const MAX_LAG: u64 = 64;
/// How long an early request may take before it is given up.
const TTL: Duration = Duration::from_secs(1);

/// A batch this node appended as leader, and the id of the entry before it.
struct Batch {
    prev: LogId<u64>,
    entries: Vec<Entry<TypeConfig>>,
}

/// Starts early replication for node `id`: hooks `store`'s appends and sends them over
/// `network` while `raft` leads, until `stop` says so.
pub(crate) fn start(
    id: u64,
    store: &Store,
    raft: Raft<TypeConfig>,
    network: GrpcNetwork,
    stop: watch::Receiver<bool>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let last = Mutex::new(None::<LogId<u64>>);
    let metrics = raft.metrics();
    store.on_append(Box::new(move |entries: &[Entry<TypeConfig>]| {
        let (Some(first), Some(end)) = (entries.first(), entries.last()) else { return };
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        // The entry before the batch is the last one appended before it, unless the log was
        // truncated or this is the first append seen: then nothing is sent early.
        let prev = last.filter(|l| l.index + 1 == first.log_id.index);
        *last = Some(end.log_id);
        // Only entries this node wrote as leader (a follower's appends are someone else's), and
        // only when there is someone to send them to (a single node copies nothing).
        let has_followers = || {
            let m = metrics.borrow();
            m.state == ServerState::Leader && m.membership_config.membership().voter_ids().any(|v| v != id)
        };
        if let Some(prev) = prev
            && end.log_id.leader_id.node_id == id
            && has_followers()
        {
            let _ = tx.send(Batch { prev, entries: entries.to_vec() });
        }
    }));
    tokio::spawn(run(id, raft, network, rx, stop));
}

async fn run(
    id: u64,
    raft: Raft<TypeConfig>,
    network: GrpcNetwork,
    mut rx: mpsc::UnboundedReceiver<Batch>,
    mut stop: watch::Receiver<bool>,
) {
    let mut followers: HashMap<u64, mpsc::Sender<Early>> = HashMap::new();
    loop {
        let batch = tokio::select! {
            b = rx.recv() => match b {
                Some(b) => b,
                None => return,
            },
            _ = stop.changed() => return,
        };
        let Some(last) = batch.entries.last().map(|e| e.log_id) else { continue };
        let (vote, targets) = {
            let m = raft.metrics();
            let m = m.borrow();
            // Only while this node leads in the term it wrote the batch in.
            if m.state != ServerState::Leader || !m.vote.committed || m.vote.leader_id != last.leader_id {
                continue;
            }
            let membership = m.membership_config.membership();
            let matched = |t: u64| m.replication.as_ref().and_then(|r| r.get(&t).copied().flatten());
            let targets: Vec<(u64, BasicNode)> = membership
                .voter_ids()
                .filter(|t| *t != id)
                .filter(|t| matched(*t).is_some_and(|l| l.index + MAX_LAG >= batch.prev.index))
                .filter_map(|t| membership.get_node(&t).map(|n| (t, n.clone())))
                .collect();
            (m.vote, targets)
        };
        for (target, node) in targets {
            let tx = followers.entry(target).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(send_to(target, network.clone(), rx));
                tx
            });
            let early = Early { vote, node, prev: batch.prev, entries: batch.entries.clone() };
            // A full queue: the follower is slow; openraft's own stream brings it these entries.
            let _ = tx.try_send(early);
        }
    }
}

/// One batch for one follower.
struct Early {
    vote: Vote<u64>,
    node: BasicNode,
    prev: LogId<u64>,
    entries: Vec<Entry<TypeConfig>>,
}

/// Sends follower `target` its batches one request at a time, in order (a batch that arrived
/// before the one it follows would be refused), merging those queued meanwhile that follow on.
/// Ends when the queue's sender is dropped (early replication stopped).
async fn send_to(target: u64, mut network: GrpcNetwork, mut rx: mpsc::Receiver<Early>) {
    while let Some(mut early) = rx.recv().await {
        while let Ok(next) = rx.try_recv() {
            let follows =
                next.vote == early.vote && early.entries.last().map(|e| e.log_id) == Some(next.prev);
            if follows {
                early.entries.extend(next.entries);
                early.node = next.node;
            } else {
                early = next;
            }
        }
        let req = AppendEntriesRequest {
            vote: early.vote,
            prev_log_id: Some(early.prev),
            entries: early.entries,
            leader_commit: None,
        };
        let mut peer = network.new_client(target, &early.node).await;
        if let Err(e) = peer.append_entries(req, RPCOption::new(TTL)).await {
            tracing::trace!(member = target, error = %e, "early append not delivered");
        }
    }
}
