//! Conversions between wire messages and core types. Validation of client input happens here.

use portmesh_core as core;

use crate::v1 as pb;

/// A request that cannot be turned into a command: which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// The wire form of a holder is a pid (0: none) and a command line.
fn holder(pid: u32, command: &str) -> Option<core::Holder> {
    (pid != 0).then(|| core::Holder { pid, command: command.to_string() })
}

fn pid_of(h: &Option<core::Holder>) -> u32 {
    h.as_ref().map_or(0, |h| h.pid)
}

fn command_of(h: &Option<core::Holder>) -> String {
    h.as_ref().map(|h| h.command.clone()).unwrap_or_default()
}

fn port(p: u32, field: &str) -> Result<Option<u16>, BadRequest> {
    match p {
        0 => Ok(None),
        1024..=65535 => Ok(Some(p as u16)),
        _ => Err(BadRequest(format!("{field}: port {p} is out of range: ports must lie in 1024-65535"))),
    }
}

pub fn strategy_from_pb(s: i32) -> Result<core::Strategy, BadRequest> {
    match pb::Strategy::try_from(s) {
        Ok(pb::Strategy::Unspecified | pb::Strategy::Sticky) => Ok(core::Strategy::Sticky),
        Ok(pb::Strategy::Next) => Ok(core::Strategy::Next),
        Ok(pb::Strategy::Random) => Ok(core::Strategy::Random),
        Ok(pb::Strategy::Fail) => Ok(core::Strategy::Fail),
        Err(_) => Err(BadRequest(format!("unknown strategy {s}"))),
    }
}

pub fn strategy_to_pb(s: core::Strategy) -> pb::Strategy {
    match s {
        core::Strategy::Sticky => pb::Strategy::Sticky,
        core::Strategy::Next => pb::Strategy::Next,
        core::Strategy::Random => pb::Strategy::Random,
        core::Strategy::Fail => pb::Strategy::Fail,
    }
}

impl TryFrom<&pb::AllocItem> for core::AllocItem {
    type Error = BadRequest;

    fn try_from(i: &pb::AllocItem) -> Result<Self, Self::Error> {
        Ok(core::AllocItem {
            pool: opt(&i.pool),
            service: i.service.clone(),
            instance: opt(&i.instance),
            env: opt(&i.env),
            key: opt(&i.key),
            port: port(i.port, "items.port")?,
            strategy: strategy_from_pb(i.strategy)?,
        })
    }
}

impl pb::AllocateRequest {
    /// The lease part of the request.
    pub fn lease_spec(&self) -> Result<core::LeaseSpec, BadRequest> {
        match (self.lease_id, self.ttl_ms) {
            (0, 0) => Ok(core::LeaseSpec::None),
            (id, 0) => Ok(core::LeaseSpec::Existing(id)),
            (0, ttl_ms) => Ok(core::LeaseSpec::New { ttl_ms }),
            _ => Err(BadRequest("set either lease_id (attach) or ttl_ms (new lease), not both".into())),
        }
    }

    pub fn core_items(&self) -> Result<Vec<core::AllocItem>, BadRequest> {
        self.items.iter().map(core::AllocItem::try_from).collect()
    }

    /// The process the ports are for, if the client said.
    pub fn holder(&self) -> Option<core::Holder> {
        holder(self.pid, &self.command)
    }

    /// The ports the client reported busy on its host.
    pub fn reported_busy(&self) -> Result<Vec<u16>, BadRequest> {
        if self.busy_ports.len() > 1024 {
            return Err(BadRequest(format!("busy_ports: {} ports, at most 1024", self.busy_ports.len())));
        }
        self.busy_ports.iter().map(|p| required_port(*p, "busy_ports")).collect()
    }
}

impl pb::ReleaseRequest {
    pub fn selector(&self) -> Result<core::ReleaseSelector, BadRequest> {
        match (self.ports.is_empty(), self.key.is_empty()) {
            (false, true) => {
                let ports = self
                    .ports
                    .iter()
                    .map(|p| {
                        port(*p, "ports").and_then(|p| p.ok_or_else(|| BadRequest("ports: port 0".into())))
                    })
                    .collect::<Result<_, _>>()?;
                Ok(core::ReleaseSelector::Ports(ports))
            }
            (true, false) => Ok(core::ReleaseSelector::Key(self.key.clone())),
            _ => Err(BadRequest("name the ports to release or a key, not both and not neither".into())),
        }
    }
}

