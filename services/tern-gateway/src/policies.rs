//! Policy administration (PAP) over REST: the tenant's Cedar policies, their versions,
//! rollback, validation, what-if decisions, the audit settings and records; and the PDP for
//! external enforcement points (`POST /pdp/authorize`, the XACML 3.0 JSON Profile).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{Value, json};
use tern_core::Caller;
use tern_identity::policy::{
    AccessRequest, AuditConfig, AuditRecord, Decision, NamedPolicy, PolicyVersion,
};

use crate::auth::{Authenticated, AuthenticatedPrincipal};
use crate::extract::{ApiJson, ApiQuery};
use crate::{ApiError, Gateway};

type Shared = State<Arc<Gateway>>;
type ApiResult<T> = Result<T, ApiError>;

pub(crate) async fn current(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
) -> ApiResult<Json<PolicyVersion>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(gw.identity.pdp().current(tenant.id).await?))
}

pub(crate) async fn show(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, id)): Path<(String, String)>,
) -> ApiResult<Json<NamedPolicy>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let current = gw.identity.pdp().current(tenant.id).await?;
    current
        .policies
        .into_iter()
        .find(|p| p.id == id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no policy {id:?}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyText {
    /// Cedar source of one policy.
    text: String,
}

pub(crate) async fn put(
    State(gw): Shared,
    AuthenticatedPrincipal(principal): AuthenticatedPrincipal,
    Path((tenant, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<PolicyText>,
) -> ApiResult<Json<PolicyVersion>> {
    let tenant = gw.registry.tenant_for(principal.caller, &tenant).await?;
    let version = gw
        .identity
        .pdp()
        .put_policy(tenant.id, &id, &body.text, &principal.subject)
        .await?;
    Ok(Json(version))
}

pub(crate) async fn delete(
    State(gw): Shared,
    AuthenticatedPrincipal(principal): AuthenticatedPrincipal,
    Path((tenant, id)): Path<(String, String)>,
) -> ApiResult<Json<PolicyVersion>> {
    let tenant = gw.registry.tenant_for(principal.caller, &tenant).await?;
    let version = gw
        .identity
        .pdp()
        .delete_policy(tenant.id, &id, &principal.subject)
        .await?;
    Ok(Json(version))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TimeZoneSetting {
    /// An IANA name (`Europe/Berlin`); null: UTC.
    time_zone: Option<String>,
}

/// Sets the time zone of the policies' `context.hour` and `context.weekday` (a new version).
pub(crate) async fn set_time_zone(
    State(gw): Shared,
    AuthenticatedPrincipal(principal): AuthenticatedPrincipal,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<TimeZoneSetting>,
) -> ApiResult<Json<PolicyVersion>> {
    let tenant = gw.registry.tenant_for(principal.caller, &tenant).await?;
    let version = gw
        .identity
        .pdp()
        .set_time_zone(tenant.id, body.time_zone.as_deref(), &principal.subject)
        .await?;
    Ok(Json(version))
}

pub(crate) async fn versions(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Vec<PolicyVersion>>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(gw.identity.pdp().versions(tenant.id).await?))
}

pub(crate) async fn version(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, version)): Path<(String, u64)>,
) -> ApiResult<Json<PolicyVersion>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(gw.identity.pdp().version(tenant.id, version).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Rollback {
    version: u64,
}

pub(crate) async fn rollback(
    State(gw): Shared,
    AuthenticatedPrincipal(principal): AuthenticatedPrincipal,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<Rollback>,
) -> ApiResult<Json<PolicyVersion>> {
    let tenant = gw.registry.tenant_for(principal.caller, &tenant).await?;
    let version = gw
        .identity
        .pdp()
        .rollback(tenant.id, body.version, &principal.subject)
        .await?;
    Ok(Json(version))
}

/// A proposed policy set: the current one with some policies put or deleted, or a whole set.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Proposal {
    #[serde(default)]
    policies: Option<Vec<NamedPolicy>>,
    #[serde(default)]
    put: Vec<NamedPolicy>,
    #[serde(default)]
    delete: Vec<String>,
    /// For what-if: the request to decide.
    #[serde(default)]
    request: Option<AccessRequest>,
}

async fn proposed(
    gw: &Gateway,
    tenant: tern_core::TenantId,
    p: &Proposal,
) -> ApiResult<Vec<NamedPolicy>> {
    let mut policies = match &p.policies {
        Some(all) => all.clone(),
        None => gw.identity.pdp().current(tenant).await?.policies,
    };
    policies.retain(|existing| !p.delete.contains(&existing.id));
    for new in &p.put {
        match policies.iter_mut().find(|existing| existing.id == new.id) {
            Some(existing) => existing.text = new.text.clone(),
            None => policies.push(new.clone()),
        }
    }
    Ok(policies)
}

/// Validates a proposed set without saving it: `{"valid": true}` or a 400 naming the policy.
pub(crate) async fn validate(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<Proposal>,
) -> ApiResult<Json<Value>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let policies = proposed(&gw, tenant.id, &body).await?;
    gw.identity
        .pdp()
        .compile(&policies)
        .map_err(tern_identity::IdentityError::from)?;
    Ok(Json(json!({ "valid": true, "policies": policies.len() })))
}

/// What a request would get under a proposed set.
pub(crate) async fn what_if(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<Proposal>,
) -> ApiResult<Json<Decision>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let request = body
        .request
        .clone()
        .ok_or_else(|| ApiError::bad_request("request", "is required: the request to decide"))?;
    let policies = proposed(&gw, tenant.id, &body).await?;
    let decision = gw
        .identity
        .pdp()
        .what_if(tenant.id, &policies, &request)
        .await?;
    Ok(Json(decision))
}

pub(crate) async fn show_audit(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
) -> ApiResult<Json<AuditConfig>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(gw.identity.pdp().auditor().config(tenant.id).await?))
}

pub(crate) async fn set_audit(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<AuditConfig>,
) -> ApiResult<Json<AuditConfig>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    gw.identity
        .pdp()
        .auditor()
        .set_config(tenant.id, body.clone())
        .await?;
    Ok(Json(body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Limit {
    limit: Option<usize>,
}

pub(crate) async fn decisions(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiQuery(query): ApiQuery<Limit>,
) -> ApiResult<Json<Vec<AuditRecord>>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    Ok(Json(
        gw.identity.pdp().auditor().recent(tenant.id, limit).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TenantParam {
    tenant: Option<String>,
}

/// `POST /pdp/authorize`: the XACML JSON Profile, against the caller's tenant (the operator
/// names one with `?tenant=`). The answer is always 200 with the decision inside, as XACML
/// PEPs expect; only authentication failures are HTTP errors.
pub(crate) async fn xacml(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    ApiQuery(query): ApiQuery<TenantParam>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Json<Value>> {
    let reference = match (caller, &query.tenant) {
        (_, Some(t)) => t.clone(),
        (Caller::Tenant(own), None) => own.to_string(),
        (Caller::Operator, None) => {
            return Err(ApiError::bad_request(
                "tenant",
                "the operator must name the tenant: /pdp/authorize?tenant=NAME",
            ));
        }
    };
    let tenant = gw.registry.tenant_for(caller, &reference).await?;
    Ok(Json(gw.identity.xacml_authorize(&tenant, &body).await))
}

/// The same, under the tenant's path.
pub(crate) async fn xacml_in_tenant(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Json<Value>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(gw.identity.xacml_authorize(&tenant, &body).await))
}
