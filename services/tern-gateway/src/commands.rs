//! `/api/v1/tenants/{tenant}/devices/{device}/commands`: send, list, show (optionally waiting
//! for the outcome) and cancel commands; typed operations, to one device or to every device
//! a selector selects.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tern_core::{Command, CommandId, DeviceId, OPERATION_PREFIX, Operation};
use tern_identity::policy::Resource;
use tern_registry::NewCommand;

use crate::auth::{self, Authenticated, AuthenticatedPrincipal, SourceIp};
use crate::extract::{ApiJson, ApiQuery};
use crate::routes::device_for;
use crate::{ApiError, Gateway};

type Shared = State<Arc<Gateway>>;
type ApiResult<T> = Result<T, ApiError>;

/// Longest a request may wait for a command's outcome; beyond HTTP proxies' usual timeouts
/// a caller should poll instead.
const MAX_WAIT_SECS: u64 = 300;
const DEFAULT_LIST_LIMIT: usize = 100;
const MAX_LIST_LIMIT: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendCommand {
    name: String,
    #[serde(default)]
    payload: serde_json::Value,
    ttl_secs: Option<u64>,
    idempotency_key: Option<String>,
    /// Wait this long for the device's answer (synchronous command); absent: return at once.
    wait_secs: Option<u64>,
}

/// Names under `tern.` belong to the typed operations (`.../operations/{operation}`).
fn reserved_name(name: &str) -> ApiResult<()> {
    if name.starts_with(OPERATION_PREFIX) {
        return Err(ApiError::bad_request(
            "name",
            format!(
                "names starting with `{OPERATION_PREFIX}` are the typed management operations: POST .../devices/{{device}}/operations/{{operation}}"
            ),
        ));
    }
    Ok(())
}

fn wait_duration(field: &str, secs: Option<u64>) -> ApiResult<Option<Duration>> {
    match secs {
        Some(s) if s > MAX_WAIT_SECS => Err(ApiError::bad_request(
            field,
            format!("`{field}` must be 0..={MAX_WAIT_SECS} seconds"),
        )),
        other => Ok(other.map(Duration::from_secs)),
    }
}

/// 201 for a new command, 200 for an earlier one with the same idempotency key or a
/// synchronous command that ended, 202 for a synchronous command still running when the
/// wait ran out.
pub(crate) async fn send(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, device)): Path<(String, String)>,
    ApiJson(body): ApiJson<SendCommand>,
) -> ApiResult<(StatusCode, Json<Command>)> {
    let device = device_for(&gw, caller, &tenant, &device).await?;
    reserved_name(&body.name)?;
    let wait = wait_duration("wait_secs", body.wait_secs)?;
    let (command, created) = gw
        .commands
        .send(
            &device,
            NewCommand {
                name: body.name,
                payload: body.payload,
                ttl_secs: body.ttl_secs,
                idempotency_key: body.idempotency_key,
            },
        )
        .await?;
    let Some(wait) = wait else {
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        return Ok((status, Json(command)));
    };
    let command = gw
        .commands
        .wait(device.tenant_id, device.id, command.id, wait)
        .await?;
    let status = if command.state.is_terminal() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(command)))
}

#[derive(Deserialize)]
pub(crate) struct ListParams {
    limit: Option<usize>,
}

#[derive(Serialize)]
pub(crate) struct CommandList {
    commands: Vec<Command>,
}

/// Newest first.
pub(crate) async fn list(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, device)): Path<(String, String)>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> ApiResult<Json<CommandList>> {
    let device = device_for(&gw, caller, &tenant, &device).await?;
    let limit = params.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::bad_request(
            "limit",
            format!("`limit` must be 1..={MAX_LIST_LIMIT}"),
        ));
    }
    let commands = gw.commands.list(device.tenant_id, device.id, limit).await?;
    Ok(Json(CommandList { commands }))
}

#[derive(Deserialize)]
pub(crate) struct ShowParams {
    /// Long-poll: wait up to this many seconds for the command to end.
    wait: Option<u64>,
}

fn command_id(id: &str) -> ApiResult<CommandId> {
    CommandId::parse(id).map_err(|e| ApiError::bad_request("command", e.to_string()))
}

