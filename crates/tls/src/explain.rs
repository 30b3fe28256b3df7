//! A failed TLS handshake, in words: which of the usual mistakes it was, and what to do.

use std::error::Error;
use std::fmt;

use rustls::{AlertDescription, CertificateError};

/// Why a TLS connection to a node failed, as far as the handshake tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The node answered, but not with TLS.
    NotTls,
    /// The node's certificate is not signed by the CA this client trusts.
    UnknownIssuer,
    /// The node's certificate has expired.
    Expired,
    /// The node's certificate is not valid yet (a clock is wrong, or it was issued for later).
    NotYetValid,
    /// The node's certificate does not name the host this client connected to.
    WrongName,
    /// The node requires a client certificate and this client sent none.
    ClientCertificateRequired,
    /// The node refused this client's certificate (another CA's, or not a client certificate).
    ClientCertificateRefused,
    /// The node says this client's certificate has expired.
    ClientCertificateExpired,
    /// Another handshake failure, with rustls' words.
    Other(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Problem::NotTls => {
                "the node does not speak TLS: drop --tls-ca (PORTMESH_TLS_CA), or connect to a node started with --tls-cert"
            }
            Problem::UnknownIssuer => {
                "the node's certificate is not signed by the CA in --tls-ca (PORTMESH_TLS_CA): use the CA that signed the cluster's certificates"
            }
            Problem::Expired => {
                "the node's certificate has expired: renew it (portmesh tls init, or your CA); the node picks up the new files by itself"
            }
            Problem::NotYetValid => {
                "the node's certificate is not valid yet: check the clocks of this host and the node's"
            }
            Problem::WrongName => {
                "the node's certificate is not valid for the name or address this client connected to: \
                 connect with a name its certificate lists, or reissue it with that --host or --ip"
            }
            Problem::ClientCertificateRequired => {
                "the node requires a client certificate (it runs with --mtls): pass --tls-cert and --tls-key \
                 (PORTMESH_TLS_CERT, PORTMESH_TLS_KEY)"
            }
            Problem::ClientCertificateRefused => {
                "the node refused this client's certificate: it must be signed by the cluster's CA"
            }
            Problem::ClientCertificateExpired => {
                "the node refused this client's certificate because it has expired: renew it"
            }
            Problem::Other(why) => return write!(f, "TLS handshake failed: {why}"),
        })
    }
}

fn from_rustls(e: &rustls::Error) -> Problem {
    use CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => Problem::UnknownIssuer,
            C::Expired | C::ExpiredContext { .. } => Problem::Expired,
            C::NotValidYet | C::NotValidYetContext { .. } => Problem::NotYetValid,
            C::NotValidForName | C::NotValidForNameContext { .. } => Problem::WrongName,
            other => Problem::Other(format!("the node's certificate is not acceptable: {other:?}")),
        },
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => Problem::ClientCertificateRequired,
            AlertDescription::CertificateExpired => Problem::ClientCertificateExpired,
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::DecryptError => Problem::ClientCertificateRefused,
            other => Problem::Other(format!("the node sent the alert {other:?}")),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => Problem::NotTls,
        other => Problem::Other(other.to_string()),
    }
}

/// The TLS problem somewhere in `error`'s chain of causes, if there is one. `std::io::Error`
/// hides what it wraps from `source()`, so each one is opened too.
pub fn explain(error: &(dyn Error + 'static)) -> Option<Problem> {
    let mut next: Option<&(dyn Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(from_rustls(r));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                return Some(from_rustls(r));
            }
            if let Some(p) = explain(inner) {
                return Some(p);
            }
        }
        // tonic's own message when a TLS client met a node that answered in plain HTTP/2.
        if e.to_string().contains("corrupt message") {
            return Some(Problem::NotTls);
        }
        next = e.source();
    }
    None
}
