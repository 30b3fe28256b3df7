#![cfg_attr(not(test), deny(unused_crate_dependencies))]
// openraft's `StorageError` is large, and its trait signatures require it: boxing it here would
// only move the cost.
#![allow(clippy::result_large_err)]

//! Storage: the only crate that touches sled.
//!
//! Owns the on-disk layout (see `docs/architecture.md`, "Store"), the persisted encoding of every
//! data version ([`ondisk`]: what the log, the records and snapshots hold, converted to and from
//! core's domain types), the openraft type configuration,
//! the Raft log ([`LogStore`], a [`openraft::storage::RaftLogStorage`]) and the state machine
//! store ([`StateMachineStore`], a [`openraft::storage::RaftStateMachine`]) with its snapshots.
//! Does not own: what commands mean (that is `portmesh-core`), networking or timers.
//!
//! Durability rules:
//! - log entries and votes are flushed (fsync) before openraft is told they are written;
//! - applying an entry writes nothing: the state is the current snapshot plus the committed log
//!   after it (`sm_store`);
//! - a snapshot is durable (its file fsynced, renamed over the current one, the directory
//!   fsynced) before openraft is told it exists, so before the log is purged up to it
//!   (`snapshot_file`);
//! - a data-version header guards every directory; unknown versions are refused.
//!
//! Error tree:
//! ```text
//! StoreError            opening a directory (version, lock, corruption), before Raft runs
//! openraft::StorageError  any I/O failure once Raft runs: fatal for the node, by design
//! ```

mod flusher;
mod keys;
mod log_store;
pub mod ondisk;
mod sm_store;
mod snapshot_file;
mod watermark;
pub use watermark::WATERMARK_FILE;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use log_store::LogStore;
pub use sm_store::{SmState, StateMachineStore, StateReader};

openraft::declare_raft_types!(
    /// The openraft type configuration of portmesh.
    pub TypeConfig:
        D = ondisk::LogRequest,
        R = Vec<portmesh_core::Response>,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = tokio::fs::File,
);

/// The data version this build writes. Version 2 (0.2.0) added holders to allocations,
/// conflicts and allocation commands, and the service registry; version 3 added tokens (new
/// record and command variants only: a version 2 directory loads unchanged, and a build that
/// knows only version 2 refuses a version 3 directory instead of failing on a token record);
/// version 4 added the lease clock (a new `Meta` record and checkpoint command; the old ones
/// still load, with the clock at 0); version 5 added registrations inside allocations (a new
/// allocation command; the old one still loads); version 6 keeps the state in snapshots and the
/// log only (the `sm` tree of an older directory is folded into a snapshot when it is opened,
/// and a build that knows only version 5 refuses it instead of loading an empty state); version
/// 7 keeps the current snapshot in a file of its own, `DATA/snapshot` (an older directory's is
/// moved there from sled when it is opened, and a build that knows only version 6 refuses it
/// instead of missing the snapshot); version 8 added the ranges known busy to allocations' probes
/// (a new allocation command; the old one still loads). See `ondisk` for the table.
pub const DATA_VERSION: u32 = 8;
/// The oldest data version this build reads: directories of versions 1 (0.1.0) and 2 are
/// upgraded in place when opened (version 1 records and log entries load through `ondisk::v1`).
pub const OLDEST_READABLE_VERSION: u32 = 1;

