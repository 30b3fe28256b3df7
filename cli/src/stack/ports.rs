//! A stack's ports: one batch under one lease, who holds a port it insists on, and `--force`.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use portmesh_client::{Client, pb};
use portmesh_core::Strategy;
use portmesh_project::{Ports, ServiceDef, Stack};

use super::docker;
use crate::process::{self, Stopped};
use crate::render::holder;

/// How often `--force` looks whether a port it freed is free yet.
const FREE_POLL: Duration = Duration::from_millis(100);

/// Allocates every port of the stack in one batch under a new lease.
/// Allocates every port of `stack` in one batch under one lease. Returns the lease, the ports,
/// and the lines it printed about ports that differ from what the stack wanted or had last (a
/// detached `up` shows them in the terminal that started it).
pub async fn allocate(c: &Client, stack: &Stack, kill_existing: bool) -> Result<(u64, Ports, Vec<String>)> {
    let mut slots = Vec::new();
    let mut items = Vec::new();
    for svc in &stack.services {
        for p in &svc.ports {
            slots.push((svc.name.clone(), p.name.clone()));
            items.push(pb::AllocItem {
                service: svc.name.clone(),
                pool: svc.pool.clone().unwrap_or_default(),
                port: p.wanted.map_or(0, u32::from),
                strategy: pb::Strategy::from(svc.strategy) as i32,
                key: stack.key(&svc.name, &p.name),
                instance: stack.instance_name().to_string(),
                env: stack.env.clone(),
            });
        }
    }
    for attempt in 0..2 {
        let req = pb::AllocateRequest {
            team: stack.team.clone(),
            items: items.clone(),
            ttl_ms: stack.lease_ttl.as_millis() as u64,
            pid: std::process::id(),
            command: format!("portmesh up {}", stack.scope()),
            ..Default::default()
        };
        let r = match c.allocate_here(req).await {
            Ok(r) => r,
            Err(e) => return Err(explain_refusal(c, stack, anyhow!(e)).await),
        };
        let held: Vec<&pb::Allocation> =
            r.allocations.iter().filter(|al| al.lease_id != r.lease_id).collect();
        if held.is_empty() {
            let mut ports = Ports::new();
            for ((svc, name), al) in slots.iter().zip(&r.allocations) {
                ports.entry(svc.clone()).or_default().push((name.clone(), al.port as u16));
            }
            let said: Vec<String> = fallbacks(stack, &ports).into_iter().chain(moves(c, &r).await).collect();
            for line in &said {
                eprintln!("portmesh: {line}");
            }
            return Ok((r.lease_id, ports, said));
        }
        // Some keys are still live under another holder: give back what this attempt took.
        let _ = c
            .revoke_lease(pb::LeaseRevokeRequest { team: stack.team.to_string(), lease_id: r.lease_id })
            .await;
        let list: Vec<String> = held
            .iter()
            .map(|al| match al.lease_id {
                0 => format!("{} -> {} (no lease)", al.key, al.port),
                l => format!("{} -> {} (lease {l})", al.key, al.port),
            })
            .collect();
        if !kill_existing || attempt > 0 {
            bail!(
                "ports of {} are still held: {}; an earlier `portmesh up` of it still runs or was killed less than {} ago: \
                 stop it with `portmesh down`, pass --kill-existing, or wait",
                stack.scope(),
                list.join(", "),
                humantime::format_duration(stack.lease_ttl)
            );
        }
        eprintln!("portmesh: taking over {}", list.join(", "));
        for al in held {
            let _ = match al.lease_id {
                0 => c
                    .release(pb::ReleaseRequest {
                        team: stack.team.clone(),
                        key: al.key.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                l => c
                    .revoke_lease(pb::LeaseRevokeRequest { team: stack.team.to_string(), lease_id: l })
                    .await
                    .map(drop),
            };
        }
    }
    bail!("internal error: allocation retried without an answer")
}

/// One line per service that wanted a port by number and got another one: the user set the
/// port for a reason (a bookmark, an OAuth redirect), so a move is always said.
fn fallbacks(stack: &Stack, got: &Ports) -> Vec<String> {
    stack
        .services
        .iter()
        .filter_map(|svc| {
            let wanted = svc.ports.first()?.wanted?;
            let got = got.get(&svc.name)?.first()?.1;
            (wanted != got)
                .then(|| format!("port {wanted} is not free; {} gets port {got} instead", svc.name))
        })
        .collect()
}

/// The ports a stack wants by number: (service, port).
fn wanted_ports(stack: &Stack) -> Vec<(&ServiceDef, u16)> {
    stack.services.iter().flat_map(|s| s.ports.iter().filter_map(move |p| p.wanted.map(|w| (s, w)))).collect()
}

/// Adds to a refused allocation who holds the ports the stack insists on.
pub async fn explain_refusal(c: &Client, stack: &Stack, e: anyhow::Error) -> anyhow::Error {
    // The ports it insists on (`strategy = "fail"`): who holds them.
    let insisted: Vec<_> =
        wanted_ports(stack).into_iter().filter(|(s, _)| s.strategy == Strategy::Fail).collect();
    let live = crate::node::holders(c, insisted.iter().map(|(_, p)| *p)).await.unwrap_or_default();
    // A pool the node does not know: said at the line of the file that names it.
    let said = format!("{e:#}");
    let unknown_pool = stack
        .services
        .iter()
        .find(|s| s.pool.as_deref().is_some_and(|p| said.contains(&format!("unknown pool {p:?}"))));
    let mut lines = vec![match unknown_pool {
        Some(s) => format!(
            "{}: {said}",
            portmesh_project::where_set(&stack.file, &format!("services.{}.pool", s.name))
        ),
        None => said,
    }];
    for (svc, port) in insisted {
        if let Some(al) = live.iter().find(|al| al.port == u32::from(port)) {
            let who = if al.key.is_empty() { &al.service } else { &al.key };
            let proc = holder(al.pid, &al.command);
            lines.push(format!(
                "port {port} wanted by {} is held by {who} (team {}, host {}{proc})",
                svc.name, al.team, al.host
            ));
        } else if let Some(holder) = local_holder(port).await {
            lines.push(format!(
                "port {port} wanted by {} is held by {holder}; `portmesh up --force` stops it",
                svc.name
            ));
        }
    }
    anyhow!(lines.join("\n  "))
}

/// One line per allocation of `r` whose sticky key got another port than last time: the old
/// port, the new one, and who holds the old one (a sticky port never moves silently).
pub async fn moves(c: &Client, r: &pb::AllocateResponse) -> Vec<String> {
    let moved: Vec<(&pb::Allocation, u16)> = r
        .allocations
        .iter()
        .zip(&r.moved_from)
        .filter_map(|(al, old)| u16::try_from(*old).ok().filter(|o| *o != 0).map(|o| (al, o)))
        .collect();
    if moved.is_empty() {
        return Vec::new();
    }
    let live = crate::node::holders(c, moved.iter().map(|(_, old)| *old)).await.unwrap_or_default();
    let mut lines = Vec::new();
    for (al, old) in moved {
        let who = match live.iter().find(|a| a.port == u32::from(old)) {
            Some(a) => {
                let by = if a.key.is_empty() {
                    format!("service {}", a.service)
                } else {
                    format!("key {}", a.key)
                };
                format!("held by {by} (team {}, host {}{})", a.team, a.host, holder(a.pid, &a.command))
            }
            None => match local_holder(old).await {
                Some(h) => format!("held by {h}"),
                None => "not available (reserved, or cooling down for another key)".to_string(),
            },
        };
        lines.push(format!("{}'s port {old} is {who}; it gets port {} this time", al.service, al.port));
    }
    lines
}

/// Who listens on `port` on this host, for a message.
async fn local_holder(port: u16) -> Option<String> {
    let owners = tokio::task::spawn_blocking(move || portmesh_probe::owners(port)).await.ok()?;
    let o = owners.first()?;
    if let Some(container) = docker::container_publishing(port, o).await {
        return Some(format!("container {container} (published by Docker)"));
    }
    Some(o.to_string())
}

/// `--force` ends processes, never other holders' allocations: refuses, before anything is
/// stopped (an earlier up of this stack included), when a port the stack wants is allocated to
/// someone else, naming the holder and what to do.
pub async fn refuse_others_allocations(c: &Client, stack: &Stack) -> Result<()> {
    let ours = stack.keys();
    let wanted = wanted_ports(stack);
    let live = crate::node::holders(c, wanted.iter().map(|(_, p)| *p)).await?;
    for (svc, port) in wanted {
        if let Some(al) = live.iter().find(|al| al.port == u32::from(port) && !ours.contains(&al.key)) {
            let what = if let Some((scope, service)) = stack_of(&al.key) {
                format!(
                    "the running stack {scope} (service {service}); --force ends processes, not other stacks: stop it \
                     with `portmesh down` in its project, or want another port"
                )
            } else {
                format!(
                    "{} (team {}, host {}); --force ends processes, not other holders' allocations: release it there \
                     (`portmesh release {port} --team {}`) first",
                    if al.key.is_empty() { &al.service } else { &al.key },
                    al.team,
                    al.host,
                    al.team
                )
            };
            bail!("port {port} wanted by {} is allocated to {what}; nothing was stopped", svc.name);
        }
    }
    Ok(())
}

/// `--force`: ends whatever process holds a port the stack wants and waits until the port is
/// free (allocations were checked first: [`refuse_others_allocations`]).
pub async fn free_wanted_ports(stack: &Stack) -> Result<()> {
    for (svc, port) in wanted_ports(stack) {
        let owners = tokio::task::spawn_blocking(move || portmesh_probe::owners(port)).await?;
        if owners.is_empty() && portmesh_probe::is_free(port).unwrap_or(true) {
            continue;
        }
        for o in &owners {
            if let Some(container) = docker::container_publishing(port, o).await {
                eprintln!("portmesh: --force: stopping container {container}, which publishes port {port}");
                docker::stop(&container).await?;
                continue;
            }
            let Some(pid) = o.pid else {
                bail!(
                    "port {port} wanted by {} is held by a process of another user; --force cannot end it",
                    svc.name
                );
            };
            eprintln!("portmesh: --force: ending {o}, which holds port {port} wanted by {}", svc.name);
            if let Stopped::Killed(()) = process::terminate(pid, svc.stop_timeout).await? {
                eprintln!(
                    "portmesh: --force: pid {pid} ignored SIGTERM for {:?}; it was ended with SIGKILL",
                    svc.stop_timeout
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !portmesh_probe::is_free(port).unwrap_or(false) {
            if Instant::now() > deadline {
                bail!("port {port} is still in use 10 s after its holder ended");
            }
            tokio::time::sleep(FREE_POLL).await;
        }
    }
    Ok(())
}

/// The stack (`project/env/instance`) and service an allocation's key names, if it is a stack's
/// key (`project/env/instance/service/port`).
pub(crate) fn stack_of(key: &str) -> Option<(String, &str)> {
    let parts: Vec<&str> = key.split('/').collect();
    (parts.len() == 5).then(|| (parts[..3].join("/"), parts[3]))
}
