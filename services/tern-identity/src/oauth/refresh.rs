//! Refresh tokens with rotation and reuse detection (RFC 9700 4.14.2): every use returns a new
//! refresh token of the same family and spends the old one; presenting a spent token means it
//! leaked, so the whole family is revoked, access tokens included.

use serde::{Deserialize, Serialize};
use tern_core::{Tenant, TenantId, now_ms};

use super::{Grant, OAuth, OAuthError, Subject, TokenRequest, TokenResponse};
use crate::clients::OAuthClient;
use crate::records;
use crate::secrets::{new_token, token_hash};

const REFRESH: &str = "oauth_refresh";
const FAMILY: &str = "oauth_family";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RefreshRecord {
    pub family: String,
    pub tenant_id: TenantId,
    pub client_id: String,
    /// The user id.
    pub subject: String,
    pub scope: String,
    pub auth_time_s: Option<i64>,
    pub expires_at_ms: i64,
    /// Spent by a rotation: kept only to recognise reuse.
    pub spent: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct FamilyRecord {
    revoked: bool,
    expires_at_ms: i64,
}

impl OAuth {
    pub(super) async fn new_refresh_token(
        &self,
        grant: &Grant<'_>,
        family: &str,
    ) -> Result<String, OAuthError> {
        let Subject::User(user) = &grant.subject else {
            return Err(OAuthError::invalid_request(
                "refresh tokens are for users only",
            ));
        };
        let token = new_token("tern_rt_")?;
        let now = now_ms();
        let expires_at_ms = match records::get::<FamilyRecord>(&*self.store, FAMILY, family).await?
        {
            Some(existing) => existing.expires_at_ms,
            None => {
                // The family lives as long as the first token; rotation does not extend it.
                let expires_at_ms = now + self.config.refresh_token_ttl_secs as i64 * 1000;
                let record = FamilyRecord {
                    revoked: false,
                    expires_at_ms,
                };
                records::put(&*self.store, FAMILY, family, &record).await?;
                expires_at_ms
            }
        };
        let record = RefreshRecord {
            family: family.to_string(),
            tenant_id: grant.tenant.id,
            client_id: grant.client.client_id.clone(),
            subject: user.id.clone(),
            scope: grant.scopes.to_string(),
            auth_time_s: grant.auth_time_s,
            expires_at_ms,
            spent: false,
        };
        records::put(&*self.store, REFRESH, &token_hash(&token), &record).await?;
        Ok(token)
    }

    /// A refresh token that can still be used (introspection, revocation).
    pub(super) async fn live_refresh_token(
        &self,
        token: &str,
    ) -> Result<Option<RefreshRecord>, OAuthError> {
        let Some(record) =
            records::get::<RefreshRecord>(&*self.store, REFRESH, &token_hash(token)).await?
        else {
            return Ok(None);
        };
        let family = records::get::<FamilyRecord>(&*self.store, FAMILY, &record.family).await?;
        let live =
            !record.spent && record.expires_at_ms > now_ms() && family.is_some_and(|f| !f.revoked);
        Ok(live.then_some(record))
    }

    pub(super) async fn revoke_family(
        &self,
        family: &str,
        expires_at_ms: i64,
    ) -> Result<(), OAuthError> {
        let record = FamilyRecord {
            revoked: true,
            expires_at_ms,
        };
        records::put(&*self.store, FAMILY, family, &record).await?;
        // Access tokens of the family carry its id: refuse them too.
        self.revoke_id(family, expires_at_ms).await?;
        Ok(())
    }

    /// A spent refresh token came back: its whole family is revoked (RFC 9700 4.14.2).
    async fn refresh_reused(
        &self,
        tenant: &Tenant,
        client: &OAuthClient,
        record: &RefreshRecord,
    ) -> OAuthError {
        tracing::warn!(tenant = %tenant.id, client_id = %client.client_id, family = %record.family,
            "refresh token reused: revoking its family");
        if let Err(e) = self
            .revoke_family(&record.family, record.expires_at_ms)
            .await
        {
            return e;
        }
        OAuthError::invalid_grant("the refresh token was already used; its family is revoked")
    }

    /// The `refresh_token` grant.
    pub(super) async fn refresh(
        &self,
        tenant: &Tenant,
        client: &OAuthClient,
        request: &TokenRequest,
    ) -> Result<TokenResponse, OAuthError> {
        let token = request
            .refresh_token
            .as_deref()
            .ok_or_else(|| OAuthError::invalid_request("refresh_token is missing"))?;
        let key = token_hash(token);
        let Some(read) =
            records::get_versioned::<RefreshRecord>(&*self.store, REFRESH, &key).await?
        else {
            return Err(OAuthError::invalid_grant("unknown refresh token"));
        };
        let mut record = read.value.clone();
        if record.tenant_id != tenant.id || record.client_id != client.client_id {
            return Err(OAuthError::invalid_grant(
                "the refresh token was not issued to this client",
            ));
        }
        let family = records::get::<FamilyRecord>(&*self.store, FAMILY, &record.family).await?;
        if family.as_ref().is_none_or(|f| f.revoked) {
            return Err(OAuthError::invalid_grant("the refresh token was revoked"));
        }
        if record.spent {
            return Err(self.refresh_reused(tenant, client, &record).await);
        }
        if record.expires_at_ms <= now_ms() {
            return Err(OAuthError::invalid_grant("the refresh token expired"));
        }
        let original = crate::scopes::Scopes::parse("scope", &record.scope)
            .map_err(|e| OAuthError::invalid_grant(e.to_string()))?;
        let scopes = self.requested_scopes(request.scope.as_deref(), &original)?;
        let user = self
            .users
            .get(tenant.id, &record.subject)
            .await
            .map_err(|_| OAuthError::invalid_grant("the user no longer exists"))?;
        // The roles may have shrunk since: never grant more than they allow now.
        let scopes = scopes.intersection(&user_scopes(&user, &original));
        record.spent = true;
        if !records::replace(&*self.store, REFRESH, &key, &read, &record).await? {
            // Rotated meanwhile (here or by another instance): a second use like any other.
            return Err(self.refresh_reused(tenant, client, &record).await);
        }
        self.issue(Grant {
            tenant,
            client,
            subject: Subject::User(user),
            scopes,
            family: Some(record.family.clone()),
            with_refresh: true,
            nonce: None,
            auth_time_s: record.auth_time_s,
        })
        .await
    }
}

/// What a user's token may hold: the API scopes of their roles, plus the OpenID scopes asked for.
pub(super) fn user_scopes(
    user: &crate::users::User,
    requested: &crate::scopes::Scopes,
) -> crate::scopes::Scopes {
    use crate::scopes::{EMAIL, OPENID, PROFILE, Scopes};
    let oidc = Scopes::of(&[OPENID, PROFILE, EMAIL]);
    requested.intersection(&oidc.union(&user.api_scopes()))
}
