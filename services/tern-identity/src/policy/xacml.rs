//! The XACML 3.0 JSON Profile (v1.1) request and response, so external PEPs can ask Tern's PDP.
//!
//! A request names the subject, action and resource by the standard attribute ids
//! (`...:subject:subject-id`, `...:action:action-id`, `...:resource:resource-id`), in the
//! shorthand categories (`AccessSubject`, `Action`, `Resource`, `Environment`) or the generic
//! `Category` array. Tern's own attributes say what kind of subject and resource they are
//! (`urn:tern:subject:type`: user, client, api-token, device; `urn:tern:resource:type`: tenant,
//! device, topic) and carry scopes (`urn:tern:subject:scope`). The environment's
//! `current-dateTime` and the subject's `authn-locality:ip-address` feed the context.

use std::net::IpAddr;

use serde_json::{Value, json};

use super::{Decision, Outcome};

pub const SUBJECT_ID: &str = "urn:oasis:names:tc:xacml:1.0:subject:subject-id";
pub const ACTION_ID: &str = "urn:oasis:names:tc:xacml:1.0:action:action-id";
pub const RESOURCE_ID: &str = "urn:oasis:names:tc:xacml:1.0:resource:resource-id";
pub const SUBJECT_TYPE: &str = "urn:tern:subject:type";
pub const SUBJECT_SCOPE: &str = "urn:tern:subject:scope";
pub const RESOURCE_TYPE: &str = "urn:tern:resource:type";
const IP_ADDRESS: [&str; 3] = [
    "urn:oasis:names:tc:xacml:3.0:subject:authn-locality:ip-address",
    "urn:oasis:names:tc:xacml:1.0:subject:authn-locality:ip-address",
    "urn:tern:environment:source-ip",
];
const CURRENT_DATETIME: &str = "urn:oasis:names:tc:xacml:1.0:environment:current-dateTime";

const SUBJECT_CATEGORY: &str = "urn:oasis:names:tc:xacml:1.0:subject-category:access-subject";
const ACTION_CATEGORY: &str = "urn:oasis:names:tc:xacml:3.0:attribute-category:action";
const RESOURCE_CATEGORY: &str = "urn:oasis:names:tc:xacml:3.0:attribute-category:resource";
const ENVIRONMENT_CATEGORY: &str = "urn:oasis:names:tc:xacml:3.0:attribute-category:environment";

pub const STATUS_OK: &str = "urn:oasis:names:tc:xacml:1.0:status:ok";
pub const STATUS_SYNTAX: &str = "urn:oasis:names:tc:xacml:1.0:status:syntax-error";
pub const STATUS_MISSING: &str = "urn:oasis:names:tc:xacml:1.0:status:missing-attribute";
pub const STATUS_PROCESSING: &str = "urn:oasis:names:tc:xacml:1.0:status:processing-error";

/// The attributes of one decision request that Tern understands.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct XacmlQuery {
    pub subject_id: Option<String>,
    pub subject_type: Option<String>,
    pub scopes: Vec<String>,
    pub source_ip: Option<IpAddr>,
    pub action_id: Option<String>,
    pub resource_id: Option<String>,
    pub resource_type: Option<String>,
    /// From `current-dateTime`, seconds since the epoch.
    pub now_s: Option<i64>,
    pub return_policy_ids: bool,
}

/// Why a request could not be read: becomes an Indeterminate with this status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XacmlError {
    pub status: &'static str,
    pub message: String,
}

impl XacmlError {
    fn syntax(message: impl Into<String>) -> Self {
        Self {
            status: STATUS_SYNTAX,
            message: message.into(),
        }
    }

    pub fn missing(message: impl Into<String>) -> Self {
        Self {
            status: STATUS_MISSING,
            message: message.into(),
        }
    }

    pub fn processing(message: impl Into<String>) -> Self {
        Self {
            status: STATUS_PROCESSING,
            message: message.into(),
        }
    }
}

