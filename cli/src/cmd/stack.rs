//! `up`, `down`, `ps`, `env` and `config show`: the commands of a project's stack (the
//! machinery is in `crate::stack`).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use portmesh_client::pb;
use portmesh_project::Ports;
use serde_json::json;

use crate::args::{Cli, ProjectArgs, UpArgs};
use crate::node;
use crate::render::{fmt_dur, health, named_ports};
use crate::stack::{self as stacks, detach, record, runner};

pub fn config_show(cli: &Cli, p: &ProjectArgs) -> Result<i32> {
    let r = stacks::load(cli, p)?;
    if cli.json {
        let services: Vec<_> = r.stack.services.iter().map(|s| json!({
            "name": s.name, "command": s.command, "pool": s.pool, "strategy": format!("{:?}", s.strategy).to_lowercase(),
            "ports": s.ports.iter().map(|p| json!({"name": p.name, "wanted": p.wanted})).collect::<Vec<_>>(),
            "check": s.check.as_ref().map(ToString::to_string), "depends_on": s.depends_on, "env": s.env,
            "fd": s.fd, "ready_timeout_ms": s.ready_timeout.as_millis() as u64, "stop_timeout_ms": s.stop_timeout.as_millis() as u64,
        })).collect();
        println!(
            "{}",
            json!({"project": r.stack.project, "team": r.stack.team, "env": r.stack.env, "instance": r.stack.instance,
                   "layers": r.layers().collect::<Vec<_>>(), "services": services})
        );
    } else {
        print!("{}", r.show());
    }
    Ok(0)
}

pub async fn up(cli: &Cli, a: &UpArgs) -> Result<i32> {
    // A supervisor started by `up --detach` tells it through this pipe: "up", or why not.
    let mut report = a.report_fd.map(detach::adopt_report_pipe).transpose()?;
    let result = up_here(cli, a, &mut report).await;
    if let (Some(mut pipe), Err(e)) = (report.take(), &result) {
        let _ = write!(pipe, "failed\n{e:#}");
    }
    result
}

async fn up_here(cli: &Cli, a: &UpArgs, report: &mut Option<std::fs::File>) -> Result<i32> {
    let stack = stacks::load(cli, &a.project)?.stack;
    let c = node::connect(cli).await?;
    let path = record::path(&stack)?;
    // A detached up does these in the foreground, where the user sees what they end.
    if !a.supervise {
        if a.force {
            // Before anything is stopped: a port allocated to another stack is not ours to take.
            stacks::ports::refuse_others_allocations(&c, &stack).await?;
        }
        if let Some(st) = record::read(&path)? {
            if record::supervisor_runs(st.supervisor) {
                if !a.kill_existing {
                    bail!(
                        "{} is already up (supervised by pid {}): stop it with `portmesh down`, or pass --kill-existing",
                        st.scope,
                        st.supervisor
                    );
                }
                eprintln!("portmesh: stopping the earlier up of {} (pid {})", st.scope, st.supervisor);
            }
            stacks::stop_recorded(&c, &st, &path, stacks::stop_budget(&stack)).await?;
        }
        if a.force {
            stacks::ports::free_wanted_ports(&stack).await?;
        }
        if a.detach {
            return detach::detach(cli, &c, a, &stack).await;
        }
    }
    let started = Instant::now();
    let (lease, ports, notes) = stacks::ports::allocate(&c, &stack, a.kill_existing).await?;
    let mut rec = record::StackRecord {
        scope: stack.scope(),
        team: stack.team.clone(),
        file: stack.file.display().to_string(),
        supervisor: std::process::id(),
        lease,
        phase: "starting".into(),
        services: Vec::new(),
        reason: None,
        notes,
    };
    record::write(&path, &rec)?;
    let outcome = runner::supervise_stack(&c, &stack, lease, &ports, &mut rec, &path, report, started).await;
    if let Err(e) = node::end_lease(&c, &stack.team, lease).await {
        eprintln!("portmesh: {e:#}; the ports come back when it runs out");
    }
    match &outcome {
        // Why a stack that was up stopped stays for `ps` (a detached stack's terminal is gone);
        // an `up` that failed while starting said why where it was run (`up -d` too).
        Err(e) if rec.phase == "up" => {
            rec.phase = "failed".into();
            rec.reason = Some(format!("{e:#}"));
            let _ = record::write(&path, &rec);
        }
        _ => {
            let _ = std::fs::remove_file(&path);
        }
    }
    outcome
}

pub async fn down(cli: &Cli, p: &ProjectArgs) -> Result<i32> {
    let stack = stacks::load(cli, p)?.stack;
    let path = record::path(&stack)?;
    let Some(st) = record::read(&path)? else {
        println!("{} is not up", stack.scope());
        return Ok(0);
    };
    let c = node::connect(cli).await?;
    stacks::stop_recorded(&c, &st, &path, stacks::stop_budget(&stack)).await?;
    println!("portmesh: {} is down", st.scope);
    Ok(0)
}

