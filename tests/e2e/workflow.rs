//! The developer workflow: `run`, `up`, `down`, `ps`, `env`, `config show`, with real child
//! processes on the ports the local node hands out. Each test draws from a pool of its own
//! (20100-20699), so tests running at once never bind each other's ports.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::*;

/// A home whose node has pool `t` = `range`.
fn home_with_pool(range: &str) -> Home {
    let h = Home::new();
    h.pm(&["pools", "add", "t", range]).ok();
    h
}

/// A TCP server for a service: python's http.server on `{port}`.
const SERVER: &str = "python3 -m http.server {port} --bind 127.0.0.1";

/// The processes `pid` started that still run (Linux's `children` file of its main thread).
fn children_of(pid: u32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn services_of(h: &Home) -> Vec<serde_json::Value> {
    h.pm(&["discover", "--all", "--json"]).ok().json()["services"].as_array().unwrap().clone()
}

#[test]
fn run_sets_the_port_variables_fills_its_arguments_and_exits_with_the_childs_status() {
    let h = home_with_pool("20450-20469");
    let r = h.pm(&[
        "run", "--pool", "t", "--service", "echo", "--ports", "http,admin", "--", "sh", "-c",
        "echo $PORT $PORT_HTTP $PORT_ADMIN $ECHO_PORT $ECHO_PORT_ADMIN {port} {port.admin} $PORTMESH_LEASE; exit 3",
    ]);
    assert_eq!(r.code, 3, "{r:?}");
    let words: Vec<&str> = r.stdout.split_whitespace().collect();
    assert_eq!(words.len(), 8, "{r:?}");
    let (http, admin) = (words[0], words[2]);
    assert_ne!(http, admin);
    assert_eq!([words[1], words[3], words[5]], [http, http, http]);
    assert_eq!([words[4], words[6]], [admin, admin]);
    assert!((20450..=20469).contains(&http.parse::<u16>().unwrap()));
    assert!(words[7].parse::<u64>().unwrap() > 0, "the lease is passed on");
    assert!(h.live_ports().is_empty(), "released on exit");
    assert!(services_of(&h).is_empty(), "deregistered on exit");

    // The variables well-known servers read by themselves, and the port said on stderr.
    let r = h.pm(&["run", "--pool", "t", "--", "sh", "-c", "echo $PORT $FLASK_RUN_PORT $UVICORN_PORT"]);
    assert_eq!(r.code, 0, "{r:?}");
    let words: Vec<&str> = r.stdout.split_whitespace().collect();
    assert_eq!((words.len(), words[1], words[2]), (3, words[0], words[0]), "{r:?}");
    assert!(r.stderr.contains(&format!("portmesh: sh runs on port {}", words[0])), "{r:?}");
    // A socket handed over (fd://) without --fd: caught before anything is taken or started.
    let r = h.pm(&["run", "--pool", "t", "--", "gunicorn", "--bind", "fd://3", "app:app"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("--fd is not given: add --fd"), "{r:?}");
    assert!(h.live_ports().is_empty(), "nothing taken");

    let r = h.pm(&["run", "--pool", "t", "--", "sh", "-c", "echo {port.nope}"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("no port named \"nope\""), "{r:?}");
    assert!(h.live_ports().is_empty(), "a bad argument releases what it took");
    // --fd on an address this host does not have: nothing bound, nothing kept.
    let r = h.pm(&["run", "--pool", "t", "--fd", "--bind", "192.0.2.1", "--", "true"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("cannot bind 192.0.2.1:"), "{r:?}");
    assert!(h.live_ports().is_empty(), "the lease was revoked");
    for (ports, want) in [("a,a", "port name \"a\" appears twice"), ("a,b.c", "port name \"b.c\"")] {
        let r = h.pm(&["run", "--pool", "t", "--ports", ports, "--", "true"]);
        assert_ne!(r.code, 0);
        assert!(r.stderr.contains(want), "{r:?}");
        assert!(h.live_ports().is_empty(), "nothing taken");
    }
}

#[test]
fn run_passes_sigint_on_registers_the_service_and_releases_when_it_ends() {
    let h = home_with_pool("20470-20489");
    let mut child = h
        .cmd(&[
            "run",
            "--pool",
            "t",
            "--service",
            "trapper",
            "--",
            "sh",
            "-c",
            "trap 'echo got INT; exit 5' INT; echo ready; while :; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    wait_until("the registration", Duration::from_secs(10), || services_of(&h).len() == 1);
    let svc = &services_of(&h)[0];
    assert_eq!(svc["name"], "trapper");
    // The registration names the `run` process (it was made with the allocation, before the
    // command started), as the allocation's holder does.
    assert_eq!(svc["pid"].as_u64(), Some(u64::from(child.id())), "{svc}");
    assert!(svc["command"].as_str().unwrap().starts_with("sh -c trap"), "{svc}");
    assert_eq!(h.live_ports().len(), 1);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "got INT");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(5));
    assert!(h.live_ports().is_empty());
    assert!(services_of(&h).is_empty());
}

#[test]
fn run_killed_with_sigkill_takes_its_child_along_and_its_port_comes_back_when_the_lease_runs_out() {
    let h = home_with_pool("20490-20499");
    let mut child = h
        .cmd(&["run", "--pool", "t", "--ttl", "2s", "--service", "held", "--", "sleep", "600"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let wrapper = child.id();
    wait_until("the registration and the command", Duration::from_secs(10), || {
        services_of(&h).len() == 1 && !children_of(wrapper).is_empty()
    });
    // The registration names the `run` process, as its allocation does: it was made in the
    // allocation's step, before the command started.
    assert_eq!(services_of(&h)[0]["pid"].as_u64(), Some(u64::from(wrapper)));
    let server = children_of(wrapper)[0];
    assert_eq!(h.live_ports().len(), 1);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    wait_until("the child to follow its wrapper", Duration::from_secs(10), || !process_runs(server));
    wait_until("the lease to run out", Duration::from_secs(15), || h.live_ports().is_empty());
    assert!(services_of(&h).is_empty(), "the registration went with the lease");
    let log = h.pm(&["log", "--json"]).ok().stdout;
    assert!(log.contains("\"type\":\"expired\""), "{log}");
}

#[test]
fn up_starts_in_dependency_order_with_each_port_and_env_prints_the_stack() {
    let h = home_with_pool("20100-20149");
    let dir = tempfile::tempdir().unwrap();
    let order = dir.path().join("order.log");
    let svc = |name: &str| {
        format!(
            "command = \"echo {name} $PORT $DB_PORT >> {} && exec {SERVER}\"\npool = \"t\"\ncheck = \"tcp\"\n",
            order.display()
        )
    };
    let f = project(
        dir.path(),
        &format!(
            "project = \"ordered\"\n[services.db]\n{}\n[services.api]\n{}depends_on = [\"db\"]\n[services.api.env]\nDATABASE_URL = \"postgresql://{{host}}:{{db.port}}/app\"\n[services.web]\n{}depends_on = [\"api\"]\n",
            svc("db"),
            svc("api"),
            svc("web")
        ),
    );
    let f = f.to_str().unwrap();
    let up = h.pm(&["up", "-d", "-f", f]).ok();
    assert!(up.stdout.contains("ordered/dev/default is up"), "{up:?}");
    let ports = h.stack_ports(&["-f", f]);
    assert_eq!(ports.len(), 3);
    let text = std::fs::read_to_string(&order).unwrap();
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.iter().map(|l| l[0]).collect::<Vec<_>>(), ["db", "api", "web"], "{text}");
    for l in &lines {
        assert_eq!(l[1].parse::<u16>().unwrap(), ports[l[0]], "PORT of {}", l[0]);
        assert_eq!(l[2].parse::<u16>().unwrap(), ports["db"], "every service sees DB_PORT");
    }
    for (name, port) in &ports {
        assert!(!port_is_free(*port), "{name} listens on {port}");
    }
    let ps = h.pm(&["ps", "-f", f, "--json"]).ok().json();
    assert_eq!(ps["phase"], "up");
    wait_until("the node's checks to pass", Duration::from_secs(10), || {
        h.pm(&["ps", "-f", f, "--json"]).ok().json()["services"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "passing")
    });
    let env = h.pm(&["env", "-f", f]).ok().stdout;
    assert!(env.contains(&format!("export DB_PORT='{}'", ports["db"])), "{env}");
    assert!(env.contains(&format!("export WEB_PORT='{}'", ports["web"])), "{env}");
    assert!(
        env.contains(&format!("export DATABASE_URL='postgresql://127.0.0.1:{}/app'", ports["db"])),
        "{env}"
    );

    let down = h.pm(&["down", "-f", f]).ok();
    assert!(down.stdout.contains("is down"), "{down:?}");
    for (name, port) in &ports {
        assert!(port_is_free(*port), "{name}'s port {port} is free after down");
    }
    assert!(h.live_ports().is_empty());
    assert!(services_of(&h).is_empty());
    h.pm(&["env", "-f", f]).fails_with("is not up");
    assert!(h.pm(&["down", "-f", f]).ok().stdout.contains("is not up"));

    // Sticky: the same ports again.
    h.pm(&["up", "-d", "-f", f]).ok();
    assert_eq!(h.stack_ports(&["-f", f]), ports);
    h.pm(&["down", "-f", f]).ok();
}

#[test]
fn a_failing_service_stops_the_stack_in_reverse_order_and_is_named_with_its_exit_status() {
    let h = home_with_pool("20150-20199");
    let dir = tempfile::tempdir().unwrap();
    let f = project(
        dir.path(),
        &format!(
            "project = \"broken\"\n\
             [services.a]\ncommand = \"{SERVER}\"\npool = \"t\"\ncheck = \"tcp\"\n\
             [services.b]\ncommand = \"{SERVER}\"\npool = \"t\"\ncheck = \"tcp\"\ndepends_on = [\"a\"]\n\
             [services.c]\ncommand = \"echo cannot start >&2; exit 3\"\npool = \"t\"\ncheck = \"tcp\"\ndepends_on = [\"b\"]\n"
        ),
    );
    let f = f.to_str().unwrap();
    let r = h.pm(&["up", "-f", f]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("service c failed: exited with status 3 before it was healthy"), "{r:?}");
    assert!(r.stdout.contains("c | cannot start"), "output is prefixed with the service: {r:?}");
    let stops: Vec<&str> = r.stdout.lines().filter_map(|l| l.strip_prefix("portmesh: stopping ")).collect();
    assert_eq!(stops, ["b", "a"], "{r:?}");
    assert!(h.live_ports().is_empty(), "every port released");
    assert!(services_of(&h).is_empty());
    assert!(h.supervisors().is_empty(), "no state left behind");

    // A check that never passes: the ready timeout names the check and what it said.
    let f2 = project(
        &dir.path().join("slow"),
        &format!(
            "project = \"slow\"\nready_timeout = \"1s\"\n[services.a]\ncommand = \"{SERVER}\"\npool = \"t\"\ncheck = \"http:/missing\"\n"
        ),
    );
    let r = h.pm(&["up", "-d", "-f", f2.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("service a failed: not healthy within 1s (check http:/missing on port"),
        "{r:?}"
    );
    assert!(r.stderr.contains("404"), "the check's output: {r:?}");
    assert!(h.live_ports().is_empty());
    assert!(h.supervisors().is_empty());
}

#[test]
fn two_instances_run_side_by_side_and_a_second_up_needs_kill_existing() {
    let h = home_with_pool("20250-20299");
    let dir = tempfile::tempdir().unwrap();
    let f = project(
        dir.path(),
        &format!(
            "project = \"twin\"\n[services.web]\ncommand = \"{SERVER}\"\npool = \"t\"\ncheck = \"http:/\"\n"
        ),
    );
    let f = f.to_str().unwrap();
    h.pm(&["up", "-d", "-f", f, "--instance", "a"]).ok();
    h.pm(&["up", "-d", "-f", f, "--instance", "b"]).ok();
    let a = h.stack_ports(&["-f", f, "--instance", "a"])["web"];
    let b = h.stack_ports(&["-f", f, "--instance", "b"])["web"];
    assert_ne!(a, b);
    assert_eq!(http_get(&format!("127.0.0.1:{a}"), "/").0, 200);
    assert_eq!(http_get(&format!("127.0.0.1:{b}"), "/").0, 200);

    h.pm(&["up", "-d", "-f", f, "--instance", "a"]).fails_with("twin/dev/a is already up");
    let before = h.supervisors();
    h.pm(&["up", "-d", "-f", f, "--instance", "a", "--kill-existing"]).ok();
    assert_eq!(h.stack_ports(&["-f", f, "--instance", "a"])["web"], a, "the replacement keeps the port");
    let after = h.supervisors();
    assert_eq!(after.len(), 2);
    assert_ne!(before, after, "instance a has a new supervisor");

    // Issue 17: --force --kill-existing wanting the other instance's port is refused before the
    // running instance a is stopped, and names the stack holding the port.
    let r = h
        .cmd(&["up", "-d", "-f", f, "--instance", "a", "--force", "--kill-existing"])
        .env("WEB_PORT", b.to_string())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("port {b} wanted by web is allocated to the running stack twin/dev/b"))
            && stderr.contains("portmesh down")
            && stderr.contains("nothing was stopped"),
        "{stderr}"
    );
    assert!(!stderr.contains("stopping the earlier up"), "nothing was stopped: {stderr}");
    assert_eq!(h.supervisors(), after, "instance a still runs");
    assert_eq!(http_get(&format!("127.0.0.1:{a}"), "/").0, 200);
    h.pm(&["down", "-f", f, "--instance", "a"]).ok();
    h.pm(&["down", "-f", f, "--instance", "b"]).ok();
    assert!(h.live_ports().is_empty());
}

#[test]
fn force_ends_the_process_holding_a_pinned_port_and_without_it_the_holder_is_named() {
    let h = home_with_pool("20400-20449");
    let port = (20400..20450).find(|p| port_is_free(*p)).unwrap();
    let mut squatter = squat(port);
    let dir = tempfile::tempdir().unwrap();
    let f = project(
        dir.path(),
        &format!(
            "project = \"pinned\"\n[services.web]\ncommand = \"{SERVER}\"\npool = \"t\"\ncheck = \"tcp\"\n"
        ),
    );
    let f = f.to_str().unwrap();
    // WEB_PORT in the environment pins the service's port.
    let r = h.cmd(&["up", "-d", "-f", f]).env("WEB_PORT", port.to_string()).output().unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(stderr.contains(&format!("port {port} is not available")), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", squatter.id())) && stderr.contains("http.server"), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    assert!(h.live_ports().is_empty());

    let r = h.cmd(&["up", "-d", "--force", "-f", f]).env("WEB_PORT", port.to_string()).output().unwrap();
    assert!(r.status.success(), "{r:?}");
    assert!(String::from_utf8_lossy(&r.stderr).contains(&format!("ending pid {}", squatter.id())));
    assert!(squatter.wait().unwrap().code().is_none(), "the squatter was ended by a signal");
    assert_eq!(h.stack_ports(&["-f", f])["web"], port);
    h.pm(&["down", "-f", f]).ok();
}

/// Each bad project: the message, and that no port was taken and no process started.
#[test]
fn bad_projects_take_no_port_and_start_nothing() {
    let h = home_with_pool("20300-20349");
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let run = format!("touch {} && exec {SERVER}", marker.display());
    // Another project holds a pinned port.
    let other = project(
        &dir.path().join("other"),
        &format!("project = \"other\"\n[services.api]\ncommand = \"{SERVER}\"\npool = \"t\"\nport = 20345\n"),
    );
    h.pm(&["up", "-d", "-f", other.to_str().unwrap()]).ok();
    assert_eq!(h.stack_ports(&["-f", other.to_str().unwrap()])["api"], 20345);

    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed", format!("project = \"x\"\n[services.a]\ncommand = \"{run}\npool = \"t\"\n"), "line 3"),
        (
            "unknown key",
            format!("project = \"x\"\n[services.a]\ncommand = \"{run}\"\npoool = \"t\"\n"),
            "did you mean \"pool\"?",
        ),
        ("no command", "project = \"x\"\n[services.a]\npool = \"t\"\n".to_string(), "services.a: no command"),
        (
            "unknown pool",
            format!("project = \"x\"\n[services.a]\ncommand = \"{run}\"\npool = \"nope\"\n"),
            "line 4: services.a.pool: unknown pool \"nope\"",
        ),
        (
            "cycle",
            format!(
                "project = \"x\"\n[services.a]\ncommand = \"{run}\"\ndepends_on = [\"b\"]\n[services.b]\ncommand = \"{run}\"\ndepends_on = [\"a\"]\n"
            ),
            "depends_on cycle: a -> b -> a",
        ),
        (
            "unknown service",
            format!(
                "project = \"x\"\n[services.a]\ncommand = \"{run}\"\npool = \"t\"\n[services.a.env]\nDB = \"{{db.port}}\"\n"
            ),
            "{db.port…} names no service of project x",
        ),
        (
            "pinned port held by another project",
            format!(
                "project = \"x\"\n[services.a]\ncommand = \"{run}\"\npool = \"t\"\nport = 20345\nstrategy = \"fail\"\n"
            ),
            "port 20345 wanted by a is held by other/dev/default/api/main",
        ),
    ];
    for (what, text, want) in cases {
        let f = project(&dir.path().join(what.replace(' ', "-")), &text);
        let r = h.pm(&["up", "-f", f.to_str().unwrap()]);
        assert_ne!(r.code, 0, "{what}: {r:?}");
        assert!(r.stderr.contains(want), "{what}: stderr lacks {want:?}: {r:?}");
        assert_eq!(h.live_ports(), [20345], "{what}: no port taken");
        assert!(!marker.exists(), "{what}: no process started");
    }
    h.pm(&["down", "-f", other.to_str().unwrap()]).ok();
    let r = h.cmd(&["up"]).current_dir(dir.path()).output().unwrap();
    assert!(String::from_utf8_lossy(&r.stderr).contains("no portmesh.toml in"), "{r:?}");
}

#[test]
fn config_show_names_the_layer_of_every_value() {
    let h = Home::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.toml"), "stop_timeout = \"9s\"\n").unwrap();
    let f = project(
        dir.path(),
        "extends = \"base.toml\"\nproject = \"shown\"\n[services.api]\ncommand = \"serve {port}\"\n[env.prod]\nready_timeout = \"5m\"\n",
    );
    let out = h
        .cmd(&["config", "show", "-f", f.to_str().unwrap(), "--env", "prod"])
        .env("API_PORT", "20999")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let origin = |key: &str| -> String {
        let line = text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} in {text}"));
        line.rsplit("# ").next().unwrap().to_string()
    };
    assert!(origin("stop_timeout = \"9s\"").ends_with("base.toml"), "{text}");
    assert!(origin("ready_timeout = \"5m\"").ends_with("[env.prod]"), "{text}");
    assert_eq!(origin("port = 20999"), "environment variables");
    assert_eq!(origin("strategy = \"fail\""), "environment variables");
    assert_eq!(origin("lease_ttl"), "built-in defaults (prod)");
    assert!(h.info().is_none(), "config show starts no node");
}

