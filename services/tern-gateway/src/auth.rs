//! The bearer-token extractor: every protected handler takes an [`Authenticated`] argument.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use tern_core::{Caller, ErrorCode};

use crate::{ApiError, Gateway};

/// The authenticated caller of a request.
pub(crate) struct Authenticated(pub Caller);

impl FromRequestParts<Arc<Gateway>> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        gateway: &Arc<Gateway>,
    ) -> Result<Self, ApiError> {
        let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthenticated,
                "missing `Authorization: Bearer <token>` header",
            )
        })?;
        let token = header
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
            })?;
        let caller = gateway.identity.authenticate_api(token).await?;
        Ok(Self(caller))
    }
}
