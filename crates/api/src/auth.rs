//! Who calls, and what they may do.
//!
//! - Tokens: minted here (a random id and secret; the replicated state keeps the SHA-256 digest
//!   of the secret, never the secret), checked here (found by id, digest compared in constant
//!   time). A token reads `pmt_<id>_<secret>`, both parts lowercase hex.
//! - [`Caller`]: what a request is allowed as, from its bearer token and whether its connection
//!   presented a node certificate of the cluster (a member).
//! - [`need`]: the one table of what each method needs. The node's wire layer calls
//!   [`Api::gate`] before any method runs and puts the caller into the request; methods that act
//!   on a team then ask [`Api::act_as`] which team that is.
//!
//! With authentication off (no admin token in the state and no `--auth`), everyone is
//! [`Caller::Anyone`] and nothing here refuses anything: the local node and plaintext clusters
//! work as they always did.

use portmesh_core::{Role, Token};
use tonic::Status;

use crate::{Api, ERROR_METADATA};

/// The metadata key (and HTTP header) that carries `Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";
/// How every token starts.
pub const TOKEN_PREFIX: &str = "pmt_";
/// Bytes of a token's public id.
const ID_BYTES: usize = 8;
/// Bytes of a token's secret.
const SECRET_BYTES: usize = 32;

/// A token just made: its record (for the state) and the string handed out once.
#[derive(Debug)]
pub struct Minted {
    pub token: Token,
    /// `pmt_<id>_<secret>`.
    pub secret: String,
}

/// Makes a token with fresh random id and secret (the OS's generator).
pub fn mint(
    role: Role,
    team: String,
    expires_ms: Option<u64>,
    uses_left: Option<u32>,
) -> Result<Minted, crate::ApiError> {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    let mut id = [0u8; ID_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    rng.fill(&mut id)
        .and_then(|()| rng.fill(&mut secret))
        .map_err(|_| crate::ApiError::Internal("the OS random generator failed".into()))?;
    let id = hex(&id);
    let token =
        Token { id: id.clone(), digest: digest(&secret), role, team, created_ms: 0, expires_ms, uses_left };
    Ok(Minted { token, secret: format!("{TOKEN_PREFIX}{id}_{}", hex(&secret)) })
}

/// The id of a well-formed token string, and its secret's digest.
pub fn parse(token: &str) -> Option<(&str, [u8; 32])> {
    let (id, secret) = token.trim().strip_prefix(TOKEN_PREFIX)?.split_once('_')?;
    if id.len() != 2 * ID_BYTES || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let secret = unhex(secret).filter(|s| s.len() == SECRET_BYTES)?;
    Some((id, digest(&secret)))
}

/// The record of a token string made earlier (its id and digest), for a token kept in a file
/// (`DATA/admin.token`) and proposed again after a crash; `None` when it is not a token.
pub fn record_of(token: &str, role: Role) -> Option<Token> {
    let (id, digest) = parse(token)?;
    Some(Token {
        id: id.to_string(),
        digest,
        role,
        team: String::new(),
        created_ms: 0,
        expires_ms: None,
        uses_left: None,
    })
}

fn digest(secret: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Compares two digests in time that does not depend on where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

/// The token of an `authorization` value (`Bearer <token>`; a bare token is taken too).
pub fn bearer(value: &str) -> &str {
    let v = value.trim();
    v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v).trim()
}

/// What a request is allowed as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Authentication is off.
    Anyone,
    /// A member of the cluster: its connection presented a node certificate of the cluster's CA.
    Member,
    Admin {
        id: String,
    },
    /// A member token: acts on `team` only.
    Team {
        id: String,
        team: String,
    },
    Join {
        id: String,
    },
}

impl Caller {
    fn describe(&self) -> String {
        match self {
            Caller::Anyone => "anyone".into(),
            Caller::Member => "a member of the cluster".into(),
            Caller::Admin { id } => format!("admin token {id}"),
            Caller::Team { id, team } => format!("token {id} (member of team {team:?})"),
            Caller::Join { id } => format!("join token {id}"),
        }
    }
}

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: health checks and reflection (the schema is public).
    Nothing,
    /// Any valid token (or membership).
    Someone,
    /// A token of the team the request names (checked by the method through [`Api::act_as`]),
    /// or an admin token.
    Team,
    /// An admin token.
    Admin,
    /// A join token or an admin token.
    Join,
    /// Membership of the cluster: Raft and probes.
    Member,
}

impl Need {
    /// The right, as refusals name it.
    fn right(self) -> &'static str {
        match self {
            Need::Nothing | Need::Someone => "a token",
            Need::Team => "a token of the team it acts on",
            Need::Admin => "an admin token",
            Need::Join => "a join token (`portmesh token create --role join`)",
            Need::Member => "a node certificate of the cluster",
        }
    }
}

