//! The `Watch` service: the events of the state this node has applied, history first, then live,
//! in (revision, seq) order. One task per watcher pumps pages of whole revisions into a small
//! channel, so a slow watcher slows only itself; when nothing happens it sends a progress
//! notification with the current revision.
//!
//! Fan-out: each event is converted and encoded once ([`WireEvents`]), whatever the number of
//! watchers that send it; a watcher's message is the concatenation of those encodings. That is
//! why this one service is written by hand rather than generated: its messages carry events
//! already encoded ([`WireResponse`]), byte for byte what a generated `WatchResponse` would
//! encode, so clients decode them as `WatchResponse`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use portmesh_core::EVENT_RETENTION;
use portmesh_proto::BadRequest;
use portmesh_proto::v1 as pb;
use portmesh_store::StateReader;
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::{Request, Status};

use crate::api::stopping;
use crate::{Api, ApiError};

/// Events scanned per message (a message always ends at a revision boundary, so it may hold a
/// few more).
const PAGE: usize = 1_000;
const DEFAULT_PROGRESS: Duration = Duration::from_secs(1);
const MIN_PROGRESS: Duration = Duration::from_millis(100);

/// Encoded events kept for watchers: the newest few pages, enough for every live watcher to
/// find the revisions it has not sent yet (one that replays older history encodes what it reads).
const WIRE_KEPT: usize = 4 * PAGE;

type WatchStream = Pin<Box<dyn Stream<Item = Result<WireResponse, Status>> + Send>>;

/// Which events a watcher wants.
#[derive(Debug, Clone, Default)]
struct Filter {
    team: String,
    pool: String,
    service: String,
}

impl Filter {
    fn matches(&self, s: &Scope) -> bool {
        let ok = |want: &str, have: &Option<String>| want.is_empty() || have.as_deref() == Some(want);
        ok(&self.team, &s.team) && ok(&self.pool, &s.pool) && ok(&self.service, &s.service)
    }
}

/// The team, pool and service an event belongs to, where it has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Scope {
    team: Option<String>,
    pool: Option<String>,
    service: Option<String>,
}

impl Scope {
    fn of(e: &pb::Event) -> Self {
        let some = |s: &str| Some(s.to_owned());
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        if let Some(a) = &e.allocation {
            return Scope { team: some(&a.team), pool: some(&a.pool), service: some(&a.service) };
        }
        if let Some(c) = &e.conflict {
            return Scope { team: some(&c.team), pool: some(&c.pool), service: some(&c.service) };
        }
        if let Some(svc) = &e.service {
            return Scope { team: some(&svc.team), pool: None, service: some(&svc.name) };
        }
        if !e.service_name.is_empty() {
            return Scope { team: some(&e.team), pool: None, service: some(&e.service_name) };
        }
        Scope { team: non_empty(&e.team), pool: non_empty(&e.pool_name), service: None }
    }
}

/// One event in its wire form (an encoded `pb::Event`) and what the filters look at.
#[derive(Debug)]
struct WireEvent {
    scope: Scope,
    bytes: Bytes,
}

/// The newest events in their wire form, shared by every watcher of this node.
#[derive(Debug)]
pub(crate) struct WireEvents {
    kept: Mutex<BTreeMap<(u64, u32), Arc<WireEvent>>>,
    /// Counts each conversion (`RequestMetrics::watch_events_encoded`).
    encoded: Counter,
}

impl WireEvents {
    pub(crate) fn new(encoded: Counter) -> Self {
        WireEvents { kept: Mutex::default(), encoded }
    }
}

/// A `WatchResponse` whose events are already encoded. Its encoding is the one a
/// `pb::WatchResponse` with the same events has: field 1 is length-delimited either way (an
/// embedded message or bytes), so clients decode it as `WatchResponse`. Only ever encoded.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct WireResponse {
    events: Vec<Bytes>,
    revision: u64,
    progress: bool,
}

impl Message for WireResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for e in &self.events {
            prost::encoding::bytes::encode(1, e, buf);
        }
        if self.revision != 0 {
            prost::encoding::uint64::encode(2, &self.revision, buf);
        }
        if self.progress {
            prost::encoding::bool::encode(3, &self.progress, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Never decoded here (clients decode `pb::WatchResponse`): skip what comes.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        prost::encoding::bytes::encoded_len_repeated(1, &self.events)
            + if self.revision != 0 { prost::encoding::uint64::encoded_len(2, &self.revision) } else { 0 }
            + if self.progress { prost::encoding::bool::encoded_len(3, &self.progress) } else { 0 }
    }

    fn clear(&mut self) {
        *self = WireResponse::default();
    }
}

