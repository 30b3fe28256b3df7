//! The state machine: `portmesh_core::State` in memory, made durable by the Raft log and the
//! current snapshot (`DATA/snapshot`, see `snapshot_file`) alone.
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

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use portmesh_core::{ApplyCtx, Response, State};
use serde::Deserialize;
use tokio::sync::watch;

use crate::log_store::decode;
use crate::snapshot_file::{self, Meta, RecordsOf, SnapshotPayload, SnapshotPayloadOf};
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

/// A snapshot as data versions up to 6 kept it, in sled's `snap` tree: its metadata and the
/// bytes of its payload. Read only to move it into the snapshot file.
#[derive(Debug, Deserialize)]
struct StoredSnapshot {
    meta: Meta,
    data: Vec<u8>,
}

/// Its key in the `snap` tree.
const SNAP_CURRENT: &[u8] = b"current";

/// The state-machine half of the store.
#[derive(Debug, Clone)]
pub struct StateMachineStore {
    inner: Arc<Inner>,
    sm: Arc<RwLock<SmState>>,
    applied_tx: Arc<watch::Sender<u64>>,
}

impl StateMachineStore {
    /// The state of the current snapshot with every committed log entry after it applied.
    /// Refuses a directory whose log lacks a committed entry, or whose state comes back with a
    /// lower revision than its watermark recorded (see `watermark`).
    pub(crate) fn load(inner: Arc<Inner>) -> Result<Self, StoreError> {
        let corrupt = |what: String| StoreError::Corrupt { dir: inner.dir.clone(), what };
        let mut sm = match inner.snapshots.read_current().map_err(|e| snapshot_damaged(&inner, e))? {
            Some(loaded) => {
                // Written by a build that knows a newer version: not damage, and the way out is
                // that build, as for the directory's own header.
                if !readable(loaded.payload.data_version) {
                    return Err(StoreError::UnsupportedVersion {
                        dir: inner.dir.clone(),
                        found: loaded.payload.data_version.to_string(),
                        supported: crate::DATA_VERSION,
                    });
                }
                SmState {
                    state: State::from_records(loaded.payload.records.into_iter().map(Into::into)),
                    last_applied: loaded.meta.last_log_id,
                    membership: loaded.meta.last_membership,
                }
            }
            None => SmState { state: State::new(), last_applied: None, membership: Membership::default() },
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
                // The log the snapshot does not cover yet counts toward the next one by bytes
                // (`compaction`), as it did before the restart.
                inner.stats.log_bytes.fetch_add(v.len() as u64, Ordering::Relaxed);
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
        Ok(Self { inner, sm: Arc::new(RwLock::new(sm)), applied_tx: Arc::new(tx) })
    }

    pub fn reader(&self) -> StateReader {
        StateReader { sm: self.sm.clone(), applied: self.applied_tx.subscribe() }
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, SmState> {
        self.sm.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds a snapshot into its file and makes it current. The state is read-locked while it
    /// is encoded into the file (page cache writes through a 64 KiB buffer); the fsyncs come after.
    fn build(&self) -> SResult<Snapshot<TypeConfig>> {
        let started = std::time::Instant::now();
        let ((meta, written), locked) = {
            let sm = self.sm.read().unwrap_or_else(|p| p.into_inner());
            self.inner.stats.snapshot_taken();
            (write_snapshot(&self.inner, &sm, snapshot_file::BUILDING)?, started.elapsed())
        };
        let len = written.len;
        let (file, _) = make_current(&self.inner, &meta, written)?;
        tracing::debug!(
            index = meta.last_log_id.map_or(0, |l| l.index),
            bytes = len,
            locked_ms = locked.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "snapshot built"
        );
        Ok(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) })
    }
}

/// A damaged or unreadable snapshot file, as the error of opening its directory.
fn snapshot_damaged(inner: &Inner, e: std::io::Error) -> StoreError {
    let file = inner.snapshots.path(snapshot_file::FILE);
    let what = format!(
        "its snapshot {} is unreadable: {e}. A member of a cluster: move the directory aside, \
         `portmesh leave --id N` the old node and join a fresh one (it catches up from the others). \
         A single node: restore a backup",
        file.display()
    );
    StoreError::Corrupt { dir: inner.dir.clone(), what }
}

/// Writes the snapshot of `sm` into the file `name`; its metadata and the written file.
fn write_snapshot(inner: &Inner, sm: &SmState, name: &str) -> SResult<(Meta, snapshot_file::Written)> {
    let snapshot_id = match sm.last_applied {
        // The same log id gives the same state on every member: the id names the content.
        Some(l) => format!("{}-{}", l.leader_id, l.index),
        None => "empty".to_string(),
    };
    let meta =
        SnapshotMeta { last_log_id: sm.last_applied, last_membership: sm.membership.clone(), snapshot_id };
    let payload = SnapshotPayloadOf { data_version: crate::DATA_VERSION, records: RecordsOf(&sm.state) };
    let written = inner
        .snapshots
        .write(name, &meta, &payload)
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
    Ok((meta, written))
}

/// Makes a written snapshot file durable and current (unless a newer one is); the file, at its
/// start, and whether it became current.
fn make_current(
    inner: &Inner,
    meta: &Meta,
    written: snapshot_file::Written,
) -> SResult<(std::fs::File, bool)> {
    inner
        .watermark
        .injected_failure()
        .and_then(|()| inner.snapshots.make_current(written, meta.last_log_id))
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e).into())
}

