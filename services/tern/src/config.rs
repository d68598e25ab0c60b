//! The configuration of `tern up`: defaults here, then the TOML file, `TERN_...` environment
//! variables and flags (docs/configuration.md lists every key).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tern_analytics::retention::RetentionConfig;
use tern_analytics::rules::RulesConfig;
use tern_bridge::BridgeConfig;
use tern_identity::IdentityConfig;
use tern_registry::ota::OtaConfig;
use tern_registry::{CommandsConfig, TwinsConfig};
use tern_runtime::logging::LogFormat;

use crate::cli::UpArgs;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpConfig {
    /// Directory of the event log, the store and the operator token.
    pub data_dir: PathBuf,
    /// Address every listener binds to.
    pub bind: IpAddr,
    pub mqtt_port: u16,
    /// MQTT over TLS; listens only when `mqtt.tls` has a certificate and key.
    pub mqtts_port: u16,
    /// MQTT over WebSocket over TLS (`/mqtt`); listens only when `mqtt.tls` is set.
    pub wss_port: u16,
    /// CoAP (UDP).
    pub coap_port: u16,
    pub http_port: u16,
    pub grpc_port: u16,
    /// Seconds to wait for connections and consumers to drain on SIGINT/SIGTERM.
    pub shutdown_timeout_secs: u64,
    pub log: LogConfig,
    pub mqtt: BridgeConfig,
    pub identity: IdentityConfig,
    pub commands: CommandsConfig,
    pub twins: TwinsConfig,
    pub devices: DevicesConfig,
    pub ota: OtaConfig,
    pub rules: RulesConfig,
    pub retention: RetentionConfig,
    pub eventlog: EventLogConfig,
    pub routing: RoutingConfig,
    pub tracing: tern_runtime::otel::TracingConfig,
    pub store: StoreConfig,
}

/// Where the store is: embedded in `data_dir`, or served by `tern store` to several processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Empty: the embedded store in `data_dir`. Else the `tern store` to use, such as
    /// `http://tern-store:50052`.
    pub url: String,
    /// The file holding the store token (with `url`).
    pub token_file: Option<PathBuf>,
    /// `https://` URLs: the CA (PEM) that signed the store's certificate.
    pub ca_file: Option<PathBuf>,
    /// This process's certificate and key (PEM), for a store that requires client
    /// certificates (mutual TLS).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl StoreConfig {
    /// TLS to the store: none for `http://`; for `https://`, `ca_file` and, together, the
    /// optional `cert_file` and `key_file`. Errors name the key.
    pub fn tls(&self) -> anyhow::Result<Option<tern_store::StoreTls>> {
        let read = |path: &PathBuf, key: &str| {
            std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("`{key}`: cannot read {}: {e}", path.display()))
        };
        if !self.url.starts_with("https://") {
            if self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some() {
                anyhow::bail!(
                    "invalid configuration: `store.ca_file`, `store.cert_file` and \
                     `store.key_file` need an https:// `store.url`"
                );
            }
            return Ok(None);
        }
        let Some(ca) = &self.ca_file else {
            anyhow::bail!(
                "invalid configuration: `store.ca_file` must name the CA of the store's \
                 certificate for an https:// `store.url`"
            );
        };
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                Some((read(cert, "store.cert_file")?, read(key, "store.key_file")?))
            }
            (None, None) => None,
            _ => anyhow::bail!(
                "invalid configuration: `store.cert_file` and `store.key_file` must be set together"
            ),
        };
        Ok(Some(tern_store::StoreTls {
            ca_pem: read(ca, "store.ca_file")?,
            identity,
        }))
    }

    /// The token of a remote store, read from `token_file`.
    pub fn token(&self) -> anyhow::Result<String> {
        let Some(path) = &self.token_file else {
            anyhow::bail!("invalid configuration: `store.token_file` must be set with `store.url`");
        };
        read_token(path, "store.token_file")
    }
}

