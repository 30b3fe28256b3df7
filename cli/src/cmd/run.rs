//! `portmesh run -- CMD…`: one server on ports held under a lease for as long as it runs.

use std::path::Path;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use portmesh_client::{Client, pb};
use portmesh_project::template::{self, Ref};
use tokio::signal::unix::{SignalKind, signal};

use crate::args::RunArgs;
use crate::node;
use crate::process::{
    self,
    spawn::{self, Output, Program, Spec},
};
use crate::requests::{alloc_items, check_pb, default_key};

/// Concurrent runs of one project's service that each get a sticky slot of their own.
const MAX_SLOTS: u32 = 32;

pub async fn run(c: &Client, team: &str, a: &RunArgs) -> Result<i32> {
    let service = match &a.service {
        Some(s) => s.clone(),
        None => Path::new(&a.command[0])
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "app".into()),
    };
    let names: Vec<String> = if a.ports.is_empty() { vec!["main".into()] } else { a.ports.clone() };
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            bail!("--ports: port name {name:?}: use letters, digits, '-' and '_'");
        }
        if names[..i].contains(name) {
            bail!("--ports: port name {name:?} appears twice");
        }
    }
    if !a.fd && a.command.iter().any(|arg| arg.contains("fd://")) {
        bail!(
            "the command binds a socket portmesh hands over (fd://), but --fd is not given: add --fd \
             (`portmesh run --fd -- gunicorn --bind fd://3 …`), or let the server bind {{port}} itself"
        );
    }
    crate::requests::check_wanted(&a.want)?;
    let command_line = a.command.join(" ");
    // The service is registered in the allocation's own step (one replicated write, not two),
    // under this process (it lives as long as the command, like the allocations' holder).
    let registration = pb::Service {
        name: service.clone(),
        project: a.project.clone().unwrap_or_default(),
        env: a.want.env.clone().unwrap_or_default(),
        instance: a.want.instance.clone().unwrap_or_default(),
        ports: names.iter().map(|n| pb::ServicePort { name: n.clone(), ..Default::default() }).collect(),
        tags: a.tags.clone(),
        check: a.check.as_ref().map(|spec| check_pb(spec, "", None, None, 1)),
        pid: std::process::id(),
        command: command_line.clone(),
        ..Default::default()
    };
    // Sticky unless told otherwise: the project's service gets its port back next time. A
    // second run of it at the same time (another terminal, a parallel CI job) must not share
    // the port the first one holds: it takes the next slot, PROJECT/SERVICE#2, and so on.
    let base = a.want.key.is_none().then(|| default_key(&service));
    let mut slot = 1;
    let r = loop {
        let mut want = a.want.clone();
        if let Some(base) = &base {
            want.key = Some(if slot == 1 { base.clone() } else { format!("{base}#{slot}") });
        }
        let r = c
            .allocate_here(pb::AllocateRequest {
                team: team.to_string(),
                items: alloc_items(&service, &want, &names),
                ttl_ms: a.ttl.as_millis() as u64,
                pid: std::process::id(),
                command: command_line.clone(),
                register: Some(registration.clone()),
                ..Default::default()
            })
            .await?;
        let ours = r.allocations.iter().all(|al| al.lease_id == r.lease_id);
        if ours || base.is_none() {
            break r;
        }
        node::end_lease(c, team, r.lease_id).await?;
        if slot == MAX_SLOTS {
            bail!(
                "{MAX_SLOTS} runs of {} hold their ports at once: give this one a key of its own (--key)",
                base.as_deref().unwrap_or_default()
            );
        }
        slot += 1;
    };
    let lease = r.lease_id;
    // Whatever happens from here, the lease is ended below.
    let ended = async {
        register_unless_done(c, &r, registration).await?;
        for line in crate::stack::ports::moves(c, &r).await {
            eprintln!("portmesh: {line}");
        }
        let ports: Vec<(String, u16)> =
            names.iter().cloned().zip(r.allocations.iter().map(|al| al.port as u16)).collect();
        if let (Some(wanted), Some((_, got))) = (a.want.port, ports.first())
            && wanted != *got
        {
            eprintln!("portmesh: port {wanted} is not free; {service} gets port {got} instead");
        } else if let Some((_, got)) = ports.first() {
            eprintln!("portmesh: {service} runs on port {got}");
        }
        supervise_one(c, team, a, &service, lease, &ports).await
    }
    .await;
    if let Err(e) = node::end_lease(c, team, lease).await {
        eprintln!("portmesh: {e:#}; its ports come back when it runs out");
    }
    ended
}

