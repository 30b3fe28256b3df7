//! How pb values look to people and programs: one renderer per kind of value, text or JSON,
//! shared by every command that prints one. A command's own table layout stays with the command.

use std::time::Duration;

use portmesh_client::pb;
use serde_json::json;

pub fn print_or_json(json: bool, text: &str, value: impl FnOnce() -> serde_json::Value) {
    if json {
        println!("{}", value());
    } else {
        println!("{text}");
    }
}

/// Rows as aligned columns, each as wide as its widest cell (a long key no longer pushes the
/// columns after it out of line). Columns in `right` are right-aligned (numbers). No trailing
/// spaces.
pub fn table(header: &[&str], rows: &[Vec<String>], right: &[usize]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                out.push(' ');
            }
            let pad = w - cell.chars().count();
            if right.contains(&i) {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.push_str(&" ".repeat(pad));
            }
        }
        out.trim_end().to_string()
    };
    let mut lines = vec![line(header.to_vec())];
    lines.extend(rows.iter().map(|r| line(r.iter().map(String::as_str).collect())));
    lines.join("\n")
}

pub fn fmt_dur(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

/// Whole seconds: what a person wants of a time to exhaustion or a history window.
pub fn human_ms(ms: u64) -> String {
    fmt_dur(Duration::from_secs(ms / 1000))
}

pub fn ranges_text(r: &[pb::PortRange]) -> String {
    r.iter()
        .map(|r| if r.start == r.end { r.start.to_string() } else { format!("{}-{}", r.start, r.end) })
        .collect::<Vec<_>>()
        .join(",")
}

/// ` pid N (command)`, or nothing when unknown.
pub fn holder(pid: u32, command: &str) -> String {
    match (pid, command) {
        (0, _) => String::new(),
        (p, "") => format!(" pid {p}"),
        (p, c) => format!(" pid {p} ({c})"),
    }
}

pub fn alloc_json(a: &pb::Allocation) -> serde_json::Value {
    json!({
        "port": a.port, "team": a.team, "pool": a.pool, "service": a.service,
        "key": (!a.key.is_empty()).then_some(&a.key),
        "lease_id": (a.lease_id != 0).then_some(a.lease_id),
        "host": a.host, "revision": a.revision,
        "pid": (a.pid != 0).then_some(a.pid),
        "command": (!a.command.is_empty()).then_some(&a.command),
    })
}

pub fn health(h: pb::HealthStatus) -> &'static str {
    match h {
        pb::HealthStatus::Unknown => "unknown",
        pb::HealthStatus::Passing => "passing",
        pb::HealthStatus::Warning => "warning",
        pb::HealthStatus::Critical => "critical",
    }
}

pub fn service_ports_text(s: &pb::Service) -> String {
    s.ports.iter().map(|p| format!("{}={}", p.name, p.port)).collect::<Vec<_>>().join(",")
}

/// One line for a person: name, id, host, ports, status.
pub fn service_line(s: &pb::Service) -> String {
    format!("{} {} host {} ports {} ({})", s.name, s.id, s.host, service_ports_text(s), health(s.status()))
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

/// Named ports as `NAME=PORT,…`.
pub fn named_ports(ports: Option<&Vec<(String, u16)>>) -> String {
    ports
        .map(|ps| ps.iter().map(|(n, p)| format!("{n}={p}")).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

pub fn event_type(e: &pb::Event) -> &'static str {
    match e.r#type() {
        pb::EventType::Allocated => "allocated",
        pb::EventType::Released => "released",
        pb::EventType::Expired => "expired",
        pb::EventType::Reserved => "reserved",
        pb::EventType::Unreserved => "unreserved",
        pb::EventType::PoolAdded => "pool_added",
        pb::EventType::PoolRemoved => "pool_removed",
        pb::EventType::LeaseGranted => "lease_granted",
        pb::EventType::LeaseRevoked => "lease_revoked",
        pb::EventType::LeaseExpired => "lease_expired",
        pb::EventType::ConflictObserved => "conflict",
        pb::EventType::CooldownChanged => "cooldown_changed",
        pb::EventType::ServiceRegistered => "service_registered",
        pb::EventType::ServiceDeregistered => "service_deregistered",
        pb::EventType::HealthChanged => "health_changed",
        pb::EventType::Unspecified => "unknown",
    }
}

pub fn event_json(e: &pb::Event) -> serde_json::Value {
    let mut v = json!({"revision": e.revision, "seq": e.seq, "at_ms": e.at_ms, "type": event_type(e)});
    if let Some(a) = &e.allocation {
        v["allocation"] = alloc_json(a);
    }
    if !e.cause.is_empty() {
        v["cause"] = json!(e.cause);
    }
    if let Some(r) = &e.reservation {
        v["reservation"] = json!({"port": r.port, "reason": r.reason});
    }
    if e.port != 0 {
        v["port"] = json!(e.port);
    }
    if !e.team.is_empty() {
        v["team"] = json!(e.team);
    }
    if !e.pool_name.is_empty() {
        v["pool"] = json!(e.pool_name);
    }
    if e.lease_id != 0 {
        v["lease_id"] = json!(e.lease_id);
    }
    if e.ttl_ms != 0 {
        v["ttl_ms"] = json!(e.ttl_ms);
    }
    if let Some(c) = &e.conflict {
        v["conflict"] = json!({
            "port": c.port, "team": c.team, "pool": c.pool, "service": c.service, "host": c.host,
            "pid": (c.pid != 0).then_some(c.pid), "command": (!c.command.is_empty()).then_some(&c.command),
        });
    }
    if let Some(svc) = &e.service {
        v["service"] = service_json(svc);
    }
    if e.r#type() == pb::EventType::HealthChanged {
        v["service_id"] = json!(e.service_id);
        v["service_name"] = json!(e.service_name);
        v["host"] = json!(e.host);
        v["previous"] = json!(health(e.previous()));
        v["status"] = json!(health(e.status()));
        v["output"] = json!(e.output);
    }
    v
}