/// A secret kept in a file (one line); errors name `key`.
pub fn read_token(path: &std::path::Path, key: &str) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("`{key}`: cannot read {}: {e}", path.display()))?;
    let token = token.trim().to_string();
    if token.len() < 16 {
        anyhow::bail!(
            "`{key}`: the token in {} is shorter than 16 characters",
            path.display()
        );
    }
    Ok(token)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesConfig {
    /// A device without a live MQTT connection (HTTP, CoAP) is online while it was heard from
    /// within this many seconds.
    pub heartbeat_window_secs: u64,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        Self {
            heartbeat_window_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `info,tern_bridge=debug`; `RUST_LOG` wins over it.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventLogConfig {
    /// `embedded` (on local disk, in `data_dir`) or `kafka` (`[eventlog.kafka]`).
    pub backend: EventLogBackend,
    /// Partitions per stream of the embedded log; fixed once the log has data.
    pub partitions: u32,
    pub kafka: tern_eventlog::KafkaLogConfig,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// `inprocess` (the registry calls the bridge in this process) or `nats` (`[routing.nats]`).
    pub backend: RoutingBackend,
    pub nats: tern_registry::nats::NatsConfig,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingBackend {
    #[default]
    InProcess,
    Nats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventLogBackend {
    Embedded,
    Kafka,
}

impl Default for UpConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            mqtt_port: 1883,
            mqtts_port: 8883,
            wss_port: 8084,
            coap_port: 5683,
            http_port: 8080,
            grpc_port: tern_proto::DEFAULT_GRPC_PORT,
            shutdown_timeout_secs: 30,
            log: LogConfig::default(),
            mqtt: BridgeConfig::default(),
            identity: IdentityConfig::default(),
            commands: CommandsConfig::default(),
            twins: TwinsConfig::default(),
            devices: DevicesConfig::default(),
            ota: OtaConfig::default(),
            rules: RulesConfig::default(),
            retention: RetentionConfig::default(),
            eventlog: EventLogConfig::default(),
            routing: RoutingConfig::default(),
            tracing: tern_runtime::otel::TracingConfig::default(),
            store: StoreConfig::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Default for EventLogConfig {
    fn default() -> Self {
        Self {
            backend: EventLogBackend::Embedded,
            partitions: 4,
            kafka: tern_eventlog::KafkaLogConfig::default(),
        }
    }
}

/// The flags of `tern up` that override configuration keys; unset flags are skipped.
#[derive(Serialize)]
struct Flags<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<&'a PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtts_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wss_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    coap_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bind: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt: Option<MqttFlags<'a>>,
}

#[derive(Serialize)]
struct MqttFlags<'a> {
    anonymous_tenant: &'a str,
}

impl UpConfig {
    pub fn load(args: &UpArgs) -> anyhow::Result<Self> {
        let flags = Flags {
            data_dir: args.data_dir.as_ref(),
            mqtt_port: args.mqtt_port,
            mqtts_port: args.mqtts_port,
            wss_port: args.wss_port,
            coap_port: args.coap_port,
            http_port: args.http_port,
            grpc_port: args.grpc_port,
            bind: args.bind,
            mqtt: args
                .anonymous_tenant
                .as_deref()
                .map(|anonymous_tenant| MqttFlags { anonymous_tenant }),
        };
        let config: Self = tern_runtime::load_config(args.config.as_deref(), &flags)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that serde's types cannot express; errors name the key.
    fn validate(&self) -> anyhow::Result<()> {
        let problems = [
            (self.mqtt.max_packet_size < 64 || self.mqtt.max_packet_size > 268_435_455)
                .then_some("`mqtt.max_packet_size` must be 64..=268435455 bytes (the MQTT limit)"),
            (self.mqtt.max_connections == 0).then_some("`mqtt.max_connections` must be at least 1"),
            (self.mqtt.connect_timeout_secs == 0)
                .then_some("`mqtt.connect_timeout_secs` must be at least 1"),
            (self.mqtt.max_inflight == 0).then_some("`mqtt.max_inflight` must be at least 1"),
            (self.mqtt.max_queued_messages == 0)
                .then_some("`mqtt.max_queued_messages` must be at least 1"),
            (self.mqtt.tls.cert_file.is_some() != self.mqtt.tls.key_file.is_some())
                .then_some("`mqtt.tls.cert_file` and `mqtt.tls.key_file` must be set together"),
            (self.mqtt.tls.reload_interval_secs == 0)
                .then_some("`mqtt.tls.reload_interval_secs` must be at least 1"),
            self.mqtt
                .anonymous_tenant
                .as_deref()
                .is_some_and(|name| tern_registry::validate_tenant_name(name).is_err())
                .then_some(
                    "`mqtt.anonymous_tenant` must be a tenant name: a lowercase slug such as `dev`",
                ),
            (self.eventlog.partitions == 0 || self.eventlog.partitions > 1024)
                .then_some("`eventlog.partitions` must be 1..=1024"),
            (self.identity.device_access_token_ttl_secs == 0)
                .then_some("`identity.device_access_token_ttl_secs` must be at least 1"),
            (self.commands.max_ttl_secs == 0)
                .then_some("`commands.max_ttl_secs` must be at least 1"),
            (self.commands.default_ttl_secs == 0
                || self.commands.default_ttl_secs > self.commands.max_ttl_secs)
                .then_some("`commands.default_ttl_secs` must be 1..=`commands.max_ttl_secs`"),
            (self.commands.max_payload_bytes == 0)
                .then_some("`commands.max_payload_bytes` must be at least 1"),
            (self.twins.max_document_bytes == 0)
                .then_some("`twins.max_document_bytes` must be at least 1"),
            (self.devices.heartbeat_window_secs == 0)
                .then_some("`devices.heartbeat_window_secs` must be at least 1"),
            (self.ota.max_artifact_bytes == 0)
                .then_some("`ota.max_artifact_bytes` must be at least 1"),
            (self.ota.campaign_interval_ms == 0)
                .then_some("`ota.campaign_interval_ms` must be at least 1"),
            (self.rules.max_rules_per_tenant == 0)
                .then_some("`rules.max_rules_per_tenant` must be at least 1"),
            (self.rules.max_groups_per_rule == 0)
                .then_some("`rules.max_groups_per_rule` must be at least 1"),
            (self.rules.max_tenant_cpu_ms_per_sec == 0)
                .then_some("`rules.max_tenant_cpu_ms_per_sec` must be at least 1"),
            (self.retention.sweep_interval_secs == 0)
                .then_some("`retention.sweep_interval_secs` must be at least 1"),
        ];
        let problems: Vec<&str> = problems.into_iter().flatten().collect();
        if self.eventlog.backend == EventLogBackend::Kafka
            && let Err(tern_eventlog::LogError::Invalid { field, reason }) =
                self.eventlog.kafka.validate()
        {
            anyhow::bail!("invalid configuration: `{field}` {reason}");
        }
        if self.routing.backend == RoutingBackend::Nats
            && let Err((key, reason)) = self.routing.nats.validate()
        {
            anyhow::bail!("invalid configuration: `{key}` {reason}");
        }
        if let Err((key, reason)) = self.tracing.validate() {
            anyhow::bail!("invalid configuration: `{key}` {reason}");
        }
        if !self.store.url.is_empty() {
            if !(self.store.url.starts_with("http://") || self.store.url.starts_with("https://")) {
                anyhow::bail!(
                    "invalid configuration: `store.url` must be an http:// or https:// URL, got {:?}",
                    self.store.url
                );
            }
            self.store.token()?;
            self.store.tls()?;
        }
        if let Some(first) = problems.first() {
            anyhow::bail!(
                "invalid configuration: {}",
                if problems.len() == 1 {
                    first.to_string()
                } else {
                    problems.join("; ")
                }
            );
        }
        let tls = self.mqtt.tls.cert_file.is_some();
        let ports = [
            ("mqtt_port", self.mqtt_port),
            ("mqtts_port", if tls { self.mqtts_port } else { 0 }),
            ("wss_port", if tls { self.wss_port } else { 0 }),
            ("http_port", self.http_port),
            ("grpc_port", self.grpc_port),
        ];
        for (i, (a, pa)) in ports.iter().enumerate() {
            for (b, pb) in &ports[i + 1..] {
                if pa == pb && *pa != 0 {
                    anyhow::bail!("invalid configuration: `{a}` and `{b}` are both {pa}");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ports() {
        let c = UpConfig::default();
        assert_eq!((c.mqtt_port, c.http_port, c.grpc_port), (1883, 8080, 50051));
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        c.validate().expect("defaults are valid");
    }

    #[test]
    fn the_example_config_is_the_defaults() {
        // deploy/config/tern.toml documents every key; it must parse and stay equal to the
        // defaults, so the documentation cannot drift from the code.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/config/tern.toml");
        let text = std::fs::read_to_string(path).expect("example config");
        let parsed: UpConfig = figment::Figment::new()
            .merge(figment::providers::Serialized::defaults(UpConfig::default()))
            .merge(<figment::providers::Toml as figment::providers::Format>::string(&text))
            .extract()
            .expect("example parses");
        assert_eq!(
            serde_json::to_value(parsed).expect("json"),
            serde_json::to_value(UpConfig::default()).expect("json")
        );
    }

    #[test]
    fn the_anonymous_tenant_flag_sets_its_key_and_is_validated() {
        let args = |name: &str| UpArgs {
            anonymous_tenant: Some(name.to_string()),
            ..UpArgs::default()
        };
        let config = UpConfig::load(&args("dev")).expect("valid");
        assert_eq!(config.mqtt.anonymous_tenant.as_deref(), Some("dev"));
        let err = UpConfig::load(&args("Not A Slug")).unwrap_err().to_string();
        assert!(err.contains("mqtt.anonymous_tenant"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let mut c = UpConfig::default();
        c.mqtt.max_packet_size = 1;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("mqtt.max_packet_size")
        );
        let mut c = UpConfig::default();
        c.grpc_port = c.http_port;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("http_port") && err.contains("grpc_port"),
            "{err}"
        );
    }
}
