//! `stats`, `doctor` and the recommendations in `/api/v1/status`, against a real node.

use std::process::Stdio;
use std::time::Duration;

use crate::support::*;

/// A home whose team has only pool `t` = `range`, so listeners of other tests on the default
/// pools are none of this test's business.
fn private(range: &str) -> Home {
    let h = Home::new();
    for p in ["web", "default", "db", "cache", "queue"] {
        h.pm(&["pools", "rm", p]).ok();
    }
    h.pm(&["pools", "add", "t", range]).ok();
    h
}

#[test]
fn stats_reports_usage_and_recommendations_in_text_json_and_the_status_api() {
    let h = private("20740-20749");
    h.pm(&["alloc", "a", "--pool", "t", "--count", "8"]).ok();
    let s = h.pm(&["stats", "--json"]).ok().json();
    let t = s["pools"].as_array().unwrap().iter().find(|p| p["name"] == "t").unwrap().clone();
    assert_eq!((t["size"].as_u64(), t["in_use"].as_u64(), t["peak"].as_u64()), (Some(10), Some(8), Some(8)));
    assert_eq!(t["allocations"], 8);
    // Seconds of history: no forecast (it needs an hour and a growth of 10 ports).
    assert!(t["exhaustion_ms"].is_null(), "{t}");
    let recs = s["recommendations"].as_array().unwrap();
    let widen = recs.iter().find(|r| r["rule"] == "widen").unwrap_or_else(|| panic!("{s}"));
    assert!(widen["reason"].as_str().unwrap().contains("80 % full"), "{widen}");
    assert!(widen["command"].as_str().unwrap().starts_with("portmesh pools add t-2 "), "{widen}");

    let text = h.pm(&["stats"]).ok().stdout;
    assert!(text.contains("recommendations:") && text.contains("$ portmesh pools add t-2"), "{text}");
    let (code, body) = http_get(&h.http(), "/api/v1/status");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["recommendations"].as_array().unwrap().iter().any(|r| r["rule"] == "widen"), "{v}");

    // Releasing them: nothing to recommend any more.
    let ports = h.live_ports();
    let mut args = vec!["release"];
    let texts: Vec<String> = ports.iter().map(u16::to_string).collect();
    args.extend(texts.iter().map(String::as_str));
    h.pm(&args).ok();
    let s = h.pm(&["stats", "--json"]).ok().json();
    assert!(s["recommendations"].as_array().unwrap().is_empty(), "{s}");
}

