//! Talking to a node: the one place a command gets its client, either of the node `--node`
//! names or of this machine's local node, started on demand ([`local`]).

pub mod local;

use anyhow::{Result, anyhow};
use portmesh_client::{Client, pb};

use crate::args::Cli;

/// A client of the node the command line names (`--node`, `PORTMESH_NODE`), else of the local
/// node, which is started if none runs.
pub async fn connect(cli: &Cli) -> Result<Client> {
    match &cli.node {
        Some(addr) => Ok(Client::connect(addr).await?),
        None => local::connect_or_start().await,
    }
}

/// Revokes `lease`, which releases its ports and registrations. A lease that is already gone
/// (it ran out, or someone revoked it) has nothing left to release: that is no error.
pub async fn end_lease(c: &Client, team: &str, lease: u64) -> Result<()> {
    match c.revoke_lease(pb::LeaseRevokeRequest { team: team.into(), lease_id: lease }).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == Some("not_found") => Ok(()),
        Err(e) => Err(anyhow!(e).context(format!("could not release lease {lease}"))),
    }
}
