//! `serve`: run a node in the foreground.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};

use crate::args::{Cli, ServeArgs};

/// The node's certificate files: all three of --tls-cert, --tls-key and --tls-ca, or none.
fn node_files(cli: &Cli, mtls: bool) -> Result<Option<portmesh_tls::NodeFiles>> {
    match (cli.tls_cert.clone(), cli.tls_key.clone(), cli.tls_ca.clone()) {
        (Some(cert), Some(key), Some(ca)) => Ok(Some(portmesh_tls::NodeFiles { cert, key, ca, mtls })),
        (None, None, _) if !mtls => Ok(None),
        (cert, key, ca) => {
            let missing: Vec<&str> =
                [("--tls-cert", cert.is_none()), ("--tls-key", key.is_none()), ("--tls-ca", ca.is_none())]
                    .into_iter()
                    .filter_map(|(flag, absent)| absent.then_some(flag))
                    .collect();
            bail!(
                "a TLS node needs --tls-cert, --tls-key and --tls-ca{}: {} missing (`portmesh tls init DIR --host NAME` makes them)",
                if mtls { " (--mtls checks clients against the CA)" } else { "" },
                missing.join(", ")
            )
        }
    }
}

/// Refuses addresses that would expose the node by mistake: plaintext on a non-loopback
/// address (without --insecure), and a wildcard gRPC address nobody can be told to use.
pub fn check_exposure(
    listen: SocketAddr,
    http: Option<SocketAddr>,
    advertise: Option<&str>,
    tls: bool,
    insecure: bool,
) -> Result<()> {
    if listen.ip().is_unspecified() && advertise.is_none() {
        bail!(
            "--listen {listen} binds every address of this host, so members and clients cannot be told which one to use: \
             pass --advertise HOST:{} with the address they reach this node at",
            listen.port()
        );
    }
    if !tls && !insecure {
        for (flag, addr) in std::iter::once(("--listen", listen)).chain(http.map(|h| ("--http", h))) {
            if !addr.ip().is_loopback() {
                bail!(
                    "{flag} {addr} is not a loopback address, and without TLS anyone who reaches it can take ports and change \
                     the cluster: pass --tls-cert, --tls-key and --tls-ca (`portmesh tls init DIR --host NAME` makes them), \
                     or --insecure on a network where everyone is trusted"
                );
            }
        }
    }
    Ok(())
}

/// Where gRPC listens: --listen (PORTMESH_LISTEN), else `0.0.0.0:$PORT` when the platform sets
/// PORT (the container convention), else loopback port 7400.
fn listen_address(flag: Option<SocketAddr>, port_var: Option<&str>) -> Result<SocketAddr> {
    if let Some(l) = flag {
        return Ok(l);
    }
    match port_var.filter(|p| !p.is_empty()) {
        Some(p) => match p.parse::<u16>() {
            Ok(port) if port != 0 => Ok(SocketAddr::from(([0, 0, 0, 0], port))),
            _ => bail!("PORT={p:?} is not a port (1-65535): fix it, or pass --listen ADDR"),
        },
        None => Ok(SocketAddr::from(([127, 0, 0, 1], 7400))),
    }
}

pub async fn serve(cli: &Cli, a: &ServeArgs) -> Result<()> {
    if a.join_token.is_some() && a.join.is_none() && a.seeds.is_empty() && !(a.bootstrap && a.auth) {
        bail!(
            "--join-token (PORTMESH_JOIN_TOKEN) is for joining (--join ADDR or --seeds), or, with --bootstrap --auth, \
             the standing join token the new cluster registers"
        );
    }
    if a.admin_token_file.is_some() && !a.auth {
        bail!(
            "--admin-token-file (PORTMESH_ADMIN_TOKEN_FILE) is the first admin token of a cluster with --auth: add --auth"
        );
    }
    let tls = node_files(cli, a.mtls)?;
    let listen = listen_address(a.listen, std::env::var("PORT").ok().as_deref())?;
    check_exposure(listen, a.http, a.advertise.as_deref(), tls.is_some(), a.insecure)?;
    if (a.auth || a.join_token.is_some()) && tls.is_none() {
        bail!(
            "--auth{} needs TLS (--tls-cert, --tls-key, --tls-ca): tokens are bearer secrets that plaintext would show to \
             anyone on the path, and members prove themselves with node certificates",
            if a.auth { "" } else { " (implied by --join-token)" }
        );
    }
    let admin_token = match &a.admin_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --admin-token-file {}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let mut cfg = portmesh_node::NodeConfig::new(a.data.clone(), listen);
    cfg.tls = tls;
    cfg.http = a.http;
    cfg.http_allow_hosts = a.http_allow_hosts.clone();
    cfg.advertise = a.advertise.clone();
    cfg.bootstrap = a.bootstrap;
    cfg.join = a.join.clone();
    cfg.raft.voters = a.voters;
    cfg.raft.snapshot_every = a.snapshot_every;
    cfg.raft.snapshot_log_bytes = a.snapshot_log_mib.saturating_mul(1 << 20);
    cfg.raft.keep_after_snapshot = cfg.raft.keep_after_snapshot.min(a.snapshot_every / 10);
    cfg.home = a.home.clone();
    cfg.host = a.host_name.clone();
    cfg.auth = a.auth;
    cfg.join_token = a.join_token.clone();
    cfg.admin_token = admin_token;
    cfg.seeds = a.seeds.clone();
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
    node.wait().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_from_the_platform_binds_every_address_unless_listen_says_otherwise() {
        let lo: SocketAddr = "127.0.0.1:7400".parse().unwrap();
        assert_eq!(listen_address(None, None).unwrap(), lo);
        assert_eq!(listen_address(None, Some("")).unwrap(), lo);
        assert_eq!(listen_address(None, Some("8080")).unwrap(), "0.0.0.0:8080".parse().unwrap());
        let given: SocketAddr = "10.0.0.1:9000".parse().unwrap();
        assert_eq!(listen_address(Some(given), Some("8080")).unwrap(), given);
        for bad in ["0", "http", "70000"] {
            let e = listen_address(None, Some(bad)).unwrap_err().to_string();
            assert!(e.starts_with(&format!("PORT={bad:?} is not a port")), "{e}");
        }
    }

    #[test]
    fn exposure_needs_tls_or_insecure_and_a_wildcard_needs_advertise() {
        let lo: SocketAddr = "127.0.0.1:7400".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7400".parse().unwrap();
        let lan: SocketAddr = "10.1.2.3:7400".parse().unwrap();
        assert!(check_exposure(lo, Some("127.0.0.1:7401".parse().unwrap()), None, false, false).is_ok());
        let e = check_exposure(any, None, None, true, false).unwrap_err().to_string();
        assert!(
            e.starts_with("--listen 0.0.0.0:7400 binds every address") && e.contains("--advertise HOST:7400"),
            "{e}"
        );
        let e = check_exposure(lan, None, None, false, false).unwrap_err().to_string();
        assert!(
            e.starts_with("--listen 10.1.2.3:7400 is not a loopback address") && e.contains("--insecure"),
            "{e}"
        );
        let e = check_exposure(lo, Some("0.0.0.0:7401".parse().unwrap()), None, false, false)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--http 0.0.0.0:7401 is not a loopback"), "{e}");
        assert!(check_exposure(lan, None, None, true, false).is_ok());
        assert!(check_exposure(lan, None, None, false, true).is_ok());
        assert!(check_exposure(any, None, Some("10.1.2.3:7400"), false, true).is_ok());
    }
}
