//! Generated code for the `tern.v1` contracts (proto/tern/v1/*.proto): the event envelope that
//! flows on the event log and the gRPC services. This is the only crate that runs codegen.

/// The `tern.v1` package.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("tern.v1");
}

pub use prost::Message;
pub use tonic;

/// Default gRPC port of `tern up`.
pub const DEFAULT_GRPC_PORT: u16 = 50051;
