//! The authorization code grant with PKCE (RFC 6749 4.1, RFC 7636; S256 only, as RFC 9700
//! asks): the authorization endpoint signs the person in and redirects back with a one-time
//! code, which the client redeems with its code verifier.

use aws_lc_rs::constant_time::verify_slices_are_equal;
use aws_lc_rs::digest::{SHA256, digest};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use tern_core::{Tenant, TenantId, now_ms};

use super::refresh::user_scopes;
use super::{Grant, OAuth, OAuthError, Subject, TokenRequest, TokenResponse};
use crate::IdentityError;
use crate::clients::{GrantType, OAuthClient};
use crate::records;
use crate::scopes::Scopes;
use crate::secrets::{new_token, token_hash};

const PENDING: &str = "oauth_authz_request";
const CODE: &str = "oauth_code";
/// How long the sign-in form stays valid.
const PENDING_TTL_MS: i64 = 10 * 60 * 1000;

/// The parameters of an authorization request (query string).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuthorizationRequest {
    pub response_type: Option<String>,
    pub client_id: Option<String>,
    pub redirect_uri: Option<String>,
    pub scope: Option<String>,
    pub state: Option<String>,
    pub code_challenge: Option<String>,
    pub code_challenge_method: Option<String>,
    pub nonce: Option<String>,
}

/// A validated authorization request waiting for the person to sign in.
#[derive(Debug, Clone)]
pub struct PendingAuthorization {
    pub request_id: String,
    pub client_name: String,
    pub scope: String,
}

/// Why an authorization request did not end in a code.
#[derive(Debug)]
pub enum AuthorizeFailure {
    /// The client or its redirect URI cannot be trusted: show the error, never redirect.
    Page(OAuthError),
    /// Tell the client, at its redirect URI (this URL).
    Redirect(String),
    /// Wrong username or password: show the form again.
    SignInFailed(PendingAuthorization),
}

#[derive(Debug, Serialize, Deserialize)]
struct PendingRecord {
    tenant_id: TenantId,
    client_id: String,
    client_name: String,
    redirect_uri: String,
    /// Whether the request named the redirect URI (then the token request must repeat it).
    redirect_uri_given: bool,
    scope: String,
    state: Option<String>,
    code_challenge: String,
    nonce: Option<String>,
    expires_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CodeRecord {
    tenant_id: TenantId,
    client_id: String,
    redirect_uri: String,
    redirect_uri_given: bool,
    scope: String,
    code_challenge: String,
    nonce: Option<String>,
    user_id: String,
    auth_time_s: i64,
    expires_at_ms: i64,
    /// Set when redeemed: the family of the tokens it gave, revoked if the code comes back.
    redeemed_family: Option<String>,
}

impl OAuth {
    /// Validates an authorization request and keeps it for the sign-in form.
    pub async fn begin_authorization(
        &self,
        tenant: &Tenant,
        request: &AuthorizationRequest,
    ) -> Result<PendingAuthorization, AuthorizeFailure> {
        let page = |e: OAuthError| AuthorizeFailure::Page(e);
        let client_id = request
            .client_id
            .as_deref()
            .ok_or_else(|| page(OAuthError::invalid_request("client_id is missing")))?;
        let client = self.clients.get(tenant.id, client_id).await.map_err(|_| {
            page(OAuthError::invalid_request(format!(
                "unknown client {client_id:?}"
            )))
        })?;
        let redirect_uri = match &request.redirect_uri {
            Some(uri) if client.redirect_uris.contains(uri) => uri.clone(),
            Some(uri) => {
                return Err(page(OAuthError::invalid_request(format!(
                    "redirect_uri {uri:?} is not registered for this client"
                ))));
            }
            None if client.redirect_uris.len() == 1 => client.redirect_uris[0].clone(),
            None => {
                return Err(page(OAuthError::invalid_request(
                    "redirect_uri is missing (this client registered several)",
                )));
            }
        };
        // From here on, errors go back to the client.
        let state = request.state.clone();
        let back = |e: OAuthError| {
            AuthorizeFailure::Redirect(error_redirect(&redirect_uri, &e, state.as_deref()))
        };
        if !client.may_use(GrantType::AuthorizationCode) {
            return Err(back(OAuthError::new(
                "unauthorized_client",
                "this client may not use the authorization code grant",
            )));
        }
        if request.response_type.as_deref() != Some("code") {
            return Err(back(OAuthError::new(
                "unsupported_response_type",
                "response_type must be code",
            )));
        }
        let challenge = request.code_challenge.clone().ok_or_else(|| {
            back(OAuthError::invalid_request(
                "PKCE is required: code_challenge is missing",
            ))
        })?;
        if request.code_challenge_method.as_deref() != Some("S256") {
            return Err(back(OAuthError::invalid_request(
                "code_challenge_method must be S256 (plain is not accepted)",
            )));
        }
        if challenge.len() != 43 || URL_SAFE_NO_PAD.decode(&challenge).is_err() {
            return Err(back(OAuthError::invalid_request(
                "code_challenge must be a base64url SHA-256 (43 characters)",
            )));
        }
        let scopes = self
            .requested_scopes(request.scope.as_deref(), &client.allowed_scopes())
            .map_err(back)?;
        let request_id = new_token("").map_err(|e| page(e.into()))?;
        let record = PendingRecord {
            tenant_id: tenant.id,
            client_id: client.client_id.clone(),
            client_name: client.name.clone(),
            redirect_uri,
            redirect_uri_given: request.redirect_uri.is_some(),
            scope: scopes.to_string(),
            state,
            code_challenge: challenge,
            nonce: request.nonce.clone(),
            expires_at_ms: now_ms() + PENDING_TTL_MS,
        };
        records::put(&*self.store, PENDING, &request_id, &record)
            .await
            .map_err(|e| page(e.into()))?;
        Ok(PendingAuthorization {
            request_id,
            client_name: client.name,
            scope: record.scope,
        })
    }

