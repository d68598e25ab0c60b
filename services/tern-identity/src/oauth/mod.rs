//! The OAuth 2.0 authorization server and OpenID Connect provider, one issuer per tenant
//! (`{public_url}/oauth2/{tenant}`):
//!
//! - `client_credentials` for services (RFC 6749 4.4);
//! - the device authorization grant for headless devices (RFC 8628, `device.rs`);
//! - `authorization_code` with PKCE S256 for people (RFC 7636, `code.rs`), with ID tokens;
//! - `refresh_token` with rotation and reuse detection (`refresh.rs`, RFC 9700 4.14);
//! - introspection (RFC 7662) and revocation (RFC 7009).
//!
//! Access tokens are JWTs (RFC 9068) signed with the rotating Ed25519 keys (`keys.rs`);
//! `access.rs` signs and verifies them.

mod access;
mod code;
mod device;
mod refresh;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use serde::Serialize;
use tern_core::{Tenant, now_ms};
use tern_registry::Registry;
use tern_store::Store;

pub use access::{ApiPrincipal, PrincipalKind};
pub use code::{AuthorizationRequest, AuthorizeFailure, PendingAuthorization};
pub use device::{DeviceAuthorization, Enrolment};

use crate::clients::{Clients, GrantType, OAuthClient};
use crate::device_tokens::DeviceCredentials;
use crate::keys::Keyring;
use crate::notices::Notices;
use crate::scopes::{OPENID, Scopes};
use crate::users::{User, Users};
use crate::{IdentityConfig, IdentityError};

/// An error response of RFC 6749 5.2 (and of RFC 8628 3.5): the `error` code and a
/// description for the developer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}: {description}")]
pub struct OAuthError {
    pub error: &'static str,
    pub description: String,
}

impl OAuthError {
    pub fn new(error: &'static str, description: impl Into<String>) -> Self {
        Self {
            error,
            description: description.into(),
        }
    }

    pub fn invalid_request(description: impl Into<String>) -> Self {
        Self::new("invalid_request", description)
    }

    pub fn invalid_grant(description: impl Into<String>) -> Self {
        Self::new("invalid_grant", description)
    }

    pub fn invalid_client() -> Self {
        Self::new("invalid_client", "client authentication failed")
    }

    /// The HTTP status: 401 for client authentication, 500 for our own failures, else 400.
    pub fn status(&self) -> u16 {
        match self.error {
            "invalid_client" => 401,
            "server_error" => 500,
            _ => 400,
        }
    }
}

impl From<IdentityError> for OAuthError {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::Unauthenticated => Self::invalid_client(),
            IdentityError::Invalid(v) => Self::invalid_request(v.to_string()),
            IdentityError::NotFound(what) => Self::invalid_request(format!("{what} not found")),
            other => {
                tracing::error!(error = %other, "authorization server failure");
                Self::new("server_error", "the authorization server failed; try again")
            }
        }
    }
}

/// The successful token response (RFC 6749 5.1).
#[derive(Debug, Clone, Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
    /// An enrolment's device (scope `tern:device`): the tokens are this device's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<tern_core::DeviceId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<tern_core::TenantId>,
}

/// Client authentication as presented: HTTP Basic or form fields.
#[derive(Debug, Clone, Default)]
pub struct ClientCredentials {
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
}

/// The parameters of a token request (`application/x-www-form-urlencoded`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct TokenRequest {
    pub grant_type: Option<String>,
    pub scope: Option<String>,
    pub code: Option<String>,
    pub redirect_uri: Option<String>,
    pub code_verifier: Option<String>,
    pub refresh_token: Option<String>,
    pub device_code: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
}

/// Who a token speaks for.
#[derive(Debug, Clone)]
pub(crate) enum Subject {
    /// A service, by its client id (client credentials).
    Client,
    /// A person who signed in.
    User(User),
}

