//! Tests of the state machine store: snapshots built, sent, received and loaded, and the move
//! of a version 6 snapshot out of sled.

use openraft::RaftSnapshotBuilder;
use openraft::storage::RaftStateMachine;
use tempfile::TempDir;
use tokio::io::AsyncReadExt;

use super::*;
use crate::log_store::encode;
use crate::tests::alloc_entry;
use crate::{Store, StoreOptions};

async fn bytes_of(s: Snapshot<TypeConfig>) -> Vec<u8> {
    let mut b = Vec::new();
    let mut f = s.snapshot;
    f.read_to_end(&mut b).await.unwrap();
    b
}

/// The snapshot file is the header, the metadata, the records in the collected format (what
/// older versions wrote, and what the reader decodes) and the checksum of all that; it is
/// written from borrowed state through a buffer, and it is what Raft sends.
#[tokio::test]
async fn a_snapshot_file_is_its_header_metadata_records_and_checksum() {
    let dir = TempDir::new().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let mut sm = store.state_machine().unwrap();
    sm.apply((1..=40).map(alloc_entry)).await.unwrap();
    let built = sm.build_snapshot().await.unwrap();
    let meta = built.meta.clone();
    assert_eq!(meta.last_log_id.map(|l| l.index), Some(40));

    let expected = {
        let guard = sm.sm.read().unwrap();
        let payload = SnapshotPayload {
            data_version: crate::DATA_VERSION,
            records: guard.state.records().map(Into::into).collect(),
        };
        file_bytes(&meta, &payload)
    };
    assert_eq!(bytes_of(built).await, expected, "the file handed to Raft");
    assert_eq!(std::fs::read(dir.path().join("snapshot")).unwrap(), expected, "the file on disk");
    assert!(!dir.path().join("snapshot.building").exists(), "renamed into place");
    let current = sm.get_current_snapshot().await.unwrap().expect("a snapshot was saved");
    assert_eq!(current.meta, meta);
    assert_eq!(bytes_of(current).await, expected);
    assert!(store.inner.snap.is_empty(), "nothing of it in sled");
    let sled_only = store.inner.db.size_on_disk().unwrap();
    assert_eq!(
        store.size_on_disk(),
        sled_only + expected.len() as u64,
        "the data directory's size counts it"
    );

    // Built again from the same state, it is the same file.
    assert_eq!(bytes_of(sm.build_snapshot().await.unwrap()).await, expected);
}

/// A snapshot file that was damaged (a flipped byte, a truncation, bytes appended) is refused
/// with a message that names it and says what is wrong, when the directory is opened and when
/// Raft asks for it to send; the file is left as it was.
#[tokio::test]
async fn a_damaged_snapshot_file_is_refused_and_left_alone() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("snapshot");
    let good = {
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mut sm = store.state_machine().unwrap();
        sm.apply((1..=10).map(alloc_entry)).await.unwrap();
        sm.build_snapshot().await.unwrap();
        std::fs::read(&path).unwrap()
    };
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x10;
    let mut appended = good.clone();
    appended.extend(b"xx");
    let mut recrc = good[..good.len() - 4].to_vec();
    recrc.extend(b"xx");
    recrc.extend(crc32fast::hash(&recrc).to_le_bytes());
    for (bad, why) in [
        (flipped, "its checksum does not match"),
        (good[..good.len() - 7].to_vec(), "its checksum does not match"),
        (good[..3].to_vec(), "not a portmesh snapshot file"),
        (appended, "its checksum does not match"),
        (recrc, "bytes follow its records"),
    ] {
        std::fs::write(&path, &bad).unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let e = store.state_machine().unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()) && e.contains(why), "{why}: {e}");
        assert_eq!(std::fs::read(&path).unwrap(), bad, "left as it was");
        if why != "bytes follow its records" {
            let e = store.inner.snapshots.open_current().unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
    }
    std::fs::write(&path, &good).unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let sm = store.state_machine().unwrap();
    assert_eq!(sm.reader().read().state.allocations().count(), 10, "the good file loads");
}

