//! The Raft log over sled: entries in the `log` tree, vote and purge/commit marks in `meta`.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{Entry, LogId, LogState, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Inner, TypeConfig};

pub(crate) const VOTE: &[u8] = b"vote";
const PURGED: &[u8] = b"last_purged";
const COMMITTED: &[u8] = b"committed";

/// The committed log id recorded in `meta` (see [`RaftLogStorage::save_committed`]).
pub(crate) fn committed_in(meta: &sled::Tree) -> Result<Option<LogId<u64>>, String> {
    match meta.get(COMMITTED).map_err(|e| e.to_string())? {
        None => Ok(None),
        Some(b) => decode::<Option<LogId<u64>>>(&b).map_err(|e| e.to_string()),
    }
}

type SResult<T> = Result<T, StorageError<u64>>;

/// Log entries removed per sled batch when the log is purged.
const PURGE_BATCH: u64 = 256;

/// The Raft log. Cheap to clone; clones share the directory.
#[derive(Debug, Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(v)
}

pub(crate) fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(b)
}

impl LogStore {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &[u8]) -> SResult<Option<T>> {
        let v = self.inner.meta.get(key).map_err(|e| StorageIOError::read(&e))?;
        v.map(|b| decode(&b).map_err(|e| StorageIOError::read(&e).into())).transpose()
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], v: &T) -> SResult<()> {
        let b = encode(v).map_err(|e| StorageIOError::write(&e))?;
        self.inner.meta.insert(key, b).map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    /// Makes everything written so far durable (one fsync), counting `entries` for the stats.
    async fn flush(&self, entries: u64) -> Result<(), sled::Error> {
        self.inner.watermark.flush_async().await?;
        self.inner.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.inner.stats.entries_flushed.fetch_add(entries, Ordering::Relaxed);
        Ok(())
    }

    fn last_entry_id(&self) -> SResult<Option<LogId<u64>>> {
        match self.inner.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            None => Ok(None),
            Some((_, v)) => {
                let e: Entry<TypeConfig> = decode(&v).map_err(|e| StorageIOError::read_logs(&e))?;
                Ok(Some(e.log_id))
            }
        }
    }
}