/// Everything needed to mint a token set.
pub(crate) struct Grant<'a> {
    pub tenant: &'a Tenant,
    pub client: &'a OAuthClient,
    pub subject: Subject,
    pub scopes: Scopes,
    /// The refresh token family to continue, or start one (`None` and `with_refresh`).
    pub family: Option<String>,
    pub with_refresh: bool,
    pub nonce: Option<String>,
    pub auth_time_s: Option<i64>,
}

pub struct OAuth {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    keys: Arc<Keyring>,
    device_credentials: Arc<DeviceCredentials>,
    clients: Clients,
    users: Users,
    config: IdentityConfig,
    revocations: access::Revocations,
}

impl OAuth {
    /// Sends revocations to the other instances (the distributed mode); set once.
    pub(crate) fn set_notices(&self, notices: Arc<Notices>) {
        let _ = self.revocations.notices.set(notices);
    }

    #[cfg(test)]
    pub(crate) fn is_revoked(&self, id: &str) -> bool {
        self.revocations.is_revoked(id)
    }

    /// A revocation another instance stored.
    pub(crate) fn remember_revoked(&self, id: &str, expires_at_ms: i64) {
        self.revocations.remember(id, expires_at_ms);
    }
}

impl OAuth {
    pub(crate) async fn new(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        keys: Arc<Keyring>,
        device_credentials: Arc<DeviceCredentials>,
        config: IdentityConfig,
    ) -> Result<Self, IdentityError> {
        let users = Users::new(
            store.clone(),
            crate::users::Lockout {
                max_failures: config.max_failed_logins,
                lock_secs: config.lockout_secs,
            },
            config.ldap.clone().into_iter().collect(),
        );
        Ok(Self {
            clients: Clients::new(
                store.clone(),
                Some(format!("{}/", config.public_url.trim_end_matches('/'))),
            ),
            users,
            revocations: access::Revocations::load(store.clone()).await?,
            store,
            registry,
            keys,
            device_credentials,
            config,
        })
    }

    /// The tenant's OAuth clients.
    pub fn clients(&self) -> &Clients {
        &self.clients
    }

    /// The tenant's users.
    pub fn users(&self) -> &Users {
        &self.users
    }

    /// The issuer identifier of a tenant: `{public_url}/oauth2/{tenant name}`.
    pub fn issuer(&self, tenant: &Tenant) -> String {
        format!(
            "{}/oauth2/{}",
            self.config.public_url.trim_end_matches('/'),
            tenant.name
        )
    }

    /// The tenant an endpoint's path names (id or name).
    pub async fn tenant(&self, reference: &str) -> Result<Tenant, OAuthError> {
        self.registry
            .tenant(reference)
            .await
            .map_err(|_| OAuthError::invalid_request(format!("no tenant {reference:?}")))
    }

    /// Authenticates the client of a request (Basic or form; not both, RFC 6749 2.3.1).
    pub async fn authenticate_client(
        &self,
        tenant: &Tenant,
        credentials: &ClientCredentials,
    ) -> Result<OAuthClient, OAuthError> {
        let id = credentials
            .client_id
            .as_deref()
            .ok_or_else(|| OAuthError::new("invalid_client", "client_id is missing"))?;
        self.clients
            .authenticate(tenant.id, id, credentials.client_secret.as_deref())
            .await
            .map_err(|e| match e {
                IdentityError::Unauthenticated => OAuthError::invalid_client(),
                other => other.into(),
            })
    }

