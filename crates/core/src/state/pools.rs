//! Pools and reservations.

use super::*;

impl State {
    pub(super) fn reserve(&mut self, ctx: ApplyCtx, port: u16, reason: &str) -> Result<Response, Rejection> {
        if port < crate::MIN_PORT {
            return Err(Rejection::PortOutOfRange { port: u32::from(port) });
        }
        if let Some(r) = self.reservations.get(&port) {
            return Err(Rejection::AlreadyReserved { port, reason: r.reason.clone() });
        }
        if let Some(a) = self.allocations.get(&port) {
            return Err(Rejection::ReserveAllocated {
                port,
                team: a.team.to_string(),
                service: a.service.to_string(),
            });
        }
        let revision = self.bump();
        let r = Reservation { port, reason: reason.to_string(), created_ms: ctx.now_ms, revision };
        self.reservations.insert(port, r.clone());
        self.emit(revision, ctx.now_ms, EventKind::Reserved(r.clone()));
        Ok(Response::Reserved(r))
    }

    pub(super) fn unreserve(&mut self, ctx: ApplyCtx, port: u16) -> Result<Response, Rejection> {
        if self.reservations.remove(&port).is_none() {
            return Err(Rejection::NotReserved { port });
        }
        let revision = self.bump();
        self.emit(revision, ctx.now_ms, EventKind::Unreserved { port });
        Ok(Response::Unreserved { port, revision })
    }

    pub(super) fn add_pool(
        &mut self,
        ctx: ApplyCtx,
        team: &str,
        name: &str,
        ranges: &[PortRange],
    ) -> Result<Response, Rejection> {
        check_name("team", team)?;
        check_name("pool", name)?;
        if ranges.is_empty() {
            return Err(Rejection::InvalidRange(format!("pool {name:?} needs at least one range")));
        }
        let mut sorted = ranges.to_vec();
        sorted.sort();
        for w in sorted.windows(2) {
            if w[0].overlaps(&w[1]) {
                return Err(Rejection::InvalidRange(format!(
                    "ranges {} and {} of pool {name:?} overlap each other",
                    w[0], w[1]
                )));
            }
        }
        if let Some(p) = self.pool(team, name) {
            return Err(Rejection::PoolExists {
                team: team.into(),
                pool: name.into(),
                ranges: p.ranges_text(),
            });
        }
        for r in &sorted {
            for p in self.pools.values() {
                if let Some(o) = p.ranges.iter().find(|o| o.overlaps(r)) {
                    return Err(Rejection::RangeOverlap(Box::new(Overlap {
                        team: team.into(),
                        pool: name.into(),
                        range: r.to_string(),
                        other_team: p.team.clone(),
                        other_pool: p.name.clone(),
                        other_range: o.to_string(),
                    })));
                }
            }
        }
        let revision = self.bump();
        let pool = Pool { team: team.into(), name: name.into(), ranges: sorted, revision };
        self.pools.insert((team.into(), name.into()), pool.clone());
        self.emit(revision, ctx.now_ms, EventKind::PoolAdded(Box::new(pool.clone())));
        Ok(Response::PoolAdded(pool))
    }

    pub(super) fn remove_pool(
        &mut self,
        ctx: ApplyCtx,
        team: &str,
        name: &str,
    ) -> Result<Response, Rejection> {
        let Some(pool) = self.pool(team, name) else {
            let known = self.team_pools(team).map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ");
            return Err(Rejection::UnknownPool { team: team.into(), pool: name.into(), known });
        };
        let live = self.allocations.values().filter(|a| a.team == team && a.pool == name).count();
        if live > 0 {
            return Err(Rejection::PoolInUse { team: team.into(), pool: pool.name.clone(), live });
        }
        self.pools.remove(&(team.to_string(), name.to_string()));
        let revision = self.bump();
        self.emit(revision, ctx.now_ms, EventKind::PoolRemoved { team: team.into(), name: name.into() });
        Ok(Response::PoolRemoved { team: team.into(), name: name.into(), revision })
    }
}
