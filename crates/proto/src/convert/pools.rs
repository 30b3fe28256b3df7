//! Pools: `Pools` requests and a pool with its usage.

use portmesh_core as core;

use super::{BadRequest, name, team};
use crate::v1 as pb;

/// A pool and how much of it is in use.
impl From<(&core::Pool, &core::PoolUsage)> for pb::Pool {
    fn from((p, usage): (&core::Pool, &core::PoolUsage)) -> Self {
        pb::Pool {
            team: p.team.clone(),
            name: p.name.clone(),
            ranges: p.ranges.iter().copied().map(Into::into).collect(),
            size: usage.size,
            allocated: usage.allocated,
            reserved: usage.reserved,
            cooling: usage.cooling,
        }
    }
}

impl TryFrom<&pb::AddPoolRequest> for core::Command {
    type Error = BadRequest;

    fn try_from(req: &pb::AddPoolRequest) -> Result<Self, Self::Error> {
        name("name", &req.name)?;
        if req.ranges.is_empty() {
            return Err(BadRequest("ranges: give at least one range".into()));
        }
        Ok(core::Command::AddPool {
            team: team(&req.team)?,
            name: req.name.clone(),
            ranges: req.ranges.iter().map(TryInto::try_into).collect::<Result<_, _>>()?,
        })
    }
}

impl TryFrom<&pb::RemovePoolRequest> for core::Command {
    type Error = BadRequest;

    fn try_from(req: &pb::RemovePoolRequest) -> Result<Self, Self::Error> {
        name("name", &req.name)?;
        Ok(core::Command::RemovePool { team: team(&req.team)?, name: req.name.clone() })
    }
}

impl TryFrom<&pb::SetCooldownRequest> for core::Command {
    type Error = BadRequest;

    fn try_from(req: &pb::SetCooldownRequest) -> Result<Self, Self::Error> {
        if req.cooldown_ms > core::MAX_COOLDOWN_MS {
            return Err(BadRequest(format!(
                "cooldown_ms: at most {} (one day), got {}",
                core::MAX_COOLDOWN_MS,
                req.cooldown_ms
            )));
        }
        Ok(core::Command::SetCooldown { ms: req.cooldown_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cooldown_is_at_most_a_day() {
        let day = pb::SetCooldownRequest { cooldown_ms: core::MAX_COOLDOWN_MS };
        let Ok(core::Command::SetCooldown { ms }) = core::Command::try_from(&day) else {
            panic!("refused a day")
        };
        assert_eq!(ms, core::MAX_COOLDOWN_MS);
        let off = pb::SetCooldownRequest { cooldown_ms: 0 };
        assert!(matches!(core::Command::try_from(&off), Ok(core::Command::SetCooldown { ms: 0 })));
        let more = pb::SetCooldownRequest { cooldown_ms: core::MAX_COOLDOWN_MS + 1 };
        assert_eq!(
            core::Command::try_from(&more).unwrap_err().0,
            "cooldown_ms: at most 86400000 (one day), got 86400001"
        );
    }

    #[test]
    fn a_pool_needs_a_valid_range() {
        let req = pb::AddPoolRequest { name: "web".into(), ..Default::default() };
        assert_eq!(core::Command::try_from(&req).unwrap_err().0, "ranges: give at least one range");
        let req = pb::AddPoolRequest { ranges: vec![pb::PortRange { start: 9000, end: 8000 }], ..req };
        assert!(core::Command::try_from(&req).is_err());
        let req = pb::AddPoolRequest { ranges: vec![pb::PortRange { start: 8000, end: 8099 }], ..req };
        let core::Command::AddPool { team, ranges, .. } = core::Command::try_from(&req).unwrap() else {
            panic!("not an AddPool")
        };
        assert_eq!((team.as_str(), ranges.len()), ("default", 1));
    }
}
