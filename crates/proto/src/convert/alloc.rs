//! Allocations and reservations: `Allocator` requests, port ranges, strategies.

use portmesh_core as core;

use super::registry::{PortsFrom, service_of};
use super::{
    AtHost, BadRequest, command_of, holder, name, opt, opt_key, opt_name, pid_of, port, required_port, team,
};
use crate::v1 as pb;

/// Most ports a client may report busy in one allocation.
pub const MAX_REPORTED_BUSY: usize = 1024;

/// An allocation as the node serves it: the batch to plan and propose, and the ports the client
/// found busy on its host (skipped like the node's own probe finds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocate {
    pub batch: core::AllocateBatch,
    pub reported_busy: Vec<u16>,
}

/// An `AllocateRequest` received by the node on `host` (the default host of the allocation).
impl TryFrom<AtHost<'_, pb::AllocateRequest>> for Allocate {
    type Error = BadRequest;

    fn try_from(AtHost { msg: req, host }: AtHost<'_, pb::AllocateRequest>) -> Result<Self, Self::Error> {
        if req.busy_ports.len() > MAX_REPORTED_BUSY {
            return Err(BadRequest(format!(
                "busy_ports: {} ports, at most {MAX_REPORTED_BUSY}",
                req.busy_ports.len()
            )));
        }
        let reported_busy =
            req.busy_ports.iter().map(|p| required_port(*p, "busy_ports")).collect::<Result<_, _>>()?;
        let lease = match (req.lease_id, req.ttl_ms) {
            (0, 0) => core::LeaseSpec::None,
            (id, 0) => core::LeaseSpec::Existing(id),
            (0, ttl_ms) => core::LeaseSpec::New { ttl_ms },
            _ => {
                return Err(BadRequest(
                    "set either lease_id (attach) or ttl_ms (new lease), not both".into(),
                ));
            }
        };
        opt_key("host", &req.host)?;
        let team = team(&req.team)?;
        let host = if req.host.is_empty() { host.to_string() } else { req.host.clone() };
        let items: Vec<core::AllocItem> =
            req.items.iter().map(core::AllocItem::try_from).collect::<Result<_, _>>()?;
        let register = match &req.register {
            None => None,
            Some(svc) => {
                let mut reg =
                    service_of(AtHost { msg: svc, host: &host }, "register", PortsFrom::Allocation)?;
                let leased = match lease {
                    core::LeaseSpec::Existing(id) => Some(id),
                    _ => None,
                };
                if !svc.team.is_empty() && reg.team != team {
                    return Err(BadRequest(format!(
                        "register.team: {:?}, but the allocation is for team {team:?}: leave it empty",
                        reg.team
                    )));
                }
                reg.team = team.clone();
                if reg.host != host {
                    return Err(BadRequest(format!(
                        "register.host: {:?}, but the allocation is for host {host:?}: leave it empty",
                        reg.host
                    )));
                }
                if reg.lease_id.is_some() && reg.lease_id != leased {
                    return Err(BadRequest(
                        "register.lease_id: the registration takes the allocation's lease: leave it 0".into(),
                    ));
                }
                Some(Box::new(reg))
            }
        };
        let batch = core::AllocateBatch {
            team,
            host,
            lease,
            items,
            probe: None,
            holder: holder(req.pid, &req.command),
            register,
        };
        Ok(Allocate { batch, reported_busy })
    }
}

impl TryFrom<&pb::AllocItem> for core::AllocItem {
    type Error = BadRequest;

