//! The checker: runs the health checks of the services registered on this node's host (each
//! run by `portmesh-checks`) and replicates their changes of status.
//!
//! Every node runs the checks of the services whose `host` is its own, each on its interval and
//! with its timeout, and keeps the count of consecutive failures locally. Only a change of status
//! is replicated (`Command::SetHealth`): the node reports it with `Registry.ReportHealth` through
//! the client library, which reaches the leader the way every request does. A report that did
//! not land is sent again
//! while the replicated status still differs, at most once per [`RESEND_AFTER`]. A new leader or
//! a restarted node starts counting afresh; the replicated status stays until a check says
//! otherwise.
//!
//! Only a check that started after this node last saw the replicated status change may report a
//! transition. Several nodes on one host (a test cluster, a developer's three local nodes) all
//! run the checks; without this rule one node's stale "passing", measured just before another
//! node reported "critical", would flip the status back and forth.

use std::collections::HashMap;
use std::time::Duration;

use portmesh_api::Api;
use portmesh_checks::Outcome;
use portmesh_client::Client;
use portmesh_core::{HealthCheck, HealthStatus, HealthUpdate, Service};
use portmesh_proto::v1 as pb;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How often the checker looks for due checks.
const TICK: Duration = Duration::from_millis(50);
/// How often a check runs, at most, while its service starts or fails (its own interval applies
/// once it passes): recovery and failure show within a second, and a healthy service is asked
/// only at its interval (10 s by default), so its access log stays readable.
pub(crate) const FAST: Duration = Duration::from_millis(500);

/// When the next check of a service is due: at its interval while it passes with no failure
/// since, else at most [`FAST`] later.
pub(crate) fn check_every(check: &HealthCheck, status: HealthStatus, failures: u32) -> Duration {
    let interval = Duration::from_millis(check.interval_ms);
    if status == HealthStatus::Passing && failures == 0 { interval } else { interval.min(FAST) }
}
/// How long to wait before sending a transition again that has not shown up in the state.
const RESEND_AFTER: Duration = Duration::from_secs(1);
/// How long the cluster may take to accept a report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(3);

type Id = (String, String);

/// The local bookkeeping of one service's check.
#[derive(Debug)]
struct Tracker {
    /// The check and port it was started for; a changed registration starts afresh.
    spec: (HealthCheck, u16),
    next_due: Instant,
    running: bool,
    failures: u32,
    /// The status the checks say, once they said something.
    seen: Option<(HealthStatus, String)>,
    /// The last transition sent and when.
    sent: Option<(HealthStatus, Instant)>,
    /// The replicated status (and when it last changed) this tracker last saw, and when it saw
    /// it change; outcomes of checks started before then are stale.
    basis: (HealthStatus, u64),
    since: Instant,
}

impl Tracker {
    fn new(spec: (HealthCheck, u16), svc: &Service, now: Instant) -> Self {
        Tracker {
            spec,
            next_due: now,
            running: false,
            failures: 0,
            seen: None,
            sent: None,
            basis: (svc.status, svc.status_ms),
            since: now,
        }
    }
}

/// Runs the health checks of this host's services until `shutdown` turns true.
pub async fn run_health_checks(api: Api, mut shutdown: watch::Receiver<bool>) {
    let mut trackers: HashMap<Id, Tracker> = HashMap::new();
    let mut running: JoinSet<(Id, Instant, Outcome)> = JoinSet::new();
    let mut cluster: Option<(u64, Client)> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // This host's services with a check, read again only when the applied state moved.
    let mut applied = api.node().state().applied_index();
    applied.mark_changed();
    let mut mine: Vec<Service> = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(done) = running.join_next() => {
                if let Ok((id, started, outcome)) = done
                    && let Some(t) = trackers.get_mut(&id)
                {
                    t.running = false;
                    if started >= t.since {
                        record(t, outcome);
                    }
                }
                continue;
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() { return; }
                continue;
            }
        }
        let now = Instant::now();
        if applied.has_changed().unwrap_or(false) {
            applied.borrow_and_update();
            let sm = api.node().state().read();
            mine =
                sm.state.services().filter(|s| s.host == api.host() && s.check.is_some()).cloned().collect();
            let present: std::collections::HashSet<(&str, &str)> =
                mine.iter().map(|s| (s.team.as_str(), s.id.as_str())).collect();
            trackers.retain(|id, _| present.contains(&(id.0.as_str(), id.1.as_str())));
        }
        let mut updates = Vec::new();
        for svc in &mine {
            let (Some(check), Some(port)) = (svc.check.clone(), checked_port(svc)) else { continue };
            let id = (svc.team.clone(), svc.id.clone());
            let spec = (check.clone(), port);
            let t = trackers.entry(id.clone()).or_insert_with(|| Tracker::new(spec.clone(), svc, now));
            if t.spec != spec {
                *t = Tracker::new(spec, svc, now);
            }
            if t.basis != (svc.status, svc.status_ms) {
                // The status changed (this node's report or another's): start from it afresh.
                (t.basis, t.since, t.seen, t.sent, t.failures) =
                    ((svc.status, svc.status_ms), now, None, None, 0);
            }
            if !t.running && t.next_due <= now {
                t.running = true;
                t.next_due = now + check_every(&check, svc.status, t.failures);
                running.spawn(async move { (id.clone(), now, portmesh_checks::run(&check, port).await) });
            }
            if let Some((status, output)) = &t.seen
                && *status != svc.status
                && t.sent.is_none_or(|(s, at)| s != *status || at.elapsed() >= RESEND_AFTER)
            {
                t.sent = Some((*status, now));
                tracing::info!(service = %svc.name, id = %svc.id, from = %svc.status, to = %status, %output, "health changed");
                updates.push(HealthUpdate {
                    team: svc.team.clone(),
                    id: svc.id.clone(),
                    status: *status,
                    output: output.clone(),
                });
            }
        }
        if !updates.is_empty()
            && let Err(why) = report(&api, &mut cluster, updates).await
        {
            tracing::warn!(%why, "could not report health changes; will retry");
        }
    }
}

