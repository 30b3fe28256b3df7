//! The state machine: `portmesh_core::State` in memory, made durable by the Raft log and the
//! current snapshot (the `snap` tree) alone.
//!
//! Applying an entry writes nothing to disk: the entry is already durable in the log. Opening a
//! directory loads the snapshot and applies the committed log entries after it ([`load`]), so a
//! restart costs at most the entries since the last snapshot (`--snapshot-every`). Until data
//! version 6 every applied entry also rewrote its records in an `sm` tree: one sled batch per
//! entry, most of the CPU a replicated write cost (docs/architecture.md, "State in snapshots").
//! A directory of an older version has that tree folded into a snapshot when it is opened
//! ([`fold_records_into_snapshot`]).
//!
//! [`load`]: StateMachineStore::load

use std::io::Cursor;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use portmesh_core::{ApplyCtx, Response, State};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::log_store::decode;
use crate::ondisk::StoredRecord;
use crate::{Inner, StoreError, TypeConfig, keys};

type SResult<T> = Result<T, StorageError<u64>>;
type Membership = StoredMembership<u64, BasicNode>;

/// The applied state: the domain state plus what Raft needs to know about it.
#[derive(Debug)]
pub struct SmState {
    pub state: State,
    pub last_applied: Option<LogId<u64>>,
    pub membership: Membership,
}

/// A shared, read-only view of the applied state, for the API and the lease keeper.
#[derive(Debug, Clone)]
pub struct StateReader {
    sm: Arc<RwLock<SmState>>,
    applied: watch::Receiver<u64>,
}

impl StateReader {
    /// Reads the state under a short-lived lock. Do not hold the guard across an `.await`.
    pub fn read(&self) -> RwLockReadGuard<'_, SmState> {
        // A poisoned lock means a panic while applying: the process is going down anyway, and
        // the data under it is the last consistent state, so keep serving reads from it.
        self.sm.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver of the applied log index, to wait for an index to be applied.
    pub fn applied_index(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }
}

/// The snapshot format: every record of the state plus Raft's view.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotPayload {
    data_version: u32,
    records: Vec<StoredRecord>,
}

/// `SnapshotPayload` as it is written: the same format, its records serialized one at a time
/// straight from the state. Collecting them first held a copy of the whole state during every
/// snapshot (34 MB of heap at 60,000 leased allocations, heaptrack; docs/benchmarks.md).
#[derive(Serialize)]
struct SnapshotPayloadOf<'a> {
    data_version: u32,
    records: RecordsOf<'a>,
}

/// Every record of a state, serialized as the sequence `SnapshotPayload::records` reads.
struct RecordsOf<'a>(&'a State);

impl Serialize for RecordsOf<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        // postcard writes the length first.
        let mut seq = s.serialize_seq(Some(self.0.record_count()))?;
        for r in self.0.records() {
            seq.serialize_element(&StoredRecord::from(r))?;
        }
        seq.end()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

/// `StoredSnapshot` as it is written, borrowing the snapshot's bytes instead of copying them.
#[derive(Serialize)]
struct StoredSnapshotOf<'a> {
    meta: &'a SnapshotMeta<u64, BasicNode>,
    data: &'a [u8],
}

const SNAP_CURRENT: &[u8] = b"current";

/// The state-machine half of the store.
#[derive(Debug, Clone)]
pub struct StateMachineStore {
    inner: Arc<Inner>,
    sm: Arc<RwLock<SmState>>,
    applied_tx: Arc<watch::Sender<u64>>,
    /// The size of the last snapshot built, to size the next one's buffer (see [`Self::build`]).
    last_snapshot_len: Arc<std::sync::atomic::AtomicUsize>,
}

