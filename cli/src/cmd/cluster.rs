//! The node and its cluster: `status`, `stop`, `join`, `leave`.

use anyhow::{Context, Result, bail};
use portmesh_client::{Client, pb};
use serde_json::json;

use crate::args::Cli;
use crate::node::{self, local};
use crate::render::print_or_json;

/// `health`: SERVING (exit 0) or not (exit 1), as the node's gRPC health says for `service`.
pub async fn health(c: &Client, service: &str, json: bool) -> Result<i32> {
    let serving = c.health(service).await?;
    let word = if serving { "SERVING" } else { "NOT_SERVING" };
    print_or_json(json, word, || serde_json::json!({"service": service, "serving": serving}));
    Ok(if serving { 0 } else { 1 })
}

pub async fn status(c: &Client, json: bool) -> Result<()> {
    let s = &c.status().await?;
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
        return Ok(());
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
    Ok(())
}

pub async fn stop(cli: &Cli) -> Result<()> {
    if let Some(addr) = &cli.node {
        let c = node::connect_to(cli, addr).await?;
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

pub async fn join(
    cli: &Cli,
    addr: &str,
    listen: Option<std::net::SocketAddr>,
    advertise: Option<String>,
    join_token: Option<&str>,
) -> Result<()> {
    let json = cli.json;
    let tls = launch_tls(cli)?;
    let member = node::connect_to(cli, addr).await?;
    let cluster = member.status().await.with_context(|| format!("asking {addr} for its cluster"))?;
    if cluster.cluster_id.is_empty() {
        bail!(
            "the node at {addr} belongs to no cluster yet: start it with --bootstrap, or join another member"
        );
    }
    if let Some(c) = local::running(None).await?
        && let Ok(s) = c.status().await
        && s.cluster_id == cluster.cluster_id
        && s.members.iter().any(|m| m.id == s.node_id)
    {
        println!("the local node {} is already a member of cluster {}", s.node_id, s.cluster_id);
        return Ok(());
    }
    let home = local::home()?;
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
        Some(&local::Launch { listen: listen.to_string(), advertise: advertise.clone(), tls: tls.clone() }),
    )?;
    let joined = match local::start_joining(addr, join_token).await {
        Ok(c) => c,
        Err(e) => {
            // Leave the home as it was: the single-node launch and the old data.
            let _ = local::write_launch(&home, None);
            if let Some(from) = &moved {
                let _ = std::fs::remove_dir_all(home.join("data"));
                let _ = std::fs::rename(from, home.join("data"));
            }
            if join_token.is_none() && format!("{e:#}").contains("needs a join token") {
                return Err(e.context(format!(
                    "the cluster at {addr} asks new members for a join token: pass --join-token or \
                     PORTMESH_JOIN_TOKEN (an admin makes one with `portmesh token create --role join`)"
                )));
            }
            return Err(e.context(format!("joining the cluster at {addr}")));
        }
    };
    let s = joined.status().await?;
    // Keep the port picked at the first start: the members know this node by its address.
    local::write_launch(&home, Some(&local::Launch { listen: s.addr.clone(), advertise, tls }))?;
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

pub async fn leave(cli: &Cli, id: Option<u64>) -> Result<()> {
    let c = node::connect(cli).await?;
    let status = c.status().await?;
    if let Some(id) = id {
        let left = c.leave(pb::LeaveRequest { node_id: id }).await?;
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
    let left = c.leave(pb::LeaveRequest { node_id: status.node_id }).await?;
    if cli.node.is_some() {
        // A node elsewhere: stop it; its data stays where it is.
        c.member(&status.addr).await?.shutdown().await?;
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

/// The local node's certificate files for joining a TLS cluster: with --tls-ca, this machine's
/// node certificate and key too (a member proves itself with one), as absolute paths.
fn launch_tls(cli: &Cli) -> Result<Option<local::LaunchTls>> {
    let Some(ca) = &cli.tls_ca else { return Ok(None) };
    let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) else {
        bail!(
            "joining a TLS cluster needs this machine's node certificate as well as the CA: pass --tls-cert and --tls-key \
             (PORTMESH_TLS_CERT, PORTMESH_TLS_KEY) with one the cluster's CA signed, e.g. made by \
             `portmesh tls init DIR --name NAME --host THIS_HOST` in the cluster's certificate directory"
        );
    };
    let absolute = |flag: &str, p: &std::path::Path| {
        std::fs::canonicalize(p).with_context(|| format!("{flag} {}: cannot read it", p.display()))
    };
    let tls = local::LaunchTls {
        cert: absolute("--tls-cert", cert)?,
        key: absolute("--tls-key", key)?,
        ca: absolute("--tls-ca", ca)?,
    };
    // Loaded once here so a wrong file is named now, not in the node's log.
    portmesh_tls::ClientTls::load(&tls.ca, Some(&tls.cert), Some(&tls.key))?;
    Ok(Some(tls))
}

/// The address of this machine that `target` is reached from (no packet is sent).
fn local_ip_towards(target: &str) -> Result<std::net::IpAddr> {
    portmesh_probe::process::local_ip_towards(target)
        .with_context(|| format!("cannot find this machine's address towards {target}"))
}
