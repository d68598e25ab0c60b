//! The authorization server's HTTP endpoints, under `/oauth2/{tenant}` (the tenant's issuer),
//! plus `/.well-known/jwks.json`. Errors follow RFC 6749 5.2 (`{"error", "error_description"}`),
//! not the REST API's shape, because OAuth client libraries parse them.
//!
//! The sign-in and device approval pages are plain server-rendered forms: no script, a CSP that
//! allows nothing to load, and no framing (clickjacking).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use tern_core::Tenant;

use crate::oauth::{
    AuthorizationRequest, AuthorizeFailure, ClientCredentials, OAuthError, PendingAuthorization,
    TokenRequest,
};
use crate::{Identity, OAuthClient};

/// The routes; merge them into the HTTP server.
pub fn router(identity: Arc<Identity>) -> Router {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/oauth2/{tenant}/jwks.json", get(jwks))
        .route(
            "/oauth2/{tenant}/.well-known/openid-configuration",
            get(discovery),
        )
        .route("/oauth2/{tenant}/token", post(token))
        .route(
            "/oauth2/{tenant}/device_authorization",
            post(device_authorization),
        )
        .route(
            "/oauth2/{tenant}/device",
            get(device_page).post(device_decision),
        )
        .route(
            "/oauth2/{tenant}/authorize",
            get(authorize_page).post(authorize_submit),
        )
        .route("/oauth2/{tenant}/introspect", post(introspect))
        .route("/oauth2/{tenant}/revoke", post(revoke))
        .route("/oauth2/{tenant}/userinfo", get(userinfo).post(userinfo))
        .with_state(identity)
}

/// An OAuth error response.
struct ErrorResponse {
    error: OAuthError,
    /// Whether the client authenticated with HTTP Basic (then a 401 names the scheme).
    basic: bool,
}

impl From<OAuthError> for ErrorResponse {
    fn from(error: OAuthError) -> Self {
        Self {
            error,
            basic: false,
        }
    }
}

impl IntoResponse for ErrorResponse {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.error.status()).unwrap_or(StatusCode::BAD_REQUEST);
        let body = Json(serde_json::json!({
            "error": self.error.error,
            "error_description": self.error.description,
        }));
        let mut response = (status, no_store(), body).into_response();
        if status == StatusCode::UNAUTHORIZED && self.basic {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"tern\""),
            );
        }
        response
    }
}

/// Token responses must not be cached (RFC 6749 5.1).
fn no_store() -> [(header::HeaderName, &'static str); 2] {
    [
        (header::CACHE_CONTROL, "no-store"),
        (header::PRAGMA, "no-cache"),
    ]
}

async fn tenant(identity: &Identity, reference: &str) -> Result<Tenant, ErrorResponse> {
    identity
        .oauth()
        .tenant(reference)
        .await
        .map_err(ErrorResponse::from)
}

/// Client authentication from HTTP Basic (RFC 6749 2.3.1, form-encoded id and secret) or the
/// form; using both is an error.
fn client_credentials(
    headers: &HeaderMap,
    form_id: Option<&str>,
    form_secret: Option<&str>,
) -> Result<(ClientCredentials, bool), ErrorResponse> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Basic "));
    let Some(encoded) = basic else {
        let credentials = ClientCredentials {
            client_id: form_id.map(str::to_string),
            client_secret: form_secret.map(str::to_string),
        };
        return Ok((credentials, false));
    };
    let bad = |what: &str| ErrorResponse {
        error: OAuthError::new("invalid_client", what.to_string()),
        basic: true,
    };
    if form_secret.is_some() {
        return Err(ErrorResponse {
            error: OAuthError::invalid_request("use one client authentication method, not two"),
            basic: true,
        });
    }
    let decoded = STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| bad("the Basic credentials are not base64"))?;
    let (id, secret) = decoded
        .split_once(':')
        .ok_or_else(|| bad("the Basic credentials are not id:secret"))?;
    let decode = |s: &str| {
        serde_urlencoded::from_str::<Vec<(String, String)>>(&format!("v={s}"))
            .ok()
            .and_then(|mut v| v.pop())
            .map(|(_, v)| v)
            .unwrap_or_default()
    };
    let credentials = ClientCredentials {
        client_id: Some(decode(id)),
        client_secret: Some(decode(secret)),
    };
    Ok((credentials, true))
}

