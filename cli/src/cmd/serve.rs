//! `serve`: run a node in the foreground.

use anyhow::{Context, Result};

use crate::args::ServeArgs;

pub async fn serve(a: &ServeArgs) -> Result<()> {
    let mut cfg = portmesh_node::NodeConfig::new(a.data.clone(), a.listen);
    cfg.http = a.http;
    cfg.http_allow_hosts = a.http_allow_hosts.clone();
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
            if r.meets((lo, hi)) {
                tracing::warn!(pool = %p.name, team = %p.team, range = %r, ephemeral = %format!("{lo}-{hi}"),
                    "pool overlaps this host's ephemeral port range: outgoing connections may take its ports");
            }
        }
    }
    node.wait().await;
    Ok(())
}
