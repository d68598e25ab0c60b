//! The REST API at the edge (`/api/v1`), plus `/healthz`, `/readyz` and `/metrics`.
//!
//! Every `/api/v1` route except the device token refresh needs `Authorization: Bearer <token>`:
//! an API token (one tenant) or the operator token (every tenant). Errors are JSON,
//! `{"error": {"code", "message", "field"?}}`, with the status that fits the failure.

mod auth;
mod certificates;
mod commands;
mod device_api;
mod error;
mod extract;
mod identity;
mod locations;
mod observe;
pub mod ops;
mod ota;
mod pep;
mod policies;
mod routes;
mod rules;
mod status;
mod twins;

use std::sync::Arc;

use axum::Router;
use tern_analytics::alerts::Alerts;
use tern_analytics::jobs::Jobs;
use tern_analytics::retention::Retention;
use tern_analytics::rules::Rules;
use tern_eventlog::EventLog;
use tern_identity::Identity;
use tern_registry::ota::{Artifacts, Campaigns};
use tern_registry::{Commands, Registry, Twins};
use tern_runtime::MetricsRegistry;
use tern_store::Store;

pub use error::ApiError;

/// The services the HTTP edge calls.
pub struct GatewayServices {
    pub registry: Arc<Registry>,
    pub identity: Arc<Identity>,
    pub commands: Arc<Commands>,
    pub twins: Arc<Twins>,
    pub rules: Arc<Rules>,
    pub alerts: Arc<Alerts>,
    pub retention: Arc<Retention>,
    pub jobs: Arc<Jobs>,
    pub artifacts: Arc<Artifacts>,
    pub campaigns: Arc<Campaigns>,
    pub store: Arc<dyn Store>,
    /// A device without a live MQTT connection counts as online while it was heard from
    /// within this window (HTTP and CoAP devices).
    pub heartbeat_window_ms: i64,
    /// Where the HTTP device API appends messages.
    pub log: Arc<dyn EventLog>,
}

/// Shared state of the HTTP edge.
pub struct Gateway {
    registry: Arc<Registry>,
    identity: Arc<Identity>,
    commands: Arc<Commands>,
    twins: Arc<Twins>,
    rules: Arc<Rules>,
    alerts: Arc<Alerts>,
    retention: Arc<Retention>,
    jobs: Arc<Jobs>,
    artifacts: Arc<Artifacts>,
    campaigns: Arc<Campaigns>,
    store: Arc<dyn Store>,
    heartbeat_window_ms: i64,
    log: Arc<dyn EventLog>,
    metrics: MetricsRegistry,
    http_metrics: observe::HttpMetrics,
    ready: ops::Ready,
    /// When this process started: a `connected` event older than that belongs to a
    /// connection that did not survive the restart (device status).
    started_at_ms: i64,
}

impl Gateway {
    pub fn new(services: GatewayServices, metrics: &MetricsRegistry) -> Arc<Self> {
        let GatewayServices {
            registry,
            identity,
            commands,
            twins,
            rules,
            alerts,
            retention,
            jobs,
            artifacts,
            campaigns,
            store,
            heartbeat_window_ms,
            log,
        } = services;
        Arc::new(Self {
            registry,
            identity,
            commands,
            twins,
            rules,
            alerts,
            retention,
            jobs,
            artifacts,
            campaigns,
            store,
            heartbeat_window_ms,
            log,
            http_metrics: observe::HttpMetrics::register(metrics),
            metrics: metrics.clone(),
            ready: ops::Ready::default(),
            started_at_ms: tern_core::now_ms(),
        })
    }

    /// `/readyz` answers 200 only between `set_ready(true)` (everything started) and shutdown.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(ready);
    }
}

/// The HTTP router with `web` (the dashboard's pages) beside the API, all behind request ids,
/// access logs and metrics; serve it with `axum::serve`.
pub fn router(gateway: Arc<Gateway>, web: Router) -> Router {
    routes::router(gateway.clone())
        .merge(web)
        .layer(axum::middleware::from_fn_with_state(
            gateway,
            observe::observe,
        ))
}