async fn jwks(State(identity): State<Arc<Identity>>) -> Response {
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        Json(identity.oauth().jwks()),
    )
        .into_response()
}

async fn discovery(
    State(identity): State<Arc<Identity>>,
    Path(reference): Path<String>,
) -> Result<Json<serde_json::Value>, ErrorResponse> {
    let tenant = tenant(&identity, &reference).await?;
    Ok(Json(identity.oauth().discovery(&tenant)))
}

async fn token(
    State(identity): State<Arc<Identity>>,
    Path(reference): Path<String>,
    headers: HeaderMap,
    Form(request): Form<TokenRequest>,
) -> Result<Response, ErrorResponse> {
    let tenant = tenant(&identity, &reference).await?;
    let (credentials, basic) = client_credentials(
        &headers,
        request.client_id.as_deref(),
        request.client_secret.as_deref(),
    )?;
    match identity
        .oauth()
        .token(&tenant, &credentials, &request)
        .await
    {
        Ok(response) => Ok((no_store(), Json(response)).into_response()),
        Err(error) => Err(ErrorResponse { error, basic }),
    }
}

#[derive(Deserialize)]
struct DeviceAuthorizationForm {
    client_id: Option<String>,
    client_secret: Option<String>,
    scope: Option<String>,
}

async fn device_authorization(
    State(identity): State<Arc<Identity>>,
    Path(reference): Path<String>,
    headers: HeaderMap,
    Form(form): Form<DeviceAuthorizationForm>,
) -> Result<Response, ErrorResponse> {
    let tenant = tenant(&identity, &reference).await?;
    let (credentials, basic) = client_credentials(
        &headers,
        form.client_id.as_deref(),
        form.client_secret.as_deref(),
    )?;
    match identity
        .oauth()
        .device_authorization(&tenant, &credentials, form.scope.as_deref())
        .await
    {
        Ok(response) => Ok((no_store(), Json(response)).into_response()),
        Err(error) => Err(ErrorResponse { error, basic }),
    }
}

#[derive(Deserialize)]
struct TokenForm {
    token: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

/// The tenant, the authenticated client and the token of an introspection or revocation
/// request (both need client authentication).
async fn token_request(
    identity: &Identity,
    reference: &str,
    headers: &HeaderMap,
    form: TokenForm,
) -> Result<(Tenant, OAuthClient, String, bool), ErrorResponse> {
    let tenant = tenant(identity, reference).await?;
    let (credentials, basic) = client_credentials(
        headers,
        form.client_id.as_deref(),
        form.client_secret.as_deref(),
    )?;
    let client = identity
        .oauth()
        .authenticate_client(&tenant, &credentials)
        .await
        .map_err(|error| ErrorResponse { error, basic })?;
    let token = form
        .token
        .ok_or_else(|| OAuthError::invalid_request("token is missing"))?;
    Ok((tenant, client, token, basic))
}

/// Introspection needs an authenticated client (RFC 7662 2.1): a confidential one.
async fn introspect(
    State(identity): State<Arc<Identity>>,
    Path(reference): Path<String>,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Result<Response, ErrorResponse> {
    let (tenant, client, token, basic) =
        token_request(&identity, &reference, &headers, form).await?;
    if !client.confidential {
        return Err(ErrorResponse {
            error: OAuthError::new(
                "unauthorized_client",
                "introspection needs a confidential client",
            ),
            basic,
        });
    }
    let answer = identity.oauth().introspect(&tenant, &token).await?;
    Ok((no_store(), Json(answer)).into_response())
}

async fn revoke(
    State(identity): State<Arc<Identity>>,
    Path(reference): Path<String>,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Result<StatusCode, ErrorResponse> {
    let (tenant, client, token, _) = token_request(&identity, &reference, &headers, form).await?;
    identity
        .oauth()
        .revoke(&tenant, &client.client_id, &token)
        .await?;
    Ok(StatusCode::OK)
}

async fn userinfo(
    State(identity): State<Arc<Identity>>,
    Path(reference): Path<String>,
    headers: HeaderMap,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim);
    let challenge = |error: &str| {
        (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                format!("Bearer realm=\"tern\", error=\"{error}\""),
            )],
        )
            .into_response()
    };
    let Some(token) = bearer else {
        return challenge("invalid_request");
    };
    let Ok(tenant) = identity.oauth().tenant(&reference).await else {
        return challenge("invalid_token");
    };
    match identity.oauth().userinfo(token).await {
        Ok(claims) if claims["tid"] == tenant.id.to_string() => Json(claims).into_response(),
        Ok(_) => challenge("invalid_token"),
        Err(crate::IdentityError::Forbidden(_)) => (
            StatusCode::FORBIDDEN,
            [(
                header::WWW_AUTHENTICATE,
                "Bearer realm=\"tern\", error=\"insufficient_scope\", scope=\"openid\"".to_string(),
            )],
        )
            .into_response(),
        Err(_) => challenge("invalid_token"),
    }
}

