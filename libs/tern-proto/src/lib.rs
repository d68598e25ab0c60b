//! Generated code for the `tern.v1` contracts (proto/tern/v1/*.proto): the event envelope that
//! flows on the event log and the gRPC services. This is the only crate that runs codegen.

/// The `tern.v1` package.
/// The encoded descriptors of the tern.v1 contracts, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tern_descriptor");

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("tern.v1");
}

pub use prost::Message;
pub use tonic;

/// Default gRPC port of `tern up`.
pub const DEFAULT_GRPC_PORT: u16 = 50051;

use tern_core::ErrorCode;

/// The one mapping from Tern's error codes to gRPC status codes.
pub fn status_from(code: ErrorCode, message: impl Into<String>) -> tonic::Status {
    let grpc = match code {
        ErrorCode::BadRequest => tonic::Code::InvalidArgument,
        ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
        ErrorCode::Forbidden => tonic::Code::PermissionDenied,
        ErrorCode::NotFound => tonic::Code::NotFound,
        ErrorCode::Conflict => tonic::Code::AlreadyExists,
        ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorCode::Unavailable => tonic::Code::Unavailable,
        ErrorCode::Internal => tonic::Code::Internal,
    };
    tonic::Status::new(grpc, message)
}

/// The authenticated caller of a gRPC request, put there by the authentication layer.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<tern_core::Caller, tonic::Status> {
    req.extensions()
        .get::<tern_core::Caller>()
        .copied()
        .ok_or_else(|| tonic::Status::unauthenticated("no credentials"))
}

/// Refuses a gRPC call unless it carries the operator token.
pub fn require_operator<T>(req: &tonic::Request<T>) -> Result<(), tonic::Status> {
    match caller(req)? {
        tern_core::Caller::Operator => Ok(()),
        tern_core::Caller::Tenant(_) => Err(tonic::Status::permission_denied(
            "this call needs the operator token",
        )),
    }
}
