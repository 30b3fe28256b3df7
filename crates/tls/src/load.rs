//! Reading certificate, key and CA files, and the configurations built from them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::{TlsError, provider};

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

/// Every certificate in a PEM file, in order (a leaf first, then its intermediates).
fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { what, path: path.to_path_buf(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what, path: path.to_path_buf(), expected: "CERTIFICATE" });
    }
    Ok(certs)
}

fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            TlsError::Empty { what: "key file", path: path.to_path_buf(), expected: "PRIVATE KEY" }
        }
        // The parser's own message may quote the file's lines: say only what kind of fault.
        other => TlsError::Pem {
            what: "key file",
            path: path.to_path_buf(),
            reason: match other {
                rustls_pki_types::pem::Error::MissingSectionEnd { .. } => "a section has no END line".into(),
                rustls_pki_types::pem::Error::IllegalSectionStart { .. } => {
                    "a BEGIN line is malformed".into()
                }
                _ => "the key cannot be decoded".into(),
            },
        },
    })
}

fn roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates("CA file", path, pem)? {
        roots.add(cert).map_err(|e| TlsError::Anchor { path: path.to_path_buf(), reason: e.to_string() })?;
    }
    Ok(roots)
}

/// The files a node's TLS is made of, and whether clients must present certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFiles {
    /// The node's certificate (PEM; its chain may follow it).
    pub cert: PathBuf,
    /// The node's private key (PEM).
    pub key: PathBuf,
    /// The CA whose certificates this node trusts: members' and clients'.
    pub ca: PathBuf,
    /// Require a client certificate from every client (`--mtls`). Members always need one to
    /// speak Raft, join or probe.
    pub mtls: bool,
}

/// When and how big each file was last seen: a changed stamp means the files should be read again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp(Vec<Option<(SystemTime, u64)>>);

impl NodeFiles {
    /// The stamp of the files as they are now (a missing file counts too).
    pub fn stamp(&self) -> Stamp {
        Stamp(
            [&self.cert, &self.key, &self.ca]
                .iter()
                .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
                .collect(),
        )
    }

    /// Reads the files and builds the node's configurations. Fails, naming the file, when one
    /// cannot be read or parsed, or the key is not the certificate's.
    pub fn load(&self) -> Result<NodeTls, TlsError> {
        let cert_pem = read("certificate file", &self.cert)?;
        let chain = certificates("certificate file", &self.cert, &cert_pem)?;
        let key_pem = read("key file", &self.key)?;
        let key = private_key(&self.key, &key_pem)?;
        let ca_pem = read("CA file", &self.ca)?;
        let roots = Arc::new(roots(&self.ca, &ca_pem)?);
        let pair = |e: rustls::Error| TlsError::Pair {
            cert: self.cert.clone(),
            key: self.key.clone(),
            reason: e.to_string(),
        };
        let webpki = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Anchor { path: self.ca.clone(), reason: e.to_string() })?;
        let server = |alpn: &[&[u8]]| -> Result<Arc<ServerConfig>, TlsError> {
            let verifier = Arc::new(JudgeLater(webpki.clone()));
            let mut config = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(pair)?
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(pair)?;
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(config))
        };
        let grpc = server(&[b"h2"])?;
        let http = server(&[b"http/1.1"])?;
        let client =
            ClientTls { ca_path: self.ca.clone(), ca_pem, identity: Some(Identity { cert_pem, key_pem }) };
        Ok(NodeTls { grpc, http, roots, client, mtls: self.mtls })
    }
}

/// A node's loaded TLS: what it serves with and what it connects to members with.
#[derive(Clone)]
pub struct NodeTls {
    grpc: Arc<ServerConfig>,
    http: Arc<ServerConfig>,
    roots: Arc<RootCertStore>,
    client: ClientTls,
    mtls: bool,
}

impl fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTls").field("ca", &self.client.ca_path).field("mtls", &self.mtls).finish()
    }
}

impl NodeTls {
    /// The server configuration of the gRPC listener (ALPN `h2`).
    pub fn grpc(&self) -> Arc<ServerConfig> {
        self.grpc.clone()
    }

    /// The server configuration of the HTTP listener (ALPN `http/1.1`).
    pub fn http(&self) -> Arc<ServerConfig> {
        self.http.clone()
    }

    /// How this node connects to other members: their CA, and this node's certificate as its
    /// client certificate.
    pub fn client(&self) -> &ClientTls {
        &self.client
    }

