use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ValidationError;

macro_rules! uuid_id {
    ($name:ident, $field:literal) => {
        #[doc = concat!("Identifier of a ", $field, " (a UUID).")]
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn random() -> Self {
                Self(Uuid::new_v4())
            }

            /// Parses an id supplied by a caller; the error names the field.
            pub fn parse(s: &str) -> Result<Self, ValidationError> {
                s.parse()
            }
        }

        impl FromStr for $name {
            type Err = ValidationError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self).map_err(|_| {
                    ValidationError::new(
                        concat!($field, "_id"),
                        format!("expected a UUID, got {s:?}"),
                    )
                })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
    };
}

uuid_id!(TenantId, "tenant");
uuid_id!(DeviceId, "device");

/// Who is calling an API: decided by identity, checked by every service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The platform operator: every tenant.
    Operator,
    /// An API token of one tenant.
    Tenant(TenantId),
}

impl Caller {
    /// Whether this caller may act on `tenant`.
    pub fn may_access(&self, tenant: TenantId) -> bool {
        match self {
            Self::Operator => true,
            Self::Tenant(own) => *own == tenant,
        }
    }
}

/// An organisation using the platform; every other record belongs to exactly one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub created_at_ms: i64,
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: DeviceId,
    pub tenant_id: TenantId,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_id: Option<String>,
    pub created_at_ms: i64,
    /// A disabled device keeps its record but may not connect or obtain tokens.
    #[serde(default)]
    pub disabled: bool,
    /// Access tokens issued (`iat`) before this second are refused: set when the device's
    /// tokens are revoked, so a stolen token stops working before it expires.
    #[serde(default)]
    pub tokens_valid_from_s: i64,
    /// The gateway device that may publish on this device's behalf (`telemetry/{device}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_id: Option<DeviceId>,
    /// How much of the device the platform may manage.
    #[serde(default)]
    pub management: ManagementLevel,
    /// The user (of the tenant's directory, by name) the device belongs to; policies can
    /// let owners manage their own devices (`resource.owner == principal.name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub groups: BTreeSet<String>,
}

/// How much of a device the platform manages: a non-managed device only sends data and takes
/// plain commands; a semi-managed one also takes the operations that configure and maintain
/// it, but not those that take it away from its user (lock, wipe, decommission); a fully
/// managed one takes every operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManagementLevel {
    NonManaged,
    SemiManaged,
    #[default]
    FullyManaged,
}

impl ManagementLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NonManaged => "non_managed",
            Self::SemiManaged => "semi_managed",
            Self::FullyManaged => "fully_managed",
        }
    }

    /// Whether the typed operation `operation` (its name without `tern.`) may be sent.
    pub fn allows(self, operation: &str) -> bool {
        match self {
            Self::NonManaged => false,
            Self::SemiManaged => !matches!(operation, "lock" | "unlock" | "wipe" | "decommission"),
            Self::FullyManaged => true,
        }
    }
}

/// What a caller supplies to register a device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub hardware_id: Option<String>,
    /// The gateway (a device of the same tenant, by id or name) that may act for this one.
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub management: ManagementLevel,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub groups: BTreeSet<String>,
}

const MAX_NAME_LEN: usize = 128;
const MAX_LABELS: usize = 64;
const MAX_LABEL_KEY_LEN: usize = 63;
const MAX_LABEL_VALUE_LEN: usize = 256;

/// Names are 1..=128 characters, printable, without leading/trailing whitespace.
pub fn validate_name(field: &str, name: &str) -> Result<(), ValidationError> {
    if name.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if name.chars().count() > MAX_NAME_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_NAME_LEN} characters"),
        ));
    }
    if name.trim() != name || name.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            "must not contain control characters or leading/trailing whitespace",
        ));
    }
    Ok(())
}

/// Label keys follow Kubernetes' shape (letters, digits, `-`, `_`, `.`, `/`), so selectors stay
/// unambiguous; values are free text up to 256 characters.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    if labels.len() > MAX_LABELS {
        return Err(ValidationError::new(
            "labels",
            format!("at most {MAX_LABELS} labels are allowed"),
        ));
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_KEY_LEN
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        if !key_ok {
            return Err(ValidationError::new(
                format!("labels.{key}"),
                format!(
                    "label keys are 1..={MAX_LABEL_KEY_LEN} characters of letters, digits, '-', '_', '.', '/'"
                ),
            ));
        }
        if value.len() > MAX_LABEL_VALUE_LEN || value.chars().any(char::is_control) {
            return Err(ValidationError::new(
                format!("labels.{key}"),
                format!(
                    "label values are at most {MAX_LABEL_VALUE_LEN} bytes without control characters"
                ),
            ));
        }
    }
    Ok(())
}

impl NewDevice {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name("name", &self.name)?;
        validate_labels(&self.labels)?;
        if let Some(hw) = &self.hardware_id {
            validate_name("hardware_id", hw)?;
        }
        if let Some(owner) = &self.owner {
            validate_name("owner", owner)?;
        }
        validate_groups(&self.groups)
    }
}

const MAX_GROUPS: usize = 32;

/// At most 32 groups, each a valid name.
pub fn validate_groups(groups: &BTreeSet<String>) -> Result<(), ValidationError> {
    if groups.len() > MAX_GROUPS {
        return Err(ValidationError::new(
            "groups",
            format!("at most {MAX_GROUPS} groups per device"),
        ));
    }
    groups.iter().try_for_each(|g| validate_name("groups", g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_name_the_field_on_error() {
        let id = DeviceId::random();
        assert_eq!(DeviceId::parse(&id.to_string()), Ok(id));
        let err = TenantId::parse("nope").unwrap_err();
        assert_eq!(err.field, "tenant_id");
        assert!(err.reason.contains("UUID"));
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("name", "boiler-7").is_ok());
        assert_eq!(validate_name("name", "").unwrap_err().field, "name");
        assert!(validate_name("name", " padded").is_err());
        assert!(validate_name("name", "bell\u{7}").is_err());
        assert!(validate_name("name", &"x".repeat(129)).is_err());
    }

    #[test]
    fn labels_are_validated_and_errors_name_the_label() {
        let mut labels = BTreeMap::from([("site".to_string(), "berlin".to_string())]);
        assert!(validate_labels(&labels).is_ok());
        labels.insert("bad key".into(), "v".into());
        assert_eq!(
            validate_labels(&labels).unwrap_err().field,
            "labels.bad key"
        );
    }
}
