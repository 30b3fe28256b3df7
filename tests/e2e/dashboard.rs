//! The dashboard in a real browser: Debian's Chromium, headless, driven over the DevTools
//! protocol. `scripts/setup-chromium` installs it when missing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tungstenite::{Message, WebSocket, stream::MaybeTlsStream};

use crate::support::*;

/// A headless Chromium and one page of it.
struct Browser {
    child: Child,
    page: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn start(url: &str) -> Browser {
        let setup = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/setup-chromium");
        let out = Command::new(setup).output().expect("run setup-chromium");
        assert!(out.status.success(), "setup-chromium: {}", String::from_utf8_lossy(&out.stderr));
        let bin = String::from_utf8_lossy(&out.stdout).lines().last().unwrap().to_string();
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(bin)
            .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars"])
            .arg("--remote-debugging-port=0")
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let devtools = loop {
            let line = lines.next().expect("chromium exited before listening").unwrap();
            if let Some(rest) = line.split("DevTools listening on ").nth(1) {
                break rest.trim().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let port = devtools.trim_start_matches("ws://").split(['/', ':']).nth(1).unwrap().to_string();
        // A new page at `url`: PUT /json/new?URL answers with its WebSocket.
        let mut s = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
        write!(s, "PUT /json/new?{url} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").unwrap();
        // Chromium keeps the connection open: read the head, then Content-Length bytes.
        let mut r = BufReader::new(s);
        let mut len = 0;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        let target: Value = serde_json::from_slice(&body).unwrap();
        let ws = target["webSocketDebuggerUrl"].as_str().unwrap();
        let (page, _) = tungstenite::connect(ws).unwrap();
        Browser { child, page, next_id: 0, _profile: profile }
    }

    /// Sends one DevTools command and waits for its answer (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.page
            .send(Message::text(json!({"id": id, "method": method, "params": params}).to_string()))
            .unwrap();
        loop {
            let msg = self.page.read().unwrap();
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true}));
        r["result"]["value"].clone()
    }

    fn screenshot(&mut self, width: u32, height: u32, dark: bool, path: &std::path::Path) {
        use base64::Engine;
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}),
        );
        let scheme = if dark { "dark" } else { "light" };
        self.call(
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-color-scheme", "value": scheme}]}),
        );
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

