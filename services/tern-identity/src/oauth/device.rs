//! The device authorization grant (RFC 8628): a headless device asks for a code, shows the
//! user code to a person, who approves it (verification page, `tern token approve`, REST)
//! while the device polls the token endpoint.
//!
//! With the scope `tern:device` it enrols the device instead: the person binds the code to a
//! registry device (`tern token approve CODE --device NAME`, an API call the PDP decides), and
//! the poll answers with that device's own credentials.

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use tern_core::{DeviceId, Tenant, TenantId, ValidationError, now_ms};

use super::refresh::user_scopes;
use super::{ClientCredentials, Grant, OAuth, OAuthError, Subject, TokenRequest, TokenResponse};
use crate::IdentityError;
use crate::clients::{GrantType, OAuthClient};
use crate::records;
use crate::scopes::DEVICE;
use crate::secrets::{new_token, token_hash};

const DEVICE_CODE: &str = "oauth_device_code";
const USER_CODE: &str = "oauth_user_code";
/// RFC 8628 6.1: consonants only (no vowels, so no words), no easily confused letters.
const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
/// How much `slow_down` adds to the polling interval (RFC 8628 3.5).
const SLOW_DOWN_SECS: u64 = 5;

/// The device authorization response (RFC 8628 3.2).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceAuthorization {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: String,
    pub expires_in: u64,
    pub interval: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Status {
    Pending,
    Approved,
    Denied,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeviceCodeRecord {
    tenant_id: TenantId,
    client_id: String,
    scope: String,
    user_code: String,
    expires_at_ms: i64,
    interval_secs: u64,
    last_poll_ms: i64,
    status: Status,
    /// The user who approved.
    user_id: Option<String>,
    approved_at_s: Option<i64>,
    /// An enrolment's device, bound by the approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device_id: Option<DeviceId>,
}

impl DeviceCodeRecord {
    fn enrols(&self) -> bool {
        self.scope == DEVICE
    }
}

/// An enrolment code's approval, as the approver sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Enrolment {
    pub user_code: String,
    pub device_id: DeviceId,
    pub client: String,
}

impl OAuth {
    /// The device authorization endpoint.
    pub async fn device_authorization(
        &self,
        tenant: &Tenant,
        credentials: &ClientCredentials,
        scope: Option<&str>,
    ) -> Result<DeviceAuthorization, OAuthError> {
        let client = self.authenticate_client(tenant, credentials).await?;
        if !client.may_use(GrantType::DeviceCode) {
            return Err(OAuthError::new(
                "unauthorized_client",
                "this client may not use the device authorization grant",
            ));
        }
        let scopes = self.requested_scopes(scope, &client.allowed_scopes())?;
        let device_code = new_token("tern_dc_")?;
        let user_code = new_user_code()?;
        let ttl = self.config.device_code_ttl_secs;
        let record = DeviceCodeRecord {
            tenant_id: tenant.id,
            client_id: client.client_id.clone(),
            scope: scopes.to_string(),
            user_code: user_code.clone(),
            expires_at_ms: now_ms() + ttl as i64 * 1000,
            interval_secs: self.config.device_poll_interval_secs,
            last_poll_ms: 0,
            status: Status::Pending,
            user_id: None,
            approved_at_s: None,
            device_id: None,
        };
        let key = token_hash(&device_code);
        records::put(&*self.store, DEVICE_CODE, &key, &record).await?;
        records::put(
            &*self.store,
            USER_CODE,
            &format!("{}/{}", tenant.id, normalize(&user_code)),
            &key,
        )
        .await?;
        let verification_uri = format!("{}/device", self.issuer(tenant));
        Ok(DeviceAuthorization {
            verification_uri_complete: format!("{verification_uri}?user_code={user_code}"),
            verification_uri,
            device_code,
            user_code,
            expires_in: ttl,
            interval: self.config.device_poll_interval_secs,
        })
    }

    /// A person's answer to a user code, after signing in as `username`. Returns the client's
    /// name, to show the person what they approved.
    pub async fn decide_device_code(
        &self,
        tenant: &Tenant,
        user_code: &str,
        username: &str,
        password: &str,
        approve: bool,
    ) -> Result<String, IdentityError> {
        let user = self.users.authenticate(tenant, username, password).await?;
        let record = self
            .answer_device_code(tenant, user_code, |record| {
                if record.enrols() && approve {
                    return Err(ValidationError::new(
                        "user_code",
                        "this code enrols a device: approve it with \
                         `tern token approve CODE --device NAME`",
                    )
                    .into());
                }
                record.status = if approve {
                    Status::Approved
                } else {
                    Status::Denied
                };
                record.user_id = Some(user.id.clone());
                Ok(())
            })
            .await?;
        tracing::info!(tenant = %tenant.id, user = %user.id, approve, "device code answered");
        let client = self.clients.get(tenant.id, &record.client_id).await?;
        Ok(client.name)
    }