/// Errors opening a data directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "data directory {dir} holds portmesh data version {found}, this build reads versions {OLDEST_READABLE_VERSION} to {supported}: \
         run a portmesh release that knows version {found}, or move the directory away to start afresh"
    )]
    UnsupportedVersion { dir: PathBuf, found: String, supported: u32 },
    #[error(
        "cannot open data directory {dir}: {source} (is another portmesh node using it? only one process may \
         open a data directory at a time)"
    )]
    Open { dir: PathBuf, source: sled::Error },
    #[error("data directory {dir} is damaged: {what}")]
    Corrupt { dir: PathBuf, what: String },
    /// sled opened the directory with less than it once made durable (see `watermark`).
    #[error(
        "data directory {dir} is damaged: {why}. Serving it would \
         hand out ports and revisions twice. A member of a cluster: move the directory aside, `portmesh leave --id N` \
         the old node and join a fresh one (it catches up from the others). A single node: restore a backup. If this \
         is a backup you restored on purpose, delete {dir}/watermark"
    )]
    Damaged { dir: PathBuf, why: String },
    #[error("cannot open the watermark of data directory {dir}: {source}")]
    Watermark { dir: PathBuf, source: std::io::Error },
    #[error("I/O error on data directory {dir}: {source}")]
    Io { dir: PathBuf, source: sled::Error },
    #[error("cannot start the log flusher thread for {dir}: {source}")]
    Thread { dir: PathBuf, source: std::io::Error },
}

/// Tunables of the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// sled's page cache in bytes. sled defaults to 1 GiB and the RSS grows toward it: cap it.
    /// 4 MiB: reads are served from the in-memory state, so sled is read only at start-up and
    /// for recent log entries (16 MiB cost 4 MB more RSS at 20,000 allocations and 6 MB at
    /// 100,000 leases, with no throughput to show for it: docs/benchmarks.md).
    pub cache_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { cache_bytes: 4 * 1024 * 1024 }
    }
}

/// Counters of durable writes, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Flushes (each an fsync) made for log appends and votes.
    pub flushes: AtomicU64,
    /// Log entries made durable by those flushes.
    pub entries_flushed: AtomicU64,
    /// Commands applied to the state machine (an entry carries one or more).
    pub commands_applied: AtomicU64,
    /// Bytes of log entries appended since this store was opened.
    pub log_bytes: AtomicU64,
    /// `log_bytes` when the current snapshot was started or installed (0 until one was).
    pub log_bytes_at_snapshot: AtomicU64,
}

impl StoreStats {
    /// Bytes of log entries appended since the current snapshot was started (or this store was
    /// opened): what a snapshot would let the log purge.
    pub fn log_bytes_since_snapshot(&self) -> u64 {
        self.log_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(self.log_bytes_at_snapshot.load(Ordering::Relaxed))
    }

    /// Records that a snapshot covers the log appended so far.
    pub(crate) fn snapshot_taken(&self) {
        self.log_bytes_at_snapshot.store(self.log_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Mean log entries per flush so far.
    pub fn entries_per_flush(&self) -> f64 {
        let f = self.flushes.load(Ordering::Relaxed);
        if f == 0 { 0.0 } else { self.entries_flushed.load(Ordering::Relaxed) as f64 / f as f64 }
    }
}

/// One open data directory: the shared handle behind the log and state-machine stores.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) dir: PathBuf,
    pub(crate) db: sled::Db,
    /// Node identity, data version, vote, committed and purged log ids.
    pub(crate) meta: sled::Tree,
    /// Raft log: big-endian index -> entry.
    pub(crate) log: sled::Tree,
    /// Data versions up to 5 only: state machine records plus `!applied` and `!membership`,
    /// folded into a snapshot when such a directory is opened (empty since).
    pub(crate) sm: sled::Tree,
    /// Data versions up to 6 only: the current snapshot, moved to [`Inner::snapshots`] when such
    /// a directory is opened (empty since).
    pub(crate) snap: sled::Tree,
    /// The current snapshot's file (`DATA/snapshot`).
    pub(crate) snapshots: snapshot_file::Snapshots,
    pub(crate) stats: Arc<StoreStats>,
    pub(crate) flusher: flusher::Flusher,
    /// What this directory had made durable (see `watermark`).
    pub(crate) watermark: Arc<watermark::Watermark>,
    /// Told of every batch of entries appended to the log (see [`Store::on_append`]).
    pub(crate) on_append: std::sync::OnceLock<AppendHook>,
    /// Declared last so that it drops after every sled handle above (see [`Released`]).
    released: Released,
}

/// What [`Store::on_append`] calls with every batch of entries written to the log, before their
/// flush.
pub type AppendFn = dyn Fn(&[openraft::Entry<TypeConfig>]) + Send + Sync;

pub(crate) struct AppendHook(Box<AppendFn>);

impl std::fmt::Debug for AppendHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppendHook")
    }
}

