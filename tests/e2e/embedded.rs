//! The embedded default: the CLI finds or starts this machine's node (SPEC §4).

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::*;

#[test]
fn alloc_web_on_a_fresh_home_starts_a_node_and_prints_one_port() {
    let h = Home::new();
    let r = h.pm(&["alloc", "web"]).ok();
    let ports = r.ports();
    assert_eq!(ports.len(), 1, "{r:?}");
    assert!((8000..=8999).contains(&ports[0]), "web pool: {ports:?}");
    // Held until released: it says how, and how not to leak one next time.
    assert!(r.stderr.contains(&format!("held until released (`portmesh release {}`)", ports[0])), "{r:?}");
    // The README's main job: a sticky key, the same port on every run, and nothing more to say.
    let first = h.pm(&["alloc", "web", "--key", "quickstart/web"]).ok();
    let again = h.pm(&["alloc", "web", "--key", "quickstart/web"]).ok();
    assert_eq!(first.ports(), again.ports());
    assert!(!again.stderr.contains("held until released"), "{again:?}");
    let pid = h.node_pid().expect("node recorded its address");
    assert_eq!(h.node_processes(), [pid]);

    let s = h.pm(&["status", "--json"]).ok().json();
    for field in ["node_id", "leader_id", "term", "members", "commit_index", "applied_index", "pid"] {
        assert!(!s[field].is_null(), "status lacks {field}: {s}");
    }
    assert_eq!(s["pid"].as_i64(), Some(i64::from(pid)));
    assert_eq!(s["leader_id"], s["node_id"]);
    let m = &s["members"][0];
    assert_eq!((m["id"].clone(), m["role"].as_str()), (s["node_id"].clone(), Some("leader")));
    assert!(m["addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "loopback only: {m}");
    assert!(s["applied_index"].as_u64() >= Some(2));
}

#[test]
fn thirty_clis_racing_on_a_fresh_home_end_with_one_node_and_thirty_ports() {
    let h = Home::new();
    let children: Vec<_> = (0..30)
        .map(|i| {
            h.cmd(&["alloc", &format!("svc{i}")])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ports = BTreeSet::new();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let p: u16 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
        assert!(ports.insert(p), "port {p} handed out twice");
    }
    assert_eq!(ports.len(), 30);
    assert_eq!(h.node_processes().len(), 1, "exactly one node");
    assert_eq!(h.live_ports().len(), 30);
}

#[test]
fn a_node_killed_with_sigkill_is_restarted_and_keeps_every_acknowledged_allocation() {
    let h = Home::new();
    let mut acked = Vec::new();
    for i in 0..5 {
        acked.extend(h.pm(&["alloc", &format!("s{i}"), "--key", &format!("k{i}")]).ok().ports());
    }
    acked.extend(h.pm(&["alloc", "batch", "--count", "3"]).ok().ports());
    let old = h.node_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until("the killed node to vanish", Duration::from_secs(10), || h.node_processes().is_empty());

    let mut live = h.live_ports();
    live.sort();
    acked.sort();
    assert_eq!(live, acked, "acknowledged allocations survive kill -9");
    let new = h.node_pid().unwrap();
    assert_ne!(new, old, "a new node was started");
    // Sticky keys still resolve to their ports.
    let again = h.pm(&["alloc", "s0", "--key", "k0"]).ok().ports();
    assert_eq!(again[0], acked.iter().copied().find(|p| *p == again[0]).unwrap());
    assert_eq!(h.live_ports().len(), 8, "idempotent: no new allocation");
}

#[test]
fn two_homes_never_share_a_node() {
    let (a, b) = (Home::new(), Home::new());
    let pa = a.pm(&["alloc", "x"]).ok().ports();
    let pb = b.pm(&["alloc", "x"]).ok().ports();
    assert_eq!(pa, pb, "independent state: both get the first port");
    assert_ne!(a.node_pid(), b.node_pid());
    assert_eq!(a.live_ports().len(), 1);
}

#[test]
fn stop_shuts_the_local_node_down_and_the_next_command_starts_it_again() {
    let h = Home::new();
    let p = h.pm(&["alloc", "x", "--key", "x"]).ok().ports();
    let pid = h.node_pid().unwrap();
    let r = h.pm(&["stop"]).ok();
    assert!(r.stdout.contains(&format!("stopped the local node (pid {pid})")), "{r:?}");
    assert!(h.node_processes().is_empty());
    assert!(h.info().is_none(), "node.json removed at graceful shutdown");
    assert!(h.pm(&["stop"]).ok().stdout.contains("no local node is running"));
    assert_eq!(h.live_ports(), p);
}

#[test]
fn release_reserve_and_pools_round_trip() {
    let h = Home::new();
    let p = h.pm(&["alloc", "api", "--pool", "web", "--key", "shop/dev/api"]).ok().ports()[0];
    assert_eq!(h.pm(&["release", &p.to_string()]).ok().ports(), [p]);
    // The key gets its port back at once despite the cool-down; anyone else does not.
    let other = h.pm(&["alloc", "other", "--pool", "web"]).ok().ports()[0];
    assert_ne!(other, p);
    assert_eq!(h.pm(&["alloc", "api", "--pool", "web", "--key", "shop/dev/api"]).ok().ports(), [p]);
    assert_eq!(h.pm(&["release", "--key", "shop/dev/api"]).ok().ports(), [p]);

    h.pm(&["reserve", "8500", "--reason", "nginx"]).ok();
    let ls = h.pm(&["ls", "--json"]).ok().json();
    assert_eq!(ls["reservations"][0]["port"], 8500);
    assert_eq!(ls["reservations"][0]["reason"], "nginx");
    let fallback = h.pm(&["alloc", "x", "--port", "8500"]).ok().ports();
    assert_ne!(fallback, [8500], "sticky falls back from a reserved port");
    h.pm(&["alloc", "x", "--port", "8500", "--strategy", "fail"]).fails_with("reserved (nginx)");
    h.pm(&["unreserve", "8500"]).ok();

    h.pm(&["pools", "add", "ci", "20000-20099"]).ok();
    let pools = h.pm(&["pools", "ls", "--json"]).ok().json();
    let ci = pools["pools"].as_array().unwrap().iter().find(|p| p["name"] == "ci").unwrap().clone();
    assert_eq!((ci["ranges"].as_str(), ci["size"].as_u64()), (Some("20000-20099"), Some(100)));
    let shard_ports = h.pm(&["alloc", "shard", "--pool", "ci", "--count", "4"]).ok().ports();
    assert_eq!(shard_ports, [20000, 20001, 20002, 20003]);
    h.pm(&["pools", "rm", "ci"]).fails_with("still has 4 live allocation(s)");
    let released: Vec<String> = shard_ports.iter().map(u16::to_string).collect();
    let mut args = vec!["release"];
    args.extend(released.iter().map(String::as_str));
    h.pm(&args).ok();
    h.pm(&["pools", "rm", "ci"]).ok();
}

/// The cool-down after release is the cluster's to show and set: a refused value names the
/// field and changes nothing; turned off, a released port goes to anyone at once.
#[test]
fn the_cooldown_is_shown_set_and_turned_off() {
    let h = Home::new();
    let shown = |h: &Home| h.pm(&["pools", "cooldown", "--json"]).ok().json()["cooldown_ms"].as_u64();
    assert_eq!(shown(&h), Some(60_000));
    h.pm(&["pools", "add", "cd", "20420-20429"]).ok();
    let a = h.pm(&["alloc", "a", "--pool", "cd"]).ok().ports()[0];
    h.pm(&["release", &a.to_string()]).ok();
    let b = h.pm(&["alloc", "b", "--pool", "cd"]).ok().ports()[0];
    assert_ne!(b, a, "a released port cools down for everyone but its key");
    h.pm(&["release", &b.to_string()]).ok();

    h.pm(&["pools", "cooldown", "2d"]).fails_with("cooldown_ms: at most 86400000 (one day), got 172800000");
    h.pm(&["pools", "cooldown", "1.5ms"]).fails_with("give whole milliseconds");
    assert_eq!(shown(&h), Some(60_000), "a refused value changes nothing");

    let set = h.pm(&["pools", "cooldown", "0", "--json"]).ok().json();
    assert_eq!(set["cooldown_ms"], 0);
    assert!(set["revision"].as_u64() > Some(5), "a replicated change: {set}");
    assert_eq!(shown(&h), Some(0));
    assert!(h.pm(&["pools", "ls"]).ok().stdout.contains("cool-down after release: off"));
    let c = h.pm(&["alloc", "c", "--pool", "cd"]).ok().ports()[0];
    h.pm(&["release", &c.to_string()]).ok();
    assert_eq!(h.pm(&["alloc", "d", "--pool", "cd"]).ok().ports(), [c], "no cool-down: free at once");

    h.pm(&["pools", "cooldown", "30s"]).ok();
    assert_eq!(shown(&h), Some(30_000));
}

#[test]
fn json_alloc_names_every_field() {
    let h = Home::new();
    let v = h.pm(&["alloc", "db", "--key", "k", "--ttl", "30s", "--json"]).ok().json();
    let a = &v["allocations"][0];
    for f in ["port", "team", "pool", "service", "key", "lease_id", "host"] {
        assert!(!a[f].is_null(), "{f} missing: {v}");
    }
    assert_eq!(
        (a["pool"].as_str(), a["service"].as_str(), a["key"].as_str()),
        (Some("db"), Some("db"), Some("k"))
    );
    assert_eq!(a["lease_id"], v["lease_id"]);
}

#[test]
fn http_health_readiness_and_status() {
    let h = Home::new();
    let p = h.pm(&["alloc", "web"]).ok().ports()[0];
    let http = h.http();
    assert_eq!(http_get(&http, "/healthz").0, 200);
    assert_eq!(http_get(&http, "/readyz").0, 200);
    let (code, body) = http_get(&http, "/api/v1/status");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["allocations"][0]["port"].as_u64(), Some(u64::from(p)));
    assert!(v["pools"].as_array().unwrap().iter().any(|p| p["name"] == "web" && p["allocated"] == 1));
}

#[test]
fn http_metrics_in_the_openmetrics_format_and_services_in_the_status() {
    let h = Home::new();
    h.pm(&["alloc", "web"]).ok();
    h.pm(&["register", "api", "--port", "18001", "--project", "shop"]).ok();
    let http = h.http();
    let (code, head, body) = http_get_with_head(&http, "/metrics");
    assert_eq!(code, 200, "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
    for line in [
        "portmesh_pool_allocated_ports{team=\"default\",pool=\"web\"} 1",
        "portmesh_pool_size_ports{team=\"default\",pool=\"web\"} 1000",
        "portmesh_pool_allocated_ports{team=\"default\",pool=\"db\"} 0",
        "portmesh_services{status=\"passing\"} 1",
        "portmesh_services{status=\"critical\"} 0",
        "portmesh_raft_is_leader 1",
        "portmesh_raft_members 1",
    ] {
        assert!(body.lines().any(|l| l == line), "no {line:?} in\n{body}");
    }
    for name in [
        "portmesh_pool_utilization_ratio{team=\"default\",pool=\"web\"} 0.001",
        "portmesh_fsyncs_total ",
        "portmesh_log_entries_flushed_total ",
        "portmesh_commands_applied_total ",
        "portmesh_raft_term ",
        "portmesh_raft_commit_index ",
        "portmesh_raft_applied_index ",
        "portmesh_revision ",
        "portmesh_leases ",
        "portmesh_data_size_bytes ",
        "portmesh_process_resident_memory_bytes ",
        "portmesh_recent_conflicts ",
    ] {
        assert!(body.lines().any(|l| l.starts_with(name)), "no {name:?} in\n{body}");
    }
    assert_eq!(body.trim_end().lines().last(), Some("# EOF"));
    let (code, status) = http_get(&http, "/api/v1/status");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let svc = &v["services"][0];
    assert_eq!(
        (svc["name"].as_str(), svc["project"].as_str(), svc["status"].as_str()),
        (Some("api"), Some("shop"), Some("passing"))
    );
    assert_eq!(svc["ports"][0]["port"], 18001);
    assert!(v["allocations"][0]["pid"].as_u64().is_some(), "the holder is shown: {v}");
}

/// The local node's home and data are its owner's alone: directories 0700, files 0600, also a
/// data directory that existed with looser modes (one an older release made).
#[test]
fn the_home_and_the_data_directory_are_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let h = Home::new();
    let data = h.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for dir in [h.path(), data.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    h.pm(&["alloc", "private"]).ok();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for dir in [h.path().to_path_buf(), data.clone(), data.join("sled")] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    for file in
        [h.path().join("node.json"), h.path().join("node.log"), data.join("sled/db"), data.join("sled/conf")]
    {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

/// A restarted local node keeps its addresses: the membership names the gRPC address, so a node
/// that moved made `doctor` report the old address as a member that does not answer, after
/// every `stop` or reboot; the dashboard's address stays bookmarkable.
#[test]
fn a_restarted_local_node_keeps_its_addresses() {
    let h = Home::new();
    h.pm(&["alloc", "before"]).ok();
    let first = h.info().unwrap();
    h.pm(&["stop"]).ok();
    h.pm(&["alloc", "after"]).ok();
    let second = h.info().unwrap();
    assert_ne!(first["pid"], second["pid"], "a new process");
    assert_eq!((&first["grpc"], &first["http"]), (&second["grpc"], &second["http"]), "{first} / {second}");
    let doctor = h.pm(&["doctor"]);
    assert!(!doctor.stdout.contains("does not answer from here"), "{doctor:?}");
}

#[test]
fn completions_cover_every_command_for_each_shell() {
    let h = Home::new();
    let bash = h.pm(&["completions", "bash"]).ok().stdout;
    assert!(bash.contains("_portmesh()") && bash.contains("complete -F _portmesh"), "{bash}");
    for cmd in ["alloc", "release", "up", "down", "token", "doctor", "health"] {
        assert!(bash.contains(cmd), "bash completion lacks {cmd}");
    }
    assert!(h.pm(&["completions", "zsh"]).ok().stdout.starts_with("#compdef portmesh"));
    assert!(h.pm(&["completions", "fish"]).ok().stdout.contains("complete -c portmesh"));
    let bad = h.pm(&["completions", "tcsh"]);
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("bash") && bad.stderr.contains("zsh"), "names the shells it knows: {bad:?}");
    assert!(h.node_pid().is_none(), "completions start no node");
}
