//! The node's HTTP endpoint: `/healthz`, `/readyz`, `/metrics`, `/api/v1/status`, and the
//! dashboard at `/` (a page, a script and a style sheet compiled into the binary; the script
//! polls `/api/v1/status`).

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use portmesh_api::{Api, Caller};
use portmesh_raft::now_ms;
use serde_json::{Value, json};
use tokio::sync::watch;

/// The names the HTTP server answers to. A browser sends the name it resolved in `Host`; a
/// page on another site that rebinds its own DNS name to this node's address (DNS rebinding)
/// still sends that name, so requests for unknown names are refused. IP addresses, `localhost`,
/// this host's name and the advertised host are always allowed.
#[derive(Debug, Clone)]
pub(crate) struct AllowedHosts(std::sync::Arc<Vec<String>>);

impl AllowedHosts {
    pub(crate) fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut all = vec!["localhost".to_string()];
        all.extend(names.into_iter().map(|n| strip_port(n).to_ascii_lowercase()).filter(|n| !n.is_empty()));
        AllowedHosts(std::sync::Arc::new(all))
    }

    fn allows(&self, host: &str) -> bool {
        let name = strip_port(host);
        name.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok()
            || self.0.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// `name:port` or `[v6]:port` without the port.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(host, |(ip, _)| ip);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

async fn check_host(
    State(hosts): State<AllowedHosts>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let host = req.headers().get(axum::http::header::HOST).and_then(|h| h.to_str().ok());
    match host {
        Some(h) if !hosts.allows(h) => {
            let shown: String = h.chars().take(100).collect();
            tracing::debug!(host = %shown, "HTTP request for an unknown host name refused");
            (
                StatusCode::FORBIDDEN,
                format!(
                    "host {shown:?} is not a name of this node: use its address, or start it with \
                     --http-allow-host NAME\n"
                ),
            )
                .into_response()
        }
        _ => next.run(req).await,
    }
}

pub(crate) async fn serve(
    listener: crate::transport::HttpIncoming,
    api: Api,
    hosts: AllowedHosts,
    mut stop: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", DASHBOARD_HTML) }))
        .route("/dashboard.js", get(|| async { asset("text/javascript; charset=utf-8", DASHBOARD_JS) }))
        .route("/dashboard.css", get(|| async { asset("text/css; charset=utf-8", DASHBOARD_CSS) }))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(api)
        .layer(axum::middleware::from_fn_with_state(hosts, check_host));
    let res = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = res {
        tracing::warn!(error = %e, "HTTP server ended with an error");
    }
}

const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");

fn asset(content_type: &'static str, body: &'static str) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, content_type), (axum::http::header::CACHE_CONTROL, "no-cache")],
        body,
    )
        .into_response()
}

/// Who asks, from the `Authorization` header; `Err` holds why the caller is refused.
fn caller(api: &Api, headers: &axum::http::HeaderMap) -> Result<Caller, String> {
    let token = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    api.authenticate(api.auth_on(), token, false).map_err(|s| s.message().to_string())
}

/// The answer to a caller refused by [`caller`].
fn unauthorized(why: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    (StatusCode::UNAUTHORIZED, [(axum::http::header::WWW_AUTHENTICATE, "Bearer")], format!("{why}\n"))
        .into_response()
}

async fn metrics(State(api): State<Api>, headers: axum::http::HeaderMap) -> axum::response::Response {
    use axum::response::IntoResponse;
    match caller(&api, &headers) {
        Ok(Caller::Anyone | Caller::Member | Caller::Admin { .. }) => {}
        Ok(_) => return (StatusCode::FORBIDDEN, "/metrics needs an admin token\n").into_response(),
        Err(why) => return unauthorized(why),
    }
    match crate::metrics::render(&api) {
        Ok(text) => {
            ([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
        }
        Err(e) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the metrics failed: {e}\n")).into_response()
        }
    }
}

/// Live while Raft runs, as gRPC health's `""` says: after a storage failure stopped it, 503 with
/// the cause (the node is shutting down then; a supervisor starts it again).
async fn healthz(State(api): State<Api>) -> (StatusCode, String) {
    match &api.node().metrics().running_state {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(fatal) => (StatusCode::SERVICE_UNAVAILABLE, format!("Raft stopped: {fatal}\n")),
    }
}

/// Ready when this node knows a leader and has applied what the leader committed (a read
/// barrier: the leader confirms its commit index with a quorum, this node applies up to it),
/// as gRPC health's named services say (`portmesh`, `portmesh.v1.Allocator`, ...).
async fn readyz(State(api): State<Api>) -> (StatusCode, String) {
    if api.node().cluster_id().is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not part of a cluster yet (joining, or waiting for its seeds)\n".into(),
        );
    }
    if api.node().leader().is_none() {
        return (StatusCode::SERVICE_UNAVAILABLE, "no leader known\n".into());
    }
    match tokio::time::timeout(READY_WITHIN, api.node().read_barrier(false)).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n".into()),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("not caught up with the leader: {e}\n")),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the leader's commit index was not confirmed and applied within {READY_WITHIN:?}\n"),
        ),
    }
}