/// Registers `registration` on the allocation `r` when the node did not already (a node older
/// than registrations inside allocations ignores the field): the same entry, one write later.
async fn register_unless_done(
    c: &Client,
    r: &pb::AllocateResponse,
    mut registration: pb::Service,
) -> Result<()> {
    if r.registered.is_some() {
        return Ok(());
    }
    for (p, al) in registration.ports.iter_mut().zip(&r.allocations) {
        p.port = al.port;
    }
    registration.team = r.allocations.first().map(|al| al.team.clone()).unwrap_or_default();
    registration.lease_id = r.lease_id;
    c.register(pb::RegisterRequest { service: Some(registration) })
        .await
        .with_context(|| "could not register the service")?;
    Ok(())
}

/// Runs the command on its ports, keeping the lease alive, until it exits; its exit code.
async fn supervise_one(
    c: &Client,
    team: &str,
    a: &RunArgs,
    service: &str,
    lease: u64,
    ports: &[(String, u16)],
) -> Result<i32> {
    let main_port = ports[0].1;
    let mut keeper = c.keep_lease(team, lease, a.ttl);
    let socket = match a.fd {
        true => Some((spawn::bind(a.bind, main_port)?, ports[0].0.clone())),
        false => None,
    };
    let mut args = Vec::with_capacity(a.command.len());
    for arg in &a.command {
        args.push(fill(arg, service, ports).with_context(|| format!("argument {arg:?}"))?);
    }
    let var = portmesh_project::var_name(service);
    let mut vars = portmesh_project::main_port_vars(main_port);
    vars.extend([
        (format!("{var}_PORT"), main_port.to_string()),
        ("PORTMESH_LEASE".to_string(), lease.to_string()),
        ("PORTMESH_SERVICE".to_string(), service.to_string()),
    ]);
    for (name, port) in ports {
        let n = portmesh_project::var_name(name);
        vars.push((format!("PORT_{n}"), port.to_string()));
        vars.push((format!("{var}_PORT_{n}"), port.to_string()));
    }
    // Signals are ours from before the command starts, so none is lost in between.
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let proc = spawn::spawn(
        service,
        Spec { program: Program::Argv(args), vars, dir: None, socket, output: Output::Inherit },
        None,
    )?;
    let mut lease_ok = true;
    let status = loop {
        tokio::select! {
            status = proc.wait() => break status,
            _ = int.recv() => proc.signal(Signal::SIGINT),
            _ = term.recv() => proc.signal(Signal::SIGTERM),
            _ = hup.recv() => proc.signal(Signal::SIGHUP),
            lost = keeper.lost(), if lease_ok => {
                lease_ok = false;
                eprintln!("portmesh: warning: {lost}; {service} keeps running, but port {main_port} may be handed out again");
            }
        }
    };
    Ok(process::exit_code(status))
}

/// `{port}`, `{port.NAME}`, `{SERVICE.port…}` (this service's), `{host}` and `{service}`.
fn fill(text: &str, service: &str, ports: &[(String, u16)]) -> Result<String> {
    let filled = template::render(text, |r| match r {
        Ref::Port { service: Some(s), .. } if *s != service => Err(format!(
            "{{{s}.port}}: run knows only its own service's ports ({service}); use `portmesh up` for a stack"
        )),
        Ref::Port { name, .. } => {
            let port = match name {
                None => ports.first(),
                Some(n) => ports.iter().find(|(pn, _)| pn == n),
            };
            port.map(|(_, p)| p.to_string()).ok_or_else(|| {
                let names: Vec<&str> = ports.iter().map(|(n, _)| n.as_str()).collect();
                format!(
                    "no port named {:?}: the ports are {} (see --ports)",
                    name.unwrap_or(""),
                    names.join(", ")
                )
            })
        }
        Ref::Word("host") => Ok("127.0.0.1".into()),
        Ref::Word("service") => Ok(service.to_string()),
        Ref::Word(w) => Err(format!("{{{w}}} is known only in project files")),
    });
    filled.map_err(anyhow::Error::msg)
}
