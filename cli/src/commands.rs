//! Runs each command. Output: plain text for people, `--json` for programs; errors go to the
//! caller (`main` prints them to stderr and exits non-zero).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use portmesh_client::{Client, pb};
use serde_json::json;

use crate::args::{AllocArgs, Cli, Command, ConfigCommand, PoolsCommand, PortArgs, ReleaseArgs, ServeArgs};
use crate::local;

/// What a command wants the process to exit with, when it succeeded but has news.
pub type ExitCode = i32;

pub async fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Serve(args) => serve(args).await.map(|_| 0),
        Command::Check { ports } => check(ports, cli.json),
        Command::Stop => stop(&cli).await.map(|_| 0),
        Command::Join { addr, listen, advertise } => {
            join(addr, *listen, advertise.clone(), cli.json).await.map(|_| 0)
        }
        Command::Leave { id } => leave(&cli, *id).await.map(|_| 0),
        Command::Config(ConfigCommand::Show(p)) => crate::stack::config_show(&cli, p),
        Command::Up(a) => crate::stack::up(&cli, a).await,
        Command::Down(p) => crate::stack::down(&cli, p).await,
        Command::Ps(p) => crate::stack::ps(&cli, p).await,
        Command::Env(p) => crate::stack::env(&cli, p).await,
        Command::Doctor => crate::observe::doctor(&cli).await,
        Command::Run(a) => {
            let client = connect(&cli).await?;
            crate::run::run(&client, cli.team(), a).await
        }
        _ => {
            let client = connect(&cli).await?;
            client_command(&cli, &client).await.map(|_| 0)
        }
    }
}

pub async fn connect(cli: &Cli) -> Result<Client> {
    match &cli.node {
        Some(addr) => Ok(Client::connect(addr).await?),
        None => local::connect_or_start().await,
    }
}

async fn client_command(cli: &Cli, c: &Client) -> Result<()> {
    let team = cli.team();
    match &cli.command {
        Command::Alloc(a) => alloc(c, team, a, cli.json).await,
        Command::Release(r) => release(c, team, r, cli.json).await,
        Command::Renew { lease } => match c.keep_alive_once(team, *lease).await? {
            Some(ttl) => {
                print_or_json(
                    cli.json,
                    &format!("lease {lease} renewed: ttl {}", fmt_dur(ttl)),
                    || json!({"lease_id": lease, "ttl_ms": ttl.as_millis() as u64}),
                );
                Ok(())
            }
            None => bail!("lease {lease} no longer exists in team {team:?} (it expired or was revoked)"),
        },
        Command::Ls { pool, all_teams, stale } => {
            let req = pb::ListRequest {
                team: if *all_teams { String::new() } else { team.to_string() },
                pool: pool.clone().unwrap_or_default(),
                stale: *stale,
            };
            ls(&c.list(req).await?, cli.json);
            Ok(())
        }
        Command::Reserve { port, reason } => {
            let r = c.reserve(*port, reason).await?;
            print_or_json(
                cli.json,
                &format!("reserved {}", r.port),
                || json!({"port": r.port, "reason": r.reason, "revision": r.revision}),
            );
            Ok(())
        }
        Command::Unreserve { port } => {
            let r = c.unreserve(*port).await?;
            print_or_json(
                cli.json,
                &format!("unreserved {port}"),
                || json!({"port": port, "revision": r.revision}),
            );
            Ok(())
        }
        Command::Pools(p) => pools(c, team, p, cli.json).await,
        Command::Status => {
            status(&c.status().await?, cli.json);
            Ok(())
        }
        Command::Log { follow, all_teams } => {
            log(c, if *all_teams { "" } else { team }, *follow, cli.json).await
        }
        Command::Watch { from, pool, service, all_teams } => {
            let req = pb::WatchRequest {
                from_revision: from.unwrap_or(0),
                team: if *all_teams { String::new() } else { team.to_string() },
                pool: pool.clone().unwrap_or_default(),
                service: service.clone().unwrap_or_default(),
                progress_interval_ms: 0,
            };
            watch(c, req, cli.json).await
        }
        Command::Stats { all_teams } => {
            crate::observe::stats(c, if *all_teams { "" } else { team }, cli.json).await
        }
        Command::Register(r) => crate::registry::register(c, team, r, cli.json).await,
        Command::Deregister { id } => crate::registry::deregister(c, team, id, cli.json).await,
        Command::Discover { name, project, env, tags, all, all_teams, stale } => {
            let req = pb::DiscoverRequest {
                team: if *all_teams { String::new() } else { team.to_string() },
                name: name.clone().unwrap_or_default(),
                project: project.clone().unwrap_or_default(),
                env: env.clone().unwrap_or_default(),
                tags: tags.clone(),
                include_unhealthy: *all,
                stale: *stale,
            };
            crate::registry::discover(c, req, cli.json).await
        }
        Command::Serve(_)
        | Command::Check { .. }
        | Command::Stop
        | Command::Join { .. }
        | Command::Leave { .. }
        | Command::Config(_)
        | Command::Up(_)
        | Command::Down(_)
        | Command::Ps(_)
        | Command::Env(_)
        | Command::Run(_)
        | Command::Doctor => unreachable_command(),
    }
}

