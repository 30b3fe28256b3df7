//! `--seeds`: how a node of a fixed set of well-known members (a Kubernetes StatefulSet's first
//! pods, `portmesh-0`, `portmesh-1`, `portmesh-2` behind a headless Service) decides, when its
//! data directory holds no cluster, whether to create the cluster or join it, with the same
//! command line on every pod.
//!
//! Each round asks every other seed (its DNS name, then its gRPC status) and sorts it:
//! - *absent*: the name does not resolve (the pod does not exist yet);
//! - *silent*: it resolves but does not answer (starting, or down);
//! - *fresh*: it answers and belongs to no cluster (it is waiting too);
//! - *member*: it answers with a cluster id.
//!
//! A member anywhere: join the cluster through it. Otherwise the first seed bootstraps once every
//! other seed is absent or fresh: nobody else can hold a cluster. A first seed that lost its
//! volume while the others are merely silent must not start a second cluster beside theirs, so
//! it waits for them (and, past `timeout`, stops saying which seeds it waited for; its
//! supervisor starts it again). Seeds other than the first wait for a member to appear.
//!
//! A node with data never gets here: it rejoins its cluster by itself.

use std::time::Duration;

use portmesh_proto::channel::Purpose;
use portmesh_raft::RaftNode;

use crate::NodeError;

/// What a node with no cluster does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Start {
    Bootstrap,
    Join(String),
}

/// What one seed looked like this round.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Absent,
    Silent,
    Fresh,
    Member(String),
}

/// How long one look at a seed may take.
const ASK_WITHIN: Duration = Duration::from_secs(2);
/// Pause between rounds.
const ROUND: Duration = Duration::from_secs(1);

/// Decides between creating the cluster and joining it (see the module docs).
pub(crate) async fn decide(
    node: &RaftNode,
    seeds: &[String],
    advertise: &str,
    timeout: Duration,
) -> Result<Start, NodeError> {
    let first = seeds.first().is_some_and(|s| s == advertise);
    let others: Vec<&String> = seeds.iter().filter(|s| *s != advertise).collect();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: Option<Vec<Seen>> = None;
    loop {
        let mut seen = Vec::with_capacity(others.len());
        for s in &others {
            seen.push(look(node, s).await);
        }
        if let Some(at) = seen.iter().position(|s| matches!(s, Seen::Member(_))) {
            return Ok(Start::Join(others[at].clone()));
        }
        if first && seen.iter().all(|s| matches!(s, Seen::Absent | Seen::Fresh)) {
            tracing::info!(seeds = ?seeds, "no other seed holds a cluster: this node, the first seed, creates it");
            return Ok(Start::Bootstrap);
        }
        let waiting = describe(&others, &seen);
        if last.as_ref() != Some(&seen) {
            tracing::info!(waiting = %waiting, first_seed = first, "waiting for a seed that belongs to a cluster");
            last = Some(seen);
        }
        if tokio::time::Instant::now() + ROUND > deadline {
            return Err(NodeError::Seeds {
                waited: timeout,
                why: if first {
                    format!(
                        "this node is the first seed, but it creates the cluster only when every other seed \
                         is absent or in no cluster ({waiting})"
                    )
                } else {
                    format!("no seed belongs to a cluster yet: {waiting}")
                },
            });
        }
        tokio::time::sleep(ROUND).await;
    }
}

/// Looks at one seed: its name, then its status.
async fn look(node: &RaftNode, seed: &str) -> Seen {
    use portmesh_proto::v1::{StatusRequest, cluster_client::ClusterClient};
    let resolves = match tokio::time::timeout(ASK_WITHIN, tokio::net::lookup_host(seed)).await {
        Ok(Ok(mut addrs)) => addrs.next().is_some(),
        _ => false,
    };
    if !resolves {
        return Seen::Absent;
    }
    let ask = async {
        let ch = node.peer_tls().endpoint(seed, Purpose::Ask).ok()?.connect().await.ok()?;
        ClusterClient::new(ch).status(StatusRequest {}).await.ok().map(|r| r.into_inner())
    };
    match tokio::time::timeout(ASK_WITHIN, ask).await {
        Ok(Some(s)) if !s.cluster_id.is_empty() => Seen::Member(s.cluster_id),
        Ok(Some(_)) => Seen::Fresh,
        _ => Seen::Silent,
    }
}

fn describe(seeds: &[&String], seen: &[Seen]) -> String {
    let of = |want: fn(&Seen) -> bool| -> Vec<&str> {
        seeds.iter().zip(seen).filter(|(_, s)| want(s)).map(|(n, _)| n.as_str()).collect()
    };
    let mut parts = Vec::new();
    for (label, names) in [
        ("not answering", of(|s| matches!(s, Seen::Silent))),
        ("in no cluster yet", of(|s| matches!(s, Seen::Fresh))),
        ("not resolving", of(|s| matches!(s, Seen::Absent))),
    ] {
        if !names.is_empty() {
            parts.push(format!("{label}: {}", names.join(", ")));
        }
    }
    if parts.is_empty() { "there is no other seed".into() } else { parts.join("; ") }
}

/// A node that is not a seed leaves the cluster as it stops (a StatefulSet scaled down): the
/// leader removes it. Returns whether it left; a node that could not leave stays a member and
/// keeps its data (it rejoins at its next start, or `portmesh leave --id N` removes it).
pub(crate) async fn leave(node: &RaftNode) -> bool {
    use portmesh_proto::v1::{LeaveRequest, cluster_client::ClusterClient};
    let id = node.id;
    let outcome = async {
        if node.is_leader() {
            return node.remove_member(id).await.map_err(|e| e.to_string());
        }
        let m = node.metrics();
        let leader = m.current_leader.ok_or("no leader known")?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
            .ok_or("leader unknown")?;
        let ch = node
            .peer_tls()
            .endpoint(&addr, Purpose::Ask)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        ClusterClient::new(ch)
            .leave(LeaveRequest { node_id: id })
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    };
    match tokio::time::timeout(Duration::from_secs(10), outcome).await {
        Ok(Ok(())) => {
            tracing::info!(
                node_id = id,
                "not a seed: left the cluster; its data directory is emptied, and its next start joins as a new member"
            );
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(node_id = id, error = %e, "not a seed, but could not leave the cluster; it stays a member and keeps its data");
            false
        }
        Err(_) => {
            tracing::warn!(
                node_id = id,
                "not a seed, but leaving the cluster took over 10 s; it stays a member and keeps its data"
            );
            false
        }
    }
}

/// Removes what `dir` holds (not `dir`: it may be a volume's mount point).
pub(crate) fn empty_dir(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let path = e.path();
        let gone = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        if let Err(err) = gone {
            tracing::warn!(path = %path.display(), error = %err, "cannot empty the data directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_names_each_seed_by_what_it_did() {
        let (a, b, c) = ("a:1".to_string(), "b:1".to_string(), "c:1".to_string());
        let d = describe(&[&a, &b, &c], &[Seen::Silent, Seen::Fresh, Seen::Absent]);
        assert_eq!(d, "not answering: a:1; in no cluster yet: b:1; not resolving: c:1");
        assert_eq!(describe(&[], &[]), "there is no other seed");
    }
}
