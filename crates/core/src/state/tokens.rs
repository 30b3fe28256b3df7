//! Tokens: added, revoked, spent. They change no revision and emit no event: revisions fence the
//! port state, and watchers of every team would otherwise see token ids.

use super::*;

impl State {
    pub(super) fn add_token(&mut self, ctx: ApplyCtx, t: &Token) -> Result<Response, Rejection> {
        if self.tokens.contains_key(&t.id) {
            return Err(Rejection::TokenExists { id: t.id.clone() });
        }
        match t.role {
            Role::Member => check_name("team", &t.team)?,
            Role::Admin | Role::Join if !t.team.is_empty() => {
                return Err(Rejection::Invalid(format!(
                    "{} tokens act for no team: leave the team empty",
                    t.role
                )));
            }
            _ => {}
        }
        let token = Token { created_ms: ctx.now_ms, ..t.clone() };
        self.tokens.insert(token.id.clone(), token.clone());
        Ok(Response::TokenAdded(Box::new(token)))
    }

    pub(super) fn revoke_token(&mut self, id: &str) -> Result<Response, Rejection> {
        let Some(t) = self.tokens.get(id) else {
            return Err(Rejection::UnknownToken { id: id.into() });
        };
        if t.role == Role::Admin && self.tokens.values().filter(|o| o.role == Role::Admin).count() == 1 {
            return Err(Rejection::LastAdminToken { id: id.into() });
        }
        self.tokens.remove(id);
        Ok(Response::TokenRevoked { id: id.into() })
    }

    pub(super) fn use_token(&mut self, ctx: ApplyCtx, id: &str) -> Result<Response, Rejection> {
        let Some(t) = self.tokens.get_mut(id) else {
            return Err(Rejection::UnknownToken { id: id.into() });
        };
        if t.expired(ctx.now_ms) {
            return Err(Rejection::TokenExpired { id: id.into() });
        }
        match t.uses_left {
            Some(n) if n <= 1 => {
                self.tokens.remove(id);
            }
            Some(n) => t.uses_left = Some(n - 1),
            None => {}
        }
        Ok(Response::TokenUsed { id: id.into() })
    }
}
