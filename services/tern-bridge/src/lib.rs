//! The broker bridge: the device-facing MQTT endpoint.
//!
//! It speaks MQTT 3.1.1 and 5 over TCP (`codec.rs` lifts 3.1.1 to MQTT 5 so the logic is
//! written once): devices authenticate with their id and access token (or,
//! in anonymous mode, not at all), publish `telemetry` and `event` with QoS 0, 1 or 2, and get
//! their PUBACK (PUBREC) only after the message is durable in the event log. Every other topic
//! is plain publish/subscribe inside the device's tenant (QoS 0 and 1 towards subscribers),
//! with retained messages and wills. Connects, disconnects and wills are appended to the
//! `lifecycle` stream. Publishes from one connection are appended concurrently and
//! acknowledged in order, so a device that pipelines QoS 1 messages is not held to one fsync
//! per message.

mod codec;
#[cfg(test)]
mod codec_robustness;
mod commands;
mod config;
mod connection;
mod envelope;
mod fanout;
mod handshake;
mod lifecycle;
mod metrics;
mod retained;
mod router;
mod sessions;
mod topics;

use std::sync::Arc;

use tern_core::TenantId;
use tern_eventlog::EventLog;
use tern_identity::Identity;
use tern_registry::{Commands, Registry, RegistryError};
use tern_runtime::{MetricsRegistry, Shutdown};
use tern_store::{Store, StoreError};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

pub use config::BridgeConfig;
pub use envelope::{EVENT_TOPIC, LIFECYCLE_TOPIC, TELEMETRY_TOPIC};

use crate::commands::CommandTargets;
use crate::metrics::BridgeMetrics;
use crate::retained::Retained;
use crate::router::Router;
use crate::sessions::Sessions;

/// What the bridge works with.
pub struct BridgeServices {
    pub identity: Arc<Identity>,
    pub registry: Arc<Registry>,
    pub commands: Arc<Commands>,
    pub log: Arc<dyn EventLog>,
    pub store: Arc<dyn Store>,
}

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot load retained messages: {0}")]
    Retained(#[from] StoreError),
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
    retained: Retained,
    commands: Arc<Commands>,
    /// The connections subscribed to their device's commands.
    command_targets: Arc<CommandTargets>,
    /// Where clients without credentials go; `None` refuses them.
    anonymous_tenant: Option<TenantId>,
}

impl Bridge {
    /// Loads the retained messages, becomes the route of `commands` and, in anonymous mode,
    /// finds or creates the tenant.
    pub async fn new(
        config: BridgeConfig,
        services: BridgeServices,
        metrics: &MetricsRegistry,
    ) -> Result<Self, BridgeError> {
        let BridgeServices {
            identity,
            registry,
            commands,
            log,
            store,
        } = services;
        let retained = Retained::load(store, config.max_retained_per_tenant).await?;
        let anonymous_tenant = match &config.anonymous_tenant {
            None => None,
            Some(name) => Some(anonymous_tenant(&registry, name).await?),
        };
        let command_targets = Arc::new(CommandTargets::default());
        commands.set_route(command_targets.clone());
        let sessions = Arc::new(Sessions::default());
        registry.set_access_listener(sessions.clone());
        Ok(Self {
            config,
            identity,
            registry,
            log,
            metrics: BridgeMetrics::register(metrics),
            sessions,
            router: Router::default(),
            retained,
            commands,
            command_targets,
            anonymous_tenant,
        })
    }

    /// Accepts MQTT connections until `shutdown` is cancelled, then stops accepting, lets every
    /// connection finish acknowledging what it has already received, and returns.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: Shutdown) {
        let tracker = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(self.config.max_connections));
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
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                self.metrics.refused_connections.inc();
                tracing::warn!(%peer, limit = self.config.max_connections, "connection limit reached; refusing");
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let bridge = self.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                connection::run(bridge, stream, peer, shutdown).await;
                drop(permit);
            });
        }
        tracker.close();
        tracker.wait().await;
        tracing::info!("MQTT listener stopped");
    }
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
