//! CONNECT: which protocol version, who the client is (a device's token, or anonymous mode),
//! and the CONNACK that says so (with MQTT 5 reason codes and the server's limits).

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{ConnAck, ConnAckProperties, ConnectReturnCode, LastWill, Packet};
use tern_core::{DeviceId, TenantId};
use tern_identity::DeviceAuthError;
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;

use crate::codec::{self, ConnectPacket, ReadError, Version};
use crate::commands::is_device_topic;
use crate::connection::Connection;
use crate::metrics::ReasonLabel;
use crate::quota::TenantSlot;
use crate::sessions::SessionGuard;
use crate::topics::{InvalidTopic, validate_name};
use tokio_rustls::rustls::pki_types::CertificateDer;

/// Topic aliases a client may set per connection (MQTT 5 Topic Alias Maximum).
pub(crate) const TOPIC_ALIAS_MAX: u16 = 64;

/// The MQTT 5 enhanced authentication method (4.12): the access token as Authentication Data,
/// in CONNECT and in AUTH (reason 0x19) to refresh it on a live connection. Such a connection
/// lives only as long as its latest token.
pub(crate) const TOKEN_AUTH_METHOD: &str = "token";

/// An admitted client.
pub(crate) struct Admitted {
    pub tenant: TenantId,
    pub device: DeviceId,
    pub keepalive: u16,
    /// Boxed: most devices have none, and this stays in the connection's task.
    pub will: Option<Box<LastWill>>,
    /// MQTT 5 Receive Maximum of the client: QoS 1 deliveries it accepts unacknowledged.
    pub receive_maximum: u16,
    /// MQTT 5 Maximum Packet Size of the client; larger deliveries are dropped (3.1.2.11.4).
    pub max_packet_size: Option<u32>,
    /// The tenant's connection slot, held for the connection's life.
    pub _tenant_slot: TenantSlot,
    /// The device's claim on its session (takeover, revocation).
    pub session: SessionGuard,
    /// How long the session outlives the connection, in seconds; 0 ends it with the
    /// connection (a clean session).
    pub session_expiry: u32,
    /// A persistent session was there to resume (CONNACK Session Present).
    pub session_present: bool,
    /// MQTT 5 Will Delay Interval, in seconds.
    pub will_delay: u32,
    /// With the `token` authentication method: when the token expires (ms since the epoch).
    pub token_expires_at_ms: Option<i64>,
}

