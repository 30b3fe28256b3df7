//! A damaged data directory is never served as if it were whole. A node makes real sled files and
//! a snapshot file (allocations through gRPC, a snapshot every 100 entries, the log purged behind
//! it), stops, and copies of its directory are damaged the ways disks and people damage files: a
//! flipped byte, a truncated file, a run of garbage. Opening each copy must
//! either refuse (naming the damage) or come back with everything the node had: never an older
//! state, which would hand out ports and revisions twice.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use portmesh_client::{Client, pb};
use portmesh_node::{NodeConfig, NodeError, start};
use portmesh_store::{Store, StoreError, StoreOptions};

/// What a node held when it stopped: its revision and its allocated ports.
struct Held {
    revision: u64,
    ports: Vec<u16>,
}

async fn make_data(dir: &Path, n: usize) -> Held {
    let mut cfg = NodeConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.bootstrap = true;
    // Part of the state in the snapshot file, and the log before it gone.
    cfg.raft.snapshot_every = 100;
    cfg.raft.keep_after_snapshot = 10;
    let node = start(cfg).await.unwrap();
    let c = Client::connect(&node.grpc_addr.to_string()).await.unwrap();
    c.add_pool(pb::AddPoolRequest {
        team: "default".into(),
        name: "big".into(),
        ranges: vec![pb::PortRange { start: 40000, end: 44999 }],
    })
    .await
    .unwrap();
    for i in 0..n {
        let item = pb::AllocItem { service: format!("s{i}"), pool: "big".into(), ..Default::default() };
        c.allocate(pb::AllocateRequest { items: vec![item], ..Default::default() }).await.unwrap();
    }
    let listed = c.list(pb::ListRequest::default()).await.unwrap();
    drop(c);
    node.shutdown_handle().send_replace(true);
    node.wait().await.unwrap();
    Held { revision: listed.revision, ports: listed.allocations.iter().map(|a| a.port as u16).collect() }
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    Flip(f64),
    Truncate(f64),
    Garbage(f64),
}