/// Folds one check's outcome into its tracker.
fn record(t: &mut Tracker, outcome: Outcome) {
    match outcome {
        Outcome::Passing(out) => {
            t.failures = 0;
            t.seen = Some((HealthStatus::Passing, out));
        }
        Outcome::Warning(out) => {
            t.failures = 0;
            t.seen = Some((HealthStatus::Warning, out));
        }
        Outcome::Failing(out) => {
            t.failures = t.failures.saturating_add(1);
            if t.failures >= t.spec.0.failures {
                t.seen = Some((HealthStatus::Critical, out));
            }
        }
    }
}

fn checked_port(svc: &Service) -> Option<u16> {
    let check = svc.check.as_ref()?;
    match &check.port {
        Some(name) => svc.port(name),
        None => svc.main_port(),
    }
}

/// Sends transitions to the leader: the one way any request reaches it, the client library's
/// (ask this node; a follower names the leader, and the client follows it).
/// The client is kept with the TLS generation it was made with and made again once the node's
/// certificates were renewed (members present their node certificate: no token needed).
async fn report(
    api: &Api,
    cluster: &mut Option<(u64, Client)>,
    updates: Vec<HealthUpdate>,
) -> Result<(), String> {
    let peer_tls = api.node().peer_tls();
    let client = match cluster {
        Some((generation, c)) if *generation == peer_tls.generation() => c,
        _ => {
            let (generation, tls) = peer_tls.current();
            let options = portmesh_client::ClientOptions { tls, token: None };
            let c = Client::connect_with(&[api.node().addr.as_str()], options)
                .await
                .map_err(|e| e.to_string())?;
            &mut cluster.insert((generation, c)).1
        }
    };
    let reports = updates
        .into_iter()
        .map(|u| pb::HealthReport {
            team: u.team,
            id: u.id,
            status: pb::HealthStatus::from(u.status) as i32,
            output: u.output,
        })
        .collect();
    let outcome =
        match tokio::time::timeout(REPORT_TIMEOUT, client.report_health(pb::ReportHealthRequest { reports }))
            .await
        {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {REPORT_TIMEOUT:?}"),
        };
    // The client stays with the leader it followed; if that one is gone, start again from this
    // node, which knows the new one.
    *cluster = None;
    Err(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_are_fast_while_starting_or_failing_and_at_their_interval_while_passing() {
        let check = |ms| HealthCheck {
            kind: portmesh_core::CheckKind::Tcp,
            port: None,
            interval_ms: ms,
            timeout_ms: 2_000,
            failures: 1,
        };
        let s = Duration::from_secs;
        assert_eq!(check_every(&check(10_000), HealthStatus::Passing, 0), s(10));
        assert_eq!(check_every(&check(10_000), HealthStatus::Unknown, 0), FAST);
        assert_eq!(
            check_every(&check(10_000), HealthStatus::Passing, 1),
            FAST,
            "a first failure is confirmed quickly"
        );
        assert_eq!(check_every(&check(10_000), HealthStatus::Critical, 3), FAST);
        assert_eq!(
            check_every(&check(100), HealthStatus::Critical, 3),
            Duration::from_millis(100),
            "never slower than asked"
        );
    }
    use portmesh_core::CheckKind;

    fn check(kind: CheckKind) -> HealthCheck {
        HealthCheck { kind, port: None, interval_ms: 1_000, timeout_ms: 2_000, failures: 2 }
    }

    #[test]
    fn failures_count_before_critical() {
        let mut t = Tracker {
            spec: (check(CheckKind::Tcp), 1),
            next_due: Instant::now(),
            running: true,
            failures: 0,
            seen: Some((HealthStatus::Passing, "ok".into())),
            sent: None,
            basis: (HealthStatus::Passing, 0),
            since: Instant::now(),
        };
        record(&mut t, Outcome::Failing("no".into()));
        assert_eq!(t.seen, Some((HealthStatus::Passing, "ok".into())), "one failure of two keeps the status");
        record(&mut t, Outcome::Failing("no".into()));
        assert_eq!(t.seen, Some((HealthStatus::Critical, "no".into())));
        record(&mut t, Outcome::Passing("yes".into()));
        assert_eq!((t.failures, t.seen.clone()), (0, Some((HealthStatus::Passing, "yes".into()))));
    }
}
