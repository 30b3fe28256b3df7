//! Health checks of the services registered on this node's host.
//!
//! Every node runs the checks of the services whose `host` is its own, each on its interval and
//! with its timeout, and keeps the count of consecutive failures locally. Only a change of status
//! is replicated (`Command::SetHealth`): the node proposes it itself when it leads, and otherwise
//! sends it to the leader (`Registry.ReportHealth`). A report that did not land is sent again
//! while the replicated status still differs, at most once per [`RESEND_AFTER`]. A new leader or
//! a restarted node starts counting afresh; the replicated status stays until a check says
//! otherwise.
//!
//! Only a check that started after this node last saw the replicated status change may report a
//! transition. Several nodes on one host (a test cluster, a developer's three local nodes) all
//! run the checks; without this rule one node's stale "passing", measured just before another
//! node reported "critical", would flip the status back and forth.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use portmesh_core::{CheckKind, HealthCheck, HealthStatus, HealthUpdate, Service, clip_output};
use portmesh_proto::{health_to_pb, v1 as pb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::Api;

/// How often the checker looks for due checks.
const TICK: Duration = Duration::from_millis(50);
/// How long to wait before sending a transition again that has not shown up in the state.
const RESEND_AFTER: Duration = Duration::from_secs(1);
/// How long the leader may take to accept a report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(3);

type Id = (String, String);

/// What one check run found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Passing(String),
    Warning(String),
    Failing(String),
}

/// The local bookkeeping of one service's check.
#[derive(Debug)]
struct Tracker {
    /// The check and port it was started for; a changed registration starts afresh.
    spec: (HealthCheck, u16),
    next_due: Instant,
    running: bool,
    failures: u32,
    /// The status the checks say, once they said something.
    seen: Option<(HealthStatus, String)>,
    /// The last transition sent and when.
    sent: Option<(HealthStatus, Instant)>,
    /// The replicated status (and when it last changed) this tracker last saw, and when it saw
    /// it change; outcomes of checks started before then are stale.
    basis: (HealthStatus, u64),
    since: Instant,
}

impl Tracker {
    fn new(spec: (HealthCheck, u16), svc: &Service, now: Instant) -> Self {
        Tracker {
            spec,
            next_due: now,
            running: false,
            failures: 0,
            seen: None,
            sent: None,
            basis: (svc.status, svc.status_ms),
            since: now,
        }
    }
}

/// Runs the health checks of this host's services until `shutdown` turns true.
pub async fn run_health_checks(api: Api, mut shutdown: watch::Receiver<bool>) {
    let mut trackers: HashMap<Id, Tracker> = HashMap::new();
    let mut running: JoinSet<(Id, Instant, Outcome)> = JoinSet::new();
    let mut leader: Option<(String, Channel)> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // This host's services with a check, read again only when the applied state moved.
    let mut applied = api.node().state().applied_index();
    applied.mark_changed();
    let mut mine: Vec<Service> = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(done) = running.join_next() => {
                if let Ok((id, started, outcome)) = done
                    && let Some(t) = trackers.get_mut(&id)
                {
                    t.running = false;
                    if started >= t.since {
                        record(t, outcome);
                    }
                }
                continue;
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() { return; }
                continue;
            }
        }
        let now = Instant::now();
        if applied.has_changed().unwrap_or(false) {
            applied.borrow_and_update();
            let sm = api.node().state().read();
            mine =
                sm.state.services().filter(|s| s.host == api.host() && s.check.is_some()).cloned().collect();
            let present: std::collections::HashSet<(&str, &str)> =
                mine.iter().map(|s| (s.team.as_str(), s.id.as_str())).collect();
            trackers.retain(|id, _| present.contains(&(id.0.as_str(), id.1.as_str())));
        }
        let mut updates = Vec::new();
        for svc in &mine {
            let (Some(check), Some(port)) = (svc.check.clone(), checked_port(svc)) else { continue };
            let id = (svc.team.clone(), svc.id.clone());
            let spec = (check.clone(), port);
            let t = trackers.entry(id.clone()).or_insert_with(|| Tracker::new(spec.clone(), svc, now));
            if t.spec != spec {
                *t = Tracker::new(spec, svc, now);
            }
            if t.basis != (svc.status, svc.status_ms) {
                // The status changed (this node's report or another's): start from it afresh.
                (t.basis, t.since, t.seen, t.sent, t.failures) =
                    ((svc.status, svc.status_ms), now, None, None, 0);
            }
            if !t.running && t.next_due <= now {
                t.running = true;
                t.next_due = now + Duration::from_millis(check.interval_ms);
                running.spawn(async move { (id.clone(), now, run_check(&check, port).await) });
            }
            if let Some((status, output)) = &t.seen
                && *status != svc.status
                && t.sent.is_none_or(|(s, at)| s != *status || at.elapsed() >= RESEND_AFTER)
            {
                t.sent = Some((*status, now));
                tracing::info!(service = %svc.name, id = %svc.id, from = %svc.status, to = %status, %output, "health changed");
                updates.push(HealthUpdate {
                    team: svc.team.clone(),
                    id: svc.id.clone(),
                    status: *status,
                    output: output.clone(),
                });
            }
        }
        if !updates.is_empty()
            && let Err(why) = report(&api, &mut leader, updates).await
        {
            tracing::warn!(%why, "could not report health changes; will retry");
        }
    }
}