    /// Whether `user_code` is a pending enrolment code of `tenant`: checked before a device is
    /// created for it, so a mistyped code creates nothing.
    pub async fn check_enrolment_code(
        &self,
        tenant: &Tenant,
        user_code: &str,
    ) -> Result<(), IdentityError> {
        let (_, read) = self.read_user_code(tenant, user_code).await?;
        Self::pending_enrolment(&read.value, user_code)
    }

    /// Approves an enrolment code for `device`: the polling device receives its credentials.
    /// `approver` is who approved (for the log); the caller has checked they may.
    pub async fn approve_enrolment(
        &self,
        tenant: &Tenant,
        user_code: &str,
        device: DeviceId,
        approver: &str,
    ) -> Result<Enrolment, IdentityError> {
        let record = self
            .answer_device_code(tenant, user_code, |record| {
                Self::pending_enrolment(record, user_code)?;
                record.status = Status::Approved;
                record.device_id = Some(device);
                Ok(())
            })
            .await?;
        tracing::info!(tenant = %tenant.id, %device, approver, "device enrolment approved");
        let client = self.clients.get(tenant.id, &record.client_id).await?;
        Ok(Enrolment {
            user_code: user_code.to_string(),
            device_id: device,
            client: client.name,
        })
    }

    fn pending_enrolment(record: &DeviceCodeRecord, user_code: &str) -> Result<(), IdentityError> {
        if record.expires_at_ms <= now_ms() {
            return Err(IdentityError::NotFound(format!(
                "user code {user_code:?} (expired)"
            )));
        }
        if !record.enrols() {
            return Err(ValidationError::new(
                "user_code",
                format!("this code does not enrol a device (its scope is not {DEVICE})"),
            )
            .into());
        }
        Ok(())
    }

    /// The record a user code stands for, and its key.
    async fn read_user_code(
        &self,
        tenant: &Tenant,
        user_code: &str,
    ) -> Result<(String, records::Versioned<DeviceCodeRecord>), IdentityError> {
        let index = format!("{}/{}", tenant.id, normalize(user_code));
        let not_found = || IdentityError::NotFound(format!("user code {user_code:?}"));
        let key: String = records::get(&*self.store, USER_CODE, &index)
            .await?
            .ok_or_else(not_found)?;
        let read = records::get_versioned::<DeviceCodeRecord>(&*self.store, DEVICE_CODE, &key)
            .await?
            .ok_or_else(not_found)?;
        Ok((key, read))
    }

    /// Answers a pending user code once: `answer` sets the outcome on the record, which is
    /// stored by compare-and-swap, and the user code is forgotten.
    async fn answer_device_code(
        &self,
        tenant: &Tenant,
        user_code: &str,
        mut answer: impl FnMut(&mut DeviceCodeRecord) -> Result<(), IdentityError>,
    ) -> Result<DeviceCodeRecord, IdentityError> {
        // The device's polls rewrite the record too: a swap lost to one of them reads again.
        for _ in 0..5 {
            let (key, read) = self.read_user_code(tenant, user_code).await?;
            let mut record = read.value.clone();
            if record.expires_at_ms <= now_ms() {
                return Err(IdentityError::NotFound(format!(
                    "user code {user_code:?} (expired)"
                )));
            }
            if record.status != Status::Pending {
                return Err(IdentityError::Conflict(
                    "this user code was already answered".into(),
                ));
            }
            answer(&mut record)?;
            record.approved_at_s = Some(now_ms() / 1000);
            if records::replace(&*self.store, DEVICE_CODE, &key, &read, &record).await? {
                let index = format!("{}/{}", tenant.id, normalize(user_code));
                self.store.delete_record(USER_CODE, &index).await?;
                return Ok(record);
            }
        }
        Err(IdentityError::Unavailable(
            "the user code kept changing; try again".into(),
        ))
    }