pub(crate) async fn show(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, device, id)): Path<(String, String, String)>,
    ApiQuery(params): ApiQuery<ShowParams>,
) -> ApiResult<Json<Command>> {
    let device = device_for(&gw, caller, &tenant, &device).await?;
    let id = command_id(&id)?;
    let command = match wait_duration("wait", params.wait)? {
        Some(wait) => {
            gw.commands
                .wait(device.tenant_id, device.id, id, wait)
                .await?
        }
        None => gw.commands.get(device.tenant_id, device.id, id).await?,
    };
    Ok(Json(command))
}

/// 409 if the command already ended.
pub(crate) async fn cancel(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, device, id)): Path<(String, String, String)>,
) -> ApiResult<Json<Command>> {
    let device = device_for(&gw, caller, &tenant, &device).await?;
    let id = command_id(&id)?;
    Ok(Json(
        gw.commands.cancel(device.tenant_id, device.id, id).await?,
    ))
}

/// Devices one bulk request may address; a selector that selects more must be narrowed.
const MAX_BULK_DEVICES: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendToSelected {
    /// A label selector (see `GET .../devices`); the empty selector selects every device.
    selector: String,
    name: String,
    #[serde(default)]
    payload: serde_json::Value,
    ttl_secs: Option<u64>,
    /// Made per device (`{key}/{device id}`), so that a retried bulk request sends nothing
    /// twice.
    idempotency_key: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct SentToSelected {
    count: usize,
    commands: Vec<Command>,
    /// Selected devices the command was not sent to (the policies refused), and why.
    skipped: Vec<Skipped>,
}

/// The devices a selector selects, at most [`MAX_BULK_DEVICES`] (more is a 400).
async fn selected(
    gw: &Gateway,
    tenant: tern_core::TenantId,
    selector: &str,
) -> ApiResult<Vec<tern_core::Device>> {
    let selector = tern_core::Selector::parse(selector)?;
    let (devices, more) = gw
        .registry
        .select_devices(tenant, &selector, None, MAX_BULK_DEVICES)
        .await?;
    if more.is_some() {
        return Err(ApiError::bad_request(
            "selector",
            format!("selects more than {MAX_BULK_DEVICES} devices; narrow it"),
        ));
    }
    Ok(devices)
}

/// `POST /api/v1/tenants/{tenant}/commands`: the same command to every device a label
/// selector selects (each gets its own command, with its own state).
pub(crate) async fn send_to_selected(
    State(gw): Shared,
    AuthenticatedPrincipal(principal): AuthenticatedPrincipal,
    SourceIp(source_ip): SourceIp,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<SendToSelected>,
) -> ApiResult<(StatusCode, Json<SentToSelected>)> {
    let tenant = gw.registry.tenant_for(principal.caller, &tenant).await?;
    reserved_name(&body.name)?;
    let devices = selected(&gw, tenant.id, &body.selector).await?;
    let (mut commands, mut skipped) = (Vec::with_capacity(devices.len()), Vec::new());
    for device in &devices {
        // As if sent to the device alone.
        let resource = Resource::device(device);
        let allowed = auth::authorize(
            &gw,
            &principal,
            tenant.id,
            "sendCommand",
            resource,
            source_ip,
        )
        .await;
        if let Err(e) = allowed {
            skipped.push(Skipped::new(device, e));
            continue;
        }
        let new = NewCommand {
            name: body.name.clone(),
            payload: body.payload.clone(),
            ttl_secs: body.ttl_secs,
            idempotency_key: body
                .idempotency_key
                .as_ref()
                .map(|key| format!("{key}/{}", device.id)),
        };
        commands.push(gw.commands.send(device, new).await?.0);
    }
    tracing::info!(tenant = %tenant.id, selector = %body.selector, count = commands.len(), name = %body.name, "command sent to selected devices");
    Ok((
        StatusCode::CREATED,
        Json(SentToSelected {
            count: commands.len(),
            commands,
            skipped,
        }),
    ))
}

/// `POST .../devices/{device}/operations/{operation}`: a typed management operation (see
/// `tern_core::Operation`), validated, then sent as the command `tern.{operation}`. The body
/// holds the operation's parameters and, optionally, `ttl_secs` and `idempotency_key`.
pub(crate) async fn operate(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, device, operation)): Path<(String, String, String)>,
    ApiJson(mut body): ApiJson<serde_json::Map<String, serde_json::Value>>,
) -> ApiResult<(StatusCode, Json<Command>)> {
    let device = device_for(&gw, caller, &tenant, &device).await?;
    let ttl_secs = match body.remove("ttl_secs") {
        None => None,
        Some(ttl) => Some(
            ttl.as_u64()
                .ok_or_else(|| ApiError::bad_request("ttl_secs", "`ttl_secs` must be a number"))?,
        ),
    };
    let idempotency_key = match body.remove("idempotency_key") {
        None => None,
        Some(serde_json::Value::String(key)) => Some(key),
        Some(_) => {
            return Err(ApiError::bad_request(
                "idempotency_key",
                "`idempotency_key` must be a string",
            ));
        }
    };
    let operation_name = operation;
    let operation = Operation::parse(&operation_name, body)?;
    gw.twins.may_receive(&device, &operation_name).await?;
    let (command, created) = gw
        .commands
        .send(
            &device,
            NewCommand {
                name: operation.command_name(),
                payload: operation.payload(),
                ttl_secs,
                idempotency_key,
            },
        )
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(command)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OperateSelected {
    /// Which devices; must not be empty (an operation such as `wipe` is not for "all").
    selector: String,
    /// The operation's parameters, as for one device.
    #[serde(default)]
    params: serde_json::Map<String, serde_json::Value>,
    ttl_secs: Option<u64>,
    /// Made per device (`{key}/{device id}`), so that a retried request sends nothing twice.
    idempotency_key: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct OperatedSelected {
    count: usize,
    commands: Vec<Command>,
    /// Selected devices the operation was not sent to, and why.
    skipped: Vec<Skipped>,
}

#[derive(Serialize)]
struct Skipped {
    device_id: DeviceId,
    device_name: String,
    reason: String,
}

impl Skipped {
    fn new(device: &tern_core::Device, why: ApiError) -> Self {
        Self {
            device_id: device.id,
            device_name: device.name.clone(),
            reason: why.message,
        }
    }
}

/// `POST /api/v1/tenants/{tenant}/operations/{operation}`: a typed operation to every device a
/// selector selects. Each device is checked as if it were sent alone: the tenant's policies
/// (`operateDevice` on it), its management level and its agent's capabilities. A device that
/// fails a check is skipped, with the reason, and the others still get theirs.
pub(crate) async fn operate_selected(
    State(gw): Shared,
    AuthenticatedPrincipal(principal): AuthenticatedPrincipal,
    SourceIp(source_ip): SourceIp,
    Path((tenant, operation_name)): Path<(String, String)>,
    ApiJson(body): ApiJson<OperateSelected>,
) -> ApiResult<(StatusCode, Json<OperatedSelected>)> {
    let tenant = gw.registry.tenant_for(principal.caller, &tenant).await?;
    if body.selector.trim().is_empty() {
        return Err(ApiError::bad_request(
            "selector",
            "name the devices: an empty selector would select every device",
        ));
    }
    let operation = Operation::parse(&operation_name, body.params)?;
    let devices = selected(&gw, tenant.id, &body.selector).await?;
    let (mut commands, mut skipped) = (Vec::new(), Vec::new());
    for device in &devices {
        let resource = Resource::device(device);
        let allowed = auth::authorize(
            &gw,
            &principal,
            tenant.id,
            "operateDevice",
            resource,
            source_ip,
        )
        .await;
        let checked = match allowed {
            Ok(()) => gw
                .twins
                .may_receive(device, &operation_name)
                .await
                .map_err(ApiError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = checked {
            skipped.push(Skipped::new(device, e));
            continue;
        }
        let new = NewCommand {
            name: operation.command_name(),
            payload: operation.payload(),
            ttl_secs: body.ttl_secs,
            idempotency_key: body
                .idempotency_key
                .as_ref()
                .map(|key| format!("{key}/{}", device.id)),
        };
        commands.push(gw.commands.send(device, new).await?.0);
    }
    tracing::info!(tenant = %tenant.id, selector = %body.selector, operation = %operation_name,
        count = commands.len(), skipped = skipped.len(), "operation sent to selected devices");
    Ok((
        StatusCode::CREATED,
        Json(OperatedSelected {
            count: commands.len(),
            commands,
            skipped,
        }),
    ))
}
