//! Ports and leases: `alloc`, `release`, `renew`, `ls`, `reserve`, `unreserve`, and `check`
//! (a probe of this host, no node involved).

use anyhow::{Context, Result, bail};
use portmesh_client::{Client, pb};
use serde_json::json;

use super::ExitCode;
use crate::args::{AllocArgs, ReleaseArgs};
use crate::render::{alloc_json, fmt_dur, print_or_json};
use crate::requests::alloc_items;

pub async fn alloc(c: &Client, team: &str, a: &AllocArgs, json: bool) -> Result<()> {
    crate::requests::check_wanted(&a.want)?;
    let service = a
        .service
        .clone()
        .or_else(|| a.want.pool.clone())
        .unwrap_or_else(|| portmesh_core::DEFAULT_POOL.into());
    let names: Vec<String> = (0..a.count).map(|i| i.to_string()).collect();
    let items = alloc_items(&service, &a.want, &names);
    let holder = parent_pid();
    let req = pb::AllocateRequest {
        team: team.to_string(),
        items,
        lease_id: a.lease.unwrap_or(0),
        ttl_ms: a.ttl.map_or(0, |t| t.as_millis() as u64),
        // The holder is whoever ran `portmesh alloc`: the script or shell that will start the
        // server on the port.
        pid: holder,
        command: portmesh_probe::command_of(holder).unwrap_or_default(),
        ..Default::default()
    };
    let r = c.allocate_here(req).await?;
    for line in crate::stack::ports::moves(c, &r).await {
        eprintln!("portmesh: {line}");
    }
    if json {
        let list: Vec<_> = r.allocations.iter().map(alloc_json).collect();
        println!(
            "{}",
            json!({"allocations": list, "lease_id": (r.lease_id != 0).then_some(r.lease_id), "revision": r.revision})
        );
    } else {
        for al in &r.allocations {
            println!("{}", al.port);
        }
        if let Some(ttl) = a.ttl {
            eprintln!(
                "lease {} (ttl {}): keep it alive with `portmesh renew --lease {}`, or the port(s) come back",
                r.lease_id,
                fmt_dur(ttl),
                r.lease_id
            );
        } else if a.lease.is_none() && a.want.key.is_none() && r.existing.iter().any(|e| !e) {
            // Held until released: say how, and how not to leak it next time.
            let ports: Vec<String> = r.allocations.iter().map(|al| al.port.to_string()).collect();
            eprintln!(
                "held until released (`portmesh release {}`); --ttl 10m gives it back by itself if not renewed, \
                 --key NAME gets the same port again next time",
                ports.join(" ")
            );
        }
    }
    Ok(())
}

#[cfg(unix)]
fn parent_pid() -> u32 {
    std::os::unix::process::parent_id()
}

#[cfg(not(unix))]
fn parent_pid() -> u32 {
    0
}

pub async fn release(c: &Client, team: &str, r: &ReleaseArgs, json: bool) -> Result<()> {
    if !r.force {
        refuse_live_holders(c, team, r).await?;
    }
    let released = if let Some(id) = r.lease {
        c.revoke_lease(pb::LeaseRevokeRequest { team: team.into(), lease_id: id }).await?.released
    } else {
        let req = pb::ReleaseRequest {
            team: team.to_string(),
            ports: r.ports.iter().map(|p| u32::from(*p)).collect(),
            key: r.key.clone().unwrap_or_default(),
        };
        c.release(req).await?.released
    };
    if json {
        let list: Vec<_> = released.iter().map(alloc_json).collect();
        println!("{}", json!({"released": list}));
    } else {
        for a in &released {
            println!("{}", a.port);
        }
    }
    Ok(())
}

