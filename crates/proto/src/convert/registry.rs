//! The service registry: registrations, health checks and health reports.

use portmesh_core as core;

use super::{
    AtHost, BadRequest, command_of, holder, name, opt, opt_key, opt_name, pid_of, required_port, team,
};
use crate::v1 as pb;

impl From<core::HealthStatus> for pb::HealthStatus {
    fn from(h: core::HealthStatus) -> Self {
        match h {
            core::HealthStatus::Unknown => pb::HealthStatus::Unknown,
            core::HealthStatus::Passing => pb::HealthStatus::Passing,
            core::HealthStatus::Warning => pb::HealthStatus::Warning,
            core::HealthStatus::Critical => pb::HealthStatus::Critical,
        }
    }
}

/// Reads a health status from its wire integer.
pub fn health_from_pb(h: i32) -> Result<core::HealthStatus, BadRequest> {
    match pb::HealthStatus::try_from(h) {
        Ok(pb::HealthStatus::Unknown) => Ok(core::HealthStatus::Unknown),
        Ok(pb::HealthStatus::Passing) => Ok(core::HealthStatus::Passing),
        Ok(pb::HealthStatus::Warning) => Ok(core::HealthStatus::Warning),
        Ok(pb::HealthStatus::Critical) => Ok(core::HealthStatus::Critical),
        Err(_) => Err(BadRequest(format!("unknown health status {h}"))),
    }
}

/// Longest command of a command check, in bytes.
pub const MAX_CHECK_COMMAND: usize = 1024;
/// Default interval of a health check that names none.
const DEFAULT_CHECK_INTERVAL_MS: u64 = 10_000;
/// Default timeout of a health check that names none (at most its interval).
const DEFAULT_CHECK_TIMEOUT_MS: u64 = 2_000;

impl TryFrom<&pb::HealthCheck> for core::HealthCheck {
    type Error = BadRequest;

    fn try_from(c: &pb::HealthCheck) -> Result<Self, Self::Error> {
        opt_name("check.port_name", &c.port_name)?;
        opt_key("check.path", &c.path)?;
        opt_key("check.grpc_service", &c.grpc_service)?;
        if c.command.len() > MAX_CHECK_COMMAND {
            return Err(BadRequest(format!(
                "check.command: {} bytes, at most {MAX_CHECK_COMMAND}",
                c.command.len()
            )));
        }
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
        set_kind(&mut out, &c.kind);
        out
    }
}

/// Sets the type and its one field (path, service or command) from `kind`.
fn set_kind(check: &mut pb::HealthCheck, kind: &core::CheckKind) {
    let t = match kind {
        core::CheckKind::Tcp => pb::CheckType::CheckTcp,
        core::CheckKind::Http { path } => {
            check.path = path.clone();
            pb::CheckType::CheckHttp
        }
        core::CheckKind::Grpc { service } => {
            check.grpc_service = service.clone();
            pb::CheckType::CheckGrpc
        }
        core::CheckKind::Command { command } => {
            check.command = command.clone();
            pb::CheckType::CheckCommand
        }
    };
    check.set_type(t);
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
        out.set_status(s.status.into());
        out
    }
}

/// Where a registration's port numbers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PortsFrom {
    /// The request gives them (`Registry.Register`).
    Request,
    /// The allocation the registration rides on (`AllocateRequest.register`): each is 0 here
    /// and filled in when the allocation is applied, like an empty id.
    Allocation,
}

/// A registration received by the node on `host`. Empty team, host and id get their defaults
/// (the team `default`, the receiving node's host, `NAME@HOST:PORT`). Status and times are left
/// for `apply`.
impl TryFrom<AtHost<'_, pb::Service>> for core::Service {
    type Error = BadRequest;

    fn try_from(at: AtHost<'_, pb::Service>) -> Result<Self, Self::Error> {
        service_of(at, "service", PortsFrom::Request)
    }
}

