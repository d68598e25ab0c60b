//! Route table and handlers.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use base64::Engine;
use serde::{Deserialize, Serialize};
use tern_core::{Caller, Device, DeviceId, ErrorCode, NewDevice, Selector, Tenant, now_ms};
use tern_identity::{ApiToken, DeviceTokens};
use tern_registry::DevicePatch;
use tern_store::{RangeQuery, Resolution};

use crate::auth::Authenticated;
use crate::extract::{ApiJson, ApiQuery};
use crate::{
    ApiError, Gateway, certificates, commands, device_api, identity, locations, ota, policies,
    rules, status, twins,
};

type Shared = State<Arc<Gateway>>;
type ApiResult<T> = Result<T, ApiError>;

const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;
const DAY_MS: i64 = 24 * 3600 * 1000;

pub(crate) fn router(gateway: Arc<Gateway>) -> Router {
    let tenant = "/api/v1/tenants/{tenant}";
    let device = "/api/v1/tenants/{tenant}/devices/{device}";
    Router::new()
        .merge(crate::ops::router(
            gateway.ready.clone(),
            gateway.metrics.clone(),
        ))
        .route("/api/v1/tenants", post(create_tenant).get(list_tenants))
        .route(tenant, get(get_tenant).delete(delete_tenant))
        .route(
            &format!("{tenant}/devices"),
            post(create_device).get(list_devices),
        )
        .route(&format!("{tenant}/api-tokens"), post(create_api_token))
        .route(
            &format!("{tenant}/operations/{{operation}}"),
            post(commands::operate_selected),
        )
        .route(
            &format!("{tenant}/enrolments"),
            post(identity::enrol_device),
        )
        .route(
            &format!("{tenant}/oauth-clients"),
            post(identity::create_client).get(identity::list_clients),
        )
        .route(
            &format!("{tenant}/oauth-clients/{{client}}"),
            get(identity::show_client).delete(identity::delete_client),
        )
        .route(
            &format!("{tenant}/users"),
            post(identity::create_user).get(identity::list_users),
        )
        .route(
            &format!("{tenant}/users/{{user}}"),
            get(identity::show_user).delete(identity::delete_user),
        )
        .route(
            &format!("{tenant}/users/{{user}}/password"),
            axum::routing::put(identity::set_password),
        )
        .route(
            &format!("{tenant}/users/{{user}}/unlock"),
            post(identity::unlock_user),
        )
        .route(&format!("{tenant}/policies"), get(policies::current))
        .route(
            &format!("{tenant}/policies/{{policy}}"),
            get(policies::show)
                .put(policies::put)
                .delete(policies::delete),
        )
        .route(
            &format!("{tenant}/policy-versions"),
            get(policies::versions),
        )
        .route(
            &format!("{tenant}/policy-versions/{{version}}"),
            get(policies::version),
        )
        .route(
            &format!("{tenant}/policy-rollback"),
            post(policies::rollback),
        )
        .route(
            &format!("{tenant}/policy-time-zone"),
            axum::routing::put(policies::set_time_zone),
        )
        .route(
            &format!("{tenant}/policy-validation"),
            post(policies::validate),
        )
        .route(&format!("{tenant}/policy-what-if"), post(policies::what_if))
        .route(
            &format!("{tenant}/policy-audit"),
            get(policies::show_audit).put(policies::set_audit),
        )
        .route(
            &format!("{tenant}/policy-decisions"),
            get(policies::decisions),
        )
        .route(
            &format!("{tenant}/pdp/authorize"),
            post(policies::xacml_in_tenant),
        )
        .route("/pdp/authorize", post(policies::xacml))
        .route(
            &format!("{tenant}/commands"),
            post(commands::send_to_selected),
        )
        .route(
            &format!("{tenant}/rules"),
            post(rules::create).get(rules::list),
        )
        .route(
            &format!("{tenant}/artifacts"),
            post(ota::upload).get(ota::list_artifacts),
        )
        .route(
            &format!("{tenant}/artifacts/{{artifact}}"),
            get(ota::show_artifact),
        )
        .route(&format!("{tenant}/ota/signing-key"), get(ota::signing_key))
        .route(
            &format!("{tenant}/campaigns"),
            post(ota::create_campaign).get(ota::list_campaigns),
        )
        .route(
            &format!("{tenant}/campaigns/{{campaign}}"),
            get(ota::show_campaign),
        )
        .route(
            &format!("{tenant}/campaigns/{{campaign}}/{{action}}"),
            post(ota::control_campaign),
        )
        .route(&format!("{tenant}/rule-tests"), post(rules::test))
        .route(
            &format!("{tenant}/rules/{{rule}}"),
            get(rules::show).patch(rules::update).delete(rules::delete),
        )
        .route(
            &format!("{tenant}/rules/{{rule}}/dead-letters"),
            get(rules::show_dead_letters),
        )
        .route(&format!("{tenant}/alerts"), get(rules::list_alerts))
        .route(&format!("{tenant}/jobs"), get(rules::list_jobs))
        .route(
            &format!("{tenant}/jobs/rerun-rule"),
            post(rules::rerun_rule),
        )
        .route(
            &format!("{tenant}/jobs/rebuild-rollups"),
            post(rules::rebuild_rollups),
        )
        .route(&format!("{tenant}/jobs/{{job}}"), get(rules::show_job))
        .route(
            &format!("{tenant}/retention"),
            get(rules::show_retention).put(rules::set_retention),
        )
        .route(
            &format!("{tenant}/alerts/{{alert}}"),
            get(rules::show_alert),
        )
        .route(
            &format!("{tenant}/alerts/{{alert}}/ack"),
            post(rules::acknowledge),
        )
        .route(
            &format!("{tenant}/alerts/{{alert}}/clear"),
            post(rules::clear),
        )
        .route(
            &format!("{tenant}/cas"),
            post(certificates::add).get(certificates::list),
        )
        .route(
            &format!("{tenant}/cas/{{ca}}"),
            axum::routing::delete(certificates::delete),
        )
        .route(
            device,
            get(get_device).patch(update_device).delete(delete_device),
        )
        .route(
            &format!("{device}/tokens"),
            post(issue_device_tokens).delete(revoke_device_tokens),
        )
        .route(&format!("{device}/telemetry"), get(telemetry))
        .route(&format!("{device}/telemetry/latest"), get(latest))
        .route(&format!("{device}/events"), get(events))
        .route(&format!("{device}/status"), get(status::status))
        .route(&format!("{device}/locations"), get(locations::history))
        .route(&format!("{device}/twin"), get(twins::show))
        .route(
            &format!("{device}/twin/desired"),
            axum::routing::patch(twins::patch_desired),
        )
        .route(
            &format!("{device}/commands"),
            post(commands::send).get(commands::list),
        )
        .route(
            &format!("{device}/commands/{{command}}"),
            get(commands::show),
        )
        .route(
            &format!("{device}/commands/{{command}}/cancel"),
            post(commands::cancel),
        )
        .route(
            &format!("{device}/operations/{{operation}}"),
            post(commands::operate),
        )
        .route("/api/v1/token/refresh", post(refresh_device_tokens))
        .route("/device/v1/telemetry", post(device_api::telemetry))
        .route("/device/v1/event", post(device_api::event))
        .route("/device/v1/commands", get(device_api::commands))
        .route("/device/v1/artifacts/{artifact}", get(ota::download))
        .route("/device/v1/twin", get(twins::device_show))
        .route(
            "/device/v1/twin/reported",
            axum::routing::patch(twins::device_patch_reported),
        )
        .route(
            "/device/v1/commands/{command}/response",
            post(device_api::respond),
        )
        .layer(DefaultBodyLimit::max(device_api::MAX_MESSAGE_BYTES))
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(gateway)
}

