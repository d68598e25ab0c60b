//! OTA over REST: artifacts (upload as the raw request body, list, show), the tenant's
//! update-signing public key, and campaigns (create, list, show with every device, pause,
//! resume, abort); and for devices, `GET /device/v1/artifacts/{id}` with range requests, so an
//! interrupted download resumes.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tern_registry::ota::{Artifact, Campaign, NewCampaign, Target};
use uuid::Uuid;

use crate::auth::{Authenticated, AuthenticatedDevice};
use crate::extract::{ApiJson, ApiQuery};
use crate::{ApiError, Gateway};

type Shared = State<Arc<Gateway>>;
type ApiResult<T> = Result<T, ApiError>;

fn uuid(field: &str, text: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::bad_request(field, format!("`{field}` must be a UUID")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UploadParams {
    name: String,
    version: String,
}

/// `POST .../artifacts?name=..&version=..` with the artifact as the body.
pub(crate) async fn upload(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiQuery(params): ApiQuery<UploadParams>,
    body: Body,
) -> ApiResult<(StatusCode, Json<Artifact>)> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let mut upload = gw.artifacts.begin().await?;
    let mut body = body.into_data_stream();
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request("body", format!("upload interrupted: {e}")))?;
        upload.write(&chunk).await?;
    }
    let artifact = gw
        .artifacts
        .finish(tenant.id, upload, &params.name, &params.version)
        .await?;
    tracing::info!(tenant = %tenant.id, artifact = %artifact.id, size = artifact.size, "artifact uploaded");
    Ok((StatusCode::CREATED, Json(artifact)))
}

#[derive(Serialize)]
pub(crate) struct ArtifactList {
    artifacts: Vec<Artifact>,
}

pub(crate) async fn list_artifacts(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
) -> ApiResult<Json<ArtifactList>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(ArtifactList {
        artifacts: gw.artifacts.list(tenant.id).await?,
    }))
}

pub(crate) async fn show_artifact(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, artifact)): Path<(String, String)>,
) -> ApiResult<Json<Artifact>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let id = uuid("artifact", &artifact)?;
    Ok(Json(gw.artifacts.get(tenant.id, id).await?))
}

#[derive(Serialize)]
pub(crate) struct SigningKey {
    /// For tern-agent's `update.public_key`.
    public_key: String,
    algorithm: &'static str,
}

pub(crate) async fn signing_key(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
) -> ApiResult<Json<SigningKey>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(SigningKey {
        public_key: gw.artifacts.public_key(tenant.id).await?,
        algorithm: "Ed25519 over the artifact's SHA-256 digest",
    }))
}

/// `GET /device/v1/artifacts/{id}`: a device downloads its tenant's artifact; `Range:
/// bytes=N-` (or `N-M`) gets 206 with the rest.
pub(crate) async fn download(
    State(gw): Shared,
    AuthenticatedDevice(device): AuthenticatedDevice,
    Path(artifact): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let id = uuid("artifact", &artifact)?;
    // Looked up under the device's own tenant: another tenant's artifact is not found.
    let artifact = gw.artifacts.get(device.tenant_id, id).await?;
    let size = artifact.size;
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(value) => match value.to_str().ok().and_then(|v| parse_range(v, size)) {
            Some(range) => Some(range),
            None => {
                return Ok((
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                )
                    .into_response());
            }
        },
    };
    let (start, end) = range.unwrap_or((0, size.saturating_sub(1)));
    let length = end + 1 - start;
    let body = Body::from_stream(gw.artifacts.read(&artifact, start, end).await?);
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, length)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{}\"", artifact.sha256));
    response = match range {
        Some(_) => response
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}")),
        None => response.status(StatusCode::OK),
    };
    response
        .body(body)
        .map_err(|e| ApiError::new(tern_core::ErrorCode::Internal, e.to_string()))
}

/// One range `bytes=START-` or `bytes=START-END` within `size` bytes, as inclusive bounds.
fn parse_range(value: &str, size: u64) -> Option<(u64, u64)> {
    let (start, end) = value.strip_prefix("bytes=")?.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => size.checked_sub(1)?,
        end => end.parse::<u64>().ok()?.min(size.checked_sub(1)?),
    };
    (start <= end).then_some((start, end))
}

// === campaigns ===

pub(crate) async fn create_campaign(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<NewCampaign>,
) -> ApiResult<(StatusCode, Json<Campaign>)> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let campaign = gw.campaigns.create(tenant.id, body).await?;
    tracing::info!(tenant = %tenant.id, campaign = %campaign.id, devices = campaign.counts.total, "OTA campaign created");
    Ok((StatusCode::CREATED, Json(campaign)))
}

#[derive(Serialize)]
pub(crate) struct CampaignList {
    campaigns: Vec<Campaign>,
}

pub(crate) async fn list_campaigns(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path(tenant): Path<String>,
) -> ApiResult<Json<CampaignList>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    Ok(Json(CampaignList {
        campaigns: gw.campaigns.list(tenant.id).await?,
    }))
}

#[derive(Serialize)]
pub(crate) struct CampaignDetail {
    #[serde(flatten)]
    campaign: Campaign,
    devices: Vec<Target>,
}

pub(crate) async fn show_campaign(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, campaign)): Path<(String, String)>,
) -> ApiResult<Json<CampaignDetail>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let id = uuid("campaign", &campaign)?;
    Ok(Json(CampaignDetail {
        campaign: gw.campaigns.get(tenant.id, id).await?,
        devices: gw.campaigns.targets(tenant.id, id).await?,
    }))
}

/// `POST .../campaigns/{campaign}/{pause|resume|abort}`.
pub(crate) async fn control_campaign(
    State(gw): Shared,
    Authenticated(caller): Authenticated,
    Path((tenant, campaign, action)): Path<(String, String, String)>,
) -> ApiResult<Json<Campaign>> {
    let tenant = gw.registry.tenant_for(caller, &tenant).await?;
    let id = uuid("campaign", &campaign)?;
    let campaign = match action.as_str() {
        "pause" => gw.campaigns.pause(tenant.id, id).await?,
        "resume" => gw.campaigns.resume(tenant.id, id).await?,
        "abort" => gw.campaigns.abort(tenant.id, id).await?,
        _ => {
            return Err(ApiError::not_found(format!(
                "no campaign action {action:?} (pause, resume, abort)"
            )));
        }
    };
    Ok(Json(campaign))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_are_single_and_within_the_file() {
        assert_eq!(parse_range("bytes=100-", 1000), Some((100, 999)));
        assert_eq!(parse_range("bytes=0-9", 1000), Some((0, 9)));
        assert_eq!(parse_range("bytes=990-2000", 1000), Some((990, 999)));
        assert_eq!(parse_range("bytes=1000-", 1000), None);
        assert_eq!(parse_range("bytes=5-1", 1000), None);
        assert_eq!(
            parse_range("bytes=-5", 1000),
            None,
            "suffix ranges are not offered"
        );
        assert_eq!(parse_range("items=1-2", 1000), None);
    }
}
