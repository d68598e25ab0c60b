//! OAuth clients of a tenant: applications and services (confidential, with a secret shown
//! once and kept as argon2id) and apps that cannot keep a secret (public: the portal, a CLI,
//! a device), each with the grants, redirect URIs and scopes it may use.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tern_core::{TenantId, ValidationError, now_ms, validate_name};
use tern_store::Store;

use crate::scopes::{ADMIN, DEVICE, EMAIL, OPENID, PROFILE, READ, Scopes, WRITE};
use crate::secrets::new_token;
use crate::{IdentityError, passwords, records};

const CLIENT: &str = "oauth_client";

/// The grant types of RFC 6749 and RFC 8628 this server implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GrantType {
    #[serde(rename = "client_credentials")]
    ClientCredentials,
    #[serde(rename = "authorization_code")]
    AuthorizationCode,
    #[serde(rename = "refresh_token")]
    RefreshToken,
    #[serde(rename = "urn:ietf:params:oauth:grant-type:device_code")]
    DeviceCode,
}

impl GrantType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientCredentials => "client_credentials",
            Self::AuthorizationCode => "authorization_code",
            Self::RefreshToken => "refresh_token",
            Self::DeviceCode => "urn:ietf:params:oauth:grant-type:device_code",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::ClientCredentials,
            Self::AuthorizationCode,
            Self::RefreshToken,
            Self::DeviceCode,
        ]
        .into_iter()
        .find(|g| g.as_str() == text)
    }
}

/// A client as the API shows it; `client_secret` only in the response that created it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OAuthClient {
    pub client_id: String,
    pub tenant_id: TenantId,
    pub name: String,
    /// Holds a secret (and must authenticate with it).
    pub confidential: bool,
    pub grant_types: Vec<GrantType>,
    pub redirect_uris: Vec<String>,
    /// The most a token of this client may be granted.
    pub scopes: Vec<String>,
    pub created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
}

impl OAuthClient {
    pub fn allowed_scopes(&self) -> Scopes {
        let scopes: Vec<&str> = self.scopes.iter().map(String::as_str).collect();
        Scopes::of(&scopes)
    }

    pub fn may_use(&self, grant: GrantType) -> bool {
        self.grant_types.contains(&grant)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewClient {
    pub name: String,
    #[serde(default = "yes")]
    pub confidential: bool,
    pub grant_types: Vec<GrantType>,
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    /// Space-separated; default `tern:read`.
    #[serde(default)]
    pub scope: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Serialize, Deserialize)]
struct StoredClient {
    #[serde(flatten)]
    client: OAuthClient,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret_hash: Option<String>,
}

/// The dashboard's client, built into every tenant (as Keycloak's account console is): public,
/// authorization code with PKCE, and it redirects only to the dashboard at `{public_url}/`.
/// What its tokens may do is capped by the person's roles, then decided by policies.
pub const PORTAL_CLIENT_ID: &str = "tern-portal";

pub struct Clients {
    store: Arc<dyn Store>,
    /// Where the portal client redirects; `None`: no portal client.
    portal_redirect_uri: Option<String>,
}

impl Clients {
    pub(crate) fn new(store: Arc<dyn Store>, portal_redirect_uri: Option<String>) -> Self {
        Self {
            store,
            portal_redirect_uri,
        }
    }

    fn portal(&self, tenant: TenantId) -> Option<OAuthClient> {
        let redirect_uri = self.portal_redirect_uri.clone()?;
        Some(OAuthClient {
            client_id: PORTAL_CLIENT_ID.into(),
            tenant_id: tenant,
            name: "Tern dashboard".into(),
            confidential: false,
            grant_types: vec![GrantType::AuthorizationCode, GrantType::RefreshToken],
            redirect_uris: vec![redirect_uri],
            scopes: Scopes::of(&[OPENID, PROFILE, EMAIL, READ, WRITE, ADMIN]).to_vec(),
            created_at_ms: 0,
            client_secret: None,
        })
    }

