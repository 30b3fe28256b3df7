//! `up`, `down`, `ps`, `env` and `config show`: a project's stack.
//!
//! `up` loads the project file (every bad input is found before anything is allocated or
//! started), allocates every port of the stack in one atomic batch under one lease, starts the
//! services in dependency order, each once what it depends on is healthy, and supervises them.
//! Whatever fails, it stops what it started in reverse order and revokes the lease, which
//! releases every port and registration. A running stack is described by a state file,
//! `PORTMESH_HOME/stacks/TEAM/PROJECT.ENV.INSTANCE.json`, which `down`, `ps`, `env` and a second
//! `up` read.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use portmesh_client::{Client, pb};
use portmesh_core::{HealthCheck, HealthStatus, Strategy};
use portmesh_project::{Options, Ports, Resolved, ServiceDef, Stack};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::args::{Cli, ProjectArgs, UpArgs};
use crate::commands::fmt_dur;
use crate::registry::check_pb;
use crate::supervise::{self, Output, Proc, Program, Spec};

/// How often `up` runs a starting service's check while it waits for it to become healthy.
const READY_POLL: Duration = Duration::from_millis(100);

/// A running stack, as its state file records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    scope: String,
    team: String,
    file: String,
    /// The `portmesh up` process supervising the stack.
    supervisor: u32,
    lease: u64,
    /// starting or up.
    phase: String,
    services: Vec<ServiceState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ServiceState {
    name: String,
    pid: u32,
    /// When the process started (clock ticks after boot), to tell it from a later process that
    /// got the same pid.
    #[serde(default)]
    since: Option<u64>,
    ports: Vec<(String, u16)>,
    started_ms: u64,
}

/// Loads the project the arguments name.
pub fn load(cli: &Cli, p: &ProjectArgs) -> Result<Resolved> {
    let file = match &p.file {
        Some(f) => f.clone(),
        None => find_project_file()?,
    };
    let opts = Options {
        file,
        env: p.env.clone(),
        instance: p.instance.clone(),
        team: cli.team.clone(),
        vars: std::env::vars().collect(),
    };
    Ok(portmesh_project::load(&opts)?)
}

fn find_project_file() -> Result<PathBuf> {
    let here = std::env::current_dir().context("cannot read the current directory")?;
    here.ancestors().map(|d| d.join(portmesh_project::DEFAULT_FILE)).find(|f| f.is_file()).ok_or_else(|| {
        anyhow!(
            "no {} in {} or a parent directory: write one (examples/templates/ has starters) or pass -f FILE",
            portmesh_project::DEFAULT_FILE,
            here.display()
        )
    })
}

pub fn config_show(cli: &Cli, p: &ProjectArgs) -> Result<i32> {
    let r = load(cli, p)?;
    if cli.json {
        let services: Vec<_> = r.stack.services.iter().map(|s| json!({
            "name": s.name, "command": s.command, "pool": s.pool, "strategy": format!("{:?}", s.strategy).to_lowercase(),
            "ports": s.ports.iter().map(|p| json!({"name": p.name, "wanted": p.wanted})).collect::<Vec<_>>(),
            "check": s.check.as_ref().map(ToString::to_string), "depends_on": s.depends_on, "env": s.env,
            "fd": s.fd, "ready_timeout_ms": s.ready_timeout.as_millis() as u64, "stop_timeout_ms": s.stop_timeout.as_millis() as u64,
        })).collect();
        println!(
            "{}",
            json!({"project": r.stack.project, "team": r.stack.team, "env": r.stack.env, "instance": r.stack.instance,
                   "layers": r.layers().collect::<Vec<_>>(), "services": services})
        );
    } else {
        print!("{}", r.show());
    }
    Ok(0)
}

fn state_path(stack: &Stack) -> Result<PathBuf> {
    Ok(crate::local::home()?.join("stacks").join(&stack.team).join(format!(
        "{}.{}.{}.json",
        stack.project,
        stack.env,
        stack.instance_name()
    )))
}

fn read_state(path: &Path) -> Result<Option<State>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write_state(path: &Path, st: &State) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(st)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn alive(pid: u32) -> bool {
    crate::local::process_alive(pid)
}

