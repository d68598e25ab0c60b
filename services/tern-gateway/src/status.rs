//! `GET /api/v1/tenants/{tenant}/devices/{device}/status`: whether a device is connected, since
//! when and how, and when it was last heard from, derived from the lifecycle events and data
//! in the store (so it follows the bridge within the ingest lag).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;
use tern_store::RangeQuery;

use crate::auth::Authenticated;
use crate::locations::{Position, last_position};
use crate::routes::device_for;
use crate::{ApiError, Gateway};

#[derive(Serialize)]
pub(crate) struct DeviceStatus {
    device_id: String,
    /// Connected over MQTT (its last lifecycle event was `connected`, since this server
    /// started), or heard from within the heartbeat window after its last lifecycle event
    /// (HTTP and CoAP devices, which have no connection to follow).
    online: bool,
    /// `mqtt` or `heartbeat`, when online.
    #[serde(skip_serializing_if = "Option::is_none")]
    online_by: Option<&'static str>,
    /// That event: `connected`, `disconnected` or `will_published`, with its details
    /// (protocol, transport and peer; or the disconnect reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    last_lifecycle: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_lifecycle_ms: Option<i64>,
    /// The newest of any message or lifecycle event from the device.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_seen_ms: Option<i64>,
    /// The last position it reported (`.../locations` has the history).
    #[serde(skip_serializing_if = "Option::is_none")]
    location: Option<Position>,
}

pub(crate) async fn status(
    State(gw): State<Arc<Gateway>>,
    Authenticated(caller): Authenticated,
    Path((tenant, device)): Path<(String, String)>,
) -> Result<Json<DeviceStatus>, ApiError> {
    let device = device_for(&gw, caller, &tenant, &device).await?;
    let (tenant_id, device_id) = (device.tenant_id.to_string(), device.id.to_string());
    let newest = RangeQuery {
        tenant: tenant_id.clone(),
        device: device_id.clone(),
        from_ms: 0,
        to_ms: i64::MAX,
        limit: 1,
        descending: true,
    };
    let lifecycle = gw.store.events(&newest, Some("lifecycle")).await?.pop();
    let any_event = gw.store.events(&newest, None).await?.pop();
    let latest = gw.store.latest(&tenant_id, &device_id).await?;
    let latest_metric = latest.iter().map(|v| v.ts_ms).max();
    let last_lifecycle = lifecycle
        .as_ref()
        .and_then(|e| serde_json::from_slice::<serde_json::Value>(&e.payload).ok());
    // A `connected` event from before this process started is from a connection that
    // ended with it (a crash leaves no `disconnected`).
    let connected = last_lifecycle
        .as_ref()
        .is_some_and(|l| l["event"] == "connected")
        && lifecycle
            .as_ref()
            .is_some_and(|e| e.ts_ms >= gw.started_at_ms);
    let last_seen_ms = any_event.map(|e| e.ts_ms).max(latest_metric);
    // Heard from after its last connection ended (or it never had one): a device that only
    // speaks HTTP or CoAP.
    let heartbeat = last_seen_ms.is_some_and(|seen| {
        tern_core::now_ms() - seen <= gw.heartbeat_window_ms
            && lifecycle.as_ref().is_none_or(|e| seen > e.ts_ms)
    });
    let online_by = match (connected, heartbeat) {
        (true, _) => Some("mqtt"),
        (false, true) => Some("heartbeat"),
        (false, false) => None,
    };
    Ok(Json(DeviceStatus {
        device_id,
        online: online_by.is_some(),
        online_by,
        last_lifecycle_ms: lifecycle.as_ref().map(|e| e.ts_ms),
        last_lifecycle,
        last_seen_ms,
        location: last_position(&latest),
    }))
}
