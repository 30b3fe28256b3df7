//! Data directories written by earlier releases boot with everything they held: allocations,
//! sticky keys, leases, reservations and history. Each fixture under `tests/fixtures/` was
//! written by `tests/fixtures/make-data-dir` with that release's binary (see its README).

use std::path::Path;

use serde_json::Value;

use crate::support::{Home, serve};

/// Boots a copy of fixture `name` and checks what `make-data-dir` put into it.
fn boots_with_everything_it_held(name: &str) {
    let h = Home::new();
    let data = h.path().join("data");
    portmesh_testkit::copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name),
        &data,
    );
    // No --bootstrap: the directory already belongs to a cluster, which it must come back to.
    let s = serve(&h, &data, &[]);
    // Whatever version wrote it, the snapshot is now a file of its own (data version 7).
    assert!(data.join("snapshot").is_file(), "no snapshot file in {}", data.display());
    let pm = |args: &[&str]| {
        let mut all = vec!["--node", s.grpc.as_str()];
        all.extend_from_slice(args);
        h.pm(&all).ok()
    };

    let ls = pm(&["ls", "--json", "--pool", "fixture"]).json();
    let allocs = ls["allocations"].as_array().unwrap();
    let by_key = |key: &str| allocs.iter().find(|a| a["key"] == key).unwrap_or_else(|| panic!("{key}: {ls}"));
    let web = by_key("fixture/web")["port"].as_u64().unwrap();
    let api: Vec<u64> =
        ["fixture/api/0", "fixture/api/1"].iter().map(|k| by_key(k)["port"].as_u64().unwrap()).collect();
    let leased: Vec<&Value> = allocs.iter().filter(|a| a["service"] == "leased").collect();
    assert_eq!((allocs.len(), leased.len()), (4, 1), "{ls}");
    assert!(allocs.iter().all(|a| a["service"] != "tmp"), "the released port is still allocated: {ls}");
    let reservations = ls["reservations"].as_array().unwrap();
    assert!(reservations.iter().any(|r| r["port"] == 31050 && r["reason"] == "fixture"), "{ls}");

    // The lease outlived the restart (a new leader extends every lease before expiring any).
    let lease = leased[0]["lease_id"].as_u64().unwrap().to_string();
    let renewed = pm(&["renew", "--lease", &lease]);
    assert!(renewed.stdout.contains("renewed"), "{renewed:?}");

    // The history: the allocation and release of tmp, with the pool's other events.
    let log = pm(&["log", "--json"]);
    let events: Vec<Value> = log.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let of = |kind: &str, service: &str| {
        events.iter().any(|e| e["type"] == kind && e["allocation"]["service"] == service)
    };
    assert!(of("allocated", "tmp") && of("released", "tmp") && of("allocated", "web"), "{}", log.stdout);

    // Sticky keys still map to their ports, and the next write gets a revision above every
    // revision the directory handed out (a revision is a fencing token: never reissued).
    let before = pm(&["status", "--json"]).json()["revision"].as_u64().unwrap();
    let newest = allocs.iter().map(|a| a["revision"].as_u64().unwrap()).max().unwrap();
    assert!(before >= newest);
    let again = pm(&["alloc", "web", "--pool", "fixture", "--key", "fixture/web", "--json"]).json();
    assert_eq!(again["allocations"][0]["port"].as_u64(), Some(web), "{again}");
    let api_again =
        pm(&["alloc", "api", "--pool", "fixture", "--key", "fixture/api", "--count", "2"]).ports();
    assert_eq!(api_again.iter().map(|p| u64::from(*p)).collect::<Vec<_>>(), api);
    let fresh = pm(&["alloc", "fresh", "--pool", "fixture", "--json"]).json();
    assert!(fresh["revision"].as_u64().unwrap() > before, "{fresh} after revision {before}");
}

/// Written by portmesh 0.1.0 (data version 1): upgraded in place when opened.
#[test]
fn a_data_directory_of_0_1_0_boots() {
    boots_with_everything_it_held("data-v1-0.1.0");
}

/// Written by main on 2026-12-03 (data version 2), before the persisted encoding moved from
/// `portmesh-core` into the store.
#[test]
fn a_data_directory_of_data_version_2_boots() {
    boots_with_everything_it_held("data-v2-2026-12-03");
}

/// Written by main on 2026-12-05 (data version 4), before allocations could carry a
/// registration: its log holds allocation entries in the shape of versions 2 to 4.
#[test]
fn a_data_directory_of_data_version_4_boots() {
    boots_with_everything_it_held("data-v4-2026-12-05");
}

/// Written by main on 2026-12-05 (data version 5, commit 55e5fcb).
#[test]
fn a_data_directory_of_data_version_5_boots() {
    boots_with_everything_it_held("data-v5-2026-12-05");
}

/// Written by main on 2026-12-05 (data version 6, commit 206f9d6) with `PORTMESH_SNAPSHOT_EVERY=100
/// FILL=60`: its snapshot is a value in sled's `snap` tree and its log is purged behind it, so it
/// boots only if that snapshot is moved into the snapshot file.
#[test]
fn a_data_directory_of_data_version_6_with_a_snapshot_in_sled_boots() {
    boots_with_everything_it_held("data-v6-2026-12-05");
}

/// Written by main on 2026-12-06 (data version 7, commit 53a094f, openraft 0.9.25) with
/// `PORTMESH_SNAPSHOT_EVERY=100 FILL=60`: its snapshot is the file `snapshot`, its log is purged
/// behind it, and its node's own vote is stored uncommitted (early replication). The format just
/// before data version 8: its log's allocations are in the shape of versions 5 to 7, without
/// ranges known busy (openraft 0.10's trial read it too: docs/architecture.md).
#[test]
fn a_data_directory_of_data_version_7_with_a_snapshot_file_boots() {
    boots_with_everything_it_held("data-v7-2026-12-06");
}
