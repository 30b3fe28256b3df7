//! `ci-shards` against a real node (in this process, on loopback).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use portmesh_client::{Client, pb};
use portmesh_node::{NodeConfig, RunningNode, start};

const BIN: &str = env!("CARGO_BIN_EXE_ci-shards");

async fn node(dir: &std::path::Path) -> (RunningNode, Client) {
    let mut cfg = NodeConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.bootstrap = true;
    let node = start(cfg).await.unwrap();
    let client = Client::connect(&node.grpc_addr.to_string()).await.unwrap();
    (node, client)
}

async fn live(client: &Client) -> usize {
    client.list(pb::ListRequest::default()).await.unwrap().allocations.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_shard_gets_its_own_port_and_they_come_back_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = node(dir.path()).await;
    let addr = node.grpc_addr.to_string();
    let out = tokio::process::Command::new(BIN)
        .args(["--node", &addr, "--shards", "3", "--ttl", "5s", "--"])
        .args(["sh", "-c", "echo shard $SHARD of $SHARDS port $PORT arg {port}"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let mut ports = std::collections::BTreeSet::new();
    for line in stdout.lines().filter(|l| l.starts_with("shard ") && l.contains(" of 3 ")) {
        let w: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(w[5], w[7], "PORT and {{port}} agree: {line}");
        ports.insert(w[5].to_string());
    }
    assert_eq!(ports.len(), 3, "three distinct ports: {stdout}");
    assert_eq!(live(&client).await, 0, "the lease was revoked at the end");
    assert!(shards(&client).await.is_empty(), "and the registrations went with it");

    // The first failing shard's exit code is the program's.
    let out = tokio::process::Command::new(BIN)
        .args(["--node", &addr, "--shards", "3", "--ttl", "5s", "--", "sh", "-c", "exit $SHARD"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(live(&client).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_with_sigkill_its_ports_come_back_when_the_lease_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = node(dir.path()).await;
    let addr = node.grpc_addr.to_string();
    // Its own process group, like a CI job: the group is killed at once, shards included.
    let mut child = tokio::process::Command::new(BIN)
        .args(["--node", &addr, "--shards", "2", "--ttl", "2s", "--", "sleep", "30"])
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while live(&client).await < 2 || shards(&client).await.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the shards never got their ports");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let registered = shards(&client).await;
    assert!(registered.iter().all(|s| s.pid != 0 && s.command == "sleep 30"), "{registered:#?}");
    let pgid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().await.unwrap();
    let killed = tokio::time::Instant::now();
    while live(&client).await > 0 {
        assert!(killed.elapsed() < Duration::from_secs(20), "the ports never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nobody released them: the history shows both ended by the lease running out.
    let mut history =
        client.watch(pb::WatchRequest { from_revision: 1, ..Default::default() }).await.unwrap();
    let first = history.message().await.unwrap().unwrap();
    let expired = first.events.iter().filter(|e| e.r#type == pb::EventType::Expired as i32).count();
    let released = first.events.iter().filter(|e| e.r#type == pb::EventType::Released as i32).count();
    assert_eq!((expired, released), (2, 0), "{:#?}", first.events);
    // The registrations went with the lease, each once.
    let gone: Vec<&pb::Service> = first
        .events
        .iter()
        .filter(|e| e.r#type == pb::EventType::ServiceDeregistered as i32)
        .filter_map(|e| e.service.as_ref())
        .collect();
    assert_eq!(gone.len(), 2, "{:#?}", first.events);
    assert!(gone.iter().all(|s| s.project == "ci-shards"));
    assert_ne!(gone[0].id, gone[1].id);
    assert!(
        first
            .events
            .iter()
            .filter(|e| e.r#type == pb::EventType::ServiceDeregistered as i32)
            .all(|e| e.cause == "lease expired")
    );
    assert!(shards(&client).await.is_empty());
}

/// The shards' registrations, healthy or not.
async fn shards(client: &Client) -> Vec<pb::Service> {
    let req =
        pb::DiscoverRequest { project: "ci-shards".into(), include_unhealthy: true, ..Default::default() };
    client.discover(req).await.unwrap().services
}