// ---- pages: authorization code sign-in, device approval ----

/// The headers of every page: nothing may load, nothing may frame it.
fn page(status: StatusCode, title: &str, body: String) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{}</title></head>\
         <body><main><h1>{}</h1>{body}</main></body></html>",
        escape(title),
        escape(title)
    );
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; frame-ancestors 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        html,
    )
        .into_response()
}

fn error_page(error: &OAuthError) -> Response {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::BAD_REQUEST);
    page(
        status,
        "Sign-in failed",
        format!(
            "<p id=\"error\">{}: {}</p>",
            escape(error.error),
            escape(&error.description)
        ),
    )
}

fn sign_in_form(tenant: &Tenant, pending: &PendingAuthorization, failed: bool) -> Response {
    let notice = if failed {
        "<p id=\"error\">Wrong username or password, or the account is locked.</p>"
    } else {
        ""
    };
    let body = format!(
        "<p><b>{client}</b> asks to act for you in <b>{tenant}</b> with: {scope}</p>{notice}\
         <form method=\"post\">\
         <input type=\"hidden\" name=\"request_id\" value=\"{id}\">\
         <p><label>Username <input name=\"username\" autocomplete=\"username\" required></label></p>\
         <p><label>Password <input name=\"password\" type=\"password\" autocomplete=\"current-password\" required></label></p>\
         <p><button name=\"action\" value=\"approve\">Sign in and allow</button> \
         <button name=\"action\" value=\"deny\" formnovalidate>Cancel</button></p></form>",
        client = escape(&pending.client_name),
        tenant = escape(&tenant.name),
        scope = escape(&pending.scope),
        id = escape(&pending.request_id),
    );
    page(StatusCode::OK, "Sign in to Tern", body)
}

async fn authorize_page(
    State(identity): State<Arc<Identity>>,
    Path(reference): Path<String>,
    Query(request): Query<AuthorizationRequest>,
) -> Response {
    let tenant = match identity.oauth().tenant(&reference).await {
        Ok(t) => t,
        Err(e) => return error_page(&e),
    };
    match identity
        .oauth()
        .begin_authorization(&tenant, &request)
        .await
    {
        Ok(pending) => sign_in_form(&tenant, &pending, false),
        Err(failure) => authorize_failure(&tenant, failure),
    }
}

fn authorize_failure(tenant: &Tenant, failure: AuthorizeFailure) -> Response {
    match failure {
        AuthorizeFailure::Page(error) => error_page(&error),
        AuthorizeFailure::Redirect(url) => Redirect::to(&url).into_response(),
        AuthorizeFailure::SignInFailed(pending) => {
            let mut response = sign_in_form(tenant, &pending, true);
            *response.status_mut() = StatusCode::UNAUTHORIZED;
            response
        }
    }
}

#[derive(Deserialize)]
struct SignInForm {
    request_id: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    action: String,
}

async fn authorize_submit(
    State(identity): State<Arc<Identity>>,
    Path(reference): Path<String>,
    Form(form): Form<SignInForm>,
) -> Response {
    let tenant = match identity.oauth().tenant(&reference).await {
        Ok(t) => t,
        Err(e) => return error_page(&e),
    };
    let approve = form.action == "approve";
    match identity
        .oauth()
        .complete_authorization(
            &tenant,
            &form.request_id,
            &form.username,
            &form.password,
            approve,
        )
        .await
    {
        // 303: the browser follows with a GET, without re-posting the password.
        Ok(url) => Redirect::to(&url).into_response(),
        Err(failure) => authorize_failure(&tenant, failure),
    }
}