/// Waits, when the store is dropped, until sled's lock on the directory is free, so that a
/// dropped store can be opened again at once in the same process (a restart, a test).
///
/// sled's background writer keeps a reference to the open database file for a moment after the
/// flush that waited for it has returned; the file (and its `flock`) is closed only when that
/// task ends. Seen in CI under load: a reopen right after a drop failed with "could not acquire
/// lock". Polling `flock` is the only way to observe that release; it is bounded.
///
/// Once the lock is free it tells [`Store::closed`]'s waiters.
#[derive(Debug)]
struct Released {
    lock_file: PathBuf,
    closed: tokio::sync::watch::Sender<bool>,
}

impl Drop for Released {
    fn drop(&mut self) {
        self.wait_for_lock();
        self.closed.send_replace(true);
    }
}

impl Released {
    fn wait_for_lock(&self) {
        const PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);
        let Ok(file) = std::fs::File::open(&self.lock_file) else { return };
        let start = std::time::Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return,
                Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < PATIENCE => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => {
                    tracing::warn!(file = %self.lock_file.display(), error = %e,
                        "could not confirm that the data directory's lock was released on closing it");
                    return;
                }
            }
        }
    }
}

const META_VERSION: &[u8] = b"data_version";
pub(crate) const META_NODE_ID: &[u8] = b"node_id";
const META_CLUSTER_ID: &[u8] = b"cluster_id";

/// Runs `f`, turning a panic into [`StoreError::Damaged`]. sled 0.34 panics (an `unwrap` while
/// re-encoding its recovered page table) on some damaged files instead of returning an error; a
/// node must refuse such a directory with a message, not crash with a backtrace. The default
/// panic hook has printed the panic by then; what follows is the message that says what to do.
fn unpanicked<T>(dir: &Path, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        let what: String = what.chars().take(200).collect();
        Err(StoreError::Damaged { dir: dir.to_path_buf(), why: format!("sled failed reading it ({what})") })
    })
}

/// A directory its watermark says held more than it does now: `why` names what went back.
pub(crate) fn damaged_by_watermark(dir: &Path, why: String) -> StoreError {
    let why = format!("{why} (its watermark, {}, says what it held)", dir.join(WATERMARK_FILE).display());
    StoreError::Damaged { dir: dir.to_path_buf(), why }
}

impl Inner {
    /// Makes everything written so far durable (one fsync) and records the watermark of it.
    pub(crate) fn flush(&self) -> Result<(), sled::Error> {
        self.watermark.flush()
    }

    /// The node id recorded in this directory, if any.
    pub(crate) fn node_id(&self) -> Result<Option<u64>, StoreError> {
        let v =
            self.meta.get(META_NODE_ID).map_err(|source| StoreError::Io { dir: self.dir.clone(), source })?;
        match v {
            None => Ok(None),
            Some(b) => match <[u8; 8]>::try_from(b.as_ref()) {
                Ok(b) => Ok(Some(u64::from_be_bytes(b))),
                Err(_) => Err(StoreError::Corrupt { dir: self.dir.clone(), what: "node id".into() }),
            },
        }
    }
}

impl Store {
    /// Opens (creating if needed) the data directory `dir`.
    pub fn open(dir: &Path, opts: &StoreOptions) -> Result<Store, StoreError> {
        unpanicked(dir, || Store::open_unguarded(dir, opts))
    }

