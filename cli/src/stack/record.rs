//! The record of a running stack: `PORTMESH_HOME/stacks/TEAM/PROJECT.ENV.INSTANCE.json`, written
//! by the `up` that supervises it and read by `down`, `ps`, `env` and a second `up`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use portmesh_project::Stack;
use serde::{Deserialize, Serialize};

/// A running stack, as its record says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StackRecord {
    pub scope: String,
    pub team: String,
    pub file: String,
    /// The `portmesh up` process supervising the stack.
    pub supervisor: u32,
    pub lease: u64,
    /// starting, up, or failed (the stack stopped on its own: `reason` says why; `ps` shows it
    /// until the next `up` or `down`).
    pub phase: String,
    pub services: Vec<ServiceRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the allocation said about ports that differ from the wanted or last ones, for a
    /// detached `up` to show in the terminal that started it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One started service of a stack.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub name: String,
    pub pid: u32,
    /// When the process started (clock ticks after boot), to tell it from a later process that
    /// got the same pid.
    #[serde(default)]
    pub since: Option<u64>,
    pub ports: Vec<(String, u16)>,
    pub started_ms: u64,
}

/// Where the record of `stack` lives.
pub fn path(stack: &Stack) -> Result<PathBuf> {
    Ok(crate::node::local::home()?.join("stacks").join(&stack.team).join(format!(
        "{}.{}.{}.json",
        stack.project,
        stack.env,
        stack.instance_name()
    )))
}

/// The record at `path`, if there is one (an unreadable one counts as none).
pub fn read(path: &Path) -> Result<Option<StackRecord>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes the record atomically, readable by its owner only.
pub fn write(path: &Path, rec: &StackRecord) -> Result<()> {
    if let Some(dir) = path.parent() {
        portmesh_probe::private::create_dir(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    portmesh_probe::private::write(path, &serde_json::to_vec_pretty(rec)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Whether `pid` is a `portmesh up` supervising a stack.
pub fn supervisor_runs(pid: u32) -> bool {
    crate::process::alive(pid)
        && portmesh_probe::command_of(pid).is_some_and(|c| c.contains("portmesh") && c.contains(" up"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_binary_is_no_supervisor() {
        assert!(!supervisor_runs(std::process::id()));
    }
}