/// What the method at `path` (`/package.Service/Method`) needs.
pub fn need(path: &str) -> Need {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Need::Admin;
    };
    match (service, method) {
        ("grpc.health.v1.Health", _) => Need::Nothing,
        (s, _) if s.starts_with("grpc.reflection.") => Need::Nothing,
        ("portmesh.raft.v1.Raft", _) | ("portmesh.v1.Cluster", "Probe") => Need::Member,
        ("portmesh.v1.Cluster", "Status") => Need::Someone,
        ("portmesh.v1.Cluster", "Join") => Need::Join,
        ("portmesh.v1.Cluster", _) | ("portmesh.v1.Tokens", _) => Need::Admin,
        ("portmesh.v1.Pools", "Add" | "Remove" | "SetCooldown") => Need::Admin,
        ("portmesh.v1.Allocator", "Reserve" | "Unreserve") => Need::Admin,
        ("portmesh.v1.Registry", "ReportHealth") => Need::Admin,
        ("portmesh.v1.Allocator" | "portmesh.v1.Leases" | "portmesh.v1.Pools", _) => Need::Team,
        ("portmesh.v1.Registry" | "portmesh.v1.Watch", _) => Need::Team,
        _ => Need::Admin,
    }
}

fn unauthenticated(msg: String) -> Status {
    refusal(Status::unauthenticated(msg))
}

fn denied(msg: String) -> Status {
    refusal(Status::permission_denied(msg))
}

fn refusal(mut s: Status) -> Status {
    s.metadata_mut().insert(ERROR_METADATA, tonic::metadata::MetadataValue::from_static("unauthorized"));
    s
}

/// What a refusal tells a caller with no token.
const PASS_A_TOKEN: &str = "pass one with --token, --token-file or PORTMESH_TOKEN";

impl Api {
    /// Whether this node asks callers for tokens: it was started with `--auth`, or the cluster's
    /// state holds an admin token.
    pub fn auth_on(&self) -> bool {
        self.inner.auth || self.inner.node.state().read().state.auth_on()
    }

    /// Who calls, from the bearer token (if any) and whether the connection is a member's. A
    /// token, when present, decides (so a joining node's join token counts); a member without
    /// one is [`Caller::Member`]. `auth` is [`Api::auth_on`], read once per call by the caller
    /// (the wire layer needs it too). Refusals never echo the token.
    pub fn authenticate(&self, auth: bool, token: Option<&str>, member: bool) -> Result<Caller, Status> {
        if !auth {
            return Ok(Caller::Anyone);
        }
        let token = token.map(bearer).filter(|t| !t.is_empty());
        let Some(token) = token else {
            return if member {
                Ok(Caller::Member)
            } else {
                Err(unauthenticated(format!("this cluster requires a token: {PASS_A_TOKEN}")))
            };
        };
        let Some((id, digest)) = parse(token) else {
            return Err(unauthenticated(format!(
                "the token given is not a portmesh token (they read {TOKEN_PREFIX}<id>_<secret>): {PASS_A_TOKEN}"
            )));
        };
        let sm = self.inner.node.state().read();
        let Some(t) = sm.state.token(id).filter(|t| same(&t.digest, &digest)) else {
            return Err(unauthenticated(format!(
                "token {id} is not valid here: it was revoked, used up, belongs to another cluster, or its \
                 secret is wrong; ask an admin for a new one"
            )));
        };
        if t.expired(portmesh_raft::now_ms()) {
            return Err(unauthenticated(format!("token {id} expired; ask an admin for a new one")));
        }
        let id = id.to_string();
        Ok(match t.role {
            Role::Admin => Caller::Admin { id },
            Role::Member => Caller::Team { id, team: t.team.clone() },
            Role::Join => Caller::Join { id },
        })
    }

    /// Authenticates a call to the method at `path` and checks the right it needs (see
    /// [`need`]); team rights are checked again by the method, which knows the team.
    pub fn gate(&self, auth: bool, path: &str, token: Option<&str>, member: bool) -> Result<Caller, Status> {
        let need = need(path);
        if need == Need::Nothing {
            return Ok(Caller::Anyone);
        }
        let caller = self.authenticate(auth, token, member)?;
        let allowed = match (&caller, need) {
            (Caller::Anyone, _) | (_, Need::Nothing) => true,
            (Caller::Member, Need::Join) => false,
            (Caller::Member, _) => true,
            (Caller::Admin { .. }, need) => need != Need::Member,
            (Caller::Team { .. }, need) => matches!(need, Need::Someone | Need::Team),
            (Caller::Join { .. }, need) => matches!(need, Need::Someone | Need::Join),
        };
        if allowed {
            Ok(caller)
        } else {
            Err(denied(format!("{path} needs {}; this call came with {}", need.right(), caller.describe())))
        }
    }

    /// The team a call acts on (or, for reads, filters by): the one it names, which a member
    /// token may only name if it is its own; a member token that names none acts on its own.
    /// `caller` is what [`Api::gate`] put into the request (absent only where no gate runs).
    pub fn act_as(&self, caller: Option<&Caller>, team: &str) -> Result<String, Status> {
        match caller {
            Some(Caller::Team { id, team: own }) => {
                if team.is_empty() || team == own {
                    Ok(own.clone())
                } else {
                    let shown: String = team.chars().take(portmesh_core::text::MAX_NAME).collect();
                    Err(denied(format!(
                        "token {id} acts for team {own:?} only; acting on team {shown:?} needs a token of that team \
                         or an admin token"
                    )))
                }
            }
            Some(Caller::Join { id }) => Err(denied(format!("join token {id} may only join a node"))),
            None if self.auth_on() => {
                Err(unauthenticated(format!("this cluster requires a token: {PASS_A_TOKEN}")))
            }
            _ => Ok(team.to_string()),
        }
    }
}