impl Connection {
    /// Waits for CONNECT and authenticates it. On failure the CONNACK refusal (where one is
    /// due) has been sent and the caller closes.
    pub(crate) async fn handshake(&mut self) -> Option<Admitted> {
        let limit = Duration::from_secs(self.bridge.config.connect_timeout_secs);
        let max = self.bridge.config.max_packet_size;
        let connect =
            match timeout(limit, self.read_with(|buf| codec::read_connect(buf, max))).await {
                Err(_) => return self.refuse_silently("connect_timeout"),
                Ok(Ok(None)) => return None,
                Ok(Ok(Some(connect))) => connect,
                Ok(Err(ReadError::UnsupportedVersion(level))) => {
                    // Answered in 3.1.1's format, which every client version can read (3.1.2.2).
                    tracing::info!(level, "unsupported MQTT protocol level");
                    return self
                        .refuse(
                            ConnectReturnCode::UnsupportedProtocolVersion,
                            "protocol_version",
                            "",
                        )
                        .await;
                }
                Ok(Err(ReadError::Unexpected(packet))) => {
                    tracing::info!(packet, "first packet was not CONNECT");
                    return self.refuse_silently("not_connect");
                }
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "malformed CONNECT");
                    return self.refuse_silently("malformed_connect");
                }
            };
        self.version = connect.version;
        self.authenticate(connect).await
    }

    async fn authenticate(&mut self, c: ConnectPacket) -> Option<Admitted> {
        use ConnectReturnCode::*;
        let properties = c.connect.properties.clone().unwrap_or_default();
        let token_auth = match properties.authentication_method.as_deref() {
            None => false,
            Some(TOKEN_AUTH_METHOD) => true,
            Some(_) => {
                return self
                    .refuse(
                        BadAuthenticationMethod,
                        "auth_method",
                        "the authentication method is \"token\" (the access token as authentication data); or send the device id as user name and the token as password",
                    )
                    .await;
            }
        };
        if properties.receive_maximum == Some(0) {
            return self
                .refuse(
                    ProtocolError,
                    "receive_maximum",
                    "Receive Maximum must not be 0",
                )
                .await;
        }
        if let Some(will) = &c.will
            && let Err(InvalidTopic(why)) = valid_will_topic(&will.topic)
        {
            // 3.1.1 3.1.2.9 / 5.0 3.1.2.7: an invalid will topic makes the CONNECT malformed.
            tracing::info!(why, "invalid will topic");
            return match self.version {
                Version::V5 => self.refuse(TopicNameInvalid, "bad_will_topic", why).await,
                Version::V311 => {
                    let _ = self.writer.shutdown().await;
                    self.refuse_silently("bad_will_topic")
                }
            };
        }
        let client_id = c.connect.client_id.as_str();
        let user_name = c.login.as_ref().map(|l| l.username.as_str());
        let certificates = self.client_certificates.take();
        let (tenant, device, token_expires_at_ms) = match (&c.login, token_auth) {
            // A client certificate is the device's identity: no token is needed.
            _ if let Some(chain) = &certificates => {
                let (tenant, device) = self
                    .authenticate_certificate(chain, user_name, client_id)
                    .await?;
                (tenant, device, None)
            }
            (_, true) => {
                let Some(token) = properties
                    .authentication_data
                    .as_ref()
                    .and_then(|d| std::str::from_utf8(d).ok())
                else {
                    return self
                        .refuse(
                            BadAuthenticationMethod,
                            "auth_data",
                            "with the \"token\" method, the authentication data is the access token",
                        )
                        .await;
                };
                let (tenant, device, expires) = self
                    .authenticate_device(token, user_name, client_id)
                    .await?;
                (tenant, device, Some(expires))
            }
            (Some(login), false) => {
                let (tenant, device, _) = self
                    .authenticate_device(&login.password, user_name, client_id)
                    .await?;
                (tenant, device, None)
            }
            (None, false) => match self.bridge.anonymous_tenant {
                Some(tenant) => (tenant, self.anonymous_device(tenant, &c).await?, None),
                None => {
                    tracing::info!("CONNECT without credentials");
                    return self
                        .refuse(
                            BadUserNamePassword,
                            "no_credentials",
                            "send the device id as user name and its access token as password",
                        )
                        .await;
                }
            },
        };
        let limit = self.bridge.config.max_connections_per_tenant;
        let Some(tenant_slot) = self.bridge.tenant_connections.reserve(tenant, limit) else {
            tracing::info!(%tenant, limit, "tenant connection quota reached");
            return self
                .refuse(
                    QuotaExceeded,
                    "tenant_connection_quota",
                    "the tenant's connection quota is reached",
                )
                .await;
        };
        // After the device's previous connection (if any) has ended and parked its session.
        let session = self.bridge.sessions.claim(tenant, device).await;
        let session_expiry = self.granted_session_expiry(&c);
        let persistent = &self.bridge.persistent;
        let mut session_present = persistent.has(tenant, device);
        if session_present && c.connect.clean_start {
            // 3.1.2-6 (3.1.1), 3.1.2.4 (5.0): a clean start discards the old session.
            session_present = false;
            if let Err(e) = persistent
                .discard(&self.bridge.router, tenant, device)
                .await
            {
                tracing::error!(error = %e, "cannot discard a persistent session");
                return self
                    .refuse(
                        ServerUnavailable,
                        "session_store",
                        "the session store failed",
                    )
                    .await;
            }
        }
        let connack = ConnAck {
            session_present,
            code: Success,
            properties: (self.version == Version::V5)
                .then(|| self.limits(&c, device, session_expiry)),
        };
        self.send(&Packet::ConnAck(connack)).await.ok()?;
        Some(Admitted {
            tenant,
            device,
            keepalive: c.connect.keep_alive,
            will_delay: c
                .will
                .as_ref()
                .and_then(|w| w.properties.as_ref())
                .and_then(|p| p.delay_interval)
                .unwrap_or(0),
            will: c.will.map(Box::new),
            receive_maximum: properties.receive_maximum.unwrap_or(u16::MAX),
            max_packet_size: properties.max_packet_size,
            _tenant_slot: tenant_slot,
            session,
            session_expiry,
            session_present,
            token_expires_at_ms,
        })
    }

    /// How long the session may outlive the connection: MQTT 5's Session Expiry Interval, or
    /// for a 3.1.1 CleanSession 0 the longest allowed, capped by
    /// `mqtt.max_session_expiry_secs`.
    fn granted_session_expiry(&self, c: &ConnectPacket) -> u32 {
        let max = self.bridge.config.max_session_expiry_secs;
        match self.version {
            Version::V311 if c.connect.clean_start => 0,
            Version::V311 => max,
            Version::V5 => c
                .connect
                .properties
                .as_ref()
                .and_then(|p| p.session_expiry_interval)
                .unwrap_or(0)
                .min(max),
        }
    }

    /// The CONNACK properties of MQTT 5: what this server supports and allows.
    fn limits(
        &self,
        c: &ConnectPacket,
        device: DeviceId,
        granted_expiry: u32,
    ) -> ConnAckProperties {
        let config = &self.bridge.config;
        let asked_expiry = c
            .connect
            .properties
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0);
        ConnAckProperties {
            // 3.2.2.3.2: said only when it differs from what the client asked.
            session_expiry_interval: (asked_expiry != granted_expiry).then_some(granted_expiry),
            receive_max: Some(config.max_inflight.clamp(1, usize::from(u16::MAX)) as u16),
            retain_available: Some(1),
            max_packet_size: Some(config.max_packet_size as u32),
            assigned_client_identifier: c.connect.client_id.is_empty().then(|| device.to_string()),
            topic_alias_max: Some(TOPIC_ALIAS_MAX),
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(1),
            shared_subscription_available: Some(1),
            // 3.2.2.3.17: the same method as the CONNECT's.
            authentication_method: c
                .connect
                .properties
                .as_ref()
                .and_then(|p| p.authentication_method.clone()),
            ..empty_connack_properties()
        }
    }

    /// A device's own credentials: its access token (as password, or as authentication data
    /// with the `token` method), and its id as user name and client id (either may be left
    /// out where the token says who it is). Returns when the token expires.
    async fn authenticate_device(
        &mut self,
        token: &str,
        user_name: Option<&str>,
        client_id: &str,
    ) -> Option<(TenantId, DeviceId, i64)> {
        use ConnectReturnCode::*;
        let claimed = match user_name.filter(|u| !u.is_empty()).map(DeviceId::parse) {
            None => None,
            Some(Ok(id)) => Some(id),
            Some(Err(_)) => {
                tracing::info!("CONNECT user name is not a device id");
                return self
                    .refuse(
                        BadUserNamePassword,
                        "bad_username",
                        "the user name must be the device id",
                    )
                    .await;
            }
        };
        let (device, principal) = match self.bridge.identity.authenticate_device_token(token).await
        {
            Ok(authenticated) => authenticated,
            Err(e) => {
                tracing::info!(claimed = ?claimed, error = %e, "device authentication failed");
                return self.refuse_device(e).await;
            }
        };
        if claimed.is_some_and(|id| id != device.id) {
            tracing::info!(claimed = ?claimed, "token belongs to another device");
            return self
                .refuse(
                    BadUserNamePassword,
                    "token_device_mismatch",
                    "the token belongs to another device",
                )
                .await;
        }
        self.client_id_names(client_id, device.id).await?;
        Some((device.tenant_id, device.id, principal.expires_at_ms))
    }

    /// The client id must be the device id, or empty (3.1.3-6: the server assigns one).
    async fn client_id_names(&mut self, client_id: &str, device: DeviceId) -> Option<()> {
        if client_id.is_empty() || client_id == device.to_string() {
            return Some(());
        }
        tracing::info!(client_id, "client id differs from the device id");
        self.refuse(
            ConnectReturnCode::ClientIdentifierNotValid,
            "bad_client_id",
            "the client id must be the device id or empty",
        )
        .await
    }

    /// A device by its TLS client certificate (mTLS): issued by its tenant's CA, naming the
    /// device in its Common Name. A user name, if sent, must name the same device.
    async fn authenticate_certificate(
        &mut self,
        chain: &[CertificateDer<'static>],
        user_name: Option<&str>,
        client_id: &str,
    ) -> Option<(TenantId, DeviceId)> {
        use ConnectReturnCode::*;
        let identity = self.bridge.identity.clone();
        let device = match identity.authenticate_certificate(chain).await {
            Ok(device) => device,
            Err(e) => {
                tracing::info!(error = %e, "client certificate refused");
                return self.refuse_device(e).await;
            }
        };
        let id = device.id.to_string();
        if user_name.is_some_and(|u| !u.is_empty() && u != id && u != device.name) {
            return self
                .refuse(
                    BadUserNamePassword,
                    "certificate_device_mismatch",
                    "the user name names another device than the client certificate",
                )
                .await;
        }
        self.client_id_names(client_id, device.id).await?;
        Some((device.tenant_id, device.id))
    }

    /// Refuses a device whose credentials did not pass, with the code that says why.
    async fn refuse_device<T>(&mut self, e: DeviceAuthError) -> Option<T> {
        use ConnectReturnCode::*;
        let (code, metric) = match e {
            DeviceAuthError::InvalidToken => (BadUserNamePassword, "bad_token"),
            DeviceAuthError::Revoked => (BadUserNamePassword, "revoked_token"),
            DeviceAuthError::UnknownDevice => (NotAuthorized, "unknown_device"),
            DeviceAuthError::Disabled => (NotAuthorized, "device_disabled"),
            DeviceAuthError::Registry(_) => (ServerUnavailable, "registry_unavailable"),
        };
        let why = match e {
            DeviceAuthError::Registry(_) => "credentials cannot be checked now".to_string(),
            other => other.to_string(),
        };
        self.refuse(code, metric, &why).await
    }

    /// Anonymous mode: a client id that names a registered device of the tenant acts as that
    /// device; any other client id gets a stable id derived from it (so session takeover works),
    /// and an empty one a fresh id (3.1.1 allows that with a clean session only, 3.1.3-7).
    async fn anonymous_device(&mut self, tenant: TenantId, c: &ConnectPacket) -> Option<DeviceId> {
        use ConnectReturnCode::*;
        let client_id = c.connect.client_id.as_str();
        if client_id.is_empty() {
            if self.version == Version::V311 && !c.connect.clean_start {
                return self
                    .refuse(ClientIdentifierNotValid, "empty_client_id", "")
                    .await;
            }
            return Some(DeviceId::random());
        }
        match self.bridge.registry.device_of(tenant, client_id).await {
            Ok(device) if device.disabled => {
                tracing::info!(client_id, "device is disabled");
                self.refuse(NotAuthorized, "device_disabled", "the device is disabled")
                    .await
            }
            Ok(device) => Some(device.id),
            Err(_) => Some(derived_device_id(tenant, client_id)),
        }
    }

    /// Sends a CONNACK refusal (with a reason string in MQTT 5) and closes.
    async fn refuse<T>(
        &mut self,
        code: ConnectReturnCode,
        metric: &'static str,
        why: &str,
    ) -> Option<T> {
        let properties =
            (self.version == Version::V5 && !why.is_empty()).then(|| ConnAckProperties {
                reason_string: Some(why.to_string()),
                ..empty_connack_properties()
            });
        let connack = ConnAck {
            session_present: false,
            code,
            properties,
        };
        let _ = self.send(&Packet::ConnAck(connack)).await;
        let _ = self.writer.shutdown().await;
        self.refuse_silently(metric)
    }

    fn refuse_silently<T>(&self, reason: &'static str) -> Option<T> {
        self.bridge
            .metrics
            .connect_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
        None
    }
}

fn empty_connack_properties() -> ConnAckProperties {
    ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

/// A will topic must be a valid topic name outside the device's own (command, twin) topics.
fn valid_will_topic(topic: &[u8]) -> Result<(), InvalidTopic> {
    let topic =
        std::str::from_utf8(topic).map_err(|_| InvalidTopic("topic names must be UTF-8"))?;
    validate_name(topic)?;
    if is_device_topic(topic) {
        return Err(InvalidTopic(
            "wills may not be published under command/ or twin/",
        ));
    }
    Ok(())
}

/// A stable device id for an anonymous client id: the same client id always maps to the same
/// id within a tenant, and never collides with another tenant's.
fn derived_device_id(tenant: TenantId, client_id: &str) -> DeviceId {
    use aws_lc_rs::digest::{Context, SHA256};
    let mut hash = Context::new(&SHA256);
    hash.update(tenant.0.as_bytes());
    hash.update(client_id.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hash.finish().as_ref()[..16]);
    DeviceId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
}