/// Parses a port that must be set.
pub fn required_port(p: u32, field: &str) -> Result<u16, BadRequest> {
    port(p, field)?.ok_or_else(|| BadRequest(format!("{field}: a port is required")))
}

impl TryFrom<&pb::PortRange> for core::PortRange {
    type Error = BadRequest;

    fn try_from(r: &pb::PortRange) -> Result<Self, Self::Error> {
        core::PortRange::new(r.start, r.end).map_err(|e| BadRequest(e.to_string()))
    }
}

impl From<core::PortRange> for pb::PortRange {
    fn from(r: core::PortRange) -> Self {
        pb::PortRange { start: r.start().into(), end: r.end().into() }
    }
}

impl From<&core::Allocation> for pb::Allocation {
    fn from(a: &core::Allocation) -> Self {
        pb::Allocation {
            port: a.port.into(),
            team: a.team.clone(),
            pool: a.pool.clone(),
            service: a.service.clone(),
            instance: a.instance.clone().unwrap_or_default(),
            env: a.env.clone().unwrap_or_default(),
            host: a.host.clone(),
            key: a.key.clone().unwrap_or_default(),
            lease_id: a.lease_id.unwrap_or(0),
            created_ms: a.created_ms,
            revision: a.revision,
            pid: pid_of(&a.holder),
            command: command_of(&a.holder),
        }
    }
}

impl From<&core::Reservation> for pb::Reservation {
    fn from(r: &core::Reservation) -> Self {
        pb::Reservation {
            port: r.port.into(),
            reason: r.reason.clone(),
            created_ms: r.created_ms,
            revision: r.revision,
        }
    }
}

