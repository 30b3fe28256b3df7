//! Data versions 5 to 7: the shapes that changed since, kept so that their log entries still
//! load.

use portmesh_core::{AllocItem, AllocateBatch, Holder, LeaseSpec, Service};
use serde::{Deserialize, Serialize};

use super::v2::HostProbeV2;

/// `AllocateBatch` as data versions 5 to 7 logged it (its probe without ranges known busy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocateBatchV5 {
    pub team: String,
    pub host: String,
    pub lease: LeaseSpec,
    pub items: Vec<AllocItem>,
    pub probe: Option<HostProbeV2>,
    pub holder: Option<Holder>,
    pub register: Option<Box<Service>>,
}

impl From<AllocateBatchV5> for AllocateBatch {
    fn from(b: AllocateBatchV5) -> Self {
        AllocateBatch {
            team: b.team,
            host: b.host,
            lease: b.lease,
            items: b.items,
            probe: b.probe.map(Into::into),
            holder: b.holder,
            register: b.register,
        }
    }
}
