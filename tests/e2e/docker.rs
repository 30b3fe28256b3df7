//! Containers: the same binary in three containers on a Docker network this test creates, built
//! from `deploy/Dockerfile` (FROM scratch plus the binary and its libraries: no image is pulled),
//! with TLS and tokens on (certificates from `portmesh tls init` for the containers' addresses,
//! copied in; the first node's admin token copied out, the others joining with a join token):
//! clients and members speak TLS, members mutual TLS. One node is cut off with
//! `docker network disconnect` under load and healed; the SPEC §3 checkers then run against
//! every node's state.
//!
//! These tests need a Docker engine. They are `#[ignore]`d for a plain `cargo test`;
//! `scripts/test` runs them when an engine answers and reports them as skipped, loudly, when
//! none does.

use std::process::Command;
use std::time::Duration;

use portmesh_client::{Client, ClientOptions, pb};
use portmesh_testkit as testkit;

use crate::support::BIN;

pub(crate) fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker").args(args).output().map_err(|e| format!("docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("docker {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The image of the binary under test, built once per build of the binary.
pub(crate) fn image() -> String {
    let meta = std::fs::metadata(BIN).unwrap();
    let mtime = meta.modified().unwrap().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    // The Dockerfile is part of the image: a changed one makes another tag.
    let dockerfile = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/Dockerfile")).unwrap();
    let sum = dockerfile.iter().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(*b)));
    let tag = format!("portmesh-test:{}-{mtime}-{sum:08x}", meta.len());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/build-image");
    let out = Command::new(script).args([BIN, &tag]).output().unwrap();
    assert!(out.status.success(), "building the image: {}", String::from_utf8_lossy(&out.stderr));
    // Images of earlier builds are of no further use.
    if let Ok(tags) = docker(&["images", "portmesh-test", "--format", "{{.Repository}}:{{.Tag}}"]) {
        for old in tags.lines().filter(|t| *t != tag) {
            let _ = docker(&["rmi", old]);
        }
    }
    tag
}

/// A Docker network of this test and the containers on it; both go when it is dropped.
struct Net {
    name: String,
    /// First three octets of the network's /24.
    prefix: String,
    containers: Vec<String>,
    image: String,
    /// The CA and the node certificate for the containers' addresses (`tls init`).
    certs: tempfile::TempDir,
    /// How the test's clients connect: TLS with the CA, and the first node's admin token.
    options: ClientOptions,
    /// The join token the other nodes present (made with the admin token once node 0 serves).
    join_token: String,
}

impl Net {
    fn create(image: String) -> Net {
        let name = format!("portmesh-test-{}", std::process::id());
        let _ = docker(&["network", "rm", &name]);
        let mut last = String::new();
        for attempt in 0..40u32 {
            let octet = 30 + (std::process::id() + attempt * 7) % 200;
            let prefix = format!("172.29.{octet}");
            match docker(&["network", "create", "--subnet", &format!("{prefix}.0/24"), &name]) {
                Ok(_) => {
                    let certs = tempfile::tempdir().unwrap();
                    let mut init = Command::new(BIN);
                    init.args(["tls", "init"]).arg(certs.path());
                    for i in 0..3 {
                        init.args(["--ip", &format!("{prefix}.{}", 10 + i)]);
                    }
                    let out = init.output().unwrap();
                    assert!(out.status.success(), "tls init: {}", String::from_utf8_lossy(&out.stderr));
                    // The image's node runs as uid 65532 and `docker cp` makes root the owner:
                    // the copies must be readable by others (these keys live and die with the
                    // test's containers).
                    use std::os::unix::fs::PermissionsExt;
                    let readable = |p: &std::path::Path, mode| {
                        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
                    };
                    readable(certs.path(), 0o755);
                    for f in std::fs::read_dir(certs.path()).unwrap() {
                        readable(&f.unwrap().path(), 0o644);
                    }
                    let tls =
                        portmesh_tls::ClientTls::load(&certs.path().join("ca.pem"), None, None).unwrap();
                    let options = ClientOptions { tls: Some(tls), token: None };
                    return Net {
                        name,
                        prefix,
                        containers: Vec::new(),
                        image,
                        certs,
                        options,
                        join_token: String::new(),
                    };
                }
                Err(e) => last = e,
            }
        }
        panic!("cannot create a Docker network: {last}");
    }

    fn ip(&self, i: usize) -> String {
        format!("{}.{}", self.prefix, 10 + i)
    }

    fn addr(&self, i: usize) -> String {
        format!("{}:7400", self.ip(i))
    }