    pub async fn create(
        &self,
        tenant: TenantId,
        new: NewClient,
    ) -> Result<OAuthClient, IdentityError> {
        validate_name("name", &new.name)?;
        if new.grant_types.is_empty() {
            return Err(ValidationError::new("grant_types", "name at least one grant type").into());
        }
        if !new.confidential && new.grant_types.contains(&GrantType::ClientCredentials) {
            return Err(ValidationError::new(
                "grant_types",
                "client_credentials needs a confidential client (one with a secret)",
            )
            .into());
        }
        let needs_redirect = new.grant_types.contains(&GrantType::AuthorizationCode);
        if needs_redirect && new.redirect_uris.is_empty() {
            return Err(ValidationError::new(
                "redirect_uris",
                "authorization_code needs at least one redirect URI",
            )
            .into());
        }
        for uri in &new.redirect_uris {
            validate_redirect_uri(uri)?;
        }
        let scopes = Scopes::parse("scope", new.scope.as_deref().unwrap_or(READ))?;
        if scopes.contains(DEVICE) {
            // An enrolment client's tokens are device credentials, nothing else.
            if scopes != Scopes::of(&[DEVICE]) {
                return Err(ValidationError::new(
                    "scope",
                    format!("{DEVICE} (device enrolment) cannot be combined with other scopes"),
                )
                .into());
            }
            if new.grant_types != [GrantType::DeviceCode] {
                return Err(ValidationError::new(
                    "grant_types",
                    format!(
                        "a {DEVICE} client enrols devices with the {} grant only",
                        GrantType::DeviceCode.as_str()
                    ),
                )
                .into());
            }
        }
        let client_secret = if new.confidential {
            Some(new_token("tern_cs_")?)
        } else {
            None
        };
        let secret_hash = match &client_secret {
            Some(secret) => Some(passwords::hash(secret).await?),
            None => None,
        };
        let client = OAuthClient {
            client_id: format!("tern_cl_{}", uuid::Uuid::new_v4().simple()),
            tenant_id: tenant,
            name: new.name,
            confidential: new.confidential,
            grant_types: new.grant_types,
            redirect_uris: new.redirect_uris,
            scopes: scopes.to_vec(),
            created_at_ms: now_ms(),
            client_secret: None,
        };
        let stored = StoredClient {
            client: client.clone(),
            secret_hash,
        };
        records::put(
            &*self.store,
            CLIENT,
            &format!("{tenant}/{}", client.client_id),
            &stored,
        )
        .await?;
        Ok(OAuthClient {
            client_secret,
            ..client
        })
    }

    pub async fn list(&self, tenant: TenantId) -> Result<Vec<OAuthClient>, IdentityError> {
        let all: Vec<(String, StoredClient)> =
            records::list(&*self.store, CLIENT, &format!("{tenant}/")).await?;
        Ok(self
            .portal(tenant)
            .into_iter()
            .chain(all.into_iter().map(|(_, s)| s.client))
            .collect())
    }

    /// A client of `tenant`; another tenant's client is "not found".
    pub async fn get(
        &self,
        tenant: TenantId,
        client_id: &str,
    ) -> Result<OAuthClient, IdentityError> {
        Ok(self.stored(tenant, client_id).await?.client)
    }

    pub async fn delete(&self, tenant: TenantId, client_id: &str) -> Result<(), IdentityError> {
        if client_id == PORTAL_CLIENT_ID && self.portal_redirect_uri.is_some() {
            return Err(IdentityError::Conflict(format!(
                "{PORTAL_CLIENT_ID} is built in (the dashboard's sign-in); a policy can limit \
                 what its tokens may do"
            )));
        }
        self.stored(tenant, client_id).await?;
        self.store
            .delete_record(CLIENT, &format!("{tenant}/{client_id}"))
            .await?;
        Ok(())
    }

