//! Device credentials: a short-lived access token (a JWT the bridge verifies without a lookup)
//! and a long-lived refresh token, spent on use, whose SHA-256 alone is stored.
//!
//! Shared by the identity API and the authorization server, which hands them to a device
//! enrolled through the device authorization grant.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, Validation};
use serde::{Deserialize, Serialize};
use tern_core::{DeviceId, TenantId, now_ms};
use tern_registry::Registry;
use tern_store::Store;

use crate::IdentityError;
use crate::keys::Keyring;
use crate::secrets::{new_token, token_hash};

const ISSUER: &str = "tern";
const DEVICE_AUDIENCE: &str = "tern-device";
const REFRESH_TOKEN: &str = "refresh_token";
const DEVICE_REFRESH_TOKEN: &str = "device_refresh_token";

/// A device's credentials, as issued. The refresh token is only ever shown here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceTokens {
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
    pub access_token: String,
    pub access_token_expires_at_ms: i64,
    pub refresh_token: String,
}

/// Who a verified device access token speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevicePrincipal {
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
    pub expires_at_ms: i64,
    /// The token's `iat`: a token older than its device's `tokens_valid_from_s` is revoked.
    pub issued_at_s: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct AccessClaims {
    iss: String,
    aud: String,
    sub: String,
    tid: String,
    iat: i64,
    exp: i64,
    jti: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct RefreshRecord {
    tenant_id: TenantId,
    device_id: DeviceId,
    created_at_ms: i64,
}

pub(crate) struct DeviceCredentials {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    keys: Arc<Keyring>,
    access_token_ttl_secs: u64,
}

impl DeviceCredentials {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        keys: Arc<Keyring>,
        access_token_ttl_secs: u64,
    ) -> Self {
        Self {
            store,
            registry,
            keys,
            access_token_ttl_secs,
        }
    }

    /// Issues an access token and a refresh token to a registered, enabled device.
    pub(crate) async fn issue(
        &self,
        tenant: &str,
        device: &str,
    ) -> Result<DeviceTokens, IdentityError> {
        let device = self.registry.device(tenant, device).await?;
        if device.disabled {
            return Err(IdentityError::Forbidden(
                "obtain tokens for a disabled device".into(),
            ));
        }
        let refresh_token = new_token("tern_rt_")?;
        let hash = token_hash(&refresh_token);
        let record = RefreshRecord {
            tenant_id: device.tenant_id,
            device_id: device.id,
            created_at_ms: now_ms(),
        };
        self.store
            .put_record(REFRESH_TOKEN, &hash, json(&record))
            .await?;
        self.store
            .put_record(
                DEVICE_REFRESH_TOKEN,
                &format!("{}/{}/{hash}", device.tenant_id, device.id),
                Default::default(),
            )
            .await?;
        let (access_token, expires) =
            self.sign_access_token(device.tenant_id, device.id, device.tokens_valid_from_s)?;
        Ok(DeviceTokens {
            tenant_id: device.tenant_id,
            device_id: device.id,
            access_token,
            access_token_expires_at_ms: expires,
            refresh_token,
        })
    }

    /// Exchanges a refresh token for new tokens; the old refresh token stops working.
    pub(crate) async fn refresh(&self, refresh_token: &str) -> Result<DeviceTokens, IdentityError> {
        let hash = token_hash(refresh_token);
        let Some(bytes) = self.store.get_record(REFRESH_TOKEN, &hash).await? else {
            tracing::info!("refresh with an unknown or revoked token");
            return Err(IdentityError::Unauthenticated);
        };
        let record: RefreshRecord = serde_json::from_slice(&bytes)
            .map_err(|e| IdentityError::Keys(format!("corrupt refresh token record: {e}")))?;
        // A disabled device keeps its token for when it is enabled again: refuse before
        // spending it.
        let (tenant, device) = (record.tenant_id.to_string(), record.device_id.to_string());
        if self.registry.device(&tenant, &device).await?.disabled {
            return Err(IdentityError::Forbidden(
                "obtain tokens for a disabled device".into(),
            ));
        }
        // Spent by compare-and-swap, so two concurrent refreshes (in any processes) cannot
        // both succeed.
        if !self
            .store
            .compare_and_swap(REFRESH_TOKEN, &hash, Some(bytes), None)
            .await?
        {
            tracing::info!("refresh with a token spent concurrently");
            return Err(IdentityError::Unauthenticated);
        }
        self.delete_refresh_token(record.tenant_id, record.device_id, &hash)
            .await?;
        self.issue(&tenant, &device).await
    }

    /// Revokes every token of a device: its refresh tokens are deleted (returns how many there
    /// were) and its access tokens refused from now on, which also ends its connections.
    pub(crate) async fn revoke(
        &self,
        tenant: TenantId,
        device: DeviceId,
    ) -> Result<u32, IdentityError> {
        self.registry.revoke_access_tokens(tenant, device).await?;
        let prefix = format!("{tenant}/{device}/");
        let mut revoked = 0;
        loop {
            let page = self
                .store
                .list_records(DEVICE_REFRESH_TOKEN, &prefix, None, 500)
                .await?;
            if page.is_empty() {
                return Ok(revoked);
            }
            for (key, _) in page {
                let hash = &key[prefix.len()..];
                self.delete_refresh_token(tenant, device, hash).await?;
                revoked += 1;
            }
        }
    }

    async fn delete_refresh_token(
        &self,
        tenant: TenantId,
        device: DeviceId,
        hash: &str,
    ) -> Result<(), IdentityError> {
        self.store.delete_record(REFRESH_TOKEN, hash).await?;
        self.store
            .delete_record(DEVICE_REFRESH_TOKEN, &format!("{tenant}/{device}/{hash}"))
            .await?;
        Ok(())
    }

    /// Verifies a device access token's signature, issuer, audience and expiry. Whether the
    /// device still exists and is enabled is for the caller to check against the registry.
    pub(crate) fn verify(&self, token: &str) -> Result<DevicePrincipal, IdentityError> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[DEVICE_AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 0;
        let key = self
            .keys
            .decoding_key(token)
            .ok_or(IdentityError::Unauthenticated)?;
        let data = jsonwebtoken::decode::<AccessClaims>(token.as_bytes(), &key, &validation)
            .map_err(|e| {
                tracing::debug!(error = %e, "device token rejected");
                IdentityError::Unauthenticated
            })?;
        let claims = data.claims;
        let tenant_id = TenantId::parse(&claims.tid).map_err(|_| IdentityError::Unauthenticated)?;
        let device_id = DeviceId::parse(&claims.sub).map_err(|_| IdentityError::Unauthenticated)?;
        Ok(DevicePrincipal {
            tenant_id,
            device_id,
            expires_at_ms: claims.exp.saturating_mul(1000),
            issued_at_s: claims.iat,
        })
    }

    /// Signs an access token; `valid_from_s` is the device's revocation floor, so a token
    /// issued in the same second as a revocation is still valid.
    fn sign_access_token(
        &self,
        tenant: TenantId,
        device: DeviceId,
        valid_from_s: i64,
    ) -> Result<(String, i64), IdentityError> {
        let now = (now_ms() / 1000).max(valid_from_s);
        let exp = now + self.access_token_ttl_secs as i64;
        let claims = AccessClaims {
            iss: ISSUER.into(),
            aud: DEVICE_AUDIENCE.into(),
            sub: device.to_string(),
            tid: tenant.to_string(),
            iat: now,
            exp,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let token = self.keys.sign("JWT", &claims)?;
        Ok((token, exp * 1000))
    }
}

fn json<T: Serialize>(value: &T) -> bytes::Bytes {
    serde_json::to_vec(value).unwrap_or_default().into()
}