    /// The device polling the token endpoint.
    pub(super) async fn poll_device_code(
        &self,
        tenant: &Tenant,
        client: &OAuthClient,
        request: &TokenRequest,
    ) -> Result<TokenResponse, OAuthError> {
        let code = request
            .device_code
            .as_deref()
            .ok_or_else(|| OAuthError::invalid_request("device_code is missing"))?;
        let key = token_hash(code);
        let read = records::get_versioned::<DeviceCodeRecord>(&*self.store, DEVICE_CODE, &key)
            .await?
            .filter(|r| r.value.tenant_id == tenant.id && r.value.client_id == client.client_id)
            .ok_or_else(|| OAuthError::invalid_grant("unknown device code"))?;
        let mut record = read.value.clone();
        let now = now_ms();
        if record.expires_at_ms <= now {
            self.forget_device_code(&key, &record).await?;
            return Err(OAuthError::new(
                "expired_token",
                "the device code expired; start again",
            ));
        }
        let too_soon = now < record.last_poll_ms + record.interval_secs as i64 * 1000;
        record.last_poll_ms = now;
        if too_soon {
            record.interval_secs += SLOW_DOWN_SECS;
            // A concurrent poll that changed it first is just as much too soon.
            records::replace(&*self.store, DEVICE_CODE, &key, &read, &record).await?;
            return Err(OAuthError::new(
                "slow_down",
                format!("poll at most every {} seconds", record.interval_secs),
            ));
        }
        match record.status {
            Status::Pending => {
                if !records::replace(&*self.store, DEVICE_CODE, &key, &read, &record).await? {
                    // Polled (or answered) meanwhile: two polls at once are too fast.
                    return Err(OAuthError::new(
                        "slow_down",
                        "poll at most once per interval",
                    ));
                }
                Err(OAuthError::new(
                    "authorization_pending",
                    "the user has not answered yet",
                ))
            }
            Status::Denied => {
                self.forget_device_code(&key, &record).await?;
                Err(OAuthError::new(
                    "access_denied",
                    "the user denied the request",
                ))
            }
            Status::Approved => {
                // Single use: the code is gone before the tokens leave, and only one poll (of
                // any instance) can be the one that removed it.
                if !records::remove(&*self.store, DEVICE_CODE, &key, &read).await? {
                    return Err(OAuthError::invalid_grant(
                        "the device code was already used",
                    ));
                }
                self.forget_device_code(&key, &record).await?;
                if let Some(device) = record.device_id {
                    return self.enrolled_device_tokens(tenant, device).await;
                }
                let user_id = record.user_id.clone().unwrap_or_default();
                let user = self.users.get(tenant.id, &user_id).await.map_err(|_| {
                    OAuthError::invalid_grant("the approving user no longer exists")
                })?;
                let requested = crate::scopes::Scopes::parse("scope", &record.scope)
                    .map_err(|e| OAuthError::invalid_grant(e.to_string()))?;
                let scopes = user_scopes(&user, &requested);
                self.issue(Grant {
                    tenant,
                    client,
                    subject: Subject::User(user),
                    scopes,
                    family: None,
                    with_refresh: client.may_use(GrantType::RefreshToken),
                    nonce: None,
                    auth_time_s: record.approved_at_s,
                })
                .await
            }
        }
    }

    /// The token response of an enrolment: the device's own credentials.
    async fn enrolled_device_tokens(
        &self,
        tenant: &Tenant,
        device: DeviceId,
    ) -> Result<TokenResponse, OAuthError> {
        let tokens = self
            .device_credentials
            .issue(&tenant.id.to_string(), &device.to_string())
            .await
            .map_err(|e| match e {
                IdentityError::NotFound(_) => {
                    OAuthError::invalid_grant("the approved device no longer exists")
                }
                IdentityError::Forbidden(_) => {
                    OAuthError::invalid_grant("the approved device is disabled")
                }
                other => other.into(),
            })?;
        Ok(TokenResponse {
            access_token: tokens.access_token,
            token_type: "Bearer",
            expires_in: ((tokens.access_token_expires_at_ms - now_ms()).max(0) / 1000) as u64,
            scope: DEVICE.to_string(),
            refresh_token: Some(tokens.refresh_token),
            id_token: None,
            device_id: Some(tokens.device_id),
            tenant_id: Some(tokens.tenant_id),
        })
    }

    async fn forget_device_code(
        &self,
        key: &str,
        record: &DeviceCodeRecord,
    ) -> Result<(), IdentityError> {
        self.store.delete_record(DEVICE_CODE, key).await?;
        self.store
            .delete_record(
                USER_CODE,
                &format!("{}/{}", record.tenant_id, normalize(&record.user_code)),
            )
            .await?;
        Ok(())
    }
}

/// `XXXX-XXXX` from the alphabet: 20^8 ≈ 2^34.6 codes, enough with the short lifetime and the
/// sign-in each guess needs.
fn new_user_code() -> Result<String, IdentityError> {
    // Rejection sampling: bytes of 240 and above would favour the first letters.
    let limit = (256 / USER_CODE_ALPHABET.len() * USER_CODE_ALPHABET.len()) as u8;
    let mut chars = String::with_capacity(8);
    while chars.len() < 8 {
        let mut bytes = [0u8; 16];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| IdentityError::Keys("the system random generator failed".into()))?;
        for b in bytes.iter().filter(|b| **b < limit).take(8 - chars.len()) {
            chars.push(USER_CODE_ALPHABET[*b as usize % USER_CODE_ALPHABET.len()] as char);
        }
    }
    Ok(format!("{}-{}", &chars[..4], &chars[4..]))
}

/// People type codes in any case, with or without the dash (RFC 8628 6.1).
fn normalize(user_code: &str) -> String {
    user_code
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_codes_are_readable_and_normalised() {
        let code = new_user_code().expect("code");
        assert_eq!(code.len(), 9);
        assert_eq!(&code[4..5], "-");
        assert!(
            code.chars()
                .filter(|c| *c != '-')
                .all(|c| USER_CODE_ALPHABET.contains(&(c as u8)))
        );
        assert_eq!(normalize("bcdf-ghjk"), "BCDFGHJK");
        assert_eq!(normalize(" BCDF GHJK "), "BCDFGHJK");
    }
}