fn operator_only(caller: Caller) -> ApiResult<()> {
    match caller {
        Caller::Operator => Ok(()),
        Caller::Tenant(_) => Err(ApiError::new(
            ErrorCode::Forbidden,
            "managing tenants needs the operator token",
        )),
    }
}

// === tenants ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTenant {
    name: String,
}

async fn create_tenant(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    ApiJson(body): ApiJson<CreateTenant>,
) -> ApiResult<(StatusCode, Json<Tenant>)> {
    operator_only(caller)?;
    let tenant = gw.registry.create_tenant(&body.name).await?;
    tracing::info!(tenant = %tenant.id, name = %tenant.name, "tenant created");
    Ok((StatusCode::CREATED, Json(tenant)))
}

async fn list_tenants(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
) -> ApiResult<Json<Vec<Tenant>>> {
    let tenants = match caller {
        Caller::Operator => gw.registry.list_tenants().await?,
        Caller::Tenant(own) => vec![gw.registry.tenant(&own.to_string()).await?],
    };
    Ok(Json(tenants))
}

async fn get_tenant(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Tenant>> {
    Ok(Json(gw.registry.tenant_for(caller, &tenant).await?))
}

async fn delete_tenant(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
) -> ApiResult<StatusCode> {
    operator_only(caller)?;
    let tenant = gw.registry.delete_tenant(&tenant).await?;
    tracing::info!(tenant = %tenant.id, "tenant deleted");
    Ok(StatusCode::NO_CONTENT)
}

// === devices ===

async fn create_device(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<NewDevice>,
) -> ApiResult<(StatusCode, Json<Device>)> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let device = gw
        .registry
        .create_device(&tenant.id.to_string(), body)
        .await?;
    tracing::info!(tenant = %tenant.id, device = %device.id, "device created");
    Ok((StatusCode::CREATED, Json(device)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeviceQuery {
    /// A label selector (`site=berlin,env!=prod,camera,tier in (a,b)`).
    selector: Option<String>,
    /// Page size; the `x-next-after` response header is the next page's `after`.
    limit: Option<usize>,
    /// A device id: list from the one after it.
    after: Option<String>,
}

/// The tenant's devices: all of them, or one page of those a selector selects.
async fn list_devices(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiQuery(query): ApiQuery<DeviceQuery>,
) -> ApiResult<(axum::http::HeaderMap, Json<Vec<Device>>)> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let selector = Selector::parse(query.selector.as_deref().unwrap_or_default())?;
    let after = match query.after.as_deref() {
        None => None,
        Some(after) => Some(
            DeviceId::parse(after)
                .map_err(|_| ApiError::bad_request("after", "`after` must be a device id"))?,
        ),
    };
    let limit = query.limit.unwrap_or(usize::MAX).clamp(1, usize::MAX);
    let (devices, next) = gw
        .registry
        .select_devices(tenant.id, &selector, after, limit)
        .await?;
    let mut headers = axum::http::HeaderMap::new();
    if let Some(next) = next
        && let Ok(value) = next.to_string().parse()
    {
        headers.insert("x-next-after", value);
    }
    Ok((headers, Json(devices)))
}

/// Resolves the tenant (for the caller) and the device of a device route.
pub(crate) async fn device_for(
    gw: &Gateway,
    caller: Caller,
    tenant: &str,
    device: &str,
) -> ApiResult<Device> {
    let tenant = gw.registry.tenant_for(caller, tenant).await?;
    Ok(gw.registry.device_of(tenant.id, device).await?)
}

async fn get_device(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, device)): Path<(String, String)>,
) -> ApiResult<Json<Device>> {
    Ok(Json(device_for(&gw, caller, &tenant, &device).await?))
}