/// A snapshot older than the current one (a build that started before a newer snapshot was
/// installed) is not made current: the newer one stays.
#[tokio::test]
async fn an_older_snapshot_never_replaces_a_newer_one() {
    let (a, b) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let leader = Store::open(a.path(), &StoreOptions::default()).unwrap();
    let mut lsm = leader.state_machine().unwrap();
    lsm.apply((1..=6).map(alloc_entry)).await.unwrap();
    let newer = lsm.build_snapshot().await.unwrap();

    let store = Store::open(b.path(), &StoreOptions::default()).unwrap();
    let mut sm = store.state_machine().unwrap();
    sm.apply((1..=3).map(alloc_entry)).await.unwrap();
    let old = {
        let guard = sm.sm.read().unwrap();
        write_snapshot(&store.inner, &guard, snapshot_file::BUILDING).unwrap()
    };
    let meta = newer.meta.clone();
    sm.install_snapshot(&meta, newer.snapshot).await.unwrap();
    let (_, current) = make_current(&store.inner, &old.0, old.1).unwrap();
    assert!(!current, "the older snapshot was not made current");
    assert_eq!(sm.get_current_snapshot().await.unwrap().unwrap().meta, meta);
    let left: Vec<_> = std::fs::read_dir(b.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().starts_with("snapshot.")), "{left:?}");
}

/// A snapshot received from the leader is installed only if it is whole and is the one its
/// metadata names; otherwise the state and the current snapshot stay as they were.
#[tokio::test]
async fn a_received_snapshot_is_checked_before_it_replaces_anything() {
    use tokio::io::AsyncWriteExt;
    let (a, b) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let src = Store::open(a.path(), &StoreOptions::default()).unwrap();
    let mut sm = src.state_machine().unwrap();
    sm.apply((1..=5).map(alloc_entry)).await.unwrap();
    let built = sm.build_snapshot().await.unwrap();
    let meta = built.meta.clone();
    let good = bytes_of(built).await;

    let dst = Store::open(b.path(), &StoreOptions::default()).unwrap();
    let mut sm2 = dst.state_machine().unwrap();
    sm2.apply((1..=2).map(alloc_entry)).await.unwrap();
    let mut flipped = good.clone();
    flipped[10] ^= 1;
    let other = SnapshotMeta { snapshot_id: "1-0-4".into(), ..meta.clone() };
    for (bytes, meta, why) in
        [(flipped, &meta, "checksum does not match"), (good.clone(), &other, "not 1-0-4")]
    {
        let mut f = sm2.begin_receiving_snapshot().await.unwrap();
        f.write_all(&bytes).await.unwrap();
        let e = sm2.install_snapshot(meta, f).await.unwrap_err().to_string();
        assert!(e.contains(why), "{why}: {e}");
        assert_eq!(sm2.reader().read().last_applied.map(|l| l.index), Some(2));
        assert!(sm2.get_current_snapshot().await.unwrap().is_none());
    }
    let mut f = sm2.begin_receiving_snapshot().await.unwrap();
    f.write_all(&good).await.unwrap();
    let ino =
        |name: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(b.path().join(name)).unwrap());
    let received = ino("snapshot.receiving");
    sm2.install_snapshot(&meta, f).await.unwrap();
    assert_eq!(ino("snapshot"), received, "the file received into is the snapshot now, not a copy");
    assert_eq!(sm2.reader().read().last_applied.map(|l| l.index), Some(5));
    assert_eq!(std::fs::read(b.path().join("snapshot")).unwrap(), good);
    let left: Vec<_> = std::fs::read_dir(b.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(
        !left.iter().any(|n| n.to_string_lossy().starts_with("snapshot.")),
        "the received file itself became the snapshot: {left:?}"
    );
    assert_eq!(sm2.get_current_snapshot().await.unwrap().map(|s| s.meta), Some(meta));
}

/// A snapshot file's bytes, written out by hand: header, metadata, payload, checksum.
fn file_bytes(meta: &Meta, payload: &SnapshotPayload) -> Vec<u8> {
    let mut b = b"pmsnap\x00\x01".to_vec();
    b.extend(encode(meta).unwrap());
    b.extend(encode(payload).unwrap());
    b.extend(crc32fast::hash(&b).to_le_bytes());
    b
}