fn unreachable_command() -> Result<()> {
    bail!("internal error: command dispatched to the wrong handler")
}

fn print_or_json(json: bool, text: &str, value: impl FnOnce() -> serde_json::Value) {
    if json {
        println!("{}", value());
    } else {
        println!("{text}");
    }
}

pub(crate) fn fmt_dur(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

fn alloc_json(a: &pb::Allocation) -> serde_json::Value {
    json!({
        "port": a.port, "team": a.team, "pool": a.pool, "service": a.service,
        "key": (!a.key.is_empty()).then_some(&a.key),
        "lease_id": (a.lease_id != 0).then_some(a.lease_id),
        "host": a.host, "revision": a.revision,
        "pid": (a.pid != 0).then_some(a.pid),
        "command": (!a.command.is_empty()).then_some(&a.command),
    })
}

/// The items of one allocation: a port per name, the first at the wanted port; with a key and
/// several names, each key is suffixed `/NAME`.
pub fn alloc_items(service: &str, w: &PortArgs, names: &[String]) -> Vec<pb::AllocItem> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| pb::AllocItem {
            service: service.to_string(),
            pool: w.pool.clone().unwrap_or_default(),
            port: if i == 0 { w.port.map_or(0, u32::from) } else { 0 },
            strategy: portmesh_client::strategy_to_pb(w.strategy) as i32,
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

async fn alloc(c: &Client, team: &str, a: &AllocArgs, json: bool) -> Result<()> {
    let service = a.service.clone().or_else(|| a.want.pool.clone()).unwrap_or_else(|| "default".into());
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

async fn release(c: &Client, team: &str, r: &ReleaseArgs, json: bool) -> Result<()> {
    let released = if let Some(id) = r.lease {
        c.revoke_lease(team, id).await?.released
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

fn ls(r: &pb::ListResponse, json: bool) {
    if json {
        let allocs: Vec<_> = r.allocations.iter().map(alloc_json).collect();
        let res: Vec<_> = r
            .reservations
            .iter()
            .map(|x| json!({"port": x.port, "reason": x.reason, "revision": x.revision}))
            .collect();
        println!("{}", json!({"allocations": allocs, "reservations": res, "revision": r.revision}));
        return;
    }
    if r.allocations.is_empty() {
        println!("no live allocations");
    } else {
        println!(
            "{:<6} {:<10} {:<8} {:<16} {:<16} {:<24} {:>6} {:>6}",
            "PORT", "TEAM", "POOL", "SERVICE", "HOST", "KEY", "LEASE", "REV"
        );
        for a in &r.allocations {
            let lease = if a.lease_id == 0 { "-".to_string() } else { a.lease_id.to_string() };
            let key = if a.key.is_empty() { "-" } else { &a.key };
            println!(
                "{:<6} {:<10} {:<8} {:<16} {:<16} {:<24} {:>6} {:>6}",
                a.port, a.team, a.pool, a.service, a.host, key, lease, a.revision
            );
        }
    }
    for x in &r.reservations {
        let reason = if x.reason.is_empty() { String::new() } else { format!(" ({})", x.reason) };
        println!("reserved {}{reason}", x.port);
    }
}

async fn pools(c: &Client, team: &str, p: &PoolsCommand, json: bool) -> Result<()> {
    match p {
        PoolsCommand::Ls => {
            let r = c.list_pools(pb::ListPoolsRequest::default()).await?;
            if json {
                let list: Vec<_> = r
                    .pools
                    .iter()
                    .map(|p| json!({"team": p.team, "name": p.name, "ranges": ranges_text(&p.ranges), "size": p.size,
                                    "allocated": p.allocated, "reserved": p.reserved, "cooling": p.cooling}))
                    .collect();
                println!("{}", json!({"pools": list}));
            } else {
                println!(
                    "{:<10} {:<10} {:<24} {:>6} {:>6} {:>8} {:>8}",
                    "TEAM", "POOL", "RANGES", "SIZE", "USED", "RESERVED", "COOLING"
                );
                for p in &r.pools {
                    println!(
                        "{:<10} {:<10} {:<24} {:>6} {:>6} {:>8} {:>8}",
                        p.team,
                        p.name,
                        ranges_text(&p.ranges),
                        p.size,
                        p.allocated,
                        p.reserved,
                        p.cooling
                    );
                }
            }
            Ok(())
        }
        PoolsCommand::Add { name, range } => {
            let ranges = portmesh_core::PortRange::parse_list(range)
                .with_context(|| format!("pool {name:?}: bad range {range:?}"))?;
            let p = c.add_pool(team, name, ranges.into_iter().map(Into::into).collect()).await?;
            print_or_json(
                json,
                &format!("added pool {} ({}) to team {}", p.name, ranges_text(&p.ranges), p.team),
                || json!({"team": p.team, "name": p.name, "ranges": ranges_text(&p.ranges), "size": p.size}),
            );
            warn_ephemeral(&p);
            Ok(())
        }
        PoolsCommand::Rm { name } => {
            c.remove_pool(team, name).await?;
            print_or_json(
                json,
                &format!("removed pool {name} from team {team}"),
                || json!({"team": team, "name": name}),
            );
            Ok(())
        }
    }
}

pub(crate) fn ranges_text(r: &[pb::PortRange]) -> String {
    r.iter()
        .map(|r| if r.start == r.end { r.start.to_string() } else { format!("{}-{}", r.start, r.end) })
        .collect::<Vec<_>>()
        .join(",")
}

fn warn_ephemeral(p: &pb::Pool) {
    let (lo, hi) = portmesh_probe::ephemeral_range();
    for r in &p.ranges {
        if r.start <= u32::from(hi) && u32::from(lo) <= r.end {
            eprintln!(
                "warning: pool {} range {}-{} overlaps this host's ephemeral range {lo}-{hi}: outgoing connections may take its ports at any time",
                p.name, r.start, r.end
            );
        }
    }
}

fn status(s: &pb::StatusResponse, json: bool) {
    if json {
        let members: Vec<_> =
            s.members.iter().map(|m| json!({"id": m.id, "addr": m.addr, "role": m.role})).collect();
        println!(
            "{}",
            json!({
                "node_id": s.node_id, "leader_id": (s.leader_id != 0).then_some(s.leader_id), "term": s.term,
                "members": members, "commit_index": s.commit_index, "applied_index": s.applied_index,
                "pid": s.pid, "version": s.version, "revision": s.revision, "addr": s.addr,
                "http_addr": (!s.http_addr.is_empty()).then_some(&s.http_addr), "data_dir": s.data_dir,
                "fsyncs": s.fsyncs, "entries_flushed": s.entries_flushed, "data_size_bytes": s.data_size_bytes,
                "commands_applied": s.commands_applied, "cluster_id": s.cluster_id,
            })
        );
        return;
    }
    let leader = if s.leader_id == 0 { "none".to_string() } else { s.leader_id.to_string() };
    println!("node      {} at {} (pid {}, portmesh {})", s.node_id, s.addr, s.pid, s.version);
    println!("cluster   {}", if s.cluster_id.is_empty() { "none" } else { &s.cluster_id });
    println!("leader    {leader}   term {}", s.term);
    println!("index     commit {}  applied {}  revision {}", s.commit_index, s.applied_index, s.revision);
    println!("data      {} ({} bytes)", s.data_dir, s.data_size_bytes);
    if !s.http_addr.is_empty() {
        println!("http      http://{}/", s.http_addr);
    }
    println!("members");
    for m in &s.members {
        println!("  {:<20} {:<24} {}", m.id, m.addr, m.role);
    }
}

fn check(ports: &[u16], json: bool) -> Result<ExitCode> {
    let mut busy = false;
    let mut out = Vec::new();
    for &p in ports {
        let c = portmesh_probe::check(p).with_context(|| format!("probing port {p}"))?;
        busy |= !c.free;
        if json {
            out.push(serde_json::to_value(&c)?);
            continue;
        }
        if c.free {
            println!("{p} free");
        } else if c.owners.is_empty() {
            println!("{p} busy (owner not visible)");
        } else {
            for o in &c.owners {
                let pid = o.pid.map_or("pid ?".to_string(), |p| format!("pid {p}"));
                let cmd = o.command.clone().unwrap_or_else(|| "?".into());
                println!("{p} busy {pid} {cmd} ({})", o.addr);
            }
        }
    }
    if json {
        println!("{}", json!({"ports": out}));
    }
    Ok(if busy { 1 } else { 0 })
}

async fn stop(cli: &Cli) -> Result<()> {
    if let Some(addr) = &cli.node {
        let c = Client::connect(addr).await?;
        let pid = c.status().await?.pid;
        c.shutdown().await?;
        println!("asked node at {addr} (pid {pid}) to stop");
        return Ok(());
    }
    match local::stop_local().await? {
        Some(pid) => println!("stopped the local node (pid {pid})"),
        None => println!("no local node is running"),
    }
    Ok(())
}

/// The address of this machine that `target` is reached from (the source address the kernel
/// picks for it). No packet is sent.
fn local_ip_towards(target: &str) -> Result<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let hostport = target.split("://").last().unwrap_or(target);
    let to = hostport
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {target}"))?
        .next()
        .with_context(|| format!("{target} resolves to no address"))?;
    let any: std::net::SocketAddr =
        if to.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let sock =
        std::net::UdpSocket::bind(any).context("cannot open a UDP socket to find the local address")?;
    sock.connect(to).with_context(|| format!("no route to {target}"))?;
    Ok(sock.local_addr()?.ip())
}

async fn join(
    addr: &str,
    listen: Option<std::net::SocketAddr>,
    advertise: Option<String>,
    json: bool,
) -> Result<()> {
    let team = Client::connect(addr).await?;
    let cluster = team.status().await.with_context(|| format!("asking {addr} for its cluster"))?;
    if cluster.cluster_id.is_empty() {
        bail!(
            "the node at {addr} belongs to no cluster yet: start it with --bootstrap, or join another member"
        );
    }
    let home = local::home()?;
    if let Some(info) = portmesh_node::read_info(&home)
        && let Ok(c) = Client::connect(&info.grpc).await
        && let Ok(s) = c.status().await
        && s.cluster_id == cluster.cluster_id
        && s.members.iter().any(|m| m.id == s.node_id)
    {
        println!("the local node {} is already a member of cluster {}", s.node_id, s.cluster_id);
        return Ok(());
    }
    local::stop_local().await?;
    let listen = match listen {
        Some(l) => l,
        None => std::net::SocketAddr::new(local_ip_towards(addr)?, 0),
    };
    let advertise = match advertise {
        Some(a) => Some(a),
        None if listen.ip().is_unspecified() => {
            if listen.port() == 0 {
                bail!(
                    "--listen {listen} needs a fixed port or --advertise: the other members must know where to reach this node"
                );
            }
            Some(std::net::SocketAddr::new(local_ip_towards(addr)?, listen.port()).to_string())
        }
        None => None,
    };
    let moved = local::move_data_aside(&home, "before-join")?;
    local::write_launch(
        &home,
        Some(&local::Launch { listen: listen.to_string(), advertise: advertise.clone() }),
    )?;
    let joined = match local::start_joining(addr).await {
        Ok(c) => c,
        Err(e) => {
            // Leave the home as it was: the single-node launch and the old data.
            let _ = local::write_launch(&home, None);
            if let Some(from) = &moved {
                let _ = std::fs::remove_dir_all(home.join("data"));
                let _ = std::fs::rename(from, home.join("data"));
            }
            return Err(e.context(format!("joining the cluster at {addr}")));
        }
    };
    let s = joined.status().await?;
    // Keep the port picked at the first start: the members know this node by its address.
    local::write_launch(&home, Some(&local::Launch { listen: s.addr.clone(), advertise }))?;
    let role =
        s.members.iter().find(|m| m.id == s.node_id).map_or("learner", |m| m.role.as_str()).to_string();
    print_or_json(
        json,
        &format!(
            "joined cluster {} as node {} ({role}) at {}; {} members{}",
            s.cluster_id,
            s.node_id,
            s.addr,
            s.members.len(),
            moved
                .as_ref()
                .map(|m| format!("; the previous local data is kept in {}", m.display()))
                .unwrap_or_default()
        ),
        || {
            json!({"cluster_id": s.cluster_id, "node_id": s.node_id, "addr": s.addr, "role": role,
                   "members": s.members.len(), "previous_data": moved.as_ref().map(|m| m.display().to_string())})
        },
    );
    Ok(())
}

async fn leave(cli: &Cli, id: Option<u64>) -> Result<()> {
    let c = connect(cli).await?;
    let status = c.status().await?;
    if let Some(id) = id {
        let left = c.leave(id).await?;
        println!("removed node {id} from cluster {}; {} members left", status.cluster_id, left.len());
        return Ok(());
    }
    if status.members.len() <= 1 {
        bail!(
            "node {} is the only member of cluster {}: there is no cluster to leave (`portmesh stop` stops it)",
            status.node_id,
            status.cluster_id
        );
    }
    let left = c.leave(status.node_id).await?;
    if cli.node.is_some() {
        // A node elsewhere: stop it; its data stays where it is.
        Client::connect(&status.addr).await?.shutdown().await?;
        println!(
            "node {} left cluster {} and was asked to stop; {} members left",
            status.node_id,
            status.cluster_id,
            left.len()
        );
        return Ok(());
    }
    local::stop_local().await?;
    let home = local::home()?;
    let moved = local::move_data_aside(&home, "left")?;
    local::write_launch(&home, None)?;
    println!(
        "node {} left cluster {}; {} members left{}; the next command starts a fresh local node",
        status.node_id,
        status.cluster_id,
        left.len(),
        moved.map(|m| format!("; its data is kept in {}", m.display())).unwrap_or_default()
    );
    Ok(())
}

async fn watch(c: &Client, req: pb::WatchRequest, json: bool) -> Result<()> {
    use std::io::Write;
    let mut stream = c.watch(req).await?;
    let mut out = std::io::stdout().lock();
    while let Some(msg) = stream.message().await? {
        for e in &msg.events {
            if json {
                writeln!(out, "{}", event_json(e))?;
            } else {
                writeln!(out, "{}", event_text(e))?;
            }
        }
        out.flush()?;
    }
    bail!("the node ended the watch stream; resume with --from (the last revision shown + 1)")
}

/// The audit log: the history's port events, from the oldest kept, up to now (or on, with
/// `follow`).
async fn log(c: &Client, team: &str, follow: bool, json: bool) -> Result<()> {
    use std::io::Write;
    let end = c.status().await?.revision;
    let req = |from| pb::WatchRequest {
        from_revision: from,
        team: team.to_string(),
        progress_interval_ms: 200,
        ..Default::default()
    };
    let mut stream = match c.watch(req(1)).await {
        Err(e) if e.kind() == Some("compacted") => {
            let oldest = e.oldest_revision().context("the compacted error names no revision")?;
            c.watch(req(oldest)).await?
        }
        other => other?,
    };
    let mut out = std::io::stdout().lock();
    while let Some(msg) = stream.message().await? {
        for e in &msg.events {
            let audited = matches!(
                e.r#type(),
                pb::EventType::Allocated
                    | pb::EventType::Released
                    | pb::EventType::Expired
                    | pb::EventType::ConflictObserved
            );
            if !audited {
                continue;
            }
            if json {
                writeln!(out, "{}", event_json(e))?;
            } else {
                let at = std::time::UNIX_EPOCH + Duration::from_millis(e.at_ms);
                writeln!(out, "{}  {}", humantime::format_rfc3339_seconds(at), event_text(e))?;
            }
        }
        out.flush()?;
        if !follow && msg.revision >= end {
            return Ok(());
        }
    }
    bail!("the node ended the stream before the log was complete; run `portmesh log` again")
}

fn event_type(e: &pb::Event) -> &'static str {
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

fn event_json(e: &pb::Event) -> serde_json::Value {
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
        v["service"] = crate::registry::service_json(svc);
    }
    if e.r#type() == pb::EventType::HealthChanged {
        v["service_id"] = json!(e.service_id);
        v["service_name"] = json!(e.service_name);
        v["host"] = json!(e.host);
        v["previous"] = json!(crate::registry::health(e.previous()));
        v["status"] = json!(crate::registry::health(e.status()));
        v["output"] = json!(e.output);
    }
    v
}

/// ` pid N (command)`, or nothing when unknown.
pub(crate) fn holder(pid: u32, command: &str) -> String {
    match (pid, command) {
        (0, _) => String::new(),
        (p, "") => format!(" pid {p}"),
        (p, c) => format!(" pid {p} ({c})"),
    }
}

fn event_text(e: &pb::Event) -> String {
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
        (pb::EventType::ServiceRegistered, ..) => {
            e.service.as_ref().map(crate::registry::service_line).unwrap_or_default()
        }
        (pb::EventType::ServiceDeregistered, ..) => e
            .service
            .as_ref()
            .map(|s| format!("{} ({})", crate::registry::service_line(s), e.cause))
            .unwrap_or_default(),
        (pb::EventType::HealthChanged, ..) => format!(
            "{} {} on {}: {} -> {} ({})",
            e.service_name,
            e.service_id,
            e.host,
            crate::registry::health(e.previous()),
            crate::registry::health(e.status()),
            e.output
        ),
        _ => String::new(),
    };
    format!("{:>8}  {:<16} {what}", e.revision, event_type(e))
}

async fn serve(a: &ServeArgs) -> Result<()> {
    let mut cfg = portmesh_node::NodeConfig::new(a.data.clone(), a.listen);
    cfg.http = a.http;
    cfg.advertise = a.advertise.clone();
    cfg.bootstrap = a.bootstrap;
    cfg.join = a.join.clone();
    cfg.raft.voters = a.voters;
    cfg.raft.snapshot_every = a.snapshot_every;
    cfg.raft.keep_after_snapshot = cfg.raft.keep_after_snapshot.min(a.snapshot_every / 10);
    cfg.home = a.home.clone();
    cfg.host = a.host_name.clone();
    let node = portmesh_node::start(cfg).await.context("starting the node")?;
    let (lo, hi) = portmesh_probe::ephemeral_range();
    for p in node.api.node().state().read().state.pools() {
        for r in &p.ranges {
            if r.start() <= hi && lo <= r.end() {
                tracing::warn!(pool = %p.name, team = %p.team, range = %r, ephemeral = %format!("{lo}-{hi}"),
                    "pool overlaps this host's ephemeral port range: outgoing connections may take its ports");
            }
        }
    }
    node.wait().await;
    Ok(())
}
