//! Health checks of users' services on this host: `tcp` (a connection opens), `http:/PATH`
//! (2xx/3xx pass, 429 warns, anything else fails), `grpc[:SERVICE]` (the standard
//! `grpc.health.v1` service answers SERVING) and `cmd:COMMAND` (`sh -c`, `PORT` set, exit status 0
//! passes). Each looks on IPv4 loopback, then IPv6 loopback, within the check's timeout.
//!
//! Owns: running one check and saying what it found. Does not own: when checks run, counting
//! failures or replicating a change of status (the node's checker does that), nor waiting for a
//! starting service (`portmesh up` does, through [`run`]).

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use portmesh_core::{CheckKind, HealthCheck, HealthStatus, clip_output};
use portmesh_proto::channel::{self, Purpose};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Channel;

/// What one check run found, and what the service said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passing(String),
    Warning(String),
    Failing(String),
}

impl Outcome {
    /// The status one run says on its own (a single failure is critical; counting consecutive
    /// failures is the caller's business).
    pub fn status(&self) -> HealthStatus {
        match self {
            Outcome::Passing(_) => HealthStatus::Passing,
            Outcome::Warning(_) => HealthStatus::Warning,
            Outcome::Failing(_) => HealthStatus::Critical,
        }
    }

    /// What the service said (or why it could not be asked).
    pub fn output(&self) -> &str {
        match self {
            Outcome::Passing(s) | Outcome::Warning(s) | Outcome::Failing(s) => s,
        }
    }
}

/// Runs one check against `port` on this host.
pub async fn run(check: &HealthCheck, port: u16) -> Outcome {
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
        let endpoint =
            channel::endpoint(&addr.to_string(), Purpose::Check, None).map_err(|e| e.to_string())?;
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

    #[tokio::test]
    async fn tcp_and_http_checks_against_real_sockets() {
        // Held, not closed: a closed port could be taken by a parallel test and answer.
        let dead = portmesh_testkit::refusing_port();
        assert!(matches!(run(&check(CheckKind::Tcp), dead.port).await, Outcome::Failing(_)));
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
        let got =
            [run(&http, port).await, run(&http, port).await, run(&http, port).await, run(&http, port).await];
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
        assert!(matches!(run(&grpc(""), port).await, Outcome::Passing(s) if s.contains("SERVING")));
        assert!(
            matches!(run(&grpc("shop.Api"), port).await, Outcome::Failing(s) if s.contains("NOT_SERVING"))
        );
        assert!(matches!(run(&grpc("unknown"), port).await, Outcome::Failing(_)));
        assert!(matches!(run(&grpc(""), portmesh_testkit::refusing_port().port).await, Outcome::Failing(_)));
    }

    #[tokio::test]
    async fn command_checks_map_exit_codes_and_see_port() {
        let c = |cmd: &str| check(CheckKind::Command { command: cmd.into() });
        assert_eq!(run(&c("test \"$PORT\" = 4242"), 4242).await, Outcome::Passing("exit status 0".into()));
        assert!(
            matches!(run(&c("echo slow; exit 1"), 1).await, Outcome::Failing(s) if s == "exit status 1: slow")
        );
        assert!(matches!(run(&c("echo bad >&2; exit 2"), 1).await, Outcome::Failing(s) if s.contains("bad")));
        let slow = HealthCheck { timeout_ms: 100, ..c("sleep 5") };
        assert!(matches!(run(&slow, 1).await, Outcome::Failing(s) if s.contains("within 100 ms")));
    }

    #[test]
    fn outcomes_map_to_statuses() {
        assert_eq!(Outcome::Passing("a".into()).status(), HealthStatus::Passing);
        assert_eq!(Outcome::Warning("b".into()).status(), HealthStatus::Warning);
        assert_eq!(Outcome::Failing("c".into()).status(), HealthStatus::Critical);
        assert_eq!(Outcome::Failing("c".into()).output(), "c");
    }
}
