//! SPEC §6: every bad input gets a specific error and changes nothing.

use crate::support::*;

/// Everything a bad input must leave untouched.
fn snapshot(h: &Home) -> (serde_json::Value, serde_json::Value) {
    let mut ls = h.pm(&["ls", "--all-teams", "--json"]).ok().json();
    ls.as_object_mut().unwrap().remove("revision");
    let pools = h.pm(&["pools", "ls", "--json"]).ok().json();
    (ls, pools)
}

#[test]
fn bad_inputs_are_refused_with_specific_messages_and_change_nothing() {
    let h = Home::new();
    h.pm(&["pools", "add", "tiny", "20000-20001"]).ok();
    h.pm(&["alloc", "a", "--pool", "tiny", "--count", "2"]).ok();
    h.pm(&["alloc", "held", "--pool", "web", "--port", "8100"]).ok();
    let before = snapshot(&h);
    let rev_before = h.pm(&["status", "--json"]).ok().json()["revision"].clone();

    let cases: &[(&[&str], &str)] = &[
        (&["alloc", "x", "--port", "80"], "--port 80: port 80 is out of range: ports must lie in 1024-65535"),
        (&["alloc", "x", "--port", "30000"], "port 30000 is outside the pools of team \"default\""),
        (&["alloc", "x", "--pool", "nosuch"], "unknown pool \"nosuch\" in team \"default\""),
        (&["alloc", "x", "--team", "ghosts"], "unknown team \"ghosts\""),
        (
            &["alloc", "x", "--pool", "tiny"],
            "pool \"tiny\" of team \"default\" exhausted: 2 ports, 2 unavailable (held 2: a: 2)",
        ),
        (
            &["alloc", "x", "--port", "8100", "--strategy", "fail"],
            "port 8100 is not available: allocated to \"held\"",
        ),
        (&["alloc", "x", "--ttl", "10ms"], "lease TTL 10 ms is out of bounds"),
        (&["alloc", "x", "--lease", "999"], "unknown lease 999 in team \"default\""),
        (&["pools", "add", "inv", "9000-8000"], "range 9000-8000 is inverted"),
        (&["pools", "add", "low", "80-90"], "port 80 is out of range"),
        (&["pools", "add", "ovl", "8500-8600"], "overlaps pool \"web\" of team \"default\" (8000-8999)"),
        (&["pools", "add", "web", "30000-30010"], "pool \"web\" already exists in team \"default\""),
        (&["pools", "add", "x", "abc"], "cannot read \"abc\" as a port range"),
        (&["pools", "rm", "nosuch"], "unknown pool \"nosuch\""),
        (&["pools", "rm", "tiny"], "still has 2 live allocation(s)"),
        (&["release", "12345"], "port 12345 is not allocated in team \"default\""),
        (&["release", "8100", "12345"], "port 12345 is not allocated"),
        (&["release", "--key", "nope"], "no live allocation has key \"nope\""),
        (&["release", "--lease", "999"], "unknown lease 999"),
        (&["renew", "--lease", "999"], "lease 999 no longer exists"),
        (&["unreserve", "9999"], "port 9999 is not reserved"),
        (&["reserve", "8100"], "port 8100 is allocated to \"held\""),
        (&["reserve", "100"], "port 100 is out of range"),
        (&["release", "8100", "--team", "other"], "port 8100 is not allocated in team \"other\""),
    ];
    for (args, msg) in cases {
        let r = h.pm(args);
        assert_ne!(r.code, 0, "{args:?} should fail: {r:?}");
        assert!(r.stderr.contains(msg), "{args:?}: stderr lacks {msg:?}: {}", r.stderr);
        assert!(r.stderr.starts_with("portmesh: error: "), "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{args:?} printed to stdout: {r:?}");
        assert_eq!(snapshot(&h), before, "{args:?} changed the state");
    }
    assert_eq!(h.pm(&["status", "--json"]).ok().json()["revision"], rev_before, "no revision was spent");
}

#[test]
fn malformed_arguments_are_usage_errors() {
    let h = Home::new();
    for args in [
        &["alloc", "--port", "70000"][..],
        &["alloc", "--strategy", "nearest"],
        &["alloc", "--count", "0"],
        &["release"],
    ] {
        let r = h.pm(args);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
    }
    let r = h.pm(&["alloc", "--strategy", "nearest"]);
    assert!(r.stderr.contains("use sticky, next, random or fail"), "{r:?}");
    // `--ttl 0s` made a permanent allocation and told the user to renew "lease 0"; `--port 0`
    // silently meant any port.
    for (args, msg) in [
        (&["alloc", "x", "--ttl", "0s"][..], "a lease of 0 would never expire: leave --ttl out for no lease"),
        (&["run", "--ttl", "0s", "--", "true"], "a lease of 0 would never expire"),
        (&["alloc", "x", "--port", "0"], "0 is not a port: leave --port out to take any port of the pool"),
    ] {
        let r = h.pm(args);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        assert!(r.stderr.contains(msg), "{args:?}: {r:?}");
    }
    // `serve`'s new settings: each refused by name before a data directory is made.
    let data = h.path().join("never");
    let d = data.to_str().unwrap();
    for (args, code, msg) in [
        (&["serve", "--data", d, "--seeds", "portmesh-0"][..], 2, "\"portmesh-0\" is not HOST:PORT"),
        (&["serve", "--data", d, "--seeds", "a:1", "--bootstrap"], 2, "cannot be used with"),
        (
            &["serve", "--data", d, "--join-token", "pmt_x"],
            1,
            "--join-token (PORTMESH_JOIN_TOKEN) is for joining",
        ),
        (&["serve", "--data", d, "--admin-token-file", "/nonexistent"], 1, "add --auth"),
    ] {
        let r = h.pm(args);
        assert_eq!(r.code, code, "{args:?}: {r:?}");
        assert!(r.stderr.contains(msg), "{args:?}: {r:?}");
    }
    let r = h.cmd(&["serve", "--data", d]).env("PORT", "http").output().unwrap();
    assert!(String::from_utf8_lossy(&r.stderr).contains("PORT=\"http\" is not a port"), "{r:?}");
    assert!(!data.exists(), "a refused serve makes no data directory");
    assert!(h.info().is_none(), "usage errors start no node");
}

