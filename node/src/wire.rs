//! Wire-level errors. A request body that is not the protobuf message its method takes is the
//! caller's mistake, but tonic answers it as INTERNAL ("failed to decode Protobuf message"),
//! which reads like a bug in the node. This layer relabels that answer INVALID_ARGUMENT with the
//! `invalid_argument` category every other bad request carries. Nothing else is touched.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use portmesh_proto::ERROR_METADATA;
use tonic::codegen::{Service, http};

/// Wraps the gRPC router in [`DecodeErrors`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DecodeErrorsLayer;

impl<S> tower_layer::Layer<S> for DecodeErrorsLayer {
    type Service = DecodeErrors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DecodeErrors(inner)
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct DecodeErrors<S>(S);

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for DecodeErrors<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let answer = self.0.call(req);
        Box::pin(async move {
            let mut res = answer.await?;
            relabel(res.headers_mut());
            Ok(res)
        })
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
