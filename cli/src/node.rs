//! Talking to a node: the one place a command gets its client, either of the node `--node`
//! names or of this machine's local node, started on demand ([`local`]).

pub mod local;

use anyhow::{Result, anyhow};
use portmesh_client::{Client, ClientOptions, pb};

use crate::args::Cli;

/// A client of the node the command line names (`--node`, `PORTMESH_NODE`), else of the local
/// node, which is started if none runs.
pub async fn connect(cli: &Cli) -> Result<Client> {
    match &cli.node {
        Some(addr) => connect_to(cli, addr).await,
        None => local::connect_or_start(token(cli)?.as_deref()).await,
    }
}

/// Every team's allocations on `ports`, from the node's own state: who holds them, asked for
/// those ports alone (the node looks each up). Ports below the pools' range hold nothing; with
/// none left, nothing is asked.
pub async fn holders(c: &Client, ports: impl IntoIterator<Item = u16>) -> Result<Vec<pb::Allocation>> {
    let ports: Vec<u32> =
        ports.into_iter().filter(|p| *p >= portmesh_core::MIN_PORT).map(u32::from).collect();
    if ports.is_empty() {
        return Ok(Vec::new());
    }
    Ok(c.list(pb::ListRequest { ports, stale: true, ..Default::default() }).await?.allocations)
}

/// A client of the member at `addr` of the cluster `--node` names, with the command line's TLS.
pub async fn connect_to(cli: &Cli, addr: &str) -> Result<Client> {
    Ok(Client::connect_with(&[addr], options(cli)?).await?)
}

/// How the command line says to connect to `--node`: TLS with --tls-ca (and a client
/// certificate with --tls-cert and --tls-key), else plaintext. The local node always speaks
/// plaintext on loopback, so these apply only to `--node`.
pub fn options(cli: &Cli) -> Result<ClientOptions> {
    let tls = match (&cli.tls_ca, &cli.tls_cert) {
        (Some(ca), _) => {
            Some(portmesh_tls::ClientTls::load(ca, cli.tls_cert.as_deref(), cli.tls_key.as_deref())?)
        }
        (None, Some(_)) => {
            return Err(anyhow!(
                "--tls-cert (PORTMESH_TLS_CERT) needs --tls-ca (PORTMESH_TLS_CA): the CA that signed the cluster's certificates"
            ));
        }
        (None, None) => None,
    };
    Ok(ClientOptions { tls, token: token(cli)? })
}

/// The token the command line gives: --token or PORTMESH_TOKEN, else the file --token-file or
/// PORTMESH_TOKEN_FILE names.
pub fn token(cli: &Cli) -> Result<Option<String>> {
    if let Some(t) = &cli.token {
        return Ok(Some(t.trim().to_string()));
    }
    let Some(path) = &cli.token_file else { return Ok(None) };
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("cannot read the token file {} (--token-file): {e}", path.display()))?;
    Ok(Some(text.trim().to_string()))
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