/// The registration in `at`, its errors naming fields under `field` (`service.name`).
pub(super) fn service_of(
    AtHost { msg: svc, host: default_host }: AtHost<'_, pb::Service>,
    field: &str,
    ports_from: PortsFrom,
) -> Result<core::Service, BadRequest> {
    let f = |name: &str| format!("{field}.{name}");
    if svc.name.is_empty() {
        return Err(BadRequest(format!("{}: a service needs a name", f("name"))));
    }
    name(&f("name"), &svc.name)?;
    opt_key(&f("id"), &svc.id)?;
    opt_key(&f("host"), &svc.host)?;
    for (what, v) in [("project", &svc.project), ("env", &svc.env), ("instance", &svc.instance)] {
        opt_name(&f(what), v)?;
    }
    svc.tags.iter().try_for_each(|t| name(&f("tags"), t))?;
    svc.depends_on.iter().try_for_each(|d| name(&f("depends_on"), d))?;
    for p in &svc.ports {
        opt_name(&f("ports.name"), &p.name)?;
        opt_name(&f("ports.protocol"), &p.protocol)?;
    }
    let ports = svc
        .ports
        .iter()
        .map(|p| {
            let port = match ports_from {
                PortsFrom::Request => required_port(p.port, &f("ports.port"))?,
                PortsFrom::Allocation if p.port == 0 => 0,
                PortsFrom::Allocation => {
                    return Err(BadRequest(format!(
                        "{}: {} given; leave it 0: the port comes from the allocation",
                        f("ports.port"),
                        p.port
                    )));
                }
            };
            Ok(core::ServicePort {
                name: if p.name.is_empty() { "main".into() } else { p.name.clone() },
                port,
                protocol: p.protocol.clone(),
            })
        })
        .collect::<Result<Vec<_>, BadRequest>>()?;
    let host = if svc.host.is_empty() { default_host.to_string() } else { svc.host.clone() };
    let id = match (svc.id.is_empty(), ports.first()) {
        (false, _) => svc.id.clone(),
        (true, _) if ports_from == PortsFrom::Allocation => String::new(),
        (true, Some(p)) => core::Service::default_id(&svc.name, &host, p.port),
        (true, None) => svc.name.clone(),
    };
    Ok(core::Service {
        team: team(&svc.team)?,
        id,
        name: svc.name.clone(),
        project: opt(&svc.project),
        env: opt(&svc.env),
        instance: opt(&svc.instance),
        host,
        ports,
        tags: svc.tags.clone(),
        check: svc.check.as_ref().map(TryInto::try_into).transpose()?,
        depends_on: svc.depends_on.clone(),
        status: core::HealthStatus::Unknown,
        output: String::new(),
        lease_id: (svc.lease_id != 0).then_some(svc.lease_id),
        holder: holder(svc.pid, &svc.command),
        registered_ms: 0,
        revision: 0,
        status_ms: 0,
    })
}

/// A `RegisterRequest` received by the node on `host`.
impl TryFrom<AtHost<'_, pb::RegisterRequest>> for core::Command {
    type Error = BadRequest;

    fn try_from(AtHost { msg: req, host }: AtHost<'_, pb::RegisterRequest>) -> Result<Self, Self::Error> {
        let Some(svc) = &req.service else {
            return Err(BadRequest("service: say what to register".into()));
        };
        Ok(core::Command::Register(Box::new(AtHost { msg: svc, host }.try_into()?)))
    }
}

impl TryFrom<&pb::DeregisterRequest> for core::Command {
    type Error = BadRequest;

    fn try_from(req: &pb::DeregisterRequest) -> Result<Self, Self::Error> {
        Ok(core::Command::Deregister {
            team: team(&req.team)?,
            id: {
                core::text::check_key("id", &req.id)?;
                req.id.clone()
            },
        })
    }
}

/// Most health reports one request may carry.
pub const MAX_REPORTS: usize = 4_096;

impl TryFrom<&pb::ReportHealthRequest> for core::Command {
    type Error = BadRequest;

