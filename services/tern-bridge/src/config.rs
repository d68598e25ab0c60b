use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Settings of the MQTT endpoint (`[mqtt]` in the config file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeConfig {
    /// Largest packet accepted, in bytes (remaining length); bigger ones close the connection.
    pub max_packet_size: usize,
    /// Connections beyond this are refused at accept.
    pub max_connections: usize,
    /// A client must send CONNECT within this many seconds of opening the connection.
    pub connect_timeout_secs: u64,
    /// Publishes received but not yet durable, per connection; beyond this the bridge stops
    /// reading from that connection (TCP back-pressure) instead of buffering without bound.
    pub max_inflight: usize,
    /// Deliveries queued per subscribing connection. When full, a delivery at any QoS makes the
    /// publisher wait (bounded) before it is dropped. Also the
    /// most QoS 1 and 2 messages a persistent session stores while its client is away; beyond
    /// it they are dropped and counted.
    pub max_queued_messages: usize,
    /// The longest a persistent session outlives its connection, in seconds: MQTT 5 clients
    /// asking for longer (or "never") get this in the CONNACK; MQTT 3.1.1 clients with
    /// CleanSession 0 always get it.
    pub max_session_expiry_secs: u32,
    /// Retained topics per tenant; a retained publish beyond it is delivered but not retained.
    pub max_retained_per_tenant: usize,
    /// Off (unset) by default. When set, clients that CONNECT without credentials are admitted
    /// into this tenant (created if missing), for development and protocol test suites.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anonymous_tenant: Option<String>,
    /// Open connections per tenant; beyond it CONNECT is refused (MQTT 5 0x97 quota exceeded,
    /// 3.1.1 3 server unavailable). 0: no limit.
    pub max_connections_per_tenant: usize,
    /// Publishes per second per connection (burst: one second's worth); a device over it is
    /// slowed down by not reading from it. 0: no limit.
    pub max_publish_rate_per_device: u32,
    /// Publishes per second of all a tenant's connections together (burst: one second's
    /// worth); over it, its devices are slowed down the same way. 0: no limit.
    pub max_publish_rate_per_tenant: u32,
    pub tls: TlsConfig,
}

/// MQTT over TLS (`[mqtt.tls]`): on when both files are set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// How often the files are checked for a renewed certificate, in seconds.
    pub reload_interval_secs: u64,
    /// Refuse TLS clients without a client certificate from a tenant's CA (mTLS only; by
    /// default certificates are optional and devices may use tokens).
    pub require_client_certificate: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            reload_interval_secs: 10,
            require_client_certificate: false,
        }
    }
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            max_packet_size: 256 * 1024,
            max_connections: 100_000,
            connect_timeout_secs: 10,
            max_inflight: 64,
            max_queued_messages: 1000,
            max_session_expiry_secs: 7 * 24 * 3600,
            max_retained_per_tenant: 10_000,
            anonymous_tenant: None,
            max_connections_per_tenant: 0,
            max_publish_rate_per_device: 0,
            max_publish_rate_per_tenant: 0,
            tls: TlsConfig::default(),
        }
    }
}
