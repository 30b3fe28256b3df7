//! What the service registry keeps: a registered service, its named ports, its health check and
//! the health its host's node reports.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::Holder;

/// The health of a registered service, as its host's node last saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum HealthStatus {
    /// Not checked yet.
    #[default]
    Unknown,
    Passing,
    /// Answering, but not well (an HTTP check got 429).
    Warning,
    /// Failed `failures` checks in a row.
    Critical,
}

impl HealthStatus {
    /// Whether discovery hands the service out by default: it answered its last check (or it has
    /// no check).
    pub fn is_healthy(self) -> bool {
        matches!(self, Self::Passing | Self::Warning)
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unknown => "unknown",
            Self::Passing => "passing",
            Self::Warning => "warning",
            Self::Critical => "critical",
        })
    }
}

/// What a health check does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckKind {
    /// A TCP connection to the port is accepted.
    Tcp,
    /// `GET path` answers 2xx or 3xx (429: warning).
    Http { path: String },
    /// `grpc.health.v1.Health/Check` for `service` ("" = the whole server) answers SERVING.
    Grpc { service: String },
    /// `sh -c command` exits 0 (any other status fails). `PORT` is set in its environment.
    Command { command: String },
}

/// The text form people write (`portmesh register --check`, a project file's `check`): `tcp`,
/// `http:/PATH` (`http` alone: `/`), `grpc[:SERVICE]` or `cmd:COMMAND`.
impl FromStr for CheckKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "tcp" => Ok(Self::Tcp),
            None if s == "grpc" => Ok(Self::Grpc { service: String::new() }),
            None if s == "http" => Ok(Self::Http { path: "/".into() }),
            Some(("http", path)) if path.starts_with('/') => Ok(Self::Http { path: path.into() }),
            Some(("grpc", service)) => Ok(Self::Grpc { service: service.into() }),
            Some(("cmd", command)) if !command.trim().is_empty() => {
                Ok(Self::Command { command: command.into() })
            }
            _ => Err(format!("{s:?}: write tcp, http:/PATH, grpc[:SERVICE] or cmd:COMMAND")),
        }
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp => write!(f, "tcp"),
            Self::Http { path } => write!(f, "http:{path}"),
            Self::Grpc { service } if service.is_empty() => write!(f, "grpc"),
            Self::Grpc { service } => write!(f, "grpc:{service}"),
            Self::Command { command } => write!(f, "cmd:{command}"),
        }
    }
}

/// A health check, run by the node on the service's host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// Which named port to check; `None`: the first.
    pub port: Option<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failures before the service goes critical.
    pub failures: u32,
}

/// One named port of a registered service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    /// `tcp`, `http`, `grpc`, …; free text for clients.
    pub protocol: String,
}

/// A registry entry: where a service runs and whether it is healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub team: String,
    /// Unique within the team; registering the same id again replaces the entry.
    pub id: String,
    pub name: String,
    pub project: Option<String>,
    pub env: Option<String>,
    pub instance: Option<String>,
    /// The host it runs on; that host's node runs its health check.
    pub host: String,
    /// At least one; names are unique within the service.
    pub ports: Vec<ServicePort>,
    pub tags: Vec<String>,
    pub check: Option<HealthCheck>,
    pub depends_on: Vec<String>,
    pub status: HealthStatus,
    /// What the last check that changed the status said.
    pub output: String,
    pub lease_id: Option<u64>,
    /// The process that registered it, where the client said.
    pub holder: Option<Holder>,
    pub registered_ms: u64,
    /// The revision that registered it.
    pub revision: u64,
    /// When the status last changed.
    pub status_ms: u64,
}

impl Service {
    /// The id of a registration that names none: `NAME@HOST:PORT` of its first port.
    pub fn default_id(name: &str, host: &str, port: u16) -> String {
        format!("{name}@{host}:{port}")
    }

    /// The port a check or a client uses when it names none.
    pub fn main_port(&self) -> Option<u16> {
        self.ports.first().map(|p| p.port)
    }

    /// The port named `name`.
    pub fn port(&self, name: &str) -> Option<u16> {
        self.ports.iter().find(|p| p.name == name).map(|p| p.port)
    }
}

/// One health status change reported by a host's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthUpdate {
    pub team: String,
    pub id: String,
    pub status: HealthStatus,
    pub output: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_parse_and_print_back() {
        for text in ["tcp", "http:/health", "grpc", "grpc:shop.Api", "cmd:pg_isready -p $PORT"] {
            let kind: CheckKind = text.parse().unwrap();
            assert_eq!(kind.to_string(), text);
        }
        assert_eq!("http".parse::<CheckKind>().unwrap(), CheckKind::Http { path: "/".into() });
        for bad in ["", "udp", "http:health", "cmd:", "cmd:  "] {
            let err = bad.parse::<CheckKind>().unwrap_err();
            assert!(err.contains("write tcp, http:/PATH"), "{bad}: {err}");
        }
    }
}