    fn open_unguarded(dir: &Path, opts: &StoreOptions) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(dir.join("sled"))
            .cache_capacity(opts.cache_bytes)
            // Durability is explicit: the log store flushes before acknowledging.
            .flush_every_ms(None)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(|source| StoreError::Open { dir: dir.to_path_buf(), source })?;
        let io = |source| StoreError::Io { dir: dir.to_path_buf(), source };
        let tree = |name: &str| db.open_tree(name).map_err(io);
        let stats = Arc::new(StoreStats::default());
        let (meta, sm) = (tree("meta")?, tree("sm")?);
        // sled's one data file (the `db` file it also locks), synced after each of its flushes.
        let sled_file =
            std::fs::File::open(dir.join("sled").join("db")).map_err(|source| io(source.into()))?;
        let watermark = watermark::Watermark::open(dir, db.clone(), Some(sled_file), meta.clone())
            .map_err(|source| StoreError::Watermark { dir: dir.to_path_buf(), source })?;
        if let Some(why) = watermark.kept().and_then(|k| k.behind(&watermark::Mark::of(&meta, 0))) {
            return Err(damaged_by_watermark(dir, why));
        }
        let watermark = Arc::new(watermark);
        let inner = Inner {
            flusher: flusher::Flusher::start(stats.clone(), watermark.clone())
                .map_err(|source| StoreError::Thread { dir: dir.to_path_buf(), source })?,
            dir: dir.to_path_buf(),
            meta,
            log: tree("log")?,
            sm,
            snap: tree("snap")?,
            snapshots: snapshot_file::Snapshots::new(dir),
            db,
            stats,
            watermark,
            on_append: std::sync::OnceLock::new(),
            released: Released {
                lock_file: dir.join("sled").join("db"),
                closed: tokio::sync::watch::Sender::new(false),
            },
        };
        let readable = |v: &[u8]| {
            <[u8; 4]>::try_from(v)
                .ok()
                .map(u32::from_be_bytes)
                .filter(|n| (OLDEST_READABLE_VERSION..=DATA_VERSION).contains(n))
        };
        match inner.meta.get(META_VERSION).map_err(io)? {
            Some(v) if v.as_ref() == DATA_VERSION.to_be_bytes() => {}
            Some(v) if let Some(old) = readable(v.as_ref()) => {
                tracing::info!(dir = %dir.display(), from = old, to = DATA_VERSION, "upgrading the data directory");
                sm_store::move_snapshot_out_of_sled(&inner)?;
                sm_store::fold_records_into_snapshot(&inner)?;
                inner.meta.insert(META_VERSION, &DATA_VERSION.to_be_bytes()).map_err(io)?;
                inner.flush().map_err(io)?;
            }
            Some(v) => {
                let found = match <[u8; 4]>::try_from(v.as_ref()) {
                    Ok(b) => u32::from_be_bytes(b).to_string(),
                    Err(_) => format!("{:?} (unreadable)", v.as_ref()),
                };
                return Err(StoreError::UnsupportedVersion {
                    dir: dir.to_path_buf(),
                    found,
                    supported: DATA_VERSION,
                });
            }
            None => {
                let empty = inner.log.is_empty() && inner.sm.is_empty() && inner.meta.is_empty();
                if !empty {
                    return Err(StoreError::UnsupportedVersion {
                        dir: dir.to_path_buf(),
                        found: "none (no version header)".into(),
                        supported: DATA_VERSION,
                    });
                }
                inner.meta.insert(META_VERSION, &DATA_VERSION.to_be_bytes()).map_err(io)?;
                inner.flush().map_err(io)?;
            }
        }
        let removed = inner.snapshots.remove_leftovers().map_err(|source| io(source.into()))?;
        if !removed.is_empty() {
            tracing::info!(dir = %dir.display(), files = ?removed, "removed snapshot files a crash left half written");
        }
        Ok(Store { inner: Arc::new(inner) })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Resolves once this directory is closed: every handle to the store dropped and sled's lock
    /// on the directory released, so that it can be opened again. The future holds no handle.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.released.closed.subscribe();
        async move {
            // An error means the sender is gone, which happens only after it said `true`.
            let _ = rx.wait_for(|closed| *closed).await;
        }
    }

    /// The node id recorded in this directory, if any.
    pub fn node_id(&self) -> Result<Option<u64>, StoreError> {
        self.inner.node_id()
    }

    /// Records this directory's node id, durably.
    pub fn set_node_id(&self, id: u64) -> Result<(), StoreError> {
        self.inner.meta.insert(META_NODE_ID, &id.to_be_bytes()).map_err(|source| self.io(source))?;
        self.inner.flush().map_err(|source| self.io(source))?;
        Ok(())
    }

    /// The id of the cluster this directory's data belongs to, if it belongs to one.
    pub fn cluster_id(&self) -> Result<Option<String>, StoreError> {
        let v = self.inner.meta.get(META_CLUSTER_ID).map_err(|source| self.io(source))?;
        match v {
            None => Ok(None),
            Some(b) => String::from_utf8(b.to_vec())
                .map(Some)
                .map_err(|_| StoreError::Corrupt { dir: self.inner.dir.clone(), what: "cluster id".into() }),
        }
    }

    /// Records the cluster this directory's data belongs to, durably.
    pub fn set_cluster_id(&self, id: &str) -> Result<(), StoreError> {
        self.inner.meta.insert(META_CLUSTER_ID, id.as_bytes()).map_err(|source| self.io(source))?;
        self.inner.flush().map_err(|source| self.io(source))?;
        Ok(())
    }

    fn io(&self, source: sled::Error) -> StoreError {
        StoreError::Io { dir: self.inner.dir.clone(), source }
    }

    /// The Raft log half.
    pub fn log_store(&self) -> LogStore {
        LogStore::new(self.inner.clone())
    }

    /// The state-machine half, loaded from disk.
    pub fn state_machine(&self) -> Result<StateMachineStore, StoreError> {
        unpanicked(&self.inner.dir, || StateMachineStore::load(self.inner.clone()))
    }

    pub fn stats(&self) -> &StoreStats {
        &self.inner.stats
    }

    /// Bytes the data directory occupies on disk: sled's files and the current snapshot.
    pub fn size_on_disk(&self) -> u64 {
        let snapshot =
            std::fs::metadata(self.inner.snapshots.path(snapshot_file::FILE)).map_or(0, |m| m.len());
        self.inner.db.size_on_disk().unwrap_or(0) + snapshot
    }

    /// Flushes everything to disk (used at shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().map_err(|source| self.io(source))
    }

    /// Calls `f` with every batch of entries the Raft log appends, once they are written and
    /// before their flush starts (the leader sends them to its followers meanwhile: see
    /// `portmesh_raft`'s early replication). Only the first hook set takes effect.
    pub fn on_append(&self, f: Box<AppendFn>) {
        let _ = self.inner.on_append.set(AppendHook(f));
    }

    /// Test hook: every blocking flush (the Raft log's flusher thread, a snapshot's) takes
    /// `delay` longer, as on a slow disk (`Duration::ZERO` ends it).
    #[doc(hidden)]
    pub fn inject_flush_delay(&self, delay: std::time::Duration) {
        self.inner.watermark.delay_flushes(delay);
    }

    /// Test hook: while `on`, every flush (the Raft log's, the vote's, a snapshot's) fails with an
    /// I/O error, as on a disk that died; nothing is written to the watermark meanwhile. Always
    /// compiled (a cargo feature would give the test build other dependencies than the binary
    /// the Python package's test builds, and rebuild half the workspace); nothing else calls it.
    #[doc(hidden)]
    pub fn inject_flush_failures(&self, on: bool) {
        self.inner.watermark.fail_flushes(on);
    }
}

#[cfg(test)]
mod tests;
