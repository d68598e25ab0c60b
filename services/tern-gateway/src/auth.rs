//! The bearer-token extractors: every protected API handler takes an [`Authenticated`]
//! argument (API or operator token, or an OAuth access token whose scopes allow the request),
//! every device handler an [`AuthenticatedDevice`] (the device's access token, checked like
//! MQTT's).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::Method;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use tern_core::{Caller, Device, ErrorCode};
use tern_identity::DeviceAuthError;
use tern_identity::scopes::ApiAccess;

use crate::{ApiError, Gateway};

/// The authenticated caller of a request.
pub(crate) struct Authenticated(pub Caller);

impl FromRequestParts<Arc<Gateway>> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        gateway: &Arc<Gateway>,
    ) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        let principal = gateway.identity.authenticate_api(token).await?;
        let access = required_access(&parts.method, parts.uri.path());
        if !principal.scopes.allows(access) {
            tracing::info!(subject = %principal.subject, needed = access.scope(), "request refused: scope");
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("this token lacks the scope {}", access.scope()),
            ));
        }
        Ok(Self(principal.caller))
    }
}

/// A device calling the device API with its own access token.
pub(crate) struct AuthenticatedDevice(pub Device);

impl FromRequestParts<Arc<Gateway>> for AuthenticatedDevice {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        gateway: &Arc<Gateway>,
    ) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        match gateway.identity.authenticate_device(token).await {
            Ok(device) => Ok(Self(device)),
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

/// The scope a request needs: `tern:admin` for credentials (API tokens, OAuth clients, users,
/// CAs, device tokens), else `tern:read` to read and `tern:write` to change.
fn required_access(method: &Method, path: &str) -> ApiAccess {
    let segments: Vec<&str> = path
        .strip_prefix("/api/v1/tenants/")
        .map(|rest| rest.split('/').skip(1).collect())
        .unwrap_or_default();
    let credentials = matches!(
        segments.first(),
        Some(&"api-tokens" | &"oauth-clients" | &"users" | &"cas")
    ) || (segments.first() == Some(&"devices")
        && segments.get(2) == Some(&"tokens"));
    if credentials {
        ApiAccess::Admin
    } else if method == Method::GET || method == Method::HEAD {
        ApiAccess::Read
    } else {
        ApiAccess::Write
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_need_admin_reads_read_and_changes_write() {
        let t = "/api/v1/tenants/acme";
        let cases = [
            (Method::GET, format!("{t}/devices"), ApiAccess::Read),
            (Method::POST, format!("{t}/devices"), ApiAccess::Write),
            (Method::GET, format!("{t}/users"), ApiAccess::Admin),
            (Method::POST, format!("{t}/oauth-clients"), ApiAccess::Admin),
            (Method::POST, format!("{t}/api-tokens"), ApiAccess::Admin),
            (
                Method::POST,
                format!("{t}/devices/d1/tokens"),
                ApiAccess::Admin,
            ),
            (
                Method::GET,
                format!("{t}/devices/users/telemetry"),
                ApiAccess::Read,
            ),
            (Method::DELETE, format!("{t}/cas/x"), ApiAccess::Admin),
            (Method::GET, "/api/v1/tenants".to_string(), ApiAccess::Read),
        ];
        for (method, path, expected) in cases {
            assert_eq!(required_access(&method, &path), expected, "{method} {path}");
        }
    }
}
