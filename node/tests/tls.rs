//! TLS on real sockets: in-process nodes serving certificates made by rcgen here, clients that
//! get each handshake mistake explained, members told from clients, and certificates renewed
//! under load with no failed request.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use portmesh_client::{Client, ClientError, ClientOptions, pb};
use portmesh_node::{NodeConfig, RunningNode, start};
use portmesh_proto::raft::v1 as rpb;
mod pki;

use pki::{Pki, loopback};
use portmesh_tls::generate::{Authority, Spec};
use portmesh_tls::{ClientTls, NodeFiles, Problem};

async fn tls_node(dir: &Path, files: NodeFiles) -> RunningNode {
    let mut cfg = NodeConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.bootstrap = true;
    cfg.tls = Some(files);
    start(cfg).await.unwrap()
}

async fn connect(node: &RunningNode, options: ClientOptions) -> Result<Client, ClientError> {
    Client::connect_with(&[node.grpc_addr.to_string().as_str()], options).await
}

fn problem(r: Result<Client, ClientError>) -> Problem {
    match r {
        Err(ClientError::Tls { problem, .. }) => problem,
        Err(other) => panic!("expected a TLS problem, got {other}"),
        Ok(_) => panic!("expected a TLS problem, got a connection"),
    }
}

/// What the node answers a client's first call.
async fn first_call(node: &RunningNode, options: ClientOptions) -> ClientError {
    let c = connect(node, options).await.unwrap();
    portmesh_testkit::ready(&c).await; // health answers whoever asks
    c.list(pb::ListRequest::default()).await.unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_handshake_mistake_is_named_with_what_to_do() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let node = tls_node(data.path(), pki.node_files("node", &loopback(), false)).await;

    // The right CA: served, and the node's gRPC and HTTP both speak TLS.
    let c = connect(&node, pki.client(None)).await.unwrap();
    portmesh_testkit::ready(&c).await;

    // Another CA.
    let other = Pki::new();
    let p = problem(connect(&node, other.client(None)).await);
    assert_eq!(p, Problem::UnknownIssuer);
    let e = connect(&node, other.client(None)).await.unwrap_err().to_string();
    assert!(e.contains(&node.grpc_addr.to_string()) && e.contains("not signed by the CA in --tls-ca"), "{e}");
    assert!(!e.contains("transport error"), "never a bare transport error: {e}");

    // Plaintext to a TLS node: the node says it requires TLS (health alone answers in plaintext,
    // for probes that speak no TLS).
    let plain = connect(&node, ClientOptions::default()).await.unwrap();
    // Health answers in plaintext too.
    portmesh_testkit::ready(&plain).await;
    let e = plain.list(pb::ListRequest::default()).await.unwrap_err();
    assert!(matches!(e, ClientError::Status { code: tonic::Code::Unauthenticated, .. }), "{e:?}");
    assert!(e.to_string().contains("requires TLS") && e.to_string().contains("--tls-ca"), "{e}");

    // TLS to a plaintext node.
    let plain_dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::new(plain_dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.bootstrap = true;
    let plain_node = start(cfg).await.unwrap();
    assert_eq!(problem(connect(&plain_node, pki.client(None)).await), Problem::NotTls);

    // A certificate for another name.
    let elsewhere = tempfile::tempdir().unwrap();
    let spec = Spec::node(vec!["db.example".into()], vec![IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9))]);
    let named = tls_node(elsewhere.path(), pki.node_files("named", &spec, false)).await;
    assert_eq!(problem(connect(&named, pki.client(None)).await), Problem::WrongName);

    // An expired certificate.
    let old = tempfile::tempdir().unwrap();
    let expired = Spec { valid_for: Duration::ZERO, ..loopback() };
    let expired = tls_node(old.path(), pki.node_files("expired", &expired, false)).await;
    let p = problem(connect(&expired, pki.client(None)).await);
    assert_eq!(p, Problem::Expired);
    assert!(p.to_string().contains("renew"), "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_needs_a_client_certificate_of_the_cluster_ca() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let node = tls_node(data.path(), pki.node_files("node", &loopback(), true)).await;
    let e = first_call(&node, pki.client(None)).await;
    assert!(matches!(e, ClientError::Status { code: tonic::Code::Unauthenticated, .. }), "{e:?}");
    assert!(
        e.to_string().contains("requires a client certificate") && e.to_string().contains("--tls-cert"),
        "{e}"
    );
    let foreign = Authority::new("someone else's CA").unwrap();
    let e = first_call(&node, pki.client(Some(&foreign))).await.to_string();
    assert!(
        e.contains("refused the client's certificate") && e.contains("not signed by the cluster's CA"),
        "{e}"
    );
    let old = pki.ca.issue(&Spec { valid_for: Duration::ZERO, ..Spec::client("old") }).unwrap();
    let (cert, key) = pki.files("old", &old);
    let tls = ClientTls::load(&pki.ca_path(), Some(&cert), Some(&key)).unwrap();
    let e = first_call(&node, ClientOptions { tls: Some(tls), token: None }).await.to_string();
    assert!(e.contains("expired"), "{e}");
    let c = connect(&node, pki.client(Some(&pki.ca))).await.unwrap();
    let r = c
        .allocate(pb::AllocateRequest {
            items: vec![pb::AllocItem { service: "web".into(), ..Default::default() }],
            ..Default::default()
        })
        .await;
    assert!(r.is_ok(), "{r:?}");
}

