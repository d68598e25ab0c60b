//! Commands to devices: what an application asks a device to do, and the state it is in.
//!
//! A command is created `pending`, becomes `delivered` when the device acknowledges receipt,
//! and ends `succeeded` or `failed` with the device's response, or `expired` (its TTL passed
//! first) or `cancelled`. Terminal states never change again.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{DeviceId, TenantId, ValidationError};

/// Longest command name; names travel in MQTT topics (`command/req/{id}/{name}`).
pub const MAX_COMMAND_NAME: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CommandId(pub uuid::Uuid);

impl CommandId {
    /// Time-ordered (UUID v7), so a device's commands list in creation order.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        uuid::Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| ValidationError::new("command_id", format!("expected a UUID, got {s:?}")))
    }
}

impl Default for CommandId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    Pending,
    Delivered,
    Succeeded,
    Failed,
    Expired,
    Cancelled,
}

impl CommandState {
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Pending | Self::Delivered)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One state change, for the command's visible history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandTransition {
    pub state: CommandState,
    pub at_ms: i64,
}

/// The device's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    /// HTTP-style status from the response topic: 2xx is success, anything else failure.
    pub status: u16,
    /// The response payload: JSON when it parsed as JSON, otherwise its text.
    pub payload: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub id: CommandId,
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
    pub name: String,
    /// Sent to the device as JSON.
    pub payload: serde_json::Value,
    pub state: CommandState,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<CommandResult>,
    pub history: Vec<CommandTransition>,
}

impl Command {
    /// Moves to `state` at `now_ms` if the current state allows it; returns whether it moved.
    /// A response may overtake the delivery acknowledgement, so `pending` may end directly.
    pub fn transition(&mut self, state: CommandState, now_ms: i64) -> bool {
        use CommandState::*;
        let allowed = matches!(
            (self.state, state),
            (Pending, Delivered)
                | (
                    Pending | Delivered,
                    Succeeded | Failed | Expired | Cancelled
                )
        );
        if allowed {
            self.state = state;
            self.history.push(CommandTransition {
                state,
                at_ms: now_ms,
            });
        }
        allowed
    }

    /// Expires the command if its TTL has passed and it has not ended; returns whether it did.
    pub fn expire_if_due(&mut self, now_ms: i64) -> bool {
        now_ms >= self.expires_at_ms
            && !self.state.is_terminal()
            && self.transition(CommandState::Expired, now_ms)
    }

    /// The MQTT topic the device receives it on.
    pub fn request_topic(&self) -> String {
        format!("command/req/{}/{}", self.id, self.name)
    }
}

/// A command name: 1..=128 characters of `[A-Za-z0-9._-]`, so it is one topic level.
pub fn validate_command_name(name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_COMMAND_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            "name",
            format!(
                "command names are 1..={MAX_COMMAND_NAME} characters of A-Z, a-z, 0-9, '.', '_' and '-'"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> Command {
        Command {
            id: CommandId::new(),
            tenant_id: TenantId::random(),
            device_id: DeviceId::random(),
            name: "reboot".into(),
            payload: serde_json::Value::Null,
            state: CommandState::Pending,
            created_at_ms: 0,
            expires_at_ms: 100,
            idempotency_key: None,
            result: None,
            history: vec![],
        }
    }

    #[test]
    fn terminal_states_never_change() {
        let mut c = command();
        assert!(c.transition(CommandState::Delivered, 1));
        assert!(c.transition(CommandState::Succeeded, 2));
        for later in [
            CommandState::Failed,
            CommandState::Expired,
            CommandState::Cancelled,
            CommandState::Delivered,
        ] {
            assert!(!c.transition(later, 3), "{later:?}");
        }
        assert_eq!(c.state, CommandState::Succeeded);
        assert_eq!(c.history.len(), 2);
    }

    #[test]
    fn a_response_may_overtake_the_delivery_ack_but_not_go_back() {
        let mut c = command();
        assert!(c.transition(CommandState::Failed, 1));
        assert!(!c.transition(CommandState::Delivered, 2));
    }

    #[test]
    fn expiry_applies_only_when_due_and_not_ended() {
        let mut c = command();
        assert!(!c.expire_if_due(99));
        assert!(c.expire_if_due(100));
        assert_eq!(c.state, CommandState::Expired);
        let mut done = command();
        done.transition(CommandState::Cancelled, 1);
        assert!(!done.expire_if_due(1000));
    }

    #[test]
    fn ids_are_time_ordered_and_names_fit_one_topic_level() {
        let (a, b) = (CommandId::new(), CommandId::new());
        assert!(a < b);
        assert!(validate_command_name("set-config.v2_x").is_ok());
        for bad in ["", "a/b", "a+b", "#", &"x".repeat(129)] {
            assert!(validate_command_name(bad).is_err(), "{bad}");
        }
    }
}
