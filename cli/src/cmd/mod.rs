//! The commands: one dispatch, and one module per command or small family of commands.
//!
//! Each command takes its parsed arguments (`crate::args`), talks to a node through
//! `crate::node` when it needs one, prints through `crate::render` (plain text for people,
//! `--json` for programs), and returns the exit code it wants; errors go to `main`, which prints
//! them to stderr and exits non-zero.
//!
//! Where a new command goes: its arguments in `args.rs`, an arm here, its body in the module
//! of its family (or a new one), shared rendering in `render.rs`.

mod cluster;
mod events;
mod init;
mod observe;
mod pools;
mod ports;
mod registry;
mod run;
mod serve;
mod stack;
mod tls;
mod tokens;

use anyhow::Result;
use portmesh_client::pb;

use crate::args::{Cli, Command, ConfigCommand, TlsCommand};
use crate::node;

/// What a command wants the process to exit with, when it succeeded but has news.
pub type ExitCode = i32;

/// Runs the command `cli` names.
pub async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let team = cli.team();
    let json = cli.json;
    // Every team's view, or only `--team`'s: the empty team asks for all.
    let scope = |all_teams: bool| if all_teams { "" } else { team };
    let ok = |r: Result<()>| r.map(|()| 0);
    match &cli.command {
        // Commands that need no node, or manage the node themselves.
        Command::Serve(a) => ok(serve::serve(&cli, a).await),
        Command::Check { ports } => {
            // Who in portmesh holds them: the node named, else the local node if one runs (a
            // check starts none).
            let holders = match &cli.node {
                Some(addr) => Some(node::connect_to(&cli, addr).await?),
                None => node::local::running(node::token(&cli)?.as_deref()).await?,
            };
            ports::check(holders.as_ref(), ports, json).await
        }
        Command::Completions { shell } => {
            // Generated into memory: clap_complete panics on a failed write (a closed pipe).
            let mut cmd = <crate::args::Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "portmesh", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(0),
            }
        }
        Command::Stop => ok(cluster::stop(&cli).await),
        Command::Join { addr, listen, advertise, join_token } => {
            ok(cluster::join(&cli, addr, *listen, advertise.clone(), join_token.as_deref()).await)
        }
        Command::Leave { id } => ok(cluster::leave(&cli, *id).await),
        Command::Config(ConfigCommand::Show(p)) => stack::config_show(&cli, p),
        Command::Init { force } => ok(init::init(*force, json)),
        Command::Up(a) => stack::up(&cli, a).await,
        Command::Down(p) => stack::down(&cli, p).await,
        Command::Ps(p) => stack::ps(&cli, p).await,
        Command::Env(p) => stack::env(&cli, p).await,
        Command::Doctor => observe::doctor(&cli).await,
        Command::Tls(TlsCommand::Init { dir, hosts, ips, name, valid_for }) => {
            ok(tls::init(dir, hosts, ips, name, *valid_for, json))
        }
        Command::Token(crate::args::TokenCommand::Mint) => ok(tokens::mint(json)),
        // Commands that talk to one node.
        Command::Token(t) => ok(tokens::token(&node::connect(&cli).await?, team, t, json).await),
        Command::Run(a) => run::run(&node::connect(&cli).await?, team, a).await,
        Command::Alloc(a) => ok(ports::alloc(&node::connect(&cli).await?, team, a, json).await),
        Command::Release(r) => ok(ports::release(&node::connect(&cli).await?, team, r, json).await),
        Command::Renew { lease, keep: false } => {
            ok(ports::renew(&node::connect(&cli).await?, team, *lease, json).await)
        }
        Command::Renew { lease, keep: true } => ports::keep(&node::connect(&cli).await?, team, *lease).await,
        Command::Ls { pool, all_teams, stale } => {
            let req = pb::ListRequest {
                team: scope(*all_teams).to_string(),
                pool: pool.clone().unwrap_or_default(),
                stale: *stale,
                ..Default::default()
            };
            ok(ports::ls(&node::connect(&cli).await?, req, json).await)
        }
        Command::Reserve { port, reason } => {
            ok(ports::reserve(&node::connect(&cli).await?, *port, reason, json).await)
        }
        Command::Unreserve { port } => ok(ports::unreserve(&node::connect(&cli).await?, *port, json).await),
        Command::Pools(p) => ok(pools::pools(&node::connect(&cli).await?, team, p, json).await),
        Command::Status => ok(cluster::status(&node::connect(&cli).await?, json).await),
        Command::Health { service } => cluster::health(&node::connect(&cli).await?, service, json).await,
        Command::Log { follow, all_teams } => {
            ok(events::log(&node::connect(&cli).await?, scope(*all_teams), *follow, json).await)
        }
        Command::Watch { from, pool, service, all_teams } => {
            let req = pb::WatchRequest {
                from_revision: from.unwrap_or(0),
                team: scope(*all_teams).to_string(),
                pool: pool.clone().unwrap_or_default(),
                service: service.clone().unwrap_or_default(),
                progress_interval_ms: 0,
            };
            ok(events::watch(&node::connect(&cli).await?, req, json).await)
        }
        Command::Stats { all_teams } => {
            ok(observe::stats(&node::connect(&cli).await?, scope(*all_teams), json).await)
        }
        Command::Register(r) => ok(registry::register(&node::connect(&cli).await?, team, r, json).await),
        Command::Deregister { id } => {
            ok(registry::deregister(&node::connect(&cli).await?, team, id, json).await)
        }
        Command::Discover { name, project, env, tags, all, all_teams, stale } => {
            let req = pb::DiscoverRequest {
                team: scope(*all_teams).to_string(),
                name: name.clone().unwrap_or_default(),
                project: project.clone().unwrap_or_default(),
                env: env.clone().unwrap_or_default(),
                tags: tags.clone(),
                include_unhealthy: *all,
                stale: *stale,
            };
            ok(registry::discover(&node::connect(&cli).await?, req, json).await)
        }
    }
}