    /// The token endpoint (RFC 6749 3.2).
    pub async fn token(
        &self,
        tenant: &Tenant,
        credentials: &ClientCredentials,
        request: &TokenRequest,
    ) -> Result<TokenResponse, OAuthError> {
        let grant_type = request
            .grant_type
            .as_deref()
            .ok_or_else(|| OAuthError::invalid_request("grant_type is missing"))?;
        let grant = GrantType::parse(grant_type).ok_or_else(|| {
            OAuthError::new(
                "unsupported_grant_type",
                format!("grant_type {grant_type:?} is not supported"),
            )
        })?;
        let client = self.authenticate_client(tenant, credentials).await?;
        if !client.may_use(grant) {
            return Err(OAuthError::new(
                "unauthorized_client",
                format!("this client may not use the {} grant", grant.as_str()),
            ));
        }
        match grant {
            GrantType::ClientCredentials => {
                let scopes =
                    self.requested_scopes(request.scope.as_deref(), &client.allowed_scopes())?;
                self.issue(Grant {
                    tenant,
                    client: &client,
                    subject: Subject::Client,
                    scopes,
                    family: None,
                    with_refresh: false,
                    nonce: None,
                    auth_time_s: None,
                })
                .await
            }
            GrantType::AuthorizationCode => self.redeem_code(tenant, &client, request).await,
            GrantType::RefreshToken => self.refresh(tenant, &client, request).await,
            GrantType::DeviceCode => self.poll_device_code(tenant, &client, request).await,
        }
    }

    /// The scopes a request asks for, within `allowed`; no `scope` means all of `allowed`.
    fn requested_scopes(
        &self,
        scope: Option<&str>,
        allowed: &Scopes,
    ) -> Result<Scopes, OAuthError> {
        let Some(text) = scope.filter(|s| !s.trim().is_empty()) else {
            return Ok(allowed.clone());
        };
        let requested =
            Scopes::parse("scope", text).map_err(|e| OAuthError::new("invalid_scope", e.reason))?;
        if !requested.is_subset(allowed) {
            return Err(OAuthError::new(
                "invalid_scope",
                format!("this client may ask for at most: {allowed}"),
            ));
        }
        Ok(requested)
    }

    /// Mints an access token, and a refresh token and ID token where the grant calls for them.
    pub(crate) async fn issue(&self, grant: Grant<'_>) -> Result<TokenResponse, OAuthError> {
        let now_s = now_ms() / 1000;
        let ttl = self.config.access_token_ttl_secs;
        let family = match (&grant.family, grant.with_refresh) {
            (Some(f), _) => Some(f.clone()),
            (None, true) => Some(uuid::Uuid::new_v4().to_string()),
            (None, false) => None,
        };
        let access_token = self.sign_access_token(&grant, family.as_deref(), now_s)?;
        let refresh_token = match &family {
            Some(family) if grant.with_refresh => {
                Some(self.new_refresh_token(&grant, family).await?)
            }
            _ => None,
        };
        let id_token = match &grant.subject {
            Subject::User(user) if grant.scopes.contains(OPENID) => {
                Some(self.sign_id_token(&grant, user, now_s)?)
            }
            _ => None,
        };
        Ok(TokenResponse {
            access_token,
            token_type: "Bearer",
            expires_in: ttl,
            scope: grant.scopes.to_string(),
            refresh_token,
            id_token,
            device_id: None,
            tenant_id: None,
        })
    }

    /// The OpenID Provider metadata (OpenID Connect Discovery 1.0, RFC 8414).
    pub fn discovery(&self, tenant: &Tenant) -> serde_json::Value {
        let issuer = self.issuer(tenant);
        serde_json::json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/authorize"),
            "token_endpoint": format!("{issuer}/token"),
            "device_authorization_endpoint": format!("{issuer}/device_authorization"),
            "userinfo_endpoint": format!("{issuer}/userinfo"),
            "jwks_uri": format!("{issuer}/jwks.json"),
            "introspection_endpoint": format!("{issuer}/introspect"),
            "revocation_endpoint": format!("{issuer}/revoke"),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": [
                GrantType::AuthorizationCode.as_str(),
                GrantType::ClientCredentials.as_str(),
                GrantType::RefreshToken.as_str(),
                GrantType::DeviceCode.as_str(),
            ],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["EdDSA"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": crate::scopes::KNOWN,
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "tid",
                "preferred_username", "name", "email", "groups"],
        })
    }

    /// The public signing keys (`jwks_uri`).
    pub fn jwks(&self) -> serde_json::Value {
        self.keys.jwks()
    }
}
