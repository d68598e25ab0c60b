//! The broker bridge: the device-facing MQTT endpoint.
//!
//! It speaks MQTT 3.1.1 and 5 over TCP, TLS and WebSocket (`codec.rs` lifts 3.1.1 to MQTT 5
//! so the logic is written once): devices authenticate with their id and access token (or,
//! in anonymous mode, not at all), publish `telemetry` and `event` with QoS 0, 1 or 2, and get
//! their PUBACK (PUBREC) only after the message is durable in the event log. Every other topic
//! is plain publish/subscribe inside the device's tenant (QoS 0, 1 and 2 towards subscribers),
//! with retained messages and wills. Connects, disconnects and wills are appended to the
//! `lifecycle` stream. Publishes from one connection are appended concurrently and
//! acknowledged in order, so a device that pipelines QoS 1 messages is not held to one fsync
//! per message. Persistent sessions (`persistent.rs`) keep a client's subscriptions and its
//! QoS 1 and 2 messages while it is away, across restarts.

mod coap;
mod codec;
#[cfg(test)]
mod codec_robustness;
mod commands;
mod config;
mod connection;
mod fanout;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod handshake;
mod lifecycle;
mod metrics;
mod peers;
mod persistent;
mod policy;
mod quota;
mod reauth;
mod retained;
mod router;
mod sessions;
mod tls;
mod topics;
mod traces;
mod websocket;

use std::sync::Arc;

use std::net::SocketAddr;
use std::time::Duration;
use tern_core::TenantId;
use tern_eventlog::EventLog;
use tern_identity::Identity;
use tern_registry::nats::{DevicePresence, LocalRoutes};
use tern_registry::{Commands, Registry, RegistryError, Twins};
use tern_runtime::{MetricsRegistry, Shutdown};
use tern_store::{Store, StoreError};

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

pub use coap::ACCESS_TOKEN_OPTION as COAP_ACCESS_TOKEN_OPTION;
pub use config::{BridgeConfig, TlsConfig};
pub use peers::{PeerBridges, platform_message};
pub use tls::{TenantCaVerifier, TlsError, TlsReloader};
pub use websocket::{WEBSOCKET_PATH, websocket_routes};

use crate::commands::CommandTargets;
use crate::connection::Io;
use crate::metrics::BridgeMetrics;
use crate::persistent::PersistentSessions;
use crate::quota::{TenantConnections, TenantRates};
use crate::retained::Retained;
use crate::router::Router;
use crate::sessions::Sessions;

