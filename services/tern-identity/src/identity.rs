use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tern_core::{Caller, Device, DeviceId, TenantId, ValidationError, now_ms, validate_name};
use tern_eventlog::EventLog;
use tern_registry::{Lease, Registry, RegistryError};
use tern_store::Store;

use crate::certificates::{TenantCa, TenantCas};
use crate::device_tokens::{DeviceCredentials, DevicePrincipal, DeviceTokens};
use crate::keys::Keyring;
use crate::ldap::LdapConfig;
use crate::notices::{self, NOTICES_TOPIC, Notice, Notices};
use crate::oauth::{ApiPrincipal, OAuth, PrincipalKind};
use crate::policy::Pdp;
use crate::scopes::Scopes;
use crate::secrets::{new_token, token_hash};
use crate::{DeviceAuthError, IdentityError};

const API_TOKEN: &str = "api_token";
const OPERATOR_TOKEN: &str = "operator_token";

/// Settings of the identity service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Lifetime of device access tokens. Short, because they are verified without a lookup.
    pub device_access_token_ttl_secs: u64,
    /// The URL clients reach the HTTP port at; tenants' OAuth issuers are
    /// `{public_url}/oauth2/{tenant}`. Empty: `http://localhost:{http_port}`.
    pub public_url: String,
    /// Lifetime of OAuth access tokens and ID tokens.
    pub access_token_ttl_secs: u64,
    /// Lifetime of a refresh token family (rotation does not extend it).
    pub refresh_token_ttl_secs: u64,
    pub authorization_code_ttl_secs: u64,
    pub device_code_ttl_secs: u64,
    /// The polling interval a device is told (RFC 8628).
    pub device_poll_interval_secs: u64,
    /// A new signing key every this many days (published an hour before it signs).
    pub signing_key_rotation_days: u64,
    /// Failed sign-ins in a row that lock a user ...
    pub max_failed_logins: u32,
    /// ... for this long.
    pub lockout_secs: u64,
    /// Tenants (by name) whose people sign in against an LDAP directory.
    pub ldap: BTreeMap<String, LdapConfig>,
    /// The operator token's file: adopted when it exists and no operator token does yet, else
    /// written on first start. Unset: `{data_dir}/admin.token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_token_file: Option<std::path::PathBuf>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            device_access_token_ttl_secs: 3600,
            public_url: String::new(),
            access_token_ttl_secs: 600,
            refresh_token_ttl_secs: 30 * 86_400,
            authorization_code_ttl_secs: 60,
            device_code_ttl_secs: 600,
            device_poll_interval_secs: 5,
            signing_key_rotation_days: 30,
            max_failed_logins: 5,
            lockout_secs: 900,
            ldap: BTreeMap::new(),
            operator_token_file: None,
        }
    }
}

impl IdentityConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        let positive = [
            (
                "identity.device_access_token_ttl_secs",
                self.device_access_token_ttl_secs,
            ),
            ("identity.access_token_ttl_secs", self.access_token_ttl_secs),
            (
                "identity.refresh_token_ttl_secs",
                self.refresh_token_ttl_secs,
            ),
            (
                "identity.authorization_code_ttl_secs",
                self.authorization_code_ttl_secs,
            ),
            ("identity.device_code_ttl_secs", self.device_code_ttl_secs),
            (
                "identity.device_poll_interval_secs",
                self.device_poll_interval_secs,
            ),
            (
                "identity.signing_key_rotation_days",
                self.signing_key_rotation_days,
            ),
            (
                "identity.max_failed_logins",
                u64::from(self.max_failed_logins),
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ValidationError::new(key, "must be at least 1"));
            }
        }
        for (tenant, ldap) in &self.ldap {
            ldap.validate(&format!("identity.ldap.{tenant}"))?;
        }
        if !(self.public_url.starts_with("http://") || self.public_url.starts_with("https://")) {
            return Err(ValidationError::new(
                "identity.public_url",
                format!(
                    "expected an http:// or https:// URL, got {:?}",
                    self.public_url
                ),
            ));
        }
        Ok(())
    }

    /// The longest a token signed by a key may live: how long a retired key stays published.
    fn longest_token_secs(&self) -> i64 {
        self.device_access_token_ttl_secs
            .max(self.access_token_ttl_secs) as i64
            + 60
    }
}

