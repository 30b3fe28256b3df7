//! The Flask examples with real Flask, gunicorn and Redis: a venv from PyPI made by
//! examples/setup-flask.sh, Redis from Debian's packages by examples/flask-cache/setup.sh.

use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::*;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");

/// Runs a setup script; its last line is what it prepared.
fn setup(script: &str) -> String {
    let out = Command::new(format!("{EXAMPLES}/{script}")).output().expect("run setup script");
    assert!(out.status.success(), "{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().last().unwrap().to_string()
}

/// A home whose pools `name` hold the given ranges (outside the default ones, so tests running
/// at once never hand out the same port), with a PATH that finds the venv's flask and gunicorn.
fn flask_home(pools: &[(&str, &str)]) -> (Home, String) {
    let bin = setup("setup-flask.sh");
    let h = Home::new();
    for (name, range) in pools {
        h.pm(&["pools", "rm", name]).ok();
        h.pm(&["pools", "add", name, range]).ok();
    }
    let path = format!("{bin}:{}", std::env::var("PATH").unwrap_or_default());
    (h, path)
}

fn pm(h: &Home, path: &str, args: &[&str]) -> Command {
    let mut c = h.cmd(args);
    c.env("PATH", path).env("PYTHONDONTWRITEBYTECODE", "1");
    c
}

fn ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{c:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn get(port: u16, path: &str) -> (u16, String) {
    http_get(&format!("127.0.0.1:{port}"), path)
}

#[test]
fn two_flask_projects_run_side_by_side_under_the_dev_server_and_under_gunicorn() {
    let (h, path) = flask_home(&[("web", "20500-20599")]);
    let shop = format!("{EXAMPLES}/flask-shop/portmesh.toml");
    let blog = format!("{EXAMPLES}/flask-blog/portmesh.toml");
    for env in ["dev", "prod"] {
        let up_both = || {
            // Both projects at once.
            let a = pm(&h, &path, &["up", "-d", "-f", &shop, "--env", env])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let b = pm(&h, &path, &["up", "-d", "-f", &blog, "--env", env])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            for child in [a, b] {
                let out = child.wait_with_output().unwrap();
                assert!(out.status.success(), "{env}: up failed: {out:?}");
            }
            let s = h.stack_ports(&["-f", &shop, "--env", env]);
            let b = h.stack_ports(&["-f", &blog, "--env", env]);
            (s, b)
        };
        let (s, b) = up_both();
        let mut all: Vec<u16> = s.values().chain(b.values()).copied().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 4, "{env}: every service has its own port: {s:?} {b:?}");
        for port in &all {
            assert!((20500..=20599).contains(port));
            assert_eq!(get(*port, "/health").0, 200, "{env}: port {port} answers");
        }
        let (code, page) = get(s["web"], "/");
        assert_eq!(code, 200, "{page}");
        assert!(page.contains("teapot"), "the front reached the API: {page}");
        assert!(page.contains(&format!("127.0.0.1:{}", s["api"])), "through the port portmesh set: {page}");
        let (code, page) = get(b["site"], "/");
        assert_eq!(code, 200, "{page}");
        assert!(page.contains("Sticky ports"), "{page}");
        if env == "prod" {
            let ps = h.pm(&["ps", "-f", &shop, "--env", env, "--json"]).ok().json();
            let pid = ps["services"][0]["pid"].as_u64().unwrap();
            let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
            assert!(cmdline.contains("gunicorn"), "prod runs gunicorn on the handed-over socket: {cmdline}");
        }

        ok(&mut pm(&h, &path, &["down", "-f", &shop, "--env", env]));
        ok(&mut pm(&h, &path, &["down", "-f", &blog, "--env", env]));
        for port in &all {
            assert!(port_is_free(*port), "{env}: port {port} is free after down");
        }
        assert!(h.live_ports().is_empty());

        let (s2, b2) = up_both();
        assert_eq!((s2, b2), (s.clone(), b.clone()), "{env}: the second up gets the same ports");
        ok(&mut pm(&h, &path, &["down", "-f", &shop, "--env", env]));
        ok(&mut pm(&h, &path, &["down", "-f", &blog, "--env", env]));
    }
}

/// `run --fd` with gunicorn both ways: told `--bind fd://3`, and finding the socket by the
/// systemd activation variables (LISTEN_FDS, LISTEN_PID) with no --bind at all.
#[test]
fn run_fd_hands_gunicorn_a_bound_socket() {
    let (h, path) = flask_home(&[("web", "20650-20669")]);
    for gunicorn in
        [&["gunicorn", "--bind", "fd://3", "api:create_app()"][..], &["gunicorn", "api:create_app()"][..]]
    {
        let args = [
            &["run", "--fd", "--pool", "web", "--service", "api", "--check", "http:/health", "--"][..],
            gunicorn,
        ]
        .concat();
        let mut child = pm(&h, &path, &args)
            .current_dir(format!("{EXAMPLES}/flask-shop"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let found =
            || h.pm(&["discover", "api", "--json"]).ok().json()["services"].as_array().unwrap().clone();
        wait_until("gunicorn to pass its check", Duration::from_secs(30), || found().len() == 1);
        let port = found()[0]["ports"][0]["port"].as_u64().unwrap() as u16;
        let (code, body) = get(port, "/health");
        assert_eq!(code, 200, "{gunicorn:?}");
        assert!(body.contains(&format!("\"port\":\"{port}\"")), "PORT reached the app: {body}");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "gunicorn stops cleanly on SIGTERM and run passes its status on");
        assert!(h.live_ports().is_empty());
        assert!(port_is_free(port));
    }
}

#[test]
fn up_starts_a_real_redis_before_the_flask_app_that_uses_it() {
    setup("flask-cache/setup.sh");
    let (h, path) = flask_home(&[("web", "20670-20689"), ("cache", "20690-20699")]);
    let file = format!("{EXAMPLES}/flask-cache/portmesh.toml");
    let out = ok(&mut pm(&h, &path, &["up", "-d", "-f", &file]));
    assert!(out.contains("counter/dev/default is up"), "{out}");
    let ports = h.stack_ports(&["-f", &file]);
    assert!((20690..=20699).contains(&ports["cache"]));
    assert_eq!(get(ports["app"], "/").1.trim(), "{\"hits\":1}");
    assert_eq!(get(ports["app"], "/").1.trim(), "{\"hits\":2}");
    let env = h.pm(&["env", "-f", &file]).ok().stdout;
    assert!(env.contains(&format!("export REDIS_URL='redis://127.0.0.1:{}/0'", ports["cache"])), "{env}");
    ok(&mut pm(&h, &path, &["down", "-f", &file]));
    assert!(port_is_free(ports["cache"]) && port_is_free(ports["app"]));
}

/// Issue 17: `portmesh init` in a Flask project with an app factory writes a portmesh.toml that
/// `up` runs as it is; without one, `up` says to run `init`; an existing file is not replaced
/// unless asked.
#[test]
fn init_writes_a_project_file_that_up_runs_for_a_flask_app_factory() {
    let (h, path) = flask_home(&[("web", "20830-20839")]);
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("greet");
    std::fs::create_dir_all(project.join("greet")).unwrap();
    std::fs::write(
        project.join("greet/__init__.py"),
        "from flask import Flask\n\ndef create_app():\n    app = Flask(__name__)\n    app.add_url_rule('/', 'hi', lambda: 'hi')\n    return app\n",
    )
    .unwrap();
    std::fs::write(project.join("requirements.txt"), "flask\n").unwrap();
    let out = pm(&h, &path, &["up", "-d"]).current_dir(&project).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`portmesh init` writes one"), "{out:?}");

    let said = ok(pm(&h, &path, &["init"]).current_dir(&project));
    assert!(said.contains("for project \"greet\": web (the Flask app greet:create_app)"), "{said}");
    let file = std::fs::read_to_string(project.join("portmesh.toml")).unwrap();
    assert!(file.contains("flask --app greet:create_app run --port {port}"), "{file}");
    let again = pm(&h, &path, &["init"]).current_dir(&project).output().unwrap();
    assert!(
        !again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--force"),
        "{again:?}"
    );

    ok(pm(&h, &path, &["up", "-d"]).current_dir(&project));
    let ps = ok(pm(&h, &path, &["ps", "--json"]).current_dir(&project));
    let ps: serde_json::Value = serde_json::from_str(&ps).unwrap();
    let port = ps["services"][0]["ports"][0]["port"].as_u64().unwrap() as u16;
    assert!((20830..=20839).contains(&port), "{ps}");
    assert_eq!(get(port, "/"), (200, "hi".to_string()));
    ok(pm(&h, &path, &["down"]).current_dir(&project));
}
