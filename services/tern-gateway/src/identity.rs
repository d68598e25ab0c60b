//! A tenant's OAuth clients and users: create (secrets shown once), list, show, delete, set a
//! password, lift a lockout. All of it needs the `tern:admin` scope (`auth.rs`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use tern_identity::{NewClient, NewUser, OAuthClient, User};

use crate::auth::Authenticated;
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
