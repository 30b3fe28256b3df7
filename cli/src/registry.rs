//! `register`, `deregister` and `discover`.

use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use portmesh_client::{Client, pb};
use serde_json::json;

use portmesh_core::CheckKind;

use crate::args::RegisterArgs;

pub fn health(h: pb::HealthStatus) -> &'static str {
    match h {
        pb::HealthStatus::Unknown => "unknown",
        pb::HealthStatus::Passing => "passing",
        pb::HealthStatus::Warning => "warning",
        pb::HealthStatus::Critical => "critical",
    }
}

fn ports_text(s: &pb::Service) -> String {
    s.ports.iter().map(|p| format!("{}={}", p.name, p.port)).collect::<Vec<_>>().join(",")
}

/// One line for a person: name, id, host, ports, status.
pub fn service_line(s: &pb::Service) -> String {
    format!("{} {} host {} ports {} ({})", s.name, s.id, s.host, ports_text(s), health(s.status()))
}

pub fn service_json(s: &pb::Service) -> serde_json::Value {
    let opt = |v: &String| (!v.is_empty()).then(|| v.clone());
    json!({
        "team": s.team, "id": s.id, "name": s.name,
        "project": opt(&s.project), "env": opt(&s.env), "instance": opt(&s.instance),
        "host": s.host,
        "ports": s.ports.iter().map(|p| json!({"name": p.name, "port": p.port, "protocol": opt(&p.protocol)})).collect::<Vec<_>>(),
        "tags": s.tags,
        "status": health(s.status()),
        "output": s.output,
        "lease_id": (s.lease_id != 0).then_some(s.lease_id),
        "pid": (s.pid != 0).then_some(s.pid),
        "command": opt(&s.command),
        "depends_on": s.depends_on,
        "revision": s.revision,
        "registered_ms": s.registered_ms,
        "status_ms": s.status_ms,
    })
}

/// The wire form of a check. Zero interval and timeout mean the node's defaults.
pub fn check_pb(
    kind: &CheckKind,
    port_name: &str,
    interval: Option<Duration>,
    timeout: Option<Duration>,
    failures: u32,
) -> pb::HealthCheck {
    let mut ch = pb::HealthCheck {
        port_name: port_name.to_string(),
        interval_ms: interval.map_or(0, |i| i.as_millis() as u64),
        timeout_ms: timeout.map_or(0, |t| t.as_millis() as u64),
        failures,
        ..Default::default()
    };
    ch.set_kind(kind);
    ch
}

pub async fn register(c: &Client, team: &str, a: &RegisterArgs, json: bool) -> Result<()> {
    let check = a.check.as_ref().map(|spec| {
        check_pb(spec, a.check_port.as_deref().unwrap_or_default(), a.interval, a.timeout, a.failures)
    });
    let svc = pb::Service {
        team: team.to_string(),
        id: a.id.clone().unwrap_or_default(),
        name: a.name.clone(),
        project: a.project.clone().unwrap_or_default(),
        env: a.env.clone().unwrap_or_default(),
        instance: a.instance.clone().unwrap_or_default(),
        host: a.host.clone().unwrap_or_default(),
        ports: a
            .ports
            .iter()
            .map(|(name, port, protocol)| pb::ServicePort {
                name: name.clone(),
                port: u32::from(*port),
                protocol: protocol.clone(),
            })
            .collect(),
        tags: a.tags.clone(),
        check,
        depends_on: a.depends_on.clone(),
        lease_id: a.lease.unwrap_or(0),
        ..Default::default()
    };
    let s = c.register(svc).await?;
    if json {
        println!("{}", service_json(&s));
    } else {
        println!("{}", s.id);
    }
    Ok(())
}

pub async fn deregister(c: &Client, team: &str, id: &str, json: bool) -> Result<()> {
    let s = c.deregister(team, id).await?;
    if json {
        println!("{}", service_json(&s));
    } else {
        println!("deregistered {}", s.id);
    }
    Ok(())
}

pub async fn discover(c: &Client, req: pb::DiscoverRequest, json: bool) -> Result<()> {
    let r = c.discover(req).await?;
    let mut out = std::io::stdout().lock();
    if json {
        let services: Vec<_> = r.services.iter().map(service_json).collect();
        writeln!(out, "{}", json!({"services": services, "revision": r.revision}))?;
        return Ok(());
    }
    if r.services.is_empty() {
        writeln!(out, "no service found (unhealthy ones are listed with --all)")?;
        return Ok(());
    }
    writeln!(out, "{:<16} {:<9} {:<20} {:<24} ID", "NAME", "STATUS", "HOST", "PORTS")?;
    for s in &r.services {
        writeln!(
            out,
            "{:<16} {:<9} {:<20} {:<24} {}",
            s.name,
            health(s.status()),
            s.host,
            ports_text(s),
            s.id
        )?;
    }
    Ok(())
}