/// How long `/readyz` waits for the read barrier.
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The status page's data. A member token sees its own team only (pools, allocations,
/// conflicts, services, leases, recommendations); the membership is the same for everyone.
async fn status(State(api): State<Api>, headers: axum::http::HeaderMap) -> axum::response::Response {
    use axum::response::IntoResponse;
    let team = match caller(&api, &headers) {
        Ok(Caller::Team { team, .. }) => Some(team),
        Ok(Caller::Join { .. }) => {
            return (StatusCode::FORBIDDEN, "a join token may only join a node\n").into_response();
        }
        Ok(_) => None,
        Err(why) => return unauthorized(why),
    };
    let mine = |t: &str| team.as_deref().is_none_or(|own| own == t);
    let s = api.status();
    let now = now_ms();
    let sm = api.node().state().read();
    let st = &sm.state;
    let pools: Vec<Value> = st
        .pools()
        .filter(|p| mine(&p.team))
        .map(|p| {
            let u = st.pool_usage(p, now);
            json!({
                "team": p.team, "name": p.name, "ranges": p.ranges_text(), "size": u.size,
                "allocated": u.allocated, "reserved": u.reserved, "cooling": u.cooling,
                "utilization": if u.size == 0 { 0.0 } else { f64::from(u.allocated) / f64::from(u.size) },
            })
        })
        .collect();
    // Ports a browser can open: the services' web ports, by host and port.
    let web: std::collections::HashMap<(&str, u16), &str> = st
        .services()
        .filter(|svc| mine(&svc.team))
        .flat_map(|svc| {
            svc.ports.iter().filter_map(move |p| Some(((svc.host.as_str(), p.port), web_scheme(svc, p)?)))
        })
        .collect();
    // Whether each holder still runs, asked once per process (many allocations share one), and
    // only on this node's host, where its processes can be seen.
    let mut running: std::collections::HashMap<u32, bool> = std::collections::HashMap::new();
    let mut holder_gone = |a: &portmesh_core::Allocation| match &a.holder {
        Some(h) if h.pid != 0 && a.host == api.host() => {
            !*running.entry(h.pid).or_insert_with(|| portmesh_probe::process::alive(h.pid))
        }
        _ => false,
    };
    let allocations: Vec<Value> = st
        .allocations()
        .filter(|a| mine(&a.team))
        .map(|a| {
            json!({
                "port": a.port, "team": a.team, "pool": a.pool, "service": a.service, "host": a.host,
                "key": a.key, "lease_id": a.lease_id, "revision": a.revision, "created_ms": a.created_ms,
                "pid": a.holder.as_ref().map(|h| h.pid),
                "command": a.holder.as_ref().map(|h| h.command.as_str()),
                "holder_gone": holder_gone(a),
                "web": web.get(&(a.host.as_str(), a.port)).copied().or((a.pool == "web").then_some("http")),
            })
        })
        .collect();
    let conflicts: Vec<Value> = st
        .events_since(0)
        .rev()
        .filter_map(|e| match &e.kind {
            portmesh_core::EventKind::Conflict(c) if mine(&c.team) => Some(json!({
                "port": c.port, "team": c.team, "pool": c.pool, "service": c.service, "host": c.host,
                "pid": c.holder.as_ref().map(|h| h.pid),
                "command": c.holder.as_ref().map(|h| h.command.as_str()),
                "at_ms": e.at_ms, "revision": e.revision,
            })),
            _ => None,
        })
        .take(50)
        .collect();
    let services: Vec<Value> = st
        .services()
        .filter(|svc| mine(&svc.team))
        .map(|svc| {
            let ports: Vec<Value> = svc
                .ports
                .iter()
                .map(|p| json!({"name": p.name, "port": p.port, "protocol": p.protocol, "web": web_scheme(svc, p)}))
                .collect();
            json!({
                "team": svc.team, "id": svc.id, "name": svc.name, "project": svc.project, "env": svc.env,
                "instance": svc.instance, "host": svc.host, "ports": ports, "tags": svc.tags,
                "status": svc.status.to_string(), "output": svc.output, "lease_id": svc.lease_id,
                "pid": svc.holder.as_ref().map(|h| h.pid),
                "command": svc.holder.as_ref().map(|h| h.command.as_str()), "registered_ms": svc.registered_ms,
                "status_ms": svc.status_ms,
            })
        })
        .collect();
    let leases: Vec<Value> = st
        .leases()
        .filter(|l| mine(&l.team))
        .map(|l| {
            let remaining = api.node().lease_remaining(l.id).unwrap_or_else(|| st.lease_remaining_ms(l));
            json!({
                "id": l.id, "team": l.team, "ttl_ms": l.ttl_ms, "remaining_ms": remaining,
                "granted_ms": l.granted_ms, "ports": st.lease_ports(l.id).collect::<Vec<_>>(),
                "at_risk": lease_at_risk(remaining, l.ttl_ms),
            })
        })
        .collect();
    drop(sm);
    let recommendations: Vec<Value> = api
        .stats(team.as_deref().unwrap_or_default())
        .recommendations
        .iter()
        .map(|r| json!({"rule": r.rule, "reason": r.reason, "command": r.command}))
        .collect();
    let members: Vec<Value> =
        s.members.iter().map(|m| json!({"id": m.id, "addr": m.addr, "role": m.role})).collect();
    Json(json!({
        "node_id": s.node_id, "host": api.host(), "leader_id": s.leader_id, "term": s.term, "members": members,
        "commit_index": s.commit_index, "applied_index": s.applied_index, "revision": s.revision,
        "pools": pools, "allocations": allocations, "services": services, "recent_conflicts": conflicts,
        "recommendations": recommendations, "leases": leases, "now_ms": now,
    }))
    .into_response()
}