/// `Err` when events from `from` on are no longer all kept: the oldest kept revision is above
/// `from` and the history is full (so older events were dropped).
fn check_kept(state: &portmesh_core::State, from: u64) -> Result<(), ApiError> {
    let oldest = state.oldest_event_revision();
    if from < oldest && state.events_since(0).count() >= EVENT_RETENTION {
        return Err(ApiError::Compacted { from, oldest });
    }
    Ok(())
}

/// One page: the matching events from `next` on (whole revisions) and the revision everything
/// is delivered up to; `more` when the page stopped early.
struct Page {
    events: Vec<Bytes>,
    up_to: u64,
    more: bool,
}

fn page(reader: &StateReader, wire: &WireEvents, next: u64, filter: &Filter) -> Result<Page, ApiError> {
    let sm = reader.read();
    let state = &sm.state;
    check_kept(state, next)?;
    let mut events = Vec::new();
    let mut last = None;
    let mut kept = wire.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for (scanned, e) in state.events_since(next).enumerate() {
        if scanned >= PAGE && last != Some(e.revision) {
            return Ok(Page { events, up_to: last.unwrap_or(next - 1), more: true });
        }
        last = Some(e.revision);
        let w = kept.entry((e.revision, e.seq)).or_insert_with(|| {
            wire.encoded.inc();
            let event = pb::Event::from(e);
            Arc::new(WireEvent { scope: Scope::of(&event), bytes: event.encode_to_vec().into() })
        });
        if filter.matches(&w.scope) {
            events.push(w.bytes.clone());
        }
    }
    while kept.len() > WIRE_KEPT {
        kept.pop_first();
    }
    Ok(Page { events, up_to: state.revision().max(next - 1), more: false })
}