/// Refuses to release a port whose lease a running service on this host holds — one that `up`
/// or `portmesh run` started and registered: it would go on listening on a port handed to the
/// next asker. Ports taken with `alloc` are the caller's to release.
///
/// It asks for the allocations of those leases only, one lease at a time: the services running
/// here are few, while listing every allocation made a release take 60 ms, and the node encode a
/// 16 MB answer, at 50,000 live allocations (docs/benchmarks.md, twentieth slice).
async fn refuse_live_holders(c: &Client, team: &str, r: &ReleaseArgs) -> Result<()> {
    let services = c
        .discover(pb::DiscoverRequest {
            team: team.to_string(),
            include_unhealthy: true,
            ..Default::default()
        })
        .await?
        .services;
    let here = portmesh_probe::hostname();
    let mut leases = std::collections::HashSet::new();
    let running = services.iter().filter(|s| {
        s.lease_id != 0
            && r.lease.is_none_or(|l| l == s.lease_id)
            && s.pid != 0
            && s.host == here
            && portmesh_probe::process::alive(s.pid)
            && leases.insert(s.lease_id)
    });
    let wanted = |a: &pb::Allocation| match (&r.key, r.lease) {
        (_, Some(lease)) => a.lease_id == lease,
        (Some(key), None) => &a.key == key,
        (None, None) => r.ports.contains(&(a.port as u16)),
    };
    for svc in running {
        let req = pb::LeaseTimeToLiveRequest { team: team.to_string(), lease_id: svc.lease_id };
        let held = match c.time_to_live(req).await {
            Ok(t) => t.allocations,
            // The lease ended since the services were read: it holds nothing.
            Err(e) if e.kind() == Some("not_found") => continue,
            Err(e) => return Err(e.into()),
        };
        let Some(a) = held.iter().find(|a| wanted(a)) else { continue };
        let (who, stop) = match crate::stack::ports::stack_of(&a.key) {
            Some((scope, service)) => {
                (format!("the running stack {scope} (service {service})"), "`portmesh down` in its project")
            }
            None => (format!("{} (pid {}, {})", svc.name, svc.pid, svc.command), "end `portmesh run`"),
        };
        anyhow::bail!(
            "port {} is held by {who} under lease {}: releasing it would hand the port to someone else while the \
             process still listens. Stop it first ({stop}), or pass --force",
            a.port,
            a.lease_id
        );
    }
    Ok(())
}

pub async fn ls(c: &Client, req: pb::ListRequest, json: bool) -> Result<()> {
    let r = &c.list(req).await?;
    if json {
        let allocs: Vec<_> = r.allocations.iter().map(alloc_json).collect();
        let res: Vec<_> = r
            .reservations
            .iter()
            .map(|x| json!({"port": x.port, "reason": x.reason, "revision": x.revision}))
            .collect();
        println!("{}", json!({"allocations": allocs, "reservations": res, "revision": r.revision}));
        return Ok(());
    }
    if r.allocations.is_empty() {
        println!("no live allocations");
    } else {
        let rows: Vec<Vec<String>> = r
            .allocations
            .iter()
            .map(|a| {
                let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
                let lease = if a.lease_id == 0 { "-".to_string() } else { a.lease_id.to_string() };
                vec![
                    a.port.to_string(),
                    a.team.clone(),
                    a.pool.clone(),
                    a.service.clone(),
                    a.host.clone(),
                    dash(&a.key),
                    lease,
                    a.revision.to_string(),
                ]
            })
            .collect();
        let header = ["PORT", "TEAM", "POOL", "SERVICE", "HOST", "KEY", "LEASE", "REV"];
        println!("{}", crate::render::table(&header, &rows, &[6, 7]));
    }
    for x in &r.reservations {
        let reason = if x.reason.is_empty() { String::new() } else { format!(" ({})", x.reason) };
        println!("reserved {}{reason}", x.port);
    }
    Ok(())
}

