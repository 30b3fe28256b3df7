//! Tokens: added, spent, revoked.

use super::*;

fn token(id: &str, role: crate::Role, team: &str, uses: Option<u32>, expires: Option<u64>) -> Command {
    Command::AddToken(Box::new(crate::Token {
        id: id.into(),
        digest: [7; 32],
        role,
        team: team.into(),
        created_ms: 0,
        expires_ms: expires,
        uses_left: uses,
    }))
}

#[test]
fn tokens_are_added_spent_and_revoked_and_the_last_admin_stays() {
    use crate::Role;
    let mut h = Harness::new();
    assert!(!h.st.auth_on());
    let rev = h.st.revision();
    assert!(
        matches!(h.apply(token("adm", Role::Admin, "", None, None)), Response::TokenAdded(t) if t.created_ms == h.now)
    );
    assert!(h.st.auth_on());
    assert_eq!(h.st.revision(), rev, "tokens fence nothing: no revision");
    // Bad tokens are refused and change nothing (the harness checks that).
    assert_eq!(
        h.apply(token("adm", Role::Admin, "", None, None)).rejection().unwrap().kind(),
        "already_exists"
    );
    assert_eq!(
        h.apply(token("x", Role::Admin, "teama", None, None)).rejection().unwrap().kind(),
        "invalid_argument"
    );
    assert_eq!(
        h.apply(token("x", Role::Member, "bad team", None, None)).rejection().unwrap().kind(),
        "invalid_argument"
    );
    // The last admin token cannot be revoked.
    let r = h.apply(Command::RevokeToken { id: "adm".into() });
    assert!(matches!(r.rejection(), Some(Rejection::LastAdminToken { .. })), "{r:?}");
    // A single-use join token: one join, then gone.
    h.apply(token("j1", Role::Join, "", Some(1), None));
    assert!(matches!(h.apply(Command::UseToken { id: "j1".into() }), Response::TokenUsed { .. }));
    assert!(h.st.token("j1").is_none());
    assert_eq!(h.apply(Command::UseToken { id: "j1".into() }).rejection().unwrap().kind(), "not_found");
    // Two uses, then gone; an expired one is refused and kept (to say "expired", not "unknown").
    h.apply(token("j2", Role::Join, "", Some(2), None));
    h.apply(Command::UseToken { id: "j2".into() });
    assert_eq!(h.st.token("j2").unwrap().uses_left, Some(1));
    h.apply(token("j3", Role::Join, "", None, Some(h.now + 5)));
    h.advance(100);
    assert!(matches!(
        h.apply(Command::UseToken { id: "j3".into() }).rejection(),
        Some(Rejection::TokenExpired { .. })
    ));
    // Revoking a member token, and a second admin makes the first revocable.
    h.apply(token("m", Role::Member, "teama", None, None));
    assert!(matches!(h.apply(Command::RevokeToken { id: "m".into() }), Response::TokenRevoked { .. }));
    assert_eq!(h.apply(Command::RevokeToken { id: "m".into() }).rejection().unwrap().kind(), "not_found");
    h.apply(token("adm2", Role::Admin, "", None, None));
    assert!(matches!(h.apply(Command::RevokeToken { id: "adm".into() }), Response::TokenRevoked { .. }));
    assert!(h.st.auth_on());
    // Tokens survive a records round trip (snapshots, restarts).
    let back = State::from_records(h.st.records());
    assert_eq!(back.tokens().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["adm2", "j2", "j3"]);
}