pub async fn ps(cli: &Cli, p: &ProjectArgs) -> Result<i32> {
    let stack = stacks::load(cli, p)?.stack;
    let st = record::read(&record::path(&stack)?)?;
    let c = node::connect(cli).await?;
    let found = c
        .discover(pb::DiscoverRequest {
            team: stack.team.clone(),
            project: stack.project.clone(),
            env: stack.env.clone(),
            include_unhealthy: true,
            ..Default::default()
        })
        .await?
        .services;
    let registered: BTreeMap<&str, &pb::Service> =
        found.iter().filter(|s| s.instance == stack.instance_name()).map(|s| (s.name.as_str(), s)).collect();
    let now = portmesh_core::unix_ms(std::time::SystemTime::now());
    let phase = st.as_ref().map_or("down", |s| s.phase.as_str());
    let reason = st.as_ref().and_then(|s| s.reason.as_deref());
    let up = phase == "up";
    let rows: Vec<PsRow<'_>> = stack
        .services
        .iter()
        .map(|svc| {
            let reg = registered.get(svc.name.as_str());
            let local = st.as_ref().and_then(|st| st.services.iter().find(|s| s.name == svc.name));
            PsRow {
                name: &svc.name,
                status: match reg.map(|r| r.status()) {
                    // Not checked by the node yet, but `up` saw it pass its check before it
                    // reported the stack up.
                    Some(pb::HealthStatus::Unknown) if up => "passing",
                    Some(s) => health(s),
                    None => "stopped",
                },
                ports: match (reg, local) {
                    (Some(r), _) => r.ports.iter().map(|p| (p.name.clone(), p.port as u16)).collect(),
                    (None, Some(l)) => l.ports.clone(),
                    _ => Vec::new(),
                },
                pid: reg.map(|r| r.pid).filter(|p| *p != 0).or(local.map(|l| l.pid)),
                uptime_ms: local.map(|l| now.saturating_sub(l.started_ms)),
                output: reg.map(|r| r.output.as_str()),
            }
        })
        .collect();
    if cli.json {
        let services: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "name": r.name, "status": r.status,
                    "ports": r.ports.iter().map(|(n, p)| json!({"name": n, "port": p})).collect::<Vec<_>>(),
                    "pid": r.pid, "uptime_ms": r.uptime_ms, "output": r.output,
                })
            })
            .collect();
        println!(
            "{}",
            json!({"scope": stack.scope(), "phase": phase, "reason": reason, "services": services})
        );
        return Ok(0);
    }
    match reason {
        Some(why) => println!("{} ({phase}: {why})", stack.scope()),
        None => println!("{} ({phase})", stack.scope()),
    }
    println!("{:<16} {:<9} {:<24} {:<8} UPTIME", "SERVICE", "STATUS", "PORTS", "PID");
    for r in rows {
        println!(
            "{:<16} {:<9} {:<24} {:<8} {}",
            r.name,
            r.status,
            named_ports(Some(&r.ports)),
            r.pid.map_or("-".to_string(), |p| p.to_string()),
            r.uptime_ms.map_or("-".to_string(), |ms| fmt_dur(Duration::from_secs(ms / 1000)))
        );
    }
    Ok(0)
}

/// One service of `ps`.
#[derive(Debug)]
struct PsRow<'a> {
    name: &'a str,
    status: &'static str,
    ports: Vec<(String, u16)>,
    pid: Option<u32>,
    uptime_ms: Option<u64>,
    output: Option<&'a str>,
}

pub async fn env(cli: &Cli, p: &ProjectArgs) -> Result<i32> {
    let stack = stacks::load(cli, p)?.stack;
    let c = node::connect(cli).await?;
    let live = c
        .list(pb::ListRequest { team: stack.team.clone(), keys: stack.keys(), ..Default::default() })
        .await?;
    let mut ports = Ports::new();
    for svc in &stack.services {
        for port in &svc.ports {
            let key = stack.key(&svc.name, &port.name);
            if let Some(al) = live.allocations.iter().find(|al| al.key == key) {
                ports.entry(svc.name.clone()).or_default().push((port.name.clone(), al.port as u16));
            }
        }
    }
    if ports.len() != stack.services.len() {
        bail!("{} is not up, so its ports are not known: start it with `portmesh up` first", stack.scope());
    }
    let mut vars: BTreeMap<String, String> = stack.port_vars(&ports).into_iter().collect();
    for svc in &stack.services {
        vars.extend(stack.service_env(svc, &ports).map_err(anyhow::Error::msg)?);
    }
    if cli.json {
        println!("{}", json!(vars));
    } else {
        for (k, v) in vars {
            println!("export {k}='{}'", v.replace('\'', "'\\''"));
        }
    }
    Ok(0)
}
