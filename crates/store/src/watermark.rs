//! The watermark: what this directory had made durable, kept beside sled (`DATA/watermark`), so
//! that a directory sled opens with less than it once held is refused instead of served.
//!
//! sled checks its own segments and, finding a damaged one, recovers up to the last good write:
//! a flipped byte or a truncated file comes back as an *older* state, with no error. Served, that
//! state hands out ports already handed out and revisions already used (fencing tokens twice), and
//! a member whose log and vote went back can break Raft's safety. The watermark remembers four
//! numbers that never go down — the node id, the vote's term, the committed log index and the
//! applied state's revision — and [`Store::open`](crate::Store::open) compares the first three
//! with what sled holds; the state machine compares the revision once it has loaded the snapshot
//! and applied the committed log after it.
//!
//! When it is written: after every flush, from values read *before* the flush started (a flush
//! makes everything written before it durable), so it never claims more than sled holds on disk.
//! The revision is the applied state's, which never runs ahead of the committed index recorded
//! in the same flush (openraft saves the committed id before applying up to it), so the state
//! loaded from that flush has at least that revision.
//!
//! Data versions up to 5 kept the applied index where the committed index now is (the same
//! slot): the committed index read from such a directory is never below it.
//! It is not fsynced by itself: a write lost in a crash only leaves an older watermark, which
//! checks less, never wrongly. Two slots are written in turn, each with its own checksum, so a
//! write torn by a crash spoils one slot and the other still holds the previous mark.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use std::sync::atomic::{AtomicU64, Ordering};

use openraft::Vote;

use crate::log_store::decode;

/// File name inside the data directory.
pub const WATERMARK_FILE: &str = "watermark";
const MAGIC: &[u8; 4] = b"PMW1";
const SLOT: usize = 48;

/// The numbers that only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Mark {
    pub(crate) node_id: u64,
    pub(crate) term: u64,
    pub(crate) committed: u64,
    pub(crate) revision: u64,
}

