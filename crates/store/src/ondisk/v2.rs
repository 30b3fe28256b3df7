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
    pub probe: Option<HostProbeV2>,
    pub holder: Option<Holder>,
}

impl From<AllocateBatchV2> for AllocateBatch {
    fn from(b: AllocateBatchV2) -> Self {
        AllocateBatch {
            team: b.team,
            host: b.host,
            lease: b.lease,
            items: b.items,
            probe: b.probe.map(Into::into),
            holder: b.holder,
            register: None,
        }
    }
}

/// `HostProbe` as data versions 2 to 7 logged it (no ranges known busy).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostProbeV2 {
    pub checked: Vec<u16>,
    pub busy: Vec<u16>,
    pub owners: Vec<(u16, Holder)>,
}

impl From<HostProbeV2> for HostProbe {
    fn from(p: HostProbeV2) -> Self {
        HostProbe { checked: p.checked, busy: p.busy, owners: p.owners, known_busy: Vec::new() }
    }
}
