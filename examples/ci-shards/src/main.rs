//! `ci-shards`: run N test shards side by side, each on a port of its own that nobody else on
//! the team gets, under one lease.
//!
//! ```text
//! ci-shards --node 10.0.0.1:7400 --shards 4 -- cargo test -- --port {port}
//! ```
//!
//! 1. grants a lease and allocates N ports attached to it in one atomic batch;
//! 2. starts the command N times with `PORT`, `SHARD` (0-based) and `SHARDS` set and `{port}`
//!    replaced in its arguments;
//! 3. registers each shard as service `shard-I` of project `ci-shards` (with its pid and
//!    command) attached to the same lease, so `portmesh discover --project ci-shards` shows
//!    what runs where;
//! 4. keeps the lease alive (renewing at TTL/3) while they run;
//! 5. revokes the lease when they are done, which releases the ports and the registrations, and exits with the first
//!    non-zero exit code of a shard (0 if all passed).
//!
//! If `ci-shards` itself is killed (`kill -9`, a cancelled CI job), nobody renews the lease: it
//! runs out after its TTL and the ports and registrations go by themselves.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use portmesh_client::{Client, pb};

#[derive(Debug, Parser)]
#[command(name = "ci-shards", about = "N ports for N test shards under one portmesh lease")]
struct Args {
    /// A node of the cluster (`host:port`).
    #[arg(long, env = "PORTMESH_NODE")]
    node: String,
    /// Team whose pools to use.
    #[arg(long, env = "PORTMESH_TEAM", default_value = "default")]
    team: String,
    /// Pool to take the ports from.
    #[arg(long, default_value = "default")]
    pool: String,
    /// How many shards (and ports).
    #[arg(long)]
    shards: usize,
    /// Lease TTL: how long the ports outlive this program if it is killed.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// The shard command; `{port}` in it is replaced by the shard's port.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    match run(Args::parse()).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ci-shards: error: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run(a: Args) -> Result<i32> {
    if a.shards == 0 || a.shards > 1024 {
        bail!("--shards {}: between 1 and 1024", a.shards);
    }
    let client = Client::connect(&a.node).await?;
    let lease = client
        .grant_lease(pb::LeaseGrantRequest { team: a.team.to_string(), ttl_ms: a.ttl.as_millis() as u64 })
        .await
        .context("granting the lease")?;
    let items = (0..a.shards)
        .map(|i| pb::AllocItem { service: format!("shard-{i}"), pool: a.pool.clone(), ..Default::default() })
        .collect();
    let req = pb::AllocateRequest { team: a.team.clone(), items, lease_id: lease.id, ..Default::default() };
    let ports: Vec<u32> = match client.allocate_here(req).await {
        Ok(r) => r.allocations.iter().map(|x| x.port).collect(),
        Err(e) => {
            let _ = client
                .revoke_lease(pb::LeaseRevokeRequest { team: a.team.to_string(), lease_id: lease.id })
                .await;
            return Err(e).context("allocating the shards' ports");
        }
    };
    let mut kept = client.keep_lease(&a.team, lease.id, a.ttl);
    println!("lease {} holds ports {ports:?}", lease.id);

    let mut children = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let args: Vec<String> = a.command.iter().map(|s| s.replace("{port}", &port.to_string())).collect();
        let child = tokio::process::Command::new(&args[0])
            .args(&args[1..])
            .env("PORT", port.to_string())
            .env("SHARD", i.to_string())
            .env("SHARDS", a.shards.to_string())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting shard {i}: {}", args.join(" ")))?;
        let svc = pb::Service {
            team: a.team.clone(),
            name: format!("shard-{i}"),
            project: "ci-shards".into(),
            ports: vec![pb::ServicePort { name: "main".into(), port: *port, protocol: "tcp".into() }],
            lease_id: lease.id,
            pid: child.id().unwrap_or(0),
            command: args.join(" "),
            ..Default::default()
        };
        children.push(child);
        client
            .register(pb::RegisterRequest { service: Some(svc) })
            .await
            .with_context(|| format!("registering shard {i}"))?;
    }
    let all = async {
        let mut codes = Vec::new();
        for c in &mut children {
            codes.push(c.wait().await.map(|s| s.code().unwrap_or(1)).unwrap_or(1));
        }
        codes
    };
    let codes = tokio::select! {
        codes = all => codes,
        lost = kept.lost() => {
            // The ports may already be someone else's: stop the shards (dropping them kills them).
            bail!("{lost}; the shards were stopped");
        }
    };
    drop(kept);
    client
        .revoke_lease(pb::LeaseRevokeRequest { team: a.team.to_string(), lease_id: lease.id })
        .await
        .context("revoking the lease (its TTL will end it)")?;
    for (i, (port, code)) in ports.iter().zip(&codes).enumerate() {
        println!("shard {i} on port {port}: exit code {code}");
    }
    Ok(codes.into_iter().find(|c| *c != 0).unwrap_or(0))
}
