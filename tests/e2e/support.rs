//! Test support: a private home with its own local node, and condition waits.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_portmesh");

/// A `PORTMESH_HOME` of its own. Dropping it stops its node.
pub struct Home {
    pub dir: tempfile::TempDir,
}

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn of(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "command failed: {self:?}");
        self
    }

    #[track_caller]
    pub fn fails_with(self, fragment: &str) -> Run {
        assert_ne!(self.code, 0, "command should have failed: {self:?}");
        assert!(self.stderr.contains(fragment), "stderr lacks {fragment:?}: {self:?}");
        assert!(self.stdout.is_empty(), "a failing command printed to stdout: {self:?}");
        self
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    pub fn ports(&self) -> Vec<u16> {
        self.stdout
            .lines()
            .map(|l| l.trim().parse().unwrap_or_else(|_| panic!("not a port: {l:?} in {self:?}")))
            .collect()
    }
}

impl Home {
    pub fn new() -> Home {
        static REAPED: std::sync::Once = std::sync::Once::new();
        REAPED.call_once(reap_orphans);
        Home { dir: tempfile::tempdir().expect("tempdir") }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("PORTMESH_HOME", self.path())
            .env_remove("PORTMESH_NODE")
            .env_remove("PORTMESH_TEAM")
            .env_remove("PORTMESH_LOG")
            .stdin(Stdio::null());
        c
    }

    pub fn pm(&self, args: &[&str]) -> Run {
        Run::of(self.cmd(args).output().expect("run portmesh"))
    }

    /// The node's record in this home.
    pub fn info(&self) -> Option<Value> {
        let b = std::fs::read(self.path().join("node.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }

    pub fn node_pid(&self) -> Option<i32> {
        self.info().and_then(|i| i["pid"].as_i64()).map(|p| p as i32)
    }

    pub fn http(&self) -> String {
        self.info().and_then(|i| i["http"].as_str().map(str::to_string)).expect("node has an HTTP address")
    }

    /// Ports of the live allocations of team default.
    pub fn live_ports(&self) -> Vec<u16> {
        let v = self.pm(&["ls", "--json"]).ok().json();
        v["allocations"].as_array().unwrap().iter().map(|a| a["port"].as_u64().unwrap() as u16).collect()
    }

    /// The supervisors of the stacks `up` recorded in this home.
    pub fn supervisors(&self) -> Vec<i32> {
        let mut out = Vec::new();
        let Ok(teams) = std::fs::read_dir(self.path().join("stacks")) else { return out };
        for team in teams.flatten() {
            for f in std::fs::read_dir(team.path()).into_iter().flatten().flatten() {
                let Ok(b) = std::fs::read(f.path()) else { continue };
                if let Some(pid) =
                    serde_json::from_slice::<Value>(&b).ok().and_then(|v| v["supervisor"].as_i64())
                {
                    out.push(pid as i32);
                }
            }
        }
        out
    }

    /// Service name -> first port of a stack, from `ps --json` (extra args select the stack).
    pub fn stack_ports(&self, args: &[&str]) -> std::collections::BTreeMap<String, u16> {
        let v = self.pm(&[&["ps", "--json"], args].concat()).ok().json();
        v["services"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| Some((s["name"].as_str()?.to_string(), s["ports"][0]["port"].as_u64()? as u16)))
            .collect()
    }

    /// Every `serve` process whose data lives in this home.
    pub fn node_processes(&self) -> Vec<i32> {
        let needle = self.path().join("data").display().to_string();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(" serve ") && cmd.contains(&needle) && !is_zombie(pid) {
                pids.push(pid);
            }
        }
        pids
    }
}

/// Kills nodes of this binary that an earlier, interrupted test run left behind: their home
/// directory is gone. (A test binary killed mid-run drops nothing, and a leftover node would
/// skew every benchmark run afterwards.)
fn reap_orphans() {
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> =
            cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.first().map(String::as_str) != Some(BIN) || args.get(1).map(String::as_str) != Some("serve") {
            continue;
        }
        let home = args.iter().position(|a| a == "--home").and_then(|i| args.get(i + 1));
        if home.is_some_and(|h| !Path::new(h).exists()) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

impl Drop for Home {
    fn drop(&mut self) {
        // Stacks left up by a failed test: their supervisors stop their services.
        for pid in self.supervisors() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        if self.info().is_some() {
            let _ = self.cmd(&["stop"]).output();
        }
        for pid in self.node_processes() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Waits until `cond` holds, checking every 50 ms; panics naming `what` after `timeout`.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minimal HTTP/1.1 GET: status code and body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let (code, _, body) = http_get_with_head(addr, path);
    (code, body)
}

/// Status code, response head (status line and headers) and body of `GET path`.
pub fn http_get_with_head(addr: &str, path: &str) -> (u16, String, String) {
    http_get_as(addr, addr, path)
}

/// A GET of `path` from `addr` naming `host` in the `Host` header.
pub fn http_get_as(addr: &str, host: &str, path: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect http");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let code = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((buf.as_str(), ""));
    (code, head.to_string(), body.to_string())
}

/// Writes a project file `dir/portmesh.toml`.
pub fn project(dir: &Path, text: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let f = dir.join("portmesh.toml");
    std::fs::write(&f, text).unwrap();
    f
}

/// Whether a process could bind `port` on the loopback address right now.
pub fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A process portmesh did not start listening on `port` (python's http.server), once it listens.
pub fn squat(port: u16) -> std::process::Child {
    let child = Command::new("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the squatter to listen", Duration::from_secs(10), || !port_is_free(port));
    child
}

/// Whether process `pid` still runs (a zombie does not).
pub fn process_runs(pid: i32) -> bool {
    !is_zombie(pid)
}

pub use portmesh_testkit::refusing_port;

/// A port nothing listens on right now (free to bind: another program may take it later).
pub fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `portmesh serve` process in the foreground.
pub struct Served {
    pub child: std::process::Child,
    pub grpc: String,
    /// The HTTP address (`--http 127.0.0.1:0` as bound).
    pub http: String,
    /// Its log lines until it listened.
    pub log: Vec<String>,
    /// Its log lines after that, as they come.
    pub later: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `portmesh serve` on a free loopback port with `data` and `extra` flags; returns once it
/// listens.
pub fn serve(h: &Home, data: &Path, extra: &[&str]) -> Served {
    serve_at(h, data, "127.0.0.1:0", extra)
}

/// Starts `portmesh serve` listening on `listen`.
pub fn serve_at(h: &Home, data: &Path, listen: &str, extra: &[&str]) -> Served {
    use std::io::{BufRead, BufReader};
    let mut child = h
        .cmd(&["serve", "--listen", listen, "--http", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut log = Vec::new();
    let (grpc, http) = loop {
        let line = lines.next().unwrap_or_else(|| panic!("node exited before listening: {log:#?}")).unwrap();
        log.push(line.clone());
        if line.contains("portmesh node listening") {
            let field =
                |name: &str| line.split(name).nth(1).unwrap().split_whitespace().next().unwrap().to_string();
            let http = field("http=").trim_start_matches("Some(").trim_end_matches(')').to_string();
            break (field("grpc="), http);
        }
    };
    let later = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = later.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    Served { child, grpc, http, log, later }
}