#[test]
fn doctor_is_quiet_on_a_healthy_host_and_names_each_problem_with_its_fix() {
    let h = private("20750-20769");
    let r = h.pm(&["doctor"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("ok    cluster: leader"), "{r:?}");
    assert!(r.stdout.contains("nothing wrong found"), "{r:?}");

    // A pool in the ephemeral range, a port held with no lease by a process that is gone, a
    // lease whose holder is gone, and a listener in a pool with no allocation.
    h.pm(&["pools", "add", "eph", "40100-40109"]).ok();
    // `portmesh alloc` records the process that ran it as the holder: a shell that then exits.
    let gone = |args: &str| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{BIN} {args}"))
            .env("PORTMESH_HOME", h.path())
            .env_remove("PORTMESH_NODE")
            .env_remove("PORTMESH_TEAM")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let loose = gone("alloc loose --pool t");
    let loose2 = gone("alloc loose2 --pool t");
    let leased = gone("alloc leased --pool t --ttl 1h");
    let port = (20750..20770)
        .find(|p| port_is_free(*p) && ![&loose, &loose2, &leased].contains(&&p.to_string()))
        .unwrap();
    let mut squatter = squat(port);

    let r = h.pm(&["doctor"]);
    let _ = squatter.kill();
    let _ = squatter.wait();
    assert_eq!(r.code, 1, "{r:?}");
    let out = &r.stdout;
    assert!(
        out.contains(
            "warn  pools: pool eph of team default (40100-40109) lies in this host's ephemeral range"
        ),
        "{out}"
    );
    // One line per kind, the ports listed, one command that cleans up.
    let mut two = [loose.parse::<u16>().unwrap(), loose2.parse::<u16>().unwrap()];
    two.sort_unstable();
    assert!(
        out.contains(&format!(
            "2 port(s) of team default held with no lease by processes that no longer run: {}, {}",
            two[0], two[1]
        )),
        "{out}"
    );
    assert!(out.contains(&format!("fix: portmesh release {} {} --team default", two[0], two[1])), "{out}");
    assert!(
        out.contains("1 stale lease(s) of team default hold ports for processes that no longer run"),
        "{out}"
    );
    assert!(out.contains(&format!("(port {leased})")), "{out}");
    assert!(out.contains("fix: portmesh release --lease"), "{out}");
    // (Other programs of this host may hold ports of the ephemeral-range pool: not counted here.)
    assert!(
        out.contains("port(s) lie in pools but are held by processes with no allocation for them: "),
        "{out}"
    );
    assert!(out.contains(&format!("{port} (pid {}", squatter.id())), "{out}");
    assert!(out.contains(&format!("fix: portmesh reserve {port}")), "{out}");
    assert!(out.contains("4 problem(s) found"), "{out}");

    let v = h.pm(&["doctor", "--json"]).json();
    assert_eq!(v["ok"], false);
    assert!(
        v["findings"].as_array().unwrap().iter().any(|f| f["check"] == "leases" && f["level"] == "warn"),
        "{v}"
    );

    // Unreachable: the address that was tried is named.
    let refusing = refusing_port();
    let closed = refusing.port.to_string();
    let addr = format!("127.0.0.1:{closed}");
    let r = h.pm(&["doctor", "--node", &addr]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("error cluster: no node answers") && r.stdout.contains(&closed), "{r:?}");
}

#[test]
fn every_http_endpoint_answers_with_its_status_code_content_type_and_shape() {
    let h = Home::new();
    h.pm(&["alloc", "web", "--ttl", "1m"]).ok();
    h.pm(&["alloc", "x", "--pool", "nope"]).fails_with("unknown pool");
    let mut watcher = h.cmd(&["watch"]).stdout(Stdio::null()).spawn().unwrap();
    let http = h.http();
    let content_type = |path: &str| -> (u16, String, String) {
        let (code, head, body) = http_get_with_head(&http, path);
        let ct = head
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default();
        (code, ct, body)
    };
    let (code, ct, body) = content_type("/");
    assert_eq!((code, ct.as_str()), (200, "text/html; charset=utf-8"));
    assert!(body.contains("<script src=\"/dashboard.js\">") && body.contains("name=\"viewport\""), "{body}");
    assert_eq!(content_type("/dashboard.js").1, "text/javascript; charset=utf-8");
    assert_eq!(content_type("/dashboard.css").1, "text/css; charset=utf-8");
    assert!(content_type("/dashboard.css").2.contains("prefers-color-scheme: dark"));
    assert_eq!(http_get(&http, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(http_get(&http, "/readyz"), (200, "ready\n".to_string()));
    assert_eq!(http_get(&http, "/nope").0, 404);

    let (code, ct, body) = content_type("/api/v1/status");
    assert_eq!((code, ct.as_str()), (200, "application/json"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    for key in [
        "node_id",
        "leader_id",
        "term",
        "members",
        "commit_index",
        "applied_index",
        "revision",
        "pools",
        "allocations",
        "services",
        "recent_conflicts",
        "recommendations",
        "leases",
        "now_ms",
    ] {
        assert!(v.get(key).is_some(), "status lacks {key}: {v}");
    }
    assert_eq!(v["members"][0]["role"], "leader");
    let pool = &v["pools"].as_array().unwrap().iter().find(|p| p["name"] == "web").unwrap();
    for key in ["team", "ranges", "size", "allocated", "reserved", "cooling", "utilization"] {
        assert!(pool.get(key).is_some(), "pool lacks {key}: {pool}");
    }
    assert_eq!(v["allocations"][0]["service"], "web");
    let lease = &v["leases"][0];
    assert!(
        lease["remaining_ms"].as_u64().unwrap() <= 60_000 && lease["ports"].as_array().unwrap().len() == 1,
        "{lease}"
    );

    wait_until("the watch stream to open", Duration::from_secs(10), || {
        http_get(&http, "/metrics").1.contains("portmesh_watch_streams 1")
    });
    let (code, ct, text) = content_type("/metrics");
    assert_eq!(code, 200);
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    for line in [
        "portmesh_allocate_requests_total{outcome=\"ok\"} 1",
        "portmesh_allocate_requests_total{outcome=\"rejected\"} 1",
        "portmesh_allocate_duration_seconds_count 2",
        "portmesh_ports_allocated_total 1",
        "portmesh_events_total{kind=\"allocated\"} 1",
        "portmesh_events_total{kind=\"lease_granted\"} 1",
        "portmesh_watch_streams 1",
        "portmesh_pool_allocated_ports{team=\"default\",pool=\"web\"} 1",
        "portmesh_leases 1",
        "portmesh_raft_is_leader 1",
    ] {
        assert!(text.contains(line), "metrics lack {line:?}:\n{text}");
    }
    for name in [
        "portmesh_allocate_duration_seconds_bucket{le=",
        "portmesh_pool_utilization_ratio",
        "portmesh_recent_conflicts",
        "portmesh_raft_term",
        "portmesh_raft_leader_id",
        "portmesh_raft_commit_index",
        "portmesh_raft_applied_index",
        "portmesh_fsyncs_total",
        "portmesh_log_entries_flushed_total",
        "portmesh_log_entries_per_fsync",
        "portmesh_data_size_bytes",
        "portmesh_process_resident_memory_bytes",
        "# EOF",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
    let _ = watcher.kill();
    let _ = watcher.wait();
    wait_until("the watch stream to close", Duration::from_secs(10), || {
        http_get(&http, "/metrics").1.contains("portmesh_watch_streams 0")
    });
}

/// Log lines: every address at start, each assignment with its holder, each conflict as a
/// warning with the holder, each fallback with both ports; JSON with --log-format json.
#[test]
fn the_node_logs_addresses_assignments_conflicts_and_fallbacks_as_json() {
    let h = Home::new();
    let data = h.path().join("data");
    let mut child = h
        .cmd(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--advertise",
            "node.example:7400",
            "--bootstrap",
            "--log-format",
            "json",
            "--data",
        ])
        .arg(&data)
        .env("RUST_LOG", "info,openraft=warn")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let mut until = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| -> serde_json::Value {
        if let Some(v) = seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        loop {
            let v = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no log line: {what}; saw {seen:#?}"));
            seen.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
    };
    let msg = |v: &serde_json::Value| v["fields"]["message"].as_str().unwrap_or("").to_string();
    let start = until("listening", &|v| msg(v) == "portmesh node listening");
    let grpc = start["fields"]["grpc"].as_str().unwrap().to_string();
    assert!(start["fields"]["http"].as_str().unwrap().contains("127.0.0.1:"), "{start}");
    let adv = until("advertised vs bound", &|v| msg(v).contains("advertised address"));
    assert_eq!(adv["fields"]["advertised"], "node.example:7400");
    assert_eq!(adv["fields"]["bound"], grpc.as_str());

    let squat = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = squat.local_addr().unwrap().port();
    h.pm(&["pools", "add", "near", &format!("{busy}-{}", busy + 20), "--node", &grpc]).ok();
    let got =
        h.pm(&["alloc", "api", "--pool", "near", "--port", &busy.to_string(), "--node", &grpc]).ok().ports()
            [0];
    assert_ne!(got, busy);
    let conflict = until("the conflict", &|v| msg(v).contains("conflict"));
    assert_eq!(conflict["level"], "WARN");
    assert_eq!(conflict["fields"]["port"], busy);
    assert!(
        conflict["fields"]["holder"].as_str().unwrap().contains(&std::process::id().to_string()),
        "{conflict}"
    );
    let fallback = until("the fallback", &|v| msg(v).contains("fell back"));
    assert_eq!(
        (fallback["fields"]["wanted"].as_u64(), fallback["fields"]["port"].as_u64()),
        (Some(u64::from(busy)), Some(u64::from(got)))
    );
    let assigned = until("the assignment", &|v| msg(v) == "allocated");
    assert_eq!(assigned["fields"]["port"], got);
    assert!(assigned["fields"]["holder"].as_str().unwrap().contains("pid "), "{assigned}");
    drop(squat);
    let _ = child.kill();
    let _ = child.wait();
}
