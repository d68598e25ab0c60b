//! A tenant's OAuth clients and users: create (secrets shown once), list, show, delete, set a
//! password, lift a lockout; and device enrolments. All of it needs the `tern:admin` scope
//! (`auth.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tern_core::{DeviceId, ErrorCode, NewDevice};
use tern_identity::policy::Resource;
use tern_identity::{NewClient, NewUser, OAuthClient, User};
use tern_registry::RegistryError;

use crate::auth::{self, Authenticated, AuthenticatedPrincipal, SourceIp};
use crate::extract::ApiJson;
use crate::{ApiError, Gateway};

type Shared = State<Arc<Gateway>>;
type ApiResult<T> = Result<T, ApiError>;

pub(crate) async fn create_client(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<NewClient>,
) -> ApiResult<(StatusCode, Json<OAuthClient>)> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let client = gw
        .identity
        .oauth()
        .clients()
        .create(tenant.id, body)
        .await?;
    tracing::info!(tenant = %tenant.id, client_id = %client.client_id, "OAuth client created");
    Ok((StatusCode::CREATED, Json(client)))
}

pub(crate) async fn list_clients(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Vec<OAuthClient>>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(gw.identity.oauth().clients().list(tenant.id).await?))
}

pub(crate) async fn show_client(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, client)): Path<(String, String)>,
) -> ApiResult<Json<OAuthClient>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(
        gw.identity
            .oauth()
            .clients()
            .get(tenant.id, &client)
            .await?,
    ))
}

pub(crate) async fn delete_client(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, client)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    gw.identity
        .oauth()
        .clients()
        .delete(tenant.id, &client)
        .await?;
    tracing::info!(tenant = %tenant.id, client_id = %client, "OAuth client deleted");
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn create_user(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<NewUser>,
) -> ApiResult<(StatusCode, Json<User>)> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let user = gw.identity.oauth().users().create(tenant.id, body).await?;
    tracing::info!(tenant = %tenant.id, user = %user.id, "user created");
    Ok((StatusCode::CREATED, Json(user)))
}

pub(crate) async fn list_users(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Vec<User>>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(gw.identity.oauth().users().list(tenant.id).await?))
}

pub(crate) async fn show_user(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, user)): Path<(String, String)>,
) -> ApiResult<Json<User>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(
        gw.identity.oauth().users().get(tenant.id, &user).await?,
    ))
}

pub(crate) async fn delete_user(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, user)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    gw.identity.oauth().users().delete(tenant.id, &user).await?;
    tracing::info!(tenant = %tenant.id, user = %user, "user deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewPassword {
    password: String,
}

pub(crate) async fn set_password(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, user)): Path<(String, String)>,
    ApiJson(body): ApiJson<NewPassword>,
) -> ApiResult<Json<User>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let user = gw
        .identity
        .oauth()
        .users()
        .set_password(tenant.id, &user, &body.password)
        .await?;
    tracing::info!(tenant = %tenant.id, user = %user.id, "password set");
    Ok(Json(user))
}

pub(crate) async fn unlock_user(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, user)): Path<(String, String)>,
) -> ApiResult<Json<User>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let user = gw.identity.oauth().users().unlock(tenant.id, &user).await?;
    tracing::info!(tenant = %tenant.id, user = %user.id, "user unlocked");
    Ok(Json(user))
}

/// An approval of a device's enrolment code.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewEnrolment {
    /// The code the device shows.
    user_code: String,
    /// The registry device (id or name) the credentials are for; a name not yet registered
    /// creates the device.
    device: String,
    /// For a device created here.
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    groups: BTreeSet<String>,
}

#[derive(Serialize)]
pub(crate) struct EnrolmentApproved {
    user_code: String,
    device_id: DeviceId,
    device_name: String,
    /// The device was registered by this approval.
    created: bool,
    /// The enrolment client the device used.
    client: String,
}

/// Binds an enrolment code (device authorization grant, scope `tern:device`) to a registry
/// device: its next poll receives that device's credentials. The PEP checked `enrolDevice` on
/// the tenant; credentials for a device that already exists also need `manageDeviceTokens` on
/// it, like `POST .../devices/{device}/tokens`.
pub(crate) async fn enrol_device(
    State(gw): Shared,
    AuthenticatedPrincipal(principal): AuthenticatedPrincipal,
    SourceIp(source_ip): SourceIp,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<NewEnrolment>,
) -> ApiResult<(StatusCode, Json<EnrolmentApproved>)> {
    let tenant = gw.registry.tenant_for(principal.caller, &tenant).await?;
    let oauth = gw.identity.oauth();
    // A mistyped or expired code must not leave a device behind.
    oauth.check_enrolment_code(&tenant, &body.user_code).await?;
    let tenant_ref = tenant.id.to_string();
    let (device, created) = match gw.registry.device(&tenant_ref, &body.device).await {
        Ok(device) => {
            if !body.labels.is_empty() || !body.groups.is_empty() {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "labels and groups: only for a new device; {:?} exists (change it with \
                         PATCH .../devices/{{device}})",
                        body.device
                    ),
                ));
            }
            let resource = Resource::device(&device);
            auth::authorize(
                &gw,
                &principal,
                tenant.id,
                "manageDeviceTokens",
                resource,
                source_ip,
            )
            .await?;
            (device, false)
        }
        Err(RegistryError::NotFound(_)) if DeviceId::parse(&body.device).is_err() => {
            let new = NewDevice {
                name: body.device.clone(),
                labels: body.labels,
                groups: body.groups,
                ..Default::default()
            };
            (gw.registry.create_device(&tenant_ref, new).await?, true)
        }
        Err(e) => return Err(e.into()),
    };
    let enrolment = oauth
        .approve_enrolment(&tenant, &body.user_code, device.id, &principal.subject)
        .await?;
    tracing::info!(tenant = %tenant.id, device = %device.id, created, "device enrolment approved");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(EnrolmentApproved {
            user_code: enrolment.user_code,
            device_id: device.id,
            device_name: device.name,
            created,
            client: enrolment.client,
        }),
    ))
}
