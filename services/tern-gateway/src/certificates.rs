//! A tenant's CA certificates for device client certificates (mTLS): register, list, delete.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use tern_identity::TenantCa;

use crate::auth::Authenticated;
use crate::extract::ApiJson;
use crate::{ApiError, Gateway};

type Shared = State<Arc<Gateway>>;
type ApiResult<T> = Result<T, ApiError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewCa {
    /// The CA certificate, PEM.
    certificate: String,
}

pub(crate) async fn add(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<NewCa>,
) -> ApiResult<(StatusCode, Json<TenantCa>)> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let ca = gw
        .identity
        .add_tenant_ca(tenant.id, &body.certificate)
        .await?;
    tracing::info!(tenant = %tenant.id, ca = %ca.id, subject = %ca.subject, "tenant CA registered");
    Ok((StatusCode::CREATED, Json(ca)))
}

pub(crate) async fn list(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Vec<TenantCa>>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(gw.identity.tenant_cas(tenant.id)))
}

pub(crate) async fn delete(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    if !gw.identity.delete_tenant_ca(tenant.id, &id).await? {
        return Err(ApiError::not_found(format!("CA {id}")));
    }
    tracing::info!(tenant = %tenant.id, ca = %id, "tenant CA deleted");
    Ok(StatusCode::NO_CONTENT)
}
