use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::generate::{Authority, Spec};
use crate::*;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn node_files(dir: &Path, ca: &Authority, spec: &Spec, mtls: bool) -> NodeFiles {
    let node = ca.issue(spec).unwrap();
    NodeFiles {
        cert: write(dir, "node.pem", &node.cert_pem),
        key: write(dir, "node.key", &node.key_pem),
        ca: write(dir, "ca.pem", ca.cert_pem()),
        mtls,
    }
}

fn chain(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().unwrap()
}

fn local_node() -> Spec {
    Spec::node(vec!["localhost".into()], vec![IpAddr::V4(Ipv4Addr::LOCALHOST)])
}

#[test]
fn node_certificates_are_told_from_client_and_foreign_ones() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new("test CA").unwrap();
    let tls = node_files(dir.path(), &ca, &local_node(), false).load().unwrap();
    assert!(!tls.mtls());
    let node = ca.issue(&local_node()).unwrap();
    assert!(tls.is_node(&chain(&node.cert_pem)), "a node certificate of this CA is a member's");
    let client = ca.issue(&Spec::client("alice")).unwrap();
    assert!(!tls.is_node(&chain(&client.cert_pem)), "a client certificate cannot act as a member");
    let other = Authority::new("other CA").unwrap().issue(&local_node()).unwrap();
    assert!(!tls.is_node(&chain(&other.cert_pem)), "another CA's node is not a member");
    let expired = ca.issue(&Spec { valid_for: Duration::ZERO, ..local_node() }).unwrap();
    assert!(!tls.is_node(&chain(&expired.cert_pem)), "an expired certificate is not a member's");
    assert!(!tls.is_node(&[]));
    assert_eq!(tls.judge(None), Peer::Anonymous);
    assert_eq!(tls.judge(Some(&chain(&client.cert_pem))), Peer::Client);
    assert_eq!(tls.judge(Some(&chain(&node.cert_pem))), Peer::Member);
    let Peer::Refused(why) = tls.judge(Some(&chain(&other.cert_pem))) else {
        panic!("another CA's is refused")
    };
    assert!(why.contains("not signed by the cluster's CA"), "{why}");
    let namesake = Authority::new("test CA").unwrap().issue(&local_node()).unwrap();
    let Peer::Refused(why) = tls.judge(Some(&chain(&namesake.cert_pem))) else {
        panic!("a namesake CA's is refused")
    };
    assert!(why.contains("not signed by the cluster's CA"), "{why}");
    let old_client = ca.issue(&Spec { valid_for: Duration::ZERO, ..Spec::client("old") }).unwrap();
    let Peer::Refused(why) = tls.judge(Some(&chain(&old_client.cert_pem))) else {
        panic!("expired is refused")
    };
    assert!(why.contains("expired"), "{why}");
    // Both listeners: gRPC speaks h2, HTTP http/1.1.
    assert_eq!(tls.grpc().alpn_protocols, vec![b"h2".to_vec()]);
    assert_eq!(tls.http().alpn_protocols, vec![b"http/1.1".to_vec()]);
    assert!(tls.client().identity_pem().is_some(), "a node connects to members with its own certificate");
}

#[test]
fn an_existing_ca_signs_certificates_its_own_certificate_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new("team CA").unwrap();
    let again = Authority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
    let files = node_files(dir.path(), &again, &local_node(), true);
    // The node was issued by the re-read CA; the trusted CA file is the original one.
    std::fs::write(&files.ca, ca.cert_pem()).unwrap();
    let tls = files.load().unwrap();
    assert!(tls.is_node(&chain(&std::fs::read_to_string(&files.cert).unwrap())));
    assert!(Authority::from_pem("not a certificate", ca.key_pem()).is_err());
}

