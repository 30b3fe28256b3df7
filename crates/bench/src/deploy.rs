//! Starting what is measured: a portmesh node or cluster, or etcd members, each in a fresh data
//! directory; their memory; a leader kill for `--failover`.

use super::*;

/// A cluster of server processes, each with its own fresh data directory.
pub(crate) struct Deployment {
    pub(crate) children: Vec<Option<Child>>,
    /// Client addresses of the members, in start order.
    pub(crate) addrs: Vec<String>,
    /// The member clients send to (the leader).
    pub(crate) leader: usize,
    /// How clients connect (TLS for `start_portmesh_tls`).
    pub(crate) options: ClientOptions,
    pub(crate) _dir: tempfile::TempDir,
}

impl Deployment {
    pub(crate) fn leader_addr(&self) -> &str {
        &self.addrs[self.leader]
    }

    /// A client of the leader, connected as this deployment's clients are.
    pub(crate) async fn leader_client(&self) -> Result<Client> {
        Ok(Client::connect_with(&[self.leader_addr()], self.options.clone()).await?)
    }

    pub(crate) fn pid(&self, i: usize) -> u32 {
        self.children[i].as_ref().map_or(0, Child::id)
    }

    pub(crate) fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
        if std::env::var_os("PORTMESH_BENCH_KEEP").is_some() {
            // Leave the logs for a look after the run (PORTMESH_BENCH_KEEP set).
            let dir = std::mem::replace(
                &mut self._dir,
                tempfile::TempDir::new().unwrap_or_else(|_| std::process::abort()),
            );
            let _ = dir.keep();
        }
    }
}

/// A process's resident memory now, in KiB; 0 if it is gone.
pub(crate) fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:")
}

