use thiserror::Error;

/// The short, shared vocabulary of failure kinds. Each service error maps to one code; the code
/// maps once to an HTTP status (gateway) and once to a gRPC status (tern-proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Unauthenticated,
    Forbidden,
    NotFound,
    Conflict,
    FailedPrecondition,
    Unavailable,
    Internal,
}

/// A value supplied by a caller that does not meet the contract; names the field.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("invalid `{field}`: {reason}")]
pub struct ValidationError {
    pub field: String,
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
