//! Requests built from arguments, where more than one command builds the same one.

use std::time::Duration;

use portmesh_client::pb;
use portmesh_core::{CheckKind, HealthCheck};

use crate::args::PortArgs;

/// The items of one allocation: a port per name, the first at the wanted port; with a key and
/// several names, each key is suffixed `/NAME`.
/// The sticky key `run` uses when none is given: `PROJECT/SERVICE`, PROJECT being
/// `PORTMESH_PROJECT` or the name of the working directory (the Python package's default too), so
/// the same command run from the same project gets the same port next time.
pub fn default_key(service: &str) -> String {
    let project = std::env::var("PORTMESH_PROJECT").ok().filter(|p| !p.is_empty()).or_else(|| {
        std::env::current_dir().ok().and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
    });
    format!("{}/{service}", project.unwrap_or_else(|| "default".into()))
}

/// `--port` below the pools' range, said in the flag's words before the node is asked (it would
/// name the request's field, `items.port`).
pub fn check_wanted(w: &PortArgs) -> anyhow::Result<()> {
    match w.port {
        Some(p) if p < portmesh_core::MIN_PORT => anyhow::bail!(
            "--port {p}: port {p} is out of range: ports must lie in {}-65535 (below are the system's privileged ports)",
            portmesh_core::MIN_PORT
        ),
        _ => Ok(()),
    }
}

pub fn alloc_items(service: &str, w: &PortArgs, names: &[String]) -> Vec<pb::AllocItem> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| pb::AllocItem {
            service: service.to_string(),
            pool: w.pool.clone().unwrap_or_default(),
            port: if i == 0 { w.port.map_or(0, u32::from) } else { 0 },
            strategy: pb::Strategy::from(w.strategy) as i32,
            key: match (&w.key, names.len()) {
                (Some(k), 1) => k.clone(),
                (Some(k), _) => format!("{k}/{name}"),
                (None, _) => String::new(),
            },
            instance: w.instance.clone().unwrap_or_default(),
            env: w.env.clone().unwrap_or_default(),
        })
        .collect()
}

/// The wire form of a check. Zero interval and timeout mean the node's defaults.
pub fn check_pb(
    kind: &CheckKind,
    port_name: &str,
    interval: Option<Duration>,
    timeout: Option<Duration>,
    failures: u32,
) -> pb::HealthCheck {
    let check = HealthCheck {
        kind: kind.clone(),
        port: (!port_name.is_empty()).then(|| port_name.to_string()),
        interval_ms: interval.map_or(0, |i| i.as_millis() as u64),
        timeout_ms: timeout.map_or(0, |t| t.as_millis() as u64),
        failures,
    };
    pb::HealthCheck::from(&check)
}