/// Folds one check's outcome into its tracker.
fn record(t: &mut Tracker, outcome: Outcome) {
    match outcome {
        Outcome::Passing(out) => {
            t.failures = 0;
            t.seen = Some((HealthStatus::Passing, out));
        }
        Outcome::Warning(out) => {
            t.failures = 0;
            t.seen = Some((HealthStatus::Warning, out));
        }
        Outcome::Failing(out) => {
            t.failures = t.failures.saturating_add(1);
            if t.failures >= t.spec.0.failures {
                t.seen = Some((HealthStatus::Critical, out));
            }
        }
    }
}

fn checked_port(svc: &Service) -> Option<u16> {
    let check = svc.check.as_ref()?;
    match &check.port {
        Some(name) => svc.port(name),
        None => svc.main_port(),
    }
}

/// Sends transitions to the leader, or proposes them when this node leads.
async fn report(
    api: &Api,
    leader: &mut Option<(String, Channel)>,
    updates: Vec<HealthUpdate>,
) -> Result<(), String> {
    let node = api.node();
    let metrics = node.metrics();
    let Some(leader_id) = metrics.current_leader else {
        return Err("no leader known".into());
    };
    if leader_id == node.id {
        return api.set_health(updates).await.map(|_| ()).map_err(|e| e.to_string());
    }
    let Some(addr) = metrics.membership_config.membership().get_node(&leader_id).map(|n| n.addr.clone())
    else {
        return Err(format!("leader {leader_id} has no address"));
    };
    let channel = match leader {
        Some((a, ch)) if *a == addr => ch.clone(),
        _ => {
            let ch = Endpoint::from_shared(portmesh_proto::endpoint_uri(&addr))
                .map_err(|e| e.to_string())?
                .connect_lazy();
            *leader = Some((addr.clone(), ch.clone()));
            ch
        }
    };
    let reports = updates
        .into_iter()
        .map(|u| pb::HealthReport {
            team: u.team,
            id: u.id,
            status: health_to_pb(u.status) as i32,
            output: u.output,
        })
        .collect();
    let mut client = pb::registry_client::RegistryClient::new(channel);
    match tokio::time::timeout(REPORT_TIMEOUT, client.report_health(pb::ReportHealthRequest { reports }))
        .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) => Err(format!("leader {addr}: {}", s.message())),
        Err(_) => Err(format!("leader {addr}: no answer within {REPORT_TIMEOUT:?}")),
    }
}

/// Runs `check` once against `port` on this host: whether it passed (passing or warning) and
/// what it said. `portmesh up` waits on this for a service to become ready; the node's own
/// checker then keeps watching.
pub async fn check_once(check: &HealthCheck, port: u16) -> (HealthStatus, String) {
    match run_check(check, port).await {
        Outcome::Passing(out) => (HealthStatus::Passing, out),
        Outcome::Warning(out) => (HealthStatus::Warning, out),
        Outcome::Failing(out) => (HealthStatus::Critical, out),
    }
}

