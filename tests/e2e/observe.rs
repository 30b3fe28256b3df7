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
    assert!(t["exhaustion_ms"].as_u64().is_some(), "{t}");
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
    let leased = gone("alloc leased --pool t --ttl 1h");
    let port = (20750..20770)
        .find(|p| port_is_free(*p) && p.to_string() != loose && p.to_string() != leased)
        .unwrap();
    let mut squatter = std::process::Command::new("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the squatter to listen", Duration::from_secs(10), || !port_is_free(port));

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
    assert!(
        out.contains(&format!("port {loose} (service loose, team default) is held with no lease by pid")),
        "{out}"
    );
    assert!(out.contains(&format!("fix: portmesh release {loose} --team default")), "{out}");
    assert!(out.contains(&format!("holds port {leased} (service leased) for pid")), "{out}");
    assert!(out.contains("fix: portmesh release --lease"), "{out}");
    assert!(
        out.contains(&format!("port {port} lies in a pool but is held by pid {}", squatter.id())),
        "{out}"
    );
    assert!(out.contains(&format!("fix: portmesh reserve {port}")), "{out}");
    assert!(out.contains("4 problem(s) found"), "{out}");

    let v = h.pm(&["doctor", "--json"]).json();
    assert_eq!(v["ok"], false);
    assert!(
        v["findings"].as_array().unwrap().iter().any(|f| f["check"] == "leases" && f["level"] == "warn"),
        "{v}"
    );

    // Unreachable: the address that was tried is named.
    let closed = closed_port().to_string();
    let addr = format!("127.0.0.1:{closed}");
    let r = h.pm(&["doctor", "--node", &addr]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("error cluster: no node answers") && r.stdout.contains(&closed), "{r:?}");
}
