//! Certificates and TLS for portmesh: reading PEM files, the server configurations of a node
//! (gRPC and HTTP), the client side of a connection, telling a member's certificate from a
//! client's, explaining a failed handshake in words, and making a CA with node and client
//! certificates (`portmesh tls init`).
//!
//! Owns: everything that knows about X.509 and rustls (ring provider only: no OpenSSL, no
//! aws-lc). Does not own: sockets and handshakes (the node's listener), gRPC channels
//! (`portmesh-proto::channel`), or where files are written (the CLI).
//!
//! Who is who: a **node certificate** is one the cluster's CA signed that is valid for server
//! authentication (the extended key usage `serverAuth`, or none at all); only a peer that
//! presents one may speak Raft, join, or probe. A **client certificate** (`clientAuth` only)
//! identifies a client on a cluster that requires client certificates (`--mtls`).

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

mod explain;
pub mod generate;
mod load;

use std::path::PathBuf;
use std::sync::Arc;

pub use explain::{Problem, explain};
pub use load::{ClientTls, NodeFiles, NodeTls, Peer, Stamp};
pub use rustls;

/// The crypto provider every configuration uses: ring.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate or key file that cannot be used, naming the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} {path} holds no {expected} (a PEM file with a `-----BEGIN {expected}-----` block)")]
    Empty { what: &'static str, path: PathBuf, expected: &'static str },
    #[error("the {what} {path} is not valid PEM: {reason}")]
    Pem { what: &'static str, path: PathBuf, reason: String },
    #[error("the CA file {path} holds a certificate rustls cannot use as a trust anchor: {reason}")]
    Anchor { path: PathBuf, reason: String },
    #[error("the certificate {cert} and the key {key} cannot be used together: {reason}")]
    Pair { cert: PathBuf, key: PathBuf, reason: String },
    #[error("{given} was given without {missing}: a certificate and its key go together")]
    Half { given: &'static str, missing: &'static str },
    #[error("cannot make a certificate: {0}")]
    Generate(String),
}

#[cfg(test)]
mod tests;
