//! The HTTP device API (`/device/v1`): for devices that cannot keep an MQTT connection. Same
//! credentials (the device's access token as bearer), same tenancy, same durability: a 201
//! means the message is in the event log, exactly like an MQTT PUBACK.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tern_core::{Command, CommandId, ErrorCode};
use tern_eventlog::device_record;
use tern_proto::v1::EventKind;

use crate::auth::AuthenticatedDevice;
use crate::extract::{ApiJson, ApiQuery};
use crate::{ApiError, Gateway};

type Shared = State<Arc<Gateway>>;
type ApiResult<T> = Result<T, ApiError>;

/// Largest message body, as MQTT's default `mqtt.max_packet_size`.
pub(crate) const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Longest long-poll for commands.
const MAX_WAIT_SECS: u64 = 300;

#[derive(Serialize)]
pub(crate) struct Stored {
    stored: &'static str,
}

pub(crate) async fn telemetry(
    State(gw): Shared,
    AuthenticatedDevice(device): AuthenticatedDevice,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Stored>)> {
    append(&gw, &device, EventKind::Telemetry, "telemetry", body).await
}

pub(crate) async fn event(
    State(gw): Shared,
    AuthenticatedDevice(device): AuthenticatedDevice,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Stored>)> {
    append(&gw, &device, EventKind::Event, "event", body).await
}

async fn append(
    gw: &Gateway,
    device: &tern_core::Device,
    kind: EventKind,
    stream: &'static str,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Stored>)> {
    let record = device_record(
        device.tenant_id,
        device.id,
        kind,
        stream,
        body,
        HashMap::new(),
    );
    gw.log.append(vec![record]).await.map_err(|e| {
        tracing::error!(error = %e, "event log append failed");
        ApiError::new(
            ErrorCode::Unavailable,
            "the message could not be stored; retry",
        )
    })?;
    Ok((StatusCode::CREATED, Json(Stored { stored: stream })))
}

#[derive(Deserialize)]
pub(crate) struct PollParams {
    /// How long to wait for a command when none is pending: `30s`, `500ms` or seconds.
    wait: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct Commands {
    commands: Vec<Command>,
}

/// Long-poll: the device's pending commands at once, or the first to arrive within `wait`
/// (an empty list when none came). Returned commands count as delivered.
pub(crate) async fn commands(
    State(gw): Shared,
    AuthenticatedDevice(device): AuthenticatedDevice,
    ApiQuery(params): ApiQuery<PollParams>,
) -> ApiResult<Json<Commands>> {
    let wait = match params.wait.as_deref() {
        None => Duration::ZERO,
        Some(text) => parse_wait(text).ok_or_else(|| {
            ApiError::bad_request(
                "wait",
                format!("`wait` must be a duration such as 30s or 500ms, at most {MAX_WAIT_SECS}s"),
            )
        })?,
    };
    let commands = gw
        .commands
        .take_pending(device.tenant_id, device.id, wait)
        .await?;
    Ok(Json(Commands { commands }))
}

fn parse_wait(text: &str) -> Option<Duration> {
    let wait = if let Some(ms) = text.strip_suffix("ms") {
        Duration::from_millis(ms.parse().ok()?)
    } else {
        Duration::from_secs(text.strip_suffix('s').unwrap_or(text).parse().ok()?)
    };
    (wait <= Duration::from_secs(MAX_WAIT_SECS)).then_some(wait)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Response {
    /// HTTP-style: 2xx succeeded, anything else failed.
    status: u16,
    #[serde(default)]
    payload: serde_json::Value,
}

/// The device's answer to one of its own commands.
pub(crate) async fn respond(
    State(gw): Shared,
    AuthenticatedDevice(device): AuthenticatedDevice,
    Path(id): Path<String>,
    ApiJson(response): ApiJson<Response>,
) -> ApiResult<Json<Command>> {
    let id = CommandId::parse(&id).map_err(|e| ApiError::bad_request("command", e.to_string()))?;
    if !(100..=599).contains(&response.status) {
        return Err(ApiError::bad_request(
            "status",
            "`status` must be 100..=599",
        ));
    }
    let payload = serde_json::to_vec(&response.payload).unwrap_or_default();
    let command = gw
        .commands
        .respond(device.tenant_id, device.id, id, response.status, &payload)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("command {id}")))?;
    Ok(Json(command))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_durations_with_a_bound() {
        assert_eq!(parse_wait("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_wait("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_wait("250ms"), Some(Duration::from_millis(250)));
        for bad in ["", "soon", "-1s", "301s", "1.5s"] {
            assert_eq!(parse_wait(bad), None, "{bad}");
        }
    }
}