/// Disable or enable a device, or replace its labels; disabling closes its connections.
async fn update_device(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, device)): Path<(String, String)>,
    ApiJson(patch): ApiJson<DevicePatch>,
) -> ApiResult<Json<Device>> {
    let device = device_for(&gw, caller, &tenant, &device).await?;
    let updated = gw
        .registry
        .update_device(&device.tenant_id.to_string(), &device.id.to_string(), patch)
        .await?;
    tracing::info!(tenant = %updated.tenant_id, device = %updated.id, disabled = updated.disabled, "device updated");
    Ok(Json(updated))
}

async fn delete_device(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, device)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let device = device_for(&gw, caller, &tenant, &device).await?;
    gw.identity
        .revoke_device_tokens(device.tenant_id, device.id)
        .await?;
    gw.registry
        .delete_device(&device.tenant_id.to_string(), &device.id.to_string())
        .await?;
    tracing::info!(tenant = %device.tenant_id, device = %device.id, "device deleted");
    Ok(StatusCode::NO_CONTENT)
}

// === credentials ===

async fn issue_device_tokens(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, device)): Path<(String, String)>,
) -> ApiResult<(StatusCode, Json<DeviceTokens>)> {
    let device = device_for(&gw, caller, &tenant, &device).await?;
    let tokens = gw
        .identity
        .issue_device_tokens(&device.tenant_id.to_string(), &device.id.to_string())
        .await?;
    tracing::info!(tenant = %device.tenant_id, device = %device.id, "device tokens issued");
    Ok((StatusCode::CREATED, Json(tokens)))
}

#[derive(Serialize)]
struct Revoked {
    revoked: u32,
}

