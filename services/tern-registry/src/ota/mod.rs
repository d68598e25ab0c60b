//! Over-the-air updates: artifacts (`artifacts.rs`) and the campaigns that roll them out
//! (`campaigns.rs`). Devices install them with the typed `update` operation (tern-agent).

mod artifacts;
mod campaigns;

pub use artifacts::{Artifact, Artifacts, Upload};
pub use campaigns::{
    Campaign, CampaignState, Campaigns, Counts, NewCampaign, OnFailure, Target, TargetState, Window,
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtaConfig {
    /// Largest artifact an upload may store, in bytes.
    pub max_artifact_bytes: u64,
    /// How often running campaigns are advanced (new waves, outcomes, the failure check).
    pub campaign_interval_ms: u64,
}

impl Default for OtaConfig {
    fn default() -> Self {
        Self {
            max_artifact_bytes: 1 << 30,
            campaign_interval_ms: 1000,
        }
    }
}