/// A whole snapshot file of a data version newer than this build's (a file copied from a
/// newer node) is refused as an unknown version, with that version and the way out, not
/// as damage; nothing in the directory changes.
#[tokio::test]
async fn a_snapshot_of_a_newer_data_version_is_refused_as_such_not_as_damage() {
    let dir = TempDir::new().unwrap();
    {
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mut sm = store.state_machine().unwrap();
        sm.apply((1..=3).map(alloc_entry)).await.unwrap();
        let meta = sm.build_snapshot().await.unwrap().meta;
        let payload = SnapshotPayload { data_version: crate::DATA_VERSION + 1, records: Vec::new() };
        std::fs::write(dir.path().join("snapshot"), file_bytes(&meta, &payload)).unwrap();
    }
    let before = std::fs::read(dir.path().join("snapshot")).unwrap();
    let err = match Store::open(dir.path(), &StoreOptions::default()).and_then(|s| s.state_machine()) {
        Err(e) => e,
        Ok(_) => panic!("a snapshot of an unknown version was loaded"),
    };
    assert!(matches!(err, StoreError::UnsupportedVersion { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&format!("version {}", crate::DATA_VERSION + 1)), "{text}");
    assert!(text.contains(&dir.path().display().to_string()) && !text.contains("damaged"), "{text}");
    assert_eq!(std::fs::read(dir.path().join("snapshot")).unwrap(), before, "left as it was");
}

/// Writes what data version 6 kept: the snapshot of `state` at `meta` in sled's `snap` tree,
/// and the version header.
fn put_v6_snapshot(store: &Store, meta: &Meta, state: &State) {
    #[derive(serde::Serialize)]
    struct StoredSnapshotV6<'a> {
        meta: &'a Meta,
        data: Vec<u8>,
    }
    let payload = SnapshotPayloadOf { data_version: 6, records: RecordsOf(state) };
    let stored = StoredSnapshotV6 { meta, data: encode(&payload).unwrap() };
    store.inner.snap.insert(SNAP_CURRENT, encode(&stored).unwrap()).unwrap();
    store.inner.meta.insert(b"data_version", &6u32.to_be_bytes()).unwrap();
    store.flush().unwrap();
}

/// A directory of data version 6 keeps its snapshot in sled's `snap` tree: opened, the
/// snapshot moves into the file and the tree is emptied. A move repeated after a crash (the
/// file already there, the tree not yet emptied) keeps the file: the tree put back here holds
/// another state at the same log id, which must not replace it.
#[tokio::test]
async fn a_version_6_snapshot_moves_from_sled_into_the_file() {
    let dir = TempDir::new().unwrap();
    let (meta, state) = {
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mut sm = store.state_machine().unwrap();
        sm.apply((1..=7).map(alloc_entry)).await.unwrap();
        let meta = sm.build_snapshot().await.unwrap().meta;
        let state = sm.reader().read().state.clone();
        put_v6_snapshot(&store, &meta, &state);
        (meta, state)
    };
    std::fs::remove_file(dir.path().join("snapshot")).unwrap();
    for repeated in [false, true] {
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert!(store.inner.snap.is_empty(), "the tree was emptied");
        assert_eq!(
            store.inner.meta.get(b"data_version").unwrap().unwrap().as_ref(),
            crate::DATA_VERSION.to_be_bytes()
        );
        let mut sm = store.state_machine().unwrap();
        assert_eq!(sm.get_current_snapshot().await.unwrap().unwrap().meta, meta);
        assert_eq!(sm.reader().read().state, state, "repeated: {repeated}");
        if !repeated {
            put_v6_snapshot(&store, &meta, &State::new());
        }
    }
}

/// A crash while a snapshot is built or received (or, before the fourteenth slice of issue 19,
/// installed) leaves a half-written file beside the snapshot, megabytes with a large state. The
/// next open removes exactly those files; the snapshot and the state it holds are untouched.
#[tokio::test]
async fn half_written_snapshot_files_left_by_a_crash_are_removed_on_open() {
    let dir = TempDir::new().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let mut sm = store.state_machine().unwrap();
    sm.apply((1..=12).map(alloc_entry)).await.unwrap();
    sm.build_snapshot().await.unwrap();
    let closed = store.closed();
    drop((sm, store));
    closed.await;
    let snapshot = std::fs::read(dir.path().join("snapshot")).unwrap();
    let leftovers = ["snapshot.building", "snapshot.receiving", "snapshot.installing"];
    for name in leftovers {
        std::fs::write(dir.path().join(name), b"half a snapshot").unwrap();
    }
    std::fs::write(dir.path().join("snapshot.other"), b"not ours to remove").unwrap();

    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    for name in leftovers {
        assert!(!dir.path().join(name).exists(), "{name} was removed");
    }
    assert!(dir.path().join("snapshot.other").exists(), "only the known leftovers are removed");
    assert_eq!(std::fs::read(dir.path().join("snapshot")).unwrap(), snapshot, "the snapshot is untouched");
    let sm = store.state_machine().unwrap();
    assert_eq!(sm.reader().read().state.allocations().count(), 12);
    assert_eq!(sm.reader().read().last_applied.map(|l| l.index), Some(12));
}