#[test]
fn ctrl_c_stops_a_foreground_stack_in_reverse_order_and_releases_it() {
    let h = home_with_pool("20200-20249");
    let dir = tempfile::tempdir().unwrap();
    let f = project(
        dir.path(),
        &format!(
            "project = \"fg\"\n[services.first]\ncommand = \"{SERVER}\"\npool = \"t\"\ncheck = \"tcp\"\n\
             [services.second]\ncommand = \"{SERVER}\"\npool = \"t\"\ncheck = \"tcp\"\ndepends_on = [\"first\"]\n"
        ),
    );
    let mut up = h.cmd(&["up", "-f", f.to_str().unwrap()]).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while !seen.last().is_some_and(|l: &String| l.contains("fg/dev/default is up")) {
        seen.push(lines.next().expect("up ended before the stack was up").unwrap());
    }
    let ports = h.stack_ports(&["-f", f.to_str().unwrap()]);
    assert_eq!(ports.len(), 2);
    kill(Pid::from_raw(up.id() as i32), Signal::SIGINT).unwrap();
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert_eq!(up.wait().unwrap().code(), Some(0), "{rest:?}");
    let stops: Vec<&str> = rest.iter().filter_map(|l| l.strip_prefix("portmesh: stopping ")).collect();
    assert_eq!(stops, ["second", "first"]);
    for port in ports.values() {
        assert!(port_is_free(*port));
    }
    assert!(h.live_ports().is_empty());
    assert!(h.supervisors().is_empty(), "the state file is gone");
}

