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

use std::collections::HashMap;
use std::sync::Mutex;

use portmesh_core::{Command, EventKind, State};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{RaftNode, RaftOptions};

/// Deadlines of live leases, held by the leader.
#[derive(Debug)]
pub struct LeaseKeeper {
    opts: RaftOptions,
    /// The instant the keeper's milliseconds count from.
    base: Instant,
    inner: Mutex<KeeperState>,
}

/// A lease's deadline in milliseconds since the keeper's base, and in its top bit whether the
/// lease was renewed since the last checkpoint: 8 bytes a lease where an `Instant` and a set of
/// renewed ids took 16 and 8 more (100,000 leases: 2.1 MB of table instead of 4.3 MB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Due(u64);

impl Due {
    const MOVED: u64 = 1 << 63;

    fn at(ms: u64) -> Self {
        Due(ms & !Self::MOVED)
    }

    fn ms(self) -> u64 {
        self.0 & !Self::MOVED
    }

    fn moved(self) -> bool {
        self.0 & Self::MOVED != 0
    }

    fn marked(self, moved: bool) -> Self {
        if moved { Due(self.0 | Self::MOVED) } else { Due::at(self.0) }
    }
}

#[derive(Debug, Default)]
struct KeeperState {
    /// The term in which these deadlines were set; cleared on any change of leadership.
    term: Option<u64>,
    deadlines: HashMap<u64, Due>,
    /// The lease clock at takeover and the keeper's milliseconds when it was read: the clock
    /// now reads `clock + (now - at)`.
    clock: Option<(u64, u64)>,
    /// The state's revision `deadlines` reflect: from there on, the state's events say which
    /// leases began and ended, so a reconcile reads those instead of walking every lease.
    seen: Option<u64>,
    /// No deadline is earlier than this (a lower bound: renewals only move deadlines later), so
    /// looking for expired leases before it is skipped rather than walking every deadline.
    next_due: Option<u64>,
}

impl KeeperState {
    fn clear(&mut self) {
        self.term = None;
        self.deadlines.clear();
        self.clock = None;
        self.seen = None;
        self.next_due = None;
    }

    fn set_deadline(&mut self, id: u64, due: Due) {
        self.deadlines.insert(id, due);
        self.next_due = Some(self.next_due.map_or(due.ms(), |d| d.min(due.ms())));
    }

    /// A lease the state holds and the countdown does not yet: it starts from its checkpointed
    /// remaining TTL.
    fn start_countdown(&mut self, state: &State, id: u64, now: u64) {
        if let Some(l) = state.lease(id)
            && !self.deadlines.contains_key(&id)
        {
            self.set_deadline(id, Due::at(now + state.lease_remaining_ms(l)));
        }
    }
}