async fn revoke_device_tokens(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, device)): Path<(String, String)>,
) -> ApiResult<Json<Revoked>> {
    let device = device_for(&gw, caller, &tenant, &device).await?;
    let revoked = gw
        .identity
        .revoke_device_tokens(device.tenant_id, device.id)
        .await?;
    tracing::info!(tenant = %device.tenant_id, device = %device.id, revoked, "device refresh tokens revoked");
    Ok(Json(Revoked { revoked }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Refresh {
    refresh_token: String,
}

/// A device exchanges its refresh token for new tokens; the refresh token is the credential.
async fn refresh_device_tokens(
    State(gw): Shared,
    ApiJson(body): ApiJson<Refresh>,
) -> ApiResult<Json<DeviceTokens>> {
    Ok(Json(
        gw.identity
            .refresh_device_tokens(&body.refresh_token)
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateApiToken {
    name: String,
}

async fn create_api_token(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<CreateApiToken>,
) -> ApiResult<(StatusCode, Json<ApiToken>)> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let token = gw
        .identity
        .create_api_token(&tenant.id.to_string(), &body.name)
        .await?;
    tracing::info!(tenant = %tenant.id, token_id = %token.id, "API token created");
    Ok((StatusCode::CREATED, Json(token)))
}

// === data ===

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RangeParams {
    pub(crate) metric: Option<String>,
    /// Milliseconds since the epoch, inclusive; default 24 hours ago.
    pub(crate) from: Option<i64>,
    /// Milliseconds since the epoch, exclusive; default unbounded.
    pub(crate) to: Option<i64>,
    pub(crate) limit: Option<usize>,
    /// `asc` (default) or `desc`.
    pub(crate) order: Option<String>,
    /// Events only: `event`, `telemetry` (non-numeric) or `lifecycle`.
    pub(crate) kind: Option<String>,
    /// Telemetry only: `raw` (default), `1m`, `1h`, `1d` or `auto`.
    pub(crate) resolution: Option<String>,
}

/// The kinds of raw events the store keeps.
const EVENT_KINDS: [&str; 4] = ["event", "telemetry", "lifecycle", "command"];

impl RangeParams {
    pub(crate) fn query(&self, device: &Device) -> ApiResult<RangeQuery> {
        let from_ms = self.from.unwrap_or_else(|| now_ms() - DAY_MS);
        let to_ms = self.to.unwrap_or(i64::MAX);
        if from_ms >= to_ms {
            return Err(ApiError::bad_request("from", "`from` must be before `to`"));
        }
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(ApiError::bad_request(
                "limit",
                format!("`limit` must be 1..={MAX_LIMIT}"),
            ));
        }
        let descending = match self.order.as_deref() {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "order",
                    format!("`order` must be asc or desc, not {other:?}"),
                ));
            }
        };
        Ok(RangeQuery {
            tenant: device.tenant_id.to_string(),
            device: device.id.to_string(),
            from_ms,
            to_ms,
            limit,
            descending,
        })
    }
}

#[derive(Serialize)]
struct Sample {
    ts: i64,
    value: f64,
}

/// A point of a series: a raw sample, or a rollup bucket whose `value` is the mean.
#[derive(Serialize)]
struct SeriesPoint {
    ts: i64,
    value: f64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    bucket: Option<Bucket>,
}

#[derive(Serialize)]
struct Bucket {
    min: f64,
    max: f64,
    count: u64,
    sum: f64,
}

#[derive(Serialize)]
struct Series {
    device_id: String,
    metric: String,
    /// `raw`, `1m`, `1h` or `1d`: what `auto` chose, or what was asked for.
    resolution: &'static str,
    points: Vec<SeriesPoint>,
}

/// Raw points serve ranges up to this long under `resolution=auto`.
const AUTO_RAW_MAX_MS: i64 = 3_600_000;

/// `None` is raw points. `auto` takes raw points for ranges up to an hour, else the finest
/// rollup with at most `limit` buckets in the range (days when even those are more), so a
/// long chart reads a bounded number of buckets and never the raw points.
fn resolution_for(params: &RangeParams, query: &RangeQuery) -> ApiResult<Option<Resolution>> {
    match params.resolution.as_deref() {
        None | Some("raw") => Ok(None),
        Some("auto") => {
            let span = query.to_ms.min(now_ms()).saturating_sub(query.from_ms);
            if span <= AUTO_RAW_MAX_MS {
                return Ok(None);
            }
            let fits = |r: &Resolution| span / r.bucket_ms() < query.limit as i64;
            Ok(Some(
                Resolution::ALL
                    .into_iter()
                    .find(fits)
                    .unwrap_or(Resolution::Day),
            ))
        }
        Some(other) => Resolution::parse(other).map(Some).ok_or_else(|| {
            ApiError::bad_request(
                "resolution",
                format!("`resolution` must be auto, raw, 1m, 1h or 1d, not {other:?}"),
            )
        }),
    }
}

async fn telemetry(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, device)): Path<(String, String)>,
    ApiQuery(params): ApiQuery<RangeParams>,
) -> ApiResult<Json<Series>> {
    let device = device_for(&gw, caller, &tenant, &device).await?;
    let metric = params
        .metric
        .clone()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad_request("metric", "query parameter `metric` is required"))?;
    if params.kind.is_some() {
        return Err(ApiError::bad_request(
            "kind",
            "`kind` applies to events, not telemetry",
        ));
    }
    let query = params.query(&device)?;
    let resolution = resolution_for(&params, &query)?;
    let points = match resolution {
        None => gw
            .store
            .points(&query, &metric)
            .await?
            .into_iter()
            .map(|p| SeriesPoint {
                ts: p.ts_ms,
                value: p.value,
                bucket: None,
            })
            .collect(),
        Some(resolution) => gw
            .store
            .rollups(&query, &metric, resolution)
            .await?
            .into_iter()
            .map(|r| SeriesPoint {
                ts: r.start_ms,
                value: r.mean(),
                bucket: Some(Bucket {
                    min: r.min,
                    max: r.max,
                    count: r.count,
                    sum: r.sum,
                }),
            })
            .collect(),
    };
    Ok(Json(Series {
        device_id: device.id.to_string(),
        metric,
        resolution: resolution.map_or("raw", Resolution::as_str),
        points,
    }))
}