impl StateMachineStore {
    /// The state of the current snapshot with every committed log entry after it applied.
    /// Refuses a directory whose log lacks a committed entry, or whose state comes back with a
    /// lower revision than its watermark recorded (see `watermark`).
    pub(crate) fn load(inner: Arc<Inner>) -> Result<Self, StoreError> {
        let corrupt = |what: String| StoreError::Corrupt { dir: inner.dir.clone(), what };
        // The snapshot's size also sizes the next one's buffer.
        let (mut sm, snapshot_len) = match read_current(&inner)? {
            Some(stored) => {
                let payload = read_payload(&stored.meta, &stored.data).map_err(|e| corrupt(e.to_string()))?;
                let sm = SmState {
                    state: State::from_records(payload.records.into_iter().map(Into::into)),
                    last_applied: stored.meta.last_log_id,
                    membership: stored.meta.last_membership,
                };
                (sm, stored.data.len())
            }
            None => {
                (SmState { state: State::new(), last_applied: None, membership: Membership::default() }, 0)
            }
        };
        let committed = crate::log_store::committed_in(&inner.meta)
            .map_err(|e| corrupt(format!("committed log id: {e}")))?
            .map(|c| c.index);
        let mut next = sm.last_applied.map_or(0, |l| l.index + 1);
        if let Some(committed) = committed.filter(|c| next <= *c) {
            for kv in inner.log.range(next.to_be_bytes()..=committed.to_be_bytes()) {
                let (_, v) = kv.map_err(|source| StoreError::Io { dir: inner.dir.clone(), source })?;
                let e: Entry<TypeConfig> =
                    decode(&v).map_err(|e| corrupt(format!("log entry {next}: {e}")))?;
                if e.log_id.index != next {
                    break;
                }
                sm.apply_entry(e);
                next += 1;
            }
            if next <= committed {
                let why = format!("its log lacks entry {next}, which it had committed (up to {committed})");
                return Err(StoreError::Damaged { dir: inner.dir.clone(), why });
            }
        }
        if let Some(why) = inner.watermark.state_behind(sm.state.revision()) {
            return Err(crate::damaged_by_watermark(&inner.dir, why));
        }
        inner.watermark.applied(sm.state.revision());
        let index = sm.last_applied.map_or(0, |l: LogId<u64>| l.index);
        let (tx, _) = watch::channel(index);
        Ok(Self {
            inner,
            sm: Arc::new(RwLock::new(sm)),
            applied_tx: Arc::new(tx),
            last_snapshot_len: Arc::new(snapshot_len.into()),
        })
    }

