//! The bearer-token extractors: every protected API handler takes an [`Authenticated`]
//! argument (API or operator token, or an OAuth access token), which checks the token's scopes
//! and asks the tenant's policies (`pep.rs`); every device handler takes an
//! [`AuthenticatedDevice`] (the device's access token, checked like MQTT's).

use std::sync::Arc;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Path};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use tern_core::{Caller, Device, ErrorCode, TenantId};
use tern_identity::policy::Resource;
use tern_identity::{ApiPrincipal, DeviceAuthError};

use crate::{ApiError, Gateway, pep};

/// The authenticated caller of a request, allowed by its token's scopes and, inside a tenant,
/// by the tenant's policies.
pub(crate) struct Authenticated(pub Caller);

impl FromRequestParts<Arc<Gateway>> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        gateway: &Arc<Gateway>,
    ) -> Result<Self, ApiError> {
        Ok(Self(authenticate(parts, gateway).await?.caller))
    }
}

/// [`Authenticated`], with who the caller is (for records that name their author).
pub(crate) struct AuthenticatedPrincipal(pub ApiPrincipal);

impl FromRequestParts<Arc<Gateway>> for AuthenticatedPrincipal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        gateway: &Arc<Gateway>,
    ) -> Result<Self, ApiError> {
        Ok(Self(authenticate(parts, gateway).await?))
    }
}

async fn authenticate(parts: &mut Parts, gateway: &Arc<Gateway>) -> Result<ApiPrincipal, ApiError> {
    let token = bearer(parts)?;
    let principal = gateway.identity.authenticate_api(token).await?;
    let template = parts
        .extensions
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| parts.uri.path().to_string());
    let operation = pep::operation(&parts.method, &template);
    let access = operation.map_or_else(
        || pep::access_by_method(&parts.method, &template),
        |op| op.access,
    );
    if !principal.scopes.allows(access) {
        tracing::info!(subject = %principal.subject, needed = access.scope(), "request refused: scope");
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("this token lacks the scope {}", access.scope()),
        ));
    }
    if principal.caller != Caller::Operator && template.starts_with("/api/v1/tenants/{tenant}") {
        enforce(parts, gateway, &principal, operation).await?;
    }
    Ok(principal)
}

/// Asks the PDP whether the caller may do this operation on its resource.
async fn enforce(
    parts: &mut Parts,
    gateway: &Arc<Gateway>,
    principal: &ApiPrincipal,
    operation: Option<pep::Operation>,
) -> Result<(), ApiError> {
    let Some(op) = operation else {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "this operation is for the operator only",
        ));
    };
    let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, gateway)
        .await
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
    let reference = params.get("tenant").map(String::as_str).unwrap_or_default();
    let tenant = gateway
        .registry
        .tenant_for(principal.caller, reference)
        .await?;
    let resource = match params.get("device").filter(|_| op.on_device) {
        Some(device) => {
            let device = gateway
                .registry
                .device(&tenant.id.to_string(), device)
                .await?;
            Resource::device(&device)
        }
        None => Resource::Tenant {
            id: tenant.id.to_string(),
            name: tenant.name.clone(),
        },
    };
    let SourceIp(source_ip) = SourceIp::from_request_parts(parts, gateway).await?;
    authorize(
        gateway, principal, tenant.id, op.action, resource, source_ip,
    )
    .await
}

/// Asks the PDP for one decision; anything but Permit is a 403 that says why.
pub(crate) async fn authorize(
    gateway: &Gateway,
    principal: &ApiPrincipal,
    tenant: TenantId,
    action: &str,
    resource: Resource,
    source_ip: Option<IpAddr>,
) -> Result<(), ApiError> {
    let decision = gateway
        .identity
        .authorize_api(principal, tenant, action, resource, source_ip)
        .await?;
    if decision.allowed() {
        return Ok(());
    }
    tracing::info!(%tenant, subject = %principal.subject, action,
        outcome = ?decision.outcome, policies = ?decision.policies, "request refused by policy");
    Err(ApiError::new(
        ErrorCode::Forbidden,
        decision.refusal(action),
    ))
}

/// The caller's address, where the server knows it (an environment attribute of policies).
pub(crate) struct SourceIp(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for SourceIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| addr.ip()),
        ))
    }
}

/// A device calling the device API with its own access token, allowed by its tenant's
/// policies to use the topic the route stands for (`pep::device_topic`).
pub(crate) struct AuthenticatedDevice(pub Device);

impl FromRequestParts<Arc<Gateway>> for AuthenticatedDevice {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        gateway: &Arc<Gateway>,
    ) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        match gateway.identity.authenticate_device(token).await {
            Ok(device) => {
                let template = parts
                    .extensions
                    .get::<MatchedPath>()
                    .map(|m| m.as_str().to_string())
                    .unwrap_or_default();
                let Some(use_of) = pep::device_topic(&parts.method, &template) else {
                    return Err(ApiError::new(
                        ErrorCode::Forbidden,
                        "this route has no policy action for devices",
                    ));
                };
                if let Some((action, topic)) = use_of {
                    let SourceIp(source_ip) = SourceIp::from_request_parts(parts, gateway).await?;
                    gateway
                        .identity
                        .authorize_device(&device, action, topic, "http", source_ip)
                        .await
                        .map_err(|reason| ApiError::new(ErrorCode::Forbidden, reason))?;
                }
                Ok(Self(device))
            }
            Err(e) => {
                tracing::info!(error = %e, "device authentication failed");
                Err(match e {
                    DeviceAuthError::Disabled => ApiError::new(ErrorCode::Forbidden, e.to_string()),
                    DeviceAuthError::Registry(r) => r.into(),
                    other => ApiError::new(ErrorCode::Unauthenticated, other.to_string()),
                })
            }
        }
    }
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
        ApiError::new(
            ErrorCode::Unauthenticated,
            "missing `Authorization: Bearer <token>` header",
        )
    })?;
    header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthenticated,
                "the Authorization header must be `Bearer <token>`",
            )
        })
}