/// The most resident memory a process has had so far (the kernel's high-water mark, which no
/// sampling interval misses), in KiB; 0 if it is gone.
pub(crate) fn hwm_kb(pid: u32) -> u64 {
    status_kb(pid, "VmHWM:")
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used, in ms, from `/proc/PID/stat`; 0 if it is gone.
pub(crate) fn cpu_ms(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis,
    // where utime and stime are the 12th and 13th.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) * 1000.0 / hz.max(1.0)
}

impl Deployment {
    /// CPU time used so far by all members together, in ms.
    pub(crate) fn members_cpu_ms(&self) -> f64 {
        (0..self.addrs.len()).map(|i| cpu_ms(self.pid(i))).sum()
    }
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `nodes` portmesh processes on loopback: the first bootstraps, the others join it.
pub(crate) async fn start_portmesh(bin: &Path, nodes: usize) -> Result<Deployment> {
    start_portmesh_with(bin, nodes, false, false).await
}

/// [`start_portmesh`] with TLS: a CA made here, one node certificate for loopback, mutual TLS
/// between members, clients trusting the CA. With `auth`, the nodes run with `--auth` (the
/// others join with a join token) and clients send the first admin token.
pub(crate) async fn start_portmesh_tls(bin: &Path, nodes: usize, auth: bool) -> Result<Deployment> {
    start_portmesh_with(bin, nodes, true, auth).await
}

/// Certificates for loopback nodes in `dir`: the `serve` flags, and the clients' options.
fn loopback_certificates(dir: &Path) -> Result<(Vec<String>, ClientOptions)> {
    use portmesh_tls::generate::{Authority, Spec};
    let ca = Authority::new("portmesh-bench CA")?;
    let node = ca.issue(&Spec::node(vec!["localhost".into()], vec!["127.0.0.1".parse()?]))?;
    let path = |name: &str, text: &str| -> Result<String> {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p.display().to_string())
    };
    let flags = vec![
        "--tls-cert".into(),
        path("node.pem", &node.cert_pem)?,
        "--tls-key".into(),
        path("node.key", &node.key_pem)?,
        "--tls-ca".into(),
        path("ca.pem", ca.cert_pem())?,
    ];
    let tls = portmesh_tls::ClientTls::load(&dir.join("ca.pem"), None, None)?;
    Ok((flags, ClientOptions { tls: Some(tls), token: None }))
}

async fn start_portmesh_with(bin: &Path, nodes: usize, tls: bool, auth: bool) -> Result<Deployment> {
    let dir = tempfile::tempdir()?;
    let (mut tls_flags, mut options) =
        if tls { loopback_certificates(dir.path())? } else { (Vec::new(), ClientOptions::default()) };
    if auth {
        tls_flags.push("--auth".into());
    }
    let mut join_token = None;
    if std::env::var_os("PORTMESH_BENCH_KEEP").is_some() {
        println!("(node logs and data in {})", dir.path().display());
    }
    let mut children = Vec::new();
    let mut addrs: Vec<String> = Vec::new();
    for i in 0..nodes {
        let home = dir.path().join(format!("node{i}"));
        std::fs::create_dir_all(&home)?;
        let log = std::fs::File::create(home.join("node.log"))?;
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(home.join("data"))
            .arg("--home")
            .arg(&home)
            .args(&tls_flags);
        match addrs.first() {
            None => cmd.arg("--bootstrap"),
            Some(first) => cmd.args(["--join", first]),
        };
        if let Some(t) = &join_token {
            cmd.env("PORTMESH_JOIN_TOKEN", t);
        }
        let child = cmd
            // PORTMESH_BENCH_LOG (e.g. `portmesh_api=debug`) for a look at what a node did.
            .env("PORTMESH_LOG", std::env::var("PORTMESH_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        children.push(Some(child));
        let addr = wait_for("portmesh to record its address", || {
            let home = home.clone();
            async move {
                let v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(home.join("node.json")).ok()?).ok()?;
                v["grpc"].as_str().map(str::to_string)
            }
        })
        .await?;
        if auth && i == 0 {
            // The first admin token, then a join token for the others.
            let token = std::fs::read_to_string(home.join("data").join("admin.token"))?;
            options.token = Some(token.trim().to_string());
            let c = Client::connect_with(&[addr.as_str()], options.clone()).await?;
            let uses = u32::try_from(nodes.saturating_sub(1).max(1))?;
            let req = pb::CreateTokenRequest { role: "join".into(), uses, ..Default::default() };
            join_token = Some(c.create_token(req).await?.secret);
        }
        addrs.push(addr);
    }
    let c = Client::connect_with(&[addrs[0].as_str()], options.clone()).await?;
    c.add_pool(pb::AddPoolRequest {
        team: "default".into(),
        name: "bench".into(),
        ranges: vec![pb::PortRange { start: 20000, end: 29999 }],
    })
    .await?;
    let s = c.status().await?;
    let leader_addr =
        s.members.iter().find(|m| m.id == s.leader_id).map(|m| m.addr.clone()).unwrap_or_default();
    let leader = addrs.iter().position(|a| *a == leader_addr).unwrap_or(0);
    Ok(Deployment { children: children.into_iter().collect(), addrs, leader, options, _dir: dir })
}

/// `nodes` etcd members on loopback, started together as one cluster.
pub(crate) async fn start_etcd(bin: &str, round: usize, nodes: usize) -> Result<Deployment> {
    let dir = tempfile::tempdir()?;
    let mut ports = Vec::new();
    for _ in 0..nodes {
        ports.push((free_port()?, free_port()?));
    }
    let initial: Vec<String> =
        ports.iter().enumerate().map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}")).collect();
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    for (i, (cport, pport)) in ports.iter().enumerate() {
        let client_url = format!("http://127.0.0.1:{cport}");
        let peer_url = format!("http://127.0.0.1:{pport}");
        let log = std::fs::File::create(dir.path().join(format!("etcd{i}.log")))?;
        let child = Command::new(bin)
            .args(["--name", &format!("m{i}"), "--data-dir"])
            .arg(dir.path().join(format!("data{i}")))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", &format!("portmesh-bench-{round}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {bin} (install Debian's etcd-server, or pass --etcd off)"))?;
        children.push(Some(child));
        addrs.push(format!("127.0.0.1:{cport}"));
    }
    // The member whose id is the leader's, as every member's status reports it.
    let leader = wait_for("etcd to elect a leader", || {
        let addrs = addrs.clone();
        async move {
            let mut leader_id = None;
            let mut ids = Vec::new();
            for a in &addrs {
                let ch = tonic::transport::Endpoint::from_shared(format!("http://{a}"))
                    .ok()?
                    .connect()
                    .await
                    .ok()?;
                let s = etcdpb::maintenance_client::MaintenanceClient::new(ch)
                    .status(etcdpb::StatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                if s.leader == 0 {
                    return None;
                }
                leader_id = Some(s.leader);
                ids.push(s.header?.member_id);
            }
            ids.iter().position(|id| Some(*id) == leader_id)
        }
    })
    .await?;
    Ok(Deployment { children, addrs, leader, options: ClientOptions::default(), _dir: dir })
}

/// Kills the leader of a 3-node portmesh cluster under a steady writer and measures the time
/// from the kill to the first write acknowledged after it.
pub(crate) async fn failover_once(bin: &Path, nodes: usize) -> Result<Duration> {
    let mut d = start_portmesh(bin, nodes).await?;
    let addrs = d.addrs.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let writer = tokio::spawn(async move {
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let Ok(client) = Client::connect_any(&refs).await else { return };
        for i in 0.. {
            let req = pb::AllocateRequest {
                items: vec![pb::AllocItem {
                    service: "failover".into(),
                    pool: "bench".into(),
                    key: format!("failover/{i}"),
                    ..Default::default()
                }],
                ..Default::default()
            };
            if client.allocate(req).await.is_ok() && tx.send(Instant::now()).is_err() {
                return;
            }
        }
    });
    // Let the writer get going, then kill the leader.
    rx.recv().await.context("the writer never wrote")?;
    let killed = Instant::now();
    let leader = d.leader;
    d.kill(leader);
    let first = loop {
        let t = rx.recv().await.context("the writer stopped")?;
        if t > killed {
            break t;
        }
    };
    writer.abort();
    Ok(first - killed)
}