    /// Authenticates a client at the token, device authorization, introspection and
    /// revocation endpoints: a confidential client must present its secret, a public client
    /// must not claim one.
    pub(crate) async fn authenticate(
        &self,
        tenant: TenantId,
        client_id: &str,
        secret: Option<&str>,
    ) -> Result<OAuthClient, IdentityError> {
        let stored = match self.stored(tenant, client_id).await {
            Ok(stored) => stored,
            Err(IdentityError::NotFound(_)) => return Err(IdentityError::Unauthenticated),
            Err(e) => return Err(e),
        };
        match (&stored.secret_hash, secret) {
            (Some(hash), Some(secret)) if passwords::verify(secret, hash).await? => {
                Ok(stored.client)
            }
            (None, None) => Ok(stored.client),
            _ => {
                tracing::info!(%tenant, client_id, "client authentication failed");
                Err(IdentityError::Unauthenticated)
            }
        }
    }

    async fn stored(
        &self,
        tenant: TenantId,
        client_id: &str,
    ) -> Result<StoredClient, IdentityError> {
        if client_id == PORTAL_CLIENT_ID
            && let Some(client) = self.portal(tenant)
        {
            return Ok(StoredClient {
                client,
                secret_hash: None,
            });
        }
        match records::get::<StoredClient>(&*self.store, CLIENT, &format!("{tenant}/{client_id}"))
            .await?
        {
            Some(s) if s.client.tenant_id == tenant => Ok(s),
            _ => Err(IdentityError::NotFound(format!("client {client_id:?}"))),
        }
    }
}

/// Redirect URIs are absolute, without a fragment, and HTTPS unless they point at the loopback
/// interface (native apps, RFC 8252) — an authorization code must not travel in clear.
fn validate_redirect_uri(uri: &str) -> Result<(), ValidationError> {
    let field = "redirect_uris";
    if uri.contains('#') {
        return Err(ValidationError::new(
            field,
            format!("{uri:?} must not have a fragment"),
        ));
    }
    let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
        .iter()
        .any(|p| {
            uri.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '/']))
        });
    let https = uri
        .strip_prefix("https://")
        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
    if !loopback && !https {
        return Err(ValidationError::new(
            field,
            format!("{uri:?} must be an https:// URI, or http:// on the loopback interface"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tern_store::EmbeddedStore;

    use super::*;

    #[tokio::test]
    async fn confidential_clients_authenticate_with_their_secret_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let clients = Clients::new(store, None);
        let t = TenantId::random();
        let created = clients
            .create(
                t,
                NewClient {
                    name: "billing".into(),
                    confidential: true,
                    grant_types: vec![GrantType::ClientCredentials],
                    redirect_uris: vec![],
                    scope: Some("tern:read tern:write".into()),
                },
            )
            .await
            .expect("create");
        let secret = created.client_secret.clone().expect("shown once");
        assert!(
            clients
                .get(t, &created.client_id)
                .await
                .expect("get")
                .client_secret
                .is_none()
        );
        let ok = clients
            .authenticate(t, &created.client_id, Some(&secret))
            .await
            .expect("auth");
        assert_eq!(ok.allowed_scopes().to_string(), "tern:read tern:write");
        for wrong in [None, Some("tern_cs_wrong")] {
            assert!(
                clients
                    .authenticate(t, &created.client_id, wrong)
                    .await
                    .is_err()
            );
        }
        assert!(
            clients
                .authenticate(TenantId::random(), &created.client_id, Some(&secret))
                .await
                .is_err(),
            "a client belongs to one tenant"
        );
    }

    #[test]
    fn redirect_uris_must_be_https_or_loopback() {
        for ok in [
            "https://app.example.com/cb",
            "http://127.0.0.1:8000/cb",
            "http://localhost/cb",
        ] {
            validate_redirect_uri(ok).expect(ok);
        }
        for bad in [
            "http://app.example.com/cb",
            "https://app/cb#frag",
            "http://localhost.evil.com/",
            "app://x",
        ] {
            assert!(validate_redirect_uri(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn public_clients_cannot_use_client_credentials() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let err = Clients::new(store, None)
            .create(
                TenantId::random(),
                NewClient {
                    name: "cli".into(),
                    confidential: false,
                    grant_types: vec![GrantType::ClientCredentials],
                    redirect_uris: vec![],
                    scope: None,
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, IdentityError::Invalid(ref v) if v.field == "grant_types"));
    }
}
