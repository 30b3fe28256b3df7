//! What a project file may say. Every level of the file (the top, `[env.<name>]`,
//! `[instances.<name>]`) has the same shape, [`Settings`]; every field is optional there, since a
//! level may say only what it changes. The resolved, validated form is [`crate::Stack`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as text: `30s`, `1m 30s`, `500ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration ({e}): write e.g. \"500ms\", \"30s\" or \"2m\""
            ))
        })
    }
}

/// `extends = "base.toml"` or `extends = ["a.toml", "b.toml"]` (later ones win).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Extends {
    One(String),
    Many(Vec<String>),
}

impl Extends {
    pub fn files(&self) -> Vec<&str> {
        match self {
            Extends::One(f) => vec![f.as_str()],
            Extends::Many(fs) => fs.iter().map(String::as_str).collect(),
        }
    }
}

/// One level of a project file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The project's name: part of every sticky key and registration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The team whose pools the stack draws from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// Files this one builds on, relative to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extends: Option<Extends>,
    /// TTL of the lease that holds the stack's ports while `up` runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ttl: Option<Dur>,
    /// How long a service may take to become healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_timeout: Option<Dur>,
    /// How long a stopping service gets between SIGTERM and SIGKILL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<Dur>,
    /// Time between health checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_interval: Option<Dur>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, ServiceSettings>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, Settings>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub instances: BTreeMap<String, Settings>,
}

/// `[services.<name>]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    /// Run with `sh -c` in the project's directory (or `workdir`); `{port}` and friends replaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The wanted port of the first port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// sticky, next, random or fail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Named ports, `NAME` or `NAME=PORT` (wanted port); the first is `PORT`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<String>>,
    /// tcp, http:/PATH, grpc[:SERVICE] or cmd:COMMAND.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// Which named port the check targets (default: the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_port: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depends_on: Option<Vec<String>>,
    /// Variables for the service; values may use `{svc.port}` templates.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Bind the first port here and hand the socket over as fd 3 (systemd socket activation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd: Option<bool>,
    /// Working directory, relative to the project file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_timeout: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
}

/// The built-in defaults for environment `env`: development environments fail fast, production
/// gives services time.
pub fn builtin(env: &str) -> Settings {
    // The check interval applies while a service passes; the node checks every 500 ms while it
    // starts or fails, so a dev stack notices a crash within a second of the first failed check.
    let (ready, stop, interval) = match env {
        "prod" | "production" | "staging" => (120, 30, 10_000),
        _ => (30, 5, 10_000),
    };
    Settings {
        team: Some(portmesh_core::DEFAULT_TEAM.into()),
        lease_ttl: Some(Dur(Duration::from_secs(10))),
        ready_timeout: Some(Dur(Duration::from_secs(ready))),
        stop_timeout: Some(Dur(Duration::from_secs(stop))),
        check_interval: Some(Dur(Duration::from_millis(interval))),
        ..Settings::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_waits_longer_than_development() {
        let (dev, prod) = (builtin("dev"), builtin("prod"));
        assert!(prod.ready_timeout.unwrap().0 > dev.ready_timeout.unwrap().0);
        assert!(prod.stop_timeout.unwrap().0 > dev.stop_timeout.unwrap().0);
        assert_eq!(builtin("test"), dev);
    }
}
