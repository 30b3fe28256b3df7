//! [`ClientError`]: what went wrong talking to a node, with the server's message and category.

use std::time::Duration;

use portmesh_proto::{ERROR_METADATA, OLDEST_REVISION_METADATA};

/// Errors talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach a portmesh node at {addr} (tried a gRPC connection, timeout {timeout:?}): {reason}"
    )]
    Unreachable { addr: String, timeout: Duration, reason: String },
    #[error("{message}")]
    Status {
        code: tonic::Code,
        message: String,
        /// The server's stable error category (`portmesh-error` metadata), if any.
        kind: Option<String>,
        /// On a `compacted` watch error: the oldest revision the node still has.
        oldest_revision: Option<u64>,
    },
    #[error("invalid node address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: String },
    /// The token holds what no token holds (a line break, a non-ASCII character): not sent.
    #[error(
        "the token given holds characters no portmesh token has: check --token, --token-file or PORTMESH_TOKEN"
    )]
    BadToken,
    /// The connection failed in the TLS handshake, or the node requires TLS this client did not
    /// speak: which mistake it was and what to do.
    #[error("cannot connect to the portmesh node at {addr}: {problem}")]
    Tls { addr: String, problem: portmesh_tls::Problem },
    /// A write reached a node, which then stopped answering: it may or may not have been applied.
    #[error(
        "the node at {addr} stopped answering after the request was sent ({reason}); it may have been \
         applied: check with `portmesh ls` or `portmesh log`{tried}"
    )]
    OutcomeUnknown { addr: String, reason: String, tried: String },
    /// A read (or a call safe to repeat) found no node answering.
    #[error("the node at {addr} stopped answering ({reason}){tried}")]
    NoAnswer { addr: String, reason: String, tried: String },
}

impl ClientError {
    /// On a `compacted` watch error: the oldest revision still available.
    pub fn oldest_revision(&self) -> Option<u64> {
        match self {
            ClientError::Status { oldest_revision, .. } => *oldest_revision,
            _ => None,
        }
    }

    /// The server's error category, e.g. `exhausted` or `not_found`; `outcome_unknown` for a
    /// write cut off after it was sent.
    pub fn kind(&self) -> Option<&str> {
        match self {
            ClientError::Status { kind, .. } => kind.as_deref(),
            ClientError::OutcomeUnknown { .. } => Some("outcome_unknown"),
            ClientError::Tls { .. } => Some("tls"),
            _ => None,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        let kind = s.metadata().get(ERROR_METADATA).and_then(|v| v.to_str().ok()).map(str::to_string);
        let message =
            if s.message().is_empty() { format!("{:?}", s.code()) } else { s.message().to_string() };
        let oldest_revision = s
            .metadata()
            .get(OLDEST_REVISION_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        ClientError::Status { code: s.code(), message, kind, oldest_revision }
    }
}

pub(crate) fn missing(what: &str) -> ClientError {
    ClientError::Status {
        code: tonic::Code::Internal,
        message: format!("the node's reply lacks the {what}"),
        kind: Some("internal".into()),
        oldest_revision: None,
    }
}

/// An error and its sources, joined: transport errors hide the useful part in the chain.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    for s in causes(e) {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
    }
    parts.join(": ")
}

/// The errors under `e`, outermost first.
pub(crate) fn causes<'a>(
    e: &'a dyn std::error::Error,
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(e.source(), |s| s.source())
}