/// What the bridge works with.
pub struct BridgeServices {
    pub identity: Arc<Identity>,
    pub registry: Arc<Registry>,
    pub commands: Arc<Commands>,
    pub twins: Arc<Twins>,
    pub log: Arc<dyn EventLog>,
    pub store: Arc<dyn Store>,
}

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot load retained messages: {0}")]
    Retained(#[source] StoreError),
    #[error("cannot load persistent sessions: {0}")]
    Sessions(#[source] StoreError),
    #[error("cannot set up the anonymous tenant {name:?} (`mqtt.anonymous_tenant`): {source}")]
    AnonymousTenant { name: String, source: RegistryError },
}

/// Everything a connection needs, shared by all connections.
pub struct Bridge {
    config: BridgeConfig,
    identity: Arc<Identity>,
    registry: Arc<Registry>,
    log: Arc<dyn EventLog>,
    metrics: BridgeMetrics,
    sessions: Arc<Sessions>,
    router: Router,
    persistent: PersistentSessions,
    retained: Retained,
    commands: Arc<Commands>,
    twins: Arc<Twins>,
    /// The connections subscribed to their device's commands and twin.
    command_targets: Arc<CommandTargets>,
    /// Where clients without credentials go; `None` refuses them.
    anonymous_tenant: Option<TenantId>,
    /// Connections per tenant (`mqtt.max_connections_per_tenant`).
    tenant_connections: Arc<TenantConnections>,
    /// Publish rates per tenant (`mqtt.max_publish_rate_per_tenant`).
    tenant_rates: TenantRates,
    /// Connection slots (`mqtt.max_connections`) across every transport.
    slots: Arc<Semaphore>,
    /// Every connection's task, so that shutdown can wait for them.
    connections: TaskTracker,
    /// The other bridge processes, when there are any.
    peers: std::sync::OnceLock<Arc<dyn PeerBridges>>,
}

impl Bridge {
    /// Publishes a message of the platform's own (for example a rule's `republish:` action)
    /// to the tenant's subscribers of `topic`, at QoS 1 and not retained, as if a device had:
    /// persistent sessions that are away keep it. `Err` says why not.
    pub async fn publish(
        &self,
        tenant: TenantId,
        topic: &str,
        payload: bytes::Bytes,
        user_properties: Vec<(String, String)>,
    ) -> Result<(), String> {
        fanout::publish_from_platform(self, tenant, topic, payload, user_properties).await
    }

    /// What the registry's routes must reach in this process: the connections' command and
    /// twin subscriptions and their sessions (for revocation). `tern up` hands them to the
    /// registry directly, or to a [`NatsEndpoint`](tern_registry::nats::NatsEndpoint).
    pub fn local_routes(&self) -> LocalRoutes {
        LocalRoutes {
            commands: self.command_targets.clone(),
            twins: self.command_targets.clone(),
            access: self.sessions.clone(),
            takeover: self.sessions.clone(),
        }
    }

    /// Told of every connection's start and end (the NATS endpoint subscribes to the
    /// subjects of the devices held here); set once, before serving.
    pub fn set_presence(&self, presence: Arc<dyn DevicePresence>) {
        self.sessions.set_presence(presence);
    }

    /// Loads the retained messages and, in anonymous mode, finds or creates the tenant.
    pub async fn new(
        config: BridgeConfig,
        services: BridgeServices,
        metrics: &MetricsRegistry,
    ) -> Result<Self, BridgeError> {
        let BridgeServices {
            identity,
            registry,
            commands,
            twins,
            log,
            store,
        } = services;
        let retained = Retained::load(store.clone(), config.max_retained_per_tenant)
            .await
            .map_err(BridgeError::Retained)?;
        let sessions = Arc::new(Sessions::default());
        let router = Router::default();
        let metrics = BridgeMetrics::register(metrics);
        let persistent = PersistentSessions::load(
            store,
            &router,
            config.max_queued_messages,
            metrics.sessions_away.clone(),
            || sessions.next_id(),
        )
        .await
        .map_err(BridgeError::Sessions)?;
        let anonymous_tenant = match &config.anonymous_tenant {
            None => None,
            Some(name) => Some(anonymous_tenant(&registry, name).await?),
        };
        let command_targets = Arc::new(CommandTargets::default());
        let slots = Arc::new(Semaphore::new(config.max_connections));
        Ok(Self {
            config,
            identity,
            registry,
            log,
            metrics,
            sessions,
            router,
            persistent,
            retained,
            commands,
            twins,
            command_targets,
            anonymous_tenant,
            slots,
            tenant_connections: Arc::default(),
            tenant_rates: TenantRates::default(),
            connections: TaskTracker::new(),
            peers: std::sync::OnceLock::new(),
        })
    }

    /// Accepts MQTT connections on every listener until `shutdown` is cancelled, then stops
    /// accepting, lets every connection (WebSocket ones included) finish acknowledging what it
    /// has already received, and returns.
    pub async fn serve(self: Arc<Self>, listeners: Listeners, shutdown: Shutdown) {
        let tcp = self
            .clone()
            .accept(listeners.tcp, None, Protocol::Mqtt, shutdown.clone());
        let tls = async {
            if let Some((listener, tls)) = listeners.tls {
                let watch = tls.clone().watch(
                    Duration::from_secs(self.config.tls.reload_interval_secs.max(1)),
                    shutdown.clone(),
                );
                let wss = async {
                    if let Some(wss) = listeners.wss {
                        let tls = Some(tls.clone());
                        self.clone()
                            .accept(wss, tls, Protocol::WebSocket, shutdown.clone())
                            .await;
                    }
                };
                tokio::join!(
                    self.clone().accept(
                        listener,
                        Some(tls.clone()),
                        Protocol::Mqtt,
                        shutdown.clone()
                    ),
                    wss,
                    watch
                );
            }
        };
        let coap = async {
            if let Some(socket) = listeners.coap {
                coap::serve(self.clone(), socket, shutdown.clone()).await;
            }
        };
        tokio::join!(tcp, tls, coap, self.expire_sessions(shutdown.clone()));
        self.connections.close();
        self.connections.wait().await;
        self.persistent.flush().await;
        tracing::info!("MQTT listeners stopped");
    }

    async fn accept(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<Arc<TlsReloader>>,
        protocol: Protocol,
        shutdown: Shutdown,
    ) {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(permit) = self.admit(peer) else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let bridge = self.clone();
            let shutdown = shutdown.clone();
            let tls = tls.as_ref().map(|t| t.acceptor());
            self.connections.spawn(async move {
                let Some(acceptor) = tls else {
                    connection::run(bridge, Io::tcp(stream), peer, "tcp", shutdown).await;
                    drop(permit);
                    return;
                };
                let limit = Duration::from_secs(bridge.config.connect_timeout_secs);
                let tls = match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake failed");
                        bridge.metrics.tls_failures.inc();
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "TLS handshake timed out");
                        bridge.metrics.tls_failures.inc();
                        return;
                    }
                };
                match protocol {
                    Protocol::Mqtt => {
                        connection::run(bridge, Io::tls(tls), peer, "tls", shutdown).await;
                        drop(permit);
                    }
                    Protocol::WebSocket => {
                        // The upgrade takes the connection's slot of its own.
                        drop(permit);
                        websocket::serve_wss(bridge, tls, peer, shutdown).await;
                    }
                }
            });
        }
    }

    /// Ends persistent sessions whose expiry passed, every second until shutdown.
    async fn expire_sessions(&self, shutdown: Shutdown) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.persistent.sweep(&self.router).await;
        }
    }

    /// A slot under `mqtt.max_connections`, shared by every transport.
    fn admit(&self, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
        let permit = self.slots.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.metrics.refused_connections.inc();
            tracing::warn!(%peer, limit = self.config.max_connections, "connection limit reached; refusing");
        }
        permit
    }
}