fn bound_key(b: Bound<&u64>) -> Bound<[u8; 8]> {
    match b {
        Bound::Included(i) => Bound::Included(i.to_be_bytes()),
        Bound::Excluded(i) => Bound::Excluded(i.to_be_bytes()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> SResult<Vec<Entry<TypeConfig>>> {
        let r = (bound_key(range.start_bound()), bound_key(range.end_bound()));
        self.inner
            .log
            .range::<[u8; 8], _>(r)
            .map(|kv| {
                let (_, v) = kv.map_err(|e| StorageIOError::read_logs(&e))?;
                decode(&v).map_err(|e| StorageIOError::read_logs(&e).into())
            })
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> SResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<u64>> = self.get_meta(PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> SResult<()> {
        // This node's own vote is kept as not yet committed, even once it leads: a leader sends
        // entries to its followers before its own flush of them ends (early replication), so it
        // may lose, in a crash, entries a follower holds. Were it to come back as leader of the
        // same term (what openraft 0.9 does with a committed vote for itself), it would write
        // other entries under the same log ids and the logs would diverge. With the vote
        // uncommitted it comes back as a follower that already voted in that term, and leads
        // again only through an election, in a higher term.
        let me = self.inner.node_id().map_err(|e| StorageIOError::write_vote(&e))?;
        let vote = match me {
            Some(me) if vote.committed && vote.leader_id.node_id == me => {
                Vote::new(vote.leader_id.term, vote.leader_id.node_id)
            }
            _ => *vote,
        };
        self.put_meta(VOTE, &vote).map_err(|_| StorageIOError::write_vote(&sled_err("encode vote")))?;
        self.flush(0).await.map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> SResult<Option<Vote<u64>>> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> SResult<()> {
        // Not flushed here: the next flush (the next append's, within one group commit under
        // load) makes it durable. Opening the directory applies the log up to the id that was
        // durable; a member restarting with an older one applies less until a leader commits
        // again, and the watermark's revision never claims more than it (see `watermark`).
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> SResult<Option<LogId<u64>>> {
        committed_in(&self.inner.meta).map_err(|e| StorageIOError::read(&sled_err(&e)).into())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> SResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let mut encoded = Vec::with_capacity(entries.len());
        let mut bytes = 0u64;
        for e in &entries {
            let b = encode(e).map_err(|err| StorageIOError::write_log_entry(e.log_id, &err))?;
            bytes += b.len() as u64;
            encoded.push((e.log_id.index.to_be_bytes(), b));
        }
        let n = encoded.len() as u64;
        // One entry (every append at low load) is one insert: sled's batch writes out the I/O
        // buffer it starts in and then its own manifest, two extra writes with their syncs per
        // entry (docs/benchmarks.md, thirteenth slice). Several entries stay one atomic batch.
        if let [(key, value)] = &encoded[..] {
            self.inner.log.insert(key, value.as_slice()).map_err(|e| StorageIOError::write_logs(&e))?;
        } else {
            let mut batch = sled::Batch::default();
            for (key, value) in encoded {
                batch.insert(&key, value);
            }
            self.inner.log.apply_batch(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        }
        self.inner.stats.log_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(hook) = self.inner.on_append.get() {
            (hook.0)(&entries);
        }
        // Durable before acknowledging: the flusher completes the callback only after an fsync
        // that started after these entries were written (group commit, see `flusher`).
        self.inner.flusher.submit(callback, n);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> SResult<()> {
        let mut batch = sled::Batch::default();
        for kv in self.inner.log.range(log_id.index.to_be_bytes()..) {
            let (k, _) = kv.map_err(|e| StorageIOError::write_logs(&e))?;
            batch.remove(k);
        }
        self.inner.log.apply_batch(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        self.flush(0).await.map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> SResult<()> {
        // Record the purge point first: a crash midway leaves extra entries, never a gap.
        self.put_meta(PURGED, &log_id)?;
        // Entries are keyed by their index, which has no gaps: remove them by key from the first
        // one still there, a bounded batch at a time. Reading the range back (every entry's
        // pages from disk) and removing thousands of entries in one batch (every page version it
        // rewrote kept until it ended) made each purge a burst of ~50 MB of heap that the
        // allocator kept (heaptrack, one node at 60,000 allocations; docs/benchmarks.md).
        let Some((first, _)) = self.inner.log.first().map_err(|e| StorageIOError::read_logs(&e))? else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let from = index_of(&first)?;
        let mut next = from;
        while next <= log_id.index {
            let end = next.saturating_add(PURGE_BATCH - 1).min(log_id.index);
            let mut batch = sled::Batch::default();
            for i in next..=end {
                batch.remove(&i.to_be_bytes());
            }
            self.inner.log.apply_batch(batch).map_err(|e| StorageIOError::write_logs(&e))?;
            next = end + 1;
        }
        tracing::debug!(
            entries = next.saturating_sub(from),
            upto = log_id.index,
            ms = started.elapsed().as_millis() as u64,
            "log purged"
        );
        Ok(())
    }
}

/// The index a log key names (keys are indexes in big-endian order).
fn index_of(key: &[u8]) -> SResult<u64> {
    let b: [u8; 8] =
        key.try_into().map_err(|_| StorageIOError::read_logs(&sled_err("log key is not 8 bytes")))?;
    Ok(u64::from_be_bytes(b))
}

fn sled_err(what: &str) -> sled::Error {
    sled::Error::Unsupported(what.to_string())
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftLogStorage;
    use tempfile::TempDir;

    use super::*;
    use crate::tests::alloc_entry;
    use crate::{Store, StoreOptions};

    fn write(log: &LogStore, indexes: impl IntoIterator<Item = u64>) {
        for i in indexes {
            log.inner.log.insert(i.to_be_bytes(), encode(&alloc_entry(i)).unwrap()).unwrap();
        }
    }

    async fn kept(log: &mut LogStore) -> Vec<u64> {
        log.try_get_log_entries(..).await.unwrap().iter().map(|e| e.log_id.index).collect()
    }

    /// An append of one entry (one insert) and of several (one batch) are both durable once
    /// acknowledged: reopened, the directory holds every entry, in order, and nothing else.
    #[tokio::test]
    async fn single_and_batched_appends_are_there_after_reopening() {
        use openraft::storage::RaftLogStorageExt;
        let dir = TempDir::new().unwrap();
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let mut log = store.log_store();
            log.blocking_append([alloc_entry(1)]).await.unwrap();
            log.blocking_append((2..=4).map(alloc_entry)).await.unwrap();
            log.blocking_append([alloc_entry(5)]).await.unwrap();
        }
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mut log = store.log_store();
        assert_eq!(kept(&mut log).await, (1..=5).collect::<Vec<_>>());
        let entries = log.try_get_log_entries(..).await.unwrap();
        let as_written =
            |e: &Entry<TypeConfig>| encode(e).unwrap() == encode(&alloc_entry(e.log_id.index)).unwrap();
        assert!(entries.iter().all(as_written), "entries read back as written");
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(alloc_entry(5).log_id));
    }

    /// Purge removes by index, in batches: every entry up to the purge point goes (across many
    /// batches, and below the last purge point when an earlier purge was cut short), none after.
    #[tokio::test]
    async fn purge_removes_every_entry_up_to_the_point_and_none_after() {
        let dir = TempDir::new().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mut log = store.log_store();
        write(&log, 1..=1_000);
        let at = |i| alloc_entry(i).log_id;

        log.purge(at(700)).await.unwrap();
        assert_eq!(kept(&mut log).await, (701..=1_000).collect::<Vec<_>>());
        assert_eq!(log.get_log_state().await.unwrap().last_purged_log_id, Some(at(700)));

        // An earlier purge recorded its point and was cut short before removing entry 5.
        write(&log, [5]);
        log.purge(at(800)).await.unwrap();
        assert_eq!(kept(&mut log).await, (801..=1_000).collect::<Vec<_>>());

        log.purge(at(1_000)).await.unwrap();
        assert!(kept(&mut log).await.is_empty());
        let state = log.get_log_state().await.unwrap();
        assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(at(1_000)), Some(at(1_000))));
        log.purge(at(1_000)).await.unwrap();
    }

    /// The node's own vote is kept uncommitted even once it leads (early replication: a leader
    /// restarted after a crash must not lead its old term again); anyone else's vote, and any
    /// vote of a directory without a node id, is kept as given.
    #[tokio::test]
    async fn the_nodes_own_vote_is_kept_uncommitted() {
        let dir = TempDir::new().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mut log = store.log_store();
        log.save_vote(&Vote::new_committed(3, 7)).await.unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new_committed(3, 7)), "no node id yet");

        store.set_node_id(7).unwrap();
        log.save_vote(&Vote::new(4, 7)).await.unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(4, 7)));
        log.save_vote(&Vote::new_committed(4, 7)).await.unwrap();
        drop((log, store));

        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mut log = store.log_store();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(4, 7)), "own vote, read back uncommitted");
        log.save_vote(&Vote::new_committed(5, 9)).await.unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new_committed(5, 9)), "another leader's vote");
    }

    /// The append hook sees every batch, in order, as appended (one entry or several).
    #[tokio::test]
    async fn the_append_hook_sees_every_batch_in_order() {
        use openraft::storage::RaftLogStorageExt;
        let dir = TempDir::new().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let hook_seen = seen.clone();
        store.on_append(Box::new(move |entries: &[Entry<TypeConfig>]| {
            hook_seen.lock().unwrap().push(entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>());
        }));
        let mut log = store.log_store();
        log.blocking_append([alloc_entry(1)]).await.unwrap();
        log.blocking_append((2..=4).map(alloc_entry)).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![vec![1], vec![2, 3, 4]]);
    }
}
