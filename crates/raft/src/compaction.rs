//! Snapshots by log bytes as well as by entries.
//!
//! openraft snapshots every `snapshot_every` entries. Entries differ in size by four orders of
//! magnitude: an allocation is ~100 bytes, a lease checkpoint of 40,000 renewed leases ~250 KB. A
//! node that only keeps leases alive writes a few checkpoints a minute, so its log reached 10,000
//! entries only after hours while its bytes (and sled's memory for them) grew all along: the
//! 100,000-lease soak climbed from ~45 to ~60 MB per member in ten minutes (docs/benchmarks.md,
//! eleventh slice). Each member therefore also asks for a snapshot once the log appended since
//! its last one passes `snapshot_log_bytes`. A snapshot is written to its file as it is encoded,
//! so a more frequent one costs a write of the state, not a spike of memory.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::RaftNode;

/// How often the log's size is looked at.
const EVERY: Duration = Duration::from_secs(1);
/// How long after asking for a snapshot that has not come the node asks again.
const PATIENCE: Duration = Duration::from_secs(30);

/// Asks this member's Raft for a snapshot whenever the log appended since the last one passes
/// `limit` bytes. Runs until `stop` turns true; `limit` 0 turns it off.
pub(crate) async fn run(node: RaftNode, limit: u64, stop: watch::Receiver<bool>) {
    if limit == 0 {
        return;
    }
    let mut ticks = crate::Ticks::new(EVERY, stop);
    let mut asked: Option<Instant> = None;
    while ticks.next().await {
        let since = node.store.stats().log_bytes_since_snapshot();
        if since < limit {
            asked = None;
            continue;
        }
        if asked.is_some_and(|at| at.elapsed() < PATIENCE) {
            continue;
        }
        asked = Some(Instant::now());
        tracing::debug!(log_bytes = since, limit, "asking for a snapshot: the log passed its size limit");
        if let Err(e) = node.raft.trigger().snapshot().await {
            tracing::warn!(error = %e, "could not ask Raft for a snapshot");
        }
    }
}
