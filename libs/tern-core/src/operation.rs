//! Typed management operations: commands whose names (`tern.{operation}`) and payloads are
//! fixed by the platform and validated before they are sent, so that every device agent can
//! rely on one schema per operation. The device answers like any command
//! (`command/res/{id}/{status}`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ValidationError;

/// The prefix of the command names of typed operations; other commands may not use it.
pub const OPERATION_PREFIX: &str = "tern.";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "operation", rename_all = "snake_case", deny_unknown_fields)]
pub enum Operation {
    /// Restart after `delay_s` seconds.
    Reboot {
        #[serde(default)]
        delay_s: u32,
    },
    /// Report the current position; the answer's payload is `{"lat", "lon", "accuracy_m"?}`.
    Locate,
    /// Refuse local use until unlocked.
    Lock,
    Unlock,
    /// Erase the device's secure store (credentials, keys, user data).
    Wipe,
    /// Switch a hardware or software feature (`camera`, `microphone`, `gps`, ...).
    Feature {
        feature: String,
        enabled: bool,
    },
    /// Change network or application settings; absent members stay as they are.
    Configure {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wifi: Option<Wifi>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        apn: Option<String>,
        #[serde(default, skip_serializing_if = "Map::is_empty")]
        settings: Map<String, Value>,
    },
    /// Obtain new credentials (a fresh refresh token) and drop the old ones.
    RotateCredentials,
    /// Download, verify (SHA-256 and, when given, the Ed25519 signature) and install software.
    Update {
        version: String,
        url: String,
        sha256: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
    },
    /// Leave service: wipe, then stop talking to the platform.
    Decommission,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wifi {
    pub ssid: String,
    /// WPA passphrase. It is stored with the command, like any command payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk: Option<String>,
}

impl Operation {
    /// Reads `operation` with its `params` (a JSON object); errors say which field is wrong.
    pub fn parse(operation: &str, params: Map<String, Value>) -> Result<Self, ValidationError> {
        let mut object = params;
        object.insert("operation".into(), Value::String(operation.to_string()));
        let parsed: Self = serde_json::from_value(Value::Object(object))
            .map_err(|e| ValidationError::new("operation", e.to_string()))?;
        parsed.validate()?;
        Ok(parsed)
    }

    fn validate(&self) -> Result<(), ValidationError> {
        let check = |ok: bool, field: &str, why: &str| {
            if ok {
                Ok(())
            } else {
                Err(ValidationError::new(field, why.to_string()))
            }
        };
        match self {
            Self::Feature { feature, .. } => check(
                !feature.is_empty() && feature.len() <= 64,
                "feature",
                "must be 1..=64 characters",
            ),
            Self::Configure {
                wifi,
                apn,
                settings,
            } => {
                check(
                    wifi.is_some() || apn.is_some() || !settings.is_empty(),
                    "configure",
                    "set at least one of wifi, apn, settings",
                )?;
                if let Some(wifi) = wifi {
                    check(
                        (1..=32).contains(&wifi.ssid.len()),
                        "wifi.ssid",
                        "must be 1..=32 bytes",
                    )?;
                    check(
                        wifi.psk
                            .as_ref()
                            .is_none_or(|p| (8..=63).contains(&p.len())),
                        "wifi.psk",
                        "a WPA passphrase is 8..=63 characters",
                    )?;
                }
                Ok(())
            }
            Self::Update {
                version,
                url,
                sha256,
                ..
            } => {
                check(!version.is_empty(), "version", "must not be empty")?;
                check(
                    url.starts_with("https://") || url.starts_with("http://"),
                    "url",
                    "must be an http(s) URL",
                )?;
                check(
                    sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()),
                    "sha256",
                    "must be 64 hex digits",
                )
            }
            _ => Ok(()),
        }
    }

    /// The command name: `tern.{operation}`.
    pub fn command_name(&self) -> String {
        let tag = serde_json::to_value(self)
            .ok()
            .and_then(|v| v["operation"].as_str().map(str::to_string))
            .unwrap_or_default();
        format!("{OPERATION_PREFIX}{tag}")
    }

    /// The command payload: the operation with its parameters.
    pub fn payload(&self) -> Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(value: Value) -> Map<String, Value> {
        value.as_object().cloned().expect("object")
    }

    #[test]
    fn operations_parse_into_their_command() {
        let op = Operation::parse(
            "feature",
            params(json!({"feature": "camera", "enabled": false})),
        )
        .expect("feature");
        assert_eq!(op.command_name(), "tern.feature");
        assert_eq!(
            op.payload(),
            json!({"operation": "feature", "feature": "camera", "enabled": false})
        );
        let reboot = Operation::parse("reboot", Map::new()).expect("defaults");
        assert_eq!(reboot, Operation::Reboot { delay_s: 0 });
        assert_eq!(
            Operation::parse("rotate_credentials", Map::new())
                .expect("unit")
                .command_name(),
            "tern.rotate_credentials"
        );
    }

    #[test]
    fn bad_parameters_name_what_is_wrong() {
        for (operation, body, needle) in [
            ("feature", json!({"enabled": true}), "feature"),
            ("reboot", json!({"delay": 5}), "delay"),
            ("explode", json!({}), "explode"),
            (
                "update",
                json!({"version": "2", "url": "ftp://x", "sha256": "00"}),
                "url",
            ),
            ("configure", json!({}), "configure"),
            (
                "configure",
                json!({"wifi": {"ssid": "home", "psk": "short"}}),
                "wifi.psk",
            ),
        ] {
            let err = Operation::parse(operation, params(body)).expect_err(operation);
            assert!(
                err.to_string().contains(needle),
                "{operation}: {err} should mention {needle}"
            );
        }
    }
}
