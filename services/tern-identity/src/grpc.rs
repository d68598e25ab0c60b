//! The `tern.v1.Identity` gRPC service over [`Identity`], and the policy check of every gRPC
//! call inside a tenant ([`GrpcPolicy`] for [`Identity`]).

use std::net::SocketAddr;
use std::sync::Arc;

use tern_core::{Device, Tenant, now_ms};
use tern_proto::tonic::{Request, Response, Status};
use tern_proto::v1::{self, identity_server};
use tern_proto::{require_operator, status_from};
use tern_registry::{GrpcPolicy, authorized_device, authorized_tenant};

use crate::oauth::ApiPrincipal;

use crate::policy::{AccessRequest, Environment, Outcome, Principal, Resource};
use crate::scopes::ApiAccess;
use crate::{DeviceTokens, Identity, IdentityError};

#[derive(Clone)]
pub struct IdentityGrpc {
    identity: Arc<Identity>,
}

impl IdentityGrpc {
    pub fn new(identity: Arc<Identity>) -> Self {
        Self { identity }
    }

    pub fn into_server(self) -> identity_server::IdentityServer<Self> {
        identity_server::IdentityServer::new(self)
    }
}

fn status(e: IdentityError) -> Status {
    status_from(e.code(), e.to_string())
}

impl IdentityGrpc {
    async fn tenant<T>(
        &self,
        req: &Request<T>,
        reference: &str,
        action: &'static str,
    ) -> Result<Tenant, Status> {
        let registry = self.identity.registry();
        authorized_tenant(registry, &*self.identity, req, reference, action).await
    }

    async fn device<T>(
        &self,
        req: &Request<T>,
        reference: &str,
        device: &str,
        action: &'static str,
    ) -> Result<Device, Status> {
        let registry = self.identity.registry();
        authorized_device(registry, &*self.identity, req, (reference, device), action).await
    }
}

#[tonic::async_trait]
impl GrpcPolicy for Identity {
    async fn check(
        &self,
        extensions: &tonic::Extensions,
        tenant: &Tenant,
        action: &'static str,
        device: Option<&Device>,
    ) -> Result<(), Status> {
        let principal = extensions
            .get::<ApiPrincipal>()
            .ok_or_else(|| Status::unauthenticated("the call was not authenticated"))?;
        let resource = match device {
            Some(d) => Resource::device(d),
            None => Resource::Tenant {
                id: tenant.id.to_string(),
                name: tenant.name.clone(),
            },
        };
        let source_ip = extensions
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let decision = self
            .authorize_api(principal, tenant.id, action, resource, source_ip)
            .await
            .map_err(status)?;
        if decision.allowed() {
            return Ok(());
        }
        tracing::info!(tenant = %tenant.id, subject = %principal.subject, action,
            outcome = ?decision.outcome, "gRPC call refused by policy");
        Err(Status::permission_denied(decision.refusal(action)))
    }
}

fn tokens_out(t: DeviceTokens) -> v1::DeviceTokens {
    v1::DeviceTokens {
        access_token: t.access_token,
        access_token_expires_at_ms: t.access_token_expires_at_ms,
        refresh_token: t.refresh_token,
    }
}

#[tonic::async_trait]
impl identity_server::Identity for IdentityGrpc {
    async fn issue_device_tokens(
        &self,
        req: Request<v1::IssueDeviceTokensRequest>,
    ) -> Result<Response<v1::DeviceTokens>, Status> {
        let r = req.get_ref();
        let device = self
            .device(&req, &r.tenant_id, &r.device_id, "manageDeviceTokens")
            .await?;
        let tokens = self
            .identity
            .issue_device_tokens(&device.tenant_id.to_string(), &device.id.to_string())
            .await
            .map_err(status)?;
        Ok(Response::new(tokens_out(tokens)))
    }

    async fn refresh_device_token(
        &self,
        req: Request<v1::RefreshDeviceTokenRequest>,
    ) -> Result<Response<v1::DeviceTokens>, Status> {
        require_operator(&req)?;
        let tokens = self
            .identity
            .refresh_device_tokens(&req.into_inner().refresh_token)
            .await
            .map_err(status)?;
        Ok(Response::new(tokens_out(tokens)))
    }

