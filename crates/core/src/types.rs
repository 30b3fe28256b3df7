//! Domain types. Everything here is plain data: serialisable, comparable, no behaviour that
//! needs the outside world.

use std::fmt;
use std::str::FromStr;

pub use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::MIN_PORT;

mod service;

pub use service::{CheckKind, HealthCheck, HealthStatus, HealthUpdate, Service, ServicePort};

/// An inclusive range of ports, `start..=end`, always within 1024–65535 and never inverted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    start: u16,
    end: u16,
}

/// Why a text or a pair of numbers is not a [`PortRange`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("port {0} is out of range: ports must lie in 1024-65535")]
    OutOfRange(u32),
    #[error("range {start}-{end} is inverted: the first port must not exceed the last")]
    Inverted { start: u32, end: u32 },
    #[error("cannot read {0:?} as a port range: write START-END (e.g. 20000-20999) or a single port")]
    Syntax(String),
}

impl PortRange {
    /// Builds a range, checking both ends lie in 1024–65535 and `start <= end`.
    pub fn new(start: u32, end: u32) -> Result<Self, RangeError> {
        for p in [start, end] {
            if p < u32::from(MIN_PORT) || p > u32::from(u16::MAX) {
                return Err(RangeError::OutOfRange(p));
            }
        }
        if start > end {
            return Err(RangeError::Inverted { start, end });
        }
        Ok(Self { start: start as u16, end: end as u16 })
    }

    pub fn start(&self) -> u16 {
        self.start
    }

    pub fn end(&self) -> u16 {
        self.end
    }

    /// Number of ports in the range.
    pub fn len(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }

    /// A range always holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, port: u16) -> bool {
        self.start <= port && port <= self.end
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    /// Whether it shares a port with `lo..=hi`: the one test for "lies in the host's ephemeral
    /// range" (outgoing connections take ports from there at any time), wherever it is asked.
    pub fn meets(&self, (lo, hi): (u16, u16)) -> bool {
        self.start <= hi && lo <= self.end
    }

    pub fn ports(&self) -> impl DoubleEndedIterator<Item = u16> + use<> {
        self.start..=self.end
    }

    /// Parses a comma-separated list of ranges (`"8000-8099,9000"`).
    pub fn parse_list(text: &str) -> Result<Vec<PortRange>, RangeError> {
        text.split(',').map(|s| s.trim().parse()).collect()
    }
}

impl FromStr for PortRange {
    type Err = RangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let num = |t: &str| t.trim().parse::<u32>().map_err(|_| RangeError::Syntax(s.to_string()));
        match s.split_once('-') {
            Some((a, b)) => PortRange::new(num(a)?, num(b)?),
            None => {
                let p = num(s)?;
                PortRange::new(p, p)
            }
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// Formats a list of ranges the way [`PortRange::parse_list`] reads them.
pub(crate) fn ranges_text(ranges: &[PortRange]) -> String {
    ranges.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// A named set of port ranges of one team, for one kind of service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub team: String,
    pub name: String,
    /// Sorted, non-overlapping ranges.
    pub ranges: Vec<PortRange>,
    pub revision: u64,
}

impl Pool {
    /// Number of ports in the pool.
    pub fn size(&self) -> u32 {
        self.ranges.iter().map(PortRange::len).sum()
    }

    pub fn contains(&self, port: u16) -> bool {
        self.ranges.iter().any(|r| r.contains(port))
    }

    /// Every port of the pool in ascending order.
    pub fn ports(&self) -> impl DoubleEndedIterator<Item = u16> + '_ {
        self.ranges.iter().flat_map(PortRange::ports)
    }

    pub fn ranges_text(&self) -> String {
        ranges_text(&self.ranges)
    }
}

/// The pools every fresh cluster starts with, for team `default`.
///
/// All lie below 32768 (under Linux's ephemeral range 32768–60999 and macOS/Windows'
/// 49152–65535), none overlap, each holds 1,000 ports, and none contains 5000 or 7000 (taken by
/// macOS AirPlay). `web` keeps the familiar 8000–8999 so apps land where people look for them.
pub fn default_pools() -> Vec<(&'static str, PortRange)> {
    let r = |a, b| PortRange { start: a, end: b };
    vec![
        ("web", r(8000, 8999)),
        ("default", r(10000, 10999)),
        ("db", r(11000, 11999)),
        ("cache", r(12000, 12999)),
        ("queue", r(13000, 13999)),
    ]
}

/// What to do when the wanted port is not free.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// The wanted port, else the key's last port, else the lowest free port of the pool.
    #[default]
    Sticky,
    /// The wanted port, else the next free port after it (wrapping within the pool).
    Next,
    /// The wanted port, else a random free port of the pool.
    Random,
    /// Exactly the wanted port, or a rejection saying why it is not free.
    Fail,
}

