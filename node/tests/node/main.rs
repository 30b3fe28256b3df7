//! In-process node tests: a real node (Raft over sled in a temp dir, gRPC on 127.0.0.1:0) driven
//! through the real client.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use portmesh_client::{Client, pb};
use portmesh_core::{EventKind, ReleaseCause};
use portmesh_node::{NodeConfig, RunningNode, start};
use portmesh_raft::faults::LinkFaults;
use portmesh_testkit as testkit;
use std::sync::Arc;
use tokio_stream::StreamExt;

mod boundary;
mod early;
mod faults;
mod leases;
mod membership;
mod single;
mod watch;

/// Logs to the test output when `PORTMESH_TEST_LOG` holds a filter (e.g. `info,openraft=debug`).
fn logs() {
    if let Ok(f) = std::env::var("PORTMESH_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(f))
            .with_test_writer()
            .try_init();
    }
}

async fn node_in(dir: &std::path::Path, tweak: impl FnOnce(&mut NodeConfig)) -> (RunningNode, Client) {
    let mut cfg = NodeConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.bootstrap = true;
    tweak(&mut cfg);
    let node = start(cfg).await.unwrap();
    let client = Client::connect(&node.grpc_addr.to_string()).await.unwrap();
    (node, client)
}

/// Waits for `cond` on the node's applied state, re-checking each time an entry is applied.
async fn applied_until(
    node: &RunningNode,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&portmesh_core::State) -> bool,
) {
    let reader = node.api.node().state().clone();
    let mut applied = reader.applied_index();
    let wait = async {
        loop {
            if cond(&reader.read().state) {
                return;
            }
            if applied.changed().await.is_err() {
                panic!("node stopped while waiting for {what}");
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn item(service: &str, pool: &str) -> pb::AllocItem {
    pb::AllocItem { service: service.into(), pool: pool.into(), ..Default::default() }
}

/// Raft timings for tests on a busy two-core machine: quick, but not twitchy.
fn fast_raft(c: &mut NodeConfig) {
    c.raft.heartbeat = Duration::from_millis(50);
    c.raft.election_min = Duration::from_millis(400);
    c.raft.election_max = Duration::from_millis(800);
    c.leader_timeout = Duration::from_secs(20);
}

struct Cluster {
    /// The network between the nodes: cut, drop or delay their Raft messages.
    net: Arc<LinkFaults>,
    _dirs: Vec<tempfile::TempDir>,
    nodes: Vec<Option<RunningNode>>,
    addrs: Vec<String>,
    tweak: Box<dyn Fn(&mut NodeConfig) + Send + Sync>,
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
        Cluster::start_with(n, |_| {}).await
    }

    async fn start_with(n: usize, tweak: impl Fn(&mut NodeConfig) + Send + Sync + 'static) -> Cluster {
        logs();
        let net = Arc::new(LinkFaults::new());
        let tweak = {
            let net = net.clone();
            move |c: &mut NodeConfig| {
                c.raft.faults = Some(net.clone());
                tweak(c)
            }
        };
        let mut dirs = Vec::new();
        let mut nodes = Vec::new();
        let mut addrs: Vec<String> = Vec::new();
        for i in 0..n {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = NodeConfig::new(dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
            fast_raft(&mut cfg);
            tweak(&mut cfg);
            if i == 0 {
                cfg.bootstrap = true;
            } else {
                cfg.join = Some(addrs[0].clone());
            }
            let node = start(cfg).await.unwrap();
            addrs.push(node.grpc_addr.to_string());
            nodes.push(Some(node));
            dirs.push(dir);
        }
        Cluster { net, _dirs: dirs, nodes, addrs, tweak: Box::new(tweak) }
    }

    fn leader_index(&self) -> usize {
        self.nodes.iter().position(|n| n.as_ref().is_some_and(|n| n.api.node().is_leader())).unwrap()
    }

    async fn stop(&mut self, i: usize) {
        let n = self.nodes[i].take().unwrap();
        n.shutdown_handle().send_replace(true);
        n.wait().await.unwrap();
    }

    async fn wait_leader_other_than(&self, old: u64) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(i) = self
                .nodes
                .iter()
                .position(|n| n.as_ref().is_some_and(|n| n.api.node().is_leader() && n.api.node().id != old))
            {
                return i;
            }
            assert!(tokio::time::Instant::now() < deadline, "no new leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Restarts node `i` on its directory and address (retrying while the old handles let go
    /// of sled's lock).
    async fn restart(&mut self, i: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut cfg = NodeConfig::new(self._dirs[i].path().to_path_buf(), self.addrs[i].parse().unwrap());
            fast_raft(&mut cfg);
            (self.tweak)(&mut cfg);
            match start(cfg).await {
                Ok(n) => {
                    self.nodes[i] = Some(n);
                    return;
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("retrying restart: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn id(&self, i: usize) -> u64 {
        self.nodes[i].as_ref().unwrap().api.node().id
    }

    fn live_addrs(&self) -> Vec<String> {
        self.nodes.iter().zip(&self.addrs).filter(|(n, _)| n.is_some()).map(|(_, a)| a.clone()).collect()
    }

    /// Waits until some node other than `old` leads and is confirmed by every live node but
    /// `except`.
    async fn leader_agreed_by_others(&self, old: u64, except: usize) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let leaders: BTreeSet<Option<u64>> = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, n)| *i != except && n.is_some())
                .map(|(_, n)| n.as_ref().unwrap().api.node().metrics().current_leader)
                .collect();
            if let [Some(l)] = leaders.iter().copied().collect::<Vec<_>>()[..]
                && l != old
                && let Some(i) = (0..self.nodes.len()).find(|i| self.nodes[*i].is_some() && self.id(*i) == l)
            {
                return i;
            }
            assert!(tokio::time::Instant::now() < deadline, "no new leader agreed on: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the cluster holds at least `n` allocations (a load is under way).
    async fn wait_for_allocations(&self, n: usize) {
        let node = self.live().next().unwrap();
        applied_until(node, "the load to get going", Duration::from_secs(20), |s| {
            s.allocations().count() >= n
        })
        .await;
    }

    fn live(&self) -> impl Iterator<Item = &RunningNode> {
        self.nodes.iter().flatten()
    }

    async fn client(&self) -> Client {
        let addrs: Vec<&str> = self.addrs.iter().map(String::as_str).collect();
        Client::connect_any(&addrs).await.unwrap()
    }

    /// Waits until every live node has applied the same index and holds the same allocations.
    async fn converged(&self) -> BTreeSet<u16> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let views: Vec<(u64, BTreeSet<u16>)> = self
                .live()
                .map(|n| {
                    let sm = n.api.node().state().read();
                    (sm.last_applied.map_or(0, |l| l.index), sm.state.allocations().map(|a| a.port).collect())
                })
                .collect();
            if views.windows(2).all(|w| w[0] == w[1]) {
                return views[0].1.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nodes did not converge: {:?}",
                views.iter().map(|v| v.0).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
