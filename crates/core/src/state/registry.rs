//! The service registry: register, deregister, health transitions.

use super::*;

impl State {
    /// Inserts a service and indexes it.
    pub(super) fn insert_service_unmarked(&mut self, svc: Service) {
        let key = (svc.team.clone(), svc.id.clone());
        if let Some(l) = svc.lease_id {
            self.lease_services.entry(l).or_default().insert(key.clone());
        }
        self.services.insert(key, svc);
    }

    /// Removes a service and its index entry.
    pub(super) fn take_service(&mut self, key: &(String, String)) -> Option<Service> {
        let svc = self.services.remove(key)?;
        if let Some(l) = svc.lease_id
            && let Some(set) = self.lease_services.get_mut(&l)
        {
            set.remove(key);
            if set.is_empty() {
                self.lease_services.remove(&l);
            }
        }
        Some(svc)
    }

    pub(super) fn remove_service(
        &mut self,
        key: &(String, String),
        cause: ReleaseCause,
        revision: u64,
        now: u64,
    ) {
        if let Some(svc) = self.take_service(key) {
            self.emit(revision, now, EventKind::ServiceDeregistered { service: Box::new(svc), cause });
        }
    }

    pub(super) fn register(&mut self, ctx: ApplyCtx, svc: &Service) -> Result<Response, Rejection> {
        check_service(svc)?;
        if let Some(id) = svc.lease_id {
            match self.leases.get(&id) {
                Some(l) if l.team == svc.team => {}
                _ => return Err(Rejection::UnknownLease { team: svc.team.clone(), id }),
            }
        }
        let revision = self.bump();
        let (service, replaced) = self.insert_registration(revision, ctx.now_ms, svc.clone());
        Ok(Response::Registered { service: Box::new(service), replaced, revision })
    }

    /// Stores `new` (checked: [`check_service`], its lease live) at `revision`, replacing the
    /// entry with its team and id; returns it as stored and whether it replaced one.
    pub(super) fn insert_registration(
        &mut self,
        revision: u64,
        now: u64,
        mut new: Service,
    ) -> (Service, bool) {
        let key = (new.team.clone(), new.id.clone());
        let previous = self.take_service(&key);
        new.registered_ms = now;
        new.revision = revision;
        // Re-registering the same service with the same check keeps what its checks found.
        match previous.as_ref().filter(|p| p.check == new.check && p.host == new.host && p.ports == new.ports)
        {
            Some(p) => {
                new.status = p.status;
                new.output = p.output.clone();
                new.status_ms = p.status_ms;
            }
            None => {
                new.status = if new.check.is_some() { HealthStatus::Unknown } else { HealthStatus::Passing };
                new.output = String::new();
                new.status_ms = now;
            }
        }
        self.insert_service_unmarked(new.clone());
        self.emit(revision, now, EventKind::ServiceRegistered(Box::new(new.clone())));
        (new, previous.is_some())
    }

    pub(super) fn deregister(&mut self, ctx: ApplyCtx, team: &str, id: &str) -> Result<Response, Rejection> {
        let Some(svc) = self.take_service(&(team.to_string(), id.to_string())) else {
            return Err(Rejection::UnknownService { team: team.into(), id: id.into() });
        };
        let revision = self.bump();
        let kind =
            EventKind::ServiceDeregistered { service: Box::new(svc.clone()), cause: ReleaseCause::Released };
        self.emit(revision, ctx.now_ms, kind);
        Ok(Response::Deregistered { service: Box::new(svc), revision })
    }