#[derive(Deserialize)]
struct UserCodeQuery {
    user_code: Option<String>,
}

async fn device_page(
    State(identity): State<Arc<Identity>>,
    Path(reference): Path<String>,
    Query(query): Query<UserCodeQuery>,
) -> Response {
    let tenant = match identity.oauth().tenant(&reference).await {
        Ok(t) => t,
        Err(e) => return error_page(&e),
    };
    device_form(&tenant, query.user_code.as_deref().unwrap_or(""), None)
}

fn device_form(tenant: &Tenant, user_code: &str, error: Option<&str>) -> Response {
    let notice = error
        .map(|e| format!("<p id=\"error\">{}</p>", escape(e)))
        .unwrap_or_default();
    let body = format!(
        "<p>Enter the code your device shows to let it act for you in <b>{tenant}</b>.</p>{notice}\
         <form method=\"post\">\
         <p><label>Code <input name=\"user_code\" value=\"{code}\" required></label></p>\
         <p><label>Username <input name=\"username\" autocomplete=\"username\" required></label></p>\
         <p><label>Password <input name=\"password\" type=\"password\" autocomplete=\"current-password\" required></label></p>\
         <p><button name=\"action\" value=\"approve\">Allow</button> \
         <button name=\"action\" value=\"deny\">Deny</button></p></form>",
        tenant = escape(&tenant.name),
        code = escape(user_code),
    );
    let status = if error.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    page(status, "Connect a device", body)
}

#[derive(Deserialize)]
struct DeviceDecisionForm {
    user_code: String,
    username: String,
    password: String,
    action: String,
}

/// The person's answer. Browsers get a page; `Accept: application/json` (the CLI) gets JSON.
async fn device_decision(
    State(identity): State<Arc<Identity>>,
    Path(reference): Path<String>,
    headers: HeaderMap,
    Form(form): Form<DeviceDecisionForm>,
) -> Response {
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|a| a.contains("application/json"));
    let tenant = match identity.oauth().tenant(&reference).await {
        Ok(t) => t,
        Err(e) if wants_json => return ErrorResponse::from(e).into_response(),
        Err(e) => return error_page(&e),
    };
    let approve = form.action == "approve";
    let result = identity
        .oauth()
        .decide_device_code(
            &tenant,
            &form.user_code,
            &form.username,
            &form.password,
            approve,
        )
        .await;
    match (result, wants_json) {
        (Ok(client), true) => Json(serde_json::json!({
            "user_code": form.user_code,
            "approved": approve,
            "client": client,
        }))
        .into_response(),
        (Ok(client), false) => {
            let verb = if approve {
                "may now act for you"
            } else {
                "was denied"
            };
            page(
                StatusCode::OK,
                "Done",
                format!(
                    "<p id=\"result\">{} {verb}. You can close this page.</p>",
                    escape(&client)
                ),
            )
        }
        (Err(e), true) => {
            let status = match e.code() {
                tern_core::ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
                tern_core::ErrorCode::NotFound => StatusCode::NOT_FOUND,
                tern_core::ErrorCode::Conflict => StatusCode::CONFLICT,
                tern_core::ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                tern_core::ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            };
            (
                status,
                Json(serde_json::json!({ "error": { "message": e.to_string() } })),
            )
                .into_response()
        }
        (Err(e), false) => {
            let message = match e {
                crate::IdentityError::Unauthenticated => {
                    "Wrong username or password, or the account is locked.".to_string()
                }
                other => other.to_string(),
            };
            device_form(&tenant, &form.user_code, Some(&message))
        }
    }
}

/// HTML-escapes text for element content and quoted attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            escape("<b a=\"x\">&'"),
            "&lt;b a=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn basic_credentials_are_form_decoded_and_exclusive_with_the_form() {
        let mut headers = HeaderMap::new();
        let encoded = STANDARD.encode("my%3Aid:p%40ss+word");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).expect("header"),
        );
        let (c, basic) = client_credentials(&headers, None, None)
            .ok()
            .expect("basic");
        assert!(basic);
        assert_eq!(c.client_id.as_deref(), Some("my:id"));
        assert_eq!(c.client_secret.as_deref(), Some("p@ss word"));
        assert!(client_credentials(&headers, None, Some("x")).is_err());
    }
}
