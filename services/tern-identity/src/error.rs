use tern_core::{ErrorCode, ValidationError};
use tern_registry::RegistryError;
use tern_store::StoreError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum IdentityError {
    /// Deliberately vague towards the caller: which check failed is logged, not returned.
    #[error("invalid or expired credentials")]
    Unauthenticated,
    #[error("this token may not {0}")]
    Forbidden(String),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0} is unavailable; try again")]
    Unavailable(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("identity storage: {0}")]
    // The cause is in the message, and not also a `source`, so that a chain printed with
    // `{:#}` does not say it twice.
    Storage(StoreError),
    #[error("signing keys: {0}")]
    Keys(String),
}

/// Why a device's access token was not accepted; callers map it to their protocol's codes.
#[derive(Debug, Error)]
pub enum DeviceAuthError {
    #[error("the access token is invalid or expired")]
    InvalidToken,
    #[error("the access token was revoked")]
    Revoked,
    #[error("the device does not exist")]
    UnknownDevice,
    #[error("the device is disabled")]
    Disabled,
    #[error(transparent)]
    Registry(RegistryError),
}

impl IdentityError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Unauthenticated => ErrorCode::Unauthenticated,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::Invalid(_) => ErrorCode::BadRequest,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Registry(e) => e.code(),
            Self::Storage(_) | Self::Keys(_) => ErrorCode::Internal,
        }
    }
}

impl From<StoreError> for IdentityError {
    fn from(e: StoreError) -> Self {
        Self::Storage(e)
    }
}
