//! The leader's lease countdown.
//!
//! Policy (see `docs/architecture.md`, "Leases"):
//! - Only the leader counts down. Renewals (`KeepAlive`) touch its in-memory deadlines only; they
//!   are not Raft writes.
//! - Every `lease_checkpoint` the leader writes into the log (`CheckpointLeases`) the lease clock
//!   as it reads it (the clock it found at takeover plus the time it has led) and the remaining
//!   TTL of each lease renewed since the last checkpoint. A lease's deadline is a reading of that
//!   clock, so a lease nobody renews counts down with the clock and is not rewritten: the entry
//!   and the records rewritten grow with the renewals, not with the leases.
//! - A new leader starts every countdown from the last checkpoint (deadline less clock),
//!   measured from the moment it took over, so it neither expires a lease that was being kept
//!   alive nor extends a dead one by more than one checkpoint interval plus an election timeout.
//! - Expiry re-checks leadership with a quorum first, then proposes `ExpireLeases` in batches of at
//!   most `expiry_batch`; the state machine ignores ids already gone, so each lease ends once.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use portmesh_core::Command;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{RaftNode, RaftOptions};

/// Deadlines of live leases, held by the leader.
#[derive(Debug)]
pub struct LeaseKeeper {
    opts: RaftOptions,
    inner: Mutex<KeeperState>,
}

#[derive(Debug, Default)]
struct KeeperState {
    /// The term in which these deadlines were set; cleared on any change of leadership.
    term: Option<u64>,
    deadlines: HashMap<u64, Instant>,
    /// The lease clock at takeover and the instant it was read: the clock now reads
    /// `clock + (now - at)`.
    clock: Option<(u64, Instant)>,
    /// Leases renewed since the last checkpoint.
    moved: HashSet<u64>,
}

impl KeeperState {
    fn clear(&mut self) {
        self.term = None;
        self.deadlines.clear();
        self.clock = None;
        self.moved.clear();
    }
}

