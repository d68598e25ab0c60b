use tern_core::{ErrorCode, ValidationError};
use tern_store::StoreError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("registry storage: {0}")]
    // The cause is in the message, and not also a `source`, so that a chain printed with
    // `{:#}` does not say it twice.
    Storage(StoreError),
    #[error("corrupt registry record {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

impl RegistryError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::BadRequest,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Self::Storage(StoreError::Invalid { .. }) => ErrorCode::BadRequest,
            Self::Storage(_) | Self::Corrupt { .. } => ErrorCode::Internal,
        }
    }
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        Self::Storage(e)
    }
}
