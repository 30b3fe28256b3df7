//! `portmesh.v1.Leases`: grant, keep alive, time to live, revoke.

use std::pin::Pin;

use futures::Stream;
use portmesh_core::{Rejection, Response};
use portmesh_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::{Request, Status, Streaming};

use crate::api::{Result, stopping, team, unexpected};
use crate::{Api, ApiError};

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = std::result::Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::leases_server::Leases for Api {
    async fn grant(&self, req: Request<pb::LeaseGrantRequest>) -> Result<pb::LeaseGrantResponse> {
        let req = self.scoped(req)?;
        match self.propose_request(&req).await? {
            Response::LeaseGranted(l) => {
                Ok(tonic::Response::new(pb::LeaseGrantResponse { lease: Some((&l, l.ttl_ms, []).into()) }))
            }
            other => Err(unexpected(other).into()),
        }
    }

    type KeepAliveStream = KeepAliveStream;

    async fn keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Self::KeepAliveStream> {
        let caller = crate::auth::caller(&req).cloned();
        let mut incoming = req.into_inner();
        let api = self.clone();
        let mut shutdown = self.inner.shutdown.subscribe();
        let out = async_stream(move |tx| async move {
            loop {
                // The node stops: end the stream (graceful shutdown waits for open streams).
                let msg = tokio::select! {
                    m = incoming.next() => m,
                    () = stopping(&mut shutdown) => None,
                };
                let Some(msg) = msg else { break };
                let reply = msg.and_then(|m| {
                    let acts_for = api.act_as(caller.as_ref(), &m.team)?;
                    let ttl =
                        api.inner.node.keep_alive(&team(&acts_for)?, m.lease_id).map_err(ApiError::from)?;
                    Ok(pb::LeaseKeepAliveResponse { lease_id: m.lease_id, ttl_ms: ttl.unwrap_or(0) })
                });
                let stop = reply.is_err();
                if tx.send(reply).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(out))
    }

    async fn time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<pb::LeaseTimeToLiveResponse> {
        let req = self.scoped(req)?;
        let node = &self.inner.node;
        // Leader only: the countdown lives there. The barrier also makes the read linearizable.
        node.read_barrier(false).await.map_err(ApiError::from)?;
        let team = team(&req.team)?;
        let sm = node.state().read();
        let Some(lease) = sm.state.lease(req.lease_id).filter(|l| l.team == team) else {
            return Err(ApiError::from(Rejection::UnknownLease { team, id: req.lease_id }).into());
        };
        let ports: Vec<u16> = sm.state.lease_ports(lease.id).collect();
        let remaining = node.lease_remaining(lease.id).unwrap_or_else(|| sm.state.lease_remaining_ms(lease));
        let out = pb::Lease::from((lease, remaining, ports.iter().copied()));
        let allocations = ports.iter().filter_map(|p| sm.state.allocation(*p)).map(Into::into).collect();
        let services = sm.state.lease_services(lease.id).map(Into::into).collect();
        Ok(tonic::Response::new(pb::LeaseTimeToLiveResponse { lease: Some(out), allocations, services }))
    }

    async fn revoke(&self, req: Request<pb::LeaseRevokeRequest>) -> Result<pb::LeaseRevokeResponse> {
        let req = self.scoped(req)?;
        match self.propose_request(&req).await? {
            Response::LeaseRevoked { released, revision, .. } => {
                Ok(tonic::Response::new(pb::LeaseRevokeResponse {
                    released: released.iter().map(Into::into).collect(),
                    revision,
                }))
            }
            other => Err(unexpected(other).into()),
        }
    }
}

/// A response stream fed by a task through a bounded channel.
fn async_stream<F, Fut>(f: F) -> KeepAliveStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<std::result::Result<pb::LeaseKeepAliveResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
