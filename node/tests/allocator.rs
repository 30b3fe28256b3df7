//! `configure_allocator`, in a process of its own and without the test harness: glibc's heap
//! settings belong to the process, and a thread keeps the heap it first allocated from, so the
//! settings must come before any other thread allocates (as `serve` calls it).

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() || std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
    {
        println!(
            "allocator: skipped, the environment sets glibc's heap (MALLOC_ARENA_MAX / MALLOC_MMAP_THRESHOLD_)"
        );
        return;
    }
    portmesh_node::configure_allocator();
    every_thread_allocates_from_one_heap();
    a_large_block_keeps_pages_of_its_own_after_a_larger_one_is_freed();
    println!("allocator: 2 checks passed");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    println!("allocator: glibc only");
}

/// Threads that allocate do not get heaps of their own (glibc would give each a new one).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn every_thread_allocates_from_one_heap() {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let held: Vec<Box<[u64; 8]>> = (0..1_000).map(|i| Box::new([t + i; 8])).collect();
                std::hint::black_box(held).len()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("an allocating thread"), 1_000);
    }
    let info = malloc_info();
    let heaps = info.matches("<heap nr=").count();
    assert_eq!(heaps, 1, "one heap for every thread, malloc_info says {heaps}: {info}");
}

/// A block of 128 KiB or more is mapped on its own even after a larger mapped block was freed
/// (glibc would raise its threshold to the freed block's size and serve the next from the heap).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn a_large_block_keeps_pages_of_its_own_after_a_larger_one_is_freed() {
    drop(std::hint::black_box(vec![1u8; 4 << 20]));
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let before = unsafe { libc::mallinfo2() }.hblks;
    let block = std::hint::black_box(vec![1u8; 200 * 1024]);
    // SAFETY: as above.
    let during = unsafe { libc::mallinfo2() }.hblks;
    assert_eq!(during, before + 1, "a 200 KiB block has a mapping of its own");
    drop(block);
}

/// glibc's own account of its heaps, as XML.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn malloc_info() -> String {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("malloc_info.xml");
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("a path without NUL");
    // SAFETY: the stream is opened, written by malloc_info and closed here, and used nowhere else.
    unsafe {
        let f = libc::fopen(c_path.as_ptr(), c"w".as_ptr());
        assert!(!f.is_null(), "fopen {}", path.display());
        assert_eq!(libc::malloc_info(0, f), 0, "malloc_info");
        libc::fclose(f);
    }
    std::fs::read_to_string(&path).expect("malloc_info's output")
}
