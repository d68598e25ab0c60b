//! Device twins over REST (operators: read, patch the desired state) and the HTTP device API
//! (devices: read, patch the reported state).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::Value;
use tern_registry::Twin;

use crate::auth::{Authenticated, AuthenticatedDevice};
use crate::extract::{ApiJson, ApiQuery};
use crate::routes::device_for;
use crate::{ApiError, Gateway};

type Shared = State<Arc<Gateway>>;
type ApiResult<T> = Result<T, ApiError>;

pub(crate) async fn show(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, device)): Path<(String, String)>,
) -> ApiResult<Json<Twin>> {
    let device = device_for(&gw, caller, &tenant, &device).await?;
    Ok(Json(gw.twins.get(device.tenant_id, device.id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DesiredParams {
    /// Apply only if the desired document is still at this version (else 409).
    version: Option<u64>,
}

/// A JSON merge patch of the desired state; the device gets the whole new document.
pub(crate) async fn patch_desired(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, device)): Path<(String, String)>,
    ApiQuery(params): ApiQuery<DesiredParams>,
    ApiJson(patch): ApiJson<Value>,
) -> ApiResult<Json<Twin>> {
    let device = device_for(&gw, caller, &tenant, &device).await?;
    let twin = gw
        .twins
        .update_desired(device.tenant_id, device.id, &patch, params.version)
        .await?;
    tracing::info!(tenant = %device.tenant_id, device = %device.id, version = twin.desired_version, "desired state changed");
    Ok(Json(twin))
}

/// The device's own twin.
pub(crate) async fn device_show(
    State(gw): Shared,
    AuthenticatedDevice(device): AuthenticatedDevice,
) -> ApiResult<Json<Twin>> {
    Ok(Json(gw.twins.get(device.tenant_id, device.id).await?))
}

/// The device reports a change of its state (a JSON merge patch).
pub(crate) async fn device_patch_reported(
    State(gw): Shared,
    AuthenticatedDevice(device): AuthenticatedDevice,
    ApiJson(patch): ApiJson<Value>,
) -> ApiResult<Json<Twin>> {
    Ok(Json(
        gw.twins
            .update_reported(device.tenant_id, device.id, &patch)
            .await?,
    ))
}