pub fn event_text(e: &pb::Event) -> String {
    let what = match (e.r#type(), &e.allocation, &e.conflict) {
        (pb::EventType::Allocated, Some(a), _) => {
            format!(
                "{} {}/{} host {}{} (team {})",
                a.port,
                a.pool,
                a.service,
                a.host,
                holder(a.pid, &a.command),
                a.team
            )
        }
        (pb::EventType::Released | pb::EventType::Expired, Some(a), _) => {
            format!(
                "{} {}/{} host {}{} ({})",
                a.port,
                a.pool,
                a.service,
                a.host,
                holder(a.pid, &a.command),
                e.cause
            )
        }
        (pb::EventType::ConflictObserved, _, Some(c)) => {
            format!(
                "{} busy on host {}{} (wanted for {}/{})",
                c.port,
                c.host,
                holder(c.pid, &c.command),
                c.pool,
                c.service
            )
        }
        (pb::EventType::Reserved, ..) => {
            e.reservation.as_ref().map(|r| format!("{} ({})", r.port, r.reason)).unwrap_or_default()
        }
        (pb::EventType::Unreserved, ..) => e.port.to_string(),
        (pb::EventType::PoolAdded | pb::EventType::PoolRemoved, ..) => format!("{}/{}", e.team, e.pool_name),
        (pb::EventType::LeaseGranted, ..) => {
            format!("{} (ttl {}, team {})", e.lease_id, fmt_dur(Duration::from_millis(e.ttl_ms)), e.team)
        }
        (pb::EventType::LeaseRevoked | pb::EventType::LeaseExpired, ..) => {
            format!("{} (team {})", e.lease_id, e.team)
        }
        (pb::EventType::CooldownChanged, ..) => fmt_dur(Duration::from_millis(e.ttl_ms)),
        (pb::EventType::ServiceRegistered, ..) => e.service.as_ref().map(service_line).unwrap_or_default(),
        (pb::EventType::ServiceDeregistered, ..) => {
            e.service.as_ref().map(|s| format!("{} ({})", service_line(s), e.cause)).unwrap_or_default()
        }
        (pb::EventType::HealthChanged, ..) => format!(
            "{} {} on {}: {} -> {} ({})",
            e.service_name,
            e.service_id,
            e.host,
            health(e.previous()),
            health(e.status()),
            e.output
        ),
        _ => String::new(),
    };
    format!("{:>8}  {:<16} {what}", e.revision, event_type(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_cell_widens_its_column_and_the_others_stay_in_line() {
        let rows = vec![
            vec!["8000".to_string(), "flaskr/dev/default/web/main".to_string(), "7".to_string()],
            vec!["8001".to_string(), "-".to_string(), "12".to_string()],
        ];
        let t = table(&["PORT", "KEY", "REV"], &rows, &[2]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "PORT KEY                         REV");
        assert_eq!(lines[1], "8000 flaskr/dev/default/web/main   7");
        assert_eq!(lines[2], "8001 -                            12");
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{t}");
    }
}