/// The scheme a browser opens a service's port with, if it is a web port: its protocol says
/// `http` or `https`, it is named `http`, `https` or `web`, or an HTTP check probes it.
fn web_scheme(svc: &portmesh_core::Service, port: &portmesh_core::ServicePort) -> Option<&'static str> {
    let said = |w: &str| port.protocol.eq_ignore_ascii_case(w) || port.name.eq_ignore_ascii_case(w);
    if said("https") {
        return Some("https");
    }
    let checked = svc.check.as_ref().is_some_and(|c| {
        matches!(c.kind, portmesh_core::CheckKind::Http { .. })
            && c.port.as_deref().map_or(svc.main_port() == Some(port.port), |n| n == port.name)
    });
    (said("http") || said("web") || checked).then_some("http")
}

/// A lease is at risk once less than half its TTL is left: a kept lease is renewed every third
/// of its TTL, so a healthy one never is.
fn lease_at_risk(remaining_ms: u64, ttl_ms: u64) -> bool {
    remaining_ms < ttl_ms / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_and_known_names_are_answered() {
        let hosts = AllowedHosts::new(["laptop", "pm1.example.org:7400", "10.0.0.5:7400"]);
        for ok in
            ["127.0.0.1:7401", "[::1]:7401", "10.1.2.3", "localhost:7401", "LAPTOP:80", "pm1.example.org"]
        {
            assert!(hosts.allows(ok), "{ok}");
        }
        for bad in ["evil.example:7401", "localhost.evil.example", "pm1.example.org.evil", "laptop2"] {
            assert!(!hosts.allows(bad), "{bad}");
        }
        assert_eq!(strip_port("[fe80::1]:80"), "fe80::1");
        assert_eq!(strip_port("fe80::1"), "fe80::1");
        assert_eq!(strip_port("name:80"), "name");
    }

    #[test]
    fn web_ports_are_named_so_or_checked_over_http() {
        use portmesh_core::{CheckKind, HealthCheck, Service, ServicePort};
        let port = |name: &str, port, protocol: &str| ServicePort {
            name: name.into(),
            port,
            protocol: protocol.into(),
        };
        let check = |kind, port: Option<&str>| HealthCheck {
            kind,
            port: port.map(Into::into),
            interval_ms: 1000,
            timeout_ms: 1000,
            failures: 3,
        };
        let svc = |ports: Vec<ServicePort>, check: Option<HealthCheck>| Service {
            team: "default".into(),
            id: "x".into(),
            name: "x".into(),
            project: None,
            env: None,
            instance: None,
            host: "h".into(),
            ports,
            tags: vec![],
            check,
            depends_on: vec![],
            status: portmesh_core::HealthStatus::Passing,
            output: String::new(),
            lease_id: None,
            holder: None,
            registered_ms: 0,
            revision: 1,
            status_ms: 0,
        };
        let http = || Some(check(CheckKind::Http { path: "/".into() }, None));
        // An HTTP check on the main port (the first), or on the port it names.
        let s = svc(vec![port("main", 8000, ""), port("debug", 8001, "")], http());
        assert_eq!((web_scheme(&s, &s.ports[0]), web_scheme(&s, &s.ports[1])), (Some("http"), None));
        let named = Some(check(CheckKind::Http { path: "/".into() }, Some("debug")));
        let s = svc(vec![port("main", 8000, ""), port("debug", 8001, "")], named);
        assert_eq!((web_scheme(&s, &s.ports[0]), web_scheme(&s, &s.ports[1])), (None, Some("http")));
        // Named or declared so; a TCP check says nothing.
        let s = svc(
            vec![port("web", 1, ""), port("https", 2, ""), port("a", 3, "HTTP"), port("db", 4, "tcp")],
            Some(check(CheckKind::Tcp, None)),
        );
        let got: Vec<_> = s.ports.iter().map(|p| web_scheme(&s, p)).collect();
        assert_eq!(got, [Some("http"), Some("https"), Some("http"), None]);
    }

    #[test]
    fn a_lease_is_at_risk_below_half_its_ttl() {
        // Renewed every third of its TTL: never below two thirds while kept.
        assert!(!lease_at_risk(20_000, 30_000));
        assert!(!lease_at_risk(15_000, 30_000));
        assert!(lease_at_risk(14_999, 30_000));
        assert!(lease_at_risk(0, 30_000));
    }
}
