//! Turning callers and things into the PDP's principals and resources: the part of policy
//! enforcement every enforcement point shares (gateway, bridge, the XACML endpoint).

use std::net::IpAddr;

use serde_json::Value;
use tern_core::{Device, Tenant, TenantId, now_ms};

use crate::oauth::{ApiPrincipal, PrincipalKind};
use crate::policy::xacml::{self, XacmlError};
use crate::policy::{AccessRequest, Environment, Principal, Resource, on_device};
use crate::{Identity, IdentityError, User};

fn user_principal(user: User) -> Principal {
    Principal::User {
        id: user.id,
        name: user.name,
        roles: user.roles.iter().map(|r| r.as_str().to_string()).collect(),
        groups: user.groups,
    }
}

impl Identity {
    /// The PDP principal of an API caller; `None` for the operator, whom tenant policies do not
    /// govern.
    pub async fn principal_of(
        &self,
        caller: &ApiPrincipal,
        tenant: TenantId,
    ) -> Result<Option<Principal>, IdentityError> {
        Ok(match caller.kind {
            PrincipalKind::Operator => None,
            PrincipalKind::ApiToken => Some(Principal::ApiToken {
                id: caller.subject.clone(),
            }),
            PrincipalKind::Client => {
                let name = self
                    .oauth()
                    .clients()
                    .get(tenant, &caller.subject)
                    .await
                    .map(|c| c.name)
                    .unwrap_or_default();
                Some(Principal::Client {
                    id: caller.subject.clone(),
                    name,
                })
            }
            PrincipalKind::User => Some(user_principal(
                self.oauth().users().get(tenant, &caller.subject).await?,
            )),
        })
    }

    /// Decides an API request: `caller` doing `action` on `resource`, from `source_ip`.
    /// Permits the operator without asking.
    pub async fn authorize_api(
        &self,
        caller: &ApiPrincipal,
        tenant: TenantId,
        action: &str,
        resource: Resource,
        source_ip: Option<IpAddr>,
    ) -> Result<crate::policy::Decision, IdentityError> {
        let Some(principal) = self.principal_of(caller, tenant).await? else {
            return Ok(crate::policy::Decision {
                outcome: crate::policy::Outcome::Permit,
                policies: vec!["operator".into()],
                errors: Vec::new(),
            });
        };
        let request = AccessRequest {
            principal,
            action: action.to_string(),
            resource,
            environment: Environment {
                now_s: now_ms() / 1000,
                utc_offset_s: 0,
                source_ip,
                scopes: caller.scopes.to_vec(),
                protocol: None,
            },
        };
        self.pdp().authorize(tenant, &request).await
    }

    /// Decides whether `device` may publish to (`publish`) or receive from (`subscribe`)
    /// `topic` over a protocol without MQTT's own enforcement (HTTP, CoAP): the same request
    /// the bridge asks for an MQTT client, so one policy covers every protocol. `Err` is a
    /// refusal (or a failure, which refuses too) with the reason.
    pub async fn authorize_device(
        &self,
        device: &Device,
        action: &str,
        topic: &str,
        protocol: &str,
        source_ip: Option<IpAddr>,
    ) -> Result<(), String> {
        let request = AccessRequest {
            principal: Principal::Device {
                id: device.id.to_string(),
                name: device.name.clone(),
                labels: device.labels.clone(),
            },
            action: action.to_string(),
            resource: Resource::Topic {
                name: topic.to_string(),
            },
            environment: Environment {
                now_s: now_ms() / 1000,
                utc_offset_s: 0,
                source_ip,
                scopes: Vec::new(),
                protocol: Some(protocol.to_string()),
            },
        };
        match self.pdp().authorize(device.tenant_id, &request).await {
            Ok(decision) if decision.allowed() => Ok(()),
            Ok(decision) => {
                tracing::info!(device = %device.id, action, topic, protocol,
                    outcome = ?decision.outcome, policies = ?decision.policies, "refused by policy");
                Err(decision.refusal(&format!("{action} on {topic}")))
            }
            Err(e) => {
                tracing::error!(error = %e, "policy decision failed; refusing");
                Err(format!("{action} on {topic} could not be decided"))
            }
        }
    }

