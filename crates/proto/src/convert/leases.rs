//! Leases: `Leases` requests and the lease a reply describes.

use portmesh_core as core;

use super::{BadRequest, team};
use crate::v1 as pb;

/// A lease, its remaining TTL and the ports attached to it.
impl<P: IntoIterator<Item = u16>> From<(&core::Lease, u64, P)> for pb::Lease {
    fn from((l, remaining_ms, ports): (&core::Lease, u64, P)) -> Self {
        pb::Lease {
            id: l.id,
            team: l.team.to_string(),
            ttl_ms: l.ttl_ms,
            remaining_ms,
            revision: l.revision,
            ports: ports.into_iter().map(u32::from).collect(),
        }
    }
}

impl TryFrom<&pb::LeaseGrantRequest> for core::Command {
    type Error = BadRequest;

    fn try_from(req: &pb::LeaseGrantRequest) -> Result<Self, Self::Error> {
        Ok(core::Command::GrantLease { team: team(&req.team)?, ttl_ms: req.ttl_ms })
    }
}

impl TryFrom<&pb::LeaseRevokeRequest> for core::Command {
    type Error = BadRequest;

    fn try_from(req: &pb::LeaseRevokeRequest) -> Result<Self, Self::Error> {
        Ok(core::Command::RevokeLease { team: team(&req.team)?, id: req.lease_id })
    }
}
