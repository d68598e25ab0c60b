//! Rules and alerts over REST: tenants write rules (validated when saved), and list,
//! acknowledge and clear the alerts their rules raise.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tern_analytics::alerts::{Alert, AlertFilter, AlertState};
use tern_analytics::jobs::Job;
use tern_analytics::retention::RetentionPolicy;
use tern_analytics::rules::{
    NewRule, Rule, RulePatch, Sources, TestReport, dead_letters, test_rule,
};
use tern_core::now_ms;

use crate::auth::Authenticated;
use crate::extract::{ApiJson, ApiQuery};
use crate::{ApiError, Gateway};

type Shared = State<Arc<Gateway>>;
type ApiResult<T> = Result<T, ApiError>;

const MAX_DEAD_LETTERS: usize = 1000;

/// A rule as saved, with its webhook secret when this request created one (the only time it
/// is shown).
#[derive(Serialize)]
pub(crate) struct SavedRule {
    #[serde(flatten)]
    rule: Rule,
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook_secret: Option<String>,
}

pub(crate) async fn create(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<NewRule>,
) -> ApiResult<(StatusCode, Json<SavedRule>)> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let (rule, webhook_secret) = gw.rules.create(tenant.id, body).await?;
    tracing::info!(tenant = %tenant.id, rule = %rule.id, name = %rule.name, "rule created");
    Ok((
        StatusCode::CREATED,
        Json(SavedRule {
            rule,
            webhook_secret,
        }),
    ))
}

pub(crate) async fn list(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Vec<Rule>>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(gw.rules.list(tenant.id).await?))
}

pub(crate) async fn show(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, rule)): Path<(String, String)>,
) -> ApiResult<Json<Rule>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(gw.rules.get(tenant.id, &rule).await?))
}

pub(crate) async fn update(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, rule)): Path<(String, String)>,
    ApiJson(patch): ApiJson<RulePatch>,
) -> ApiResult<Json<SavedRule>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let (rule, webhook_secret) = gw.rules.update(tenant.id, &rule, patch).await?;
    tracing::info!(tenant = %tenant.id, rule = %rule.id, version = rule.version, enabled = rule.enabled, "rule changed");
    Ok(Json(SavedRule {
        rule,
        webhook_secret,
    }))
}

pub(crate) async fn delete(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, rule)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let rule = gw.rules.delete(tenant.id, &rule).await?;
    tracing::info!(tenant = %tenant.id, rule = %rule.id, "rule deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Actions the rule could not carry out, with the error and the row.
pub(crate) async fn show_dead_letters(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, rule)): Path<(String, String)>,
) -> ApiResult<Json<Vec<Value>>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let rule = gw.rules.get(tenant.id, &rule).await?;
    Ok(Json(
        dead_letters(gw.store.as_ref(), &rule, MAX_DEAD_LETTERS).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TestRequest {
    sql: String,
    /// Milliseconds since the epoch; default an hour ago.
    from: Option<i64>,
    /// Milliseconds since the epoch; default now.
    to: Option<i64>,
    allowed_lateness_secs: Option<u64>,
}

/// What a rule would have emitted over stored telemetry; nothing is acted on.
pub(crate) async fn test(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<TestRequest>,
) -> ApiResult<Json<TestReport>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let to = body.to.unwrap_or_else(now_ms);
    let from = body.from.unwrap_or(to - 3_600_000);
    if from >= to {
        return Err(ApiError::bad_request("from", "`from` must be before `to`"));
    }
    let lateness = body.allowed_lateness_secs.unwrap_or(0);
    let sources = Sources {
        store: gw.store.as_ref(),
        registry: &gw.registry,
        twins: &gw.twins,
    };
    let report = test_rule(&sources, tenant.id, &body.sql, from, to, lateness).await?;
    Ok(Json(report))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RebuildRequest {
    /// Milliseconds since the epoch; default 0.
    from: Option<i64>,
    /// Milliseconds since the epoch; default now.
    to: Option<i64>,
}

/// Starts rebuilding the tenant's rollups from raw points → 202 with the job.
pub(crate) async fn rebuild_rollups(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<RebuildRequest>,
) -> ApiResult<(StatusCode, Json<Job>)> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let to = body.to.unwrap_or_else(now_ms);
    let job = gw
        .jobs
        .rebuild_rollups(tenant.id, body.from.unwrap_or(0), to)
        .await?;
    tracing::info!(tenant = %tenant.id, job = %job.id, "rollup rebuild started");
    Ok((StatusCode::ACCEPTED, Json(job)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RerunRequest {
    /// The rule (id or name).
    rule: String,
    /// Milliseconds since the epoch.
    from: i64,
    /// Milliseconds since the epoch; default now.
    to: Option<i64>,
}

/// Starts re-running a rule over stored telemetry, acting on its rows → 202 with the job.
pub(crate) async fn rerun_rule(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<RerunRequest>,
) -> ApiResult<(StatusCode, Json<Job>)> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let rule = gw.rules.get(tenant.id, &body.rule).await?;
    let to = body.to.unwrap_or_else(now_ms);
    let job = gw.jobs.rerun_rule(rule, body.from, to).await?;
    tracing::info!(tenant = %tenant.id, job = %job.id, rule = ?job.rule_id, "rule re-run started");
    Ok((StatusCode::ACCEPTED, Json(job)))
}

pub(crate) async fn list_jobs(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Vec<Job>>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(gw.jobs.list(tenant.id).await?))
}

pub(crate) async fn show_job(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, job)): Path<(String, String)>,
) -> ApiResult<Json<Job>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(gw.jobs.get(tenant.id, &job).await?))
}