/// A process that is not a member (a client certificate, or none) cannot vote, append, join,
/// probe, or take members out; the term, the members and the revision stay as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_members_speak_raft_join_and_probe() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let node = tls_node(data.path(), pki.node_files("node", &loopback(), false)).await;
    let addr = node.grpc_addr.to_string();
    let client = connect(&node, pki.client(Some(&pki.ca))).await.unwrap();
    client
        .allocate(pb::AllocateRequest {
            items: vec![pb::AllocItem { service: "a".into(), ..Default::default() }],
            ..Default::default()
        })
        .await
        .unwrap();
    let before = client.status().await.unwrap();

    for identity in [None, Some(&pki.ca)] {
        let options = pki.client(identity);
        let ep = portmesh_proto::channel::endpoint(
            &addr,
            portmesh_proto::channel::Purpose::Ask,
            options.tls.as_ref(),
        )
        .unwrap();
        let ch = ep.connect().await.unwrap();
        // A vote for a far-future term, as an attacker would send it.
        let msg = rpb::RaftMessage { data_version: 2, payload: vec![0xff; 32] };
        let mut raft = rpb::raft_client::RaftClient::new(ch.clone());
        for r in [
            raft.vote(msg.clone()).await,
            raft.append_entries(msg.clone()).await,
            raft.install_snapshot(msg.clone()).await,
        ] {
            let s = r.unwrap_err();
            assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
            assert!(s.message().contains("node certificate"), "{}", s.message());
        }
        let mut cluster = pb::cluster_client::ClusterClient::new(ch);
        let join = pb::JoinRequest { node_id: 4242, addr: "127.0.0.1:1".into(), cluster_id: String::new() };
        assert_eq!(cluster.join(join).await.unwrap_err().code(), tonic::Code::PermissionDenied);
        assert_eq!(
            cluster.probe(pb::ProbeRequest { ports: vec![22] }).await.unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }
    // Leave and Shutdown need at least a client certificate.
    let anonymous = connect(&node, pki.client(None)).await.unwrap();
    let e = anonymous.leave(pb::LeaveRequest { node_id: before.node_id }).await.unwrap_err();
    assert!(e.to_string().contains("client certificate"), "{e}");
    assert!(anonymous.shutdown().await.is_err());

    let after = client.status().await.unwrap();
    assert_eq!(
        (after.term, after.members.len(), after.leader_id),
        (before.term, before.members.len(), before.leader_id)
    );
    let list = client.list(pb::ListRequest::default()).await.unwrap();
    assert_eq!(list.allocations.len(), 1);
}

/// Renewed certificate files are picked up while clients allocate and release, new connections
/// get the new certificate, and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_renewed_under_load_with_no_failed_request() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let files = pki.node_files("node", &loopback(), false);
    let node = tls_node(data.path(), files.clone()).await;
    let addr = node.grpc_addr.to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (stop, ok, failed, addr, options) =
            (stop.clone(), ok.clone(), failed.clone(), addr.clone(), pki.client(None));
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                // A new connection each round: handshakes with whichever certificate is current.
                let outcome = async {
                    let c = Client::connect_with(&[addr.as_str()], options.clone()).await?;
                    let key = format!("w{w}-{i}");
                    let item = pb::AllocItem { service: "r".into(), key: key.clone(), ..Default::default() };
                    c.allocate(pb::AllocateRequest { items: vec![item], ..Default::default() }).await?;
                    c.release(pb::ReleaseRequest { key, ..Default::default() }).await
                }
                .await;
                match outcome {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("failed during rotation: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                i += 1;
            }
        }));
    }
    let served = |n: usize| {
        let ok = ok.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(20), async {
                while ok.load(Ordering::Relaxed) < n {
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the load makes progress");
        }
    };
    served(20).await;
    // Renew: a new key and certificate, written over the old files (key first, as `tls init` does).
    let renewed = pki.ca.issue(&loopback()).unwrap();
    portmesh_probe::private::write(&files.key, renewed.key_pem.as_bytes()).unwrap();
    portmesh_probe::private::write(&files.cert, renewed.cert_pem.as_bytes()).unwrap();
    let new_der: Vec<_> = rustls_pki_types_der(&renewed.cert_pem);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while served_certificate(&addr, &pki).await != new_der {
        assert!(tokio::time::Instant::now() < deadline, "the node never served the renewed certificate");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at_switch = ok.load(Ordering::Relaxed);
    served(at_switch + 20).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed across the renewal");
    eprintln!(
        "{} requests, {} after the renewal",
        ok.load(Ordering::Relaxed),
        ok.load(Ordering::Relaxed) - at_switch
    );
}

fn rustls_pki_types_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

/// The certificate the node at `addr` presents to a new connection now.
async fn served_certificate(addr: &str, pki: &Pki) -> Vec<u8> {
    let tls = pki::tls_connect(pki, addr, "127.0.0.1").await;
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}
