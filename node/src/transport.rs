//! What arrives on the node's listeners: plaintext or TLS connections, who is on the other end,
//! and who may call what over which connection.
//!
//! - Every accepted connection is handshaken in its own task (a slow or silent client holds up
//!   no one), within [`HANDSHAKE_TIMEOUT`].
//! - On a TLS node the first byte tells a TLS client (a handshake record, 0x16) from a plaintext
//!   one. A plaintext gRPC client is served only `grpc.health.v1.Health` (Kubernetes' gRPC probes
//!   speak no TLS) and gets UNAUTHENTICATED, saying the node requires TLS, for everything else;
//!   a plaintext HTTP client gets `400` saying to use `https://`.
//! - A peer that presents a node certificate of the cluster's CA is a member; only members may
//!   speak Raft, join, or probe ([`refusal`], applied by the wire layer, `crate::wire`).
//! - The certificate files are re-read when they change (checked every [`RELOAD_EVERY`]) or on
//!   SIGHUP; new connections use the new certificates, established ones go on.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use portmesh_proto::channel::PeerTls;
use portmesh_tls::{NodeFiles, NodeTls, Peer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// How long a client has to send its first byte and finish the TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate files are checked for changes.
pub(crate) const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// The node serves TLS.
    pub node_tls: bool,
    /// The node requires client certificates (`--mtls`).
    pub mtls: bool,
    /// This connection is TLS.
    pub tls: bool,
    /// Who the peer's certificate says it is.
    pub peer: Peer,
}

/// An accepted connection, plaintext or TLS.
#[derive(Debug)]
pub(crate) enum Conn {
    Plain(TcpStream, ConnInfo),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, ConnInfo),
}