impl pb::Pool {
    pub fn from_core(p: &core::Pool, usage: &core::PoolUsage) -> Self {
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

impl From<&core::Event> for pb::Event {
    fn from(e: &core::Event) -> Self {
        use core::EventKind as K;
        let mut out = pb::Event { revision: e.revision, seq: e.seq, at_ms: e.at_ms, ..Default::default() };
        let kind = match &e.kind {
            K::Allocated(a) => {
                out.allocation = Some(a.into());
                pb::EventType::Allocated
            }
            K::Released { allocation, cause } => {
                out.allocation = Some(allocation.into());
                out.cause = cause.to_string();
                match cause {
                    core::ReleaseCause::LeaseExpired => pb::EventType::Expired,
                    _ => pb::EventType::Released,
                }
            }
            K::Reserved(r) => {
                out.reservation = Some(r.into());
                pb::EventType::Reserved
            }
            K::Unreserved { port } => {
                out.port = (*port).into();
                pb::EventType::Unreserved
            }
            K::PoolAdded(p) => {
                let usage = core::PoolUsage { size: p.size(), allocated: 0, reserved: 0, cooling: 0 };
                out.pool = Some(pb::Pool::from_core(p, &usage));
                out.team = p.team.clone();
                out.pool_name = p.name.clone();
                pb::EventType::PoolAdded
            }
            K::PoolRemoved { team, name } => {
                out.team = team.clone();
                out.pool_name = name.clone();
                pb::EventType::PoolRemoved
            }
            K::LeaseGranted { id, team, ttl_ms } => {
                (out.lease_id, out.team, out.ttl_ms) = (*id, team.clone(), *ttl_ms);
                pb::EventType::LeaseGranted
            }
            K::LeaseRevoked { id, team } => {
                (out.lease_id, out.team) = (*id, team.clone());
                pb::EventType::LeaseRevoked
            }
            K::LeaseExpired { id, team } => {
                (out.lease_id, out.team) = (*id, team.clone());
                pb::EventType::LeaseExpired
            }
            K::Conflict(c) => {
                out.conflict = Some(pb::Conflict {
                    port: c.port.into(),
                    team: c.team.clone(),
                    pool: c.pool.clone(),
                    service: c.service.clone(),
                    host: c.host.clone(),
                    pid: pid_of(&c.holder),
                    command: command_of(&c.holder),
                });
                pb::EventType::ConflictObserved
            }
            K::CooldownChanged { ms } => {
                out.ttl_ms = *ms;
                pb::EventType::CooldownChanged
            }
            K::ServiceRegistered(svc) => {
                out.service = Some(svc.as_ref().into());
                pb::EventType::ServiceRegistered
            }
            K::ServiceDeregistered { service, cause } => {
                out.service = Some(service.as_ref().into());
                out.cause = cause.to_string();
                pb::EventType::ServiceDeregistered
            }
            K::HealthChanged { team, id, name, host, previous, status, output } => {
                (out.team, out.service_id, out.service_name, out.host) =
                    (team.clone(), id.clone(), name.clone(), host.clone());
                out.set_previous(health_to_pb(*previous));
                out.set_status(health_to_pb(*status));
                out.output = output.clone();
                pb::EventType::HealthChanged
            }
        };
        out.set_type(kind);
        out
    }
}

impl pb::Event {
    /// The team, pool and service the event belongs to, where it has them.
    pub fn scope(&self) -> (Option<&str>, Option<&str>, Option<&str>) {
        if let Some(a) = &self.allocation {
            return (Some(&a.team), Some(&a.pool), Some(&a.service));
        }
        if let Some(c) = &self.conflict {
            return (Some(&c.team), Some(&c.pool), Some(&c.service));
        }
        if let Some(svc) = &self.service {
            return (Some(&svc.team), None, Some(&svc.name));
        }
        if !self.service_name.is_empty() {
            return (Some(&self.team), None, Some(&self.service_name));
        }
        let team = (!self.team.is_empty()).then_some(self.team.as_str());
        let pool = (!self.pool_name.is_empty()).then_some(self.pool_name.as_str());
        (team, pool, None)
    }
}

impl pb::Lease {
    pub fn from_core(l: &core::Lease, ports: impl IntoIterator<Item = u16>) -> Self {
        pb::Lease {
            id: l.id,
            team: l.team.clone(),
            ttl_ms: l.ttl_ms,
            remaining_ms: l.remaining_ms,
            revision: l.revision,
            ports: ports.into_iter().map(u32::from).collect(),
        }
    }
}

pub fn health_to_pb(h: core::HealthStatus) -> pb::HealthStatus {
    match h {
        core::HealthStatus::Unknown => pb::HealthStatus::Unknown,
        core::HealthStatus::Passing => pb::HealthStatus::Passing,
        core::HealthStatus::Warning => pb::HealthStatus::Warning,
        core::HealthStatus::Critical => pb::HealthStatus::Critical,
    }
}

pub fn health_from_pb(h: i32) -> Result<core::HealthStatus, BadRequest> {
    match pb::HealthStatus::try_from(h) {
        Ok(pb::HealthStatus::Unknown) => Ok(core::HealthStatus::Unknown),
        Ok(pb::HealthStatus::Passing) => Ok(core::HealthStatus::Passing),
        Ok(pb::HealthStatus::Warning) => Ok(core::HealthStatus::Warning),
        Ok(pb::HealthStatus::Critical) => Ok(core::HealthStatus::Critical),
        Err(_) => Err(BadRequest(format!("unknown health status {h}"))),
    }
}

/// Default interval of a health check that names none.
const DEFAULT_CHECK_INTERVAL_MS: u64 = 10_000;
/// Default timeout of a health check that names none (at most its interval).
const DEFAULT_CHECK_TIMEOUT_MS: u64 = 2_000;

impl TryFrom<&pb::HealthCheck> for core::HealthCheck {
    type Error = BadRequest;

    fn try_from(c: &pb::HealthCheck) -> Result<Self, Self::Error> {
        let kind = match pb::CheckType::try_from(c.r#type) {
            Ok(pb::CheckType::CheckTcp) => core::CheckKind::Tcp,
            Ok(pb::CheckType::CheckHttp) => {
                core::CheckKind::Http { path: if c.path.is_empty() { "/".into() } else { c.path.clone() } }
            }
            Ok(pb::CheckType::CheckGrpc) => core::CheckKind::Grpc { service: c.grpc_service.clone() },
            Ok(pb::CheckType::CheckCommand) => core::CheckKind::Command { command: c.command.clone() },
            Ok(pb::CheckType::Unspecified) | Err(_) => {
                return Err(BadRequest(format!(
                    "check.type: {} is not a check type: use CHECK_TCP, CHECK_HTTP, CHECK_GRPC or CHECK_COMMAND",
                    c.r#type
                )));
            }
        };
        let interval_ms = if c.interval_ms == 0 { DEFAULT_CHECK_INTERVAL_MS } else { c.interval_ms };
        let timeout_ms =
            if c.timeout_ms == 0 { DEFAULT_CHECK_TIMEOUT_MS.min(interval_ms) } else { c.timeout_ms };
        Ok(core::HealthCheck {
            kind,
            port: opt(&c.port_name),
            interval_ms,
            timeout_ms,
            failures: c.failures.max(1),
        })
    }
}

impl From<&core::HealthCheck> for pb::HealthCheck {
    fn from(c: &core::HealthCheck) -> Self {
        let mut out = pb::HealthCheck {
            port_name: c.port.clone().unwrap_or_default(),
            interval_ms: c.interval_ms,
            timeout_ms: c.timeout_ms,
            failures: c.failures,
            ..Default::default()
        };
        out.set_kind(&c.kind);
        out
    }
}

impl pb::HealthCheck {
    /// Sets the type and its one field (path, service or command) from `kind`.
    pub fn set_kind(&mut self, kind: &core::CheckKind) {
        let t = match kind {
            core::CheckKind::Tcp => pb::CheckType::CheckTcp,
            core::CheckKind::Http { path } => {
                self.path = path.clone();
                pb::CheckType::CheckHttp
            }
            core::CheckKind::Grpc { service } => {
                self.grpc_service = service.clone();
                pb::CheckType::CheckGrpc
            }
            core::CheckKind::Command { command } => {
                self.command = command.clone();
                pb::CheckType::CheckCommand
            }
        };
        self.set_type(t);
    }
}

impl From<&core::Service> for pb::Service {
    fn from(s: &core::Service) -> Self {
        let mut out = pb::Service {
            team: s.team.clone(),
            id: s.id.clone(),
            name: s.name.clone(),
            project: s.project.clone().unwrap_or_default(),
            env: s.env.clone().unwrap_or_default(),
            instance: s.instance.clone().unwrap_or_default(),
            host: s.host.clone(),
            ports: s
                .ports
                .iter()
                .map(|p| pb::ServicePort {
                    name: p.name.clone(),
                    port: p.port.into(),
                    protocol: p.protocol.clone(),
                })
                .collect(),
            tags: s.tags.clone(),
            check: s.check.as_ref().map(Into::into),
            depends_on: s.depends_on.clone(),
            output: s.output.clone(),
            lease_id: s.lease_id.unwrap_or(0),
            pid: pid_of(&s.holder),
            command: command_of(&s.holder),
            registered_ms: s.registered_ms,
            revision: s.revision,
            status_ms: s.status_ms,
            ..Default::default()
        };
        out.set_status(health_to_pb(s.status));
        out
    }
}

impl pb::Service {
    /// The registration this message asks for. Empty team, host and id get their defaults
    /// (`default_host` is the receiving node's host). Status and times are left for `apply`.
    pub fn to_core(&self, default_host: &str) -> Result<core::Service, BadRequest> {
        if self.name.is_empty() {
            return Err(BadRequest("service.name: a service needs a name".into()));
        }
        let ports = self
            .ports
            .iter()
            .map(|p| {
                Ok(core::ServicePort {
                    name: if p.name.is_empty() { "main".into() } else { p.name.clone() },
                    port: required_port(p.port, "service.ports.port")?,
                    protocol: p.protocol.clone(),
                })
            })
            .collect::<Result<Vec<_>, BadRequest>>()?;
        let host = if self.host.is_empty() { default_host.to_string() } else { self.host.clone() };
        let id = match (self.id.is_empty(), ports.first()) {
            (false, _) => self.id.clone(),
            (true, Some(p)) => format!("{}@{host}:{}", self.name, p.port),
            (true, None) => self.name.clone(),
        };
        Ok(core::Service {
            team: core::team_or_default(&self.team).to_string(),
            id,
            name: self.name.clone(),
            project: opt(&self.project),
            env: opt(&self.env),
            instance: opt(&self.instance),
            host,
            ports,
            tags: self.tags.clone(),
            check: self.check.as_ref().map(TryInto::try_into).transpose()?,
            depends_on: self.depends_on.clone(),
            status: core::HealthStatus::Unknown,
            output: String::new(),
            lease_id: (self.lease_id != 0).then_some(self.lease_id),
            holder: holder(self.pid, &self.command),
            registered_ms: 0,
            revision: 0,
            status_ms: 0,
        })
    }
}

impl pb::StatsResponse {
    pub fn from_core(s: &core::stats::Stats, revision: u64) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_convert_with_defaults_and_round_trip() {
        let req = pb::Service {
            name: "api".into(),
            ports: vec![pb::ServicePort { port: 8001, ..Default::default() }],
            check: Some(pb::HealthCheck { r#type: pb::CheckType::CheckHttp as i32, ..Default::default() }),
            ..Default::default()
        };
        let s = req.to_core("laptop").unwrap();
        assert_eq!(
            (s.team.as_str(), s.id.as_str(), s.host.as_str()),
            ("default", "api@laptop:8001", "laptop")
        );
        assert_eq!(s.ports[0].name, "main");
        let c = s.check.clone().unwrap();
        assert_eq!(c.kind, core::CheckKind::Http { path: "/".into() });
        assert_eq!((c.interval_ms, c.timeout_ms, c.failures), (10_000, 2_000, 1));
        let back = pb::Service::from(&s);
        assert_eq!(back.to_core("elsewhere").unwrap(), s);

        let bad =
            pb::Service { ports: vec![pb::ServicePort { port: 80, ..Default::default() }], ..req.clone() };
        assert!(bad.to_core("h").unwrap_err().0.contains("port 80 is out of range"));
        let bad = pb::Service { name: String::new(), ..req.clone() };
        assert!(bad.to_core("h").unwrap_err().0.contains("needs a name"));
        let bad = pb::Service { check: Some(pb::HealthCheck::default()), ..req };
        assert!(bad.to_core("h").unwrap_err().0.contains("is not a check type"));
        assert!(health_from_pb(9).is_err());
        for h in [
            core::HealthStatus::Unknown,
            core::HealthStatus::Passing,
            core::HealthStatus::Warning,
            core::HealthStatus::Critical,
        ] {
            assert_eq!(health_from_pb(health_to_pb(h) as i32).unwrap(), h);
        }
    }

    #[test]
    fn items_are_validated_at_the_boundary() {
        let bad = pb::AllocItem { service: "x".into(), port: 80, ..Default::default() };
        let e = core::AllocItem::try_from(&bad).unwrap_err();
        assert!(e.0.contains("port 80 is out of range"), "{e}");
        let bad = pb::AllocItem { service: "x".into(), port: 70000, ..Default::default() };
        assert!(core::AllocItem::try_from(&bad).is_err());
        let bad = pb::AllocItem { service: "x".into(), strategy: 42, ..Default::default() };
        assert!(core::AllocItem::try_from(&bad).unwrap_err().0.contains("unknown strategy 42"));
        let ok = pb::AllocItem {
            service: "x".into(),
            port: 8080,
            strategy: pb::Strategy::Fail as i32,
            key: "k".into(),
            ..Default::default()
        };
        let i = core::AllocItem::try_from(&ok).unwrap();
        assert_eq!(
            (i.port, i.strategy, i.key.as_deref(), i.pool),
            (Some(8080), core::Strategy::Fail, Some("k"), None)
        );
    }

    #[test]
    fn reported_busy_ports_are_bounded_and_valid() {
        let mut r = pb::AllocateRequest { busy_ports: vec![8000, 8001], ..Default::default() };
        assert_eq!(r.reported_busy().unwrap(), vec![8000, 8001]);
        r.busy_ports = vec![0];
        assert!(r.reported_busy().unwrap_err().0.contains("busy_ports"));
        r.busy_ports = vec![70_000];
        assert!(r.reported_busy().unwrap_err().0.contains("busy_ports"));
        r.busy_ports = vec![8000; 1025];
        assert!(r.reported_busy().unwrap_err().0.contains("at most 1024"));
    }

    #[test]
    fn lease_spec_and_selector() {
        let mut r = pb::AllocateRequest::default();
        assert_eq!(r.lease_spec().unwrap(), core::LeaseSpec::None);
        r.ttl_ms = 5000;
        assert_eq!(r.lease_spec().unwrap(), core::LeaseSpec::New { ttl_ms: 5000 });
        r.lease_id = 3;
        assert!(r.lease_spec().is_err());
        r.ttl_ms = 0;
        assert_eq!(r.lease_spec().unwrap(), core::LeaseSpec::Existing(3));

        let rel = pb::ReleaseRequest { ports: vec![8000], key: "k".into(), ..Default::default() };
        assert!(rel.selector().is_err());
        let rel = pb::ReleaseRequest::default();
        assert!(rel.selector().is_err());
        let rel = pb::ReleaseRequest { ports: vec![99], ..Default::default() };
        assert!(rel.selector().unwrap_err().0.contains("out of range"));
        let rel = pb::ReleaseRequest { key: "k".into(), ..Default::default() };
        assert_eq!(rel.selector().unwrap(), core::ReleaseSelector::Key("k".into()));
        assert_eq!(required_port(0, "port").unwrap_err().0, "port: a port is required");
    }

    #[test]
    fn strategies_round_trip() {
        for s in [core::Strategy::Sticky, core::Strategy::Next, core::Strategy::Random, core::Strategy::Fail]
        {
            assert_eq!(strategy_from_pb(strategy_to_pb(s) as i32).unwrap(), s);
        }
    }
}
