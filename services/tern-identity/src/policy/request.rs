//! A decision request in Tern's terms (who, what, on what, in which circumstances), turned into
//! Cedar's request and entities; and the decision, in XACML's four outcomes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicySet, Request,
    RestrictedExpression, Schema,
};
use serde::{Deserialize, Serialize};

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
        /// The device's owner (a user name), for ownership policies.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
        /// `non_managed`, `semi_managed` or `fully_managed`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        management: Option<String>,
        #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
        groups: BTreeSet<String>,
    },
    Topic {
        name: String,
    },
}

impl Resource {
    /// A registry device as the resource of a request, with everything policies may test.
    pub fn device(device: &tern_core::Device) -> Self {
        Self::Device {
            id: device.id.to_string(),
            name: device.name.clone(),
            labels: device.labels.clone(),
            owner: device.owner.clone(),
            management: Some(device.management.as_str().to_string()),
            groups: device.groups.clone(),
        }
    }
}

/// The environment of a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Environment {
    /// Seconds since the epoch; hour and weekday derive from it, in the tenant's time zone.
    pub now_s: i64,
    /// The tenant's offset from UTC at `now_s`; the PDP sets it from the tenant's time zone.
    #[serde(default)]
    pub utc_offset_s: i32,
    pub source_ip: Option<IpAddr>,
    /// The token's scopes (API requests).
    pub scopes: Vec<String>,
    /// `mqtt`, `http`, `coap` (device requests).
    pub protocol: Option<String>,
}

impl Environment {
    fn local_s(&self) -> i64 {
        self.now_s + i64::from(self.utc_offset_s)
    }

    fn hour(&self) -> i64 {
        self.local_s().rem_euclid(86_400) / 3600
    }

    /// ISO weekday, 1 = Monday (1970-01-01 was a Thursday).
    fn weekday(&self) -> i64 {
        (self.local_s().div_euclid(86_400) + 3).rem_euclid(7) + 1
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

    /// Why `what` (an action, or an action on a topic) was refused, for the caller.
    pub fn refusal(&self, what: &str) -> String {
        match self.outcome {
            Outcome::Deny => format!("{what} is forbidden by policy {}", self.policies.join(", ")),
            Outcome::Indeterminate => {
                format!("{what} could not be decided: {}", self.errors.join("; "))
            }
            _ => format!("no policy permits {what} here"),
        }
    }

    pub(crate) fn indeterminate(error: String) -> Self {
        Self {
            outcome: Outcome::Indeterminate,
            policies: Vec::new(),
            errors: vec![error],
        }
    }
}

fn uid(kind: &str, id: &str) -> Result<EntityUid, String> {
    let kind = EntityTypeName::from_str(kind).map_err(|e| format!("entity type {kind}: {e}"))?;
    Ok(EntityUid::from_type_name_and_id(kind, EntityId::new(id)))
}

fn string(value: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(value.to_string())
}

fn strings(values: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(values.iter().map(|v| string(v)))
}

fn entity(
    uid: EntityUid,
    attrs: Vec<(&str, RestrictedExpression)>,
    parents: Vec<EntityUid>,
    tags: &BTreeMap<String, String>,
) -> Result<Entity, String> {
    let attrs = attrs.into_iter().map(|(k, v)| (k.to_string(), v));
    let tags = tags.iter().map(|(k, v)| (k.clone(), string(v)));
    Entity::new_with_tags(uid, attrs, parents, tags).map_err(|e| format!("invalid entity: {e}"))
}

/// The principal's entity and the entities it is in (its groups).
fn principal_entities(p: &Principal) -> Result<Vec<Entity>, String> {
    let none = BTreeMap::new();
    Ok(match p {
        Principal::User {
            id,
            name,
            roles,
            groups,
        } => {
            let mut parents = Vec::with_capacity(groups.len());
            let mut entities = Vec::with_capacity(groups.len() + 1);
            for g in groups {
                let group = uid("Group", g)?;
                parents.push(group.clone());
                entities.push(entity(group, Vec::new(), Vec::new(), &none)?);
            }
            let attrs = vec![("name", string(name)), ("roles", strings(roles))];
            entities.push(entity(uid("User", id)?, attrs, parents, &none)?);
            entities
        }
        Principal::Client { id, name } => {
            vec![entity(
                uid("Client", id)?,
                vec![("name", string(name))],
                Vec::new(),
                &none,
            )?]
        }
        Principal::ApiToken { id } => {
            vec![entity(uid("ApiToken", id)?, Vec::new(), Vec::new(), &none)?]
        }
        Principal::Device { id, name, labels } => {
            vec![entity(
                uid("Device", id)?,
                vec![("name", string(name))],
                Vec::new(),
                labels,
            )?]
        }
    })
}

fn resource_entity(r: &Resource) -> Result<Entity, String> {
    let none = BTreeMap::new();
    match r {
        Resource::Tenant { id, name } => entity(
            uid("Tenant", id)?,
            vec![("name", string(name))],
            Vec::new(),
            &none,
        ),
        Resource::Device {
            id,
            name,
            labels,
            owner,
            management,
            groups,
        } => {
            let mut attrs = vec![
                ("name", string(name)),
                (
                    "groups",
                    RestrictedExpression::new_set(groups.iter().map(|g| string(g))),
                ),
            ];
            if let Some(owner) = owner {
                attrs.push(("owner", string(owner)));
            }
            if let Some(management) = management {
                attrs.push(("management", string(management)));
            }
            entity(uid("Device", id)?, attrs, Vec::new(), labels)
        }
        Resource::Topic { name } => entity(
            uid("Topic", name)?,
            vec![("name", string(name))],
            Vec::new(),
            &none,
        ),
    }
}

fn context(request: &AccessRequest) -> Result<Context, String> {
    let env = &request.environment;
    let mut pairs = vec![
        (
            "hour".to_string(),
            RestrictedExpression::new_long(env.hour()),
        ),
        (
            "weekday".to_string(),
            RestrictedExpression::new_long(env.weekday()),
        ),
        ("now".to_string(), RestrictedExpression::new_long(env.now_s)),
    ];
    if let Some(ip) = env.source_ip {
        pairs.push((
            "source_ip".into(),
            RestrictedExpression::new_ip(ip.to_string()),
        ));
    }
    if matches!(request.principal, Principal::Device { .. }) {
        let protocol = env.protocol.as_deref().unwrap_or("mqtt");
        pairs.push(("protocol".into(), string(protocol)));
    } else {
        pairs.push(("scopes".into(), strings(&env.scopes)));
    }
    Context::from_pairs(pairs).map_err(|e| format!("invalid context: {e}"))
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
    let action = uid("Action", &request.action)?;
    let mut entities = principal_entities(&request.principal)?;
    let principal = entities.last().map(|e| e.uid()).ok_or("no principal")?;
    let resource = resource_entity(&request.resource)?;
    let resource_uid = resource.uid();
    if resource_uid != principal {
        entities.push(resource);
    }
    // Checked against the schema (attribute and tag types), with the schema's action entities.
    let entities = Entities::from_entities(entities, Some(schema))
        .map_err(|e| format!("invalid entities: {e}"))?;
    let context = context(request)?;
    let cedar_request = Request::new(principal, action, resource_uid, context, Some(schema))
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
            utc_offset_s: 0,
            ..Default::default()
        };
        assert_eq!((env.hour(), env.weekday()), (14, 3));
    }
}