#[test]
fn the_dashboard_shows_services_pools_conflicts_and_recommendations_and_updates_without_a_reload() {
    let h = Home::new();
    // A registered service that answers its check, one that does not, and one without a check.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api_port = listener.local_addr().unwrap().port().to_string();
    let refusing = refusing_port();
    let closed = refusing.port.to_string();
    for (name, port) in [("api", format!("http={api_port}")), ("db", closed)] {
        h.pm(&[
            "register",
            name,
            "--port",
            &port,
            "--project",
            "shop",
            "--env",
            "dev",
            "--check",
            "tcp",
            "--interval",
            "200ms",
        ])
        .ok();
    }
    h.pm(&["register", "posts", "--port", "8500", "--project", "blog"]).ok();
    // Allocations, one under a lease; a conflict with a process holding a wanted port; a pool in
    // the ephemeral range (a recommendation). From a pool of the test's own: what the host's own
    // programs hold in the default pools must not change what the page shows.
    h.pm(&["pools", "add", "dash", "20350-20389"]).ok();
    h.pm(&["alloc", "web", "--pool", "dash", "--count", "3"]).ok();
    h.pm(&["alloc", "ci", "--pool", "dash", "--ttl", "10m", "--count", "2"]).ok();
    let squatter = (20370..20390).find(|p| port_is_free(*p)).unwrap();
    let _held = std::net::TcpListener::bind(("127.0.0.1", squatter)).unwrap();
    let fallback = h.pm(&["alloc", "web", "--pool", "dash", "--port", &squatter.to_string()]).ok().ports()[0];
    assert_ne!(fallback, squatter);
    h.pm(&["pools", "add", "high", "40000-40099"]).ok();
    // A port handed to a process that ended with no lease (a shell that ran `alloc` and left):
    // leaked.
    let mut sh = std::process::Command::new("sh");
    sh.args(["-c", "\"$0\" alloc leak --pool dash; true", BIN]).env("PORTMESH_HOME", h.path());
    let out = sh.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let leaked: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();

    let url = format!("http://{}/", h.http());
    let mut b = Browser::start(&url);
    b.call("Runtime.enable", json!({}));
    wait_until("the dashboard to show the cluster", Duration::from_secs(20), || {
        b.eval("document.querySelector('.cluster .leader') !== null").as_bool() == Some(true)
    });
    wait_until("the checks to settle on the page", Duration::from_secs(20), || {
        b.eval(
            "(() => { const r = (n) => document.querySelector(`[data-service=\"${n}\"] .badge`)?.textContent;
                      return r('api') === 'passing' && r('db') === 'critical'; })()",
        )
        .as_bool()
            == Some(true)
    });
    let shown = b.eval(
        "JSON.stringify({
            projects: [...document.querySelectorAll('#services h3')].map(e => e.textContent),
            services: [...document.querySelectorAll('[data-service]')].map(e => e.dataset.service),
            pools: [...document.querySelectorAll('[data-pool]')].map(e => e.dataset.pool),
            ports: [...document.querySelectorAll('[data-port]')].map(e => Number(e.dataset.port)),
            leases: document.querySelectorAll('[data-lease]').length,
            leaseText: document.getElementById('leases').innerText,
            leaked: [...document.querySelectorAll('[data-leaked]')].map(e => Number(e.dataset.port)),
            leakedMark: document.querySelector('[data-leaked] .badge')?.textContent,
            apiLink: document.querySelector('[data-service=api] a[data-link]')?.href,
            dbLinks: document.querySelectorAll('[data-service=db] a').length,
            conflicts: document.getElementById('conflicts').innerText,
            rules: [...document.querySelectorAll('[data-rule]')].map(e => e.dataset.rule),
            recHidden: document.getElementById('recommendations-section').hidden,
            tokenShown: getComputedStyle(document.getElementById('token-form')).display !== 'none',
        })",
    );
    let v: Value = serde_json::from_str(shown.as_str().unwrap()).unwrap();
    assert_eq!(v["projects"], json!(["blog", "shop · dev"]), "{v}");
    assert_eq!(v["services"], json!(["posts", "api", "db"]), "grouped by project, then by name: {v}");
    for p in ["web", "default", "db", "cache", "queue", "high"] {
        assert!(v["pools"].as_array().unwrap().contains(&json!(p)), "pool {p}: {v}");
    }
    let live = h.live_ports();
    assert_eq!(v["ports"].as_array().unwrap().len(), live.len(), "{v}");
    assert!(v["ports"].as_array().unwrap().contains(&json!(fallback)));
    // Leases: only those at risk; the 10-minute one is renewed in time.
    assert_eq!(v["leases"], 0, "{v}");
    assert!(v["leaseText"].as_str().unwrap().contains("1 lease, all renewed on time"), "{v}");
    // Leaked: only the port whose holder ended with no lease, marked so.
    assert_eq!(v["leaked"], json!([leaked]), "{v}");
    assert_eq!(v["leakedMark"], "leaked", "{v}");
    // A web port is a link to the service, under the name the page was opened with; a port
    // checked over TCP with no web name is not.
    assert_eq!(v["apiLink"], format!("http://127.0.0.1:{api_port}/"), "{v}");
    assert_eq!(v["dbLinks"], 0, "{v}");
    let conflicts = v["conflicts"].as_str().unwrap();
    assert!(conflicts.contains(&squatter.to_string()), "the conflict names the port: {conflicts}");
    assert!(conflicts.contains(&format!("pid {}", std::process::id())), "and its holder: {conflicts}");
    assert_eq!(v["rules"], json!(["ephemeral"]), "{v}");
    assert_eq!(v["recHidden"], false);
    assert_eq!(v["tokenShown"], false, "a node without --auth asks for no token: {v}");

    // Live: a new allocation shows up on the same page, without a reload.
    b.eval("window.__portmeshMarker = 42");
    let port = h.pm(&["alloc", "newcomer", "--pool", "dash"]).ok().ports()[0];
    wait_until("the new allocation on the page", Duration::from_secs(5), || {
        b.eval(&format!("document.querySelector('[data-port=\"{port}\"]') !== null")).as_bool() == Some(true)
    });
    assert_eq!(b.eval("window.__portmeshMarker"), json!(42), "the page was not reloaded");

    // A lease with less than half its TTL left shows up; the kept 10-minute one still does not.
    let risky = h.pm(&["alloc", "risky", "--pool", "dash", "--ttl", "8s", "--json"]).ok();
    let lease = risky.json()["lease_id"].as_u64().unwrap();
    wait_until("the lease at risk on the page", Duration::from_secs(8), || {
        b.eval(&format!("document.querySelector('[data-lease=\"{lease}\"]') !== null")).as_bool()
            == Some(true)
    });
    assert_eq!(b.eval("document.querySelectorAll('[data-lease]').length"), json!(1));

    // It fits a phone: no sideways scrolling at 390 px.
    b.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": true}),
    );
    assert_eq!(
        b.eval("document.documentElement.scrollWidth <= window.innerWidth"),
        json!(true),
        "no horizontal overflow on a phone"
    );

    let img = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/img");
    b.screenshot(390, 844, true, &img.join("dashboard-phone-dark.png"));
    b.screenshot(1280, 1000, false, &img.join("dashboard.png"));
    drop(listener);
}