    async fn revoke_device_tokens(
        &self,
        req: Request<v1::RevokeDeviceTokensRequest>,
    ) -> Result<Response<v1::RevokeDeviceTokensResponse>, Status> {
        let r = req.get_ref();
        let device = self
            .device(&req, &r.tenant_id, &r.device_id, "manageDeviceTokens")
            .await?;
        let revoked = self
            .identity
            .revoke_device_tokens(device.tenant_id, device.id)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::RevokeDeviceTokensResponse { revoked }))
    }

    async fn verify_device_token(
        &self,
        req: Request<v1::VerifyDeviceTokenRequest>,
    ) -> Result<Response<v1::DevicePrincipal>, Status> {
        require_operator(&req)?;
        let p = self
            .identity
            .verify_device_token(&req.into_inner().access_token)
            .map_err(status)?;
        Ok(Response::new(v1::DevicePrincipal {
            tenant_id: p.tenant_id.to_string(),
            device_id: p.device_id.to_string(),
            expires_at_ms: p.expires_at_ms,
        }))
    }

    async fn authorize(
        &self,
        req: Request<v1::AuthorizeRequest>,
    ) -> Result<Response<v1::AuthorizeResponse>, Status> {
        let tenant = self
            .tenant(&req, &req.get_ref().tenant_id, "queryPdp")
            .await?
            .id;
        let requests = req.into_inner().requests;
        if requests.len() > MAX_AUTHORIZE_BATCH {
            return Err(Status::invalid_argument(format!(
                "requests: at most {MAX_AUTHORIZE_BATCH} per call"
            )));
        }
        let mut decisions = Vec::with_capacity(requests.len());
        for (i, request) in requests.into_iter().enumerate() {
            let request = access_request(request)
                .map_err(|e| Status::invalid_argument(format!("requests[{i}].{e}")))?;
            let d = self
                .identity
                .pdp()
                .authorize(tenant, &request)
                .await
                .map_err(status)?;
            decisions.push(v1::PolicyDecision {
                outcome: match d.outcome {
                    Outcome::Permit => v1::Outcome::Permit,
                    Outcome::Deny => v1::Outcome::Deny,
                    Outcome::NotApplicable => v1::Outcome::NotApplicable,
                    Outcome::Indeterminate => v1::Outcome::Indeterminate,
                } as i32,
                policies: d.policies,
                errors: d.errors,
            });
        }
        Ok(Response::new(v1::AuthorizeResponse { decisions }))
    }

    async fn create_api_token(
        &self,
        req: Request<v1::CreateApiTokenRequest>,
    ) -> Result<Response<v1::ApiToken>, Status> {
        let tenant = self
            .tenant(&req, &req.get_ref().tenant_id, "manageCredentials")
            .await?;
        let req = req.into_inner();
        let t = self
            .identity
            .create_api_token(&tenant.id.to_string(), &req.name)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::ApiToken {
            id: t.id,
            tenant_id: t.tenant_id.to_string(),
            name: t.name,
            token: t.token.unwrap_or_default(),
            created_at_ms: t.created_at_ms,
        }))
    }
}

const MAX_AUTHORIZE_BATCH: usize = 1000;

/// The PDP's request from its gRPC form; the error names the field.
fn access_request(r: v1::AccessRequest) -> Result<AccessRequest, String> {
    let p = r.principal.ok_or("principal: required")?;
    let principal = match p.r#type.as_str() {
        "user" => Principal::User {
            id: p.id,
            name: p.name,
            roles: p.roles,
            groups: p.groups,
        },
        "client" => Principal::Client {
            id: p.id,
            name: p.name,
        },
        "api_token" => Principal::ApiToken { id: p.id },
        "device" => Principal::Device {
            id: p.id,
            name: p.name,
            labels: p.labels.into_iter().collect(),
        },
        other => {
            return Err(format!(
                "principal.type: expected user, client, api_token or device, got {other:?}"
            ));
        }
    };
    let res = r.resource.ok_or("resource: required")?;
    let resource = match res.r#type.as_str() {
        "tenant" => Resource::Tenant {
            id: res.id,
            name: res.name,
        },
        "device" => Resource::Device {
            id: res.id,
            name: res.name,
            labels: res.labels.into_iter().collect(),
            owner: None,
            management: None,
            groups: Default::default(),
        },
        "topic" => Resource::Topic { name: res.name },
        other => {
            return Err(format!(
                "resource.type: expected tenant, device or topic, got {other:?}"
            ));
        }
    };
    let env = r.environment.unwrap_or_default();
    let source_ip =
        match env.source_ip.as_str() {
            "" => None,
            ip => Some(ip.parse().map_err(|_| {
                format!("environment.source_ip: expected an IP address, got {ip:?}")
            })?),
        };
    Ok(AccessRequest {
        principal,
        action: r.action,
        resource,
        environment: Environment {
            now_s: if env.now_s == 0 {
                now_ms() / 1000
            } else {
                env.now_s
            },
            source_ip,
            scopes: env.scopes,
            protocol: (!env.protocol.is_empty()).then_some(env.protocol),
            utc_offset_s: 0,
        },
    })
}

/// Authenticates every gRPC call by its `authorization: Bearer <token>` metadata (an API or
/// operator token, or an OAuth access token whose scopes allow the method) and hands the
/// [`Caller`](tern_core::Caller) to the handlers as a request extension. Calls without valid
/// credentials never reach a handler, except health checks.
pub async fn grpc_auth(
    axum::extract::State(identity): axum::extract::State<Arc<Identity>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    // The standard health checking protocol: Kubernetes probes carry no credentials, and the
    // answer (serving or not) tells nothing about any tenant.
    if req.uri().path().starts_with("/grpc.health.v1.Health/") {
        return next.run(req).await;
    }
    let token = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let Some(token) = token else {
        return Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
            .into_http();
    };
    match identity.authenticate_api(&token).await {
        Ok(principal) => {
            let access = grpc_access(req.uri().path());
            if !principal.scopes.allows(access) {
                return Status::permission_denied(format!(
                    "this token lacks the scope {}",
                    access.scope()
                ))
                .into_http();
            }
            req.extensions_mut().insert(principal.caller);
            // For the handlers' policy checks (`GrpcPolicy`).
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(e) => status(e).into_http(),
    }
}

/// The scope a gRPC method needs (the REST API's rule): credentials need `tern:admin`, reads
/// `tern:read`, the rest `tern:write`.
fn grpc_access(path: &str) -> ApiAccess {
    let method = path.rsplit('/').next().unwrap_or_default();
    if path.starts_with("/tern.v1.Identity/")
        && !matches!(method, "VerifyDeviceToken" | "Authorize")
    {
        ApiAccess::Admin
    } else if path.starts_with("/grpc.reflection.")
        || method.starts_with("Get")
        || method.starts_with("List")
        || method.starts_with("Verify")
        || method == "Authorize"
    {
        ApiAccess::Read
    } else {
        ApiAccess::Write
    }
}
