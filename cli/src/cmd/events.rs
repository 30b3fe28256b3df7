//! The history: `watch` (every change as it happens) and `log` (the audit log).

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use portmesh_client::{Client, pb};

use crate::render::{event_json, event_text};

pub async fn watch(c: &Client, req: pb::WatchRequest, json: bool) -> Result<()> {
    let mut stream = c.watch(req).await?;
    let mut out = std::io::stdout().lock();
    while let Some(msg) = stream.message().await? {
        for e in &msg.events {
            if json {
                writeln!(out, "{}", event_json(e))?;
            } else {
                writeln!(out, "{}", event_text(e))?;
            }
        }
        out.flush()?;
    }
    bail!("the node ended the watch stream; resume with --from (the last revision shown + 1)")
}

/// The audit log: the history's port events, from the oldest kept, up to now (or on, with
/// `follow`).
pub async fn log(c: &Client, team: &str, follow: bool, json: bool) -> Result<()> {
    let end = c.status().await?.revision;
    let req = |from| pb::WatchRequest {
        from_revision: from,
        team: team.to_string(),
        progress_interval_ms: 200,
        ..Default::default()
    };
    let mut stream = match c.watch(req(1)).await {
        Err(e) if e.kind() == Some("compacted") => {
            let oldest = e.oldest_revision().context("the compacted error names no revision")?;
            c.watch(req(oldest)).await?
        }
        other => other?,
    };
    let mut out = std::io::stdout().lock();
    while let Some(msg) = stream.message().await? {
        for e in &msg.events {
            let audited = matches!(
                e.r#type(),
                pb::EventType::Allocated
                    | pb::EventType::Released
                    | pb::EventType::Expired
                    | pb::EventType::ConflictObserved
            );
            if !audited {
                continue;
            }
            if json {
                writeln!(out, "{}", event_json(e))?;
            } else {
                let at = std::time::UNIX_EPOCH + Duration::from_millis(e.at_ms);
                writeln!(out, "{}  {}", humantime::format_rfc3339_seconds(at), event_text(e))?;
            }
        }
        out.flush()?;
        if !follow && msg.revision >= end {
            return Ok(());
        }
    }
    bail!("the node ended the stream before the log was complete; run `portmesh log` again")
}