    /// Applies the updates that change a status (one revision for all of them); the others,
    /// and updates of services that are gone, are ignored.
    pub(super) fn set_health(&mut self, ctx: ApplyCtx, updates: &[HealthUpdate]) -> Response {
        let mut revision = None;
        let mut changed = 0;
        for u in updates {
            let key = (u.team.clone(), u.id.clone());
            if self.services.get(&key).is_none_or(|svc| svc.status == u.status) {
                continue;
            }
            let rev = *revision.get_or_insert_with(|| self.bump());
            let Some(svc) = self.services.get_mut(&key) else { continue };
            let previous = svc.status;
            svc.status = u.status;
            svc.output = clip_output(&u.output);
            svc.status_ms = ctx.now_ms;
            let kind = EventKind::HealthChanged(Box::new(HealthChange {
                team: svc.team.clone(),
                id: svc.id.clone(),
                name: svc.name.clone(),
                host: svc.host.clone(),
                previous,
                status: u.status,
                output: svc.output.clone(),
            }));
            self.emit(rev, ctx.now_ms, kind);
            changed += 1;
        }
        Response::HealthSet { changed, revision: revision.unwrap_or(self.meta.revision) }
    }
}

/// At most [`MAX_CHECK_OUTPUT`] bytes of a check's output, cut at a character boundary, with
/// control characters as spaces (the output goes into log lines and `watch` output).
pub fn clip_output(s: &str) -> String {
    crate::text::clean_text_to(s, MAX_CHECK_OUTPUT)
}

pub(super) fn check_service(svc: &Service) -> Result<(), Rejection> {
    check_name("team", &svc.team)?;
    check_name("service", &svc.name)?;
    if svc.id.is_empty() || svc.id.len() > 255 || svc.id.chars().any(char::is_control) {
        return Err(Rejection::Invalid(format!(
            "service id {:?} is not valid: use 1-255 printable characters",
            svc.id
        )));
    }
    for (what, v) in [("project", &svc.project), ("env", &svc.env), ("instance", &svc.instance)] {
        if let Some(v) = v {
            check_name(what, v)?;
        }
    }
    if svc.host.is_empty() {
        return Err(Rejection::Invalid(format!("service {:?} needs the host it runs on", svc.name)));
    }
    if svc.ports.is_empty() {
        return Err(Rejection::Invalid(format!("service {:?} needs at least one port", svc.name)));
    }
    if svc.ports.len() > MAX_SERVICE_PORTS || svc.tags.len() > MAX_SERVICE_PORTS {
        return Err(Rejection::Invalid(format!(
            "service {:?}: at most {MAX_SERVICE_PORTS} ports and {MAX_SERVICE_PORTS} tags",
            svc.name
        )));
    }
    let mut names = BTreeSet::new();
    for p in &svc.ports {
        check_name("port", &p.name)?;
        if p.port < crate::MIN_PORT {
            return Err(Rejection::PortOutOfRange { port: u32::from(p.port) });
        }
        if !names.insert(p.name.as_str()) {
            return Err(Rejection::Invalid(format!(
                "service {:?} names port {:?} twice: port names must be unique",
                svc.name, p.name
            )));
        }
    }
    if let Some(c) = &svc.check {
        if c.interval_ms < MIN_CHECK_INTERVAL_MS {
            return Err(Rejection::Invalid(format!(
                "check interval {} ms is too short: use at least {MIN_CHECK_INTERVAL_MS} ms",
                c.interval_ms
            )));
        }
        if c.timeout_ms == 0 || c.timeout_ms > c.interval_ms.max(MIN_CHECK_INTERVAL_MS) * 10 {
            return Err(Rejection::Invalid(format!(
                "check timeout {} ms is not valid: use more than 0 and at most ten intervals",
                c.timeout_ms
            )));
        }
        if c.failures == 0 {
            return Err(Rejection::Invalid("check failures must be at least 1".into()));
        }
        if let Some(name) = &c.port
            && svc.port(name).is_none()
        {
            let known = svc.ports.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ");
            return Err(Rejection::Invalid(format!(
                "the check names port {name:?}, but service {:?} has ports: {known}",
                svc.name
            )));
        }
        match &c.kind {
            CheckKind::Http { path } if !path.starts_with('/') => {
                return Err(Rejection::Invalid(format!("http check path {path:?} must start with '/'")));
            }
            CheckKind::Command { command } if command.trim().is_empty() => {
                return Err(Rejection::Invalid("a command check needs a command".into()));
            }
            _ => {}
        }
    }
    Ok(())
}
