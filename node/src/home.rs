//! The node's home: `node.json` records where a local node listens, so a CLI finds it. Written
//! atomically (temp file + rename) once the node serves; removed at shutdown if still ours.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// File name of the address record inside the home directory.
pub const INFO_FILE: &str = "node.json";

/// Where a local node listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub grpc: String,
    pub http: Option<String>,
    pub pid: u32,
    pub node_id: u64,
    /// When the node's process started (`/proc/PID/stat`, clock ticks after boot). With `pid`
    /// it names the process that wrote this file for good, so a CLI can tell that this very
    /// node still runs without asking it (see [`NodeInfo::writer_runs`]). Absent in files
    /// written before 0.2 and where the OS does not tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<u64>,
}

impl NodeInfo {
    /// The record of this process, serving on `grpc` (and `http`) as node `node_id`.
    pub fn of_this_process(grpc: String, http: Option<String>, node_id: u64) -> NodeInfo {
        let pid = std::process::id();
        NodeInfo { grpc, http, pid, node_id, started: portmesh_probe::process::start_ticks(pid) }
    }

    /// Whether the process that wrote this record still runs: the same pid with the same start
    /// time (pids are reused, start times are not). The node writes the record once it serves
    /// and removes it when it stops, so `true` means the node was serving and has not stopped.
    /// `false` when unsure (no start time recorded), which sends callers to ask the node.
    pub fn writer_runs(&self) -> bool {
        portmesh_probe::process::still_runs(self.pid, self.started)
    }
}

pub fn write_info(home: &Path, info: &NodeInfo) -> io::Result<()> {
    portmesh_probe::private::create_dir(home)?;
    let body = serde_json::to_vec_pretty(info).map_err(io::Error::other)?;
    portmesh_probe::private::write(&home.join(INFO_FILE), &body)
}

/// The recorded node, if the file exists and parses.
pub fn read_info(home: &Path) -> Option<NodeInfo> {
    let b = std::fs::read(home.join(INFO_FILE)).ok()?;
    serde_json::from_slice(&b).ok()
}

pub(crate) fn remove_info_if_ours(home: &Path) {
    if read_info(home).is_some_and(|i| i.pid == std::process::id()) {
        let _ = std::fs::remove_file(home.join(INFO_FILE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_names_its_writer_by_pid_and_start_time() {
        let ours = NodeInfo::of_this_process("127.0.0.1:1".into(), None, 7);
        assert_eq!(ours.pid, std::process::id());
        assert!(ours.started.is_some(), "Linux tells a process's start time");
        assert!(ours.writer_runs(), "this process runs");
        // The same pid with another start time: a reused pid, not the writer.
        let reused = NodeInfo { started: ours.started.map(|t| t + 1), ..ours.clone() };
        assert!(!reused.writer_runs());
        // A record that cannot say (written before 0.2) is never trusted without asking.
        let unsure = NodeInfo { started: None, ..ours.clone() };
        assert!(!unsure.writer_runs());
        let old: NodeInfo =
            serde_json::from_str(r#"{"grpc":"127.0.0.1:1","http":null,"pid":1,"node_id":7}"#).unwrap();
        assert_eq!(old.started, None, "a file written before the field still reads");
        // A pid that has exited (reaped) is no writer.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let started = portmesh_probe::process::start_ticks(pid);
        child.wait().unwrap();
        assert!(!NodeInfo { pid, started, ..ours }.writer_runs());
    }
}