/// Checks the snapshot received into `file` (its checksum, its data version, that it is the one
/// `meta` names) and makes that very file durable and current, before the state it holds, which
/// is returned, replaces anything: the log before it may be gone once it is current. The bytes
/// are not written a second time, and are dropped before the state is built from the records.
fn install_received(inner: &Inner, meta: &Meta, mut file: std::fs::File) -> SResult<State> {
    let sig = Some(meta.signature());
    let read_err = |e: std::io::Error| StorageError::from(StorageIOError::read_snapshot(sig.clone(), &e));
    let write_err = |e: std::io::Error| StorageError::from(StorageIOError::write_snapshot(sig.clone(), &e));
    let bytes = snapshot_file::read_all(&mut file).map_err(read_err)?;
    let loaded = snapshot_file::decode(&bytes).map_err(read_err)?;
    check_version(&loaded.payload).map_err(read_err)?;
    if loaded.meta.last_log_id != meta.last_log_id || loaded.meta.snapshot_id != meta.snapshot_id {
        let e = std::io::Error::other(format!(
            "the file received holds snapshot {}, not {}",
            loaded.meta.snapshot_id, meta.snapshot_id
        ));
        return Err(read_err(e));
    }
    let written = match inner.snapshots.as_received(file, bytes.len() as u64).map_err(write_err)? {
        Some(received) => received,
        // Handed some other file (openraft's storage tests hand a built snapshot): a copy.
        None => inner.snapshots.write_bytes(snapshot_file::RECEIVING, &bytes).map_err(write_err)?,
    };
    drop(bytes);
    let state = State::from_records(loaded.payload.records.into_iter().map(Into::into));
    make_current(inner, meta, written)?;
    Ok(state)
}

/// A data version this build reads.
fn readable(version: u32) -> bool {
    (crate::OLDEST_READABLE_VERSION..=crate::DATA_VERSION).contains(&version)
}

/// The payload's data version is one this build reads.
fn check_version(payload: &SnapshotPayload) -> std::io::Result<()> {
    if readable(payload.data_version) {
        return Ok(());
    }
    Err(std::io::Error::other(format!(
        "snapshot has data version {}, this build reads versions {} to {}",
        payload.data_version,
        crate::OLDEST_READABLE_VERSION,
        crate::DATA_VERSION
    )))
}

