//! The agent's configuration: a TOML file, overridden by `TERN_AGENT_*` variables
//! (`TERN_AGENT_TELEMETRY__INTERVAL_SECS=5`). Unknown keys and bad values stop start-up with
//! the key named.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use reqwest::Url;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The platform's HTTP base URL: token refresh.
    pub server: String,
    /// The MQTT endpoint: `mqtt://host:1883` or `mqtts://host:8883`.
    pub mqtt: String,
    /// PEM file of the CAs trusted for `mqtts://` and `https://`; without it, the system's.
    pub ca_file: Option<PathBuf>,
    /// Everything the agent writes lives under this directory.
    pub root_dir: PathBuf,
    pub keepalive_secs: u16,
    pub telemetry: TelemetryConfig,
    pub hooks: HooksConfig,
    pub update: UpdateConfig,
    pub enrolment: EnrolmentConfig,
}

/// Enrolment by the OAuth device authorization grant: `tern-agent enroll` shows a code that a
/// person approves (`tern token approve CODE --device NAME`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnrolmentConfig {
    /// The tenant (name or id) the device joins.
    pub tenant: Option<String>,
    /// The tenant's enrolment client: a public client with the scope `tern:device`.
    pub client_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub interval_secs: u64,
    /// Load, memory, uptime and (where the kernel has one) CPU temperature from /proc and /sys.
    pub system: bool,
    /// Commands whose standard output is a JSON object of readings.
    pub scripts: Vec<String>,
    /// Files holding a JSON object of readings, read at every interval.
    pub files: Vec<PathBuf>,
    /// Messages kept on disk while the platform cannot be reached; the oldest go first.
    pub buffer_max_messages: usize,
}

/// Shell commands the agent runs for what only the device's owner knows how to do. An
/// operation whose hook is not set is answered 501 (not implemented).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HooksConfig {
    pub reboot: Option<String>,
    pub lock: Option<String>,
    pub unlock: Option<String>,
    /// Arguments: the feature's name, then `on` or `off`.
    pub feature: Option<String>,
    /// Standard input: `{"wifi": {...}, "apn": "..."}` with what the operation gives.
    pub network: Option<String>,
    /// Standard output: `{"lat": .., "lon": .., "accuracy_m": ..}`.
    pub location: Option<String>,
    /// Standard input: the desired twin document.
    pub twin: Option<String>,
    /// Plain (non-`tern.`) commands. Argument: the command's name; standard input: its payload;
    /// standard output: the answer.
    pub command: Option<String>,
    /// After an update is written to its slot, before switching to it.
    pub install: Option<String>,
    /// After switching to an update: exit status 0 keeps it, anything else rolls back.
    pub health_check: Option<String>,
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateConfig {
    /// The tenant's Ed25519 update-signing public key (base64, 32 bytes). When set, every
    /// update must carry a valid signature; when not, only the SHA-256 digest is checked.
    pub public_key: Option<String>,
    pub max_artifact_bytes: u64,
    /// Download attempts per update; each one resumes where the last stopped.
    pub download_attempts: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            server: "http://localhost:8080".into(),
            mqtt: "mqtt://localhost:1883".into(),
            ca_file: None,
            root_dir: PathBuf::from("/var/lib/tern-agent"),
            keepalive_secs: 30,
            telemetry: TelemetryConfig::default(),
            hooks: HooksConfig::default(),
            update: UpdateConfig::default(),
            enrolment: EnrolmentConfig::default(),
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            interval_secs: 60,
            system: true,
            scripts: Vec::new(),
            files: Vec::new(),
            buffer_max_messages: 10_000,
        }
    }
}

impl Default for HooksConfig {
    fn default() -> Self {
        Self {
            reboot: None,
            lock: None,
            unlock: None,
            feature: None,
            network: None,
            location: None,
            twin: None,
            command: None,
            install: None,
            health_check: None,
            timeout_secs: 300,
        }
    }
}

