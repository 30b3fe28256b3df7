//! Running a stack in the foreground: start the services in order, each once healthy, register
//! them under the stack's lease, supervise them, and stop them all in reverse order.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use portmesh_client::{Client, pb};
use portmesh_core::HealthCheck;
use portmesh_project::{Ports, ServiceDef, Stack};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::record::{self, ServiceRecord, StackRecord};
use crate::process::{
    self,
    spawn::{self, Output, Proc, Program, Spec},
};
use crate::render::named_ports;
use crate::requests::check_pb;

/// How often `up` runs a starting service's check while it waits for it to become healthy.
const READY_POLL: Duration = Duration::from_millis(100);

/// Starts the services in order, waits for each to be healthy, then supervises them until one
/// ends or we are told to stop; stops them all in reverse order either way.
#[allow(clippy::too_many_arguments)]
pub async fn supervise_stack(
    c: &Client,
    stack: &Stack,
    lease: u64,
    ports: &Ports,
    rec: &mut StackRecord,
    path: &Path,
    report: &mut Option<std::fs::File>,
    started: Instant,
) -> Result<i32> {
    let (exits_tx, mut exits) = mpsc::unbounded_channel();
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut keeper = c.keep_lease(&stack.team, lease, stack.lease_ttl);
    let width = stack.services.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let mut procs: Vec<(&ServiceDef, Proc)> = Vec::new();
    for (i, svc) in stack.services.iter().enumerate() {
        let started = stack.command(svc, ports).map_err(anyhow::Error::msg).and_then(|command| {
            let proc = start(stack, svc, &command, ports, width, i, exits_tx.clone())?;
            Ok((command, proc))
        });
        let (command, proc) = match started {
            Ok(started) => started,
            Err(e) => {
                stop_all(&procs).await;
                return Err(e.context(format!("service {} could not start", svc.name)));
            }
        };
        rec.services.push(ServiceRecord {
            name: svc.name.clone(),
            pid: proc.pid,
            since: process::start_ticks(proc.pid),
            ports: ports.get(&svc.name).cloned().unwrap_or_default(),
            started_ms: portmesh_core::unix_ms(std::time::SystemTime::now()),
        });
        record::write(path, rec)?;
        procs.push((svc, proc.clone()));
        // Biased: when the starting service ends, its own wait says so first (the `exits` message
        // about it is then ready too, and would give a vaguer reason).
        let ready = tokio::select! {
            biased;
            r = async {
                wait_ready(svc, &proc, ports).await?;
                register(c, stack, svc, &command, lease, ports, &proc).await
            } => r,
            Some((name, status)) = exits.recv() => Err(anyhow!(
                "service {name} {} while {} was starting", process::describe(status), svc.name
            )),
            _ = int.recv() => Err(anyhow!("interrupted while {} was starting", svc.name)),
            _ = term.recv() => Err(anyhow!("told to stop while {} was starting", svc.name)),
        };
        if let Err(e) = ready {
            stop_all(&procs).await;
            return Err(e.context(format!("service {} failed", svc.name)));
        }
    }
    rec.phase = "up".into();
    record::write(path, rec)?;
    if let Some(mut pipe) = report.take() {
        let _ = pipe.write_all(b"up\n");
    }
    println!(
        "portmesh: {} is up: {} service(s) healthy in {:.1} s",
        stack.scope(),
        procs.len(),
        started.elapsed().as_secs_f64()
    );
    for (svc, p) in &procs {
        println!("portmesh:   {:<width$}  {}  pid {}", svc.name, named_ports(ports.get(&svc.name)), p.pid);
    }

    let mut lease_ok = true;
    let outcome = loop {
        tokio::select! {
            Some((name, status)) = exits.recv() => break Err(anyhow!(
                "service {name} {}; stopping the stack", process::describe(status)
            )),
            _ = int.recv() => break Ok(0),
            _ = term.recv() => break Ok(0),
            lost = keeper.lost(), if lease_ok => {
                lease_ok = false;
                eprintln!("portmesh: warning: {lost}; the stack keeps running, but its ports may be handed out again");
            }
        }
    };
    stop_all(&procs).await;
    outcome
}