/// Runs one check against `port` on this host.
async fn run_check(check: &HealthCheck, port: u16) -> Outcome {
    let timeout = Duration::from_millis(check.timeout_ms);
    let run = async {
        match &check.kind {
            CheckKind::Tcp => match connect(port).await {
                Ok((_, addr)) => Outcome::Passing(format!("tcp {addr}: connected")),
                Err(e) => Outcome::Failing(format!("tcp port {port}: {e}")),
            },
            CheckKind::Http { path } => http_check(port, path).await,
            CheckKind::Grpc { service } => grpc_check(port, service).await,
            CheckKind::Command { command } => command_check(command, port).await,
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Failing(format!("no answer on port {port} within {} ms", check.timeout_ms)),
    }
}

/// Where checks look for a service: IPv4 loopback, then IPv6 loopback.
fn loopback(port: u16) -> [SocketAddr; 2] {
    [SocketAddr::from((Ipv4Addr::LOCALHOST, port)), SocketAddr::from((Ipv6Addr::LOCALHOST, port))]
}

/// Connects to the port on IPv4 loopback, else IPv6 loopback; the error is the IPv4 one.
async fn connect(port: u16) -> std::io::Result<(TcpStream, SocketAddr)> {
    let [v4, v6] = loopback(port);
    match TcpStream::connect(v4).await {
        Ok(s) => Ok((s, v4)),
        Err(e4) => TcpStream::connect(v6).await.map(|s| (s, v6)).map_err(|_| e4),
    }
}

async fn http_check(port: u16, path: &str) -> Outcome {
    let (mut stream, addr) = match connect(port).await {
        Ok(s) => s,
        Err(e) => return Outcome::Failing(format!("http port {port}: {e}")),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nUser-Agent: portmesh-health\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return Outcome::Failing(format!("http {addr}{path}: {e}"));
    }
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Outcome::Failing(format!("http {addr}{path}: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    let code = line.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok());
    let said = format!("http {addr}{path}: {line}");
    match code {
        Some(200..=399) => Outcome::Passing(said),
        Some(429) => Outcome::Warning(said),
        Some(_) => Outcome::Failing(said),
        None => Outcome::Failing(format!("http {addr}{path}: not an HTTP answer: {line:?}")),
    }
}

/// A gRPC connection to the port on IPv4 loopback, else IPv6 loopback.
async fn grpc_channel(port: u16) -> Result<Channel, String> {
    let mut why = String::new();
    for addr in loopback(port) {
        let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?;
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) if why.is_empty() => why = format!("grpc {addr}: {e}"),
            Err(_) => {}
        }
    }
    Err(why)
}

async fn grpc_check(port: u16, service: &str) -> Outcome {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = match grpc_channel(port).await {
        Ok(c) => c,
        Err(why) => return Outcome::Failing(why),
    };
    let mut client = HealthClient::new(channel);
    match client.check(HealthCheckRequest { service: service.to_string() }).await {
        Ok(r) => {
            let status = r.into_inner().status();
            let said = format!("grpc port {port} service {service:?}: {}", status.as_str_name());
            if status == ServingStatus::Serving { Outcome::Passing(said) } else { Outcome::Failing(said) }
        }
        Err(s) => Outcome::Failing(format!("grpc port {port} service {service:?}: {}", s.message())),
    }
}

async fn command_check(command: &str, port: u16) -> Outcome {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("PORT", port.to_string())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    match out {
        Ok(out) => {
            let mut text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let err = String::from_utf8_lossy(&out.stderr);
            if !err.trim().is_empty() {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(err.trim());
            }
            let code = out.status.code();
            let said = match code {
                Some(c) if text.is_empty() => format!("exit status {c}"),
                Some(c) => format!("exit status {c}: {text}"),
                None => format!("killed by a signal: {text}"),
            };
            let said = clip_output(&said);
            if code == Some(0) { Outcome::Passing(said) } else { Outcome::Failing(said) }
        }
        Err(e) => Outcome::Failing(format!("cannot run `sh -c {command}`: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(kind: CheckKind) -> HealthCheck {
        HealthCheck { kind, port: None, interval_ms: 1_000, timeout_ms: 2_000, failures: 2 }
    }

    /// A port nothing listens on: bound, then closed.
    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn tcp_and_http_checks_against_real_sockets() {
        let dead = closed_port();
        assert!(matches!(run_check(&check(CheckKind::Tcp), dead).await, Outcome::Failing(_)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let answers =
            ["HTTP/1.1 200 OK", "HTTP/1.1 429 Too Many Requests", "HTTP/1.1 503 Unavailable", "nonsense"];
        tokio::spawn(async move {
            for a in answers {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /health HTTP/1.1\r\n"));
                s.write_all(format!("{a}\r\ncontent-length: 0\r\n\r\n").as_bytes()).await.unwrap();
            }
        });
        let http = check(CheckKind::Http { path: "/health".into() });
        let got = [
            run_check(&http, port).await,
            run_check(&http, port).await,
            run_check(&http, port).await,
            run_check(&http, port).await,
        ];
        assert!(matches!(&got[0], Outcome::Passing(s) if s.contains("200 OK")), "{got:?}");
        assert!(matches!(&got[1], Outcome::Warning(s) if s.contains("429")), "{got:?}");
        assert!(matches!(&got[2], Outcome::Failing(s) if s.contains("503")), "{got:?}");
        assert!(matches!(&got[3], Outcome::Failing(s) if s.contains("not an HTTP answer")), "{got:?}");
    }

    #[tokio::test]
    async fn grpc_checks_ask_the_standard_health_service() {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
        reporter.set_service_status("shop.Api", tonic_health::ServingStatus::NotServing).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
        let grpc = |svc: &str| check(CheckKind::Grpc { service: svc.into() });
        assert!(matches!(run_check(&grpc(""), port).await, Outcome::Passing(s) if s.contains("SERVING")));
        assert!(
            matches!(run_check(&grpc("shop.Api"), port).await, Outcome::Failing(s) if s.contains("NOT_SERVING"))
        );
        assert!(matches!(run_check(&grpc("unknown"), port).await, Outcome::Failing(_)));
        assert!(matches!(run_check(&grpc(""), closed_port()).await, Outcome::Failing(_)));
    }

    #[tokio::test]
    async fn command_checks_map_exit_codes_and_see_port() {
        let c = |cmd: &str| check(CheckKind::Command { command: cmd.into() });
        assert_eq!(
            run_check(&c("test \"$PORT\" = 4242"), 4242).await,
            Outcome::Passing("exit status 0".into())
        );
        assert!(
            matches!(run_check(&c("echo slow; exit 1"), 1).await, Outcome::Failing(s) if s == "exit status 1: slow")
        );
        assert!(
            matches!(run_check(&c("echo bad >&2; exit 2"), 1).await, Outcome::Failing(s) if s.contains("bad"))
        );
        let slow = HealthCheck { timeout_ms: 100, ..c("sleep 5") };
        assert!(matches!(run_check(&slow, 1).await, Outcome::Failing(s) if s.contains("within 100 ms")));
    }

    #[test]
    fn failures_count_before_critical() {
        let mut t = Tracker {
            spec: (check(CheckKind::Tcp), 1),
            next_due: Instant::now(),
            running: true,
            failures: 0,
            seen: Some((HealthStatus::Passing, "ok".into())),
            sent: None,
            basis: (HealthStatus::Passing, 0),
            since: Instant::now(),
        };
        record(&mut t, Outcome::Failing("no".into()));
        assert_eq!(t.seen, Some((HealthStatus::Passing, "ok".into())), "one failure of two keeps the status");
        record(&mut t, Outcome::Failing("no".into()));
        assert_eq!(t.seen, Some((HealthStatus::Critical, "no".into())));
        record(&mut t, Outcome::Passing("yes".into()));
        assert_eq!((t.failures, t.seen.clone()), (0, Some((HealthStatus::Passing, "yes".into()))));
    }
}