    /// The person submitted the sign-in form (or cancelled it): returns the URL to redirect to.
    pub async fn complete_authorization(
        &self,
        tenant: &Tenant,
        request_id: &str,
        username: &str,
        password: &str,
        approve: bool,
    ) -> Result<String, AuthorizeFailure> {
        let expired = || {
            AuthorizeFailure::Page(OAuthError::invalid_request(
                "this sign-in form expired or was already used; start again from the application",
            ))
        };
        let record: PendingRecord = records::get(&*self.store, PENDING, request_id)
            .await
            .map_err(|e| AuthorizeFailure::Page(e.into()))?
            .filter(|r: &PendingRecord| r.tenant_id == tenant.id && r.expires_at_ms > now_ms())
            .ok_or_else(expired)?;
        let state = record.state.as_deref();
        if !approve {
            self.store
                .delete_record(PENDING, request_id)
                .await
                .map_err(|e| AuthorizeFailure::Page(IdentityError::from(e).into()))?;
            let denied = OAuthError::new("access_denied", "the user cancelled the sign-in");
            return Err(AuthorizeFailure::Redirect(error_redirect(
                &record.redirect_uri,
                &denied,
                state,
            )));
        }
        let user = match self.users.authenticate(tenant, username, password).await {
            Ok(user) => user,
            Err(IdentityError::Unauthenticated) => {
                return Err(AuthorizeFailure::SignInFailed(PendingAuthorization {
                    request_id: request_id.to_string(),
                    client_name: record.client_name.clone(),
                    scope: record.scope.clone(),
                }));
            }
            Err(e) => return Err(AuthorizeFailure::Page(e.into())),
        };
        let code = new_token("tern_ac_").map_err(|e| AuthorizeFailure::Page(e.into()))?;
        let code_record = CodeRecord {
            tenant_id: tenant.id,
            client_id: record.client_id.clone(),
            redirect_uri: record.redirect_uri.clone(),
            redirect_uri_given: record.redirect_uri_given,
            scope: record.scope.clone(),
            code_challenge: record.code_challenge.clone(),
            nonce: record.nonce.clone(),
            user_id: user.id,
            auth_time_s: now_ms() / 1000,
            expires_at_ms: now_ms() + self.config.authorization_code_ttl_secs as i64 * 1000,
            redeemed_family: None,
        };
        let stored = async {
            records::put(&*self.store, CODE, &token_hash(&code), &code_record).await?;
            self.store.delete_record(PENDING, request_id).await?;
            Ok::<_, IdentityError>(())
        };
        stored.await.map_err(|e| AuthorizeFailure::Page(e.into()))?;
        let mut params = vec![("code", code.as_str())];
        if let Some(state) = state {
            params.push(("state", state));
        }
        Ok(with_query(&record.redirect_uri, &params))
    }