impl FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "sticky" => Ok(Self::Sticky),
            "next" => Ok(Self::Next),
            "random" => Ok(Self::Random),
            "fail" => Ok(Self::Fail),
            other => Err(format!("unknown strategy {other:?}: use sticky, next, random or fail")),
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sticky => "sticky",
            Self::Next => "next",
            Self::Random => "random",
            Self::Fail => "fail",
        })
    }
}

/// One port held by one owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
///
/// Its names and keys are [`CompactString`]s: up to 24 bytes are kept inside the struct, so the
/// usual allocation (team, pool, service and host of a few bytes each) costs one heap block, not
/// five; at 60,000 allocations that was ~8 MB per member (docs/benchmarks.md, issue 19).
pub struct Allocation {
    pub port: u16,
    pub team: CompactString,
    pub pool: CompactString,
    pub service: CompactString,
    pub instance: Option<CompactString>,
    pub env: Option<CompactString>,
    /// The host the port was probed on and handed to.
    pub host: CompactString,
    pub key: Option<CompactString>,
    pub lease_id: Option<u64>,
    pub created_ms: u64,
    /// The revision that granted it: the fencing token.
    pub revision: u64,
    /// The process it was handed to, where the client said.
    pub holder: Option<Holder>,
}

/// A process holding a port: the one an allocation was handed to, or the one a probe found
/// listening on a busy port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    /// Its command line (may be empty when unknown).
    pub command: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.command.is_empty() {
            write!(f, "pid {}", self.pid)
        } else {
            write!(f, "pid {} ({})", self.pid, self.command)
        }
    }
}

/// A port never handed out by automatic selection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub port: u16,
    pub reason: String,
    pub created_ms: u64,
    pub revision: u64,
}

/// A lease. Its countdown runs on the leader; the state machine keeps its deadline as of the last
/// checkpoint so a new leader resumes rather than restarts it (see `docs/architecture.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: u64,
    pub team: CompactString,
    pub ttl_ms: u64,
    /// When it runs out, on the lease clock (`Meta::lease_clock_ms`): the clock at grant plus
    /// the TTL, or at the checkpoint after a renewal plus the TTL then left. The clock advances
    /// with every checkpoint, so a lease nobody renews needs no rewrite to count down.
    /// (Data written before the lease clock existed holds the remaining TTL here, with the clock
    /// at 0: the same reading.)
    pub deadline_ms: u64,
    pub granted_ms: u64,
    pub revision: u64,
}

/// A recently released port that only its previous sticky key may take until `until_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cooldown {
    pub until_ms: u64,
    pub team: String,
    pub key: Option<String>,
}

/// A port the host's bind probe found busy when it would otherwise have been handed out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub port: u16,
    pub team: String,
    pub pool: String,
    pub service: String,
    pub host: String,
    /// The process the probe found holding it, where the OS told.
    pub holder: Option<Holder>,
}

/// Why an allocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleaseCause {
    Released,
    LeaseRevoked,
    LeaseExpired,
}

impl fmt::Display for ReleaseCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Released => "released",
            Self::LeaseRevoked => "lease revoked",
            Self::LeaseExpired => "lease expired",
        })
    }
}

/// One change to the state, as watchers and the audit log see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub revision: u64,
    /// Position among the events of the same revision.
    pub seq: u32,
    pub at_ms: u64,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Allocated(Box<Allocation>),
    Released { allocation: Box<Allocation>, cause: ReleaseCause },
    Reserved(Reservation),
    Unreserved { port: u16 },
    PoolAdded(Box<Pool>),
    PoolRemoved { team: String, name: String },
    LeaseGranted { id: u64, team: String, ttl_ms: u64 },
    LeaseRevoked { id: u64, team: String },
    LeaseExpired { id: u64, team: String },
    Conflict(Box<Conflict>),
    CooldownChanged { ms: u64 },
    // Appended, never reordered: events are persisted by variant index.
    ServiceRegistered(Box<Service>),
    ServiceDeregistered { service: Box<Service>, cause: ReleaseCause },
    HealthChanged(Box<HealthChange>),
}

