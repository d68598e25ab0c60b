//! Device selectors: Kubernetes' label selectors, plus the device's own fields. Requirements
//! are separated by commas, and a device must meet all of them: `site=berlin` (or `==`),
//! `env!=prod`, `camera` (has the label), `!legacy` (has not), `tier in (a,b)`,
//! `tier notin (a,b)`.
//!
//! A key starting with `@` is a field, which label keys cannot be: `@group` (the device's
//! groups; `@group=ops` means "in the group ops"), `@owner` and `@management`. So
//! `@group in (lab,field),@management=fully_managed` works like a label requirement, with a
//! group requirement met by any of the device's groups.

use crate::{Device, ValidationError};

/// What a requirement looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Label(String),
    Group,
    Owner,
    Management,
}

/// The fields, as written in a selector.
const FIELDS: [(&str, Key); 3] = [
    ("@group", Key::Group),
    ("@owner", Key::Owner),
    ("@management", Key::Management),
];

impl Key {
    /// The device's values for this key: none, one, or (groups) several.
    fn values<'a>(&self, device: &'a Device) -> Vec<&'a str> {
        match self {
            Self::Label(k) => device
                .labels
                .get(k)
                .map(String::as_str)
                .into_iter()
                .collect(),
            Self::Group => device.groups.iter().map(String::as_str).collect(),
            Self::Owner => device.owner.as_deref().into_iter().collect(),
            Self::Management => vec![device.management.as_str()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(Key, String),
    NotEquals(Key, String),
    Exists(Key),
    Absent(Key),
    In(Key, Vec<String>),
    NotIn(Key, Vec<String>),
}

/// A parsed selector; the empty selector selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

impl Selector {
    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        let mut requirements = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements.push(requirement(part)?);
        }
        Ok(Self(requirements))
    }

    pub fn matches(&self, device: &Device) -> bool {
        self.0.iter().all(|r| {
            let has = |key: &Key, value: &str| key.values(device).contains(&value);
            match r {
                Requirement::Equals(k, v) => has(k, v),
                Requirement::NotEquals(k, v) => !has(k, v),
                Requirement::Exists(k) => !k.values(device).is_empty(),
                Requirement::Absent(k) => k.values(device).is_empty(),
                Requirement::In(k, vs) => vs.iter().any(|v| has(k, v)),
                Requirement::NotIn(k, vs) => !vs.iter().any(|v| has(k, v)),
            }
        })
    }
}

/// Splits on commas outside parentheses (`a in (x,y),b=c`).
fn split_top_level(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn requirement(part: &str) -> Result<Requirement, ValidationError> {
    let bad = |why: &str| {
        ValidationError::new(
            "selector",
            format!(
                "{why} in {part:?}: expected key=value, key!=value, key, !key, key in (a,b) or key notin (a,b)"
            ),
        )
    };
    let key = |k: &str| {
        let k = k.trim();
        if k.starts_with('@') {
            return FIELDS
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, key)| key.clone())
                .ok_or_else(|| {
                    ValidationError::new(
                        "selector",
                        format!("unknown field {k:?} in {part:?}: expected @group, @owner or @management"),
                    )
                });
        }
        if k.is_empty() || k.contains(|c: char| c.is_whitespace() || "=!(),".contains(c)) {
            Err(bad("an invalid label key"))
        } else {
            Ok(Key::Label(k.to_string()))
        }
    };
    if let Some((k, v)) = part.split_once("!=") {
        return Ok(Requirement::NotEquals(key(k)?, v.trim().to_string()));
    }
    if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(Requirement::Equals(key(k)?, v.trim().to_string()));
    }
    for (word, negated) in [(" notin ", true), (" in ", false)] {
        if let Some((k, set)) = part.split_once(word) {
            let set = set.trim();
            let inner = set
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or_else(|| bad("a set must be in parentheses"))?;
            let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
            return Ok(if negated {
                Requirement::NotIn(key(k)?, values)
            } else {
                Requirement::In(key(k)?, values)
            });
        }
    }
    match part.strip_prefix('!') {
        Some(k) => Ok(Requirement::Absent(key(k)?)),
        None => Ok(Requirement::Exists(key(part)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeviceId, ManagementLevel, TenantId};

    fn device(labels: &[(&str, &str)], groups: &[&str]) -> Device {
        Device {
            id: DeviceId::random(),
            tenant_id: TenantId::random(),
            name: "d".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            hardware_id: None,
            created_at_ms: 0,
            disabled: false,
            tokens_valid_from_s: 0,
            gateway_id: None,
            management: ManagementLevel::default(),
            owner: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn every_requirement_kind_selects_as_kubernetes_does() {
        let berlin_cam = device(&[("site", "berlin"), ("camera", "yes"), ("tier", "a")], &[]);
        let paris = device(&[("site", "paris"), ("env", "prod"), ("tier", "c")], &[]);
        for (selector, expected) in [
            ("", [true, true]),
            ("site=berlin", [true, false]),
            ("site==paris", [false, true]),
            ("env!=prod", [true, false]),
            ("camera", [true, false]),
            ("!camera", [false, true]),
            ("tier in (a, b)", [true, false]),
            ("tier notin (a,b)", [false, true]),
            ("site=berlin,camera,tier in (a,c)", [true, false]),
        ] {
            let parsed = Selector::parse(selector).expect(selector);
            assert_eq!(
                [parsed.matches(&berlin_cam), parsed.matches(&paris)],
                expected,
                "{selector}"
            );
        }
    }

    #[test]
    fn fields_select_by_group_owner_and_management() {
        let mut lab = device(&[("group", "label-not-field")], &["lab", "berlin"]);
        lab.owner = Some("alice".into());
        let mut field = device(&[], &["field"]);
        field.management = ManagementLevel::SemiManaged;
        let loose = device(&[], &[]);
        for (selector, expected) in [
            ("@group=lab", [true, false, false]),
            ("@group!=lab", [false, true, true]),
            ("@group", [true, true, false]),
            ("!@group", [false, false, true]),
            ("@group in (berlin, field)", [true, true, false]),
            ("@group notin (lab)", [false, true, true]),
            ("group=lab", [false, false, false]),
            ("@owner=alice", [true, false, false]),
            ("!@owner", [false, true, true]),
            ("@management=semi_managed", [false, true, false]),
            ("@management=fully_managed,@group", [true, false, false]),
        ] {
            let parsed = Selector::parse(selector).expect(selector);
            assert_eq!(
                [
                    parsed.matches(&lab),
                    parsed.matches(&field),
                    parsed.matches(&loose)
                ],
                expected,
                "{selector}"
            );
        }
    }

    #[test]
    fn malformed_selectors_name_the_field() {
        for bad in ["tier in a,b", "=x", "a b", "!", "@site=berlin"] {
            let err = Selector::parse(bad).expect_err(bad);
            assert_eq!(err.field, "selector");
        }
        let err = Selector::parse("@groups=x").expect_err("unknown field");
        assert!(
            err.reason.contains("@group, @owner or @management"),
            "{err}"
        );
    }
}
