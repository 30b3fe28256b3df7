//! `pools ls|add|rm|cooldown`.

use anyhow::{Context, Result};
use portmesh_client::{Client, pb};
use serde_json::json;

use crate::args::PoolsCommand;
use crate::render::{print_or_json, ranges_text};

pub async fn pools(c: &Client, team: &str, p: &PoolsCommand, json: bool) -> Result<()> {
    match p {
        PoolsCommand::Ls => {
            let r = c.list_pools(pb::ListPoolsRequest::default()).await?;
            if json {
                let list: Vec<_> = r
                    .pools
                    .iter()
                    .map(|p| json!({"team": p.team, "name": p.name, "ranges": ranges_text(&p.ranges), "size": p.size,
                                    "allocated": p.allocated, "reserved": p.reserved, "cooling": p.cooling}))
                    .collect();
                println!("{}", json!({"pools": list, "cooldown_ms": r.cooldown_ms}));
            } else {
                let rows: Vec<Vec<String>> = r
                    .pools
                    .iter()
                    .map(|p| {
                        vec![
                            p.team.clone(),
                            p.name.clone(),
                            ranges_text(&p.ranges),
                            p.size.to_string(),
                            p.allocated.to_string(),
                            p.reserved.to_string(),
                            p.cooling.to_string(),
                        ]
                    })
                    .collect();
                let header = ["TEAM", "POOL", "RANGES", "SIZE", "USED", "RESERVED", "COOLING"];
                println!("{}", crate::render::table(&header, &rows, &[3, 4, 5, 6]));
                println!("cool-down after release: {}", cooldown_text(r.cooldown_ms));
            }
            Ok(())
        }
        PoolsCommand::Cooldown { duration: None } => {
            let ms = c.list_pools(pb::ListPoolsRequest::default()).await?.cooldown_ms;
            print_or_json(json, &cooldown_text(ms), || json!({"cooldown_ms": ms}));
            Ok(())
        }
        PoolsCommand::Cooldown { duration: Some(d) } => {
            let req =
                pb::SetCooldownRequest { cooldown_ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX) };
            let r = c.set_cooldown(req).await?;
            print_or_json(
                json,
                &format!(
                    "cool-down after release set to {} (revision {})",
                    cooldown_text(r.cooldown_ms),
                    r.revision
                ),
                || json!({"cooldown_ms": r.cooldown_ms, "revision": r.revision}),
            );
            Ok(())
        }
        PoolsCommand::Add { name, range } => {
            let ranges = portmesh_core::PortRange::parse_list(range)
                .with_context(|| format!("pool {name:?}: bad range {range:?}"))?;
            let p = c
                .add_pool(pb::AddPoolRequest {
                    team: team.into(),
                    name: name.into(),
                    ranges: ranges.into_iter().map(Into::into).collect(),
                })
                .await?;
            print_or_json(
                json,
                &format!("added pool {} ({}) to team {}", p.name, ranges_text(&p.ranges), p.team),
                || json!({"team": p.team, "name": p.name, "ranges": ranges_text(&p.ranges), "size": p.size}),
            );
            warn_ephemeral(&p);
            Ok(())
        }
        PoolsCommand::Rm { name } => {
            c.remove_pool(pb::RemovePoolRequest { team: team.into(), name: name.into() }).await?;
            print_or_json(
                json,
                &format!("removed pool {name} from team {team}"),
                || json!({"team": team, "name": name}),
            );
            Ok(())
        }
    }
}

/// "60s", or "off" for 0.
fn cooldown_text(ms: u64) -> String {
    if ms == 0 { "off".into() } else { crate::render::fmt_dur(std::time::Duration::from_millis(ms)) }
}

fn warn_ephemeral(p: &pb::Pool) {
    let (lo, hi) = portmesh_probe::ephemeral_range();
    for r in &p.ranges {
        if portmesh_core::PortRange::try_from(r).is_ok_and(|r| r.meets((lo, hi))) {
            eprintln!(
                "warning: pool {} range {}-{} overlaps this host's ephemeral range {lo}-{hi}: outgoing connections may take its ports at any time",
                p.name, r.start, r.end
            );
        }
    }
}