impl LeaseKeeper {
    pub fn new(opts: RaftOptions) -> Self {
        Self { opts, inner: Mutex::new(KeeperState::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeeperState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pushes a lease's deadline to now + ttl. `None` if it already lapsed (expiry is pending).
    pub fn renew(&self, id: u64, ttl_ms: u64) -> Option<u64> {
        let now = Instant::now();
        let mut k = self.lock();
        match k.deadlines.get(&id) {
            Some(d) if *d <= now => None,
            _ => {
                k.deadlines.insert(id, now + std::time::Duration::from_millis(ttl_ms));
                k.moved.insert(id);
                Some(ttl_ms)
            }
        }
    }

    pub fn remaining(&self, id: u64) -> Option<u64> {
        let now = Instant::now();
        self.lock().deadlines.get(&id).map(|d| d.saturating_duration_since(now).as_millis() as u64)
    }

    /// Aligns deadlines with the applied state: new leases start from their checkpointed
    /// remaining TTL, ended leases are forgotten. A new term starts over from the state.
    fn reconcile(&self, node: &RaftNode, term: u64) {
        let now = Instant::now();
        let sm = node.state().read();
        let mut k = self.lock();
        if k.term != Some(term) {
            k.clear();
            k.term = Some(term);
            k.clock = Some((sm.state.meta().lease_clock_ms, now));
        }
        for l in sm.state.leases() {
            k.deadlines
                .entry(l.id)
                .or_insert_with(|| now + std::time::Duration::from_millis(sm.state.lease_remaining_ms(l)));
        }
        if k.deadlines.len() != sm.state.leases().count() {
            k.deadlines.retain(|id, _| sm.state.lease(*id).is_some());
        }
    }

    fn expired(&self) -> Vec<u64> {
        let now = Instant::now();
        let mut ids: Vec<u64> =
            self.lock().deadlines.iter().filter(|(_, d)| **d <= now).map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.truncate(self.opts.expiry_batch);
        ids
    }

    /// What a checkpoint writes now: the lease clock and the remaining TTL of the leases renewed
    /// since the last one (taken out of `moved`; [`LeaseKeeper::moved_again`] puts them back if
    /// the write fails). `None` before the first reconcile of a term.
    fn take_checkpoint(&self) -> Option<(u64, Vec<(u64, u64)>)> {
        let now = Instant::now();
        let mut k = self.lock();
        let (clock, at) = k.clock?;
        let clock_ms = clock + now.saturating_duration_since(at).as_millis() as u64;
        let moved = std::mem::take(&mut k.moved);
        let mut v: Vec<(u64, u64)> = moved
            .into_iter()
            .filter_map(|id| {
                k.deadlines.get(&id).map(|d| (id, d.saturating_duration_since(now).as_millis() as u64))
            })
            .collect();
        v.sort_unstable();
        Some((clock_ms, v))
    }

    /// A checkpoint of these leases was not written: the next one writes them.
    fn moved_again(&self, ids: impl IntoIterator<Item = u64>) {
        self.lock().moved.extend(ids);
    }

    fn forget_term(&self) {
        self.lock().clear();
    }
}

/// Writes the lease clock and the remaining TTL of every lease renewed since the last checkpoint
/// into the log (as the leader counts them now). Every entry carries the clock, and applying
/// one twice changes nothing, so a write whose outcome is unknown is simply written again.
async fn checkpoint(node: &RaftNode) {
    let keeper = &node.keeper;
    let Some((clock_ms, remaining)) = keeper.take_checkpoint() else { return };
    if remaining.is_empty() && node.state().read().state.leases().next().is_none() {
        return; // nothing counts down
    }
    let batch = keeper.opts.expiry_batch.max(1);
    let mut chunks: Vec<Vec<(u64, u64)>> = remaining.chunks(batch).map(<[_]>::to_vec).collect();
    if chunks.is_empty() {
        chunks.push(Vec::new()); // the clock alone
    }
    let mut chunks = chunks.into_iter();
    while let Some(chunk) = chunks.next() {
        let ids: Vec<u64> = chunk.iter().map(|(id, _)| *id).collect();
        if let Err(e) = node.propose(Command::CheckpointLeases { clock_ms, remaining: chunk }).await {
            tracing::warn!(error = %e, "lease checkpoint failed; the next one writes these leases");
            keeper.moved_again(ids.into_iter().chain(chunks.flatten().map(|(id, _)| id)));
            break;
        }
    }
}

/// A leader that stops on purpose checkpoints first (within `limit`), so the next leader's
/// countdowns start from now rather than from up to a checkpoint interval ago.
pub(crate) async fn last_checkpoint(node: &RaftNode, limit: std::time::Duration) {
    if node.is_leader() && node.keeper.lock().term.is_some() {
        let _ = tokio::time::timeout(limit, checkpoint(node)).await;
    }
}

/// The leader-duty loop: reconcile, expire, checkpoint. Runs until `stop` turns true.
pub(crate) async fn run(node: RaftNode, mut stop: watch::Receiver<bool>) {
    let keeper = node.keeper.clone();
    let mut tick = tokio::time::interval(keeper.opts.lease_tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_checkpoint = Instant::now();
    let checkpoint_every = keeper.opts.checkpoint_every();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        if !node.is_leader() {
            keeper.forget_term();
            continue;
        }
        let term = node.metrics().current_term;
        keeper.reconcile(&node, term);

        let expired = keeper.expired();
        if !expired.is_empty() {
            // Only a confirmed leader may expire: a deposed one must not end leases.
            if node.read_barrier(false).await.is_err() {
                keeper.forget_term();
                continue;
            }
            let n = expired.len();
            match node.propose(Command::ExpireLeases { ids: expired }).await {
                Ok(_) => tracing::info!(leases = n, "expired leases"),
                Err(e) => tracing::warn!(error = %e, "expiring leases failed; will retry"),
            }
        }

        if last_checkpoint.elapsed() >= checkpoint_every {
            last_checkpoint = Instant::now();
            checkpoint(&node).await;
        }
    }
}
