//! Authentication on real sockets: in-process TLS nodes started with `--auth`, the first admin
//! token from the data directory, team tokens tried on every team-scoped method against their
//! own team, another team and with no token, admin-only methods, join tokens, and the HTTP
//! status page. Every refusal is checked to change nothing.
#![allow(clippy::unwrap_used)]

mod pki;

use std::path::Path;
use std::time::Duration;

use pki::{Pki, loopback};
use portmesh_client::{Client, ClientError, ClientOptions, pb};
use portmesh_node::{NodeConfig, RunningNode, start};
use tonic::Code;

async fn auth_node(dir: &Path, pki: &Pki, join: Option<(&RunningNode, Option<String>)>) -> RunningNode {
    let mut cfg = NodeConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.http = Some("127.0.0.1:0".parse().unwrap());
    cfg.tls = Some(pki.node_files(&format!("node{}", pki::rand_suffix()), &loopback(), false));
    cfg.auth = true;
    match join {
        None => cfg.bootstrap = true,
        Some((member, token)) => {
            cfg.join = Some(member.grpc_addr.to_string());
            cfg.join_token = token;
            cfg.leader_timeout = Duration::from_secs(5);
        }
    }
    start(cfg).await.unwrap()
}

async fn client(node: &RunningNode, pki: &Pki, token: Option<&str>) -> Client {
    let options = ClientOptions { token: token.map(str::to_string), ..pki.client(None) };
    Client::connect_with(&[node.grpc_addr.to_string().as_str()], options).await.unwrap()
}

fn code(r: &Result<(), ClientError>) -> Option<Code> {
    match r {
        Ok(()) => None,
        Err(ClientError::Status { code, .. }) => Some(*code),
        Err(other) => panic!("not a status: {other}"),
    }
}

/// One port of pool `p` of `team` for `service`.
async fn alloc_one(c: &Client, team: &str, service: &str) -> pb::AllocateResponse {
    let item = pb::AllocItem { service: service.into(), pool: "p".into(), ..Default::default() };
    c.allocate(pb::AllocateRequest { team: team.into(), items: vec![item], ..Default::default() })
        .await
        .unwrap()
}

async fn create(admin: &Client, role: &str, team: &str) -> String {
    let req = pb::CreateTokenRequest { role: role.into(), team: team.into(), ..Default::default() };
    admin.create_token(req).await.unwrap().secret
}

fn ok<T>(r: Result<T, ClientError>) -> Result<(), ClientError> {
    r.map(|_| ())
}

/// Every team-scoped method, acting on `team`: what each answered.
async fn team_calls(c: &Client, team: &str) -> Vec<(&'static str, Result<(), ClientError>)> {
    let t = || team.to_string();
    let item = pb::AllocItem { service: "svc".into(), pool: "p".into(), ..Default::default() };
    let service = pb::Service {
        team: t(),
        name: "svc".into(),
        ports: vec![pb::ServicePort { name: "main".into(), port: 20741, protocol: String::new() }],
        ..Default::default()
    };
    vec![
        (
            "allocate",
            ok(c.allocate(pb::AllocateRequest { team: t(), items: vec![item], ..Default::default() }).await),
        ),
        (
            "release",
            ok(c.release(pb::ReleaseRequest { team: t(), key: "nothing".into(), ..Default::default() })
                .await),
        ),
        ("list", ok(c.list(pb::ListRequest { team: t(), ..Default::default() }).await)),
        ("pools", ok(c.list_pools(pb::ListPoolsRequest { team: t(), ..Default::default() }).await)),
        ("stats", ok(c.stats(pb::StatsRequest { team: t() }).await)),
        ("grant", ok(c.grant_lease(pb::LeaseGrantRequest { team: t(), ttl_ms: 10_000 }).await)),
        ("renew", ok(c.keep_alive_once(pb::LeaseKeepAliveRequest { team: t(), lease_id: 999 }).await)),
        ("ttl", ok(c.time_to_live(pb::LeaseTimeToLiveRequest { team: t(), lease_id: 999 }).await)),
        ("revoke", ok(c.revoke_lease(pb::LeaseRevokeRequest { team: t(), lease_id: 999 }).await)),
        ("register", ok(c.register(pb::RegisterRequest { service: Some(service) }).await)),
        ("deregister", ok(c.deregister(pb::DeregisterRequest { team: t(), id: "nothing".into() }).await)),
        ("discover", ok(c.discover(pb::DiscoverRequest { team: t(), ..Default::default() }).await)),
        ("watch", ok(c.watch(pb::WatchRequest { team: t(), ..Default::default() }).await)),
    ]
}