    /// The `authorization_code` grant.
    pub(super) async fn redeem_code(
        &self,
        tenant: &Tenant,
        client: &OAuthClient,
        request: &TokenRequest,
    ) -> Result<TokenResponse, OAuthError> {
        let code = request
            .code
            .as_deref()
            .ok_or_else(|| OAuthError::invalid_request("code is missing"))?;
        let key = token_hash(code);
        let read = records::get_versioned::<CodeRecord>(&*self.store, CODE, &key)
            .await?
            .filter(|r| r.value.tenant_id == tenant.id)
            .ok_or_else(|| OAuthError::invalid_grant("unknown authorization code"))?;
        let mut record = read.value.clone();
        if record.client_id != client.client_id {
            return Err(OAuthError::invalid_grant(
                "the code was issued to another client",
            ));
        }
        if let Some(family) = &record.redeemed_family {
            return Err(self.code_reused(tenant, client, family).await);
        }
        if record.expires_at_ms <= now_ms() {
            return Err(OAuthError::invalid_grant("the authorization code expired"));
        }
        if record.redirect_uri_given
            && request.redirect_uri.as_deref() != Some(record.redirect_uri.as_str())
        {
            return Err(OAuthError::invalid_grant(
                "redirect_uri does not match the authorization request",
            ));
        }
        let verifier = request
            .code_verifier
            .as_deref()
            .ok_or_else(|| OAuthError::invalid_request("code_verifier is missing (PKCE)"))?;
        check_verifier(verifier, &record.code_challenge)?;
        let family = uuid::Uuid::new_v4().to_string();
        record.redeemed_family = Some(family.clone());
        if !records::replace(&*self.store, CODE, &key, &read, &record).await? {
            // Redeemed meanwhile (here or by another instance): a second use like any other.
            let winner = records::get::<CodeRecord>(&*self.store, CODE, &key)
                .await?
                .and_then(|r| r.redeemed_family);
            return Err(match winner {
                Some(family) => self.code_reused(tenant, client, &family).await,
                None => OAuthError::invalid_grant("the authorization code is no longer valid"),
            });
        }
        let user = self
            .users
            .get(tenant.id, &record.user_id)
            .await
            .map_err(|_| OAuthError::invalid_grant("the user no longer exists"))?;
        let requested = Scopes::parse("scope", &record.scope)
            .map_err(|e| OAuthError::invalid_grant(e.to_string()))?;
        let scopes = user_scopes(&user, &requested);
        self.issue(Grant {
            tenant,
            client,
            subject: Subject::User(user),
            scopes,
            family: Some(family),
            with_refresh: client.may_use(GrantType::RefreshToken),
            nonce: record.nonce.clone(),
            auth_time_s: Some(record.auth_time_s),
        })
        .await
    }
}

impl OAuth {
    /// RFC 6749 4.1.2: a code used twice revokes what it gave.
    async fn code_reused(&self, tenant: &Tenant, client: &OAuthClient, family: &str) -> OAuthError {
        tracing::warn!(tenant = %tenant.id, client_id = %client.client_id, "authorization code reused: revoking its tokens");
        let until = now_ms() + self.config.refresh_token_ttl_secs as i64 * 1000;
        if let Err(e) = self.revoke_family(family, until).await {
            return e;
        }
        OAuthError::invalid_grant("the code was already used; its tokens are revoked")
    }
}

/// RFC 7636 4.6: BASE64URL(SHA256(verifier)) must equal the challenge.
fn check_verifier(verifier: &str, challenge: &str) -> Result<(), OAuthError> {
    let well_formed = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
    if !well_formed {
        return Err(OAuthError::invalid_grant(
            "code_verifier must be 43 to 128 characters of [A-Za-z0-9-._~]",
        ));
    }
    let computed = URL_SAFE_NO_PAD.encode(digest(&SHA256, verifier.as_bytes()));
    verify_slices_are_equal(computed.as_bytes(), challenge.as_bytes())
        .map_err(|_| OAuthError::invalid_grant("code_verifier does not match the code_challenge"))
}

fn error_redirect(redirect_uri: &str, error: &OAuthError, state: Option<&str>) -> String {
    let mut params = vec![
        ("error", error.error),
        ("error_description", error.description.as_str()),
    ];
    if let Some(state) = state {
        params.push(("state", state));
    }
    with_query(redirect_uri, &params)
}

/// Appends query parameters to a URI that may already have some.
fn with_query(uri: &str, params: &[(&str, &str)]) -> String {
    let query = serde_urlencoded::to_string(params).unwrap_or_default();
    let separator = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{separator}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_the_rfc_7636_example() {
        // RFC 7636, Appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        check_verifier(verifier, challenge).expect("matches");
        let other = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXx";
        assert_eq!(
            check_verifier(other, challenge).unwrap_err().error,
            "invalid_grant"
        );
        assert!(check_verifier("short", challenge).is_err());
    }

    #[test]
    fn redirects_keep_existing_query_parameters_and_encode_values() {
        assert_eq!(
            with_query("https://app/cb?x=1", &[("code", "a b"), ("state", "s&t")]),
            "https://app/cb?x=1&code=a+b&state=s%26t"
        );
    }
}