    fn try_from(req: &pb::ReportHealthRequest) -> Result<Self, Self::Error> {
        if req.reports.len() > MAX_REPORTS {
            return Err(BadRequest(format!("reports: {} reports, at most {MAX_REPORTS}", req.reports.len())));
        }
        let updates = req
            .reports
            .iter()
            .map(|r| {
                core::text::check_key("reports.id", &r.id)?;
                Ok(core::HealthUpdate {
                    team: team(&r.team)?,
                    id: r.id.clone(),
                    status: health_from_pb(r.status)?,
                    output: core::clip_output(&r.output),
                })
            })
            .collect::<Result<_, BadRequest>>()?;
        Ok(core::Command::SetHealth { updates })
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
        let s = core::Service::try_from(AtHost { msg: &req, host: "laptop" }).unwrap();
        assert_eq!(
            (s.team.as_str(), s.id.as_str(), s.host.as_str()),
            ("default", "api@laptop:8001", "laptop")
        );
        assert_eq!(s.ports[0].name, "main");
        let c = s.check.clone().unwrap();
        assert_eq!(c.kind, core::CheckKind::Http { path: "/".into() });
        assert_eq!((c.interval_ms, c.timeout_ms, c.failures), (10_000, 2_000, 1));
        let back = pb::Service::from(&s);
        assert_eq!(core::Service::try_from(AtHost { msg: &back, host: "elsewhere" }).unwrap(), s);

        let bad =
            pb::Service { ports: vec![pb::ServicePort { port: 80, ..Default::default() }], ..req.clone() };
        assert!(
            core::Service::try_from(AtHost { msg: &bad, host: "h" })
                .unwrap_err()
                .0
                .contains("port 80 is out of range")
        );
        let bad = pb::Service { name: String::new(), ..req.clone() };
        assert!(
            core::Service::try_from(AtHost { msg: &bad, host: "h" }).unwrap_err().0.contains("needs a name")
        );
        let bad = pb::Service { check: Some(pb::HealthCheck::default()), ..req };
        assert!(
            core::Service::try_from(AtHost { msg: &bad, host: "h" })
                .unwrap_err()
                .0
                .contains("is not a check type")
        );
        assert!(health_from_pb(9).is_err());
        for h in [
            core::HealthStatus::Unknown,
            core::HealthStatus::Passing,
            core::HealthStatus::Warning,
            core::HealthStatus::Critical,
        ] {
            assert_eq!(health_from_pb(pb::HealthStatus::from(h) as i32).unwrap(), h);
        }
    }

    #[test]
    fn registry_requests_name_the_bad_field() {
        let e = core::Command::try_from(AtHost { msg: &pb::RegisterRequest { service: None }, host: "h" })
            .unwrap_err();
        assert_eq!(e.0, "service: say what to register");
        let report = |status| pb::HealthReport { id: "x".into(), status, ..Default::default() };
        let req = pb::ReportHealthRequest { reports: vec![report(9)] };
        assert!(core::Command::try_from(&req).unwrap_err().0.contains("unknown health status 9"));
        let req = pb::ReportHealthRequest { reports: vec![report(1); MAX_REPORTS + 1] };
        assert!(core::Command::try_from(&req).unwrap_err().0.starts_with("reports: 4097 reports"));
        let req = pb::ReportHealthRequest { reports: vec![report(pb::HealthStatus::Passing as i32)] };
        let core::Command::SetHealth { updates } = core::Command::try_from(&req).unwrap() else {
            panic!("not SetHealth")
        };
        assert_eq!((updates[0].team.as_str(), updates[0].status), ("default", core::HealthStatus::Passing));
    }

    #[test]
    fn check_fields_and_report_ids_are_bounded() {
        let check = |c: pb::HealthCheck| core::HealthCheck::try_from(&c).map(drop).unwrap_err().0;
        let cmd = pb::HealthCheck {
            r#type: pb::CheckType::CheckCommand as i32,
            command: "x".repeat(MAX_CHECK_COMMAND + 1),
            ..Default::default()
        };
        assert_eq!(check(cmd), "check.command: 1025 bytes, at most 1024");
        let http = pb::HealthCheck {
            r#type: pb::CheckType::CheckHttp as i32,
            path: "/a b".into(),
            ..Default::default()
        };
        assert!(check(http).starts_with("check.path: character ' '"));
        let port = pb::HealthCheck {
            r#type: pb::CheckType::CheckTcp as i32,
            port_name: "a/b".into(),
            ..Default::default()
        };
        assert!(check(port).starts_with("check.port_name: character '/'"));
        let report = pb::HealthReport { id: "a\nb".into(), status: 1, ..Default::default() };
        let e = core::Command::try_from(&pb::ReportHealthRequest { reports: vec![report] }).unwrap_err();
        assert!(e.0.starts_with("reports.id: character '\\n'"), "{e}");
        let report =
            pb::HealthReport { id: "x".into(), status: 1, output: "ok\nforged".into(), ..Default::default() };
        let core::Command::SetHealth { updates } =
            core::Command::try_from(&pb::ReportHealthRequest { reports: vec![report] }).unwrap()
        else {
            panic!("not SetHealth")
        };
        assert_eq!(updates[0].output, "ok forged");
    }
}