/// When process `pid` started, in clock ticks after boot (`/proc/PID/stat`, field 22).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces and parentheses) start with the state.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is still the process recorded for it: pids are reused, and a stale state file
/// must never make `down` signal a stranger.
fn still_runs(pid: u32, since: Option<u64>) -> bool {
    alive(pid) && since.is_some() && start_ticks(pid) == since
}

/// Whether `pid` is a `portmesh up` supervising a stack.
fn supervisor_runs(pid: u32) -> bool {
    alive(pid) && portmesh_probe::command_of(pid).is_some_and(|c| c.contains("portmesh") && c.contains(" up"))
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub async fn up(cli: &Cli, a: &UpArgs) -> Result<i32> {
    // A supervisor started by `up --detach` tells it through this pipe: "up", or why not.
    let mut report = a.report_fd.map(adopt_report_pipe).transpose()?;
    let result = up_here(cli, a, &mut report).await;
    if let (Some(mut pipe), Err(e)) = (report.take(), &result) {
        let _ = write!(pipe, "failed\n{e:#}");
    }
    result
}

/// Takes over the pipe `up --detach` passed as fd `fd`, closed on exec so the services do not
/// hold it open (the parent waits for its end).
fn adopt_report_pipe(fd: i32) -> Result<std::fs::File> {
    // SAFETY: fcntl on an fd number only reads or sets its flags; it fails with EBADF if no such
    // descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
        bail!("--report-fd {fd}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked above) and nothing else in this process owns it:
    // it was inherited for this purpose alone.
    Ok(std::fs::File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
}

async fn up_here(cli: &Cli, a: &UpArgs, report: &mut Option<std::fs::File>) -> Result<i32> {
    let stack = load(cli, &a.project)?.stack;
    let c = crate::commands::connect(cli).await?;
    let path = state_path(&stack)?;
    // A detached up does these in the foreground, where the user sees what they end.
    if !a.supervise {
        if let Some(st) = read_state(&path)? {
            if supervisor_runs(st.supervisor) {
                if !a.kill_existing {
                    bail!(
                        "{} is already up (supervised by pid {}): stop it with `portmesh down`, or pass --kill-existing",
                        st.scope,
                        st.supervisor
                    );
                }
                eprintln!("portmesh: stopping the earlier up of {} (pid {})", st.scope, st.supervisor);
            }
            stop_recorded(&c, &st, &path, stop_budget(&stack)).await?;
        }
        if a.force {
            free_wanted_ports(&c, &stack).await?;
        }
        if a.detach {
            return detach(cli, &c, a, &stack).await;
        }
    }
    let started = Instant::now();
    let (lease, ports) = allocate(&c, &stack, a.kill_existing).await?;
    let mut st = State {
        scope: stack.scope(),
        team: stack.team.clone(),
        file: stack.file.display().to_string(),
        supervisor: std::process::id(),
        lease,
        phase: "starting".into(),
        services: Vec::new(),
    };
    write_state(&path, &st)?;
    let outcome = supervise_stack(&c, &stack, lease, &ports, &mut st, &path, report, started).await;
    if let Err(e) = end_lease(&c, &stack.team, lease).await {
        eprintln!("portmesh: {e:#}; the ports come back when it runs out");
    }
    let _ = std::fs::remove_file(&path);
    outcome
}

/// Revokes `lease`, which releases its ports and registrations. A lease that is already gone
/// (it ran out, or someone revoked it) has nothing left to release: that is no error.
pub(crate) async fn end_lease(c: &Client, team: &str, lease: u64) -> Result<()> {
    match c.revoke_lease(team, lease).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == Some("not_found") => Ok(()),
        Err(e) => Err(anyhow!(e).context(format!("could not release lease {lease}"))),
    }
}

/// The time a whole stack may take to stop.
fn stop_budget(stack: &Stack) -> Duration {
    stack.services.iter().map(|s| s.stop_timeout).sum::<Duration>() + Duration::from_secs(10)
}

/// Allocates every port of the stack in one batch under a new lease.
async fn allocate(c: &Client, stack: &Stack, kill_existing: bool) -> Result<(u64, Ports)> {
    let mut slots = Vec::new();
    let mut items = Vec::new();
    for svc in &stack.services {
        for p in &svc.ports {
            slots.push((svc.name.clone(), p.name.clone()));
            items.push(pb::AllocItem {
                service: svc.name.clone(),
                pool: svc.pool.clone().unwrap_or_default(),
                port: p.wanted.map_or(0, u32::from),
                strategy: portmesh_client::strategy_to_pb(svc.strategy) as i32,
                key: stack.key(&svc.name, &p.name),
                instance: stack.instance_name().to_string(),
                env: stack.env.clone(),
            });
        }
    }
    for attempt in 0..2 {
        let req = pb::AllocateRequest {
            team: stack.team.clone(),
            items: items.clone(),
            ttl_ms: stack.lease_ttl.as_millis() as u64,
            pid: std::process::id(),
            command: format!("portmesh up {}", stack.scope()),
            ..Default::default()
        };
        let r = match c.allocate_here(req).await {
            Ok(r) => r,
            Err(e) => return Err(explain_refusal(c, stack, anyhow!(e)).await),
        };
        let held: Vec<&pb::Allocation> =
            r.allocations.iter().filter(|al| al.lease_id != r.lease_id).collect();
        if held.is_empty() {
            let mut ports = Ports::new();
            for ((svc, name), al) in slots.iter().zip(&r.allocations) {
                ports.entry(svc.clone()).or_default().push((name.clone(), al.port as u16));
            }
            for svc in &stack.services {
                let got = ports.get(&svc.name).and_then(|p| p.first()).map(|p| p.1);
                if let (Some(w), Some(g)) = (svc.ports[0].wanted, got)
                    && w != g
                {
                    eprintln!("portmesh: port {w} is not free; {} gets port {g} instead", svc.name);
                }
            }
            return Ok((r.lease_id, ports));
        }
        // Some keys are still live under another holder: give back what this attempt took.
        let _ = c.revoke_lease(&stack.team, r.lease_id).await;
        let list: Vec<String> = held
            .iter()
            .map(|al| match al.lease_id {
                0 => format!("{} -> {} (no lease)", al.key, al.port),
                l => format!("{} -> {} (lease {l})", al.key, al.port),
            })
            .collect();
        if !kill_existing || attempt > 0 {
            bail!(
                "ports of {} are still held: {}; an earlier `portmesh up` of it still runs or was killed less than {} ago: \
                 stop it with `portmesh down`, pass --kill-existing, or wait",
                stack.scope(),
                list.join(", "),
                humantime::format_duration(stack.lease_ttl)
            );
        }
        eprintln!("portmesh: taking over {}", list.join(", "));
        for al in held {
            let _ = match al.lease_id {
                0 => c
                    .release(pb::ReleaseRequest {
                        team: stack.team.clone(),
                        key: al.key.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                l => c.revoke_lease(&stack.team, l).await.map(drop),
            };
        }
    }
    bail!("internal error: allocation retried without an answer")
}

/// The ports a stack wants by number: (service, port).
fn wanted_ports(stack: &Stack) -> Vec<(&ServiceDef, u16)> {
    stack.services.iter().flat_map(|s| s.ports.iter().filter_map(move |p| p.wanted.map(|w| (s, w)))).collect()
}

/// Adds to a refused allocation who holds the ports the stack insists on.
async fn explain_refusal(c: &Client, stack: &Stack, e: anyhow::Error) -> anyhow::Error {
    let live = c
        .list(pb::ListRequest { team: String::new(), pool: String::new(), stale: true })
        .await
        .map(|r| r.allocations)
        .unwrap_or_default();
    let mut lines = vec![format!("{e:#}")];
    for (svc, port) in wanted_ports(stack) {
        if svc.strategy != Strategy::Fail {
            continue;
        }
        if let Some(al) = live.iter().find(|al| al.port == u32::from(port)) {
            let who = if al.key.is_empty() { &al.service } else { &al.key };
            let proc = crate::commands::holder(al.pid, &al.command);
            lines.push(format!(
                "port {port} wanted by {} is held by {who} (team {}, host {}{proc})",
                svc.name, al.team, al.host
            ));
        } else if let Some(holder) = local_holder(port).await {
            lines.push(format!(
                "port {port} wanted by {} is held by {holder}; `portmesh up --force` stops it",
                svc.name
            ));
        }
    }
    anyhow!(lines.join("\n  "))
}

/// Who listens on `port` on this host, for a message.
async fn local_holder(port: u16) -> Option<String> {
    let owners = tokio::task::spawn_blocking(move || portmesh_probe::owners(port)).await.ok()?;
    let o = owners.first()?;
    if let Some(container) = container_publishing(port, o).await {
        return Some(format!("container {container} (published by Docker)"));
    }
    Some(o.to_string())
}

/// The container that publishes `port`, if its holder is Docker's proxy.
async fn container_publishing(port: u16, owner: &portmesh_probe::Owner) -> Option<String> {
    if !owner.command.as_deref().is_some_and(|c| c.contains("docker-proxy")) {
        return None;
    }
    let out = tokio::process::Command::new("docker")
        .args(["ps", "--format", "{{.Names}}\t{{.Ports}}"])
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.split('\t').nth(1).is_some_and(|ports| ports.contains(&format!(":{port}->"))))
        .and_then(|l| l.split('\t').next())
        .map(str::to_string)
}

/// `--force`: ends whatever holds a port the stack wants and waits until the port is free.
async fn free_wanted_ports(c: &Client, stack: &Stack) -> Result<()> {
    let ours: Vec<String> =
        stack.services.iter().flat_map(|s| s.ports.iter().map(|p| stack.key(&s.name, &p.name))).collect();
    let live =
        c.list(pb::ListRequest { team: String::new(), pool: String::new(), stale: true }).await?.allocations;
    for (svc, port) in wanted_ports(stack) {
        if let Some(al) = live.iter().find(|al| al.port == u32::from(port) && !ours.contains(&al.key)) {
            bail!(
                "port {port} wanted by {} is allocated to {} (team {}, host {}); --force ends processes, not other \
                 holders' allocations: release it there (`portmesh release {port} --team {}`) first",
                svc.name,
                if al.key.is_empty() { &al.service } else { &al.key },
                al.team,
                al.host,
                al.team
            );
        }
        let owners = tokio::task::spawn_blocking(move || portmesh_probe::owners(port)).await?;
        if owners.is_empty() && portmesh_probe::is_free(port).unwrap_or(true) {
            continue;
        }
        for o in &owners {
            if let Some(container) = container_publishing(port, o).await {
                eprintln!("portmesh: --force: stopping container {container}, which publishes port {port}");
                let out = tokio::process::Command::new("docker").args(["stop", &container]).output().await?;
                if !out.status.success() {
                    bail!("docker stop {container} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
                }
                continue;
            }
            let Some(pid) = o.pid else {
                bail!(
                    "port {port} wanted by {} is held by a process of another user; --force cannot end it",
                    svc.name
                );
            };
            eprintln!("portmesh: --force: ending {o}, which holds port {port} wanted by {}", svc.name);
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            if crate::local::wait_exit(pid, svc.stop_timeout).await.is_err() {
                eprintln!(
                    "portmesh: --force: pid {pid} ignored SIGTERM for {:?}; sending SIGKILL",
                    svc.stop_timeout
                );
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                crate::local::wait_exit(pid, Duration::from_secs(5)).await?;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !portmesh_probe::is_free(port).unwrap_or(false) {
            if Instant::now() > deadline {
                bail!("port {port} is still in use 10 s after its holder ended");
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }
    Ok(())
}

/// Starts the services in order, waits for each to be healthy, then supervises them until one
/// ends or we are told to stop; stops them all in reverse order either way.
#[allow(clippy::too_many_arguments)]
async fn supervise_stack(
    c: &Client,
    stack: &Stack,
    lease: u64,
    ports: &Ports,
    st: &mut State,
    path: &Path,
    report: &mut Option<std::fs::File>,
    started: Instant,
) -> Result<i32> {
    let (exits_tx, mut exits) = mpsc::unbounded_channel();
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut keeper = c.keep_lease(&stack.team, lease, stack.lease_ttl);
    let width = stack.services.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let mut procs: Vec<(&ServiceDef, Proc)> = Vec::new();
    for (i, svc) in stack.services.iter().enumerate() {
        let started = stack.command(svc, ports).map_err(anyhow::Error::msg).and_then(|command| {
            let proc = start(stack, svc, &command, ports, width, i, exits_tx.clone())?;
            Ok((command, proc))
        });
        let (command, proc) = match started {
            Ok(started) => started,
            Err(e) => {
                stop_all(&procs).await;
                return Err(e.context(format!("service {} could not start", svc.name)));
            }
        };
        st.services.push(ServiceState {
            name: svc.name.clone(),
            pid: proc.pid,
            since: start_ticks(proc.pid),
            ports: ports.get(&svc.name).cloned().unwrap_or_default(),
            started_ms: now_ms(),
        });
        write_state(path, st)?;
        procs.push((svc, proc.clone()));
        // Biased: when the starting service ends, its own wait says so first (the `exits` message
        // about it is then ready too, and would give a vaguer reason).
        let ready = tokio::select! {
            biased;
            r = async {
                wait_ready(svc, &proc, ports).await?;
                register(c, stack, svc, &command, lease, ports, &proc).await
            } => r,
            Some((name, status)) = exits.recv() => Err(anyhow!(
                "service {name} {} while {} was starting", supervise::describe(status), svc.name
            )),
            _ = int.recv() => Err(anyhow!("interrupted while {} was starting", svc.name)),
            _ = term.recv() => Err(anyhow!("told to stop while {} was starting", svc.name)),
        };
        if let Err(e) = ready {
            stop_all(&procs).await;
            return Err(e.context(format!("service {} failed", svc.name)));
        }
    }
    st.phase = "up".into();
    write_state(path, st)?;
    if let Some(mut pipe) = report.take() {
        let _ = pipe.write_all(b"up\n");
    }
    println!(
        "portmesh: {} is up: {} service(s) healthy in {:.1} s",
        stack.scope(),
        procs.len(),
        started.elapsed().as_secs_f64()
    );
    for (svc, p) in &procs {
        println!("portmesh:   {:<width$}  {}  pid {}", svc.name, ports_text(ports.get(&svc.name)), p.pid);
    }

    let mut lease_ok = true;
    let outcome = loop {
        tokio::select! {
            Some((name, status)) = exits.recv() => break Err(anyhow!(
                "service {name} {}; stopping the stack", supervise::describe(status)
            )),
            _ = int.recv() => break Ok(0),
            _ = term.recv() => break Ok(0),
            lost = keeper.lost(), if lease_ok => {
                lease_ok = false;
                eprintln!("portmesh: warning: {lost}; the stack keeps running, but its ports may be handed out again");
            }
        }
    };
    stop_all(&procs).await;
    outcome
}

fn ports_text(ports: Option<&Vec<(String, u16)>>) -> String {
    ports
        .map(|ps| ps.iter().map(|(n, p)| format!("{n}={p}")).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

/// Starts one service (not waiting for it to be healthy).
fn start(
    stack: &Stack,
    svc: &ServiceDef,
    command: &str,
    ports: &Ports,
    width: usize,
    i: usize,
    exits: mpsc::UnboundedSender<(String, std::process::ExitStatus)>,
) -> Result<Proc> {
    let vars = stack.vars(svc, ports).map_err(anyhow::Error::msg)?;
    let own = ports.get(&svc.name).cloned().unwrap_or_default();
    let socket = match (svc.fd, own.first()) {
        (true, Some((name, port))) => {
            Some((supervise::bind(std::net::Ipv4Addr::LOCALHOST.into(), *port)?, name.clone()))
        }
        _ => None,
    };
    let proc = supervise::spawn(
        &svc.name,
        Spec {
            program: Program::Shell(command.to_string()),
            vars,
            dir: Some(&svc.workdir),
            socket,
            output: Output::Prefixed { label: format!("{:<width$}", svc.name), color: supervise::color(i) },
        },
        Some(exits),
    )?;
    Ok(proc)
}

/// Registers a started, healthy service under the stack's lease.
async fn register(
    c: &Client,
    stack: &Stack,
    svc: &ServiceDef,
    command: &str,
    lease: u64,
    ports: &Ports,
    proc: &Proc,
) -> Result<()> {
    let own = ports.get(&svc.name).cloned().unwrap_or_default();
    let registration = pb::Service {
        team: stack.team.clone(),
        id: stack.service_id(&svc.name),
        name: svc.name.clone(),
        project: stack.project.clone(),
        env: stack.env.clone(),
        instance: stack.instance_name().to_string(),
        ports: own
            .iter()
            .map(|(n, p)| pb::ServicePort { name: n.clone(), port: u32::from(*p), protocol: String::new() })
            .collect(),
        tags: svc.tags.clone(),
        // Two failures in a row before critical: one slow answer is not an outage.
        check: svc
            .check
            .as_ref()
            .map(|spec| check_pb(spec, &svc.check_port, Some(svc.check_interval), None, 2)),
        depends_on: svc.depends_on.clone(),
        lease_id: lease,
        pid: proc.pid,
        command: command.to_string(),
        ..Default::default()
    };
    c.register(registration).await.context("could not register it")?;
    Ok(())
}

/// Waits until `svc`'s check passes (at once if it has none), it ends, or its ready timeout.
async fn wait_ready(svc: &ServiceDef, proc: &Proc, ports: &Ports) -> Result<()> {
    let Some(spec) = &svc.check else { return Ok(()) };
    let port = ports
        .get(&svc.name)
        .and_then(|ps| ps.iter().find(|(n, _)| *n == svc.check_port))
        .map(|(_, p)| *p)
        .context("internal error: the checked port was not allocated")?;
    let check = HealthCheck {
        kind: spec.clone(),
        port: None,
        interval_ms: READY_POLL.as_millis() as u64,
        timeout_ms: svc.ready_timeout.min(Duration::from_secs(2)).as_millis() as u64,
        failures: 1,
    };
    let deadline = tokio::time::Instant::now() + svc.ready_timeout;
    let mut last = String::from("no check finished yet");
    let mut next = tokio::time::Instant::now();
    loop {
        let attempt = async {
            tokio::time::sleep_until(next).await;
            portmesh_api::check_once(&check, port).await
        };
        tokio::select! {
            biased;
            status = proc.wait() => bail!("{} before it was healthy (check {spec}: {last})", supervise::describe(status)),
            _ = tokio::time::sleep_until(deadline) => bail!(
                "not healthy within {} (check {spec} on port {port}: {last})",
                humantime::format_duration(svc.ready_timeout)
            ),
            (status, out) = attempt => {
                if matches!(status, HealthStatus::Passing | HealthStatus::Warning) {
                    return Ok(());
                }
                last = out;
                next = tokio::time::Instant::now() + READY_POLL;
            }
        }
    }
}

/// Stops every process in reverse start order.
async fn stop_all(procs: &[(&ServiceDef, Proc)]) {
    for (svc, p) in procs.iter().rev() {
        if p.exited().is_none() {
            println!("portmesh: stopping {}", svc.name);
            let status = p.stop(svc.stop_timeout).await;
            tracing::debug!(service = %svc.name, status = %supervise::describe(status), "stopped");
        }
    }
}

/// `up --detach`: starts a supervisor in the background and waits until the stack is healthy
/// (or says why not).
async fn detach(cli: &Cli, c: &Client, a: &UpArgs, stack: &Stack) -> Result<i32> {
    let path = state_path(stack)?;
    let log = path.with_extension("log");
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let out = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let exe = std::env::current_exe().context("cannot find the portmesh binary")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("up").arg("--supervise").arg("-f").arg(&stack.file).arg("--env").arg(&stack.env);
    if let Some(i) = &stack.instance {
        cmd.arg("--instance").arg(i);
    }
    if let Some(n) = &cli.node {
        cmd.arg("--node").arg(n);
    } else {
        cmd.env("PORTMESH_NODE", c.addr());
    }
    if let Some(t) = &cli.team {
        cmd.arg("--team").arg(t);
    }
    if a.kill_existing {
        cmd.arg("--kill-existing");
    }
    // The supervisor reports through a pipe: "up" once healthy, or "failed" and why; an end
    // without a word means it died.
    let (from_supervisor, to_parent) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let fd = to_parent.as_raw_fd();
    cmd.arg("--report-fd").arg(fd.to_string());
    cmd.stdin(std::process::Stdio::null()).stdout(out.try_clone()?).stderr(out);
    // SAFETY: setsid and fcntl are async-signal-safe. The supervisor leaves our session so a
    // Ctrl-C or a closed terminal does not reach it, and keeps its end of the pipe across exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() == -1 || libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the stack's supervisor")?;
    drop(to_parent);
    let said = tokio::task::spawn_blocking(move || {
        let mut said = String::new();
        std::fs::File::from(from_supervisor).read_to_string(&mut said).map(|_| said)
    })
    .await??;
    match said.split_once('\n') {
        Some(("up", _)) => {
            let st =
                read_state(&path)?.context("the supervisor said the stack is up, but left no state file")?;
            println!(
                "portmesh: {} is up (supervisor pid {}; output in {})",
                st.scope,
                st.supervisor,
                log.display()
            );
            for s in &st.services {
                println!("portmesh:   {}  {}  pid {}", s.name, ports_text(Some(&s.ports)), s.pid);
            }
            Ok(0)
        }
        Some(("failed", why)) => {
            let _ = child.wait().await;
            bail!("{why} (output in {})", log.display())
        }
        _ => {
            let status = child.wait().await?;
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
            bail!(
                "the stack's supervisor {} before the stack was up; its last output ({}):\n{}",
                supervise::describe(status),
                log.display(),
                tail.join("\n")
            )
        }
    }
}

/// Ends the stack a state file describes: its supervisor (which stops the services and
/// releases), then anything left behind, then its lease.
async fn stop_recorded(c: &Client, st: &State, path: &Path, budget: Duration) -> Result<()> {
    if supervisor_runs(st.supervisor) && st.supervisor != std::process::id() {
        let _ = kill(Pid::from_raw(st.supervisor as i32), Signal::SIGTERM);
        if crate::local::wait_exit(st.supervisor, budget).await.is_err() {
            let _ = kill(Pid::from_raw(st.supervisor as i32), Signal::SIGKILL);
        }
    }
    // What a supervisor killed with SIGKILL left behind (its services got SIGTERM from the
    // kernel when it died; one that ignored it is still here).
    for s in st.services.iter().rev() {
        if still_runs(s.pid, s.since) {
            let _ = nix::sys::signal::killpg(Pid::from_raw(s.pid as i32), Signal::SIGKILL);
        }
    }
    end_lease(c, &st.team, st.lease).await.with_context(|| format!("stopping {}", st.scope))?;
    let _ = std::fs::remove_file(path);
    Ok(())
}

pub async fn down(cli: &Cli, p: &ProjectArgs) -> Result<i32> {
    let stack = load(cli, p)?.stack;
    let path = state_path(&stack)?;
    let Some(st) = read_state(&path)? else {
        println!("{} is not up", stack.scope());
        return Ok(0);
    };
    let c = crate::commands::connect(cli).await?;
    stop_recorded(&c, &st, &path, stop_budget(&stack)).await?;
    println!("portmesh: {} is down", st.scope);
    Ok(0)
}

pub async fn ps(cli: &Cli, p: &ProjectArgs) -> Result<i32> {
    let stack = load(cli, p)?.stack;
    let st = read_state(&state_path(&stack)?)?;
    let c = crate::commands::connect(cli).await?;
    let found = c
        .discover(pb::DiscoverRequest {
            team: stack.team.clone(),
            project: stack.project.clone(),
            env: stack.env.clone(),
            include_unhealthy: true,
            ..Default::default()
        })
        .await?
        .services;
    let registered: BTreeMap<&str, &pb::Service> =
        found.iter().filter(|s| s.instance == stack.instance_name()).map(|s| (s.name.as_str(), s)).collect();
    let now = now_ms();
    let phase = st.as_ref().map_or("down", |s| s.phase.as_str());
    let rows: Vec<PsRow<'_>> = stack
        .services
        .iter()
        .map(|svc| {
            let reg = registered.get(svc.name.as_str());
            let local = st.as_ref().and_then(|st| st.services.iter().find(|s| s.name == svc.name));
            PsRow {
                name: &svc.name,
                status: reg.map_or("stopped", |r| crate::registry::health(r.status())),
                ports: match (reg, local) {
                    (Some(r), _) => r.ports.iter().map(|p| (p.name.clone(), p.port as u16)).collect(),
                    (None, Some(l)) => l.ports.clone(),
                    _ => Vec::new(),
                },
                pid: reg.map(|r| r.pid).filter(|p| *p != 0).or(local.map(|l| l.pid)),
                uptime_ms: local.map(|l| now.saturating_sub(l.started_ms)),
                output: reg.map(|r| r.output.as_str()),
            }
        })
        .collect();
    if cli.json {
        let services: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "name": r.name, "status": r.status,
                    "ports": r.ports.iter().map(|(n, p)| json!({"name": n, "port": p})).collect::<Vec<_>>(),
                    "pid": r.pid, "uptime_ms": r.uptime_ms, "output": r.output,
                })
            })
            .collect();
        println!("{}", json!({"scope": stack.scope(), "phase": phase, "services": services}));
        return Ok(0);
    }
    println!("{} ({phase})", stack.scope());
    println!("{:<16} {:<9} {:<24} {:<8} UPTIME", "SERVICE", "STATUS", "PORTS", "PID");
    for r in rows {
        println!(
            "{:<16} {:<9} {:<24} {:<8} {}",
            r.name,
            r.status,
            ports_text(Some(&r.ports)),
            r.pid.map_or("-".to_string(), |p| p.to_string()),
            r.uptime_ms.map_or("-".to_string(), |ms| fmt_dur(Duration::from_secs(ms / 1000)))
        );
    }
    Ok(0)
}

/// One service of `ps`.
#[derive(Debug)]
struct PsRow<'a> {
    name: &'a str,
    status: &'static str,
    ports: Vec<(String, u16)>,
    pid: Option<u32>,
    uptime_ms: Option<u64>,
    output: Option<&'a str>,
}

pub async fn env(cli: &Cli, p: &ProjectArgs) -> Result<i32> {
    let stack = load(cli, p)?.stack;
    let c = crate::commands::connect(cli).await?;
    let live =
        c.list(pb::ListRequest { team: stack.team.clone(), pool: String::new(), stale: false }).await?;
    let mut ports = Ports::new();
    for svc in &stack.services {
        for port in &svc.ports {
            let key = stack.key(&svc.name, &port.name);
            if let Some(al) = live.allocations.iter().find(|al| al.key == key) {
                ports.entry(svc.name.clone()).or_default().push((port.name.clone(), al.port as u16));
            }
        }
    }
    if ports.len() != stack.services.len() {
        bail!("{} is not up, so its ports are not known: start it with `portmesh up` first", stack.scope());
    }
    let mut vars: BTreeMap<String, String> = stack.port_vars(&ports).into_iter().collect();
    for svc in &stack.services {
        vars.extend(stack.service_env(svc, &ports).map_err(anyhow::Error::msg)?);
    }
    if cli.json {
        println!("{}", json!(vars));
    } else {
        for (k, v) in vars {
            println!("export {k}='{}'", v.replace('\'', "'\\''"));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_process_is_recognised_by_its_start_time() {
        let me = std::process::id();
        let since = start_ticks(me);
        assert!(since.is_some());
        assert!(still_runs(me, since));
        assert!(!still_runs(me, since.map(|s| s + 1)), "same pid, another start: a stranger");
        assert!(!still_runs(me, None), "unknown start: never signalled");
        assert!(!supervisor_runs(me), "a test binary is no supervisor");
    }
}