/// An API token's record; `token` is only set in the response that created it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiToken {
    pub id: String,
    pub tenant_id: TenantId,
    pub name: String,
    pub created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

pub struct Identity {
    /// Tenants' CAs for device client certificates.
    cas: TenantCas,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    keys: Arc<Keyring>,
    device_credentials: Arc<DeviceCredentials>,
    oauth: OAuth,
    pdp: Pdp,
    notices: Arc<Notices>,
}

impl Identity {
    pub async fn new(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        config: IdentityConfig,
    ) -> Result<Self, IdentityError> {
        config.validate()?;
        let keys = Arc::new(
            Keyring::load(
                store.clone(),
                config.signing_key_rotation_days as i64 * 86_400,
                config.longest_token_secs(),
            )
            .await?,
        );
        let cas = TenantCas::load(store.clone()).await?;
        let device_credentials = Arc::new(DeviceCredentials::new(
            store.clone(),
            registry.clone(),
            keys.clone(),
            config.device_access_token_ttl_secs,
        ));
        let oauth = OAuth::new(
            store.clone(),
            registry.clone(),
            keys.clone(),
            device_credentials.clone(),
            config.clone(),
        )
        .await?;
        let pdp = Pdp::new(store.clone()).await?;
        let notices = Arc::new(Notices::new());
        oauth.set_notices(notices.clone());
        pdp.set_notices(notices.clone());
        Ok(Self {
            cas,
            store,
            registry,
            keys,
            device_credentials,
            oauth,
            pdp,
            notices,
        })
    }

