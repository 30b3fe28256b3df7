//! Leases: grant, revoke, the leader's checkpoints and expiries, and what ending a lease takes
//! with it (its allocations and registrations).

use super::*;

impl State {
    pub(super) fn insert_lease(&mut self, revision: u64, now: u64, team: &str, ttl_ms: u64) -> Lease {
        let id = self.meta.next_lease_id;
        self.meta.next_lease_id += 1;
        let deadline_ms = self.meta.lease_clock_ms + ttl_ms;
        let lease = Lease { id, team: team.into(), ttl_ms, deadline_ms, granted_ms: now, revision };
        self.leases.insert(id, Box::new(lease.clone()));
        self.emit(revision, now, EventKind::LeaseGranted { id, team: team.into(), ttl_ms });
        lease
    }

    pub(super) fn grant_lease(
        &mut self,
        ctx: ApplyCtx,
        team: &str,
        ttl_ms: u64,
    ) -> Result<Response, Rejection> {
        check_ttl(ttl_ms)?;
        check_name("team", team)?;
        let revision = self.bump();
        Ok(Response::LeaseGranted(self.insert_lease(revision, ctx.now_ms, team, ttl_ms)))
    }

    /// Drops a lease and releases everything attached, under one revision.
    pub(super) fn end_lease(
        &mut self,
        id: u64,
        cause: ReleaseCause,
        revision: u64,
        now: u64,
    ) -> Vec<Allocation> {
        let Some(lease) = self.leases.remove(&id).map(|l| *l) else { return Vec::new() };
        let ports: Vec<u16> = self.lease_ports(id).collect();
        let released =
            ports.into_iter().filter_map(|p| self.remove_allocation(p, cause, revision, now)).collect();
        let services: Vec<(String, String)> =
            self.lease_services.get(&id).into_iter().flatten().cloned().collect();
        for key in services {
            self.remove_service(&key, cause, revision, now);
        }
        let kind = match cause {
            ReleaseCause::LeaseExpired => EventKind::LeaseExpired { id, team: lease.team.into() },
            _ => EventKind::LeaseRevoked { id, team: lease.team.into() },
        };
        self.emit(revision, now, kind);
        released
    }

    pub(super) fn revoke_lease(&mut self, ctx: ApplyCtx, team: &str, id: u64) -> Result<Response, Rejection> {
        match self.leases.get(&id) {
            Some(l) if l.team == team => {}
            _ => return Err(Rejection::UnknownLease { team: team.into(), id }),
        }
        let revision = self.bump();
        let released = self.end_lease(id, ReleaseCause::LeaseRevoked, revision, ctx.now_ms);
        Ok(Response::LeaseRevoked { id, released, revision })
    }

    pub(super) fn checkpoint(&mut self, clock_ms: u64, remaining: &[(u64, u64)]) -> Response {
        if clock_ms > self.meta.lease_clock_ms {
            self.meta.lease_clock_ms = clock_ms;
        }
        let clock = self.meta.lease_clock_ms;
        let mut n = 0;
        for &(id, ms) in remaining {
            if let Some(l) = self.leases.get_mut(&id) {
                l.deadline_ms = clock + ms.min(l.ttl_ms);
                n += 1;
            }
        }
        Response::Checkpointed { leases: n }
    }

    pub(super) fn expire(&mut self, ctx: ApplyCtx, ids: &[u64]) -> Response {
        let live: Vec<u64> = ids.iter().copied().filter(|id| self.leases.contains_key(id)).collect();
        if live.is_empty() {
            return Response::Expired { ids: Vec::new(), released: Vec::new(), revision: self.meta.revision };
        }
        let revision = self.bump();
        let mut released = Vec::new();
        for id in &live {
            released.extend(self.end_lease(*id, ReleaseCause::LeaseExpired, revision, ctx.now_ms));
        }
        Response::Expired { ids: live, released, revision }
    }
}