#[test]
fn an_unreachable_node_is_named_with_what_was_tried() {
    let h = Home::new();
    let refusing = refusing_port();
    let addr = format!("127.0.0.1:{}", refusing.port);
    for args in [&["--node", &addr, "ls"][..], &["--node", &addr, "alloc", "x"], &["--node", &addr, "stop"]] {
        h.pm(args).fails_with(&format!("cannot reach a portmesh node at {addr} (tried a gRPC connection"));
    }
    let r = h.cmd(&["alloc", "x"]).env("PORTMESH_NODE", &addr).output().unwrap();
    assert!(String::from_utf8_lossy(&r.stderr).contains(&addr));
    assert!(h.info().is_none(), "--node never starts a local node");
}

/// Names have a length and a character set: an oversized or control-character name is refused
/// at the boundary naming the field and the limit, never echoing the value, and nothing changes
/// (before, 36 allocations with 120 KB service names made `ls` fail for everyone, and a newline
/// in a service name forged a line in the node log and in `log`/`watch` output).
#[test]
fn oversized_and_control_character_names_are_refused_without_echoing_them() {
    let h = Home::new();
    h.pm(&["alloc", "kept"]).ok();
    let before = snapshot(&h);
    let huge = "s".repeat(120_000);
    let team = "t".repeat(100_000);
    // Arguments, environment, the message.
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (vec!["alloc", &huge], vec![], "items.service: 120000 bytes, at most 63"),
        (
            vec!["alloc", "evil\nportmesh: forged"],
            vec![],
            "items.service: character '\\n' (at byte 4) is not allowed",
        ),
        (vec!["alloc", "x", "--key", "a key"], vec![], "items.key: character ' ' (at byte 1) is not allowed"),
        (vec!["alloc", "x", "--env", "prod/x"], vec![], "items.env: character '/' (at byte 4)"),
        (vec!["ls"], vec![("PORTMESH_TEAM", team.as_str())], "team: 100000 bytes, at most 63"),
        (vec!["pools", "add", &huge, "30000-30010"], vec![], "name: 120000 bytes, at most 63"),
        (vec!["register", "svc", "--port", "20100", "--tag", "a b"], vec![], "service.tags: character ' '"),
    ];
    for (args, env, msg) in &cases {
        let mut cmd = h.cmd(args);
        cmd.envs(env.iter().copied());
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{msg}: should fail");
        assert!(stderr.contains(msg), "stderr lacks {msg:?}: {}", &stderr[..stderr.len().min(500)]);
        assert!(stderr.len() < 1_000, "the error echoed the value ({} bytes)", stderr.len());
        assert!(!stderr.contains("transport error"), "{stderr}");
        assert_eq!(snapshot(&h), before, "{msg}: the state changed");
    }
    // The node log has no forged line either.
    let log = std::fs::read_to_string(h.path().join("node.log")).unwrap();
    assert!(!log.lines().any(|l| l.starts_with("portmesh: forged")), "{log}");
}

/// A holder's command line keeps what identifies the process and not its secrets: the parent
/// of `portmesh alloc` here carries `--db-password=hunter2`, which must not reach listings, the
/// audit log, the status page or the node's log.
#[test]
fn secrets_in_a_holders_command_line_are_not_recorded() {
    let h = Home::new();
    let script =
        format!("{} alloc secret-holder; : --db-password=hunter2 API_TOKEN=tok3n", crate::support::BIN);
    let run = std::process::Command::new("bash")
        .args(["-c", &script])
        .env("PORTMESH_HOME", h.path())
        .env_remove("PORTMESH_NODE")
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    let ls = h.pm(&["ls", "--json"]).ok().stdout;
    let log = h.pm(&["log", "--json"]).ok().stdout;
    let (_, status) = http_get(&h.http(), "/api/v1/status");
    let node_log = std::fs::read_to_string(h.path().join("node.log")).unwrap();
    for (what, text) in [("ls", &ls), ("log", &log), ("status", &status), ("node.log", &node_log)] {
        assert!(!text.contains("hunter2") && !text.contains("tok3n"), "{what} shows a secret: {text}");
    }
    assert!(ls.contains("--db-password=***") && ls.contains("API_TOKEN=***"), "{ls}");
}