/// The caller [`Api::gate`] put into a request.
pub(crate) fn caller<T>(req: &tonic::Request<T>) -> Option<&Caller> {
    req.extensions().get::<Caller>()
}

/// A request that acts on (or filters by) a team.
pub(crate) trait Scoped {
    /// Its team field (`None` when the message lacks the part that holds it: the method refuses
    /// such a request anyway).
    fn team_mut(&mut self) -> Option<&mut String>;
}

macro_rules! scoped {
    ($($t:ty),* $(,)?) => {$(
        impl Scoped for $t {
            fn team_mut(&mut self) -> Option<&mut String> {
                Some(&mut self.team)
            }
        }
    )*};
}

use portmesh_proto::v1 as pb;

scoped!(
    pb::AllocateRequest,
    pb::ReleaseRequest,
    pb::ListRequest,
    pb::LeaseGrantRequest,
    pb::LeaseTimeToLiveRequest,
    pb::LeaseRevokeRequest,
    pb::ListPoolsRequest,
    pb::StatsRequest,
    pb::DeregisterRequest,
    pb::DiscoverRequest,
    pb::WatchRequest,
);

impl Scoped for pb::RegisterRequest {
    fn team_mut(&mut self) -> Option<&mut String> {
        self.service.as_mut().map(|s| &mut s.team)
    }
}

impl Api {
    /// The message of a team-scoped request, its team set to the one the caller acts on
    /// ([`Api::act_as`]); refused when the caller may not act on the team it names.
    pub(crate) fn scoped<T: Scoped>(&self, req: tonic::Request<T>) -> Result<T, Status> {
        let caller = caller(&req).cloned();
        let mut msg = req.into_inner();
        if let Some(team) = msg.team_mut() {
            *team = self.act_as(caller.as_ref(), team)?;
        } else {
            self.act_as(caller.as_ref(), "")?;
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_only_in_their_own_shape() {
        let m = mint(Role::Member, "a".into(), None, None).unwrap();
        assert!(m.secret.starts_with(TOKEN_PREFIX) && m.secret.len() == 4 + 16 + 1 + 64, "{}", m.secret);
        let (id, d) = parse(&m.secret).unwrap();
        assert_eq!((id, d), (m.token.id.as_str(), m.token.digest));
        assert!(same(&d, &m.token.digest) && !same(&d, &[0; 32]));
        let other = mint(Role::Member, "a".into(), None, None).unwrap();
        assert_ne!(other.token.id, m.token.id);
        assert_ne!(other.token.digest, m.token.digest);
        for bad in ["", "pmt_", "pmt_abc_def", "xyz_0123456789abcdef_00", &m.secret[..m.secret.len() - 1]] {
            assert!(parse(bad).is_none(), "{bad}");
        }
        assert_eq!(bearer("Bearer  pmt_x "), "pmt_x");
        assert_eq!(bearer("pmt_x"), "pmt_x");
    }

    #[test]
    fn every_method_has_a_need() {
        assert_eq!(need("/grpc.health.v1.Health/Check"), Need::Nothing);
        assert_eq!(need("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"), Need::Nothing);
        assert_eq!(need("/portmesh.raft.v1.Raft/Vote"), Need::Member);
        assert_eq!(need("/portmesh.v1.Cluster/Probe"), Need::Member);
        assert_eq!(need("/portmesh.v1.Cluster/Shutdown"), Need::Admin);
        assert_eq!(need("/portmesh.v1.Cluster/Leave"), Need::Admin);
        assert_eq!(need("/portmesh.v1.Cluster/Join"), Need::Join);
        assert_eq!(need("/portmesh.v1.Cluster/Status"), Need::Someone);
        assert_eq!(need("/portmesh.v1.Tokens/Create"), Need::Admin);
        assert_eq!(need("/portmesh.v1.Pools/Add"), Need::Admin);
        assert_eq!(need("/portmesh.v1.Pools/SetCooldown"), Need::Admin);
        assert_eq!(need("/portmesh.v1.Pools/Stats"), Need::Team);
        assert_eq!(need("/portmesh.v1.Allocator/Reserve"), Need::Admin);
        assert_eq!(need("/portmesh.v1.Allocator/Allocate"), Need::Team);
        assert_eq!(need("/portmesh.v1.Leases/KeepAlive"), Need::Team);
        assert_eq!(need("/portmesh.v1.Registry/ReportHealth"), Need::Admin);
        assert_eq!(need("/portmesh.v1.Watch/Watch"), Need::Team);
        assert_eq!(need("/portmesh.v1.Unknown/X"), Need::Admin);
        assert_eq!(need("garbage"), Need::Admin);
    }
}
