//! The embedded default: find this machine's local node, or start one in the background.
//!
//! The node records its address in `HOME/node.json` (HOME is `PORTMESH_HOME`, else the user data
//! directory), so different homes never clash. Starting is serialised by an exclusive `flock` on
//! `HOME/start.lock`: of many CLIs racing on a fresh home, one starts the node and the others
//! find it when they get the lock. The node's own exclusive lock on its data directory backs
//! this up.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use portmesh_client::{Client, ClientOptions};
use portmesh_node::{NodeInfo, read_info};

/// How long a freshly started node may take to serve.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between looks at a starting node.
const POLL: Duration = Duration::from_millis(20);

/// The local node's home directory.
pub fn home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("PORTMESH_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    let base = dirs::data_dir().context("cannot find the user data directory: set PORTMESH_HOME")?;
    Ok(base.join("portmesh"))
}

/// A client of the local node `info` records: plaintext on loopback, or, once the node joined a
/// TLS cluster, TLS to its advertised address with the node's own certificate (whoever can read
/// its key is that member already) and `token`, which then narrows what the calls may do.
async fn client_of(home: &Path, info: &NodeInfo, token: Option<&str>) -> Result<Client> {
    let Some(Launch { advertise, tls: Some(tls), .. }) = read_launch(home)? else {
        return Ok(Client::connect(&info.grpc).await?);
    };
    let options = ClientOptions {
        tls: Some(portmesh_tls::ClientTls::load(&tls.ca, Some(&tls.cert), Some(&tls.key))?),
        token: token.map(str::to_string),
    };
    let addr = advertise.as_deref().unwrap_or(&info.grpc);
    Ok(Client::connect_with(&[addr], options).await?)
}

/// A client of the recorded local node, if it still runs and takes a connection, or else answers
/// as healthy.
///
/// The node writes `node.json` once it serves and removes it when it stops, so when the process
/// that wrote it still runs (same pid and start time) a connection is enough: asking its health
/// first would cost every one-shot command a round trip (~0.3 ms of the ~3.5 ms an `alloc`
/// takes; docs/benchmarks.md). A record that cannot say so (written before 0.2) is checked as
/// before. A node that runs but has lost its cluster answers the command itself with why.
async fn try_recorded(home: &Path, token: Option<&str>) -> Option<Client> {
    let info = read_info(home)?;
    let client = client_of(home, &info, token).await.ok()?;
    if info.writer_runs() {
        return Some(client);
    }
    client.is_serving().await.ok()?.then_some(client)
}

/// File in the home that records how the local node listens once it joined a team cluster.
const LAUNCH_FILE: &str = "launch.json";

/// How the local node is started when it is a member of a team cluster (`portmesh join`):
/// reachable by the other members on `listen`, announced to them as `advertise`, over TLS with
/// `tls` when the cluster uses it. Without this file the local node is a single-node cluster on
/// loopback.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Launch {
    pub listen: String,
    pub advertise: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<LaunchTls>,
}

/// The local node's certificate files (absolute paths, read where they are: renewing them in
/// place needs no restart): a node certificate of the cluster's CA, its key, and the CA.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LaunchTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

pub fn read_launch(home: &Path) -> Result<Option<Launch>> {
    let path = home.join(LAUNCH_FILE);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!("{} is not a valid launch record: fix or remove it", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

pub fn write_launch(home: &Path, launch: Option<&Launch>) -> Result<()> {
    let path = home.join(LAUNCH_FILE);
    match launch {
        Some(l) => portmesh_probe::private::write(&path, &serde_json::to_vec_pretty(l)?)
            .with_context(|| format!("cannot write {}", path.display())),
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", path.display()))
            }
            _ => Ok(()),
        },
    }
}