/// Reads `{"Request": {...}}`.
pub fn parse(body: &Value) -> Result<XacmlQuery, XacmlError> {
    let request = body
        .get("Request")
        .and_then(Value::as_object)
        .ok_or_else(|| XacmlError::syntax("expected an object {\"Request\": {...}}"))?;
    if request.contains_key("MultiRequests") {
        return Err(XacmlError::syntax(
            "MultiRequests is not supported; send one request each",
        ));
    }
    let mut query = XacmlQuery {
        return_policy_ids: request
            .get("ReturnPolicyIdList")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        ..Default::default()
    };
    let mut categories: Vec<(&str, &Value)> = Vec::new();
    for (key, id) in [
        ("AccessSubject", SUBJECT_CATEGORY),
        ("Action", ACTION_CATEGORY),
        ("Resource", RESOURCE_CATEGORY),
        ("Environment", ENVIRONMENT_CATEGORY),
    ] {
        for instance in instances(request.get(key))? {
            categories.push((id, instance));
        }
    }
    for instance in instances(request.get("Category"))? {
        let id = instance
            .get("CategoryId")
            .and_then(Value::as_str)
            .ok_or_else(|| XacmlError::syntax("a Category needs a CategoryId"))?;
        let id = match id {
            "access-subject" => SUBJECT_CATEGORY,
            "action" => ACTION_CATEGORY,
            "resource" => RESOURCE_CATEGORY,
            "environment" => ENVIRONMENT_CATEGORY,
            other => other,
        };
        categories.push((id, instance));
    }
    let mut seen = std::collections::HashSet::new();
    for (category, instance) in categories {
        if !seen.insert(category) {
            return Err(XacmlError::syntax(format!(
                "more than one {category} (the Multiple Decision Profile is not supported)"
            )));
        }
        for attribute in instances(instance.get("Attribute"))? {
            let id = attribute
                .get("AttributeId")
                .and_then(Value::as_str)
                .ok_or_else(|| XacmlError::syntax("an Attribute needs an AttributeId"))?;
            let values = values(attribute.get("Value"), id)?;
            query.apply(category, id, values)?;
        }
    }
    Ok(query)
}

impl XacmlQuery {
    fn apply(&mut self, category: &str, id: &str, values: Vec<String>) -> Result<(), XacmlError> {
        let first = || values.first().cloned();
        match (category, id) {
            (SUBJECT_CATEGORY, SUBJECT_ID | "subject-id") => self.subject_id = first(),
            (SUBJECT_CATEGORY, SUBJECT_TYPE) => self.subject_type = first(),
            (SUBJECT_CATEGORY, SUBJECT_SCOPE) => self.scopes.extend(values),
            (ACTION_CATEGORY, ACTION_ID | "action-id") => self.action_id = first(),
            (RESOURCE_CATEGORY, RESOURCE_ID | "resource-id") => self.resource_id = first(),
            (RESOURCE_CATEGORY, RESOURCE_TYPE) => self.resource_type = first(),
            (_, id) if IP_ADDRESS.contains(&id) => {
                let text = first().unwrap_or_default();
                self.source_ip = Some(text.parse().map_err(|_| {
                    XacmlError::syntax(format!("{id}: expected an IP address, got {text:?}"))
                })?);
            }
            (ENVIRONMENT_CATEGORY, CURRENT_DATETIME) => {
                let text = first().unwrap_or_default();
                self.now_s = Some(parse_datetime(&text).ok_or_else(|| {
                    XacmlError::syntax(format!(
                        "{id}: expected an xs:dateTime such as 2026-11-25T14:30:00Z, got {text:?}"
                    ))
                })?);
            }
            // Attributes Tern does not use are allowed and ignored, as XACML PDPs do.
            _ => {}
        }
        Ok(())
    }
}

/// A category or attribute given as one object or an array of them.
fn instances(value: Option<&Value>) -> Result<Vec<&Value>, XacmlError> {
    match value {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items.iter().collect()),
        Some(v @ Value::Object(_)) => Ok(vec![v]),
        Some(_) => Err(XacmlError::syntax(
            "expected an object or an array of objects",
        )),
    }
}

/// An attribute's values: a scalar or an array (a bag), as strings.
fn values(value: Option<&Value>, id: &str) -> Result<Vec<String>, XacmlError> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    match value {
        None => Err(XacmlError::syntax(format!("attribute {id} has no Value"))),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                scalar(v).ok_or_else(|| XacmlError::syntax(format!("{id}: values must be scalars")))
            })
            .collect(),
        Some(v) => scalar(v)
            .map(|s| vec![s])
            .ok_or_else(|| XacmlError::syntax(format!("{id}: values must be scalars"))),
    }
}

/// `YYYY-MM-DDThh:mm:ss[.fff](Z|±hh:mm)` to seconds since the epoch.
fn parse_datetime(text: &str) -> Option<i64> {
    let (date, time) = text.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (clock, offset_s) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0)
    } else {
        let split = time.rfind(['+', '-'])?;
        let (c, zone) = time.split_at(split);
        let sign = if zone.starts_with('-') { -1 } else { 1 };
        let (h, mi) = zone[1..].split_once(':')?;
        (
            c,
            sign * (h.parse::<i64>().ok()? * 3600 + mi.parse::<i64>().ok()? * 60),
        )
    };
    let mut t = clock.splitn(3, ':');
    let (h, mi) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let s = t.next()?.split('.').next()?.parse::<i64>().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(y, m, day) * 86_400 + h * 3600 + mi * 60 + s - offset_s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `{"Response": [...]}` for a decision.