/// A registered instance's health moving from one status to another (the content of
/// [`EventKind::HealthChanged`]; encoded as the struct variant it was, field for field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthChange {
    pub team: String,
    pub id: String,
    pub name: String,
    pub host: String,
    pub previous: HealthStatus,
    pub status: HealthStatus,
    pub output: String,
}

/// What a token may do (see `docs/security.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Acts on its own team only: allocate, release, renew, register, discover, list, watch.
    Member,
    /// Everything: every team, pools, reservations, membership, tokens, shutdown.
    Admin,
    /// Only joins one node to the cluster (`serve --join ADDR --join-token T`).
    Join,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Join => "join",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "member" => Ok(Role::Member),
            "admin" => Ok(Role::Admin),
            "join" => Ok(Role::Join),
            _ => Err("use member, admin or join".into()),
        }
    }
}

/// A bearer token as the replicated state keeps it: its public id and the SHA-256 digest of its
/// secret, never the secret (the node that created it handed that out once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Public, unique: shown by `token ls`, named by `token revoke`, and the first part of the
    /// token string so a node finds the record without comparing secrets.
    pub id: String,
    pub digest: [u8; 32],
    pub role: Role,
    /// The team a member token acts for; empty for admin and join tokens.
    pub team: String,
    pub created_ms: u64,
    /// Refused from this time on (wall-clock ms since the epoch); `None`: never.
    pub expires_ms: Option<u64>,
    /// Uses left (join tokens: each join uses one); `None`: unlimited.
    pub uses_left: Option<u32>,
}

impl Token {
    /// Whether the token is past its expiry at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|e| e <= now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The event history keeps [`crate::EVENT_RETENTION`] events, each the size of the largest
    /// variant: large contents stay boxed so that a history of small events (a lease soak's
    /// grants) is not sized like one of allocations (was 272 bytes an event).
    #[test]
    fn an_event_stays_small() {
        let size = std::mem::size_of::<Event>();
        eprintln!("Event: {size} bytes");
        assert!(size <= 80, "an Event is {size} bytes; box the variant that grew");
    }

    #[test]
    fn range_parsing_table() {
        let ok = [("8000-8999", 8000, 8999), ("1024", 1024, 1024), (" 20000 - 20010 ", 20000, 20010)];
        for (text, a, b) in ok {
            let r: PortRange = text.parse().unwrap();
            assert_eq!((r.start(), r.end()), (a, b), "{text}");
        }
        let bad = [
            ("80-90", "port 80 is out of range"),
            ("9000-8000", "range 9000-8000 is inverted"),
            ("60000-70000", "port 70000 is out of range"),
            ("web", "cannot read \"web\""),
            ("1-", "cannot read"),
        ];
        for (text, msg) in bad {
            let e = text.parse::<PortRange>().unwrap_err().to_string();
            assert!(e.contains(msg), "{text}: {e}");
        }
    }

    #[test]
    fn range_overlap_and_len() {
        let a = PortRange::new(1024, 2000).unwrap();
        let b = PortRange::new(2000, 3000).unwrap();
        let c = PortRange::new(2001, 3000).unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(a.meets((a.end(), 65535)) && a.meets((0, a.start())) && !a.meets((a.end() + 1, 65535)));
        assert!(!a.overlaps(&c));
        assert_eq!(a.len(), 977);
        assert_eq!(PortRange::parse_list("1024-1030, 2000").unwrap().len(), 2);
    }

    #[test]
    fn default_pools_are_sane() {
        let pools = default_pools();
        for (i, (name, r)) in pools.iter().enumerate() {
            assert!(r.end() < 32768, "{name} reaches the ephemeral range");
            assert!(r.len() >= 1000, "{name} is small");
            assert!(!r.contains(5000) && !r.contains(7000), "{name} holds an AirPlay port");
            for (other, o) in &pools[i + 1..] {
                assert!(!r.overlaps(o), "{name} overlaps {other}");
            }
        }
        let names: Vec<_> = pools.iter().map(|p| p.0).collect();
        for n in ["default", "web", "db", "cache", "queue"] {
            assert!(names.contains(&n));
        }
    }

    #[test]
    fn strategy_round_trip() {
        for s in [Strategy::Sticky, Strategy::Next, Strategy::Random, Strategy::Fail] {
            assert_eq!(s.to_string().parse::<Strategy>().unwrap(), s);
        }
        assert!("nearest".parse::<Strategy>().unwrap_err().contains("sticky, next, random or fail"));
    }
}
