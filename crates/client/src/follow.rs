//! Following the leader: every call goes through [`Client::call`], which reconnects to the
//! leader a follower names, rides out elections, and moves past unreachable endpoints where
//! repeating the call is safe.

use std::time::Duration;

use portmesh_proto::channel::{self, Purpose};
use portmesh_proto::{ERROR_METADATA, LEADER_METADATA};
use tonic::transport::Channel;

use crate::error::{causes, error_chain};
use crate::{CONNECT_TIMEOUT, Client, ClientError, ClientOptions, Result};

/// How long one attempt of a call may wait for the node's answer (the node itself gives up on a
/// write after its write timeout, 5 s by default, so an answer normally comes first).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(12);

/// How long a call keeps following the leader or moving past dead endpoints: longer than an
/// election takes.
const FOLLOW_BUDGET: Duration = Duration::from_secs(10);

/// Pause before asking again while a cluster has no reachable leader.
const PAUSE: Duration = Duration::from_millis(100);

pub(crate) async fn open(addr: &str, options: &ClientOptions) -> Result<Channel> {
    let endpoint = channel::endpoint(addr, Purpose::Client, options.tls.as_ref())
        .map_err(|e| ClientError::BadAddress { addr: e.addr, reason: e.reason })?;
    endpoint.connect().await.map_err(|e| match portmesh_tls::explain(&e) {
        Some(problem) => ClientError::Tls { addr: addr.to_string(), problem },
        None => ClientError::Unreachable {
            addr: addr.to_string(),
            timeout: CONNECT_TIMEOUT,
            reason: error_chain(&e),
        },
    })
}

/// Whether a failed call never reached a node, so that repeating it elsewhere is safe: no
/// connection could be made, or the connection closed while the request still waited in the
/// client's queue (hyper reports that as *canceled*: "connection closed" — the request was never
/// written; a node shutting down gracefully closes its connections this way), or the node's
/// graceful GOAWAY left the request's stream out of what it would process. A request cut off
/// after the node took it is a different error, whose outcome stays unknown.
fn never_sent(status: &tonic::Status) -> bool {
    causes(status).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
            || e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_canceled)
            || e.downcast_ref::<h2::Error>().is_some_and(refused_by_graceful_goaway)
    })
}

/// Whether an HTTP/2 stream failed because the node went away gracefully before taking it: a
/// node that stops sends GOAWAY (NO_ERROR) naming the last stream it will process, and the
/// client's h2 fails exactly the streams above it with that GOAWAY. Streams the node took run to
/// their end, or fail as a broken pipe if the connection drops, never with this error.
fn refused_by_graceful_goaway(e: &h2::Error) -> bool {
    e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR)
}

/// Whether an INTERNAL status came from the HTTP/2 connection rather than from a node: a stream
/// reset or a GOAWAY (a node stopping, a proxy cutting a connection) that tonic maps to INTERNAL,
/// as gRPC's HTTP/2 mapping says, with the h2 or hyper error as its source. A node's own
/// INTERNAL answer has no such source (and carries a portmesh category).
fn reset_by_connection(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Internal
        && causes(status).any(|e| e.is::<h2::Error>() || e.is::<hyper::Error>())
}

/// Whether a call may be repeated on another node after a transport failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    Safe,
    OnlyOnRedirect,
}

impl Client {
    async fn switch_to(&self, addr: &str) -> Result<()> {
        let channel = open(addr, &self.options).await?;
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = (addr.to_string(), channel);
        Ok(())
    }

