//! `portmesh register`, `discover` and `deregister` against a real local node: filters, health
//! checks run by the node (tcp and command), and bad input.

use std::net::TcpListener;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// The services `discover` lists (with `extra` arguments), as JSON.
fn discover(h: &Home, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["discover", "--json"];
    args.extend_from_slice(extra);
    h.pm(&args).ok().json()["services"].as_array().unwrap().clone()
}

fn ids(services: &[Value]) -> Vec<String> {
    services.iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
}

fn status_of(h: &Home, id: &str) -> String {
    discover(h, &["--all"])
        .iter()
        .find(|s| s["id"] == id)
        .map(|s| s["status"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("{id} is not registered"))
}

#[track_caller]
fn wait_status(h: &Home, id: &str, want: &str) {
    wait_until(&format!("{id} to be {want}"), Duration::from_secs(20), || status_of(h, id) == want);
}

#[test]
fn discovery_filters_by_name_project_env_and_tags_and_hides_unhealthy() {
    let h = Home::new();
    let reg = |args: &[&str]| {
        let mut a = vec!["register"];
        a.extend_from_slice(args);
        h.pm(&a).ok().stdout.trim().to_string()
    };
    let shop = reg(&[
        "api",
        "--port",
        "http=18001/http",
        "--port",
        "admin=18002",
        "--project",
        "shop",
        "--env",
        "dev",
        "--tag",
        "v1",
        "--tag",
        "blue",
    ]);
    let blog = reg(&["api", "--port", "18003", "--project", "blog", "--env", "test", "--tag", "v2"]);
    let db = reg(&["db", "--port", "18004", "--project", "shop", "--env", "dev", "--id", "shop-db"]);
    assert!(shop.starts_with("api@") && shop.ends_with(":18001"), "default id NAME@HOST:PORT: {shop}");
    assert_eq!(db, "shop-db");

    assert_eq!(ids(&discover(&h, &["api"])), [shop.clone(), blog.clone()], "by name, ordered by id");
    assert_eq!(ids(&discover(&h, &["--project", "shop"])), [shop.clone(), db.clone()]);
    assert_eq!(ids(&discover(&h, &["api", "--env", "test"])), [blog.as_str()]);
    assert_eq!(ids(&discover(&h, &["--tag", "v1"])), [shop.as_str()]);
    assert_eq!(ids(&discover(&h, &["--tag", "v1", "--tag", "blue"])), [shop.as_str()]);
    assert!(discover(&h, &["--tag", "v1", "--tag", "v2"]).is_empty(), "every tag must match");
    assert!(discover(&h, &["nothing"]).is_empty());
    assert!(discover(&h, &["--team", "other"]).is_empty(), "another team sees none of them");
    let s = &discover(&h, &["--tag", "v1"])[0];
    assert_eq!(s["ports"][1]["name"], "admin");
    assert_eq!(s["ports"][0]["protocol"], "http");
    assert_eq!(s["status"], "passing", "no check: passing");

    // A service with a check that fails is critical and hidden unless --all.
    let dead = refusing_port();
    let port = dead.port.to_string();
    let down = reg(&["cache", "--port", &port, "--check", "tcp", "--interval", "100ms"]);
    wait_status(&h, &down, "critical");
    assert!(!ids(&discover(&h, &[])).contains(&down), "critical services are not discovered");
    assert!(ids(&discover(&h, &["--all"])).contains(&down));
    let text = h.pm(&["discover", "--all"]).ok().stdout;
    assert!(text.lines().any(|l| l.starts_with("cache") && l.contains("critical")), "{text}");

    // Deregistering removes it; a second time is refused, naming the id.
    h.pm(&["deregister", &down]).ok();
    h.pm(&["deregister", &down])
        .fails_with(&format!("no service {down:?} is registered in team \"default\""));
    assert_eq!(discover(&h, &["--all"]).len(), 3);
}

/// A TCP check follows a listener going away and coming back; a command check follows a file.
/// Each transition shows up once in the watch history, with what the check said.
#[test]
fn health_checks_go_critical_when_a_service_stops_answering_and_passing_when_it_is_back() {
    let h = Home::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let tcp = h
        .pm(&["register", "web", "--port", &port, "--check", "tcp", "--interval", "100ms", "--failures", "2"])
        .ok()
        .stdout
        .trim()
        .to_string();
    wait_status(&h, &tcp, "passing");
    assert_eq!(ids(&discover(&h, &["web"])), [tcp.as_str()]);
    drop(listener);
    wait_status(&h, &tcp, "critical");
    assert!(discover(&h, &["web"]).is_empty());
    let listener = TcpListener::bind(format!("127.0.0.1:{port}")).unwrap();
    wait_status(&h, &tcp, "passing");

    let flag = h.path().join("ready");
    let cmd = format!("cmd:test -e {}", flag.display());
    let job = h
        .pm(&["register", "worker", "--port", "18010", "--check", &cmd, "--interval", "100ms"])
        .ok()
        .stdout
        .trim()
        .to_string();
    wait_status(&h, &job, "critical");
    std::fs::write(&flag, b"").unwrap();
    wait_status(&h, &job, "passing");
    drop(listener);

    // `watch` follows until interrupted: read its history up to the current revision.
    let rev = h.pm(&["status", "--json"]).ok().json()["revision"].as_u64().unwrap();
    let mut child =
        h.cmd(&["watch", "--from", "1", "--json"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let events = read_events(&mut child, rev);
    let _ = child.kill();
    let _ = child.wait();
    let changes: Vec<(String, String, String)> = events
        .iter()
        .filter(|e| e["type"] == "health_changed")
        .map(|e| {
            (
                e["service_id"].as_str().unwrap().to_string(),
                e["previous"].as_str().unwrap().to_string(),
                e["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let of = |id: &str| -> Vec<(String, String)> {
        changes.iter().filter(|c| c.0 == id).map(|c| (c.1.clone(), c.2.clone())).collect()
    };
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        of(&tcp),
        [pair("unknown", "passing"), pair("passing", "critical"), pair("critical", "passing")],
        "{events:#?}"
    );
    assert_eq!(of(&job), [pair("unknown", "critical"), pair("critical", "passing")]);
    let critical = events
        .iter()
        .find(|e| {
            e["type"] == "health_changed" && e["status"] == "critical" && e["service_id"] == tcp.as_str()
        })
        .unwrap();
    assert!(critical["output"].as_str().unwrap().contains(&port), "the output names the port: {critical}");
    assert_eq!(events.iter().filter(|e| e["type"] == "service_registered").count(), 2);
}

/// Reads `watch --json` lines until the event history reaches `rev`.
fn read_events(child: &mut std::process::Child, rev: u64) -> Vec<Value> {
    use std::io::{BufRead, BufReader};
    let (tx, rx) = std::sync::mpsc::channel();
    let out = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut events = Vec::new();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}: {events:#?}"));
        let v: Value = serde_json::from_str(&line).unwrap();
        let r = v["revision"].as_u64().unwrap();
        events.push(v);
        if r >= rev {
            return events;
        }
    }
}

#[test]
fn bad_registrations_name_the_problem_and_register_nothing() {
    let h = Home::new();
    h.pm(&["register", "api", "--port", "80"]).fails_with("port 80 is out of range");
    h.pm(&["register", "api", "--port", "a=18001", "--port", "a=18002"]).fails_with("names port \"a\" twice");
    h.pm(&["register", "api", "--port", "18001", "--check", "http"]).ok();
    h.pm(&["register", "bad name", "--port", "18001"])
        .fails_with("service.name: character ' ' (at byte 3) is not allowed");
    h.pm(&["register", "api", "--port", "18001", "--check", "ping"]).fails_with("write tcp, http:/PATH");
    h.pm(&["register", "api", "--port", "18001", "--check", "tcp", "--check-port", "admin"])
        .fails_with("the check names port \"admin\", but service \"api\" has ports: main");
    h.pm(&["register", "api", "--port", "18001", "--check", "tcp", "--interval", "10ms"])
        .fails_with("check interval 10 ms is too short");
    h.pm(&["register", "api", "--port", "18001", "--lease", "4242"]).fails_with("unknown lease 4242");
    h.pm(&["register", "api", "--port", "18001", "--project", "a b"])
        .fails_with("service.project: character ' ' (at byte 1) is not allowed");
    assert_eq!(discover(&h, &["--all"]).len(), 1, "only the one valid registration");
}
