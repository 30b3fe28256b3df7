//! The host probe: busy ports are skipped and recorded; `check` names the holder.

use std::net::TcpListener;

use crate::support::*;

#[test]
fn ports_held_by_other_processes_are_skipped_and_recorded_as_conflicts() {
    let h = Home::new();
    h.pm(&["pools", "add", "probe", "21000-21009"]).ok();
    // Someone else listens on the first two: one on IPv4 loopback, one on the IPv6 wildcard.
    let _a = TcpListener::bind("127.0.0.1:21000").expect("bind 21000");
    let _b = TcpListener::bind("[::]:21001").expect("bind [::]:21001");
    assert_eq!(h.pm(&["alloc", "app", "--pool", "probe"]).ok().ports(), [21002]);
    h.pm(&["alloc", "app", "--port", "21000", "--strategy", "fail"])
        .fails_with("port 21000 is not available: in use on host");
    assert_eq!(h.pm(&["alloc", "app", "--port", "21001", "--strategy", "next"]).ok().ports(), [21003]);
    let (_, body) = http_get(&h.http(), "/api/v1/status");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let conflicts: Vec<u64> =
        v["recent_conflicts"].as_array().unwrap().iter().map(|c| c["port"].as_u64().unwrap()).collect();
    assert!(conflicts.contains(&21000) && conflicts.contains(&21001), "{conflicts:?}");
}

#[test]
fn check_reports_free_and_busy_with_the_owning_process() {
    let h = Home::new();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = l.local_addr().unwrap().port();
    let free = closed_port();
    let r = h.pm(&["check", &busy.to_string(), &free.to_string()]);
    assert_eq!(r.code, 1, "a busy port makes check exit 1: {r:?}");
    assert!(r.stdout.contains(&format!("{busy} busy pid {}", std::process::id())), "{r:?}");
    assert!(r.stdout.contains(&format!("{free} free")), "{r:?}");
    let v = h.pm(&["check", &free.to_string(), "--json"]).ok().json();
    assert_eq!(v["ports"][0]["free"], true);
    assert_eq!(v["ports"][0]["time_wait"], 0);
    assert!(h.info().is_none(), "check is local: it starts no node");

    // A port held by nothing but a closed client connection (the client closed first, so its
    // local port lingers in TIME_WAIT) is busy, and check says why instead of "owner not visible".
    let lingering = portmesh_probe::port_in_time_wait().unwrap();
    let r = h.pm(&["check", &lingering.to_string()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains(&format!("{lingering} busy: "))
            && r.stdout.contains("in TIME_WAIT")
            && r.stdout.contains("the kernel frees it within a minute"),
        "{r:?}"
    );
    let v = h.pm(&["check", &lingering.to_string(), "--json"]).json();
    assert!(v["ports"][0]["time_wait"].as_u64() >= Some(1), "{v}");
    assert_eq!(v["ports"][0]["owners"], serde_json::json!([]), "{v}");

    // With a node running, a port portmesh handed out is named with its service, key and team
    // beside the process that listens there.
    h.pm(&["pools", "add", "chk", "21020-21029"]).ok();
    let held = h.pm(&["alloc", "web", "--pool", "chk", "--key", "shop/web"]).ok().ports()[0];
    let _listening = TcpListener::bind(("127.0.0.1", held)).unwrap();
    let r = h.pm(&["check", &held.to_string()]);
    assert!(
        r.stdout.contains(&format!("{held} busy pid {}", std::process::id()))
            && r.stdout.contains("allocated by portmesh to service web (team default, key shop/web)"),
        "{r:?}"
    );
    let v = h.pm(&["check", &held.to_string(), "--json"]).json();
    assert_eq!(v["ports"][0]["portmesh"]["key"], "shop/web", "{v}");
}

/// The process a probe finds on a busy port is recorded without its secrets: a listener whose
/// command line carries `--api-token=s3cr3t` shows up in the conflict as `--api-token=***`.
#[test]
fn a_conflicts_holder_is_recorded_without_its_secrets() {
    let h = Home::new();
    h.pm(&["pools", "add", "secret", "21010-21019"]).ok();
    // The listener takes the first port of the pool it can bind and says which.
    let listener = "import socket,sys,time\n\
        for p in range(21010, 21020):\n\
        \x20   s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
        \x20   try: s.bind(('127.0.0.1', p))\n\
        \x20   except OSError: continue\n\
        \x20   s.listen(); print(p, flush=True); time.sleep(120)\n";
    let mut child = std::process::Command::new("python3")
        // The program comes from the environment, so the command line stays short (a recorded
        // command line is cut at 256 bytes) and ends with the secret.
        .args(["-c", "exec(__import__('os').environ['LISTENER'])", "--api-token=s3cr3t"])
        .env("LISTENER", listener)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line)
        .unwrap();
    let port: u16 = line.trim().parse().unwrap_or_else(|_| panic!("the listener bound no port: {line:?}"));
    h.pm(&["alloc", "app", "--pool", "secret", "--port", &port.to_string(), "--strategy", "next"]).ok();
    let log = h.pm(&["log", "--json"]).ok().stdout;
    let conflict =
        log.lines().find(|l| l.contains("\"conflict\"")).unwrap_or_else(|| panic!("no conflict: {log}"));
    assert!(conflict.contains("--api-token=***"), "{conflict}");
    assert!(!log.contains("s3cr3t"), "{log}");
    let _ = child.kill();
    let _ = child.wait();
}

/// Issue 17: a sticky port never moves silently. When a key's last port is busy on the host (or
/// taken), the allocation says so in one line: the old port, who holds it, the new port.
#[test]
fn a_sticky_key_that_gets_another_port_says_which_and_who_holds_its_old_one() {
    let h = Home::new();
    h.pm(&["pools", "add", "mv", "20850-20859"]).ok();
    let first = h.pm(&["alloc", "web", "--pool", "mv", "--key", "shop/web"]).ok().ports()[0];
    h.pm(&["release", "--key", "shop/web"]).ok();
    let _squatter = TcpListener::bind(("127.0.0.1", first)).unwrap();
    let r = h.pm(&["alloc", "web", "--pool", "mv", "--key", "shop/web"]).ok();
    let second = r.ports()[0];
    assert_ne!(second, first);
    assert!(
        r.stderr.contains(&format!("web's port {first} is held by pid {}", std::process::id()))
            && r.stderr.contains(&format!("it gets port {second} this time")),
        "{r:?}"
    );
    // Kept, it says nothing.
    let again = h.pm(&["alloc", "web", "--pool", "mv", "--key", "shop/web"]).ok();
    assert!(!again.stderr.contains("this time"), "{again:?}");
    // Its old port allocated to another key: that key is named (the node is asked for the
    // holder of that port alone).
    h.pm(&["pools", "cooldown", "0"]).ok();
    h.pm(&["release", "--key", "shop/web"]).ok();
    h.pm(&["alloc", "api", "--pool", "mv", "--port", &second.to_string(), "--key", "blog/api"]).ok();
    let r = h.pm(&["alloc", "web", "--pool", "mv", "--key", "shop/web"]).ok();
    assert!(
        r.stderr.contains(&format!("web's port {second} is held by key blog/api (team default"))
            && r.stderr.contains("this time"),
        "{r:?}"
    );
}
