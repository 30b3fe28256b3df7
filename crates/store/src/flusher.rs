//! Group commit for the Raft log.
//!
//! openraft 0.9 hands the log store one `append` per batch it has, which under concurrent clients
//! is often a single entry. Flushing inside `append` would cost one fsync per entry. Instead,
//! `append` writes the entries to sled and submits its `LogFlushed` callback here; a dedicated
//! thread takes every callback queued so far, makes one `flush` (fsync), then completes them all.
//! Entries appended while an fsync runs share the next one.
//!
//! Correctness: a callback is submitted only after its entries were written to sled, and sled's
//! `flush` makes durable everything written before it starts, so no callback is completed before
//! its entries are durable.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use openraft::storage::LogFlushed;

use crate::{StoreStats, TypeConfig};

type Job = (LogFlushed<TypeConfig>, u64);

/// Handle to the flusher thread. Dropping it stops the thread and waits for it, so the sled
/// database (and its directory lock) is released when the store is.
#[derive(Debug)]
pub(crate) struct Flusher {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    /// Starts the flusher thread. It ends when the last `Flusher` handle is dropped.
    pub(crate) fn start(
        stats: Arc<StoreStats>,
        watermark: Arc<crate::watermark::Watermark>,
    ) -> std::io::Result<Flusher> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new().name("portmesh-log-flush".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut jobs = vec![first];
                jobs.extend(rx.try_iter());
                let res = watermark.flush();
                let entries: u64 = jobs.iter().map(|j| j.1).sum();
                stats.flushes.fetch_add(1, Ordering::Relaxed);
                stats.entries_flushed.fetch_add(entries, Ordering::Relaxed);
                for (cb, _) in jobs {
                    let r = match &res {
                        Ok(_) => Ok(()),
                        Err(e) => Err(std::io::Error::other(format!("flushing the Raft log: {e}"))),
                    };
                    cb.log_io_completed(r);
                }
            }
        })?;
        Ok(Flusher { tx: Some(tx), thread: Some(thread) })
    }

    /// Queues a callback to be completed after the next flush.
    pub(crate) fn submit(&self, callback: LogFlushed<TypeConfig>, entries: u64) {
        let sent = match &self.tx {
            Some(tx) => tx.send((callback, entries)).map_err(|mpsc::SendError((cb, _))| cb),
            None => Err(callback),
        };
        if let Err(cb) = sent {
            cb.log_io_completed(Err(std::io::Error::other("the log flusher thread has stopped")));
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
