//! Events: the history as watchers and the audit log see it.

use portmesh_core as core;

use super::{command_of, pid_of};
use crate::v1 as pb;

impl From<&core::Event> for pb::Event {
    fn from(e: &core::Event) -> Self {
        use core::EventKind as K;
        let mut out = pb::Event { revision: e.revision, seq: e.seq, at_ms: e.at_ms, ..Default::default() };
        let kind = match &e.kind {
            K::Allocated(a) => {
                out.allocation = Some(a.as_ref().into());
                pb::EventType::Allocated
            }
            K::Released { allocation, cause } => {
                out.allocation = Some(allocation.as_ref().into());
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
                out.pool = Some((p.as_ref(), &usage).into());
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
            K::HealthChanged(h) => {
                (out.team, out.service_id, out.service_name, out.host) =
                    (h.team.clone(), h.id.clone(), h.name.clone(), h.host.clone());
                out.set_previous(h.previous.into());
                out.set_status(h.status.into());
                out.output = h.output.clone();
                pb::EventType::HealthChanged
            }
        };
        out.set_type(kind);
        out
    }
}