#[test]
fn a_supervisor_killed_with_sigkill_takes_its_services_along_and_down_cleans_up_at_once() {
    let h = home_with_pool("20600-20649");
    let dir = tempfile::tempdir().unwrap();
    let f = project(
        dir.path(),
        &format!(
            "project = \"orphan\"\nlease_ttl = \"1h\"\n[services.web]\ncommand = \"{SERVER}\"\npool = \"t\"\ncheck = \"tcp\"\n"
        ),
    );
    let f = f.to_str().unwrap();
    h.pm(&["up", "-d", "-f", f]).ok();
    let ps = h.pm(&["ps", "-f", f, "--json"]).ok().json();
    let server = ps["services"][0]["pid"].as_u64().unwrap() as i32;
    let port = ps["services"][0]["ports"][0]["port"].as_u64().unwrap() as u16;
    let supervisor = h.supervisors()[0];
    kill(Pid::from_raw(supervisor), Signal::SIGKILL).unwrap();
    wait_until("the server to follow its supervisor", Duration::from_secs(10), || !process_runs(server));
    assert_eq!(h.live_ports(), [port], "the lease (1 h) still holds the port");
    let down = h.pm(&["down", "-f", f]).ok();
    assert!(down.stdout.contains("orphan/dev/default is down"), "{down:?}");
    assert!(h.live_ports().is_empty(), "down revoked the lease at once");
    assert!(h.supervisors().is_empty());
    h.pm(&["up", "-d", "-f", f]).ok();
    assert_eq!(h.stack_ports(&["-f", f])["web"], port, "and the next up gets the same port");
    h.pm(&["down", "-f", f]).ok();
}