    fn try_from(i: &pb::AllocItem) -> Result<Self, Self::Error> {
        opt_name("items.pool", &i.pool)?;
        name("items.service", &i.service)?;
        opt_name("items.instance", &i.instance)?;
        opt_name("items.env", &i.env)?;
        opt_key("items.key", &i.key)?;
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

impl TryFrom<&pb::ReleaseRequest> for core::Command {
    type Error = BadRequest;

    fn try_from(req: &pb::ReleaseRequest) -> Result<Self, Self::Error> {
        let selector = match (req.ports.is_empty(), req.key.is_empty()) {
            (false, true) => {
                let ports = req
                    .ports
                    .iter()
                    .map(|p| {
                        port(*p, "ports").and_then(|p| p.ok_or_else(|| BadRequest("ports: port 0".into())))
                    })
                    .collect::<Result<_, _>>()?;
                core::ReleaseSelector::Ports(ports)
            }
            (true, false) => {
                opt_key("key", &req.key)?;
                core::ReleaseSelector::Key(req.key.clone())
            }
            _ => {
                return Err(BadRequest(
                    "name the ports to release or a key, not both and not neither".into(),
                ));
            }
        };
        Ok(core::Command::Release { team: team(&req.team)?, selector })
    }
}

impl TryFrom<&pb::ReserveRequest> for core::Command {
    type Error = BadRequest;

    fn try_from(req: &pb::ReserveRequest) -> Result<Self, Self::Error> {
        Ok(core::Command::Reserve {
            port: required_port(req.port, "port")?,
            reason: core::text::clean_text(&req.reason),
        })
    }
}

impl TryFrom<&pb::UnreserveRequest> for core::Command {
    type Error = BadRequest;

    fn try_from(req: &pb::UnreserveRequest) -> Result<Self, Self::Error> {
        Ok(core::Command::Unreserve { port: required_port(req.port, "port")? })
    }
}

/// Reads a strategy from its wire integer (unset: sticky).
pub fn strategy_from_pb(s: i32) -> Result<core::Strategy, BadRequest> {
    match pb::Strategy::try_from(s) {
        Ok(pb::Strategy::Unspecified | pb::Strategy::Sticky) => Ok(core::Strategy::Sticky),
        Ok(pb::Strategy::Next) => Ok(core::Strategy::Next),
        Ok(pb::Strategy::Random) => Ok(core::Strategy::Random),
        Ok(pb::Strategy::Fail) => Ok(core::Strategy::Fail),
        Err(_) => Err(BadRequest(format!("unknown strategy {s}"))),
    }
}

impl From<core::Strategy> for pb::Strategy {
    fn from(s: core::Strategy) -> Self {
        match s {
            core::Strategy::Sticky => pb::Strategy::Sticky,
            core::Strategy::Next => pb::Strategy::Next,
            core::Strategy::Random => pb::Strategy::Random,
            core::Strategy::Fail => pb::Strategy::Fail,
        }
    }
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
            team: a.team.to_string(),
            pool: a.pool.to_string(),
            service: a.service.to_string(),
            instance: a.instance.as_deref().unwrap_or_default().to_owned(),
            env: a.env.as_deref().unwrap_or_default().to_owned(),
            host: a.host.to_string(),
            key: a.key.as_deref().unwrap_or_default().to_owned(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn allocate(req: &pb::AllocateRequest) -> Result<Allocate, BadRequest> {
        Allocate::try_from(AtHost { msg: req, host: "here" })
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
    fn an_allocation_takes_the_defaults_of_its_empty_fields() {
        let req = pb::AllocateRequest {
            items: vec![pb::AllocItem { service: "web".into(), ..Default::default() }],
            pid: 42,
            command: "make dev".into(),
            ..Default::default()
        };
        let a = allocate(&req).unwrap();
        assert_eq!((a.batch.team.as_str(), a.batch.host.as_str()), ("default", "here"));
        assert_eq!(a.batch.holder, Some(core::Holder { pid: 42, command: "make dev".into() }));
        assert_eq!(a.batch.items.len(), 1);
        let req = pb::AllocateRequest { team: "a".into(), host: "there".into(), ..req };
        let a = allocate(&req).unwrap();
        assert_eq!((a.batch.team.as_str(), a.batch.host.as_str()), ("a", "there"));
    }

    #[test]
    fn reported_busy_ports_are_bounded_and_valid() {
        let mut r = pb::AllocateRequest { busy_ports: vec![8000, 8001], ..Default::default() };
        assert_eq!(allocate(&r).unwrap().reported_busy, vec![8000, 8001]);
        r.busy_ports = vec![0];
        assert!(allocate(&r).unwrap_err().0.contains("busy_ports"));
        r.busy_ports = vec![70_000];
        assert!(allocate(&r).unwrap_err().0.contains("busy_ports"));
        r.busy_ports = vec![8000; 1025];
        assert!(allocate(&r).unwrap_err().0.contains("at most 1024"));
    }

    #[test]
    fn lease_spec_and_selector() {
        let lease = |r: &pb::AllocateRequest| allocate(r).map(|a| a.batch.lease);
        let mut r = pb::AllocateRequest::default();
        assert_eq!(lease(&r).unwrap(), core::LeaseSpec::None);
        r.ttl_ms = 5000;
        assert_eq!(lease(&r).unwrap(), core::LeaseSpec::New { ttl_ms: 5000 });
        r.lease_id = 3;
        assert!(lease(&r).is_err());
        r.ttl_ms = 0;
        assert_eq!(lease(&r).unwrap(), core::LeaseSpec::Existing(3));

        let release = |r: &pb::ReleaseRequest| core::Command::try_from(r);
        let rel = pb::ReleaseRequest { ports: vec![8000], key: "k".into(), ..Default::default() };
        assert!(release(&rel).is_err());
        assert!(release(&pb::ReleaseRequest::default()).is_err());
        let rel = pb::ReleaseRequest { ports: vec![99], ..Default::default() };
        assert!(release(&rel).unwrap_err().0.contains("out of range"));
        let rel = pb::ReleaseRequest { key: "k".into(), ..Default::default() };
        assert_eq!(
            release(&rel).unwrap(),
            core::Command::Release {
                team: "default".into(),
                selector: core::ReleaseSelector::Key("k".into())
            }
        );
        assert_eq!(required_port(0, "port").unwrap_err().0, "port: a port is required");
        let e = core::Command::try_from(&pb::ReserveRequest { port: 5, reason: String::new() }).unwrap_err();
        assert!(e.0.starts_with("port: port 5 is out of range"), "{e}");
        assert!(core::Command::try_from(&pb::UnreserveRequest { port: 0 }).is_err());
    }

    #[test]
    fn a_registration_rides_on_the_allocation_with_its_fields_checked() {
        let svc = |f: &dyn Fn(&mut pb::Service)| {
            let mut s = pb::Service {
                name: "web".into(),
                ports: vec![pb::ServicePort { name: "http".into(), ..Default::default() }],
                pid: 9,
                ..Default::default()
            };
            f(&mut s);
            s
        };
        let req = |register: pb::Service| pb::AllocateRequest {
            team: "a".into(),
            items: vec![pb::AllocItem { service: "web".into(), ..Default::default() }],
            ttl_ms: 5_000,
            register: Some(register),
            ..Default::default()
        };
        let a = allocate(&req(svc(&|_| {}))).unwrap();
        let reg = a.batch.register.unwrap();
        // Team and host are the allocation's; id and port numbers are left for `apply`.
        assert_eq!((reg.team.as_str(), reg.host.as_str(), reg.id.as_str()), ("a", "here", ""));
        assert_eq!((reg.ports[0].name.as_str(), reg.ports[0].port, reg.lease_id), ("http", 0, None));
        assert_eq!(reg.holder.map(|h| h.pid), Some(9));
        for (bad, field) in [
            (svc(&|s| s.ports[0].port = 8000), "register.ports.port: 8000 given; leave it 0"),
            (svc(&|s| s.name = String::new()), "register.name: a service needs a name"),
            (svc(&|s| s.name = "a b".into()), "register.name"),
            (svc(&|s| s.team = "b".into()), "register.team: \"b\", but the allocation is for team \"a\""),
            (svc(&|s| s.host = "there".into()), "register.host: \"there\""),
            (svc(&|s| s.lease_id = 3), "register.lease_id"),
            (svc(&|s| s.tags = vec!["no tag".into()]), "register.tags"),
        ] {
            let e = allocate(&req(bad)).unwrap_err();
            assert!(e.0.starts_with(field), "want {field:?}, got {e}");
        }
        // The same team spelled out, or the lease the request attaches to, are fine.
        let same = pb::AllocateRequest {
            ttl_ms: 0,
            lease_id: 3,
            ..req(svc(&|s| (s.team, s.lease_id) = ("a".into(), 3)))
        };
        assert_eq!(allocate(&same).unwrap().batch.register.unwrap().lease_id, Some(3));
    }

    #[test]
    fn strategies_round_trip() {
        for s in [core::Strategy::Sticky, core::Strategy::Next, core::Strategy::Random, core::Strategy::Fail]
        {
            assert_eq!(strategy_from_pb(pb::Strategy::from(s) as i32).unwrap(), s);
        }
    }
}