impl Default for UpdateConfig {
    fn default() -> Self {
        Self {
            public_key: None,
            max_artifact_bytes: 1 << 30,
            download_attempts: 5,
        }
    }
}

/// Where the MQTT connection goes, parsed from `mqtt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            bail!("config file {} does not exist", path.display());
        }
        let config: Self = Figment::from(Serialized::defaults(Self::default()))
            .merge(Toml::file(path))
            // Flags of the command line, not configuration.
            .merge(
                Env::prefixed("TERN_AGENT_")
                    .ignore(&["config", "refresh_token"])
                    .split("__"),
            )
            .extract()
            .with_context(|| format!("bad configuration in {}", path.display()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.server_url()?;
        self.mqtt_endpoint()?;
        if self.keepalive_secs < 5 {
            bail!(
                "keepalive_secs: at least 5 expected, got {}",
                self.keepalive_secs
            );
        }
        if self.telemetry.interval_secs == 0 {
            bail!("telemetry.interval_secs: at least 1 expected");
        }
        if self.telemetry.buffer_max_messages == 0 {
            bail!("telemetry.buffer_max_messages: at least 1 expected");
        }
        if self.hooks.timeout_secs == 0 {
            bail!("hooks.timeout_secs: at least 1 expected");
        }
        if self.update.download_attempts == 0 {
            bail!("update.download_attempts: at least 1 expected");
        }
        if let Some(key) = &self.update.public_key {
            crate::update::parse_public_key(key).context("update.public_key")?;
        }
        Ok(())
    }

    pub fn server_url(&self) -> anyhow::Result<Url> {
        let url = Url::parse(&self.server)
            .with_context(|| format!("server: a URL expected, got {:?}", self.server))?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!(
                "server: http:// or https:// expected, got {:?}",
                self.server
            );
        }
        Ok(url)
    }

    pub fn mqtt_endpoint(&self) -> anyhow::Result<MqttEndpoint> {
        let url = Url::parse(&self.mqtt)
            .with_context(|| format!("mqtt: a URL expected, got {:?}", self.mqtt))?;
        let (tls, default_port) = match url.scheme() {
            "mqtt" => (false, 1883),
            "mqtts" => (true, 8883),
            other => bail!("mqtt: mqtt:// or mqtts:// expected, got {other}://"),
        };
        let host = url
            .host_str()
            .with_context(|| format!("mqtt: no host in {:?}", self.mqtt))?;
        Ok(MqttEndpoint {
            host: host.trim_matches(['[', ']']).to_string(),
            port: url.port().unwrap_or(default_port),
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str) -> anyhow::Result<AgentConfig> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, toml).expect("write");
        AgentConfig::load(&path)
    }

    #[test]
    fn endpoints_parse_with_default_ports() {
        let config = load("mqtt = \"mqtts://broker.example\"\n").expect("config");
        assert_eq!(
            config.mqtt_endpoint().expect("endpoint"),
            MqttEndpoint {
                host: "broker.example".into(),
                port: 8883,
                tls: true
            }
        );
        let config = load("mqtt = \"mqtt://127.0.0.1:2883\"\n").expect("config");
        assert_eq!(config.mqtt_endpoint().expect("endpoint").port, 2883);
    }

    #[test]
    fn bad_values_and_unknown_keys_are_named() {
        let error = |toml: &str| format!("{:#}", load(toml).expect_err("refused"));
        assert!(error("mqtt = \"http://x\"\n").contains("mqtt: mqtt:// or mqtts://"));
        assert!(error("server = \"ftp://x\"\n").contains("server: http://"));
        assert!(error("[telemetry]\ninterval_secs = 0\n").contains("telemetry.interval_secs"));
        assert!(error("[telemetry]\nintervall_secs = 5\n").contains("intervall_secs"));
        assert!(error("[update]\npublic_key = \"AAAA\"\n").contains("update.public_key"));
        assert!(error("keepalive_secs = \"x\"\n").contains("keepalive_secs"));
    }
}