    /// Whether every client must present a certificate.
    pub fn mtls(&self) -> bool {
        self.mtls
    }

    /// Who presented `chain` (a peer's certificate first, then intermediates; `None` or empty:
    /// no certificate). The handshake takes any certificate whose key the peer holds; this says
    /// whether the cluster's CA signed it and for what, so that the node can refuse with a
    /// message instead of a closed connection.
    pub fn judge(&self, chain: Option<&[CertificateDer<'_>]>) -> Peer {
        let Some((leaf, intermediates)) = chain.and_then(|c| c.split_first()) else { return Peer::Anonymous };
        let Ok(leaf) = webpki::EndEntityCert::try_from(leaf) else {
            return Peer::Refused("its certificate cannot be parsed".into());
        };
        let valid_for = |usage: webpki::KeyUsage| {
            leaf.verify_for_usage(
                provider().signature_verification_algorithms.all,
                &self.roots.roots,
                intermediates,
                UnixTime::now(),
                usage,
                None,
                None,
            )
            .map(|_| ())
        };
        if valid_for(webpki::KeyUsage::server_auth()).is_ok() {
            return Peer::Member;
        }
        match valid_for(webpki::KeyUsage::client_auth()) {
            Ok(()) => Peer::Client,
            Err(e) => Peer::Refused(match e {
                webpki::Error::CertExpired { .. } => "its certificate has expired: renew it".into(),
                webpki::Error::CertNotValidYet { .. } => {
                    "its certificate is not valid yet: check the clocks".into()
                }
                // Another CA with the same name as the cluster's: found by name, wrong signature.
                webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                    "its certificate is not signed by the cluster's CA".into()
                }
                other => format!("its certificate is not acceptable ({other:?})"),
            }),
        }
    }

    /// Whether `chain` is a node certificate of this cluster (see [`NodeTls::judge`]).
    pub fn is_node(&self, chain: &[CertificateDer<'_>]) -> bool {
        self.judge(Some(chain)) == Peer::Member
    }
}

/// Who is on the other end of a TLS connection, by its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// No certificate.
    Anonymous,
    /// A certificate of the cluster's CA for client authentication only.
    Client,
    /// A node certificate of the cluster's CA (server authentication): a member.
    Member,
    /// A certificate the node does not accept, and why.
    Refused(String),
}

/// The handshake's client verifier: asks for a certificate, checks that the client holds its
/// key (the handshake signature), and leaves whether the CA signed it to [`NodeTls::judge`], so
/// that a refused client gets a gRPC error that says why rather than a closed connection.
#[derive(Debug)]
struct JudgeLater(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for JudgeLater {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A certificate and its key, as PEM.
#[derive(Clone)]
struct Identity {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

/// The client side of TLS: the CA a node's certificate must chain to and, for clusters that
/// require client certificates, this client's certificate and key. Debug output never shows the key.
#[derive(Clone)]
pub struct ClientTls {
    ca_path: PathBuf,
    ca_pem: Vec<u8>,
    identity: Option<Identity>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca_path)
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl ClientTls {
    /// Reads the CA file and, if given, the client certificate and key, checking that each is
    /// well-formed PEM (so a bad file is named now, not at the first connection).
    pub fn load(ca: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<Self, TlsError> {
        let ca_pem = read("CA file", ca)?;
        roots(ca, &ca_pem)?;
        let identity = match (cert, key) {
            (None, None) => None,
            (Some(_), None) => return Err(TlsError::Half { given: "--tls-cert", missing: "--tls-key" }),
            (None, Some(_)) => return Err(TlsError::Half { given: "--tls-key", missing: "--tls-cert" }),
            (Some(cert), Some(key)) => {
                let cert_pem = read("certificate file", cert)?;
                certificates("certificate file", cert, &cert_pem)?;
                let key_pem = read("key file", key)?;
                private_key(key, &key_pem)?;
                Some(Identity { cert_pem, key_pem })
            }
        };
        Ok(ClientTls { ca_path: ca.to_path_buf(), ca_pem, identity })
    }

    /// The CA file, for messages.
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// The CA certificates, PEM.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// This client's certificate and key, PEM, if it has them.
    pub fn identity_pem(&self) -> Option<(&[u8], &[u8])> {
        self.identity.as_ref().map(|i| (i.cert_pem.as_slice(), i.key_pem.as_slice()))
    }
}