/// Moves the local node's data directory aside (kept, not deleted) as `data.<why>-<unix time>`.
/// Returns where it went, or `None` if there was none.
pub fn move_data_aside(home: &Path, why: &str) -> Result<Option<PathBuf>> {
    let data = home.join("data");
    if !data.exists() {
        return Ok(None);
    }
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let to = home.join(format!("data.{why}-{secs}"));
    std::fs::rename(&data, &to)
        .with_context(|| format!("cannot move {} to {}", data.display(), to.display()))?;
    Ok(Some(to))
}

/// Starts the local node as a new member of the cluster at `cluster` (its data directory must
/// be empty), presenting `join_token` if the cluster asks for one, and waits until it serves.
pub async fn start_joining(cluster: &str, join_token: Option<&str>) -> Result<Client> {
    start(&home()?, Some(Joining { cluster, token: join_token }), None).await
}

/// A client of the local node if it runs and answers (`token` as in [`connect_or_start`]).
pub async fn running(token: Option<&str>) -> Result<Option<Client>> {
    Ok(try_recorded(&home()?, token).await)
}

/// Connects to the local node, starting it if none answers. `token` is sent only when the
/// local node is a member of a TLS cluster (one with tokens may ask for it).
pub async fn connect_or_start(token: Option<&str>) -> Result<Client> {
    let home = home()?;
    if let Some(c) = try_recorded(&home, token).await {
        return Ok(c);
    }
    portmesh_probe::private::create_dir(&home)
        .with_context(|| format!("cannot create portmesh home {}", home.display()))?;
    let lock_path = home.join("start.lock");
    let lock = File::create(&lock_path).with_context(|| format!("cannot create {}", lock_path.display()))?;
    let lock = tokio::task::spawn_blocking(move || {
        nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e)
    })
    .await?
    .with_context(|| format!("cannot lock {}", lock_path.display()))?;
    // Another CLI may have started it while we waited for the lock.
    if let Some(c) = try_recorded(&home, token).await {
        return Ok(c);
    }
    let client = start(&home, None, token).await;
    drop(lock);
    client
}

/// File in the home that remembers where the single-node local node listened last (its gRPC
/// and HTTP addresses), so a restarted node keeps them: the membership names the gRPC address,
/// and people bookmark the dashboard.
const LAST_FILE: &str = "local.json";

/// Where the local node listened last.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct LastAddrs {
    grpc: String,
    http: Option<String>,
}

/// The remembered addresses, if both ports are free now.
fn last_addrs(home: &Path) -> Option<LastAddrs> {
    let last: LastAddrs = serde_json::from_slice(&std::fs::read(home.join(LAST_FILE)).ok()?).ok()?;
    let free = |addr: &str| {
        addr.parse::<std::net::SocketAddr>().is_ok_and(|a| portmesh_probe::is_free(a.port()).unwrap_or(false))
    };
    (free(&last.grpc) && last.http.as_deref().is_none_or(free)).then_some(last)
}

/// The cluster a starting local node joins, and the join token it presents.
#[derive(Clone, Copy)]
struct Joining<'a> {
    cluster: &'a str,
    token: Option<&'a str>,
}

