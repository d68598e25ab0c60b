//! Access tokens (RFC 9068 JWTs), ID tokens, their verification, introspection (RFC 7662),
//! revocation (RFC 7009) and userinfo.
//!
//! A JWT is verified without a lookup, so revoking one puts its `jti` (or, for a reused refresh
//! token, its whole family) on a deny list that every verification consults until the token
//! would have expired anyway.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use jsonwebtoken::{Algorithm, Validation};
use serde::{Deserialize, Serialize};
use tern_core::{Caller, Tenant, TenantId, now_ms};
use tern_store::Store;

use super::{Grant, OAuth, OAuthError, Subject};
use crate::IdentityError;
use crate::notices::{Notice, Notices};
use crate::records;
use crate::scopes::{EMAIL, OPENID, PROFILE, Scopes};
use crate::users::User;

/// The audience of every API access token.
pub(crate) const API_AUDIENCE: &str = "tern-api";
const REVOKED: &str = "oauth_revoked";

#[derive(Debug, Serialize, Deserialize)]
struct AccessClaims {
    iss: String,
    sub: String,
    aud: String,
    exp: i64,
    iat: i64,
    jti: String,
    client_id: String,
    scope: String,
    /// The tenant.
    tid: String,
    /// The refresh token family this token descends from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fam: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    preferred_username: Option<String>,
}

#[derive(Debug, Serialize)]
struct IdClaims<'a> {
    iss: String,
    sub: &'a str,
    aud: &'a str,
    exp: i64,
    iat: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce: Option<&'a str>,
    tid: String,
    #[serde(flatten)]
    profile: serde_json::Map<String, serde_json::Value>,
}

/// What kind of credential an API caller presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    Operator,
    ApiToken,
    /// An OAuth token of a person.
    User,
    /// An OAuth token of a service (client credentials).
    Client,
}

/// Who a verified API access token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiPrincipal {
    pub caller: Caller,
    pub kind: PrincipalKind,
    pub scopes: Scopes,
    /// The user id, the client id of a service, the API token's id, or `operator`.
    pub subject: String,
    pub client_id: Option<String>,
}

/// Revoked token ids and families, kept until the tokens would have expired.
pub(crate) struct Revocations {
    store: Arc<dyn Store>,
    /// id → expiry (ms).
    ids: RwLock<HashMap<String, i64>>,
    /// Where other instances hear of revocations (the distributed mode).
    pub notices: OnceLock<Arc<Notices>>,
}

impl Revocations {
    pub async fn load(store: Arc<dyn Store>) -> Result<Self, IdentityError> {
        let now = now_ms();
        let mut ids = HashMap::new();
        for (id, expires) in records::list::<i64>(&*store, REVOKED, "").await? {
            if expires > now {
                ids.insert(id, expires);
            } else {
                store.delete_record(REVOKED, &id).await?;
            }
        }
        Ok(Self {
            store,
            ids: RwLock::new(ids),
            notices: OnceLock::new(),
        })
    }

    pub async fn revoke(&self, id: &str, expires_at_ms: i64) -> Result<(), IdentityError> {
        records::put(&*self.store, REVOKED, id, &expires_at_ms).await?;
        self.remember(id, expires_at_ms);
        if let Some(notices) = self.notices.get() {
            notices
                .send(Notice::Revoked {
                    id: id.to_string(),
                    expires_at_ms,
                })
                .await?;
        }
        Ok(())
    }

    /// Adds to the deny list in memory (another instance stored the revocation).
    pub fn remember(&self, id: &str, expires_at_ms: i64) {
        let now = now_ms();
        if expires_at_ms <= now {
            return;
        }
        let mut ids = self.ids.write().unwrap_or_else(|e| e.into_inner());
        ids.retain(|_, exp| *exp > now);
        ids.insert(id.to_string(), expires_at_ms);
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        self.ids
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }
}

