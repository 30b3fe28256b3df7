//! Certificates for the tests on real sockets: a CA made by rcgen, its files in a temp dir,
//! node files and client options.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use portmesh_client::ClientOptions;
use portmesh_tls::generate::{Authority, Issued, Spec};
use portmesh_tls::{ClientTls, NodeFiles};

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn loopback() -> Spec {
    Spec::node(vec!["localhost".into()], vec![IpAddr::V4(Ipv4Addr::LOCALHOST)])
}

/// A CA and its files in a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Authority,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test CA").unwrap();
        write(dir.path(), "ca.pem", ca.cert_pem());
        Pki { dir, ca }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn files(&self, name: &str, issued: &Issued) -> (PathBuf, PathBuf) {
        (
            write(self.dir.path(), &format!("{name}.pem"), &issued.cert_pem),
            write(self.dir.path(), &format!("{name}.key"), &issued.key_pem),
        )
    }

    pub fn node_files(&self, name: &str, spec: &Spec, mtls: bool) -> NodeFiles {
        let (cert, key) = self.files(name, &self.ca.issue(spec).unwrap());
        NodeFiles { cert, key, ca: self.ca_path(), mtls }
    }

    /// Client options trusting this CA, with a client certificate of `from` if given.
    pub fn client(&self, from: Option<&Authority>) -> ClientOptions {
        let identity = from.map(|ca| {
            self.files(&format!("client{}", rand_suffix()), &ca.issue(&Spec::client("c")).unwrap())
        });
        let tls = ClientTls::load(
            &self.ca_path(),
            identity.as_ref().map(|i| i.0.as_path()),
            identity.as_ref().map(|i| i.1.as_path()),
        )
        .unwrap();
        ClientOptions { tls: Some(tls), token: None }
    }
}

pub fn rand_suffix() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A TLS connection to `addr` trusting this CA, checking the server's name `name`.
pub async fn tls_connect(
    pki: &Pki,
    addr: impl tokio::net::ToSocketAddrs,
    name: &'static str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = portmesh_tls::rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(pki.ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let config = portmesh_tls::rustls::ClientConfig::builder_with_provider(portmesh_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(name).unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap()
}