impl Conn {
    fn info(&self) -> &ConnInfo {
        match self {
            Conn::Plain(_, i) | Conn::Tls(_, i) => i,
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info().clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

/// Which listener: the protocol its TLS negotiates and how a plaintext client is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listener {
    Grpc,
    Http,
}

/// Accepts connections on `listener` until `stop`, handshaking each in its own task; the
/// connections ready to serve come out of the returned channel.
pub(crate) fn accept(
    listener: TcpListener,
    kind: Listener,
    tls: Option<watch::Receiver<NodeTls>>,
    mut stop: watch::Receiver<bool>,
) -> mpsc::Receiver<Conn> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut failing = false;
        loop {
            let accepted = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((tcp, remote)) => {
                    failing = false;
                    let _ = tcp.set_nodelay(true);
                    let tls = tls.as_ref().map(|t| t.borrow().clone());
                    tokio::spawn(handshake(tcp, remote, kind, tls, tx.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: say so once, back off briefly.
                    if !failing {
                        tracing::warn!(error = %e, listener = ?kind, "cannot accept connections");
                        failing = true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    rx
}

async fn handshake(
    tcp: TcpStream,
    remote: SocketAddr,
    kind: Listener,
    tls: Option<NodeTls>,
    tx: mpsc::Sender<Conn>,
) {
    let mut info = ConnInfo {
        remote: Some(remote),
        node_tls: tls.is_some(),
        mtls: tls.as_ref().is_some_and(NodeTls::mtls),
        tls: false,
        peer: Peer::Anonymous,
    };
    let Some(tls) = tls else {
        let _ = tx.send(Conn::Plain(tcp, info)).await;
        return;
    };
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == 0x16 => {}
        Ok(Ok(1)) => {
            match kind {
                Listener::Grpc => {
                    let _ = tx.send(Conn::Plain(tcp, info)).await;
                }
                Listener::Http => refuse_plain_http(tcp).await,
            }
            return;
        }
        _ => return,
    }
    let config = match kind {
        Listener::Grpc => tls.grpc(),
        Listener::Http => tls.http(),
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(mut stream)) => {
            info.tls = true;
            info.peer = tls.judge(stream.get_ref().1.peer_certificates());
            if kind == Listener::Http
                && let Some(why) = http_refusal(&info)
            {
                let _ = tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    stream.write_all(plain_answer("403 Forbidden", &why).as_bytes()),
                )
                .await;
                let _ = stream.shutdown().await;
                return;
            }
            let _ = tx.send(Conn::Tls(Box::new(stream), info)).await;
        }
        // Per connection, so not above debug: a scanner must not flood the log.
        Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
    }
}

/// A whole HTTP/1.1 answer that closes the connection.
fn plain_answer(status: &str, text: &str) -> String {
    let body = format!("{text}\n");
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn refuse_plain_http(mut tcp: TcpStream) {
    let answer = plain_answer(
        "400 Bad Request",
        "this portmesh node serves HTTPS only: use https:// (and the cluster's CA)",
    );
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.write_all(answer.as_bytes())).await;
    let _ = tcp.shutdown().await;
}

/// Why an HTTPS connection is refused: a certificate the node does not accept, or none on a
/// node that requires one.
fn http_refusal(info: &ConnInfo) -> Option<String> {
    match &info.peer {
        Peer::Refused(why) => Some(format!("this portmesh node refused the client's certificate: {why}")),
        Peer::Anonymous if info.mtls => Some(
            "this portmesh node requires a client certificate signed by the cluster's CA (it runs with --mtls)".into(),
        ),
        _ => None,
    }
}

/// The gRPC listener's connections as the stream tonic serves.
pub(crate) fn grpc_stream(rx: mpsc::Receiver<Conn>) -> impl tokio_stream::Stream<Item = io::Result<Conn>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
}

/// The HTTP listener's connections as axum serves them.
#[derive(Debug)]
pub(crate) struct HttpIncoming {
    pub rx: mpsc::Receiver<Conn>,
    pub local: SocketAddr,
}

impl axum::serve::Listener for HttpIncoming {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        match self.rx.recv().await {
            Some(conn) => {
                let remote = conn.info().remote.unwrap_or(self.local);
                (conn, remote)
            }
            // The accept loop stopped (shutdown): no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// SIGHUP, listened for from the moment it is made (so it is made before the node says it
/// listens: a SIGHUP before that would end the process).
#[cfg(unix)]
pub(crate) type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
pub(crate) type Hangup = Option<()>;

/// Starts listening for SIGHUP.
pub(crate) fn hangup() -> Hangup {
    #[cfg(unix)]
    {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Re-reads the certificate files when they change or on SIGHUP, until `stop`. New TLS goes to
/// the listeners (`serving`) and to every channel the node opens to members (`peers`). Files
/// that cannot be used are reported once, and the node keeps the certificates it has.
pub(crate) async fn reload(
    files: NodeFiles,
    serving: watch::Sender<NodeTls>,
    peers: PeerTls,
    mut hangup: Hangup,
    mut stop: watch::Receiver<bool>,
) {
    let mut stamp = files.stamp();
    let mut failing = false;
    loop {
        let asked = async {
            #[cfg(unix)]
            if let Some(h) = hangup.as_mut() {
                h.recv().await;
                return;
            }
            std::future::pending::<()>().await
        };
        let forced = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(RELOAD_EVERY) => false,
            _ = asked => true,
        };
        let now = files.stamp();
        if now == stamp && !forced {
            continue;
        }
        stamp = now;
        match files.load() {
            Ok(tls) => {
                peers.replace(tls.client().clone());
                serving.send_replace(tls);
                failing = false;
                tracing::info!(cert = %files.cert.display(), "TLS certificates re-read: new connections use them");
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "the TLS files changed but cannot be used; serving with the previous certificates");
                    failing = true;
                }
            }
        }
    }
}

/// The gRPC methods only members may call: Raft itself, joining, and probing a member's host.
fn members_only(path: &str) -> bool {
    path.starts_with("/portmesh.raft.v1.Raft/")
        || path == "/portmesh.v1.Cluster/Join"
        || path == "/portmesh.v1.Cluster/Probe"
}

/// Methods that change who is in the cluster or stop a node: on a TLS node without
/// authentication they need a client certificate of the cluster's CA (with authentication, an
/// admin token: `Api::gate`).
fn needs_certificate(path: &str) -> bool {
    path == "/portmesh.v1.Cluster/Leave" || path == "/portmesh.v1.Cluster/Shutdown"
}

/// Why a call on this connection is refused, if it is. `auth`: the node asks for tokens.
pub(crate) fn refusal(info: Option<&ConnInfo>, path: &str, auth: bool) -> Option<tonic::Status> {
    let info = info?;
    if !info.node_tls {
        return None;
    }
    if !info.tls {
        if path.starts_with("/grpc.health.v1.Health/") {
            return None;
        }
        return Some(tonic::Status::unauthenticated(
            "this portmesh node requires TLS: connect with the cluster's CA (--tls-ca or PORTMESH_TLS_CA)",
        ));
    }
    let health = path.starts_with("/grpc.health.v1.Health/");
    match &info.peer {
        Peer::Refused(why) if !health => {
            return Some(tonic::Status::unauthenticated(format!(
                "this portmesh node refused the client's certificate: {why} (--tls-cert, PORTMESH_TLS_CERT)"
            )));
        }
        Peer::Anonymous if info.mtls && !health => {
            return Some(tonic::Status::unauthenticated(
                "this portmesh node requires a client certificate signed by the cluster's CA (it runs with --mtls): \
                 pass --tls-cert and --tls-key (PORTMESH_TLS_CERT, PORTMESH_TLS_KEY)",
            ));
        }
        _ => {}
    }
    if members_only(path) && info.peer != Peer::Member {
        return Some(tonic::Status::permission_denied(format!(
            "only members of the cluster may call {path}: it needs a node certificate signed by the cluster's CA"
        )));
    }
    if !auth && needs_certificate(path) && !matches!(info.peer, Peer::Client | Peer::Member) {
        return Some(tonic::Status::permission_denied(format!(
            "{path} needs a client certificate signed by the cluster's CA (--tls-cert and --tls-key)"
        )));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(node_tls: bool, tls: bool, peer: Peer) -> ConnInfo {
        ConnInfo { remote: None, node_tls, mtls: false, tls, peer }
    }

    #[test]
    fn who_may_call_what() {
        let append = "/portmesh.raft.v1.Raft/Append";
        let alloc = "/portmesh.v1.Allocator/Allocate";
        let health = "/grpc.health.v1.Health/Check";
        // A plaintext node refuses nothing here (tokens decide, when on).
        assert!(refusal(Some(&info(false, false, Peer::Anonymous)), append, false).is_none());
        assert!(refusal(None, append, false).is_none());
        // Plaintext on a TLS node: health only.
        let plain = info(true, false, Peer::Anonymous);
        assert!(refusal(Some(&plain), health, false).is_none());
        let s = refusal(Some(&plain), alloc, false).unwrap();
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert!(s.message().contains("requires TLS") && s.message().contains("--tls-ca"));
        // TLS without a certificate: clients' calls yes, members' and admin calls no.
        let anonymous = info(true, true, Peer::Anonymous);
        assert!(refusal(Some(&anonymous), alloc, false).is_none());
        for path in [append, "/portmesh.v1.Cluster/Join", "/portmesh.v1.Cluster/Probe"] {
            let s = refusal(Some(&anonymous), path, false).unwrap();
            assert_eq!(s.code(), tonic::Code::PermissionDenied);
            assert!(s.message().contains("node certificate"), "{}", s.message());
        }
        let s = refusal(Some(&anonymous), "/portmesh.v1.Cluster/Leave", false).unwrap();
        assert!(s.message().contains("client certificate"));
        // With authentication, an admin token decides that (the gate), not a certificate.
        assert!(refusal(Some(&anonymous), "/portmesh.v1.Cluster/Leave", true).is_none());
        // A client certificate: Leave yes, Raft no. A member: everything.
        let client = info(true, true, Peer::Client);
        assert!(refusal(Some(&client), "/portmesh.v1.Cluster/Shutdown", false).is_none());
        assert!(refusal(Some(&client), append, false).is_some());
        let member = info(true, true, Peer::Member);
        assert!(refusal(Some(&member), append, false).is_none());
        assert!(refusal(Some(&member), "/portmesh.v1.Cluster/Join", false).is_none());
        // A certificate the node refused: health only, and the reason in the message.
        let refused = info(true, true, Peer::Refused("its certificate has expired: renew it".into()));
        assert!(refusal(Some(&refused), health, false).is_none());
        let s = refusal(Some(&refused), alloc, false).unwrap();
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert!(s.message().contains("expired"), "{}", s.message());
        // --mtls: no certificate, no calls but health.
        let no_cert = ConnInfo { mtls: true, ..info(true, true, Peer::Anonymous) };
        assert!(refusal(Some(&no_cert), health, false).is_none());
        assert!(
            refusal(Some(&no_cert), alloc, false)
                .unwrap()
                .message()
                .contains("requires a client certificate")
        );
        assert!(refusal(Some(&ConnInfo { mtls: true, ..client }), alloc, false).is_none());
        assert!(http_refusal(&no_cert).unwrap().contains("--mtls"));
        assert!(http_refusal(&refused).unwrap().contains("expired"));
        assert!(http_refusal(&anonymous).is_none());
    }
}
