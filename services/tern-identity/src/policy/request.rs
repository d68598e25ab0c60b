//! A decision request in Tern's terms (who, what, on what, in which circumstances), turned into
//! Cedar's request and entities; and the decision, in XACML's four outcomes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use cedar_policy::{Authorizer, Context, Entities, EntityUid, PolicySet, Request, Schema};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The subject of a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Principal {
    User {
        id: String,
        name: String,
        roles: Vec<String>,
        groups: Vec<String>,
    },
    Client {
        id: String,
        name: String,
    },
    ApiToken {
        id: String,
    },
    Device {
        id: String,
        name: String,
        labels: BTreeMap<String, String>,
    },
}

impl Principal {
    /// A stable key for caches and audit records: `User::"id"`.
    pub fn key(&self) -> String {
        let (kind, id) = match self {
            Self::User { id, .. } => ("User", id),
            Self::Client { id, .. } => ("Client", id),
            Self::ApiToken { id } => ("ApiToken", id),
            Self::Device { id, .. } => ("Device", id),
        };
        format!("{kind}::{id:?}")
    }
}

/// What a request acts on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Resource {
    Tenant {
        id: String,
        name: String,
    },
    Device {
        id: String,
        name: String,
        labels: BTreeMap<String, String>,
    },
    Topic {
        name: String,
    },
}

impl Resource {
    pub fn key(&self) -> String {
        match self {
            Self::Tenant { id, .. } => format!("Tenant::{id:?}"),
            Self::Device { id, .. } => format!("Device::{id:?}"),
            Self::Topic { name } => format!("Topic::{name:?}"),
        }
    }
}

/// The environment of a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Environment {
    /// Seconds since the epoch; hour and weekday (UTC) derive from it.
    pub now_s: i64,
    pub source_ip: Option<IpAddr>,
    /// The token's scopes (API requests).
    pub scopes: Vec<String>,
    /// `mqtt`, `http`, `coap` (device requests).
    pub protocol: Option<String>,
}

impl Environment {
    fn hour(&self) -> i64 {
        self.now_s.rem_euclid(86_400) / 3600
    }

    /// ISO weekday, 1 = Monday (1970-01-01 was a Thursday).
    fn weekday(&self) -> i64 {
        (self.now_s.div_euclid(86_400) + 3).rem_euclid(7) + 1
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AccessRequest {
    pub principal: Principal,
    pub action: String,
    pub resource: Resource,
    pub environment: Environment,
}

/// XACML 3.0's decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Permit,
    Deny,
    /// No policy applied (Cedar denies by default; XACML callers may want to know).
    NotApplicable,
    /// The request could not be evaluated (malformed, or policies failed on it).
    Indeterminate,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub outcome: Outcome,
    /// The policies that decided: the permits that allowed, or the forbids that denied.
    pub policies: Vec<String>,
    /// Why a request could not be (fully) evaluated.
    pub errors: Vec<String>,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.outcome == Outcome::Permit
    }

    pub(crate) fn indeterminate(error: String) -> Self {
        Self {
            outcome: Outcome::Indeterminate,
            policies: Vec::new(),
            errors: vec![error],
        }
    }
}

fn uid(kind: &str, id: &str) -> Value {
    json!({ "type": kind, "id": id })
}

fn principal_entity(p: &Principal) -> (Value, Vec<Value>) {
    match p {
        Principal::User {
            id,
            name,
            roles,
            groups,
        } => {
            let parents: Vec<Value> = groups.iter().map(|g| uid("Group", g)).collect();
            let group_entities = groups
                .iter()
                .map(|g| json!({ "uid": uid("Group", g), "attrs": {}, "parents": [] }))
                .collect();
            let entity = json!({
                "uid": uid("User", id),
                "attrs": { "name": name, "roles": roles },
                "parents": parents,
            });
            (entity, group_entities)
        }
        Principal::Client { id, name } => (
            json!({ "uid": uid("Client", id), "attrs": { "name": name }, "parents": [] }),
            Vec::new(),
        ),
        Principal::ApiToken { id } => (
            json!({ "uid": uid("ApiToken", id), "attrs": {}, "parents": [] }),
            Vec::new(),
        ),
        Principal::Device { id, name, labels } => (device_entity(id, name, labels), Vec::new()),
    }
}