#[derive(Serialize)]
struct Latest {
    device_id: String,
    values: BTreeMap<String, Sample>,
}

async fn latest(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, device)): Path<(String, String)>,
) -> ApiResult<Json<Latest>> {
    let device = device_for(&gw, caller, &tenant, &device).await?;
    let values = gw
        .store
        .latest(&device.tenant_id.to_string(), &device.id.to_string())
        .await?
        .into_iter()
        .map(|v| {
            (
                v.metric,
                Sample {
                    ts: v.ts_ms,
                    value: v.value,
                },
            )
        })
        .collect();
    Ok(Json(Latest {
        device_id: device.id.to_string(),
        values,
    }))
}

#[derive(Serialize)]
struct EventOut {
    ts: i64,
    message_id: String,
    kind: String,
    topic: String,
    content_type: String,
    /// The payload as text when it is UTF-8, otherwise absent (see `payload_base64`).
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
}

#[derive(Serialize)]
struct Events {
    device_id: String,
    events: Vec<EventOut>,
}

async fn events(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, device)): Path<(String, String)>,
    ApiQuery(params): ApiQuery<RangeParams>,
) -> ApiResult<Json<Events>> {
    let device = device_for(&gw, caller, &tenant, &device).await?;
    if params.metric.is_some() {
        return Err(ApiError::bad_request(
            "metric",
            "`metric` applies to telemetry, not events",
        ));
    }
    if params.resolution.is_some() {
        return Err(ApiError::bad_request(
            "resolution",
            "`resolution` applies to telemetry, not events",
        ));
    }
    let kind = params.kind.as_deref();
    if let Some(kind) = kind
        && !EVENT_KINDS.contains(&kind)
    {
        return Err(ApiError::bad_request(
            "kind",
            format!(
                "`kind` must be one of {}, not {kind:?}",
                EVENT_KINDS.join(", ")
            ),
        ));
    }
    let stored = gw.store.events(&params.query(&device)?, kind).await?;
    let events = stored
        .into_iter()
        .map(|e| {
            let (payload, payload_base64) = match String::from_utf8(e.payload.to_vec()) {
                Ok(text) => (Some(text), None),
                Err(_) => (
                    None,
                    Some(base64::engine::general_purpose::STANDARD.encode(&e.payload)),
                ),
            };
            EventOut {
                ts: e.ts_ms,
                message_id: e.message_id,
                kind: e.kind,
                topic: e.topic,
                content_type: e.content_type,
                payload,
                payload_base64,
            }
        })
        .collect();
    Ok(Json(Events {
        device_id: device.id.to_string(),
        events,
    }))
}
