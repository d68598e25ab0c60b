//! Domain types shared by every Tern service.
//!
//! These are the platform's own types; protobuf messages (tern-proto) and REST bodies are
//! converted to and from them at the edges, so business code never depends on a wire format.

mod command;
mod error;
mod model;
mod operation;
mod payload;
mod selector;
mod time;

pub use command::{
    Command, CommandId, CommandResult, CommandState, CommandTransition, MAX_COMMAND_NAME,
    validate_command_name,
};
pub use error::{ErrorCode, ValidationError};
pub use model::{
    Caller, Device, DeviceId, ManagementLevel, NewDevice, Tenant, TenantId, validate_groups,
    validate_labels, validate_name,
};
pub use operation::{OPERATION_PREFIX, Operation, Wifi};
pub use payload::{DecodedTelemetry, decode_telemetry};
pub use selector::Selector;
pub use time::now_ms;