/// The profile claims of a user the scopes allow (ID token, userinfo).
fn profile_claims(user: &User, scopes: &Scopes) -> serde_json::Map<String, serde_json::Value> {
    let mut claims = serde_json::Map::new();
    if scopes.contains(PROFILE) || scopes.contains(OPENID) {
        claims.insert("preferred_username".into(), user.name.clone().into());
    }
    if scopes.contains(PROFILE) {
        claims.insert("name".into(), user.name.clone().into());
        claims.insert("groups".into(), user.groups.clone().into());
    }
    if scopes.contains(EMAIL) {
        if let Some(email) = &user.email {
            claims.insert("email".into(), email.clone().into());
        }
    }
    claims
}

impl OAuth {
    pub(super) fn sign_access_token(
        &self,
        grant: &Grant<'_>,
        family: Option<&str>,
        now_s: i64,
    ) -> Result<String, OAuthError> {
        let (sub, username) = match &grant.subject {
            Subject::Client => (grant.client.client_id.clone(), None),
            Subject::User(user) => (user.id.clone(), Some(user.name.clone())),
        };
        let claims = AccessClaims {
            iss: self.issuer(grant.tenant),
            sub,
            aud: API_AUDIENCE.into(),
            exp: now_s + self.config.access_token_ttl_secs as i64,
            iat: now_s,
            jti: uuid::Uuid::new_v4().to_string(),
            client_id: grant.client.client_id.clone(),
            scope: grant.scopes.to_string(),
            tid: grant.tenant.id.to_string(),
            fam: family.map(str::to_string),
            preferred_username: username,
        };
        Ok(self.keys.sign("at+jwt", &claims)?)
    }

    pub(super) fn sign_id_token(
        &self,
        grant: &Grant<'_>,
        user: &User,
        now_s: i64,
    ) -> Result<String, OAuthError> {
        let claims = IdClaims {
            iss: self.issuer(grant.tenant),
            sub: &user.id,
            aud: &grant.client.client_id,
            exp: now_s + self.config.access_token_ttl_secs as i64,
            iat: now_s,
            auth_time: grant.auth_time_s,
            nonce: grant.nonce.as_deref(),
            tid: grant.tenant.id.to_string(),
            profile: profile_claims(user, &grant.scopes),
        };
        Ok(self.keys.sign("JWT", &claims)?)
    }

    /// Verifies an API access token: signature by a published key, `alg` EdDSA (so never
    /// `none`), audience, expiry, the issuer of the tenant it names, and not revoked.
    pub async fn verify_access_token(&self, token: &str) -> Result<ApiPrincipal, IdentityError> {
        let claims = self.decode_access_token(token).await?;
        let tenant_id = TenantId::parse(&claims.tid).map_err(|_| IdentityError::Unauthenticated)?;
        let tenant = self
            .registry
            .tenant(&tenant_id.to_string())
            .await
            .map_err(|_| IdentityError::Unauthenticated)?;
        if claims.iss != self.issuer(&tenant) {
            tracing::info!(%tenant_id, "access token refused: issuer is not its tenant's");
            return Err(IdentityError::Unauthenticated);
        }
        if self.revocations.is_revoked(&claims.jti)
            || claims
                .fam
                .as_deref()
                .is_some_and(|f| self.revocations.is_revoked(f))
        {
            tracing::info!(%tenant_id, "access token refused: revoked");
            return Err(IdentityError::Unauthenticated);
        }
        let scopes =
            Scopes::parse("scope", &claims.scope).map_err(|_| IdentityError::Unauthenticated)?;
        let kind = if claims.sub == claims.client_id {
            PrincipalKind::Client
        } else {
            PrincipalKind::User
        };
        Ok(ApiPrincipal {
            caller: Caller::Tenant(tenant_id),
            kind,
            scopes,
            subject: claims.sub,
            client_id: Some(claims.client_id),
        })
    }