/// Starts `portmesh serve` detached, waits until it records its address and serves. With a
/// launch record the node listens where it says (a member of a team cluster, joining `join` if
/// given); without one it is a single-node cluster on loopback, on the addresses it had last
/// time when they are free (else on new ones, remembered for the next start).
async fn start(home: &Path, join: Option<Joining<'_>>, token: Option<&str>) -> Result<Client> {
    if let Some(l) = read_launch(home)? {
        let mut args = vec!["--listen".to_string(), l.listen.clone()];
        if let Some(a) = &l.advertise {
            args.extend(["--advertise".to_string(), a.clone()]);
        }
        if let Some(tls) = &l.tls {
            for (flag, path) in [("--tls-cert", &tls.cert), ("--tls-key", &tls.key), ("--tls-ca", &tls.ca)] {
                args.extend([flag.to_string(), path.display().to_string()]);
            }
        }
        if let Some(j) = join {
            args.extend(["--join".to_string(), j.cluster.to_string()]);
        }
        let join_token = join.and_then(|j| j.token);
        return spawn_node(home, &args, "127.0.0.1:0", join_token, token).await;
    }
    let bootstrap = |grpc: &str| vec!["--listen".to_string(), grpc.to_string(), "--bootstrap".to_string()];
    if let Some(last) = last_addrs(home) {
        let http = last.http.as_deref().unwrap_or("127.0.0.1:0");
        match spawn_node(home, &bootstrap(&last.grpc), http, None, None).await {
            Ok(c) => return Ok(c),
            // A port was taken between the look and the bind: start on new ones.
            Err(e) => tracing::debug!(error = %e, "the local node could not start on its last addresses"),
        }
    }
    let client = spawn_node(home, &bootstrap("127.0.0.1:0"), "127.0.0.1:0", None, None).await?;
    if let Some(info) = read_info(home) {
        let last = LastAddrs { grpc: info.grpc, http: info.http };
        portmesh_probe::private::write(&home.join(LAST_FILE), &serde_json::to_vec_pretty(&last)?)
            .with_context(|| format!("cannot write {}", home.join(LAST_FILE).display()))?;
    }
    Ok(client)
}

/// Spawns `portmesh serve` with `args` (listen, bootstrap or join) and waits until it serves.
/// A join token goes to the node through its environment, never its arguments (`ps` shows
/// those); `token` is what the CLI then calls it with.
async fn spawn_node(
    home: &Path,
    args: &[String],
    http: &str,
    join_token: Option<&str>,
    token: Option<&str>,
) -> Result<Client> {
    let exe = std::env::current_exe().context("cannot find the portmesh executable")?;
    let log_path = home.join("node.log");
    let log = portmesh_probe::private::append(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(exe);
    // The local node is configured by its arguments alone: `PORTMESH_*` settings in the
    // environment are for this CLI or for talking to a team cluster (`--node`: certificates,
    // tokens), and a `serve` setting there (PORTMESH_JOIN, PORTMESH_SEEDS, ...) would change or
    // break the local node. Once it joined a TLS cluster, its certificates come from the launch
    // record (passed as arguments above). Only the log filter is kept.
    for (var, _) in std::env::vars_os() {
        if var.to_str().is_some_and(|v| v.starts_with("PORTMESH_") && v != "PORTMESH_LOG") {
            cmd.env_remove(var);
        }
    }
    cmd.arg("serve").arg("--data").arg(home.join("data")).args(["--http", http, "--home"]).arg(home);
    cmd.args(args);
    if let Some(t) = join_token {
        cmd.env("PORTMESH_JOIN_TOKEN", t);
    }
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // A session of its own: the node outlives this CLI and its terminal's Ctrl-C.
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    let mut child = cmd.spawn().context("cannot start the local portmesh node")?;
    let pid = child.id();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(info) = read_info(home).filter(|i| i.pid == pid)
            && let Ok(c) = client_of(home, &info, token).await
            && c.is_serving().await.unwrap_or(false)
        {
            // Reap the child in the background if it ever exits while we still run.
            std::thread::spawn(move || child.wait());
            return Ok(c);
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the local portmesh node exited at start ({status}); its log {} ends with:\n{}",
                log_path.display(),
                tail(&log_path)
            );
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "the local portmesh node (pid {pid}) did not serve within {START_TIMEOUT:?}; see {}",
                log_path.display()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Stops the recorded local node and waits for its process to end.
pub async fn stop_local() -> Result<Option<u32>> {
    let home = home()?;
    let Some(info) = read_info(&home) else { return Ok(None) };
    match client_of(&home, &info, None).await {
        Ok(c) => c.shutdown().await?,
        Err(_) => {
            // Recorded but not answering: a stale record of a node that died.
            let _ = std::fs::remove_file(home.join("node.json"));
            return Ok(None);
        }
    }
    crate::process::wait_exit(info.pid, Duration::from_secs(30)).await?;
    Ok(Some(info.pid))
}
