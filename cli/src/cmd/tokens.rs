//! `token create|ls|revoke`: tokens of a cluster that runs with authentication.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use portmesh_client::{Client, pb};
use serde_json::json;

use crate::args::TokenCommand;
use crate::render::fmt_dur;

/// `token mint`: a fresh token, known to no cluster until one registers it.
pub fn mint(json: bool) -> Result<()> {
    let token = portmesh_node::new_token()?;
    if json {
        println!("{}", json!({"token": token}));
    } else {
        println!("{token}");
    }
    Ok(())
}

pub async fn token(c: &Client, team: &str, cmd: &TokenCommand, json: bool) -> Result<()> {
    match cmd {
        TokenCommand::Mint => mint(json),
        TokenCommand::Create { role, join, ttl, uses } => {
            let role = if *join { "join" } else { role.as_str() };
            let req = pb::CreateTokenRequest {
                role: role.into(),
                team: if role == "member" { team.into() } else { String::new() },
                ttl_ms: ttl.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                uses: uses.unwrap_or(0),
            };
            let r = c.create_token(req).await?;
            let info = r.token.unwrap_or_default();
            if json {
                println!("{}", json!({"token": r.secret, "info": info_json(&info)}));
            } else {
                // The token alone on stdout (for `$(portmesh token create …)`); what it is on stderr.
                println!("{}", r.secret);
                eprintln!("{} (shown once: the cluster keeps only its digest)", describe(&info));
            }
            Ok(())
        }
        TokenCommand::Ls => {
            let tokens = c.list_tokens().await?;
            if json {
                println!("{}", json!({"tokens": tokens.iter().map(info_json).collect::<Vec<_>>()}));
            } else {
                println!("{:<18} {:<7} {:<16} {:<14} USES LEFT", "ID", "ROLE", "TEAM", "EXPIRES IN");
                for t in &tokens {
                    println!(
                        "{:<18} {:<7} {:<16} {:<14} {}",
                        t.id,
                        t.role,
                        if t.team.is_empty() { "-" } else { &t.team },
                        expires_in(t.expires_ms),
                        t.uses_left.map_or("-".to_string(), |n| n.to_string())
                    );
                }
            }
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            c.revoke_token(id).await?;
            if json {
                println!("{}", json!({"revoked": id}));
            } else {
                println!("token {id} revoked");
            }
            Ok(())
        }
    }
}

fn info_json(t: &pb::TokenInfo) -> serde_json::Value {
    json!({"id": t.id, "role": t.role, "team": t.team, "created_ms": t.created_ms,
           "expires_ms": (t.expires_ms != 0).then_some(t.expires_ms), "uses_left": t.uses_left})
}

fn describe(t: &pb::TokenInfo) -> String {
    let mut s = format!("{} token {}", t.role, t.id);
    if !t.team.is_empty() {
        s.push_str(&format!(" for team {}", t.team));
    }
    if t.expires_ms != 0 {
        s.push_str(&format!(", expires in {}", expires_in(t.expires_ms)));
    }
    if let Some(n) = t.uses_left {
        s.push_str(&format!(", {n} use(s)"));
    }
    s
}

fn expires_in(expires_ms: u64) -> String {
    if expires_ms == 0 {
        return "never".into();
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    if expires_ms <= now {
        return "expired".into();
    }
    // Whole seconds: milliseconds are noise here.
    fmt_dur(Duration::from_secs((expires_ms - now) / 1000))
}