fn damage(db: &Path, d: Damage) {
    let mut bytes = std::fs::read(db).unwrap();
    let at = |f: f64| ((bytes.len() as f64 * f) as usize).min(bytes.len().saturating_sub(1));
    match d {
        Damage::Flip(f) => {
            let i = at(f);
            bytes[i] ^= 0x5a;
        }
        Damage::Truncate(f) => bytes.truncate(at(f)),
        Damage::Garbage(f) => {
            let i = at(f);
            let end = (i + 4096).min(bytes.len());
            let mut x = 0x9e37_79b9_u32;
            for b in &mut bytes[i..end] {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
        }
    }
    std::fs::write(db, bytes).unwrap();
}

/// What opening a damaged copy gave: refused (with why), or the state it came back with.
enum Opened {
    Refused(String),
    Whole,
    Older { revision: u64, ports: usize },
}

fn open(dir: &Path, held: &Held) -> Opened {
    let store = match Store::open(dir, &StoreOptions::default()) {
        Ok(s) => s,
        Err(e) => return Opened::Refused(e.to_string()),
    };
    let sm = match store.state_machine() {
        Ok(sm) => sm,
        Err(e) => return Opened::Refused(e.to_string()),
    };
    let reader = sm.reader();
    let st = &reader.read().state;
    let ports = held.ports.iter().filter(|p| st.allocation(**p).is_some()).count();
    if st.revision() == held.revision && ports == held.ports.len() {
        Opened::Whole
    } else {
        Opened::Older { revision: st.revision(), ports }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_data_directory_is_refused_never_served_older() {
    let original = tempfile::tempdir().unwrap();
    let held = make_data(original.path(), 300).await;
    assert!(held.revision >= 300 && held.ports.len() == 300);

    let mut kinds = vec![
        Damage::Flip(0.05),
        Damage::Flip(0.5),
        Damage::Truncate(0.5),
        Damage::Truncate(0.1),
        Damage::Truncate(0.0),
        Damage::Garbage(0.3),
        Damage::Garbage(0.8),
    ];
    // And flips and garbage at spread offsets (a fixed sequence: the same cases every run).
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    for i in 0..48 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let f = (x % 10_000) as f64 / 10_000.0;
        kinds.push(if i % 2 == 0 { Damage::Flip(f) } else { Damage::Garbage(f) });
    }
    assert!(original.path().join("snapshot").is_file(), "the node took a snapshot");
    let (mut refused, mut whole) = (0, 0);
    for (file, d) in kinds.iter().flat_map(|d| [("sled/db", *d), ("snapshot", *d)]) {
        let copy = tempfile::tempdir().unwrap();
        portmesh_testkit::copy_dir(original.path(), copy.path());
        damage(&copy.path().join(file), d);
        match open(copy.path(), &held) {
            Opened::Refused(why) => {
                assert!(
                    why.contains("damaged") || why.contains("corrupt") || why.contains("sled"),
                    "{file} {d:?}: {why}"
                );
                refused += 1;
            }
            Opened::Whole => whole += 1,
            Opened::Older { revision, ports } => panic!(
                "{file} {d:?}: served an older state: revision {revision} of {}, {ports} of {} allocations",
                held.revision,
                held.ports.len()
            ),
        }
    }
    // A missing file.
    for gone in ["sled/db", "sled/conf", "snapshot"] {
        let copy = tempfile::tempdir().unwrap();
        portmesh_testkit::copy_dir(original.path(), copy.path());
        std::fs::remove_file(copy.path().join(gone)).unwrap();
        match open(copy.path(), &held) {
            Opened::Refused(why) => {
                // Without the snapshot, the log no longer reaches back to the start.
                assert!(gone != "snapshot" || why.contains("its log lacks entry 0"), "{why}");
                refused += 1;
            }
            Opened::Whole => whole += 1,
            Opened::Older { revision, .. } => panic!("without {gone}: served revision {revision}"),
        }
    }
    eprintln!("damaged copies: {refused} refused, {whole} came back whole");
    assert!(refused >= 5, "the named kinds of damage are noticed");

    // A node on a damaged directory does not start; the message says what went back and what to
    // do. The undamaged original still starts with everything.
    let copy = tempfile::tempdir().unwrap();
    portmesh_testkit::copy_dir(original.path(), copy.path());
    damage(&copy.path().join("sled").join("db"), Damage::Truncate(0.5));
    let mut cfg = NodeConfig::new(copy.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.bootstrap = true;
    match start(cfg).await {
        Err(NodeError::Store(e @ StoreError::Damaged { .. })) => {
            let msg = e.to_string();
            assert!(
                // Either the watermark sees the state went back, or sled cannot read what is left
                // (which one depends on where sled's pages fell); both say what to do.
                (msg.contains("went back from") || msg.contains("sled failed reading it"))
                    && msg.contains("leave --id")
                    && msg.contains("backup"),
                "{msg}"
            );
        }
        Err(other) => panic!("refused, but not as damaged: {other}"),
        Ok(_) => panic!("a node started on a directory truncated to half"),
    }
    assert!(matches!(open(original.path(), &held), Opened::Whole));
}

/// A disk that dies under a running node (injected by the store's test hook: every fsync fails):
/// the write in flight fails, the node stops itself naming the storage error instead of staying
/// "healthy", and a restart once the disk works again holds every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_disk_fails_stops_naming_it_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let held = make_data(dir.path(), 20).await;
    let mut cfg = NodeConfig::new(dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.http = Some("127.0.0.1:0".parse().unwrap());
    let node = start(cfg).await.unwrap();
    let c = Client::connect(&node.grpc_addr.to_string()).await.unwrap();
    portmesh_testkit::ready(&c).await;
    let item = || pb::AllocItem { service: "late".into(), pool: "big".into(), ..Default::default() };
    let acked = c.allocate(pb::AllocateRequest { items: vec![item()], ..Default::default() }).await.unwrap();

    node.api.node().store.inject_flush_failures(true);
    let e = c
        .allocate(pb::AllocateRequest { items: vec![item(), item()], ..Default::default() })
        .await
        .expect_err("a write on a dead disk cannot be acknowledged");
    eprintln!("the write on a dead disk: {e}");
    match node.wait().await {
        Err(NodeError::RaftStopped(why)) => {
            assert!(why.contains("injected storage failure"), "the cause is named: {why}")
        }
        other => panic!("the node must stop itself on a storage failure, not {other:?}"),
    }

    // The disk works again (a new store has no injected failure): nothing acknowledged is lost.
    let mut held = held;
    held.ports.extend(acked.allocations.iter().map(|a| a.port as u16));
    held.revision = acked.revision;
    match open(dir.path(), &held) {
        Opened::Whole => {}
        Opened::Older { revision, ports } => {
            // The refused write may have reached sled before its fsync failed: newer is fine,
            // older is not.
            assert!(revision >= held.revision && ports == held.ports.len(), "lost: {revision}, {ports}")
        }
        Opened::Refused(why) => panic!("a directory whose fsync failed is not damaged: {why}"),
    }
}

/// `wait` returns only once the data directory is closed, so whoever restarts the node (a
/// supervisor in the same process, the test above) can open it at once. A task that still holds
/// the store when the node stops (here one that lets go 300 ms later) delays the return; before,
/// `wait` returned while such tasks ran and a reopen failed with "could not acquire lock" (seen
/// once in CI, in the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_returns_only_once_its_directory_can_be_opened() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::new(dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.bootstrap = true;
    let node = start(cfg).await.unwrap();
    let let_go = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holder = {
        let store = node.api.node().store.clone();
        let let_go = let_go.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let_go.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(store);
        })
    };
    node.shutdown_handle().send_replace(true);
    node.wait().await.unwrap();
    assert!(let_go.load(std::sync::atomic::Ordering::SeqCst), "wait returned while the store was still held");
    let reopened = Store::open(dir.path(), &StoreOptions::default());
    assert!(reopened.is_ok(), "the directory opens at once: {:?}", reopened.err());
    holder.await.unwrap();
}
