//! Which member node runs on which host, learned from the members' own status, so that the
//! leader can have an allocation's ports probed on the host they are for (SPEC: probes where the
//! client is). A host no member runs on is looked for again at most every [`REFRESH_EVERY`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use portmesh_core::Holder;
use portmesh_proto::channel::Purpose;
use portmesh_proto::v1 as pb;
use portmesh_raft::RaftNode;
use tonic::transport::Channel;

use super::Busy;

/// How often the members are asked for their hosts when a host is not known.
const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// How long a member may take to say which host it runs on.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a member may take to probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
pub(crate) struct HostMap {
    known: tokio::sync::Mutex<Known>,
}

#[derive(Debug, Default)]
struct Known {
    /// Host name → (gRPC address, channel) of the member running there.
    by_host: HashMap<String, (String, Channel)>,
    refreshed: Option<Instant>,
    /// The generation of the node's TLS the channels were opened with.
    tls_generation: u64,
}

impl HostMap {
    /// Has the member on `host` probe `ports`. `None` when no member runs there or it did not
    /// answer in time.
    pub(crate) async fn probe(&self, node: &RaftNode, host: &str, ports: &[u16]) -> Option<Busy> {
        let (addr, channel) = self.member_on(node, host).await?;
        let req = pb::ProbeRequest { ports: ports.iter().map(|p| u32::from(*p)).collect() };
        let mut client = pb::cluster_client::ClusterClient::new(channel);
        match tokio::time::timeout(PROBE_TIMEOUT, client.probe(req)).await {
            Ok(Ok(r)) if r.get_ref().host == host => {
                let r = r.into_inner();
                let holders = r
                    .holders
                    .into_iter()
                    .filter_map(|h| Some((u16::try_from(h.port).ok()?, Holder::new(h.pid, &h.command))))
                    .collect();
                Some(Busy {
                    ports: r.busy.into_iter().filter_map(|p| u16::try_from(p).ok()).collect(),
                    holders,
                })
            }
            outcome => {
                let why = match outcome {
                    Ok(Ok(r)) => format!("it now runs on host {}", r.get_ref().host),
                    Ok(Err(s)) => s.message().to_string(),
                    Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
                };
                tracing::warn!(%host, member = %addr, %why, "the member on the allocation's host did not probe; granting unprobed");
                self.known.lock().await.by_host.remove(host);
                None
            }
        }
    }

    async fn member_on(&self, node: &RaftNode, host: &str) -> Option<(String, Channel)> {
        let members: Vec<(u64, String)> = node
            .metrics()
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != node.id)
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        let mut known = self.known.lock().await;
        let tls_generation = node.peer_tls().generation();
        if known.tls_generation != tls_generation {
            // Renewed certificates: open new channels with them.
            known.by_host.clear();
            known.refreshed = None;
            known.tls_generation = tls_generation;
        }
        if let Some((addr, ch)) = known.by_host.get(host)
            && members.iter().any(|(_, a)| a == addr)
        {
            return Some((addr.clone(), ch.clone()));
        }
        if known.refreshed.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
            return None;
        }
        known.refreshed = Some(Instant::now());
        let asks = members.into_iter().filter_map(|(_, addr)| {
            let channel = node.peer_tls().endpoint(&addr, Purpose::Ask).ok()?.connect_lazy();
            Some(async move {
                let mut client = pb::cluster_client::ClusterClient::new(channel.clone());
                match tokio::time::timeout(ASK_TIMEOUT, client.status(pb::StatusRequest {})).await {
                    Ok(Ok(s)) => Some((s.into_inner().host, addr, channel)),
                    _ => None,
                }
            })
        });
        known.by_host.clear();
        for (h, addr, channel) in futures::future::join_all(asks).await.into_iter().flatten() {
            known.by_host.insert(h, (addr, channel));
        }
        known.by_host.get(host).cloned()
    }
}