/// The last log id of the directory's current snapshot file, if it has one (checked whole).
fn current_snapshot_at(inner: &Inner) -> Result<Option<Option<LogId<u64>>>, StoreError> {
    let current = inner.snapshots.open_current().map_err(|e| snapshot_damaged(inner, e))?;
    Ok(current.map(|(meta, _)| meta.last_log_id))
}

/// Moves the snapshot of a directory written by data version 6 or older from sled's `snap` tree
/// into the snapshot file, then empties the tree. Safe to repeat after a crash midway: the file
/// is durable before the tree is touched, and a file already at (or past) it is kept.
pub(crate) fn move_snapshot_out_of_sled(inner: &Inner) -> Result<(), StoreError> {
    let io = |source| StoreError::Io { dir: inner.dir.clone(), source };
    let corrupt = |what: String| StoreError::Corrupt { dir: inner.dir.clone(), what };
    let Some(b) = inner.snap.get(SNAP_CURRENT).map_err(io)? else {
        return Ok(());
    };
    let stored: StoredSnapshot = decode(&b).map_err(|e| corrupt(format!("current snapshot: {e}")))?;
    drop(b);
    let payload: SnapshotPayload =
        decode(&stored.data).map_err(|e| corrupt(format!("current snapshot's records: {e}")))?;
    check_version(&payload).map_err(|e| corrupt(e.to_string()))?;
    if current_snapshot_at(inner)?.is_none_or(|at| at < stored.meta.last_log_id) {
        let written = inner
            .snapshots
            .write(snapshot_file::BUILDING, &stored.meta, &payload)
            .map_err(|e| corrupt(format!("moving its snapshot out of sled: {e}")))?;
        make_current(inner, &stored.meta, written)
            .map_err(|e| corrupt(format!("moving its snapshot out of sled: {e}")))?;
    }
    inner.snap.clear().map_err(io)?;
    inner.flush().map_err(io)
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
                decode::<crate::ondisk::StoredRecord>(&v)
                    .map_err(|e| corrupt(format!("state record {k:?}: {e}")))?
                    .into(),
            );
        } else if k.as_ref() == keys::APPLIED {
            last_applied = decode(&v).map_err(|e| corrupt(format!("applied log id: {e}")))?;
        } else if k.as_ref() == keys::MEMBERSHIP {
            membership = decode(&v).map_err(|e| corrupt(format!("membership: {e}")))?;
        }
    }
    if current_snapshot_at(inner)?.is_none_or(|at| at < last_applied) {
        let sm = SmState { state: State::from_records(records), last_applied, membership };
        let (meta, written) =
            write_snapshot(inner, &sm, snapshot_file::BUILDING).map_err(|e| corrupt(e.to_string()))?;
        make_current(inner, &meta, written).map_err(|e| corrupt(e.to_string()))?;
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

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<tokio::fs::File>> {
        let file = self.inner.snapshots.receiving().map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    /// Installs a snapshot the leader sent: the file it was received into is checked (its
    /// checksum, and that it is the snapshot `meta` names), made durable and renamed into place
    /// as the current snapshot, then it replaces the state. The file's reading, decoding and
    /// fsync run on a blocking thread: a snapshot of tens of thousands of allocations is
    /// megabytes, and the runtime's workers serve clients meanwhile.
    async fn install_snapshot(&mut self, meta: &Meta, snapshot: Box<tokio::fs::File>) -> SResult<()> {
        use tokio::io::AsyncWriteExt;
        let mut file = *snapshot;
        file.flush().await.map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let file = file.into_std().await;
        let (inner, want) = (self.inner.clone(), meta.clone());
        let state =
            tokio::task::spawn_blocking(move || install_received(&inner, &want, file)).await.map_err(
                |e| StorageIOError::read_snapshot(Some(meta.signature()), &std::io::Error::other(e)),
            )??;
        self.inner.stats.snapshot_taken();
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
        let current =
            self.inner.snapshots.open_current().map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(current.map(|(meta, file)| Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) }))
    }
}

#[cfg(test)]
mod tests;
