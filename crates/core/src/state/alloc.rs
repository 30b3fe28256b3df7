//! Allocations: an all-or-nothing batch, and releasing ports.

use super::*;

impl State {
    pub(super) fn allocate(&mut self, ctx: ApplyCtx, batch: &AllocateBatch) -> Result<Response, Rejection> {
        if batch.items.is_empty() {
            return Err(Rejection::Invalid("an allocation needs at least one item".into()));
        }
        if batch.items.len() > MAX_BATCH {
            return Err(Rejection::Invalid(format!(
                "a batch holds at most {MAX_BATCH} items, this one has {}",
                batch.items.len()
            )));
        }
        let mut keys = BTreeSet::new();
        for item in &batch.items {
            if item.service.is_empty() {
                return Err(Rejection::Invalid("every allocation needs a service name".into()));
            }
            if let Some(k) = &item.key
                && !keys.insert(k.as_str())
            {
                return Err(Rejection::Invalid(format!("key {k:?} appears twice in one batch")));
            }
        }
        let lease_id = match batch.lease {
            LeaseSpec::None => None,
            LeaseSpec::Existing(id) => match self.leases.get(&id) {
                Some(l) if l.team == batch.team => Some(id),
                _ => return Err(Rejection::UnknownLease { team: batch.team.clone(), id }),
            },
            LeaseSpec::New { ttl_ms } => {
                check_ttl(ttl_ms)?;
                Some(self.meta.next_lease_id)
            }
        };

        // Phase 1: choose every port without touching the state.
        enum Plan<'i> {
            Existing(u16),
            New(&'i AllocItem, Pick),
        }
        let mut rng = SplitMix64::new(ctx.seed());
        let known_busy = batch.probe.as_ref().map_or(&[][..], |p| &p.known_busy);
        let mut sel = self.selector(batch, ctx.now_ms, known_busy);
        let mut plans = Vec::with_capacity(batch.items.len());
        for item in &batch.items {
            if let Some(a) = item.key.as_deref().and_then(|k| self.live_key(&batch.team, k)) {
                plans.push(Plan::Existing(a.port));
                continue;
            }
            let pick = sel.pick(item, &mut rng)?;
            sel.taken.insert(pick.port);
            plans.push(Plan::New(item, pick));
        }
        let registration = match &batch.register {
            None => None,
            Some(reg) => {
                let ports: Vec<(u16, bool)> = plans
                    .iter()
                    .map(|p| match p {
                        Plan::Existing(port) => {
                            (*port, self.allocations.get(port).is_some_and(|a| a.lease_id == lease_id))
                        }
                        Plan::New(_, pick) => (pick.port, true),
                    })
                    .collect();
                registration_of(batch, reg, &ports, lease_id)?
            }
        };

        // Phase 2: commit.
        let revision = self.bump();
        let now = ctx.now_ms;
        let lease = match batch.lease {
            LeaseSpec::New { ttl_ms } => Some(self.insert_lease(revision, now, &batch.team, ttl_ms)),
            _ => None,
        };
        let mut grants = Vec::with_capacity(plans.len());
        for plan in plans {
            match plan {
                Plan::Existing(port) => {
                    if let Some(a) = self.allocations.get(&port) {
                        grants.push(Grant { allocation: (**a).clone(), existing: true, moved_from: None });
                    }
                }
                Plan::New(item, pick) => {
                    for port in pick.conflicts {
                        let holder = batch.probe.as_ref().and_then(|p| p.owner(port));
                        if !self.last_conflicts.is_news(&batch.host, port, holder.map(|h| h.pid), now) {
                            continue;
                        }
                        let c = Conflict {
                            port,
                            team: batch.team.clone(),
                            pool: pick.pool.clone(),
                            service: item.service.clone(),
                            host: batch.host.clone(),
                            holder: holder.cloned(),
                        };
                        self.emit(revision, now, EventKind::Conflict(Box::new(c)));
                    }
                    let a = Allocation {
                        port: pick.port,
                        team: batch.team.as_str().into(),
                        pool: pick.pool.into(),
                        service: item.service.as_str().into(),
                        instance: item.instance.as_deref().map(Into::into),
                        env: item.env.as_deref().map(Into::into),
                        host: batch.host.as_str().into(),
                        key: item.key.as_deref().map(Into::into),
                        lease_id,
                        created_ms: now,
                        revision,
                        holder: batch.holder.clone(),
                    };
                    let last =
                        item.key.as_ref().and_then(|k| self.sticky.get(&(batch.team.clone(), k.clone())));
                    let moved_from = last.copied().filter(|p| *p != pick.port);
                    self.insert_allocation(a.clone());
                    self.emit(revision, now, EventKind::Allocated(Box::new(a.clone())));
                    grants.push(Grant { allocation: a, existing: false, moved_from });
                }
            }
        }
        let registered = registration.map(|svc| Box::new(self.insert_registration(revision, now, svc).0));
        Ok(Response::Allocated { grants, lease, revision, registered })
    }