    /// Runs one RPC, following the leader and (when `retry` allows) moving past dead endpoints,
    /// for at most [`FOLLOW_BUDGET`] — long enough to ride out an election.
    pub(crate) async fn call<T, F, Fut>(&self, retry: Retry, f: F) -> Result<T>
    where
        F: Fn(crate::Conn) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + FOLLOW_BUDGET;
        let mut hop = 0usize;
        let mut tried: Vec<String> = Vec::new();
        loop {
            let addr = self.addr();
            if !tried.contains(&addr) {
                tried.push(addr.clone());
            }
            let status = match tokio::time::timeout(CALL_TIMEOUT, f(self.channel())).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) => s,
                // No answer at all: the node or the path to it is gone. Like a connection cut
                // off midway, the outcome of a write is unknown.
                Err(_) => tonic::Status::cancelled(format!(
                    "no answer from the node at {} within {CALL_TIMEOUT:?}",
                    self.addr()
                )),
            };
            let leader =
                status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()).map(str::to_string);
            let category =
                status.metadata().get(ERROR_METADATA).and_then(|v| v.to_str().ok()).map(str::to_string);
            // Without a portmesh category, the error came from the connection, not the node: a
            // refused connect is UNAVAILABLE, a request cut off midway UNKNOWN or CANCELLED, a
            // stream reset INTERNAL (with the HTTP/2 error as its source).
            let transport = category.is_none()
                && (matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) || reset_by_connection(&status));
            // A node that refuses this client's certificate does so after the handshake seemed
            // to succeed (TLS 1.3), at the first call: say which mistake it is; the call never
            // reached a service, and repeating it cannot help.
            if transport && let Some(problem) = portmesh_tls::explain(&status) {
                return Err(ClientError::Tls { addr, problem });
            }
            let unsent = transport && never_sent(&status);
            let err = if transport && !unsent {
                // The connection failed with the request on it: name the node, and for a write
                // say that its outcome is unknown.
                let reason = error_chain(&status);
                let tried = match tried.len() {
                    1 => String::new(),
                    _ => format!(" (tried {})", tried.join(", ")),
                };
                match retry {
                    Retry::OnlyOnRedirect => ClientError::OutcomeUnknown { addr, reason, tried },
                    Retry::Safe => ClientError::NoAnswer { addr, reason, tried },
                }
            } else {
                ClientError::from(status)
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(err);
            }
            hop += 1;
            match (leader, category.as_deref()) {
                (Some(leader), _) if leader != self.addr() => {
                    // The named leader may itself be gone (the others have not noticed yet):
                    // pause, and ask another node.
                    if self.switch_to(&leader).await.is_err() {
                        tokio::time::sleep(PAUSE).await;
                        self.next_endpoint(hop).await;
                    }
                }
                // No leader known yet (an election): give it a moment, then ask again.
                (_, Some("not_leader")) => {
                    tokio::time::sleep(PAUSE).await;
                    self.next_endpoint(hop).await;
                }
                // No quorum answered this node in time: it may be cut off. Later calls go
                // elsewhere; this one is repeated only if that is safe (its outcome is unknown).
                (_, Some("timeout")) if self.endpoints.len() > 1 => {
                    self.next_endpoint(hop).await;
                    if retry != Retry::Safe {
                        return Err(err);
                    }
                }
                _ if transport && self.endpoints.len() > 1 => {
                    // The node is gone: later calls go elsewhere. This call is repeated only if
                    // that is safe (idempotent, or it never left this process); otherwise its
                    // outcome is unknown and the caller must know.
                    self.next_endpoint(hop).await;
                    if retry != Retry::Safe && !unsent {
                        return Err(err);
                    }
                }
                _ => return Err(err),
            }
        }
    }

    /// Moves to another endpoint (best effort; stays put when none answers).
    async fn next_endpoint(&self, hop: usize) {
        let n = self.endpoints.len();
        let current = self.addr();
        for i in 0..n {
            let a = &self.endpoints[(hop + 1 + i) % n];
            if *a != current && self.switch_to(a).await.is_ok() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that speaks just enough HTTP/2 to refuse the first request the way a stopping
    /// node does: once the request's HEADERS arrived, GOAWAY (NO_ERROR) with last stream id 0,
    /// so that the request was never processed. Returns the address.
    async fn goaway_server() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut preface = [0u8; 24];
            s.read_exact(&mut preface).await.unwrap();
            // Our SETTINGS (empty), then frames until the request's HEADERS.
            s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
            loop {
                let mut head = [0u8; 9];
                s.read_exact(&mut head).await.unwrap();
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0u8; len];
                s.read_exact(&mut payload).await.unwrap();
                match (head[3], head[4] & 1) {
                    (4, 0) => s.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await.unwrap(), // SETTINGS: ack
                    (1, _) => break,                                                    // HEADERS
                    _ => {}
                }
            }
            // GOAWAY: last stream id 0, NO_ERROR.
            s.write_all(&[0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).await.unwrap();
            // Hold the connection until the client closes it.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
        addr
    }

    #[tokio::test]
    async fn a_request_a_graceful_goaway_left_out_was_never_sent() {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_client::HealthClient;
        let addr = goaway_server().await;
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .expect_err("the server took no request");
        assert!(never_sent(&status), "{status:?}");
        // Seen as a connection failure either way (its code is the client's business).
        assert!(
            reset_by_connection(&status)
                || matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ),
            "{status:?}"
        );
    }

    #[test]
    fn a_stream_reset_is_a_connection_failure_and_a_nodes_internal_error_is_not() {
        // What tonic makes of an HTTP/2 reset (here PROTOCOL_ERROR, seen when a node stops
        // under load): INTERNAL, with the h2 error as its source.
        let reset = tonic::Status::from_error(Box::new(h2::Error::from(h2::Reason::PROTOCOL_ERROR)));
        assert_eq!(reset.code(), tonic::Code::Internal);
        assert!(reset_by_connection(&reset), "{reset:?}");
        // A node's own INTERNAL answer carries no HTTP/2 error.
        assert!(!reset_by_connection(&tonic::Status::internal("state machine failed")));
        // Other codes are judged elsewhere (UNAVAILABLE, UNKNOWN, CANCELLED are transport
        // without a category; the rest are answers).
        let refused = tonic::Status::from_error(Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)));
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert!(!reset_by_connection(&refused));
        // A stream reset is not a graceful GOAWAY: the node may have taken the request.
        assert!(!never_sent(&reset));
        assert!(!refused_by_graceful_goaway(&h2::Error::from(h2::Reason::NO_ERROR)));
    }
}