/// Admin-only methods (harmless arguments: a refused call changes nothing anyway).
async fn admin_calls(c: &Client) -> Vec<(&'static str, Result<(), ClientError>)> {
    let range = pb::PortRange { start: 20750, end: 20754 };
    vec![
        (
            "add pool",
            ok(c.add_pool(pb::AddPoolRequest {
                team: "teamc".into(),
                name: "p".into(),
                ranges: vec![range],
            })
            .await),
        ),
        (
            "remove pool",
            ok(c.remove_pool(pb::RemovePoolRequest { team: "teamc".into(), name: "p".into() }).await),
        ),
        ("reserve", ok(c.reserve(pb::ReserveRequest { port: 20755, reason: "x".into() }).await)),
        ("unreserve", ok(c.unreserve(pb::UnreserveRequest { port: 20755 }).await)),
        ("tokens", ok(c.list_tokens().await)),
        ("create token", ok(c.create_token(pb::CreateTokenRequest::default()).await)),
        ("revoke token", ok(c.revoke_token("0000000000000000").await)),
        ("leave", ok(c.leave(pb::LeaveRequest { node_id: 12345 }).await)),
        ("health report", ok(c.report_health(pb::ReportHealthRequest::default()).await)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_tokens_act_on_their_own_team_only_and_refusals_change_nothing() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let node = auth_node(data.path(), &pki, None).await;

    // The first admin token: in the data directory, owner-only.
    let file = data.path().join("admin.token");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o600);
    let admin_token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    let admin = client(&node, &pki, Some(&admin_token)).await;
    for (team, start) in [("teama", 20730u32), ("teamb", 20735)] {
        let range = pb::PortRange { start, end: start + 4 };
        admin
            .add_pool(pb::AddPoolRequest { team: team.into(), name: "p".into(), ranges: vec![range] })
            .await
            .unwrap();
    }
    let a = client(&node, &pki, Some(&create(&admin, "member", "teama").await)).await;
    let b_token = create(&admin, "member", "teamb").await;
    let b = client(&node, &pki, Some(&b_token)).await;
    let nobody = client(&node, &pki, None).await;
    let flipped = if b_token.ends_with('0') { '1' } else { '0' };
    let forged = client(&node, &pki, Some(&format!("{}{flipped}", &b_token[..b_token.len() - 1]))).await;
    let b_port = alloc_one(&b, "teamb", "db").await.allocations[0].port;

    // Every team-scoped method: refused on another team, without a token or with a forged one,
    // and nothing changes; allowed on the caller's own team.
    let revision = admin.status().await.unwrap().revision;
    for (caller, c, team, want) in [
        ("team a on team b", &a, "teamb", Code::PermissionDenied),
        ("no token", &nobody, "teama", Code::Unauthenticated),
        ("a forged token", &forged, "teamb", Code::Unauthenticated),
    ] {
        for (method, outcome) in team_calls(c, team).await {
            assert_eq!(code(&outcome), Some(want), "{caller}: {method}");
            let e = outcome.unwrap_err();
            assert_eq!(e.kind(), Some("unauthorized"), "{caller}: {method}");
            let msg = e.to_string();
            assert!(
                !msg.contains(&b_token[21..]) && !msg.contains(&admin_token[21..]),
                "{method} echoed a secret: {msg}"
            );
            if want == Code::PermissionDenied {
                assert!(msg.contains("acts for team \"teama\" only"), "{caller}: {method}: {msg}");
            }
        }
        assert_eq!(admin.status().await.unwrap().revision, revision, "{caller} changed the state");
    }
    for (caller, c, team) in [("team a on team a", &a, "teama"), ("the admin on team b", &admin, "teamb")] {
        for (method, outcome) in team_calls(c, team).await {
            assert!(
                !matches!(code(&outcome), Some(Code::PermissionDenied | Code::Unauthenticated)),
                "{caller}: {method}: {outcome:?}"
            );
        }
    }

    // A member token naming no team acts on (and reads) its own: team b's port is not there.
    let mine = a.list(pb::ListRequest::default()).await.unwrap();
    assert!(!mine.allocations.is_empty() && mine.allocations.iter().all(|x| x.team == "teama"), "{mine:?}");
    assert!(mine.allocations.iter().all(|x| x.port != b_port));
    let pools = a.list_pools(pb::ListPoolsRequest::default()).await.unwrap().pools;
    assert!(pools.iter().all(|p| p.team == "teama"), "{pools:?}");
    let all = admin.list(pb::ListRequest::default()).await.unwrap();
    assert!(all.allocations.iter().any(|x| x.port == b_port), "the admin sees every team");

    // Admin-only methods: refused for a member token, naming the right; nothing changes.
    let revision = admin.status().await.unwrap().revision;
    for (method, outcome) in admin_calls(&a).await {
        assert_eq!(code(&outcome), Some(Code::PermissionDenied), "{method}");
        let msg = outcome.unwrap_err().to_string();
        assert!(
            msg.contains("needs an admin token") && msg.contains("member of team \"teama\""),
            "{method}: {msg}"
        );
    }
    for (method, outcome) in admin_calls(&nobody).await {
        assert_eq!(code(&outcome), Some(Code::Unauthenticated), "no token: {method}");
    }
    let e = a.shutdown().await.unwrap_err();
    assert!(e.to_string().contains("needs an admin token"), "{e}");
    assert_eq!(nobody.shutdown().await.unwrap_err().kind(), Some("unauthorized"));
    assert_eq!(admin.status().await.unwrap().revision, revision);
    assert!(a.is_serving().await.unwrap(), "health answers anyone, and the node still runs");

    // A watcher with team a's token sees team a's events only.
    let mut events =
        a.watch(pb::WatchRequest { from_revision: revision, ..Default::default() }).await.unwrap();
    alloc_one(&b, "teamb", "b2").await;
    let a_rev = alloc_one(&a, "teama", "a2").await.revision;
    'seen: loop {
        let msg =
            tokio::time::timeout(Duration::from_secs(10), events.message()).await.unwrap().unwrap().unwrap();
        for e in &msg.events {
            let team = e
                .allocation
                .as_ref()
                .map(|x| x.team.as_str())
                .or(e.service.as_ref().map(|x| x.team.as_str()));
            assert_eq!(team, Some("teama"), "team a's watcher got {e:?}");
            if e.revision == a_rev {
                break 'seen;
            }
        }
    }

    // The HTTP status page: no token 401; team a sees its own team; the admin sees all.
    let http = node.http_addr.unwrap();
    let (code_none, _) = https_get(&pki, http, "/api/v1/status", None).await;
    assert_eq!(code_none, 401);
    let (code_b, body) = https_get(&pki, http, "/api/v1/status", Some(&b_token)).await;
    assert_eq!(code_b, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let teams: Vec<&str> =
        status["allocations"].as_array().unwrap().iter().map(|x| x["team"].as_str().unwrap()).collect();
    assert!(!teams.is_empty() && teams.iter().all(|t| *t == "teamb"), "{teams:?}");
    assert!(status["pools"].as_array().unwrap().iter().all(|p| p["team"] == "teamb"));
    let (_, body) = https_get(&pki, http, "/api/v1/status", Some(&admin_token)).await;
    assert!(body.contains("\"teama\"") && body.contains("\"teamb\""));
    assert_eq!(https_get(&pki, http, "/metrics", Some(&b_token)).await.0, 403);
    assert_eq!(https_get(&pki, http, "/metrics", Some(&admin_token)).await.0, 200);
    assert_eq!(https_get(&pki, http, "/healthz", None).await.0, 200, "probes need no token");

    // Revoked: refused from then on. The last admin token stays.
    let b_id = &b_token[4..20];
    admin.revoke_token(b_id).await.unwrap();
    let e = b.list(pb::ListRequest::default()).await.unwrap_err();
    assert_eq!(e.kind(), Some("unauthorized"), "{e}");
    assert!(e.to_string().contains(&format!("token {b_id} is not valid here")), "{e}");
    let admin_id = &admin_token[4..20];
    let e = admin.revoke_token(admin_id).await.unwrap_err().to_string();
    assert!(e.contains("last admin token"), "{e}");
    let listed = admin.list_tokens().await.unwrap();
    assert!(listed.iter().any(|t| t.id == admin_id && t.role == "admin"));
    assert!(listed.iter().all(|t| t.id != b_id));
    // Stopping ends the open watch with a word on where to go on (a graceful shutdown waits for
    // open streams: before, this one kept the node from stopping).
    stop(node).await;
    let ended = loop {
        match events.message().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    let e = ended.unwrap_err();
    assert!(e.message().contains("shutting down: watch again from revision"), "{e}");

    // Restarted with --auth again: the same admin token, not a new one.
    let node = auth_node(data.path(), &pki, None).await;
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), admin_token);
    let admin = client(&node, &pki, Some(&admin_token)).await;
    assert_eq!(admin.list_tokens().await.unwrap().len(), listed.len());
    stop(node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_only_with_a_join_token_and_a_single_use_token_lets_one_in() {
    let pki = Pki::new();
    // A directory per attempt: a refused start leaves its directory to the process that tried.
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let first = auth_node(dirs[0].path(), &pki, None).await;
    let admin_token = std::fs::read_to_string(dirs[0].path().join("admin.token")).unwrap();
    let admin = client(&first, &pki, Some(admin_token.trim())).await;
    let term = admin.status().await.unwrap().term;

    // Without a join token: refused, saying what it needs.
    let mut cfg = NodeConfig::new(dirs[1].path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.tls = Some(pki.node_files(&format!("node{}", pki::rand_suffix()), &loopback(), false));
    cfg.join = Some(first.grpc_addr.to_string());
    cfg.leader_timeout = Duration::from_secs(5);
    let e = start(cfg).await.unwrap_err().to_string();
    assert!(e.contains("needs a join token"), "{e}");

    // A member token is no join token either.
    let member = create(&admin, "member", "default").await;
    let e = start_joining(dirs[4].path(), &pki, &first, &member).await.unwrap_err().to_string();
    assert!(e.contains("needs a join token"), "{e}");

    // A join token no token could be: refused before anything is sent.
    let bad_dir = tempfile::tempdir().unwrap();
    let e = start_joining(bad_dir.path(), &pki, &first, "pmt_a\nb").await.unwrap_err().to_string();
    assert!(e.contains("--join-token") && e.contains("holds characters no portmesh token has"), "{e}");

    // A single-use join token: one node gets in, the next is refused.
    let join = create(&admin, "join", "").await;
    let second = start_joining(dirs[2].path(), &pki, &first, &join).await.unwrap();
    let e = start_joining(dirs[3].path(), &pki, &first, &join).await.unwrap_err().to_string();
    assert!(e.contains("is not valid here"), "{e}");
    let s = admin.status().await.unwrap();
    assert_eq!((s.members.len(), s.term), (2, term), "one node joined, and no election happened");

    // The joined node enforces tokens too.
    let on_second = client(&second, &pki, None).await;
    let e = on_second.list(pb::ListRequest { stale: true, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.kind(), Some("unauthorized"), "{e}");
    stop(second).await;
    stop(first).await;
}

async fn start_joining(
    dir: &Path,
    pki: &Pki,
    member: &RunningNode,
    token: &str,
) -> Result<RunningNode, portmesh_node::NodeError> {
    let mut cfg = NodeConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.tls = Some(pki.node_files(&format!("node{}", pki::rand_suffix()), &loopback(), false));
    cfg.join = Some(member.grpc_addr.to_string());
    cfg.join_token = Some(token.trim().to_string());
    cfg.auth = true;
    cfg.leader_timeout = Duration::from_secs(5);
    start(cfg).await
}

async fn stop(node: RunningNode) {
    node.shutdown_handle().send_replace(true);
    node.wait().await.unwrap();
}

/// `GET path` over HTTPS, trusting the test CA: status code and body.
async fn https_get(pki: &Pki, addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = pki::tls_connect(pki, addr, "localhost").await;
    let auth = token.map(|t| format!("Authorization: Bearer {}\r\n", t.trim())).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    (code, body)
}