    fn container(&self, i: usize) -> String {
        format!("{}-{i}", self.name)
    }

    /// A client of node `i`, over TLS.
    async fn client(&self, i: usize) -> Result<Client, portmesh_client::ClientError> {
        Client::connect_with(&[self.addr(i).as_str()], self.options.clone()).await
    }

    /// Starts node `i` in its own container with TLS and tokens (`--auth`); node 0 bootstraps,
    /// the others join it with a join token.
    async fn start_node(&mut self, i: usize) {
        let (name, ip, advertise) = (self.container(i), self.ip(i), self.addr(i));
        let first = self.addr(0);
        let mut args = vec!["create", "--name", &name, "--hostname", &name, "--network", &self.name];
        args.extend(["--ip", &ip, &self.image]);
        args.extend(["serve", "--data", "/data", "--listen", "0.0.0.0:7400", "--http", "0.0.0.0:7401"]);
        args.extend(["--advertise", &advertise]);
        args.extend([
            "--tls-cert",
            "/certs/node.pem",
            "--tls-key",
            "/certs/node.key",
            "--tls-ca",
            "/certs/ca.pem",
            "--auth",
        ]);
        let join_token = self.join_token.clone();
        if i == 0 {
            args.push("--bootstrap");
        } else {
            args.extend(["--join", &first, "--join-token", &join_token]);
        }
        docker(&args).unwrap();
        self.containers.push(name.clone());
        // Copied in rather than mounted: the engine may not see this host's files.
        let certs = format!("{}/.", self.certs.path().display());
        docker(&["cp", &certs, &format!("{name}:/certs")]).unwrap();
        docker(&["start", &name]).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(c) = self.client(i).await
                && c.is_serving().await.unwrap_or(false)
                && (i > 0 || self.first_tokens(&name).await)
            {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let logs = docker(&["logs", "--tail", "30", &name]).unwrap_or_else(|e| e);
                panic!("container {name} did not serve within 60 s; its log:\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Once node 0 wrote and committed its admin token: the clients' token and a join token for
    /// the others. False while not yet.
    async fn first_tokens(&mut self, container: &str) -> bool {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin.token");
        if docker(&["cp", &format!("{container}:/data/admin.token"), file.to_str().unwrap()]).is_err() {
            return false;
        }
        self.options.token = Some(std::fs::read_to_string(&file).unwrap().trim().to_string());
        let Ok(c) = self.client(0).await else { return false };
        let req = pb::CreateTokenRequest { role: "join".into(), uses: 2, ..Default::default() };
        match c.create_token(req).await {
            Ok(made) => {
                self.join_token = made.secret;
                true
            }
            Err(_) => false,
        }
    }

    fn disconnect(&self, i: usize) {
        docker(&["network", "disconnect", &self.name, &self.container(i)]).unwrap();
    }

    fn connect(&self, i: usize) {
        docker(&["network", "connect", "--ip", &self.ip(i), &self.name, &self.container(i)]).unwrap();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        let _ = docker(&["network", "rm", &self.name]);
    }
}

/// The leader as the nodes `from` agree on it: its index in the network.
async fn agreed_leader(net: &Net, from: &[usize], not: Option<u64>) -> (usize, u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut seen = std::collections::BTreeSet::new();
        let mut addr = None;
        for &i in from {
            match net.client(i).await {
                Ok(c) => match c.status().await {
                    Ok(s) => {
                        seen.insert(s.leader_id);
                        addr = s.members.iter().find(|m| m.id == s.leader_id).map(|m| m.addr.clone());
                    }
                    Err(_) => {
                        seen.insert(0);
                    }
                },
                Err(_) => {
                    seen.insert(0);
                }
            }
        }
        let agreed: Vec<u64> = seen.iter().copied().collect();
        if let ([leader], Some(addr)) = (agreed.as_slice(), addr)
            && *leader != 0
            && Some(*leader) != not
            && let Some(i) = (0..3).find(|i| net.addr(*i) == addr)
        {
            return (i, *leader);
        }
        assert!(tokio::time::Instant::now() < deadline, "nodes {from:?} agree on no leader: {seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Docker engine: scripts/test runs it when one answers"]
async fn docker_a_leader_cut_off_by_network_disconnect_is_replaced_and_nothing_is_lost() {
    let mut net = Net::create(image());
    for i in 0..3 {
        net.start_node(i).await;
    }
    let addrs: Vec<String> = (0..3).map(|i| net.addr(i)).collect();
    let admin = net.client(0).await.unwrap();
    testkit::big_default_pool(&admin).await;

    let load = {
        let (addrs, options) = (addrs.clone(), net.options.clone());
        tokio::spawn(async move { testkit::load_with(&addrs, &options, 16, 20, "c").await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while admin
        .list(pb::ListRequest { stale: true, ..Default::default() })
        .await
        .map_or(0, |r| r.allocations.len())
        < 200
    {
        assert!(tokio::time::Instant::now() < deadline, "the load never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (leader, old) = agreed_leader(&net, &[0, 1, 2], None).await;
    net.disconnect(leader);
    assert!(!load.is_finished(), "the load must still run when the leader is cut off");
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let (new_leader, _) = agreed_leader(&net, &others, Some(old)).await;
    // The majority side takes writes while the old leader is cut off.
    let during = net
        .client(new_leader)
        .await
        .unwrap()
        .allocate(pb::AllocateRequest {
            items: vec![pb::AllocItem {
                service: "during".into(),
                pool: "default".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let running_at_heal = !load.is_finished();
    net.connect(leader);
    let oracle = load.await.unwrap();
    eprintln!(
        "leader container cut off under 16-client load (still running at heal: {running_at_heal}): {}",
        oracle.summary()
    );
    assert!(oracle.acked() + oracle.unknown() >= 3_000, "{}", oracle.summary());
    let views = testkit::converged_with(&addrs, &net.options, Duration::from_secs(60)).await;
    testkit::check_all(&views, &oracle);
    let port = during.allocations[0].port;
    assert!(
        views.iter().all(|v| v.list.allocations.iter().any(|a| a.port == port)),
        "the write made while cut off"
    );
}

/// A port published by a container: `up` names the container, and only `--force` stops it.
#[test]
#[ignore = "needs a Docker engine: scripts/test runs it when one answers"]
fn docker_a_port_published_by_a_container_is_named_and_only_force_stops_it() {
    use crate::support::{Home, port_is_free, project, wait_until};
    let image = image();
    let h = Home::new();
    h.pm(&["pools", "add", "t", "20700-20719"]).ok();
    let port = (20700..20720).find(|p| port_is_free(*p)).unwrap();
    let name = format!("pm-force-{}", std::process::id());
    let _ = docker(&["rm", "-f", &name]);
    let publish = format!("127.0.0.1:{port}:7400");
    let advertise = format!("127.0.0.1:{port}");
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "-p",
        &publish,
        &image,
        "serve",
        "--data",
        "/data",
        "--listen",
        "0.0.0.0:7400",
        "--advertise",
        &advertise,
        "--insecure",
        "--bootstrap",
    ])
    .unwrap();
    wait_until("the published port", Duration::from_secs(30), || !port_is_free(port));
    let dir = tempfile::tempdir().unwrap();
    let f = project(
        dir.path(),
        "project = \"boxed\"\n[services.web]\ncommand = \"python3 -m http.server {port} --bind 127.0.0.1\"\npool = \"t\"\ncheck = \"tcp\"\n",
    );
    let f = f.to_str().unwrap();
    let r = h.cmd(&["up", "-d", "-f", f]).env("WEB_PORT", port.to_string()).output().unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    let running = || docker(&["ps", "-q", "--filter", &format!("name={name}")]).unwrap();
    let outcome = || {
        assert!(!r.status.success(), "{stderr}");
        assert!(stderr.contains(&format!("container {name}")), "the container is named: {stderr}");
        assert!(!running().is_empty(), "without --force the container keeps running");
        let r = h.cmd(&["up", "-d", "--force", "-f", f]).env("WEB_PORT", port.to_string()).output().unwrap();
        assert!(r.status.success(), "{r:?}");
        assert!(String::from_utf8_lossy(&r.stderr).contains(&format!("stopping container {name}")), "{r:?}");
        assert!(running().is_empty(), "--force stopped the container");
        assert_eq!(h.stack_ports(&["-f", f])["web"], port);
        h.pm(&["down", "-f", f]).ok();
    };
    let result = std::panic::catch_unwind(outcome);
    let _ = docker(&["rm", "-f", &name]);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// `deploy/compose.yaml` run by the real `docker-compose` (Debian's 1.29 here), on the image of
/// the binary under test, on a /24 of this test's own; `down -v` when dropped.
struct Compose {
    project: String,
    net: String,
}

impl Compose {
    fn file() -> String {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/compose.yaml").to_string()
    }

    fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("docker-compose")
            .args(["-f", &Compose::file(), "-p", &self.project])
            .args(args)
            .env("PORTMESH_IMAGE", image())
            .env("PORTMESH_NET", &self.net)
            .output()
            .map_err(|e| format!("docker-compose: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!("docker-compose {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// Brings the cluster up on the first free /24 of a few tried.
    fn up() -> Compose {
        let project = format!("pmcompose{}", std::process::id());
        let mut last = String::new();
        for attempt in 0..20u32 {
            let net = format!("172.28.{}", 30 + (std::process::id() + attempt * 11) % 200);
            let c = Compose { project: project.clone(), net };
            match c.run(&["up", "-d"]) {
                Ok(_) => return c,
                Err(e) => {
                    let _ = c.run(&["down", "-v"]);
                    last = e;
                }
            }
        }
        panic!("docker-compose up failed: {last}");
    }

    fn addr(&self, i: usize) -> String {
        format!("{}.{}:7400", self.net, 11 + i)
    }

    fn container(&self, i: usize) -> String {
        self.run(&["ps", "-q", &format!("pm{}", i + 1)]).unwrap()
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self.run(&["down", "-v"]);
    }
}

/// Allocates one port through member `i`, retrying while the cluster (re)elects. Gives up after
/// 60 s with the last error and the members' latest log lines (the cluster is taken down with
/// its logs when the test ends).
async fn alloc_through(c: &Compose, i: usize, service: &str) -> u32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let last = match Client::connect(&c.addr(i)).await {
            Ok(client) => {
                let item =
                    pb::AllocItem { service: service.into(), key: service.into(), ..Default::default() };
                match client.allocate(pb::AllocateRequest { items: vec![item], ..Default::default() }).await {
                    Ok(r) => return r.allocations[0].port,
                    Err(e) => format!("allocate: {e}"),
                }
            }
            Err(e) => format!("connect: {e}"),
        };
        if tokio::time::Instant::now() >= deadline {
            let logs = c.run(&["logs", "--no-color", "--tail", "40"]).unwrap_or_else(|e| e);
            panic!(
                "no allocation through pm{} within 60 s; last error: {last}\nthe members' logs:\n{logs}",
                i + 1
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Docker engine: scripts/test runs it when one answers"]
async fn docker_compose_file_runs_a_cluster_that_survives_its_leader_stopping_and_a_down_up() {
    let c = Compose::up();
    // Through each member.
    let mut ports = Vec::new();
    for i in 0..3 {
        ports.push(alloc_through(&c, i, &format!("via{i}")).await);
    }
    // Healthy by the image's HEALTHCHECK (the compose file's), once a leader is known.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    for i in 0..3 {
        let id = c.container(i);
        while docker(&["inspect", "--format", "{{.State.Health.Status}}", &id]).unwrap() != "healthy" {
            assert!(tokio::time::Instant::now() < deadline, "pm{} never became healthy", i + 1);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // The node runs unprivileged.
    assert_eq!(docker(&["inspect", "--format", "{{.Config.User}}", &image()]).unwrap(), "65532:65532");
    let top = docker(&["top", &c.container(0), "-o", "pid,uid"]).unwrap();
    assert!(
        top.lines().skip(1).all(|l| l.split_whitespace().nth(1) == Some("65532")),
        "processes run as: {top}"
    );
    // The leader's container stopped: the others go on.
    let s = Client::connect(&c.addr(0)).await.unwrap().status().await.unwrap();
    let leader_addr = s.members.iter().find(|m| m.id == s.leader_id).unwrap().addr.clone();
    let leader = (0..3).find(|i| c.addr(*i) == leader_addr).unwrap();
    c.run(&["stop", &format!("pm{}", leader + 1)]).unwrap();
    let other = (leader + 1) % 3;
    ports.push(alloc_through(&c, other, "after-stop").await);
    c.run(&["start", &format!("pm{}", leader + 1)]).unwrap();
    let addrs: Vec<String> = (0..3).map(|i| c.addr(i)).collect();
    let views = testkit::converged_with(&addrs, &ClientOptions::default(), Duration::from_secs(60)).await;
    assert_eq!(views.len(), 3);
    // down, up: the volumes keep the data.
    c.run(&["down"]).unwrap();
    c.run(&["up", "-d"]).unwrap();
    let views = testkit::converged_with(&addrs, &ClientOptions::default(), Duration::from_secs(90)).await;
    for v in &views {
        for p in &ports {
            assert!(
                v.list.allocations.iter().any(|a| a.port == *p),
                "{} lost port {p} across down/up",
                v.addr
            );
        }
    }
}