pub fn response(decision: &Decision, policy_version: u64, with_policy_ids: bool) -> Value {
    let (name, status) = match decision.outcome {
        Outcome::Permit => ("Permit", STATUS_OK),
        Outcome::Deny => ("Deny", STATUS_OK),
        Outcome::NotApplicable => ("NotApplicable", STATUS_OK),
        Outcome::Indeterminate => ("Indeterminate", STATUS_PROCESSING),
    };
    let mut result = json!({
        "Decision": name,
        "Status": { "StatusCode": { "Value": status } },
    });
    if !decision.errors.is_empty() {
        result["Status"]["StatusMessage"] = decision.errors.join("; ").into();
    }
    if with_policy_ids {
        let ids: Vec<Value> = decision
            .policies
            .iter()
            .map(|id| json!({ "Id": id, "Version": policy_version.to_string() }))
            .collect();
        result["PolicyIdentifierList"] = json!({ "PolicyIdReference": ids });
    }
    json!({ "Response": [result] })
}

/// `{"Response": [...]}` for a request that could not be read or resolved.
pub fn error_response(error: &XacmlError) -> Value {
    json!({ "Response": [{
        "Decision": "Indeterminate",
        "Status": { "StatusCode": { "Value": error.status }, "StatusMessage": error.message },
    }]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorthand_and_generic_categories_read_the_same() {
        let shorthand = json!({"Request": {
            "AccessSubject": {"Attribute": [
                {"AttributeId": SUBJECT_ID, "Value": "alice"},
                {"AttributeId": SUBJECT_SCOPE, "Value": ["tern:read", "tern:write"]},
                {"AttributeId": "urn:oasis:names:tc:xacml:3.0:subject:authn-locality:ip-address",
                 "DataType": "ipAddress", "Value": "10.20.1.5"}]},
            "Action": {"Attribute": {"AttributeId": ACTION_ID, "Value": "sendCommand"}},
            "Resource": [{"Attribute": [{"AttributeId": RESOURCE_ID, "Value": "boiler-1"},
                                        {"AttributeId": RESOURCE_TYPE, "Value": "device"}]}],
            "Environment": {"Attribute": [{"AttributeId": CURRENT_DATETIME, "DataType": "dateTime",
                                           "Value": "2026-11-25T15:30:00+01:00"}]},
        }});
        let generic = json!({"Request": {"Category": [
            {"CategoryId": SUBJECT_CATEGORY, "Attribute": [
                {"AttributeId": SUBJECT_ID, "Value": "alice"},
                {"AttributeId": SUBJECT_SCOPE, "Value": ["tern:read", "tern:write"]},
                {"AttributeId": "urn:oasis:names:tc:xacml:3.0:subject:authn-locality:ip-address", "Value": "10.20.1.5"}]},
            {"CategoryId": "action", "Attribute": [{"AttributeId": ACTION_ID, "Value": "sendCommand"}]},
            {"CategoryId": RESOURCE_CATEGORY, "Attribute": [
                {"AttributeId": RESOURCE_ID, "Value": "boiler-1"},
                {"AttributeId": RESOURCE_TYPE, "Value": "device"}]},
            {"CategoryId": ENVIRONMENT_CATEGORY, "Attribute": [
                {"AttributeId": CURRENT_DATETIME, "Value": "2026-11-25T14:30:00Z"}]},
        ]}});
        let a = parse(&shorthand).expect("shorthand");
        assert_eq!(a, parse(&generic).expect("generic"));
        assert_eq!(a.subject_id.as_deref(), Some("alice"));
        assert_eq!(a.scopes, vec!["tern:read", "tern:write"]);
        assert_eq!(a.now_s, Some(1_795_617_000));
        assert_eq!(a.source_ip, Some("10.20.1.5".parse().expect("ip")));
    }

    #[test]
    fn malformed_requests_name_what_is_wrong() {
        for (body, needle) in [
            (json!({"request": {}}), "Request"),
            (
                json!({"Request": {"Action": [{"Attribute": [{"Value": "x"}]}]}}),
                "AttributeId",
            ),
            (
                json!({"Request": {"Action": {"Attribute": {"AttributeId": ACTION_ID}}}}),
                "no Value",
            ),
            (
                json!({"Request": {"Action": [{"Attribute": []}, {"Attribute": []}]}}),
                "more than one",
            ),
            (
                json!({"Request": {"Environment": {"Attribute": {"AttributeId": CURRENT_DATETIME, "Value": "noon"}}}}),
                "xs:dateTime",
            ),
        ] {
            let err = parse(&body).unwrap_err();
            assert_eq!(err.status, STATUS_SYNTAX);
            assert!(err.message.contains(needle), "{needle}: {}", err.message);
        }
    }

    #[test]
    fn responses_carry_decision_status_and_policy_ids() {
        let d = Decision {
            outcome: Outcome::Deny,
            policies: vec!["no-night-commands".into()],
            errors: vec![],
        };
        let r = response(&d, 4, true);
        assert_eq!(r["Response"][0]["Decision"], "Deny");
        assert_eq!(r["Response"][0]["Status"]["StatusCode"]["Value"], STATUS_OK);
        assert_eq!(
            r["Response"][0]["PolicyIdentifierList"]["PolicyIdReference"][0]["Id"],
            "no-night-commands"
        );
    }
}
