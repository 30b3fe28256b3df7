//! The request boundary: one conversion per wire message, split by area.
//!
//! Input is validated here and only here: each request converts with `TryFrom<&pb::XRequest>`
//! into what the node acts on (usually a [`core::Command`]), applying the defaults of empty
//! fields on the way (team, pool, check interval); a bad field becomes a [`BadRequest`] that
//! names it. Where the receiving node supplies a default (its host), the request converts as
//! [`AtHost`]. Replies convert with `From<&core::X>` (or from a tuple, where the
//! reply needs more than one value). Enums are read from their wire integer by the `*_from_pb`
//! functions, since an unknown value is an error; the other way is `From`.

mod alloc;
mod events;
mod leases;
mod pools;
mod registry;
mod stats;
mod tokens;

use portmesh_core as core;

pub use alloc::{Allocate, MAX_REPORTED_BUSY, strategy_from_pb};
pub use registry::{MAX_CHECK_COMMAND, MAX_REPORTS, health_from_pb};
pub use tokens::{JOIN_TOKEN_TTL_MS, MAX_JOIN_USES, MAX_TOKEN_TTL_MS, TokenSpec};

/// A message as received by the node on `host`, for the conversions whose defaults come from
/// the receiving node (an allocation or a registration is for this node's host unless it names
/// another).
#[derive(Debug, Clone, Copy)]
pub struct AtHost<'a, T> {
    pub msg: &'a T,
    pub host: &'a str,
}

/// A request that cannot be turned into a command: which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// The wire form of a holder is a pid (0: none) and a command line, recorded with its secrets
/// masked and cut to size ([`core::Holder::new`]).
fn holder(pid: u32, command: &str) -> Option<core::Holder> {
    (pid != 0).then(|| core::Holder::new(pid, command))
}

impl From<core::text::TextError> for BadRequest {
    fn from(e: core::text::TextError) -> Self {
        BadRequest(e.to_string())
    }
}

/// A name (team, pool, service, …): see `core::text` for the rule.
fn name(field: &str, v: &str) -> Result<(), BadRequest> {
    Ok(core::text::check_name(field, v)?)
}

/// A name that may be left empty (its default applies).
fn opt_name(field: &str, v: &str) -> Result<(), BadRequest> {
    if v.is_empty() { Ok(()) } else { name(field, v) }
}

/// A key (sticky key, service id, host) that may be left empty.
fn opt_key(field: &str, v: &str) -> Result<(), BadRequest> {
    if v.is_empty() { Ok(()) } else { Ok(core::text::check_key(field, v)?) }
}

/// The filters of a read (list, watch, discover, stats): empty, or a valid name.
pub fn check_filters(filters: &[(&str, &str)]) -> Result<(), BadRequest> {
    filters.iter().try_for_each(|(field, v)| opt_name(field, v))
}

/// The port and key filters of a list: each port in 1024-65535, each key a valid key. Returns
/// the ports, ascending, each once.
pub fn list_filters(ports: &[u32], keys: &[String]) -> Result<Vec<u16>, BadRequest> {
    keys.iter().try_for_each(|k| Ok::<_, BadRequest>(core::text::check_key("keys", k)?))?;
    let mut ports = ports.iter().map(|p| required_port(*p, "ports")).collect::<Result<Vec<_>, _>>()?;
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// A request's team: a valid name, or empty for the default team.
pub fn team(v: &str) -> Result<String, BadRequest> {
    opt_name("team", v)?;
    Ok(core::team_or_default(v).to_string())
}

fn pid_of(h: &Option<core::Holder>) -> u32 {
    h.as_ref().map_or(0, |h| h.pid)
}

fn command_of(h: &Option<core::Holder>) -> String {
    h.as_ref().map(|h| h.command.clone()).unwrap_or_default()
}

/// A port that may be unset (0).
fn port(p: u32, field: &str) -> Result<Option<u16>, BadRequest> {
    match p {
        0 => Ok(None),
        1024..=65535 => Ok(Some(p as u16)),
        _ => Err(BadRequest(format!("{field}: port {p} is out of range: ports must lie in 1024-65535"))),
    }
}

/// Parses a port that must be set.
pub fn required_port(p: u32, field: &str) -> Result<u16, BadRequest> {
    port(p, field)?.ok_or_else(|| BadRequest(format!("{field}: a port is required")))
}
