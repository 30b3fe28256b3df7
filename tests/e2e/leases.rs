//! Leases end to end: expiry by the leader releases what is attached; renewals keep it.

use std::time::{Duration, Instant};

use crate::support::*;

#[test]
fn an_unrenewed_lease_expires_and_its_ports_come_back() {
    let h = Home::new();
    let kept = h.pm(&["alloc", "forever"]).ok().ports();
    let r = h.pm(&["alloc", "ci", "--count", "3", "--ttl", "1s"]).ok();
    assert!(r.stderr.contains("lease 1 (ttl 1s)"), "{r:?}");
    let leased = r.ports();
    assert_eq!(h.live_ports().len(), 4);
    let t0 = Instant::now();
    wait_until("the lease to expire", Duration::from_secs(20), || h.live_ports() == kept);
    assert!(t0.elapsed() < Duration::from_secs(20));
    // Released exactly once: renewing or revoking the dead lease fails.
    h.pm(&["renew", "--lease", "1"]).fails_with("lease 1 no longer exists");
    h.pm(&["release", "--lease", "1"]).fails_with("unknown lease 1");
    assert!(leased.iter().all(|p| !h.live_ports().contains(p)));
}

#[test]
fn a_renewed_lease_stays_and_revoking_it_releases_everything() {
    let h = Home::new();
    let r = h.pm(&["alloc", "svc", "--count", "2", "--ttl", "2s", "--json"]).ok().json();
    let lease = r["lease_id"].as_u64().unwrap().to_string();
    // Renew well within the TTL for three TTLs' worth of time.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let out = h.pm(&["renew", "--lease", &lease]).ok();
        assert!(out.stdout.contains("renewed: ttl 2s"), "{out:?}");
        assert_eq!(h.live_ports().len(), 2, "renewed lease lost its ports");
        std::thread::sleep(Duration::from_millis(400));
    }
    let released = h.pm(&["release", "--lease", &lease]).ok().ports();
    assert_eq!(released.len(), 2);
    assert!(h.live_ports().is_empty());
}
