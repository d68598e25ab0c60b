//! What a tenant saves: a rule (SQL, actions, switches) and the actions it may take.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tern_core::{Selector, TenantId, ValidationError, validate_command_name};
use uuid::Uuid;

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    #[default]
    Warning,
    Critical,
}

impl Severity {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "info" => Some(Self::Info),
            "warning" => Some(Self::Warning),
            "critical" => Some(Self::Critical),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

/// What a rule does with each row it emits. Written as in the CLI: `alert`,
/// `alert:critical`, `command:NAME` (to the row's device), `command:NAME@SELECTOR` (to every
/// device the label selector selects) or `webhook:URL` (a signed POST).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Alert(Severity),
    Command {
        name: String,
        selector: Option<String>,
    },
    Webhook {
        url: String,
    },
    /// Publishes the row to the tenant's MQTT subscribers of a topic.
    Republish {
        topic: String,
    },
}

/// First topic levels that belong to devices; a rule may not publish under them (it would
/// feed its own input, or speak for devices).
const DEVICE_TOPICS: [&str; 4] = ["telemetry", "event", "command", "twin"];

impl FromStr for Action {
    type Err = ValidationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| ValidationError::new("actions", reason);
        let (kind, argument) = text.split_once(':').unwrap_or((text, ""));
        match kind {
            "alert" if argument.is_empty() => Ok(Action::Alert(Severity::default())),
            "alert" => Severity::parse(argument).map(Action::Alert).ok_or_else(|| {
                invalid(format!(
                    "{text:?}: alert severity is info, warning or critical"
                ))
            }),
            "command" => {
                let (name, selector) = match argument.split_once('@') {
                    Some((name, selector)) => {
                        Selector::parse(selector)
                            .map_err(|e| invalid(format!("{text:?}: selector: {}", e.reason)))?;
                        (name, Some(selector.to_string()))
                    }
                    None => (argument, None),
                };
                validate_command_name(name)
                    .map_err(|e| invalid(format!("{text:?}: command name {}", e.reason)))?;
                if name.starts_with("tern.") {
                    return Err(invalid(format!(
                        "{text:?}: tern.* commands are management operations; send them through the operations API"
                    )));
                }
                Ok(Action::Command {
                    name: name.to_string(),
                    selector,
                })
            }
            "republish" => {
                let topic = argument;
                let first = topic.split('/').next().unwrap_or_default();
                if topic.is_empty() || topic.len() > 1024 || topic.contains(['+', '#', '\0']) {
                    return Err(invalid(format!(
                        "{text:?}: the topic must be 1..=1024 bytes without wildcards"
                    )));
                }
                if topic.starts_with('$') || DEVICE_TOPICS.contains(&first) {
                    return Err(invalid(format!(
                        "{text:?}: $-topics and {} belong to devices and the platform",
                        DEVICE_TOPICS.join(", ")
                    )));
                }
                Ok(Action::Republish {
                    topic: topic.to_string(),
                })
            }
            "webhook" => {
                let url = reqwest::Url::parse(argument)
                    .map_err(|e| invalid(format!("{text:?}: not a URL: {e}")))?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                    return Err(invalid(format!(
                        "{text:?}: webhooks are http:// or https:// URLs with a host"
                    )));
                }
                if !url.username().is_empty() || url.password().is_some() {
                    return Err(invalid(format!(
                        "{text:?}: no credentials in webhook URLs; requests are signed"
                    )));
                }
                Ok(Action::Webhook {
                    url: argument.to_string(),
                })
            }
            _ => Err(invalid(format!(
                "{text:?}: actions are alert[:SEVERITY], command:NAME, command:NAME@SELECTOR, webhook:URL and republish:TOPIC"
            ))),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Alert(severity) => write!(f, "alert:{}", severity.as_str()),
            Action::Webhook { url } => write!(f, "webhook:{url}"),
            Action::Republish { topic } => write!(f, "republish:{topic}"),
            Action::Command {
                name,
                selector: None,
            } => write!(f, "command:{name}"),
            Action::Command {
                name,
                selector: Some(s),
            } => write!(f, "command:{name}@{s}"),
        }
    }
}

impl Serialize for Action {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse()
            .map_err(|e: ValidationError| serde::de::Error::custom(e.reason))
    }
}

/// A saved rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub name: String,
    pub sql: String,
    pub actions: Vec<Action>,
    pub enabled: bool,
    /// How long after a window's end its messages may still arrive, in seconds.
    pub allowed_lateness_secs: u64,
    /// Raised by every change; window state saved under another version is discarded.
    pub version: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}
