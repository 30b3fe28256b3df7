//! Data versions 2 to 4: the shapes that changed since, kept so that their log entries still
//! load.

use portmesh_core::{AllocItem, AllocateBatch, Holder, HostProbe, LeaseSpec};
use serde::{Deserialize, Serialize};

/// `AllocateBatch` as data versions 2 to 4 logged it (no registration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocateBatchV2 {
    pub team: String,
    pub host: String,
    pub lease: LeaseSpec,
    pub items: Vec<AllocItem>,
    pub probe: Option<HostProbe>,
    pub holder: Option<Holder>,
}

impl From<AllocateBatchV2> for AllocateBatch {
    fn from(b: AllocateBatchV2) -> Self {
        AllocateBatch {
            team: b.team,
            host: b.host,
            lease: b.lease,
            items: b.items,
            probe: b.probe,
            holder: b.holder,
            register: None,
        }
    }
}
