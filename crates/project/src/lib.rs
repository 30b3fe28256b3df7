//! Project files: `portmesh.toml` declares a stack of services; this crate reads it through its
//! layers, checks it, and answers what to allocate, in which order to start, and with which
//! command and variables.
//!
//! Layers, lowest first (a higher one overrides what a lower one says, key by key; see
//! [`load`]): built-in defaults (per environment), the files named by `extends` (each resolved
//! the same way, relative to the file that names it), the file itself, its `[env.<name>]`
//! section, its `[instances.<name>]` section, environment variables (`PORTMESH_*`,
//! `<SERVICE>_PORT`), command-line flags. Merging is figment's; which layer gave each value is
//! kept for `portmesh config show`.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

mod layers;
mod model;
mod stack;
pub mod template;

pub use layers::{Options, Resolved, load, where_set};
pub use model::{Dur, Extends, ServiceSettings, Settings, builtin};
pub use stack::{PortDef, Ports, ServiceDef, Stack, main_port_vars};

/// The name of a project file when none is given.
pub const DEFAULT_FILE: &str = "portmesh.toml";

/// Why a project file cannot be used. Every message names the file and the key, and says what
/// to do.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error("{path}: cannot read it: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: malformed TOML: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl ProjectError {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        ProjectError::Invalid(msg.into())
    }
}

/// The name among `candidates` closest to `word`, if close enough to be a likely typo.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1) + 1)
        .min()
        .map(|(_, c)| c)
}

/// Edits (insert, delete, substitute, swap two neighbours) that turn `a` into `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

/// `flask-api` → `FLASK_API`: a service name as it appears in variable names.
pub fn var_name(service: &str) -> String {
    service.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_finds_typos_and_ignores_strangers() {
        let keys = ["command", "pool", "port", "ports", "depends_on"];
        assert_eq!(nearest("comand", keys), Some("command"));
        assert_eq!(nearest("depends-on", keys), Some("depends_on"));
        assert_eq!(nearest("prot", keys), Some("port"));
        assert_eq!(nearest("zzzzzzzz", keys), None);
        assert_eq!(var_name("flask-api.v2"), "FLASK_API_V2");
    }
}