impl Mark {
    fn encode(&self, seq: u64) -> [u8; SLOT] {
        let mut b = [0u8; SLOT];
        b[..4].copy_from_slice(MAGIC);
        for (i, v) in [seq, self.node_id, self.term, self.committed, self.revision].into_iter().enumerate() {
            b[4 + 8 * i..12 + 8 * i].copy_from_slice(&v.to_be_bytes());
        }
        let crc = crc32fast::hash(&b[..44]);
        b[44..].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// The mark in a slot and its sequence number, if the slot is whole.
    fn decode(b: &[u8]) -> Option<(u64, Mark)> {
        if b.len() != SLOT || &b[..4] != MAGIC || crc32fast::hash(&b[..44]).to_be_bytes() != b[44..] {
            return None;
        }
        let n = |i: usize| u64::from_be_bytes(b[4 + 8 * i..12 + 8 * i].try_into().unwrap_or([0; 8]));
        Some((n(0), Mark { node_id: n(1), term: n(2), committed: n(3), revision: n(4) }))
    }

    /// What sled holds now, with the applied state's `revision` (fields it cannot read count as
    /// 0: they then check nothing).
    pub(crate) fn of(meta: &sled::Tree, revision: u64) -> Mark {
        let get = |k: &[u8]| meta.get(k).ok().flatten();
        let node_id = get(crate::META_NODE_ID)
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        let term = get(crate::log_store::VOTE)
            .and_then(|b| decode::<Vote<u64>>(&b).ok())
            .map_or(0, |v| v.leader_id().term);
        let committed = crate::log_store::committed_in(meta).ok().flatten().map_or(0, |l| l.index);
        Mark { node_id, term, committed, revision }
    }

    /// Why `held` (what sled holds) is less than this mark, if it is: its node id, committed
    /// log index or term. The revision is checked apart ([`Mark::state_behind`]): it is known only
    /// once the state is loaded.
    pub(crate) fn behind(&self, held: &Mark) -> Option<String> {
        if self.node_id != 0 && held.node_id != self.node_id {
            return Some(if held.node_id == 0 {
                format!("it no longer holds its node id (node {} wrote it)", self.node_id)
            } else {
                format!("it holds node id {}, but node {} wrote it", held.node_id, self.node_id)
            });
        }
        went_back("committed log index", held.committed, self.committed)
            .or_else(|| went_back("Raft term (its vote)", held.term, self.term))
    }

    /// Why a loaded state of `revision` is older than this mark, if it is.
    pub(crate) fn state_behind(&self, revision: u64) -> Option<String> {
        went_back("state revision", revision, self.revision)
    }
}

fn went_back(what: &str, held: u64, kept: u64) -> Option<String> {
    (held < kept).then(|| format!("its {what} went back from {kept} to {held}"))
}

/// The watermark file of an open data directory, and the one way the store makes its writes
/// durable: [`Watermark::flush`] (or `flush_async`) reads the mark, flushes sled and syncs its
/// file, records the mark.
#[derive(Debug)]
pub(crate) struct Watermark {
    file: Mutex<(File, u64)>,
    /// sled's data file, synced after every sled flush: on Linux sled 0.34 makes a flush durable
    /// with `sync_file_range` alone, which writes the pages out but neither flushes the device's
    /// write cache nor records a grown file's size (architecture.md §2). `None` for a temporary
    /// sled (tests).
    sled_file: Option<Arc<File>>,
    /// The mark the file held when it was opened.
    kept: Option<Mark>,
    /// The revision of the state applied so far (see [`Watermark::applied`]).
    revision: AtomicU64,
    db: sled::Db,
    meta: sled::Tree,
    /// Test hook (`Store::inject_flush_failures`): every flush fails as a dead disk's would.
    failing: std::sync::atomic::AtomicBool,
    /// Test hook (`Store::inject_flush_delay`): milliseconds added to every blocking flush.
    delay_ms: AtomicU64,
}

impl Watermark {
    /// Opens (creating if needed) `dir`'s watermark and reads the last mark it holds, if any
    /// ([`Watermark::kept`]).
    pub(crate) fn open(
        dir: &Path,
        db: sled::Db,
        sled_file: Option<File>,
        meta: sled::Tree,
    ) -> io::Result<Watermark> {
        let path = dir.join(WATERMARK_FILE);
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)?
        };
        let mut buf = vec![0u8; 2 * SLOT];
        let n = file.read_at(&mut buf, 0)?;
        buf.truncate(n);
        let last = buf.chunks(SLOT).filter_map(Mark::decode).max_by_key(|(seq, _)| *seq);
        if last.is_none() && n > 0 {
            tracing::warn!(file = %path.display(), "the watermark file holds no whole mark; it checks nothing this time");
        }
        let seq = last.map_or(0, |(s, _)| s);
        let failing = std::sync::atomic::AtomicBool::new(false);
        let kept = last.map(|(_, m)| m);
        Ok(Watermark {
            file: Mutex::new((file, seq)),
            sled_file: sled_file.map(Arc::new),
            kept,
            revision: AtomicU64::new(0),
            db,
            meta,
            failing,
            delay_ms: AtomicU64::new(0),
        })
    }

    /// The mark the file held when it was opened, if any.
    pub(crate) fn kept(&self) -> Option<Mark> {
        self.kept
    }

    /// Why a loaded state of `revision` is older than the kept mark, if it is.
    pub(crate) fn state_behind(&self, revision: u64) -> Option<String> {
        self.kept.and_then(|k| k.state_behind(revision))
    }

    /// The state machine has applied up to a state of `revision` (recorded with the next flush).
    pub(crate) fn applied(&self, revision: u64) {
        self.revision.fetch_max(revision, Ordering::Relaxed);
    }

    /// Makes everything written to sled so far durable (one fsync) and records the mark of it.
    pub(crate) fn flush(&self) -> Result<(), sled::Error> {
        let delay = self.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay));
        }
        let mark = self.current()?;
        self.db.flush()?;
        self.sync_sled_file()?;
        self.record(mark);
        Ok(())
    }

    /// `fdatasync` of sled's file, after a sled flush wrote (and `sync_file_range`d) its pages.
    fn sync_sled_file(&self) -> Result<(), sled::Error> {
        self.sled_file.as_ref().map_or(Ok(()), |f| f.sync_data().map_err(sled::Error::Io))
    }

    /// [`Watermark::flush`] without blocking the runtime's thread.
    pub(crate) async fn flush_async(&self) -> Result<(), sled::Error> {
        let mark = self.current()?;
        self.db.flush_async().await?;
        if let Some(f) = self.sled_file.clone() {
            tokio::task::spawn_blocking(move || f.sync_data())
                .await
                .map_err(|e| sled::Error::Io(io::Error::other(e)))?
                .map_err(sled::Error::Io)?;
        }
        self.record(mark);
        Ok(())
    }

    /// Turns the injected flush failure on or off (see `Store::inject_flush_failures`).
    pub(crate) fn fail_flushes(&self, on: bool) {
        self.failing.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets the injected delay of every blocking flush (see `Store::inject_flush_delay`).
    pub(crate) fn delay_flushes(&self, delay: std::time::Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// An error while the test hook injects flush failures (see `Store::inject_flush_failures`).
    pub(crate) fn injected_failure(&self) -> io::Result<()> {
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(io::Error::other("injected storage failure (test hook)"));
        }
        Ok(())
    }

    /// What sled holds now: read before a flush, recorded after it. Fails while the test hook
    /// injects flush failures.
    fn current(&self) -> Result<Mark, sled::Error> {
        self.injected_failure().map_err(sled::Error::Io)?;
        // The revision first: the committed id behind it was written before it was applied.
        let revision = self.revision.load(Ordering::Relaxed);
        Ok(Mark::of(&self.meta, revision))
    }

    /// Records `mark` (read before a flush that has now completed) in the next slot.
    fn record(&self, mark: Mark) {
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let (file, seq) = &mut *guard;
        *seq += 1;
        let slot = (*seq % 2) * SLOT as u64;
        if let Err(e) = file.write_all_at(&mark.encode(*seq), slot) {
            // Only the check at the next start is weaker; the data itself is unharmed.
            tracing::warn!(error = %e, "cannot write the watermark");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_round_trip_and_a_torn_slot_is_ignored() {
        let m = Mark { node_id: 7, term: 3, committed: 120, revision: 40 };
        let b = m.encode(9);
        assert_eq!(Mark::decode(&b), Some((9, m)));
        for i in [0, 5, 20, 47] {
            let mut torn = b;
            torn[i] ^= 0x40;
            assert_eq!(Mark::decode(&torn), None, "byte {i}");
        }
        assert_eq!(Mark::decode(&b[..40]), None);
    }

    #[test]
    fn behind_names_what_went_back() {
        let kept = Mark { node_id: 7, term: 3, committed: 120, revision: 40 };
        assert_eq!(kept.behind(&kept), None);
        assert_eq!(kept.behind(&Mark { term: 5, committed: 130, revision: 41, ..kept }), None);
        assert_eq!(kept.state_behind(40), None);
        assert_eq!(kept.state_behind(16).unwrap(), "its state revision went back from 40 to 16");
        let e = kept.behind(&Mark { committed: 100, ..kept }).unwrap();
        assert_eq!(e, "its committed log index went back from 120 to 100");
        assert!(kept.behind(&Mark { term: 2, ..kept }).unwrap().contains("term"));
        assert!(kept.behind(&Mark::default()).unwrap().contains("no longer holds its node id"));
        assert!(Mark::default().behind(&kept).is_none(), "an empty mark checks nothing");
    }

    #[test]
    fn the_newest_whole_slot_wins() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let meta = db.open_tree("meta").unwrap();
        let w = Watermark::open(dir.path(), db.clone(), None, meta.clone()).unwrap();
        assert_eq!(w.kept(), None);
        let (a, b) = (Mark { revision: 1, ..Mark::default() }, Mark { revision: 2, ..Mark::default() });
        w.record(a);
        w.record(b);
        drop(w);
        assert_eq!(Watermark::open(dir.path(), db.clone(), None, meta.clone()).unwrap().kept(), Some(b));
        // The newer slot torn: the older one stands.
        let f = std::fs::OpenOptions::new().write(true).open(dir.path().join(WATERMARK_FILE)).unwrap();
        f.write_all_at(&[0xff; 8], 0).unwrap();
        assert_eq!(Watermark::open(dir.path(), db.clone(), None, meta).unwrap().kept(), Some(a));
    }
}
