//! The state machine over sled: `portmesh_core::State` in memory, its records in the `sm` tree,
//! the current snapshot in the `snap` tree.

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

use crate::log_store::{decode, encode};
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

fn err<E: std::error::Error + 'static>(e: &E) -> StorageError<u64> {
    StorageIOError::write_state_machine(e).into()
}

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
    pub(crate) fn load(inner: Arc<Inner>) -> Result<Self, StoreError> {
        let corrupt = |what: String| StoreError::Corrupt { dir: inner.dir.clone(), what };
        let mut records = Vec::new();
        let mut last_applied = None;
        let mut membership = Membership::default();
        for kv in inner.sm.iter() {
            let (k, v) = kv.map_err(|source| StoreError::Io { dir: inner.dir.clone(), source })?;
            if keys::is_record(&k) {
                records.push(
                    decode::<StoredRecord>(&v)
                        .map_err(|e| corrupt(format!("state record {k:?}: {e}")))?
                        .into(),
                );
            } else if k.as_ref() == keys::APPLIED {
                last_applied = decode(&v).map_err(|e| corrupt(format!("applied log id: {e}")))?;
            } else if k.as_ref() == keys::MEMBERSHIP {
                membership = decode(&v).map_err(|e| corrupt(format!("membership: {e}")))?;
            }
        }
        let state = State::from_records(records);
        let index = last_applied.map_or(0, |l: LogId<u64>| l.index);
        let sm = SmState { state, last_applied, membership };
        let (tx, _) = watch::channel(index);
        Ok(Self {
            inner,
            sm: Arc::new(RwLock::new(sm)),
            applied_tx: Arc::new(tx),
            last_snapshot_len: Arc::default(),
        })
    }

    pub fn reader(&self) -> StateReader {
        StateReader { sm: self.sm.clone(), applied: self.applied_tx.subscribe() }
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, SmState> {
        self.sm.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Persists the changed records plus applied id and membership in one atomic batch.
    fn persist(&self, sm: &mut SmState, replace_all: bool) -> SResult<()> {
        let mut batch = sled::Batch::default();
        if replace_all {
            for k in self.inner.sm.iter().keys() {
                batch.remove(k.map_err(|e| err(&e))?);
            }
            sm.state.take_dirty();
            for r in sm.state.records() {
                batch.insert(keys::encode(&r.key()), encode(&StoredRecord::from(r)).map_err(|e| err(&e))?);
            }
        } else {
            for key in sm.state.take_dirty() {
                let k = keys::encode(&key);
                match sm.state.record(&key) {
                    Some(r) => batch.insert(k, encode(&StoredRecord::from(r)).map_err(|e| err(&e))?),
                    None => batch.remove(k),
                }
            }
        }
        batch.insert(keys::APPLIED, encode(&sm.last_applied).map_err(|e| err(&e))?);
        batch.insert(keys::MEMBERSHIP, encode(&sm.membership).map_err(|e| err(&e))?);
        self.inner.sm.apply_batch(batch).map_err(|e| err(&e))?;
        Ok(())
    }

    /// Builds a snapshot and saves it. Its buffer starts at the last snapshot's size plus an
    /// eighth: grown by doubling from empty, the buffer of a 2.4 MB snapshot had 4.2 MB reserved,
    /// and the bytes were copied at each doubling (heaptrack, docs/benchmarks.md).
    fn build(&self) -> SResult<Snapshot<TypeConfig>> {
        let started = std::time::Instant::now();
        let hint = self.last_snapshot_len.load(Ordering::Relaxed);
        let (data, last_log_id, last_membership, locked) = {
            let sm = self.sm.read().unwrap_or_else(|p| p.into_inner());
            let payload =
                SnapshotPayloadOf { data_version: crate::DATA_VERSION, records: RecordsOf(&sm.state) };
            let data = postcard::to_extend(&payload, Vec::with_capacity(hint + hint / 8))
                .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
            (data, sm.last_applied, sm.membership.clone(), started.elapsed())
        };
        self.last_snapshot_len.store(data.len(), Ordering::Relaxed);
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, data.len()),
            None => format!("empty-{}", data.len()),
        };
        let meta = SnapshotMeta { last_log_id, last_membership, snapshot_id };
        self.save_snapshot(&meta, &data)?;
        tracing::debug!(
            index = last_log_id.map_or(0, |l| l.index),
            bytes = data.len(),
            locked_ms = locked.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "snapshot built"
        );
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }

    fn save_snapshot(&self, meta: &SnapshotMeta<u64, BasicNode>, data: &[u8]) -> SResult<()> {
        let sig = Some(meta.signature());
        let stored = StoredSnapshotOf { meta, data };
        // Exactly as large as it will be: the metadata, the length, the snapshot's bytes.
        let size = postcard::experimental::serialized_size(&stored)
            .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        let b = postcard::to_extend(&stored, Vec::with_capacity(size))
            .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        self.inner
            .snap
            .insert(SNAP_CURRENT, b)
            .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        // Durable before the log may be purged up to it.
        self.inner.flush().map_err(|e| StorageIOError::write_snapshot(sig, &e))?;
        Ok(())
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
        let (applied, responses) = {
            let mut guard = self.write_lock();
            let sm = &mut *guard;
            let mut out = Vec::new();
            for e in entries {
                sm.last_applied = Some(e.log_id);
                let r = match e.payload {
                    EntryPayload::Blank => Vec::new(),
                    EntryPayload::Normal(req) => {
                        let req = portmesh_core::Request::from(req);
                        let index = e.log_id.index;
                        let mut rs = Vec::with_capacity(req.commands.len());
                        for (seq, cmd) in req.commands.iter().enumerate() {
                            let ctx = ApplyCtx { now_ms: req.time_ms, index, seq: seq as u32 };
                            rs.push(sm.state.apply(ctx, cmd));
                        }
                        self.inner.stats.commands_applied.fetch_add(rs.len() as u64, Ordering::Relaxed);
                        rs
                    }
                    EntryPayload::Membership(m) => {
                        sm.membership = StoredMembership::new(Some(e.log_id), m);
                        Vec::new()
                    }
                };
                out.push(r);
                // One sled batch per entry, not per call: a follower catching up is handed
                // thousands of entries at once, and one batch of all their records kept every
                // page version it rewrote alive until the batch ended (~100 MB at 30,000
                // allocations; docs/benchmarks.md, memory). Each batch still carries the applied
                // id of its entry, so data and `applied` never disagree.
                self.persist(sm, false)?;
            }
            (sm.last_applied.map_or(0, |l| l.index), out)
        };
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
        let sig = Some(meta.signature());
        let data = snapshot.into_inner();
        let payload: SnapshotPayload =
            decode(&data).map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;
        if !(crate::OLDEST_READABLE_VERSION..=crate::DATA_VERSION).contains(&payload.data_version) {
            let e = std::io::Error::other(format!(
                "snapshot has data version {}, this build reads versions {} to {}",
                payload.data_version,
                crate::OLDEST_READABLE_VERSION,
                crate::DATA_VERSION
            ));
            return Err(StorageIOError::read_snapshot(sig, &e).into());
        }
        let index = {
            let mut guard = self.write_lock();
            let sm = &mut *guard;
            sm.state = State::from_records(payload.records.into_iter().map(Into::into));
            sm.last_applied = meta.last_log_id;
            sm.membership = meta.last_membership.clone();
            self.persist(sm, true)?;
            sm.last_applied.map_or(0, |l| l.index)
        };
        self.save_snapshot(meta, &data)?;
        self.applied_tx.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<TypeConfig>>> {
        let Some(b) =
            self.inner.snap.get(SNAP_CURRENT).map_err(|e| StorageIOError::read_snapshot(None, &e))?
        else {
            return Ok(None);
        };
        let s: StoredSnapshot = decode(&b).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(Some(Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::RaftSnapshotBuilder;
    use openraft::storage::RaftStateMachine;
    use tempfile::TempDir;

    use super::*;
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
    }
}
