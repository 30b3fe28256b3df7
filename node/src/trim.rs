//! Freed heap handed back to the system, every few seconds.
//!
//! glibc's allocator keeps memory that was freed in the middle of its heaps (one per thread that
//! allocated, up to eight per core) for reuse, and returns it only when the top of a heap is free.
//! A node's bursts (a snapshot, a purge, a follower catching up, a fill by many clients) free
//! most of what they took, yet the pages stayed resident: after a fill, a node held tens of MB
//! more than its live heap (docs/benchmarks.md, "Memory per allocation, sixth slice").
//! `malloc_trim(0)` releases the free pages of every heap (`madvise(MADV_DONTNEED)`), walking
//! their free lists. Once every 5 s it cost nothing measurable: the members' CPU while keeping
//! 100,000 leases alive was 255–263 ms/s with it and 284–292 ms/s without (same runs).
//!
//! A node process also keeps to one heap ([`configure_allocator`]): with a heap per thread, a
//! node keeping 100,000 leases had its live data spread over two 24 MB heaps, each with its own
//! free holes.

use std::time::Duration;

use tokio::sync::watch;

/// How often freed memory is handed back.
const EVERY: Duration = Duration::from_secs(5);

/// Runs until shutdown.
pub(crate) async fn run(mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        // Off the async workers: it takes each heap's lock in turn.
        let _ = tokio::task::spawn_blocking(release).await;
    }
}

/// Large allocations of at least this size get pages of their own, returned when freed.
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Sets the allocator up for a long-running node, unless the environment already says
/// otherwise (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`). Called before the node's threads
/// start: a thread keeps the heap it first allocated from.
/// - One heap (glibc's `M_ARENA_MAX` of 1). 3 nodes keeping 100,000 leases alive, 60 s,
///   alternating: peak RSS of the busiest member 59–65 MB instead of 68–71 MB; allocations at 64
///   clients unchanged within the noise (docs/benchmarks.md, seventh slice).
/// - A fixed mmap threshold of 128 KiB. glibc starts there but raises it to the size of any
///   large block freed, up to 32 MiB, after which the node's periodic large buffers (a
///   checkpoint's list of renewed leases, sled's write buffers) come from the heap and leave
///   holes that stay resident until the next trim. Fixed, they are mapped and unmapped whole
///   (docs/benchmarks.md, twelfth slice).
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of the allocator, under its lock.
    unsafe {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}

/// Returns the free pages of every heap to the system.
fn release() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only reads and updates the allocator's own state under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}
