//! `portmesh watch`: history from a revision, then live changes, one line (or JSON object) each.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use crate::support::*;

/// Lines of a child's stdout, read on a thread.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Reads lines until one satisfies `want` and returns it with the lines before it; panics after
/// 20 s naming what was read.
fn read_until(rx: &mpsc::Receiver<String>, what: &str, want: impl Fn(&str) -> bool) -> (String, Vec<String>) {
    let mut read = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) if want(&l) => return (l, read),
            Ok(l) => read.push(l),
            Err(e) => panic!("no line with {what} ({e}); read: {read:#?}"),
        }
    }
}

#[test]
fn watch_replays_history_from_a_revision_then_follows_live_changes() {
    let h = Home::new();
    let first = h.pm(&["alloc", "api"]).ok().ports()[0];
    let mut child = h.cmd(&["watch", "--json", "--from", "1"]).stdout(Stdio::piped()).spawn().unwrap();
    let rx = lines_of(&mut child);
    let (line, _) = read_until(&rx, "the earlier allocation", |l| {
        l.contains("\"allocated\"") && l.contains(&format!("\"port\":{first}"))
    });
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["allocation"]["service"], "api");
    let rev = v["revision"].as_u64().unwrap();
    let second = h.pm(&["alloc", "web-2", "--pool", "web"]).ok().ports()[0];
    let (line, _) = read_until(&rx, "the live allocation", |l| l.contains(&format!("\"port\":{second}")));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(v["revision"].as_u64().unwrap() > rev);
    h.pm(&["release", &second.to_string()]).ok();
    read_until(&rx, "the release", |l| {
        l.contains("\"released\"") && l.contains(&format!("\"port\":{second}"))
    });
    child.kill().unwrap();
    child.wait().unwrap();

    // Text, filtered by pool: only the web pool's changes.
    let mut child = h.cmd(&["watch", "--from", "1", "--pool", "web"]).stdout(Stdio::piped()).spawn().unwrap();
    let rx = lines_of(&mut child);
    let (line, before) = read_until(&rx, "the web allocation", |l| l.contains("allocated"));
    assert!(line.contains(&format!("{second} web/web-2")), "{line}");
    // The earlier allocation in pool default (service api) came first in the history: filtered out.
    assert!(before.iter().all(|l| !l.contains("default/api")), "{before:#?}");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn log_lists_assignments_releases_and_expiries_in_order_with_the_host() {
    let h = Home::new();
    // A pool of the test's own: listeners of the host's programs in the default pools would add
    // conflicts to the log.
    h.pm(&["pools", "add", "audit", "20720-20739"]).ok();
    let p = h.pm(&["alloc", "api", "--pool", "audit"]).ok().ports()[0];
    h.pm(&["release", &p.to_string()]).ok();
    let q = h.pm(&["alloc", "worker", "--pool", "audit", "--ttl", "1s"]).ok().ports()[0];
    wait_until("the 1 s lease to expire", Duration::from_secs(20), || h.live_ports().is_empty());
    let out = h.pm(&["log"]).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    let at = |what: &str, port: u16| {
        lines
            .iter()
            .position(|l| l.contains(what) && l.contains(&format!(" {port} ")))
            .unwrap_or_else(|| panic!("no {what} of {port} in {lines:#?}"))
    };
    assert!(at("allocated", p) < at("released", p));
    assert!(at("released", p) < at("allocated", q));
    assert!(at("allocated", q) < at("expired", q));
    assert!(lines[at("allocated", p)].contains("api") && lines[at("allocated", p)].contains("host "));
    assert!(!out.stdout.contains("pool_added"), "only port events: {lines:#?}");
    let json = h.pm(&["log", "--json"]).ok();
    let types: Vec<String> = json
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types, ["allocated", "released", "allocated", "expired"], "{json:?}");
}

/// The audit log names who held each port: the process that ran `portmesh alloc` (its parent,
/// the script), and for a conflict the process the probe found listening.
#[test]
fn log_names_the_holder_pid_and_command_of_assignments_and_conflicts() {
    let h = Home::new();
    h.pm(&["status"]).ok();
    // A script that allocates: it is the holder.
    let script = format!("{BIN} alloc shop-api --port 10500; echo script-pid $$");
    let run = std::process::Command::new("sh")
        .args(["-c", &script])
        .env("PORTMESH_HOME", h.path())
        .env_remove("PORTMESH_NODE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{run:?}");
    let script_pid: u32 =
        stdout.lines().find_map(|l| l.strip_prefix("script-pid ")).unwrap().parse().unwrap();
    // Someone else listens on the wanted port: a conflict naming this test process.
    let squatter = std::net::TcpListener::bind("127.0.0.1:10600").unwrap();
    h.pm(&["alloc", "shop-web", "--port", "10600", "--strategy", "next"]).ok();
    drop(squatter);
    let lines: Vec<serde_json::Value> =
        h.pm(&["log", "--json"]).ok().stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let alloc = lines.iter().find(|e| e["type"] == "allocated" && e["allocation"]["port"] == 10500).unwrap();
    assert_eq!(alloc["allocation"]["pid"], script_pid, "{alloc}");
    assert!(alloc["allocation"]["command"].as_str().unwrap().starts_with("sh -c"), "{alloc}");
    let conflict = lines.iter().find(|e| e["type"] == "conflict").unwrap();
    assert_eq!(conflict["conflict"]["port"], 10600);
    assert_eq!(conflict["conflict"]["pid"], std::process::id(), "{conflict}");
    let text = h.pm(&["log"]).ok().stdout;
    assert!(
        text.lines().any(|l| l.contains("conflict") && l.contains(&format!("pid {}", std::process::id()))),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.contains(" 10500 ") && l.contains(&format!("pid {script_pid} (sh -c"))),
        "{text}"
    );
}
