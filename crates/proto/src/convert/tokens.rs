//! Tokens: the create request checked, a token as listed.

use super::*;
use crate::v1 as pb;

/// The longest lifetime a token may be given.
pub const MAX_TOKEN_TTL_MS: u64 = 366 * 24 * 3600 * 1000;
/// A join token's lifetime when the request names none.
pub const JOIN_TOKEN_TTL_MS: u64 = 24 * 3600 * 1000;
/// The most joins one join token may allow.
pub const MAX_JOIN_USES: u32 = 1000;

/// What a `Tokens.Create` asks for, checked: the node mints the token from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    pub role: core::Role,
    /// A member token's team; empty for the others.
    pub team: String,
    pub ttl_ms: Option<u64>,
    pub uses: Option<u32>,
}

impl TryFrom<&pb::CreateTokenRequest> for TokenSpec {
    type Error = BadRequest;

    fn try_from(r: &pb::CreateTokenRequest) -> Result<Self, BadRequest> {
        let role = match r.role.as_str() {
            "" => core::Role::Member,
            other => other.parse().map_err(|e| {
                let shown: String = other.chars().take(20).collect();
                BadRequest(format!("role: {shown:?} is not a role: {e}"))
            })?,
        };
        let team = match role {
            core::Role::Member => team(&r.team)?,
            _ if !r.team.is_empty() => {
                return Err(BadRequest(format!("team: {role} tokens act for no team; leave it empty")));
            }
            _ => String::new(),
        };
        let ttl_ms = match (r.ttl_ms, role) {
            (0, core::Role::Join) => Some(JOIN_TOKEN_TTL_MS),
            (0, _) => None,
            (t, _) if (core::MIN_TTL_MS..=MAX_TOKEN_TTL_MS).contains(&t) => Some(t),
            (t, _) => {
                return Err(BadRequest(format!(
                    "ttl_ms: {t} ms is out of bounds: use 1s to 366d, or 0 for none"
                )));
            }
        };
        let uses = match (r.uses, role) {
            (0, core::Role::Join) => Some(1),
            (n @ 1..=MAX_JOIN_USES, core::Role::Join) => Some(n),
            (0, _) => None,
            (n, core::Role::Join) => {
                return Err(BadRequest(format!(
                    "uses: {n} is too many: a join token allows 1 to {MAX_JOIN_USES}"
                )));
            }
            (_, _) => return Err(BadRequest(format!("uses: only join tokens have uses, not {role} tokens"))),
        };
        Ok(TokenSpec { role, team, ttl_ms, uses })
    }
}

impl From<&core::Token> for pb::TokenInfo {
    fn from(t: &core::Token) -> Self {
        pb::TokenInfo {
            id: t.id.clone(),
            role: t.role.to_string(),
            team: t.team.clone(),
            created_ms: t.created_ms,
            expires_ms: t.expires_ms.unwrap_or(0),
            uses_left: t.uses_left,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_requests_are_checked_field_by_field() {
        let req = |role: &str, team: &str, ttl_ms: u64, uses: u32| pb::CreateTokenRequest {
            role: role.into(),
            team: team.into(),
            ttl_ms,
            uses,
        };
        let ok = |r| TokenSpec::try_from(&r).unwrap();
        let bad = |r| TokenSpec::try_from(&r).unwrap_err().0;
        assert_eq!(
            ok(req("", "", 0, 0)),
            TokenSpec { role: core::Role::Member, team: "default".into(), ttl_ms: None, uses: None }
        );
        assert_eq!(ok(req("join", "", 0, 0)).uses, Some(1));
        assert_eq!(ok(req("join", "", 0, 0)).ttl_ms, Some(JOIN_TOKEN_TTL_MS));
        assert_eq!(ok(req("admin", "", 60_000, 0)).ttl_ms, Some(60_000));
        assert!(bad(req("root", "", 0, 0)).starts_with("role:"));
        assert!(bad(req("admin", "teama", 0, 0)).starts_with("team:"));
        assert!(bad(req("member", "bad team", 0, 0)).contains("team"));
        assert!(bad(req("member", "a", 5, 0)).starts_with("ttl_ms:"));
        assert!(bad(req("member", "a", 0, 2)).starts_with("uses:"));
        assert!(bad(req("join", "", 0, 5000)).starts_with("uses:"));
        // An oversized role is not echoed whole.
        assert!(bad(req(&"x".repeat(10_000), "", 0, 0)).len() < 200);
    }
}
