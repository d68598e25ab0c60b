//! The device registry: tenants, the devices they own, the commands sent to them, their
//! twins, and over-the-air updates.
//!
//! Tenants and devices can be referred to by id or by name (names are unique: tenant names
//! platform-wide, device names within their tenant), so people can type `acme` and `boiler-1`
//! while programs use UUIDs. Records live in the [`Store`](tern_store::Store) as JSON.

mod commands;
mod error;
mod grpc;
mod lease;
pub mod nats;
pub mod ota;
mod registry;
pub mod testing;
mod twins;

pub use commands::{COMMANDS_TOPIC, CommandRoute, Commands, CommandsConfig, NewCommand};
pub use error::RegistryError;
pub use grpc::{GrpcPolicy, RegistryGrpc, authorized_device, authorized_tenant};
pub use lease::Lease;
pub use registry::{AccessRevoked, DevicePatch, Registry, validate_tenant_name};
pub use twins::{DesiredState, Twin, TwinMetadata, TwinRoute, Twins, TwinsConfig};
