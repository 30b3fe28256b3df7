//! The leader's lease countdown.
//!
//! Policy (see `docs/architecture.md`, "Leases"):
//! - Only the leader counts down. Renewals (`KeepAlive`) touch its in-memory deadlines only; they
//!   are not Raft writes.
//! - Every `lease_checkpoint` the leader writes each lease's remaining TTL into the log
//!   (`CheckpointLeases`). A new leader starts every countdown from the last checkpointed value,
//!   measured from the moment it took over, so it neither expires a lease that was being kept
//!   alive nor extends a dead one by more than one checkpoint interval plus an election timeout.
//! - Expiry re-checks leadership with a quorum first, then proposes `ExpireLeases` in batches of at
//!   most `expiry_batch`; the state machine ignores ids already gone, so each lease ends once.

use std::collections::HashMap;
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
            k.term = Some(term);
            k.deadlines.clear();
        }
        for l in sm.state.leases() {
            k.deadlines.entry(l.id).or_insert_with(|| now + std::time::Duration::from_millis(l.remaining_ms));
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

    fn snapshot_remaining(&self) -> Vec<(u64, u64)> {
        let now = Instant::now();
        let mut v: Vec<(u64, u64)> = self
            .lock()
            .deadlines
            .iter()
            .map(|(id, d)| (*id, d.saturating_duration_since(now).as_millis() as u64))
            .collect();
        v.sort_unstable();
        v
    }

    fn forget_term(&self) {
        let mut k = self.lock();
        k.term = None;
        k.deadlines.clear();
    }
}

/// Writes every lease's remaining TTL into the log (as the leader counts it now).
async fn checkpoint(node: &RaftNode) {
    let keeper = &node.keeper;
    let remaining = keeper.snapshot_remaining();
    for chunk in remaining.chunks(keeper.opts.expiry_batch.max(1)) {
        if let Err(e) = node.propose(Command::CheckpointLeases { remaining: chunk.to_vec() }).await {
            tracing::warn!(error = %e, "lease checkpoint failed");
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
