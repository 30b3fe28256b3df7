//! Joining a cluster: a new node asking a member to add it (following redirects to the leader),
//! and a restarted member checking that `--join` still names its own cluster.

use std::time::Duration;

use portmesh_proto::channel::Purpose;
use portmesh_raft::RaftNode;

use crate::NodeError;

/// A restarted member given `--join` again: it already belongs to a cluster, which must be the
/// one at `addr`. An unreachable `addr` is only logged: a member rejoins its cluster by itself.
pub(crate) async fn same_cluster(addr: &str, node: &RaftNode) -> Result<(), NodeError> {
    use portmesh_proto::v1::{StatusRequest, cluster_client::ClusterClient};
    let status = match node.peer_tls().endpoint(addr, Purpose::Ask) {
        Ok(ep) => match ep.connect().await {
            Ok(ch) => ClusterClient::new(ch).status(StatusRequest {}).await.map(|r| r.into_inner()).ok(),
            Err(_) => None,
        },
        Err(_) => None,
    };
    let Some(status) = status else {
        tracing::info!(%addr, "already a member of a cluster; --join ignored ({addr} did not answer)");
        return Ok(());
    };
    let ours = node.cluster_id();
    if ours.is_empty() && status.members.iter().any(|m| m.id == node.id) {
        node.store.set_cluster_id(&status.cluster_id)?;
    } else if !status.cluster_id.is_empty() && status.cluster_id != ours {
        return Err(NodeError::ForeignCluster {
            dir: node.store.dir().to_path_buf(),
            ours: if ours.is_empty() { "(unknown)".into() } else { ours },
            addr: addr.to_string(),
            theirs: status.cluster_id,
        });
    }
    if !status.members.iter().any(|m| m.id == node.id) {
        return Err(NodeError::Removed {
            id: node.id,
            cluster: status.cluster_id,
            addr: addr.to_string(),
            members: status.members.iter().map(|m| m.id.to_string()).collect::<Vec<_>>().join(", "),
            dir: node.store.dir().to_path_buf(),
        });
    }
    tracing::info!(cluster_id = %node.cluster_id(), "already a member of this cluster; --join ignored");
    Ok(())
}

/// Asks the cluster at `addr` to add this node, following redirects to the leader and retrying
/// while an election runs, for at most `timeout`. A refusal (another cluster's data, a bad
/// request) ends the attempts at once.
pub(crate) async fn join(
    addr: &str,
    node: &RaftNode,
    advertise: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(), NodeError> {
    use portmesh_proto::v1::{JoinRequest, cluster_client::ClusterClient};
    let id = node.id;
    let bearer = portmesh_client::Bearer::new(token).map_err(|e| NodeError::Join {
        addr: addr.to_string(),
        reason: format!("--join-token: {e}"),
        tried: String::new(),
    })?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut target = addr.to_string();
    let mut tried: Vec<String> = Vec::new();
    loop {
        if !tried.contains(&target) {
            tried.push(target.clone());
        }
        let outcome: Result<(), String> = match node.peer_tls().endpoint(&target, Purpose::Ask) {
            Err(e) => Err(e.to_string()),
            Ok(ep) => match ep.connect().await {
                Err(e) => Err(format!("cannot connect to {target}: {e}")),
                Ok(ch) => {
                    let mut req = tonic::Request::new(JoinRequest {
                        node_id: id,
                        addr: advertise.to_string(),
                        cluster_id: node.cluster_id(),
                    });
                    bearer.apply(&mut req);
                    match ClusterClient::new(ch).join(req).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            node.store.set_cluster_id(&r.cluster_id)?;
                            tracing::info!(
                                leader = r.leader_id,
                                voter = r.voter,
                                cluster_id = %r.cluster_id,
                                "joined the cluster"
                            );
                            return Ok(());
                        }
                        Err(s) => {
                            let answer = format!("{target} answered: {}", s.message());
                            // Refusals end the attempts: another cluster's data, a bad
                            // request, or a certificate the cluster does not accept.
                            if matches!(
                                s.code(),
                                tonic::Code::FailedPrecondition
                                    | tonic::Code::InvalidArgument
                                    | tonic::Code::Unauthenticated
                                    | tonic::Code::PermissionDenied
                            ) {
                                return Err(NodeError::Join {
                                    addr: addr.to_string(),
                                    reason: answer,
                                    tried: tried.join(", "),
                                });
                            }
                            // A follower names the leader: ask it next. Unless it names this
                            // node's own address: a member that was here before this node (it
                            // is gone; the others have not noticed yet). Ask the first address
                            // again once they elected another.
                            match s
                                .metadata()
                                .get(portmesh_api::LEADER_METADATA)
                                .and_then(|v| v.to_str().ok())
                            {
                                Some(leader) if leader == advertise => target = addr.to_string(),
                                Some(leader) => target = leader.to_string(),
                                None => {}
                            }
                            Err(answer)
                        }
                    }
                }
            },
        };
        if let Err(reason) = outcome {
            if tokio::time::Instant::now() > deadline {
                return Err(NodeError::Join { addr: addr.to_string(), reason, tried: tried.join(", ") });
            }
            tracing::debug!(%reason, "join attempt failed; retrying");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
