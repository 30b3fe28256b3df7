//! A project's stack (`up`, `down`, `ps`, `env`, `config show` run it from `cmd::stack`).
//!
//! `up` loads the project file (every bad input is found before anything is allocated or
//! started), allocates every port of the stack in one atomic batch under one lease
//! ([`ports`]), starts the services in dependency order, each once what it depends on is
//! healthy, and supervises them ([`runner`]), in the foreground or in a background supervisor
//! ([`detach`]). Whatever fails, it stops what it started in reverse order and revokes the lease,
//! which releases every port and registration. A running stack is described by its record
//! ([`record`]).

pub mod detach;
pub mod docker;
pub mod ports;
pub mod record;
pub mod runner;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use portmesh_client::Client;
use portmesh_project::{Options, Resolved, Stack};

use nix::sys::signal::Signal;

use crate::args::{Cli, ProjectArgs};
use crate::{node, process};
use record::StackRecord;

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
            "no {} in {} or a parent directory: `portmesh init` writes one for this project, or pass -f FILE",
            portmesh_project::DEFAULT_FILE,
            here.display()
        )
    })
}

/// The time a whole stack may take to stop.
pub fn stop_budget(stack: &Stack) -> Duration {
    stack.services.iter().map(|s| s.stop_timeout).sum::<Duration>() + Duration::from_secs(10)
}

/// Ends the stack a record describes: its supervisor (which stops the services and
/// releases), then anything left behind, then its lease.
pub async fn stop_recorded(c: &Client, rec: &StackRecord, path: &Path, budget: Duration) -> Result<()> {
    if record::supervisor_runs(rec.supervisor) && rec.supervisor != std::process::id() {
        // A supervisor that outlives even SIGKILL is left to the checks below.
        let _ = process::terminate(rec.supervisor, budget).await;
    }
    // What a supervisor killed with SIGKILL left behind (its services got SIGTERM from the
    // kernel when it died; one that ignored it is still here).
    for s in rec.services.iter().rev() {
        if process::still_runs(s.pid, s.since) {
            process::signal_group(s.pid, Signal::SIGKILL);
        }
    }
    node::end_lease(c, &rec.team, rec.lease).await.with_context(|| format!("stopping {}", rec.scope))?;
    let _ = std::fs::remove_file(path);
    Ok(())
}