impl LeaseKeeper {
    pub fn new(opts: RaftOptions) -> Self {
        Self { opts, base: Instant::now(), inner: Mutex::new(KeeperState::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeeperState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Now, in the keeper's milliseconds.
    fn now_ms(&self) -> u64 {
        Instant::now().saturating_duration_since(self.base).as_millis() as u64
    }

    /// Pushes a lease's deadline to now + ttl. `None` if it already lapsed (expiry is pending).
    pub fn renew(&self, id: u64, ttl_ms: u64) -> Option<u64> {
        let now = self.now_ms();
        let mut k = self.lock();
        match k.deadlines.get(&id) {
            Some(d) if d.ms() <= now => None,
            _ => {
                k.set_deadline(id, Due::at(now.saturating_add(ttl_ms)).marked(true));
                Some(ttl_ms)
            }
        }
    }

    pub fn remaining(&self, id: u64) -> Option<u64> {
        let now = self.now_ms();
        self.lock().deadlines.get(&id).map(|d| d.ms().saturating_sub(now))
    }

    /// Aligns deadlines with the applied state: new leases start from their checkpointed
    /// remaining TTL, ended leases are forgotten. A new term starts over from the state.
    ///
    /// It runs every `lease_tick` (100 ms) under the state's read lock, which the apply path
    /// waits for, so it must not walk every lease each time: it reads the events since the
    /// revision it last saw (leases granted, revoked, expired), and walks the leases only when
    /// those events are no longer all kept, at a new term, or if the counts disagree.
    fn reconcile(&self, state: &State, term: u64) {
        let now = self.now_ms();
        let mut k = self.lock();
        if k.term != Some(term) {
            k.clear();
            k.term = Some(term);
            k.clock = Some((state.meta().lease_clock_ms, now));
        }
        let revision = state.revision();
        let walk = match k.seen {
            Some(seen) if seen == revision => false,
            Some(seen) if state.oldest_event_revision() <= seen => {
                for e in state.events_since(seen + 1) {
                    match &e.kind {
                        EventKind::LeaseGranted { id, .. } => k.start_countdown(state, *id, now),
                        EventKind::LeaseRevoked { id, .. } | EventKind::LeaseExpired { id, .. } => {
                            k.deadlines.remove(id);
                        }
                        _ => {}
                    }
                }
                false
            }
            // A new term, or events dropped from the history since: walk. Deadlines already
            // counted (renewed ones) are kept; only missing and ended leases change.
            _ => true,
        };
        if walk || k.deadlines.len() != state.lease_count() {
            for l in state.leases() {
                k.start_countdown(state, l.id, now);
            }
            k.deadlines.retain(|id, _| state.lease(*id).is_some());
        }
        k.seen = Some(revision);
    }

    /// Leases whose deadline passed (at most `expiry_batch`, lowest ids first). Walks the
    /// deadlines only once the earliest one may have come.
    fn expired(&self) -> Vec<u64> {
        let now = self.now_ms();
        let mut k = self.lock();
        if k.next_due.is_none_or(|d| d > now) {
            return Vec::new();
        }
        let (mut ids, mut next_due) = (Vec::new(), None::<u64>);
        for (id, d) in &k.deadlines {
            if d.ms() <= now {
                ids.push(*id);
            }
            next_due = Some(next_due.map_or(d.ms(), |n| n.min(d.ms())));
        }
        k.next_due = next_due;
        ids.sort_unstable();
        ids.truncate(self.opts.expiry_batch);
        ids
    }

    /// The leases renewed since the last checkpoint, in id order. Walks every deadline under
    /// the keeper's lock (once per checkpoint interval, not per renewal): the price of keeping
    /// the mark in the deadline instead of a second set of ids.
    fn renewed(&self) -> Vec<u64> {
        let mut ids: Vec<u64> =
            self.lock().deadlines.iter().filter(|(_, d)| d.moved()).map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids
    }

    /// What a checkpoint of `ids` writes now: the lease clock and each one's remaining TTL,
    /// their mark taken off ([`LeaseKeeper::moved_again`] puts it back if the write fails).
    /// Leases no longer counted are left out. `None` before the first reconcile of a term.
    fn take_checkpoint(&self, ids: &[u64]) -> Option<(u64, Vec<(u64, u64)>)> {
        let now = self.now_ms();
        let mut k = self.lock();
        let (clock, at) = k.clock?;
        let clock_ms = clock + now.saturating_sub(at);
        let remaining = ids
            .iter()
            .filter_map(|id| {
                let d = k.deadlines.get_mut(id)?;
                *d = d.marked(false);
                Some((*id, d.ms().saturating_sub(now)))
            })
            .collect();
        Some((clock_ms, remaining))
    }

    /// A checkpoint of these leases was not written: the next one writes them.
    fn moved_again(&self, ids: impl IntoIterator<Item = u64>) {
        let mut k = self.lock();
        for id in ids {
            if let Some(d) = k.deadlines.get_mut(&id) {
                *d = d.marked(true);
            }
        }
    }

    fn forget_term(&self) {
        self.lock().clear();
    }
}

/// Writes the lease clock and the remaining TTL of every lease renewed since the last checkpoint
/// into the log (as the leader counts them now), in entries of at most `expiry_batch` leases,
/// each read when it is written: only the ids of the renewed leases are listed beforehand (8
/// bytes a lease, where the whole checkpoint built at once took 16 and its doubling). Every entry
/// carries the clock, and applying one twice changes nothing, so a write whose outcome is unknown
/// is simply written again.
async fn checkpoint(node: &RaftNode) {
    let keeper = &node.keeper;
    let ids = keeper.renewed();
    if ids.is_empty() && node.state().read().state.leases().next().is_none() {
        return; // nothing counts down
    }
    let batch = keeper.opts.expiry_batch.max(1);
    let mut from = 0;
    // An empty checkpoint still writes the clock.
    loop {
        let chunk = &ids[from..ids.len().min(from + batch)];
        let Some((clock_ms, remaining)) = keeper.take_checkpoint(chunk) else { return };
        if let Err(e) = node.propose(Command::CheckpointLeases { clock_ms, remaining }).await {
            tracing::warn!(error = %e, "lease checkpoint failed; the next one writes these leases");
            // The leases after this chunk are still marked.
            keeper.moved_again(chunk.iter().copied());
            return;
        }
        from += chunk.len();
        if from >= ids.len() {
            return;
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
pub(crate) async fn run(node: RaftNode, stop: watch::Receiver<bool>) {
    let keeper = node.keeper.clone();
    let mut ticks = crate::Ticks::new(keeper.opts.lease_tick, stop);
    let mut last_checkpoint = Instant::now();
    let checkpoint_every = keeper.opts.checkpoint_every();
    while ticks.next().await {
        if !node.is_leader() {
            keeper.forget_term();
            continue;
        }
        let term = node.metrics().current_term;
        keeper.reconcile(&node.state().read().state, term);

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

#[cfg(test)]
mod tests {
    use super::*;
    use portmesh_core::{ApplyCtx, Response};

    struct Fixture {
        state: State,
        index: u64,
        keeper: LeaseKeeper,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture { state: State::new(), index: 0, keeper: LeaseKeeper::new(RaftOptions::default()) }
        }

        fn apply(&mut self, cmd: Command) -> Response {
            self.index += 1;
            self.state.apply(ApplyCtx { now_ms: 1_000 + self.index, index: self.index, seq: 0 }, &cmd)
        }

        fn grant(&mut self, ttl_ms: u64) -> u64 {
            match self.apply(Command::GrantLease { team: "default".into(), ttl_ms }) {
                Response::LeaseGranted(l) => l.id,
                other => panic!("{other:?}"),
            }
        }

        fn revoke(&mut self, id: u64) {
            self.apply(Command::RevokeLease { team: "default".into(), id });
        }

        fn reconcile(&self) {
            self.keeper.reconcile(&self.state, 1);
        }

        /// Two leases `a` and `b`, counted down, and `a` renewed for an hour in memory (a
        /// reconcile must not restart it from its checkpointed TTL).
        fn two_counted_one_renewed() -> (Fixture, u64, u64) {
            let mut f = Fixture::new();
            let (a, b) = (f.grant(60_000), f.grant(60_000));
            f.reconcile();
            assert_eq!(f.counted(), [a, b]);
            assert_eq!(f.keeper.renew(a, 3_600_000), Some(3_600_000));
            (f, a, b)
        }

        /// The counted leases, and that they are exactly the state's.
        fn counted(&self) -> Vec<u64> {
            let mut ids: Vec<u64> = self.keeper.lock().deadlines.keys().copied().collect();
            ids.sort_unstable();
            let live: Vec<u64> = self.state.leases().map(|l| l.id).collect();
            assert_eq!(ids, live, "the countdown holds exactly the live leases");
            ids
        }
    }

    #[test]
    fn reconcile_follows_grants_and_ends_from_the_events() {
        let (mut f, a, b) = Fixture::two_counted_one_renewed();
        assert_eq!(f.keeper.lock().seen, Some(f.state.revision()));
        let c = f.grant(60_000);
        f.revoke(b);
        let d = f.grant(60_000);
        f.apply(Command::ExpireLeases { ids: vec![d] });
        f.reconcile();
        assert_eq!(f.counted(), [a, c]);
        assert!(f.keeper.remaining(a).is_some_and(|ms| ms > 60_000), "the renewal was kept");
        // Nothing changed: nothing to do, the same result.
        f.reconcile();
        assert_eq!(f.counted(), [a, c]);
    }

    #[test]
    fn reconcile_walks_when_the_events_since_were_dropped_and_keeps_renewals() {
        let (mut f, a, b) = Fixture::two_counted_one_renewed();
        // One counted lease ends and one begins where the history no longer reaches, so the
        // counts agree and only a walk finds the difference.
        f.revoke(b);
        let c = f.grant(60_000);
        let mut last = 0;
        for _ in 0..portmesh_core::EVENT_RETENTION / 2 + 1 {
            last = f.grant(60_000);
            f.revoke(last);
        }
        let kept = f.grant(60_000);
        assert!(f.state.oldest_event_revision() > f.keeper.lock().seen.unwrap_or(0), "history dropped");
        f.reconcile();
        assert_eq!(f.counted(), [a, c, kept]);
        assert!(f.state.lease(last).is_none());
        assert!(f.keeper.remaining(a).is_some_and(|ms| ms > 60_000), "the renewal was kept");
    }

    #[test]
    fn a_new_term_starts_over_from_the_state() {
        let (f, a, b) = Fixture::two_counted_one_renewed();
        f.keeper.reconcile(&f.state, 2);
        assert_eq!(f.counted(), [a, b]);
        assert!(f.keeper.remaining(a).is_some_and(|ms| ms <= 60_000), "from the checkpointed TTL");
    }

    #[test]
    fn expiry_is_looked_for_once_the_earliest_deadline_may_have_come() {
        let mut f = Fixture::new();
        let a = f.grant(60_000);
        let b = f.grant(60_000);
        f.reconcile();
        assert!(f.keeper.expired().is_empty(), "nothing is due");
        // A renewal to 0 ms is due at once: it must lower the earliest deadline, or it would
        // not be looked for until the others are due.
        assert_eq!(f.keeper.renew(b, 0), Some(0));
        assert_eq!(f.keeper.expired(), [b]);
        assert_eq!(f.keeper.expired(), [b], "still due until its expiry is applied");
        f.apply(Command::ExpireLeases { ids: vec![b] });
        f.reconcile();
        assert!(f.keeper.expired().is_empty());
        assert_eq!(f.counted(), [a]);
    }

    #[test]
    fn a_checkpoint_writes_each_renewal_once_unless_its_write_failed() {
        let (f, a, b) = Fixture::two_counted_one_renewed();
        let take = |k: &LeaseKeeper| k.take_checkpoint(&k.renewed()).unwrap().1;
        let ids = |c: Vec<(u64, u64)>| c.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        let first = take(&f.keeper);
        assert_eq!(first.len(), 1);
        assert!(first[0].0 == a && first[0].1 > 60_000 && first[0].1 <= 3_600_000, "{first:?}");
        assert!(take(&f.keeper).is_empty(), "written once");
        f.keeper.moved_again([a, 999]);
        assert_eq!(ids(take(&f.keeper)), [a], "a failed write is written again; unknown ids are not");
        f.keeper.renew(b, 1_000);
        f.keeper.renew(a, 1_000);
        let listed = f.keeper.renewed();
        assert_eq!(listed, [a, b]);
        // Renewed again between the listing and the write: the write carries the newer TTL.
        f.keeper.renew(b, 2_000);
        let (_, written) = f.keeper.take_checkpoint(&listed).unwrap();
        assert_eq!(ids(written.clone()), [a, b]);
        assert!(written[1].1 > 1_000, "{written:?}");
        assert!(f.keeper.renewed().is_empty(), "both marks taken off");
        // The mark is not part of the deadline.
        assert!(f.keeper.remaining(a).is_some_and(|ms| ms <= 1_000));
    }
}