pub(crate) async fn show_retention(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
) -> ApiResult<Json<RetentionPolicy>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(gw.retention.get(tenant.id).await?))
}

/// Replaces the tenant's retention; absent resolutions are kept forever.
pub(crate) async fn set_retention(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiJson(policy): ApiJson<RetentionPolicy>,
) -> ApiResult<Json<RetentionPolicy>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let policy = gw.retention.set(tenant.id, policy).await?;
    tracing::info!(tenant = %tenant.id, ?policy, "retention changed");
    Ok(Json(policy))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct AlertParams {
    /// `active`, `acknowledged` or `cleared`.
    state: Option<String>,
    /// A rule id or name.
    rule: Option<String>,
    /// A device id or name.
    device: Option<String>,
}

pub(crate) async fn list_alerts(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiQuery(params): ApiQuery<AlertParams>,
) -> ApiResult<Json<Vec<Alert>>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let state = params.state.as_deref().map(AlertState::parse).transpose()?;
    let rule_id = match &params.rule {
        Some(rule) => Some(
            gw.rules
                .get(tenant.id, rule)
                .await
                .map_err(|_| ApiError::bad_request("rule", format!("no rule {rule:?}")))?
                .id,
        ),
        None => None,
    };
    let device_id = match &params.device {
        Some(device) => Some(
            gw.registry
                .device_of(tenant.id, device)
                .await
                .map_err(|_| ApiError::bad_request("device", format!("no device {device:?}")))?
                .id
                .to_string(),
        ),
        None => None,
    };
    let filter = AlertFilter {
        state,
        rule_id,
        device_id,
    };
    Ok(Json(gw.alerts.list(tenant.id, &filter).await?))
}

pub(crate) async fn show_alert(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, alert)): Path<(String, String)>,
) -> ApiResult<Json<Alert>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(gw.alerts.get(tenant.id, &alert).await?))
}

pub(crate) async fn acknowledge(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, alert)): Path<(String, String)>,
) -> ApiResult<Json<Alert>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let alert = gw.alerts.acknowledge(tenant.id, &alert).await?;
    tracing::info!(tenant = %tenant.id, alert = %alert.id, "alert acknowledged");
    Ok(Json(alert))
}

pub(crate) async fn clear(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, alert)): Path<(String, String)>,
) -> ApiResult<Json<Alert>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let alert = gw.alerts.clear(tenant.id, &alert).await?;
    tracing::info!(tenant = %tenant.id, alert = %alert.id, "alert cleared");
    Ok(Json(alert))
}