pub async fn check(node: Option<&Client>, ports: &[u16], json: bool) -> Result<ExitCode> {
    // The allocations of this host, every team's, when a node answers: a busy port's portmesh
    // holder (its service, key and team) is named beside the process.
    let here = portmesh_probe::hostname();
    let held: Vec<pb::Allocation> = match node {
        Some(c) => crate::node::holders(c, ports.iter().copied())
            .await
            .map(|held| held.into_iter().filter(|a| a.host == here).collect())
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let mut busy = false;
    let mut out = Vec::new();
    for &p in ports {
        let c = portmesh_probe::check(p).with_context(|| format!("probing port {p}"))?;
        busy |= !c.free;
        let mine = held.iter().find(|a| a.port == u32::from(p));
        if json {
            let mut v = serde_json::to_value(&c)?;
            if let Some(a) = mine {
                v["portmesh"] = json!({"service": a.service, "key": (!a.key.is_empty()).then_some(&a.key),
                                        "team": a.team, "lease_id": (a.lease_id != 0).then_some(a.lease_id)});
            }
            out.push(v);
            continue;
        }
        let allocated = mine.map(|a| {
            let key = if a.key.is_empty() { String::new() } else { format!(", key {}", a.key) };
            format!(" - allocated by portmesh to service {} (team {}{key})", a.service, a.team)
        });
        if c.free {
            println!("{p} free{}", allocated.unwrap_or_default());
        } else if c.time_wait > 0 {
            let held = match c.time_wait {
                1 => "a closed connection in TIME_WAIT holds it as its".to_string(),
                n => format!("{n} closed connections in TIME_WAIT hold it as their"),
            };
            println!(
                "{p} busy: {held} local port (the kernel frees it within a minute){}",
                allocated.unwrap_or_default()
            );
        } else if c.owners.is_empty() {
            println!("{p} busy (owner not visible){}", allocated.unwrap_or_default());
        } else {
            for o in &c.owners {
                let pid = o.pid.map_or("pid ?".to_string(), |p| format!("pid {p}"));
                let cmd = o.command.clone().unwrap_or_else(|| "?".into());
                println!("{p} busy {pid} {cmd} ({}){}", o.addr, allocated.clone().unwrap_or_default());
            }
        }
    }
    if json {
        println!("{}", json!({"ports": out}));
    }
    Ok(if busy { 1 } else { 0 })
}

pub async fn renew(c: &Client, team: &str, lease: u64, json: bool) -> Result<()> {
    match c.keep_alive_once(pb::LeaseKeepAliveRequest { team: team.into(), lease_id: lease }).await? {
        Some(ttl) => {
            print_or_json(
                json,
                &format!("lease {lease} renewed: ttl {}", fmt_dur(ttl)),
                || json!({"lease_id": lease, "ttl_ms": ttl.as_millis() as u64}),
            );
            Ok(())
        }
        None => bail!("lease {lease} no longer exists in team {team:?} (it expired or was revoked)"),
    }
}

/// `renew --keep`: renews until standard input closes, then revokes the lease.
pub async fn keep(c: &Client, team: &str, lease: u64) -> Result<ExitCode> {
    let Some(ttl) =
        c.keep_alive_once(pb::LeaseKeepAliveRequest { team: team.into(), lease_id: lease }).await?
    else {
        bail!("lease {lease} no longer exists in team {team:?} (it expired or was revoked)");
    };
    let mut keeper = c.keep_lease(team, lease, ttl);
    // Standard input read to its end on a thread of its own: EOF is the owner going away.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = tx.send(());
    });
    tokio::select! {
        _ = rx => {
            crate::node::end_lease(c, team, lease).await?;
            Ok(0)
        }
        lost = keeper.lost() => {
            eprintln!("portmesh: error: lease {lease} was lost: {lost}");
            Ok(1)
        }
    }
}

pub async fn reserve(c: &Client, port: u16, reason: &str, json: bool) -> Result<()> {
    let r = c.reserve(pb::ReserveRequest { port: port.into(), reason: reason.into() }).await?;
    print_or_json(
        json,
        &format!("reserved {}", r.port),
        || json!({"port": r.port, "reason": r.reason, "revision": r.revision}),
    );
    Ok(())
}

pub async fn unreserve(c: &Client, port: u16, json: bool) -> Result<()> {
    let r = c.unreserve(pb::UnreserveRequest { port: port.into() }).await?;
    print_or_json(json, &format!("unreserved {port}"), || json!({"port": port, "revision": r.revision}));
    Ok(())
}