    pub fn reader(&self) -> StateReader {
        StateReader { sm: self.sm.clone(), applied: self.applied_tx.subscribe() }
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, SmState> {
        self.sm.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds a snapshot and saves it. Its buffer starts at the last snapshot's size plus an
    /// eighth: grown by doubling from empty, the buffer of a 2.4 MB snapshot had 4.2 MB reserved,
    /// and the bytes were copied at each doubling (heaptrack, docs/benchmarks.md).
    fn build(&self) -> SResult<Snapshot<TypeConfig>> {
        let started = std::time::Instant::now();
        let hint = self.last_snapshot_len.load(Ordering::Relaxed);
        let ((meta, data), locked) = {
            let sm = self.sm.read().unwrap_or_else(|p| p.into_inner());
            (encode_snapshot(&sm, hint)?, started.elapsed())
        };
        self.last_snapshot_len.store(data.len(), Ordering::Relaxed);
        save_snapshot(&self.inner, &meta, &data)?;
        tracing::debug!(
            index = meta.last_log_id.map_or(0, |l| l.index),
            bytes = data.len(),
            locked_ms = locked.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "snapshot built"
        );
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

/// The snapshot of `sm`: its metadata and bytes, in a buffer of `hint` bytes plus an eighth.
fn encode_snapshot(sm: &SmState, hint: usize) -> SResult<(SnapshotMeta<u64, BasicNode>, Vec<u8>)> {
    let payload = SnapshotPayloadOf { data_version: crate::DATA_VERSION, records: RecordsOf(&sm.state) };
    let data = postcard::to_extend(&payload, Vec::with_capacity(hint + hint / 8))
        .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
    let snapshot_id = match sm.last_applied {
        Some(l) => format!("{}-{}-{}", l.leader_id, l.index, data.len()),
        None => format!("empty-{}", data.len()),
    };
    let meta =
        SnapshotMeta { last_log_id: sm.last_applied, last_membership: sm.membership.clone(), snapshot_id };
    Ok((meta, data))
}

/// Saves a snapshot as the directory's current one, durably: the log may be purged up to it.
fn save_snapshot(inner: &Inner, meta: &SnapshotMeta<u64, BasicNode>, data: &[u8]) -> SResult<()> {
    let sig = Some(meta.signature());
    let stored = StoredSnapshotOf { meta, data };
    // Exactly as large as it will be: the metadata, the length, the snapshot's bytes.
    let size = postcard::experimental::serialized_size(&stored)
        .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
    let b = postcard::to_extend(&stored, Vec::with_capacity(size))
        .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
    inner.snap.insert(SNAP_CURRENT, b).map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
    inner.flush().map_err(|e| StorageIOError::write_snapshot(sig, &e))?;
    Ok(())
}

/// The directory's current snapshot, if it has one.
fn read_current(inner: &Inner) -> Result<Option<StoredSnapshot>, StoreError> {
    let Some(b) =
        inner.snap.get(SNAP_CURRENT).map_err(|source| StoreError::Io { dir: inner.dir.clone(), source })?
    else {
        return Ok(None);
    };
    let stored = decode(&b).map_err(|e| StoreError::Corrupt {
        dir: inner.dir.clone(),
        what: format!("current snapshot: {e}"),
    })?;
    Ok(Some(stored))
}

/// A snapshot's records, if its data version is one this build reads.
fn read_payload(meta: &SnapshotMeta<u64, BasicNode>, data: &[u8]) -> SResult<SnapshotPayload> {
    let sig = Some(meta.signature());
    let payload: SnapshotPayload =
        decode(data).map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;
    if !(crate::OLDEST_READABLE_VERSION..=crate::DATA_VERSION).contains(&payload.data_version) {
        let e = std::io::Error::other(format!(
            "snapshot has data version {}, this build reads versions {} to {}",
            payload.data_version,
            crate::OLDEST_READABLE_VERSION,
            crate::DATA_VERSION
        ));
        return Err(StorageIOError::read_snapshot(sig, &e).into());
    }
    Ok(payload)
}

/// Folds the `sm` tree of a directory written by data version 5 or older (its records, applied
/// log id and membership) into a snapshot at its applied log id, then empties the tree. Safe to
/// repeat after a crash midway: the snapshot is durable before the tree is touched, and a
/// snapshot already at (or past) the tree's applied id is kept.
pub(crate) fn fold_records_into_snapshot(inner: &Inner) -> Result<(), StoreError> {
    if inner.sm.is_empty() {
        return Ok(());
    }
    let corrupt = |what: String| StoreError::Corrupt { dir: inner.dir.clone(), what };
    let io = |source| StoreError::Io { dir: inner.dir.clone(), source };
    let mut records = Vec::new();
    let mut last_applied = None;
    let mut membership = Membership::default();
    for kv in inner.sm.iter() {
        let (k, v) = kv.map_err(io)?;
        if keys::is_record(&k) {
            records.push(
                decode::<StoredRecord>(&v).map_err(|e| corrupt(format!("state record {k:?}: {e}")))?.into(),
            );
        } else if k.as_ref() == keys::APPLIED {
            last_applied = decode(&v).map_err(|e| corrupt(format!("applied log id: {e}")))?;
        } else if k.as_ref() == keys::MEMBERSHIP {
            membership = decode(&v).map_err(|e| corrupt(format!("membership: {e}")))?;
        }
    }
    let newer = read_current(inner)?.is_none_or(|s| s.meta.last_log_id < last_applied);
    if newer {
        let sm = SmState { state: State::from_records(records), last_applied, membership };
        let (meta, data) = encode_snapshot(&sm, 0).map_err(|e| corrupt(e.to_string()))?;
        save_snapshot(inner, &meta, &data).map_err(|e| corrupt(e.to_string()))?;
    }
    inner.sm.clear().map_err(io)?;
    inner.flush().map_err(io)
}

impl SmState {
    /// Applies one log entry; the responses of its commands.
    fn apply_entry(&mut self, e: Entry<TypeConfig>) -> Vec<Response> {
        self.last_applied = Some(e.log_id);
        match e.payload {
            EntryPayload::Blank => Vec::new(),
            EntryPayload::Normal(req) => {
                let req = portmesh_core::Request::from(req);
                let index = e.log_id.index;
                let mut rs = Vec::with_capacity(req.commands.len());
                for (seq, cmd) in req.commands.iter().enumerate() {
                    let ctx = ApplyCtx { now_ms: req.time_ms, index, seq: seq as u32 };
                    rs.push(self.state.apply(ctx, cmd));
                }
                rs
            }
            EntryPayload::Membership(m) => {
                self.membership = StoredMembership::new(Some(e.log_id), m);
                Vec::new()
            }
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> SResult<Snapshot<TypeConfig>> {
        self.build()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> SResult<(Option<LogId<u64>>, Membership)> {
        let sm = self.sm.read().unwrap_or_else(|p| p.into_inner());
        Ok((sm.last_applied, sm.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> SResult<Vec<Vec<Response>>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let (applied, revision, responses) = {
            let mut guard = self.write_lock();
            let sm = &mut *guard;
            let mut out = Vec::new();
            for e in entries {
                let rs = sm.apply_entry(e);
                self.inner.stats.commands_applied.fetch_add(rs.len() as u64, Ordering::Relaxed);
                out.push(rs);
            }
            (sm.last_applied.map_or(0, |l| l.index), sm.state.revision(), out)
        };
        self.inner.watermark.applied(revision);
        self.applied_tx.send_replace(applied);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> SResult<()> {
        let data = snapshot.into_inner();
        let payload = read_payload(meta, &data)?;
        let state = State::from_records(payload.records.into_iter().map(Into::into));
        // Durable before the state is replaced: the log before it may be gone once it is.
        save_snapshot(&self.inner, meta, &data)?;
        let (index, revision) = {
            let mut guard = self.write_lock();
            let sm = &mut *guard;
            sm.state = state;
            sm.last_applied = meta.last_log_id;
            sm.membership = meta.last_membership.clone();
            (sm.last_applied.map_or(0, |l| l.index), sm.state.revision())
        };
        self.inner.watermark.applied(revision);
        self.applied_tx.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<TypeConfig>>> {
        let current = read_current(&self.inner).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(current.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::RaftSnapshotBuilder;
    use openraft::storage::RaftStateMachine;
    use tempfile::TempDir;

    use super::*;
    use crate::log_store::encode;
    use crate::tests::alloc_entry;
    use crate::{Store, StoreOptions};

    /// The snapshot is written from borrowed state, field by field; it must be the very bytes
    /// the collected form (what older versions wrote, and what the reader decodes) gives.
    #[tokio::test]
    async fn a_snapshot_written_from_the_state_is_the_collected_format() {
        let dir = TempDir::new().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mut sm = store.state_machine().unwrap();
        sm.apply((1..=40).map(alloc_entry)).await.unwrap();
        let built = sm.build_snapshot().await.unwrap();

        let collected = {
            let guard = sm.sm.read().unwrap();
            let payload = SnapshotPayload {
                data_version: crate::DATA_VERSION,
                records: guard.state.records().map(Into::into).collect(),
            };
            encode(&payload).unwrap()
        };
        assert_eq!(built.snapshot.into_inner(), collected);
        let payload: SnapshotPayload = decode(&collected).unwrap();
        assert_eq!(payload.records.len(), sm.sm.read().unwrap().state.records().count());

        let current = sm.get_current_snapshot().await.unwrap().expect("a snapshot was saved");
        assert_eq!(current.meta, built.meta);
        assert_eq!(current.snapshot.into_inner(), collected, "the saved copy reads back whole");
        let stored = StoredSnapshot { meta: built.meta.clone(), data: collected.clone() };
        let written = StoredSnapshotOf { meta: &built.meta, data: &collected };
        assert_eq!(encode(&written).unwrap(), encode(&stored).unwrap());

        // The next snapshot's buffer is sized from this one (an eighth to spare), not grown by
        // doubling from empty; its bytes are the same.
        let again = sm.build_snapshot().await.unwrap().snapshot.into_inner();
        assert_eq!(again, collected);
        assert_eq!(again.capacity(), collected.len() + collected.len() / 8);
        let current = sm.get_current_snapshot().await.unwrap().expect("a snapshot was saved");
        assert_eq!(current.snapshot.into_inner(), collected, "saved from an exactly sized buffer");

        // Reopened, the first snapshot is sized from the one loaded, not grown from empty.
        drop((sm, store));
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let sm = store.state_machine().unwrap();
        assert_eq!(sm.last_snapshot_len.load(Ordering::Relaxed), collected.len());
    }
}
