//! What the agent has made of the device, kept in `{root}/state/agent.json` and reported in
//! the twin's reported document (secrets such as a Wi-Fi passphrase are never kept here).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceState {
    pub locked: bool,
    pub features: BTreeMap<String, bool>,
    /// `configure`'s `settings`, merged; also written to `{root}/state/settings.json` for
    /// the device's applications.
    pub settings: Map<String, Value>,
    pub network: Network,
    pub firmware: Option<Firmware>,
    /// The last desired-twin version applied.
    pub desired_version: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Network {
    pub wifi_ssid: Option<String>,
    pub apn: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Firmware {
    pub version: String,
    /// `a` or `b`.
    pub slot: String,
}

pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    pub fn new(root: &Path) -> Self {
        Self {
            dir: root.join("state"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn load(&self) -> anyhow::Result<DeviceState> {
        let path = self.dir.join("agent.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not the agent's state", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DeviceState::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub fn save(&self, state: &DeviceState) -> anyhow::Result<()> {
        self.write("agent.json", &serde_json::to_vec_pretty(state)?)?;
        self.write(
            "settings.json",
            &serde_json::to_vec_pretty(&state.settings)?,
        )
    }

    /// Replaces `name` in the state directory atomically.
    pub fn write(&self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let path = self.dir.join(name);
        let temporary = self.dir.join(format!("{name}.new"));
        std::fs::write(&temporary, bytes)
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        std::fs::rename(&temporary, &path)
            .with_context(|| format!("cannot replace {}", path.display()))
    }
}

impl DeviceState {
    /// The whole state as a twin reported patch.
    pub fn reported(&self) -> Value {
        serde_json::json!({
            "agent": {"version": env!("CARGO_PKG_VERSION")},
            "locked": self.locked,
            "features": self.features,
            "settings": self.settings,
            "network": self.network,
            "firmware": self.firmware,
            "desired_version": self.desired_version,
        })
    }
}