#[test]
fn bad_files_are_named_and_their_contents_not_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new("test CA").unwrap();
    let good = node_files(dir.path(), &ca, &local_node(), false);

    let missing = NodeFiles { cert: dir.path().join("nope.pem"), ..good.clone() };
    let e = missing.load().unwrap_err().to_string();
    assert!(e.starts_with("cannot read the certificate file ") && e.contains("nope.pem"), "{e}");

    let empty = NodeFiles { ca: write(dir.path(), "empty.pem", "hello\n"), ..good.clone() };
    let e = empty.load().unwrap_err().to_string();
    assert!(e.contains("CA file") && e.contains("empty.pem") && e.contains("holds no CERTIFICATE"), "{e}");

    let secret = "-----BEGIN PRIVATE KEY-----\nSECRETSECRET!!\n-----END PRIVATE KEY-----\n";
    let garbled = NodeFiles { key: write(dir.path(), "garbled.key", secret), ..good.clone() };
    let e = garbled.load().unwrap_err().to_string();
    assert!(e.contains("key file") && e.contains("garbled.key"), "{e}");
    assert!(!e.contains("SECRET"), "the key's text is not echoed: {e}");

    // A key that is not the certificate's.
    let other = ca.issue(&local_node()).unwrap();
    let mismatched = NodeFiles { key: write(dir.path(), "other.key", &other.key_pem), ..good.clone() };
    let e = mismatched.load().unwrap_err().to_string();
    assert!(e.contains("cannot be used together"), "{e}");

    assert!(good.load().is_ok());
}

#[test]
fn stamps_change_when_a_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new("test CA").unwrap();
    let files = node_files(dir.path(), &ca, &local_node(), false);
    let before = files.stamp();
    assert_eq!(before, files.stamp());
    let renewed = ca.issue(&local_node()).unwrap();
    std::fs::write(&files.cert, format!("{}\n", renewed.cert_pem)).unwrap();
    assert_ne!(before, files.stamp());
}

#[test]
fn client_side_needs_a_certificate_and_its_key_together() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new("test CA").unwrap();
    let ca_path = write(dir.path(), "ca.pem", ca.cert_pem());
    let client = ca.issue(&Spec::client("alice")).unwrap();
    let cert = write(dir.path(), "c.pem", &client.cert_pem);
    let key = write(dir.path(), "c.key", &client.key_pem);

    let plain = ClientTls::load(&ca_path, None, None).unwrap();
    assert!(plain.identity_pem().is_none());
    assert_eq!(plain.ca_path(), ca_path.as_path());
    assert_eq!(plain.ca_pem(), ca.cert_pem().as_bytes());
    let e = ClientTls::load(&ca_path, Some(&cert), None).unwrap_err().to_string();
    assert_eq!(e, "--tls-cert was given without --tls-key: a certificate and its key go together");
    let e = ClientTls::load(&ca_path, None, Some(&key)).unwrap_err().to_string();
    assert!(e.starts_with("--tls-key was given without --tls-cert"), "{e}");
    let with = ClientTls::load(&ca_path, Some(&cert), Some(&key)).unwrap();
    let shown = format!("{with:?}");
    assert!(shown.contains("client_certificate: true") && !shown.contains("PRIVATE"), "{shown}");
    assert!(!format!("{client:?}").contains("PRIVATE"), "Issued hides its key");
    // A key file given where the CA goes is refused, naming the CA file.
    let e = ClientTls::load(&key, None, None).unwrap_err().to_string();
    assert!(e.contains("CA file") && e.contains("c.key"), "{e}");
}

#[test]
fn handshake_failures_are_explained() {
    use rustls::{AlertDescription, CertificateError, Error};
    let io = |e: Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let cases = [
        (Error::InvalidCertificate(CertificateError::UnknownIssuer), Problem::UnknownIssuer),
        (Error::InvalidCertificate(CertificateError::Expired), Problem::Expired),
        (Error::InvalidCertificate(CertificateError::NotValidYet), Problem::NotYetValid),
        (Error::InvalidCertificate(CertificateError::NotValidForName), Problem::WrongName),
        (Error::AlertReceived(AlertDescription::CertificateRequired), Problem::ClientCertificateRequired),
        (Error::AlertReceived(AlertDescription::UnknownCA), Problem::ClientCertificateRefused),
        (Error::AlertReceived(AlertDescription::CertificateExpired), Problem::ClientCertificateExpired),
        (Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType), Problem::NotTls),
    ];
    for (error, problem) in cases {
        let wrapped = io(error);
        assert_eq!(explain(&wrapped), Some(problem.clone()));
        assert!(!problem.to_string().is_empty());
    }
    assert!(Problem::ClientCertificateRequired.to_string().contains("--tls-cert"));
    assert!(Problem::UnknownIssuer.to_string().contains("--tls-ca"));
    assert_eq!(explain(&std::io::Error::other("connection refused")), None);
}
