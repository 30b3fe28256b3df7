//! Every gRPC channel portmesh opens is built here: Raft between members, a member asking
//! another one a question, clients of a node, and health checks of users' gRPC services. Each
//! [`Purpose`] has its timeouts and keep-alive in one place, and transport security (TLS) is
//! added here once, for all of them.

use std::time::Duration;

use portmesh_tls::ClientTls;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// What a channel is for. Each purpose sets how long a connection may take and how a peer
/// that vanished without closing the connection (cut off, paused, its host gone) is noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Raft between members: HTTP/2 pings every 2 s notice a vanished peer well within an
    /// election, and the next call opens a new connection.
    Peer,
    /// A short question to another member (a probe, its status, a join): connect within 2 s.
    Ask,
    /// A client of a node (the CLI, the library, a member reporting to the leader): pings every
    /// 5 s, so a long watch or lease keep-alive notices a node that went away.
    Client,
    /// A health check of a user's gRPC service on this host: connect within 2 s, no pings (one
    /// call, then the channel is dropped).
    Check,
}

/// How long a connection may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl Purpose {
    /// HTTP/2 keep-alive ping interval (and the time an unanswered ping is given), if any.
    pub fn keep_alive(self) -> Option<Duration> {
        match self {
            Purpose::Peer => Some(Duration::from_secs(2)),
            Purpose::Client => Some(Duration::from_secs(5)),
            Purpose::Ask | Purpose::Check => None,
        }
    }
}

/// `addr` is not a usable endpoint address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address {addr:?}: {reason}")]
pub struct InvalidAddress {
    pub addr: String,
    pub reason: String,
}

/// The URI of a node's gRPC endpoint: `host:port` becomes `http://host:port` (`https://` with
/// TLS); an address that already names a scheme is kept.
pub fn endpoint_uri(addr: &str, tls: bool) -> String {
    match (addr.contains("://"), tls) {
        (true, _) => addr.to_string(),
        (false, false) => format!("http://{addr}"),
        (false, true) => format!("https://{addr}"),
    }
}

/// The endpoint for `addr` (`host:port` or a URI) configured for `purpose`, over TLS when `tls`
/// is given (the node's certificate must chain to its CA and name the host in `addr`; its
/// client certificate, if any, is presented). Open it with `connect().await` (fails at once
/// when nothing listens) or `connect_lazy()` (connects on the first call, and again after a
/// connection broke).
pub fn endpoint(addr: &str, purpose: Purpose, tls: Option<&ClientTls>) -> Result<Endpoint, InvalidAddress> {
    let invalid =
        |e: &dyn std::fmt::Display| InvalidAddress { addr: addr.to_string(), reason: e.to_string() };
    let mut endpoint = Endpoint::from_shared(endpoint_uri(addr, tls.is_some()))
        .map_err(|e| invalid(&e))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(tls.ca_pem()));
        if let Some((cert, key)) = tls.identity_pem() {
            config = config.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(config).map_err(|e| invalid(&e))?;
    }
    Ok(match purpose.keep_alive() {
        Some(every) => {
            endpoint.http2_keep_alive_interval(every).keep_alive_timeout(every).keep_alive_while_idle(true)
        }
        None => endpoint,
    })
}

/// The TLS a node speaks to other members with (`None`: plaintext), shared by everything in
/// the node that opens a channel to a member and replaced when the node re-reads its
/// certificate files. The generation tells a holder of cached channels to open new ones.
#[derive(Debug, Clone, Default)]
pub struct PeerTls(std::sync::Arc<std::sync::RwLock<(u64, Option<ClientTls>)>>);

impl PeerTls {
    /// Members are reached with `tls` (or in plaintext).
    pub fn new(tls: Option<ClientTls>) -> Self {
        PeerTls(std::sync::Arc::new(std::sync::RwLock::new((0, tls))))
    }

    /// The current generation: cheap, for holders of cached channels to check on every call.
    pub fn generation(&self) -> u64 {
        self.0.read().unwrap_or_else(|p| p.into_inner()).0
    }

    /// The current generation and TLS (a copy of the PEMs: for opening a channel, not per call).
    pub fn current(&self) -> (u64, Option<ClientTls>) {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the TLS (renewed certificates) and starts a new generation.
    pub fn replace(&self, tls: ClientTls) {
        let mut slot = self.0.write().unwrap_or_else(|p| p.into_inner());
        *slot = (slot.0 + 1, Some(tls));
    }

    /// An endpoint to member `addr` with the current TLS.
    pub fn endpoint(&self, addr: &str, purpose: Purpose) -> Result<Endpoint, InvalidAddress> {
        endpoint(addr, purpose, self.current().1.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_become_uris_and_bad_ones_are_named() {
        assert_eq!(endpoint_uri("127.0.0.1:7400", false), "http://127.0.0.1:7400");
        assert_eq!(endpoint_uri("127.0.0.1:7400", true), "https://127.0.0.1:7400");
        assert_eq!(endpoint_uri("https://node:7400", false), "https://node:7400");
        let e = endpoint("bad host:1", Purpose::Client, None).unwrap_err();
        assert_eq!(e.addr, "bad host:1");
        assert!(e.to_string().starts_with("invalid address \"bad host:1\""), "{e}");
        for p in [Purpose::Peer, Purpose::Ask, Purpose::Client, Purpose::Check] {
            let ep = endpoint("127.0.0.1:1", p, None).unwrap();
            assert_eq!(ep.uri().to_string(), "http://127.0.0.1:1/");
        }
        assert!(Purpose::Peer.keep_alive() < Purpose::Client.keep_alive());
    }

    #[tokio::test]
    async fn connecting_to_nothing_is_an_error() {
        // A port just released: nothing listens there, so the connection is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let r = endpoint(&format!("127.0.0.1:{port}"), Purpose::Ask, None).unwrap().connect().await;
        assert!(r.is_err());
    }
}
