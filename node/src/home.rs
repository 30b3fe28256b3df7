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