    pub(super) fn insert_allocation(&mut self, a: Allocation) {
        let port = a.port;
        if let Some(k) = &a.key {
            let tk = (a.team.to_string(), k.to_string());
            self.live_keys.insert(tk.clone(), port);
            self.remember(tk, port);
        }
        if let Some(l) = a.lease_id {
            self.lease_ports.insert((l, port));
        }
        if let Some(c) = self.cooldowns.remove(&port) {
            self.cooldown_order.remove(&(c.until_ms, port));
            self.cooling.remove(port);
        }
        self.allocated.insert(port);
        self.allocations.insert(port, Box::new(a));
    }

    /// Removes one allocation, starts its cool-down and emits the event.
    pub(super) fn remove_allocation(
        &mut self,
        port: u16,
        cause: ReleaseCause,
        revision: u64,
        now: u64,
    ) -> Option<Allocation> {
        let a = *self.allocations.remove(&port)?;
        self.allocated.remove(port);
        if let Some(k) = &a.key {
            self.live_keys.remove(&(a.team.to_string(), k.to_string()));
        }
        if let Some(l) = a.lease_id {
            self.lease_ports.remove(&(l, port));
        }
        if self.meta.cooldown_ms > 0 {
            let until_ms = now.saturating_add(self.meta.cooldown_ms);
            let c =
                Cooldown { until_ms, team: a.team.to_string(), key: a.key.as_ref().map(ToString::to_string) };
            if let Some(old) = self.cooldowns.insert(port, c) {
                self.cooldown_order.remove(&(old.until_ms, port));
            }
            self.cooldown_order.insert((until_ms, port));
            self.cooling.insert(port);
        }
        self.emit(revision, now, EventKind::Released { allocation: Box::new(a.clone()), cause });
        Some(a)
    }

    pub(super) fn release(
        &mut self,
        ctx: ApplyCtx,
        team: &str,
        selector: &ReleaseSelector,
    ) -> Result<Response, Rejection> {
        let ports: Vec<u16> = match selector {
            ReleaseSelector::Ports(ports) => {
                if ports.is_empty() {
                    return Err(Rejection::Invalid("name at least one port to release".into()));
                }
                for &port in ports {
                    if port < crate::MIN_PORT {
                        return Err(Rejection::PortOutOfRange { port: u32::from(port) });
                    }
                    match self.allocations.get(&port) {
                        Some(a) if a.team == team => {}
                        _ => return Err(Rejection::NotAllocated { team: team.to_string(), port }),
                    }
                }
                let mut p = ports.clone();
                p.sort_unstable();
                p.dedup();
                p
            }
            ReleaseSelector::Key(key) => match self.live_key(team, key) {
                Some(a) => vec![a.port],
                None => return Err(Rejection::UnknownKey { team: team.to_string(), key: key.clone() }),
            },
        };
        let revision = self.bump();
        let allocations = ports
            .into_iter()
            .filter_map(|p| self.remove_allocation(p, ReleaseCause::Released, revision, ctx.now_ms))
            .collect();
        Ok(Response::Released { allocations, revision })
    }
}

/// The service `batch` registers (`reg`) on the ports it gets (`ports`, in item order, each with
/// whether it is new or already on the batch's lease), checked; `None` when some port is held
/// under another lease (see [`AllocateBatch::register`]).
fn registration_of(
    batch: &AllocateBatch,
    reg: &Service,
    ports: &[(u16, bool)],
    lease_id: Option<u64>,
) -> Result<Option<Service>, Rejection> {
    if reg.ports.len() != ports.len() {
        return Err(Rejection::Invalid(format!(
            "register.ports: {} named for {} items: name one port per item, in item order",
            reg.ports.len(),
            ports.len()
        )));
    }
    if !ports.iter().all(|(_, ours)| *ours) {
        return Ok(None);
    }
    let mut svc = reg.clone();
    svc.team = batch.team.clone();
    svc.host = batch.host.clone();
    svc.lease_id = lease_id;
    for (p, (port, _)) in svc.ports.iter_mut().zip(ports) {
        p.port = *port;
    }
    if svc.id.is_empty() {
        svc.id = Service::default_id(&svc.name, &svc.host, ports[0].0);
    }
    super::registry::check_service(&svc)?;
    Ok(Some(svc))
}