fn device_entity(id: &str, name: &str, labels: &BTreeMap<String, String>) -> Value {
    json!({ "uid": uid("Device", id), "attrs": { "name": name }, "parents": [], "tags": labels })
}

fn resource_entity(r: &Resource) -> Value {
    match r {
        Resource::Tenant { id, name } => {
            json!({ "uid": uid("Tenant", id), "attrs": { "name": name }, "parents": [] })
        }
        Resource::Device { id, name, labels } => device_entity(id, name, labels),
        Resource::Topic { name } => {
            json!({ "uid": uid("Topic", name), "attrs": { "name": name }, "parents": [] })
        }
    }
}

fn context(request: &AccessRequest) -> Value {
    let env = &request.environment;
    let mut context = serde_json::Map::new();
    context.insert("hour".into(), env.hour().into());
    context.insert("weekday".into(), env.weekday().into());
    context.insert("now".into(), env.now_s.into());
    if let Some(ip) = env.source_ip {
        context.insert(
            "source_ip".into(),
            json!({ "__extn": { "fn": "ip", "arg": ip.to_string() } }),
        );
    }
    if matches!(request.principal, Principal::Device { .. }) {
        let protocol = env.protocol.clone().unwrap_or_else(|| "mqtt".into());
        context.insert("protocol".into(), protocol.into());
    } else {
        context.insert("scopes".into(), env.scopes.clone().into());
    }
    Value::Object(context)
}

fn entity_uid(value: &Value) -> Result<EntityUid, String> {
    EntityUid::from_json(value.clone()).map_err(|e| format!("invalid entity reference: {e}"))
}

/// Evaluates `request` against `policies`. An unknown action is NotApplicable; a request that
/// does not fit the schema (an action on the wrong kind of resource) is Indeterminate; both say
/// why in `errors`.
pub(crate) fn evaluate(schema: &Schema, policies: &PolicySet, request: &AccessRequest) -> Decision {
    if !super::schema::ACTIONS
        .iter()
        .any(|(a, _)| *a == request.action)
    {
        // No policy can be about an action Tern does not have.
        return Decision {
            outcome: Outcome::NotApplicable,
            policies: Vec::new(),
            errors: vec![format!("unknown action {:?}", request.action)],
        };
    }
    match build(schema, request) {
        Ok((cedar_request, entities)) => {
            let response = Authorizer::new().is_authorized(&cedar_request, policies, &entities);
            let decided: Vec<String> = response
                .diagnostics()
                .reason()
                .map(|id| id.to_string())
                .collect();
            let errors: Vec<String> = response
                .diagnostics()
                .errors()
                .map(|e| e.to_string())
                .collect();
            let outcome = match response.decision() {
                cedar_policy::Decision::Allow => Outcome::Permit,
                cedar_policy::Decision::Deny if !decided.is_empty() => Outcome::Deny,
                cedar_policy::Decision::Deny if !errors.is_empty() => Outcome::Indeterminate,
                cedar_policy::Decision::Deny => Outcome::NotApplicable,
            };
            Decision {
                outcome,
                policies: decided,
                errors,
            }
        }
        Err(e) => Decision::indeterminate(e),
    }
}

fn build(schema: &Schema, request: &AccessRequest) -> Result<(Request, Entities), String> {
    let action = entity_uid(&uid("Action", &request.action))?;
    let (principal, mut entities) = principal_entity(&request.principal);
    let resource = resource_entity(&request.resource);
    let principal_uid = entity_uid(&principal["uid"])?;
    let resource_uid = entity_uid(&resource["uid"])?;
    entities.push(principal);
    if resource["uid"] != entities[entities.len() - 1]["uid"] {
        entities.push(resource);
    }
    let entities = Entities::from_json_value(Value::Array(entities), Some(schema))
        .map_err(|e| format!("invalid entities: {e}"))?;
    let context = Context::from_json_value(context(request), Some((schema, &action)))
        .map_err(|e| format!("invalid context: {e}"))?;
    let cedar_request = Request::new(principal_uid, action, resource_uid, context, Some(schema))
        .map_err(|e| format!("invalid request: {e}"))?;
    Ok((cedar_request, entities))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hour_and_weekday_are_utc() {
        // 2026-11-25 (a Wednesday) 14:30 UTC.
        let env = Environment {
            now_s: 1_795_617_000,
            ..Default::default()
        };
        assert_eq!((env.hour(), env.weekday()), (14, 3));
    }
}