    /// Answers an XACML 3.0 JSON Profile request against `tenant`'s policies.
    pub async fn xacml_authorize(&self, tenant: &Tenant, body: &Value) -> Value {
        let query = match xacml::parse(body) {
            Ok(q) => q,
            Err(e) => return xacml::error_response(&e),
        };
        let request = match self.xacml_request(tenant, &query).await {
            Ok(r) => r,
            Err(e) => return xacml::error_response(&e),
        };
        let version = self
            .pdp()
            .current(tenant.id)
            .await
            .map(|v| v.version)
            .unwrap_or(0);
        match self.pdp().authorize(tenant.id, &request).await {
            Ok(decision) => xacml::response(&decision, version, query.return_policy_ids),
            Err(e) => xacml::error_response(&XacmlError::processing(e.to_string())),
        }
    }

    async fn xacml_request(
        &self,
        tenant: &Tenant,
        q: &xacml::XacmlQuery,
    ) -> Result<AccessRequest, XacmlError> {
        let subject = q
            .subject_id
            .clone()
            .ok_or_else(|| XacmlError::missing(format!("{} is required", xacml::SUBJECT_ID)))?;
        let action = q
            .action_id
            .clone()
            .ok_or_else(|| XacmlError::missing(format!("{} is required", xacml::ACTION_ID)))?;
        let kind = q
            .subject_type
            .as_deref()
            .unwrap_or(if subject.starts_with("tern_cl_") {
                "client"
            } else {
                "user"
            });
        let principal = match kind {
            "user" => match self.oauth().users().get(tenant.id, &subject).await {
                Ok(user) => user_principal(user),
                // A subject Tern does not know (an external PEP's user): no roles, no groups.
                Err(IdentityError::NotFound(_)) => Principal::User {
                    id: subject.clone(),
                    name: subject.clone(),
                    roles: Vec::new(),
                    groups: Vec::new(),
                },
                Err(e) => return Err(XacmlError::processing(e.to_string())),
            },
            "client" => Principal::Client {
                name: self
                    .oauth()
                    .clients()
                    .get(tenant.id, &subject)
                    .await
                    .map(|c| c.name)
                    .unwrap_or_default(),
                id: subject,
            },
            "api-token" => Principal::ApiToken { id: subject },
            "device" => {
                let device = self.xacml_device(tenant, &subject).await?;
                Principal::Device {
                    id: device.id.to_string(),
                    name: device.name,
                    labels: device.labels,
                }
            }
            other => {
                return Err(XacmlError::processing(format!(
                    "{}: expected user, client, api-token or device, got {other:?}",
                    xacml::SUBJECT_TYPE
                )));
            }
        };
        let resource_kind = q.resource_type.as_deref().unwrap_or(if on_device(&action) {
            "device"
        } else if action == "publish" || action == "subscribe" {
            "topic"
        } else {
            "tenant"
        });
        let resource = match resource_kind {
            "tenant" => Resource::Tenant {
                id: tenant.id.to_string(),
                name: tenant.name.clone(),
            },
            "device" => {
                let reference = q.resource_id.as_deref().ok_or_else(|| {
                    XacmlError::missing(format!("{} is required", xacml::RESOURCE_ID))
                })?;
                let device = self.xacml_device(tenant, reference).await?;
                Resource::device(&device)
            }
            "topic" => Resource::Topic {
                name: q.resource_id.clone().unwrap_or_default(),
            },
            other => {
                return Err(XacmlError::processing(format!(
                    "{}: expected tenant, device or topic, got {other:?}",
                    xacml::RESOURCE_TYPE
                )));
            }
        };
        Ok(AccessRequest {
            principal,
            action,
            resource,
            environment: Environment {
                now_s: q.now_s.unwrap_or_else(|| now_ms() / 1000),
                utc_offset_s: 0,
                source_ip: q.source_ip,
                scopes: q.scopes.clone(),
                protocol: None,
            },
        })
    }

    async fn xacml_device(&self, tenant: &Tenant, reference: &str) -> Result<Device, XacmlError> {
        self.registry()
            .device_of(tenant.id, reference)
            .await
            .map_err(|_| XacmlError::missing(format!("no device {reference:?} in this tenant")))
    }
}