    async fn decode_access_token(&self, token: &str) -> Result<AccessClaims, IdentityError> {
        let key = match self.keys.decoding_key(token) {
            Some(key) => key,
            None => {
                // Perhaps another instance rotated; look once more.
                self.keys.reload().await?;
                self.keys
                    .decoding_key(token)
                    .ok_or(IdentityError::Unauthenticated)?
            }
        };
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[API_AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 0;
        jsonwebtoken::decode::<AccessClaims>(token.as_bytes(), &key, &validation)
            .map(|data| data.claims)
            .map_err(|e| {
                tracing::debug!(error = %e, "access token refused");
                IdentityError::Unauthenticated
            })
    }

    /// Token introspection (RFC 7662) for an authenticated client of `tenant`: active access
    /// tokens and refresh tokens of this tenant; everything else is `{"active": false}`.
    pub async fn introspect(
        &self,
        tenant: &Tenant,
        token: &str,
    ) -> Result<serde_json::Value, OAuthError> {
        let inactive = serde_json::json!({ "active": false });
        if let Ok(principal) = self.verify_access_token(token).await {
            if principal.caller != Caller::Tenant(tenant.id) {
                return Ok(inactive);
            }
            let claims = self.decode_access_token(token).await?;
            return Ok(serde_json::json!({
                "active": true,
                "token_type": "Bearer",
                "scope": claims.scope,
                "client_id": claims.client_id,
                "username": claims.preferred_username,
                "sub": claims.sub,
                "aud": claims.aud,
                "iss": claims.iss,
                "exp": claims.exp,
                "iat": claims.iat,
                "jti": claims.jti,
                "tid": claims.tid,
            }));
        }
        if let Some(record) = self.live_refresh_token(token).await? {
            if record.tenant_id == tenant.id {
                return Ok(serde_json::json!({
                    "active": true,
                    "token_type": "refresh_token",
                    "scope": record.scope,
                    "client_id": record.client_id,
                    "sub": record.subject,
                    "exp": record.expires_at_ms / 1000,
                    "iss": self.issuer(tenant),
                    "tid": tenant.id.to_string(),
                }));
            }
        }
        Ok(inactive)
    }

    /// Token revocation (RFC 7009): a refresh token revokes its whole family, an access token
    /// its `jti`. Unknown tokens and tokens of other clients are ignored (the answer is the
    /// same 200, which reveals nothing).
    pub async fn revoke(
        &self,
        tenant: &Tenant,
        client_id: &str,
        token: &str,
    ) -> Result<(), OAuthError> {
        if let Some(record) = self.live_refresh_token(token).await? {
            if record.tenant_id == tenant.id && record.client_id == client_id {
                self.revoke_family(&record.family, record.expires_at_ms)
                    .await?;
            }
            return Ok(());
        }
        if let Ok(claims) = self.decode_access_token(token).await {
            if claims.tid == tenant.id.to_string() && claims.client_id == client_id {
                self.revocations
                    .revoke(&claims.jti, claims.exp * 1000)
                    .await?;
            }
        }
        Ok(())
    }

    pub(crate) async fn revoke_id(
        &self,
        id: &str,
        expires_at_ms: i64,
    ) -> Result<(), IdentityError> {
        self.revocations.revoke(id, expires_at_ms).await
    }

    /// The OpenID Connect userinfo response for a user's access token with `openid`.
    pub async fn userinfo(&self, token: &str) -> Result<serde_json::Value, IdentityError> {
        let principal = self.verify_access_token(token).await?;
        let Caller::Tenant(tenant) = principal.caller else {
            return Err(IdentityError::Unauthenticated);
        };
        if !principal.scopes.contains(OPENID) {
            return Err(IdentityError::Forbidden(
                "read userinfo without the openid scope".into(),
            ));
        }
        let user = self
            .users
            .get(tenant, &principal.subject)
            .await
            .map_err(|_| IdentityError::Unauthenticated)?;
        let mut claims = profile_claims(&user, &principal.scopes);
        claims.insert("sub".into(), user.id.into());
        claims.insert("tid".into(), tenant.to_string().into());
        Ok(serde_json::Value::Object(claims))
    }
}