async fn pump(
    reader: StateReader,
    wire: Arc<WireEvents>,
    mut next: u64,
    filter: Filter,
    every: Duration,
    tx: mpsc::Sender<Result<WireResponse, Status>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut applied = reader.applied_index();
    let mut last_sent = Instant::now();
    loop {
        // Mark what is applied as seen before reading, so a change after the read wakes us.
        applied.borrow_and_update();
        let p = match page(&reader, &wire, next, &filter) {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        if p.up_to >= next {
            if !p.events.is_empty() {
                let msg = WireResponse { events: p.events, revision: p.up_to, progress: false };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
                last_sent = Instant::now();
            }
            next = p.up_to + 1;
            if p.more {
                continue;
            }
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep_until(last_sent + every) => {
                // Delivered up to `next - 1`, but never a revision the cluster has not reached
                // (a watch from a future revision waits for it; it does not invent it).
                let at = reader.read().state.revision().min(next - 1);
                let msg = WireResponse { events: Vec::new(), revision: at, progress: true };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
                last_sent = Instant::now();
            }
            _ = tx.closed() => return,
            // The node stops: end the stream, or its graceful shutdown would wait for it forever.
            () = stopping(&mut shutdown) => {
                let mut gone = Status::unavailable(format!(
                    "this node is shutting down: watch again from revision {next} on another member"
                ));
                gone.metadata_mut().insert(crate::ERROR_METADATA, tonic::metadata::MetadataValue::from_static("unavailable"));
                let _ = tx.send(Err(gone)).await;
                return;
            }
        }
    }
}

impl Api {
    async fn open_watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<tonic::Response<WatchStream>, Status> {
        let req = self.scoped(req)?;
        let every = match req.progress_interval_ms {
            0 => DEFAULT_PROGRESS,
            ms if Duration::from_millis(ms) < MIN_PROGRESS => {
                return Err(ApiError::from(BadRequest(format!(
                    "progress_interval_ms: {ms} is below the minimum of {}",
                    MIN_PROGRESS.as_millis()
                )))
                .into());
            }
            ms => Duration::from_millis(ms),
        };
        portmesh_proto::check_filters(&[("team", &req.team), ("pool", &req.pool), ("service", &req.service)])
            .map_err(ApiError::from)?;
        let reader = self.node().state().clone();
        let from = {
            let sm = reader.read();
            let from = if req.from_revision == 0 { sm.state.revision() + 1 } else { req.from_revision };
            check_kept(&sm.state, from)?;
            from
        };
        let filter = Filter { team: req.team, pool: req.pool, service: req.service };
        let (tx, rx) = mpsc::channel(4);
        let open = crate::metrics::StreamGuard::new(self.metrics().clone());
        let shutdown = self.inner.shutdown.subscribe();
        let wire = self.inner.wire_events.clone();
        tokio::spawn(async move {
            let _open = open;
            pump(reader, wire, from, filter, every, tx, shutdown).await;
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

impl Api {
    /// The `portmesh.v1.Watch` service.
    pub fn watch(&self) -> WatchServer {
        WatchServer(self.clone())
    }
}

/// The `portmesh.v1.Watch` gRPC service (what the generated `WatchServer` would be, with
/// [`WireResponse`] as its message).
#[derive(Debug, Clone)]
pub struct WatchServer(Api);

impl tonic::server::NamedService for WatchServer {
    const NAME: &'static str = "portmesh.v1.Watch";
}

/// The one method, `Watch`: a server-streaming call.
struct WatchMethod(Api);

impl tonic::server::ServerStreamingService<pb::WatchRequest> for WatchMethod {
    type Response = WireResponse;
    type ResponseStream = WatchStream;
    type Future = BoxFuture<tonic::Response<WatchStream>, Status>;

    fn call(&mut self, req: Request<pb::WatchRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move { api.open_watch(req).await })
    }
}

impl<B> Service<http::Request<B>> for WatchServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move {
            if req.uri().path() != "/portmesh.v1.Watch/Watch" {
                return Ok(Status::unimplemented(format!(
                    "no method {} in portmesh.v1.Watch",
                    req.uri().path()
                ))
                .into_http());
            }
            let codec = tonic_prost::ProstCodec::<WireResponse, pb::WatchRequest>::default();
            Ok(tonic::server::Grpc::new(codec).server_streaming(WatchMethod(api), req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(revision: u64, seq: u32, service: &str) -> pb::Event {
        pb::Event {
            revision,
            seq,
            r#type: pb::EventType::Allocated as i32,
            allocation: Some(pb::Allocation {
                port: 20_000 + seq,
                service: service.into(),
                team: "default".into(),
                pool: "web".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// What goes on the wire decodes as the generated `WatchResponse` with the same events,
    /// for event messages and progress notifications alike.
    #[test]
    fn a_wire_response_is_a_watch_response_on_the_wire() {
        let events = vec![event(7, 0, "api"), event(7, 1, ""), event(8, 0, "web")];
        let wire = WireResponse {
            events: events.iter().map(|e| Bytes::from(e.encode_to_vec())).collect(),
            revision: 8,
            progress: false,
        };
        let bytes = wire.encode_to_vec();
        assert_eq!(bytes.len(), wire.encoded_len());
        let want = pb::WatchResponse { events, revision: 8, progress: false };
        assert_eq!(bytes, want.encode_to_vec());
        assert_eq!(pb::WatchResponse::decode(bytes.as_slice()).unwrap(), want);
        for (revision, progress) in [(0, true), (12, true), (0, false)] {
            let wire = WireResponse { events: Vec::new(), revision, progress };
            let want = pb::WatchResponse { events: Vec::new(), revision, progress };
            assert_eq!(
                wire.encode_to_vec(),
                want.encode_to_vec(),
                "revision {revision}, progress {progress}"
            );
        }
    }

    /// The filters look at the scope each kind of event has.
    #[test]
    fn filters_match_the_scope_of_the_event() {
        let alloc = Scope::of(&event(1, 0, "api"));
        assert_eq!(
            alloc,
            Scope { team: Some("default".into()), pool: Some("web".into()), service: Some("api".into()) }
        );
        let pool_event =
            Scope::of(&pb::Event { team: "t".into(), pool_name: "p".into(), ..Default::default() });
        assert_eq!(pool_event, Scope { team: Some("t".into()), pool: Some("p".into()), service: None });
        let f = |team: &str, pool: &str, service: &str| Filter {
            team: team.into(),
            pool: pool.into(),
            service: service.into(),
        };
        assert!(f("", "", "").matches(&alloc));
        assert!(f("default", "web", "api").matches(&alloc));
        assert!(!f("", "", "web").matches(&alloc));
        assert!(f("t", "p", "").matches(&pool_event));
        assert!(!f("", "", "api").matches(&pool_event), "a pool event has no service");
    }
}