/// `up -d` says when a service did not get the port its file pins: the line went only to the
/// stack's log before, and the terminal showed just the new port.
#[test]
fn a_detached_up_says_when_a_service_did_not_get_its_port() {
    let h = home_with_pool("20390-20399");
    let wanted = (20390..20400).find(|p| port_is_free(*p)).unwrap();
    let _held = std::net::TcpListener::bind(("127.0.0.1", wanted)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = project(
        dir.path(),
        &format!(
            "project = \"moved\"\n[services.web]\ncommand = \"{SERVER}\"\npool = \"t\"\nport = {wanted}\ncheck = \"tcp\"\n"
        ),
    );
    let f = f.to_str().unwrap();
    let up = h.pm(&["up", "-d", "-f", f]).ok();
    assert!(up.stderr.contains(&format!("port {wanted} is not free; web gets port")), "{up:?}");
    h.pm(&["down", "-f", f]).ok();

    // A service with no pinned port whose sticky port is taken since last time: the terminal of
    // `up -d` names the old port, who holds it, and the new one.
    let g = project(
        &dir.path().join("sticky"),
        &format!(
            "project = \"sticky\"\n[services.web]\ncommand = \"{SERVER}\"\npool = \"t\"\ncheck = \"tcp\"\n"
        ),
    );
    let g = g.to_str().unwrap();
    h.pm(&["up", "-d", "-f", g]).ok();
    let last = h.stack_ports(&["-f", g])["web"];
    h.pm(&["down", "-f", g]).ok();
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", last)).unwrap();
    let up = h.pm(&["up", "-d", "-f", g]).ok();
    assert!(
        up.stderr.contains(&format!("web's port {last} is held by pid {}", std::process::id()))
            && up.stderr.contains("this time"),
        "{up:?}"
    );
    h.pm(&["down", "-f", g]).ok();
}

#[test]
fn release_of_a_port_a_running_process_holds_is_refused_unless_forced() {
    let h = home_with_pool("20780-20789");
    let mut child = h
        .cmd(&["run", "--pool", "t", "--service", "held", "--key", "held/main", "--", "sleep", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the registration", Duration::from_secs(10), || services_of(&h).len() == 1);
    let port = h.live_ports()[0].to_string();
    let r = h.pm(&["release", &port]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains(&format!("port {port} is held by held")) && r.stderr.contains("--force"),
        "{r:?}"
    );
    assert_eq!(h.live_ports().len(), 1, "nothing released");
    // By its key, and by its lease, too.
    let r = h.pm(&["release", "--key", "held/main"]);
    assert!(r.code != 0 && r.stderr.contains("--force"), "{r:?}");
    let lease =
        h.pm(&["ls", "--json"]).ok().json()["allocations"][0]["lease_id"].as_u64().unwrap().to_string();
    let r = h.pm(&["release", "--lease", &lease]);
    assert!(r.code != 0 && r.stderr.contains("--force"), "{r:?}");
    assert_eq!(h.live_ports().len(), 1, "nothing released");
    h.pm(&["release", &port, "--force"]).ok();
    assert!(h.live_ports().is_empty());
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    child.wait().unwrap();
}

/// Issue 17: `run` is sticky by default, keyed by project (the working directory's name, or
/// PORTMESH_PROJECT) and service: the same command from the same project gets its port back;
/// another project's does not take it.
#[test]
fn run_is_sticky_by_default_per_project_and_service() {
    let h = home_with_pool("20790-20799");
    let dirs = tempfile::tempdir().unwrap();
    let (shop, blog) = (dirs.path().join("shop"), dirs.path().join("blog"));
    std::fs::create_dir_all(&shop).unwrap();
    std::fs::create_dir_all(&blog).unwrap();
    let port_of = |dir: &std::path::Path, project: Option<&str>| {
        let mut cmd = h.cmd(&["run", "--pool", "t", "--service", "web", "--", "true"]);
        cmd.current_dir(dir).env_remove("PORTMESH_PROJECT");
        if let Some(p) = project {
            cmd.env("PORTMESH_PROJECT", p);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        let port = stderr.split("runs on port ").nth(1).unwrap().trim().parse::<u16>().unwrap();
        assert!((20790..=20799).contains(&port), "{stderr}");
        port
    };
    let first = port_of(&shop, None);
    assert_eq!(port_of(&shop, None), first, "the same project's service gets its port back");
    let other = port_of(&blog, None);
    assert_ne!(other, first, "another project's service does not take a remembered port");
    assert_eq!(port_of(&blog, Some("shop")), first, "PORTMESH_PROJECT names the project");
    assert!(h.live_ports().is_empty(), "each run released what it held");

    // Two runs of the same project's service at once (two terminals, parallel CI jobs) never
    // share a port: the second takes a sticky slot of its own.
    let mut running = h.cmd(&["run", "--pool", "t", "--service", "web", "--", "sleep", "30"]);
    let mut running = running.current_dir(&shop).env_remove("PORTMESH_PROJECT").spawn().unwrap();
    wait_until("the first run to hold its port", std::time::Duration::from_secs(10), || {
        h.live_ports().contains(&first)
    });
    let second = port_of(&shop, None);
    assert_ne!(second, first, "a concurrent run got the port another run holds");
    assert_eq!(port_of(&shop, None), second, "and its slot is sticky too");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(running.id() as i32), nix::sys::signal::Signal::SIGINT)
        .unwrap();
    running.wait().unwrap();
    assert_eq!(port_of(&shop, None), first, "the first slot again once it is free");
}

/// A short command's run registers in its allocation's step and revokes the lease at exit:
/// nothing may stay registered or held, many short runs in a row.
#[test]
fn short_runs_leave_nothing_registered_or_held() {
    let h = home_with_pool("20800-20809");
    for i in 0..20 {
        let r = h.pm(&["run", "--pool", "t", "--service", "quick", "--check", "tcp", "--", "true"]);
        assert_eq!(r.code, 0, "run {i}: {r:?}");
        assert!(!r.stderr.contains("could not"), "run {i}: {r:?}");
    }
    assert!(h.live_ports().is_empty(), "every run released its port");
    assert!(services_of(&h).is_empty(), "no registration outlived its run");
}

/// Issue 17 item 10: `ps` right after `up -d` shows the health `up` saw (not "unknown" until
/// the node's first check), and after a service crashed the reason the stack stopped.
#[test]
fn ps_shows_health_as_up_saw_it_and_why_a_stack_stopped() {
    let h = home_with_pool("20840-20849");
    let dir = tempfile::tempdir().unwrap();
    let f = project(
        dir.path(),
        &format!(
            "project = \"crashy\"\ncheck_interval = \"1h\"\n[services.web]\ncommand = \"{SERVER}\"\npool = \"t\"\ncheck = \"tcp\"\n"
        ),
    );
    let f = f.to_str().unwrap();
    h.pm(&["up", "-d", "-f", f]).ok();
    let ps = h.pm(&["ps", "-f", f, "--json"]).ok().json();
    assert_eq!(
        (ps["phase"].as_str(), ps["services"][0]["status"].as_str()),
        (Some("up"), Some("passing")),
        "{ps}"
    );
    let server = ps["services"][0]["pid"].as_u64().unwrap() as i32;
    kill(Pid::from_raw(server), Signal::SIGKILL).unwrap();
    wait_until("the stack to stop", Duration::from_secs(20), || {
        h.pm(&["ps", "-f", f, "--json"]).ok().json()["phase"] == "failed"
    });
    let ps = h.pm(&["ps", "-f", f]).ok();
    assert!(ps.stdout.contains("crashy/dev/default (failed: service web killed by SIGKILL"), "{ps:?}");
    assert!(h.live_ports().is_empty(), "its ports came back");
    // The next up starts it again; down after a failure says it is down.
    h.pm(&["up", "-d", "-f", f]).ok();
    assert_eq!(h.pm(&["ps", "-f", f, "--json"]).ok().json()["phase"], "up");
    h.pm(&["down", "-f", f]).ok();
}