/// Starts one service (not waiting for it to be healthy).
fn start(
    stack: &Stack,
    svc: &ServiceDef,
    command: &str,
    ports: &Ports,
    width: usize,
    i: usize,
    exits: mpsc::UnboundedSender<(String, std::process::ExitStatus)>,
) -> Result<Proc> {
    let vars = stack.vars(svc, ports).map_err(anyhow::Error::msg)?;
    let own = ports.get(&svc.name).cloned().unwrap_or_default();
    let socket = match (svc.fd, own.first()) {
        (true, Some((name, port))) => {
            Some((spawn::bind(std::net::Ipv4Addr::LOCALHOST.into(), *port)?, name.clone()))
        }
        _ => None,
    };
    let proc = spawn::spawn(
        &svc.name,
        Spec {
            program: Program::Shell(command.to_string()),
            vars,
            dir: Some(&svc.workdir),
            socket,
            output: Output::Prefixed { label: format!("{:<width$}", svc.name), color: spawn::color(i) },
        },
        Some(exits),
    )?;
    Ok(proc)
}

/// Registers a started, healthy service under the stack's lease.
async fn register(
    c: &Client,
    stack: &Stack,
    svc: &ServiceDef,
    command: &str,
    lease: u64,
    ports: &Ports,
    proc: &Proc,
) -> Result<()> {
    let own = ports.get(&svc.name).cloned().unwrap_or_default();
    let registration = pb::Service {
        team: stack.team.clone(),
        id: stack.service_id(&svc.name),
        name: svc.name.clone(),
        project: stack.project.clone(),
        env: stack.env.clone(),
        instance: stack.instance_name().to_string(),
        ports: own
            .iter()
            .map(|(n, p)| pb::ServicePort { name: n.clone(), port: u32::from(*p), protocol: String::new() })
            .collect(),
        tags: svc.tags.clone(),
        // Two failures in a row before critical: one slow answer is not an outage.
        check: svc
            .check
            .as_ref()
            .map(|spec| check_pb(spec, &svc.check_port, Some(svc.check_interval), None, 2)),
        depends_on: svc.depends_on.clone(),
        lease_id: lease,
        pid: proc.pid,
        command: command.to_string(),
        ..Default::default()
    };
    c.register(pb::RegisterRequest { service: Some(registration) }).await.context("could not register it")?;
    Ok(())
}

/// Waits until `svc`'s check passes (at once if it has none), it ends, or its ready timeout.
async fn wait_ready(svc: &ServiceDef, proc: &Proc, ports: &Ports) -> Result<()> {
    let Some(spec) = &svc.check else { return Ok(()) };
    let port = ports
        .get(&svc.name)
        .and_then(|ps| ps.iter().find(|(n, _)| *n == svc.check_port))
        .map(|(_, p)| *p)
        .context("internal error: the checked port was not allocated")?;
    let check = HealthCheck {
        kind: spec.clone(),
        port: None,
        interval_ms: READY_POLL.as_millis() as u64,
        timeout_ms: svc.ready_timeout.min(Duration::from_secs(2)).as_millis() as u64,
        failures: 1,
    };
    let deadline = tokio::time::Instant::now() + svc.ready_timeout;
    let mut last = String::from("no check finished yet");
    let mut next = tokio::time::Instant::now();
    loop {
        let attempt = async {
            tokio::time::sleep_until(next).await;
            portmesh_checks::run(&check, port).await
        };
        tokio::select! {
            biased;
            status = proc.wait() => bail!("{} before it was healthy (check {spec}: {last})", process::describe(status)),
            _ = tokio::time::sleep_until(deadline) => bail!(
                "not healthy within {} (check {spec} on port {port}: {last})",
                humantime::format_duration(svc.ready_timeout)
            ),
            outcome = attempt => {
                if outcome.status().is_healthy() {
                    return Ok(());
                }
                last = outcome.output().to_string();
                next = tokio::time::Instant::now() + READY_POLL;
            }
        }
    }
}

/// Stops every process in reverse start order.
async fn stop_all(procs: &[(&ServiceDef, Proc)]) {
    for (svc, p) in procs.iter().rev() {
        if p.exited().is_none() {
            println!("portmesh: stopping {}", svc.name);
            let status = p.stop(svc.stop_timeout).await;
            tracing::debug!(service = %svc.name, status = %process::describe(status), "stopped");
        }
    }
}
