//! Statistics and recommendations (`Pools.Stats`).

use portmesh_core as core;

use crate::v1 as pb;

/// Statistics as of `revision`.
impl From<(&core::stats::Stats, u64)> for pb::StatsResponse {
    fn from((s, revision): (&core::stats::Stats, u64)) -> Self {
        pb::StatsResponse {
            window_ms: s.window_ms,
            pools: s
                .pools
                .iter()
                .map(|p| pb::PoolStats {
                    team: p.team.clone(),
                    name: p.name.clone(),
                    ranges: p.ranges.clone(),
                    size: p.size,
                    in_use: p.in_use,
                    reserved: p.reserved,
                    cooling: p.cooling,
                    peak: p.peak,
                    allocations: p.allocations,
                    releases: p.releases,
                    net_per_hour: p.net_per_hour,
                    exhaustion_ms: p.exhaustion_ms.unwrap_or(0),
                })
                .collect(),
            contested: s
                .contested
                .iter()
                .map(|c| pb::ContestedPort {
                    port: c.port.into(),
                    team: c.team.clone(),
                    pool: c.pool.clone(),
                    conflicts: c.conflicts,
                    holders: c.holders.clone(),
                    last_ms: c.last_ms,
                })
                .collect(),
            recommendations: s
                .recommendations
                .iter()
                .map(|r| pb::Recommendation {
                    rule: r.rule.to_string(),
                    reason: r.reason.clone(),
                    command: r.command.clone(),
                })
                .collect(),
            revision,
        }
    }
}