    /// Keeps this instance and the others that share its store in step (the distributed
    /// mode): revocations and policy changes made here are sent on `log`'s `notices` stream,
    /// and the others' are applied until `shutdown`. Not needed with one instance.
    /// Changes made after this call are sent; the returned task applies the others'.
    pub fn follow_notices(
        self: Arc<Self>,
        log: Arc<dyn EventLog>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> impl Future<Output = Result<(), IdentityError>> + Send {
        self.notices.connect(log.clone());
        self.apply_notices(log, shutdown)
    }

    async fn apply_notices(
        self: Arc<Self>,
        log: Arc<dyn EventLog>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<(), IdentityError> {
        let unavailable = |e: tern_eventlog::LogError| IdentityError::Unavailable(e.to_string());
        let mut consumer = log
            .consumer(&self.notices.group(), NOTICES_TOPIC)
            .await
            .map_err(unavailable)?;
        loop {
            let batch = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                batch = consumer.poll(100, notices::POLL_WAIT) => batch,
            };
            let batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read identity notices; retrying");
                    tokio::time::sleep(notices::POLL_WAIT).await;
                    continue;
                }
            };
            for record in &batch {
                match self.notices.read(&record.value) {
                    Some(Notice::Revoked { id, expires_at_ms }) => {
                        self.oauth.remember_revoked(&id, expires_at_ms);
                    }
                    Some(Notice::PoliciesChanged { tenant }) => self.pdp.forget(tenant),
                    None => {}
                }
            }
            if let Some(last) = batch.last()
                && let Err(e) = consumer.commit(&[last.position]).await
            {
                tracing::warn!(error = %e, "cannot commit identity notices");
            }
        }
    }

    /// The OAuth 2.0 authorization server, users and clients.
    pub fn oauth(&self) -> &OAuth {
        &self.oauth
    }

    /// The policy decision and administration point.
    pub fn pdp(&self) -> &Pdp {
        &self.pdp
    }

    /// Rotates the signing keys when due and picks up other instances' keys, every few
    /// minutes until `shutdown`.
    pub async fn run_key_rotation(&self, shutdown: tokio_util::sync::CancellationToken) {
        let every = std::time::Duration::from_secs(300);
        let mut tick = tokio::time::interval(every);
        // One process rotates when several share the store; the others pick its keys up.
        let lease = Lease::new(self.store.clone(), "signing-key-rotation", every * 3);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    lease.release().await;
                    return;
                }
                _ = tick.tick() => {}
            }
            let rotate = match lease.hold().await {
                Ok(held) => held,
                Err(e) => {
                    tracing::error!(error = %e, "signing keys: cannot read their lease");
                    false
                }
            };
            let result = match rotate {
                true => match self.keys.rotate_if_due(now_ms() / 1000).await {
                    Ok(false) => self.keys.reload().await,
                    Ok(true) => Ok(()),
                    Err(e) => Err(e),
                },
                false => self.keys.reload().await,
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "signing key rotation failed");
            }
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Makes sure an operator token exists. When the store has none, a token already in `path`
    /// is adopted (one made by the deployment, such as a mounted Kubernetes Secret), or else a
    /// new one is written there (mode 0600). Only its hash is kept; the secret never appears
    /// in logs.
    pub async fn ensure_operator_token(&self, path: &Path) -> Result<(), IdentityError> {
        if !self
            .store
            .list_records(OPERATOR_TOKEN, "", None, 1)
            .await?
            .is_empty()
        {
            return Ok(());
        }
        let token = match std::fs::read_to_string(path) {
            // Made elsewhere (a Kubernetes Secret, say): adopted as it is.
            Ok(text) => {
                let token = text.trim().to_string();
                if !is_operator_token(&token) {
                    return Err(IdentityError::Keys(format!(
                        "{} does not hold an operator token: expected `tern_op_` and at least \
                         32 more letters, digits, `-` or `_`",
                        path.display()
                    )));
                }
                tracing::info!(path = %path.display(), "adopted the operator token");
                token
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = new_token("tern_op_")?;
                write_secret_file(path, &token).map_err(|e| {
                    IdentityError::Keys(format!("cannot write {}: {e}", path.display()))
                })?;
                tracing::info!(path = %path.display(), "created the operator token");
                token
            }
            Err(e) => {
                return Err(IdentityError::Keys(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        self.store
            .put_record(
                OPERATOR_TOKEN,
                &token_hash(&token),
                now_ms().to_string().into_bytes().into(),
            )
            .await?;
        Ok(())
    }

    /// Issues an access token and a refresh token to a registered, enabled device.
    pub async fn issue_device_tokens(
        &self,
        tenant: &str,
        device: &str,
    ) -> Result<DeviceTokens, IdentityError> {
        self.device_credentials.issue(tenant, device).await
    }

    /// Exchanges a refresh token for new tokens; the old refresh token stops working.
    pub async fn refresh_device_tokens(
        &self,
        refresh_token: &str,
    ) -> Result<DeviceTokens, IdentityError> {
        self.device_credentials.refresh(refresh_token).await
    }

    /// Revokes every token of a device: its refresh tokens are deleted (returns how many there
    /// were) and its access tokens refused from now on, which also ends its connections.
    pub async fn revoke_device_tokens(
        &self,
        tenant: TenantId,
        device: DeviceId,
    ) -> Result<u32, IdentityError> {
        self.device_credentials.revoke(tenant, device).await
    }

    /// Registers a CA certificate (PEM) whose client certificates identify the tenant's
    /// devices (mTLS).
    pub async fn add_tenant_ca(
        &self,
        tenant: TenantId,
        pem: &str,
    ) -> Result<TenantCa, IdentityError> {
        self.cas.add(tenant, pem).await
    }

    pub fn tenant_cas(&self, tenant: TenantId) -> Vec<TenantCa> {
        self.cas.list(tenant)
    }

    /// Returns whether the CA existed.
    pub async fn delete_tenant_ca(
        &self,
        tenant: TenantId,
        id: &str,
    ) -> Result<bool, IdentityError> {
        self.cas.delete(tenant, id).await
    }

    /// Whether any tenant registered a CA: TLS servers ask for client certificates only then.
    pub fn client_certificates_in_use(&self) -> bool {
        self.cas.any()
    }

    /// The tenant whose registered CA issued a client certificate chain (leaf first), and the
    /// device reference (id or name) its subject Common Name gives. Synchronous, for the TLS
    /// handshake.
    pub fn certificate_identity(
        &self,
        chain: &[rustls_pki_types::CertificateDer<'_>],
    ) -> Option<(TenantId, String)> {
        self.cas.identify(chain)
    }

    /// A device by its client certificate: issued by its tenant's CA, naming an existing,
    /// enabled device.
    pub async fn authenticate_certificate(
        &self,
        chain: &[rustls_pki_types::CertificateDer<'_>],
    ) -> Result<Device, DeviceAuthError> {
        let (tenant, reference) = self
            .certificate_identity(chain)
            .ok_or(DeviceAuthError::InvalidToken)?;
        let device = self
            .registry
            .device_of(tenant, &reference)
            .await
            .map_err(|e| match e {
                RegistryError::NotFound(_) | RegistryError::Invalid(_) => {
                    DeviceAuthError::UnknownDevice
                }
                other => DeviceAuthError::Registry(other),
            })?;
        if device.disabled {
            return Err(DeviceAuthError::Disabled);
        }
        Ok(device)
    }

    /// Everything a device's access token must pass, for every way a device comes in (MQTT,
    /// HTTP): signature, issuer, audience, expiry, not revoked, and the device exists and is
    /// enabled.
    pub async fn authenticate_device(&self, token: &str) -> Result<Device, DeviceAuthError> {
        self.authenticate_device_token(token)
            .await
            .map(|(device, _)| device)
    }

    /// [`Identity::authenticate_device`], with the token's claims (its expiry, for a
    /// connection that lives only as long as its token).
    pub async fn authenticate_device_token(
        &self,
        token: &str,
    ) -> Result<(Device, DevicePrincipal), DeviceAuthError> {
        let principal = self
            .verify_device_token(token)
            .map_err(|_| DeviceAuthError::InvalidToken)?;
        let device = self
            .registry
            .device_of(principal.tenant_id, &principal.device_id.to_string())
            .await
            .map_err(|e| match e {
                RegistryError::NotFound(_) => DeviceAuthError::UnknownDevice,
                other => DeviceAuthError::Registry(other),
            })?;
        if principal.issued_at_s < device.tokens_valid_from_s {
            return Err(DeviceAuthError::Revoked);
        }
        if device.disabled {
            return Err(DeviceAuthError::Disabled);
        }
        Ok((device, principal))
    }

    /// Verifies a device access token's signature, issuer, audience and expiry. Whether the
    /// device still exists and is enabled is for the caller to check against the registry.
    pub fn verify_device_token(&self, token: &str) -> Result<DevicePrincipal, IdentityError> {
        self.device_credentials.verify(token)
    }

    /// Creates an API token for a tenant; the secret is returned once.
    pub async fn create_api_token(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<ApiToken, IdentityError> {
        validate_name("name", name)?;
        let tenant = self.registry.tenant(tenant).await?;
        let token = new_token("tern_api_")?;
        let record = ApiToken {
            id: uuid::Uuid::new_v4().to_string(),
            tenant_id: tenant.id,
            name: name.to_string(),
            created_at_ms: now_ms(),
            token: None,
        };
        self.store
            .put_record(API_TOKEN, &token_hash(&token), json(&record))
            .await?;
        Ok(ApiToken {
            token: Some(token),
            ..record
        })
    }

    /// Authenticates an API caller by its bearer token: the operator token, an API token, or
    /// an OAuth access token (a JWT) of a tenant's authorization server.
    pub async fn authenticate_api(&self, token: &str) -> Result<ApiPrincipal, IdentityError> {
        if token.starts_with("eyJ") {
            return self.oauth.verify_access_token(token).await;
        }
        let hash = token_hash(token);
        if token.starts_with("tern_op_")
            && self
                .store
                .get_record(OPERATOR_TOKEN, &hash)
                .await?
                .is_some()
        {
            return Ok(ApiPrincipal {
                caller: Caller::Operator,
                kind: PrincipalKind::Operator,
                scopes: Scopes::all_api(),
                subject: "operator".into(),
                client_id: None,
            });
        }
        if token.starts_with("tern_api_") {
            if let Some(bytes) = self.store.get_record(API_TOKEN, &hash).await? {
                let record: ApiToken = serde_json::from_slice(&bytes)
                    .map_err(|e| IdentityError::Keys(format!("corrupt API token record: {e}")))?;
                return Ok(ApiPrincipal {
                    caller: Caller::Tenant(record.tenant_id),
                    kind: PrincipalKind::ApiToken,
                    scopes: Scopes::all_api(),
                    subject: record.id,
                    client_id: None,
                });
            }
        }
        Err(IdentityError::Unauthenticated)
    }
}

fn json<T: Serialize>(value: &T) -> bytes::Bytes {
    serde_json::to_vec(value).unwrap_or_default().into()
}

/// `tern_op_` and at least 256 bits' worth of URL-safe characters.
fn is_operator_token(token: &str) -> bool {
    token.strip_prefix("tern_op_").is_some_and(|rest| {
        rest.len() >= 32
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    })
}

fn write_secret_file(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    writeln!(file, "{secret}")?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use tern_core::NewDevice;
    use tern_store::EmbeddedStore;

    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        registry: Arc<Registry>,
        identity: Identity,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let registry = Arc::new(Registry::new(store.clone()));
        let config = IdentityConfig {
            public_url: "http://localhost:8080".into(),
            ..Default::default()
        };
        let identity = Identity::new(store, registry.clone(), config)
            .await
            .expect("identity");
        registry.create_tenant("acme").await.expect("tenant");
        registry.create_tenant("globex").await.expect("tenant");
        registry
            .create_device(
                "acme",
                NewDevice {
                    name: "d1".into(),
                    ..Default::default()
                },
            )
            .await
            .expect("device");
        Fixture {
            _dir: dir,
            registry,
            identity,
        }
    }

    #[tokio::test]
    async fn device_tokens_verify_and_tampering_is_refused() {
        let f = fixture().await;
        let tokens = f
            .identity
            .issue_device_tokens("acme", "d1")
            .await
            .expect("issue");
        let principal = f
            .identity
            .verify_device_token(&tokens.access_token)
            .expect("verify");
        assert_eq!(
            (principal.tenant_id, principal.device_id),
            (tokens.tenant_id, tokens.device_id)
        );
        assert!(principal.expires_at_ms > now_ms());

        let mut tampered = tokens.access_token.clone();
        let last = tampered.pop().expect("char");
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        assert!(matches!(
            f.identity.verify_device_token(&tampered),
            Err(IdentityError::Unauthenticated)
        ));
        assert!(f.identity.verify_device_token("not-a-jwt").is_err());
        assert!(
            f.identity
                .verify_device_token(&tokens.refresh_token)
                .is_err()
        );
    }

    #[tokio::test]
    async fn tokens_of_another_key_are_refused() {
        let a = fixture().await;
        let b = fixture().await;
        let tokens = a
            .identity
            .issue_device_tokens("acme", "d1")
            .await
            .expect("issue");
        assert!(
            b.identity
                .verify_device_token(&tokens.access_token)
                .is_err()
        );
    }

    #[tokio::test]
    async fn refresh_rotates_and_revoke_ends_the_family() {
        let f = fixture().await;
        let first = f
            .identity
            .issue_device_tokens("acme", "d1")
            .await
            .expect("issue");
        let second = f
            .identity
            .refresh_device_tokens(&first.refresh_token)
            .await
            .expect("refresh");
        assert_ne!(second.refresh_token, first.refresh_token);
        assert!(
            matches!(
                f.identity.refresh_device_tokens(&first.refresh_token).await,
                Err(IdentityError::Unauthenticated)
            ),
            "a rotated refresh token is spent"
        );
        f.identity
            .issue_device_tokens("acme", "d1")
            .await
            .expect("second family");
        let revoked = f
            .identity
            .revoke_device_tokens(first.tenant_id, first.device_id)
            .await
            .expect("revoke");
        assert_eq!(revoked, 2);
        assert!(
            f.identity
                .refresh_device_tokens(&second.refresh_token)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_disabled_device_keeps_its_refresh_token_for_when_it_is_enabled() {
        let f = fixture().await;
        let tokens = f
            .identity
            .issue_device_tokens("acme", "d1")
            .await
            .expect("issue");
        let disabled = |disabled| tern_registry::DevicePatch {
            disabled: Some(disabled),
            ..Default::default()
        };
        f.registry
            .update_device("acme", "d1", disabled(true))
            .await
            .expect("disable");
        for _ in 0..2 {
            assert!(matches!(
                f.identity
                    .refresh_device_tokens(&tokens.refresh_token)
                    .await,
                Err(IdentityError::Forbidden(_))
            ));
        }
        f.registry
            .update_device("acme", "d1", disabled(false))
            .await
            .expect("enable");
        f.identity
            .refresh_device_tokens(&tokens.refresh_token)
            .await
            .expect("the token was not spent while the device was disabled");
    }

    #[tokio::test]
    async fn unknown_devices_get_no_tokens() {
        let f = fixture().await;
        let err = f
            .identity
            .issue_device_tokens("globex", "d1")
            .await
            .unwrap_err();
        assert_eq!(err.code(), tern_core::ErrorCode::NotFound);
        f.registry
            .delete_device("acme", "d1")
            .await
            .expect("delete");
        assert!(f.identity.issue_device_tokens("acme", "d1").await.is_err());
    }

    #[tokio::test]
    async fn api_tokens_are_bound_to_their_tenant_and_operator_token_is_written_once() {
        let f = fixture().await;
        let api = f
            .identity
            .create_api_token("acme", "grafana")
            .await
            .expect("create");
        let secret = api.token.clone().expect("secret shown once");
        let acme = f.registry.tenant("acme").await.expect("tenant");
        let globex = f.registry.tenant("globex").await.expect("tenant");
        let caller = f
            .identity
            .authenticate_api(&secret)
            .await
            .expect("auth")
            .caller;
        assert_eq!(caller, Caller::Tenant(acme.id));
        assert!(caller.may_access(acme.id) && !caller.may_access(globex.id));
        assert!(f.identity.authenticate_api("tern_api_wrong").await.is_err());

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.token");
        f.identity
            .ensure_operator_token(&path)
            .await
            .expect("operator");
        let op = std::fs::read_to_string(&path)
            .expect("read")
            .trim()
            .to_string();
        assert_eq!(
            f.identity.authenticate_api(&op).await.expect("auth").caller,
            Caller::Operator
        );
        std::fs::remove_file(&path).expect("remove");
        f.identity
            .ensure_operator_token(&path)
            .await
            .expect("again");
        assert!(!path.exists(), "an existing operator token is not replaced");

        // A token provided in the file (a mounted Secret) is adopted when the store has none;
        // anything else there stops start-up, naming the file.
        let g = fixture().await;
        let provided = dir.path().join("provided.token");
        std::fs::write(&provided, "tern_op_short\n").expect("write");
        let err = g
            .identity
            .ensure_operator_token(&provided)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("provided.token"), "{err}");
        let token = format!("tern_op_{}", "k".repeat(43));
        std::fs::write(&provided, format!("{token}\n")).expect("write");
        g.identity
            .ensure_operator_token(&provided)
            .await
            .expect("adopted");
        assert_eq!(
            g.identity
                .authenticate_api(&token)
                .await
                .expect("auth")
                .caller,
            Caller::Operator
        );
        #[cfg(unix)]
        {
            // Checked on a fresh file: only the owner may read the secret.
            let g = fixture().await;
            let p2 = dir.path().join("second.token");
            g.identity
                .ensure_operator_token(&p2)
                .await
                .expect("operator");
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&p2).expect("meta").permissions().mode() & 0o777,
                0o600
            );
        }
    }
}
