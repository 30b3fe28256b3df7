//! The wire layer: what is checked of every gRPC request before a service sees it, and of
//! every answer after.
//!
//! - A call its connection may not make (plaintext to a TLS node, Raft from a non-member, …:
//!   `transport::refusal`) is answered there, with the error the connection's state calls for.
//! - A call its token may not make (`Api::gate`: none where one is needed, a member token on an
//!   admin method, …) likewise; the caller it found goes into the request for the methods
//!   that check a team.
//! - A request body that is not the protobuf message its method takes is the caller's mistake,
//!   but tonic answers it as INTERNAL ("failed to decode Protobuf message"), which reads like a
//!   bug in the node. This layer relabels that answer INVALID_ARGUMENT with the
//!   `invalid_argument` category every other bad request carries.
//! - A call that takes one request message (every portmesh method but `Leases.KeepAlive`) and
//!   carries two or more is refused INVALID_ARGUMENT before the method runs: tonic alone applies
//!   the first and silently drops the rest. The request body is read through [`OneMessage`],
//!   which fails as soon as a second message starts; tonic reads to the end of the body before
//!   it calls the method.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use portmesh_api::Api;
use portmesh_api::auth::AUTHORIZATION;
use portmesh_proto::ERROR_METADATA;

use crate::transport::ConnInfo;
use tonic::codegen::{Service, http};

/// Wraps the gRPC router in [`Wire`].
#[derive(Debug, Clone)]
pub(crate) struct WireLayer(pub(crate) Api);

impl<S> tower_layer::Layer<S> for WireLayer {
    type Service = Wire<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Wire(inner, self.0.clone())
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Wire<S>(S, Api);

impl<S, ReqBody> Service<http::Request<ReqBody>> for Wire<S>
where
    S: Service<http::Request<OneMessage<ReqBody>>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let path = req.uri().path();
        let info: Option<&ConnInfo> = req.extensions().get();
        let member = info.is_some_and(|i| i.peer == portmesh_tls::Peer::Member);
        let token = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        let auth = self.1.auth_on();
        let gate = match crate::transport::refusal(info, path, auth) {
            Some(refused) => Err(refused),
            None => self.1.gate(auth, path, token, member),
        };
        let caller = match gate {
            Ok(caller) => caller,
            Err(status) => {
                let mut res = status.into_http::<tonic::body::Body>();
                res.headers_mut().insert(ERROR_METADATA, http::HeaderValue::from_static("unauthorized"));
                return Box::pin(async move { Ok(res) });
            }
        };
        let single = takes_one_message(path);
        req.extensions_mut().insert(caller);
        let answer = self.0.call(req.map(|body| OneMessage::new(body, single)));
        Box::pin(async move {
            let mut res = answer.await?;
            relabel(res.headers_mut());
            Ok(res)
        })
    }
}

/// Whether the method at `path` takes exactly one request message.
fn takes_one_message(path: &str) -> bool {
    (path.starts_with("/portmesh.v1.") || path.starts_with("/portmesh.raft.v1."))
        && path != "/portmesh.v1.Leases/KeepAlive"
}

/// A request body that fails when a second gRPC message starts in it (when `single`), so that a
/// one-message call with more is refused before its method runs.
#[derive(Debug)]
pub(crate) struct OneMessage<B> {
    inner: B,
    single: bool,
    /// Bytes left of the current message's 5-byte header, then of its payload.
    header_left: usize,
    header: [u8; 5],
    payload_left: u64,
    messages: u32,
}

impl<B> OneMessage<B> {
    fn new(inner: B, single: bool) -> Self {
        OneMessage { inner, single, header_left: 5, header: [0; 5], payload_left: 0, messages: 0 }
    }

    /// Follows the message framing through `chunk`: false once a second message starts.
    fn track(&mut self, mut chunk: &[u8]) -> bool {
        while !chunk.is_empty() {
            if self.payload_left > 0 {
                let n = chunk.len().min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                self.payload_left -= n as u64;
                chunk = &chunk[n..];
                continue;
            }
            if self.header_left == 5 {
                self.messages += 1;
                if self.messages > 1 {
                    return false;
                }
            }
            let at = 5 - self.header_left;
            self.header[at] = chunk[0];
            self.header_left -= 1;
            chunk = &chunk[1..];
            if self.header_left == 0 {
                let h = self.header;
                self.payload_left = u64::from(u32::from_be_bytes([h[1], h[2], h[3], h[4]]));
                self.header_left = 5;
            }
        }
        true
    }
}

impl<B> Body for OneMessage<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if this.single
                    && let Some(data) = frame.data_ref()
                    && !this.track(data.chunk())
                {
                    let refused = tonic::Status::invalid_argument(
                        "this method takes one request message, and the call carried more: send one per call",
                    );
                    return Poll::Ready(Some(Err(Box::new(refused))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Turns a decode failure's INTERNAL into INVALID_ARGUMENT (a trailers-only answer: the status
/// is in the headers).
fn relabel(headers: &mut http::HeaderMap) {
    let message = headers.get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or_default();
    let decode_failure = headers.get("grpc-status").is_some_and(|s| s == "13")
        && (message.starts_with("failed%20to%20decode%20Protobuf%20message")
            || message.starts_with("failed to decode Protobuf message"));
    if decode_failure {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
        headers.insert(ERROR_METADATA, http::HeaderValue::from_static("invalid_argument"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut f = vec![0u8];
        f.extend(len.to_be_bytes());
        f.extend(std::iter::repeat_n(7u8, len as usize));
        f
    }

    #[test]
    fn a_second_message_is_noticed_however_the_bytes_are_split() {
        let one = frame(300);
        let two: Vec<u8> = [frame(3), frame(0)].concat();
        for split in [1usize, 2, 4, 5, 6, 7, 64] {
            let mut b = OneMessage::new((), true);
            assert!(one.chunks(split).all(|c| b.track(c)), "one message, chunks of {split}");
            let mut b = OneMessage::new((), true);
            assert!(!two.chunks(split).all(|c| b.track(c)), "two messages, chunks of {split}");
        }
        assert!(takes_one_message("/portmesh.v1.Allocator/Allocate"));
        assert!(takes_one_message("/portmesh.v1.Watch/Watch"));
        assert!(!takes_one_message("/portmesh.v1.Leases/KeepAlive"));
        assert!(!takes_one_message("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
    }

    #[test]
    fn only_decode_failures_are_relabelled() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", http::HeaderValue::from_static("13"));
        h.insert("grpc-message", http::HeaderValue::from_static("failed%20to%20decode%20Protobuf%20message"));
        relabel(&mut h);
        assert_eq!(
            (h["grpc-status"].to_str().unwrap(), h[ERROR_METADATA].to_str().unwrap()),
            ("3", "invalid_argument")
        );
        let mut other = http::HeaderMap::new();
        other.insert("grpc-status", http::HeaderValue::from_static("13"));
        other.insert("grpc-message", http::HeaderValue::from_static("internal%20error"));
        relabel(&mut other);
        assert_eq!(other["grpc-status"], "13");
        assert!(other.get(ERROR_METADATA).is_none());
    }
}
