//! The service registry: `register`, `deregister`, `discover`.

use std::io::Write;

use anyhow::Result;
use portmesh_client::{Client, pb};
use serde_json::json;

use crate::args::RegisterArgs;
use crate::render::{health, service_json, service_ports_text};
use crate::requests::check_pb;

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
    let s = c.register(pb::RegisterRequest { service: Some(svc) }).await?;
    if json {
        println!("{}", service_json(&s));
    } else {
        println!("{}", s.id);
    }
    Ok(())
}

pub async fn deregister(c: &Client, team: &str, id: &str, json: bool) -> Result<()> {
    let s = c.deregister(pb::DeregisterRequest { team: team.into(), id: id.into() }).await?;
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
            service_ports_text(s),
            s.id
        )?;
    }
    Ok(())
}
