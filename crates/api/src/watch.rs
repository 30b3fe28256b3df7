//! The `Watch` service: the events of the state this node has applied, history first, then live,
//! in (revision, seq) order. One task per watcher pumps pages of whole revisions into a small
//! channel, so a slow watcher slows only itself; when nothing happens it sends a progress
//! notification with the current revision.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use portmesh_core::EVENT_RETENTION;
use portmesh_proto::BadRequest;
use portmesh_proto::v1 as pb;
use portmesh_store::StateReader;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Request, Status};

use crate::api::stopping;
use crate::{Api, ApiError};

/// Events scanned per message (a message always ends at a revision boundary, so it may hold a
/// few more).
const PAGE: usize = 1_000;
const DEFAULT_PROGRESS: Duration = Duration::from_secs(1);
const MIN_PROGRESS: Duration = Duration::from_millis(100);

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

/// Which events a watcher wants.
#[derive(Debug, Clone, Default)]
struct Filter {
    team: String,
    pool: String,
    service: String,
}

impl Filter {
    fn matches(&self, e: &pb::Event) -> bool {
        let (team, pool, service) = scope(e);
        let ok = |want: &str, have: Option<&str>| want.is_empty() || have == Some(want);
        ok(&self.team, team) && ok(&self.pool, pool) && ok(&self.service, service)
    }
}

/// The team, pool and service an event belongs to, where it has them.
fn scope(e: &pb::Event) -> (Option<&str>, Option<&str>, Option<&str>) {
    if let Some(a) = &e.allocation {
        return (Some(&a.team), Some(&a.pool), Some(&a.service));
    }
    if let Some(c) = &e.conflict {
        return (Some(&c.team), Some(&c.pool), Some(&c.service));
    }
    if let Some(svc) = &e.service {
        return (Some(&svc.team), None, Some(&svc.name));
    }
    if !e.service_name.is_empty() {
        return (Some(&e.team), None, Some(&e.service_name));
    }
    let team = (!e.team.is_empty()).then_some(e.team.as_str());
    let pool = (!e.pool_name.is_empty()).then_some(e.pool_name.as_str());
    (team, pool, None)
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
    events: Vec<pb::Event>,
    up_to: u64,
    more: bool,
}

fn page(reader: &StateReader, next: u64, filter: &Filter) -> Result<Page, ApiError> {
    let sm = reader.read();
    let state = &sm.state;
    check_kept(state, next)?;
    let mut events = Vec::new();
    let mut last = None;
    for (scanned, e) in state.events_since(next).enumerate() {
        if scanned >= PAGE && last != Some(e.revision) {
            return Ok(Page { events, up_to: last.unwrap_or(next - 1), more: true });
        }
        last = Some(e.revision);
        let event = pb::Event::from(e);
        if filter.matches(&event) {
            events.push(event);
        }
    }
    Ok(Page { events, up_to: state.revision().max(next - 1), more: false })
}

async fn pump(
    reader: StateReader,
    mut next: u64,
    filter: Filter,
    every: Duration,
    tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut applied = reader.applied_index();
    let mut last_sent = Instant::now();
    loop {
        // Mark what is applied as seen before reading, so a change after the read wakes us.
        applied.borrow_and_update();
        let p = match page(&reader, next, &filter) {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        if p.up_to >= next {
            if !p.events.is_empty() {
                let msg = pb::WatchResponse { events: p.events, revision: p.up_to, progress: false };
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
                let msg = pb::WatchResponse { events: Vec::new(), revision: at, progress: true };
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

#[tonic::async_trait]
impl pb::watch_server::Watch for Api {
    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<tonic::Response<WatchStream>, Status> {
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
        tokio::spawn(async move {
            let _open = open;
            pump(reader, from, filter, every, tx, shutdown).await;
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

impl Api {
    pub fn watch(&self) -> pb::watch_server::WatchServer<Self> {
        pb::watch_server::WatchServer::new(self.clone())
    }
}