/// What a listener speaks once TLS (if any) is set up.
#[derive(Clone, Copy)]
enum Protocol {
    Mqtt,
    /// HTTP upgraded to MQTT over WebSocket (WSS).
    WebSocket,
}

/// The sockets the bridge accepts devices on.
pub struct Listeners {
    pub tcp: TcpListener,
    /// MQTT over TLS, with its certificate.
    pub tls: Option<(TcpListener, Arc<TlsReloader>)>,
    /// MQTT over WebSocket over TLS (same certificate); only with `tls`.
    pub wss: Option<TcpListener>,
    /// The CoAP endpoint.
    pub coap: Option<UdpSocket>,
}

async fn anonymous_tenant(registry: &Registry, name: &str) -> Result<TenantId, BridgeError> {
    let found = match registry.tenant(name).await {
        Ok(tenant) => Ok(tenant),
        Err(RegistryError::NotFound(_)) => registry.create_tenant(name).await,
        Err(e) => Err(e),
    };
    let tenant = found.map_err(|source| BridgeError::AnonymousTenant {
        name: name.to_string(),
        source,
    })?;
    tracing::warn!(
        tenant = %tenant.name,
        "anonymous mode: MQTT clients without credentials are admitted into this tenant"
    );
    Ok(tenant.id)
}
