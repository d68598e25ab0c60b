//! The bearer-token extractors: every protected API handler takes an [`Authenticated`]
//! argument (API or operator token), every device handler an [`AuthenticatedDevice`] (the
//! device's access token, checked like MQTT's).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use tern_core::{Caller, Device, ErrorCode};
use tern_identity::DeviceAuthError;

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
        let caller = gateway.identity.authenticate_api(token).await?;
        Ok(Self(caller))
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
