//! The grants and endpoints, with the failure cases RFC 6749, 7636, 8628, 7662 and 7009 name.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tern_core::{Caller, Tenant, now_ms};
use tern_registry::Registry;
use tern_store::{EmbeddedStore, Store};

use super::*;
use crate::clients::NewClient;
use crate::users::{NewUser, Role};

const PASSWORD: &str = "s3cret-passphrase";
/// RFC 7636, Appendix B.
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
const REDIRECT: &str = "http://127.0.0.1:9999/cb";

struct Fixture {
    _dir: tempfile::TempDir,
    oauth: OAuth,
    /// A second authorization server over the same store: another identity process.
    twin: OAuth,
    keys: Arc<Keyring>,
    acme: Tenant,
    globex: Tenant,
    /// Confidential, client credentials, tern:read tern:write.
    service: ClientCredentials,
    /// Public: code, device, refresh; every scope.
    app: ClientCredentials,
}

fn device_credentials(
    store: &Arc<dyn Store>,
    registry: &Arc<Registry>,
    keys: &Arc<Keyring>,
) -> Arc<DeviceCredentials> {
    Arc::new(DeviceCredentials::new(
        store.clone(),
        registry.clone(),
        keys.clone(),
        3600,
    ))
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
    let registry = Arc::new(Registry::new(store.clone()));
    let config = IdentityConfig {
        public_url: "https://tern.example".into(),
        device_poll_interval_secs: 1,
        ..Default::default()
    };
    let keys = Arc::new(
        Keyring::load(store.clone(), 86_400 * 30, 3600)
            .await
            .expect("keys"),
    );
    let twin = OAuth::new(
        store.clone(),
        registry.clone(),
        keys.clone(),
        device_credentials(&store, &registry, &keys),
        config.clone(),
    )
    .await
    .expect("oauth");
    let credentials = device_credentials(&store, &registry, &keys);
    let oauth = OAuth::new(store, registry.clone(), keys.clone(), credentials, config)
        .await
        .expect("oauth");
    let acme = registry.create_tenant("acme").await.expect("tenant");
    let globex = registry.create_tenant("globex").await.expect("tenant");
    let service = oauth
        .clients
        .create(
            acme.id,
            NewClient {
                name: "billing".into(),
                confidential: true,
                grant_types: vec![GrantType::ClientCredentials],
                redirect_uris: vec![],
                scope: Some("tern:read tern:write".into()),
            },
        )
        .await
        .expect("client");
    let app = oauth
        .clients
        .create(
            acme.id,
            NewClient {
                name: "portal".into(),
                confidential: false,
                grant_types: vec![
                    GrantType::AuthorizationCode,
                    GrantType::DeviceCode,
                    GrantType::RefreshToken,
                ],
                redirect_uris: vec![REDIRECT.into()],
                scope: Some("openid profile email tern:read tern:write tern:admin".into()),
            },
        )
        .await
        .expect("client");
    oauth
        .users
        .create(
            acme.id,
            NewUser {
                name: "alice".into(),
                password: PASSWORD.into(),
                email: Some("alice@example.com".into()),
                roles: vec![Role::Editor],
                groups: vec!["ops".into()],
            },
        )
        .await
        .expect("user");
    Fixture {
        _dir: dir,
        oauth,
        twin,
        keys,
        acme,
        globex,
        service: ClientCredentials {
            client_id: Some(service.client_id),
            client_secret: service.client_secret,
        },
        app: ClientCredentials {
            client_id: Some(app.client_id),
            client_secret: None,
        },
    }
}

fn grant(grant_type: &str) -> TokenRequest {
    TokenRequest {
        grant_type: Some(grant_type.into()),
        ..Default::default()
    }
}

fn claims_of(jwt: &str) -> serde_json::Value {
    let payload = jwt.split('.').nth(1).expect("payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64")).expect("json")
}

impl Fixture {
    async fn client_token(&self) -> TokenResponse {
        self.oauth
            .token(&self.acme, &self.service, &grant("client_credentials"))
            .await
            .expect("token")
    }

    /// Signs in alice through the authorization endpoint; returns the code.
    async fn code(&self, scope: &str) -> String {
        let pending = self
            .oauth
            .begin_authorization(
                &self.acme,
                &AuthorizationRequest {
                    response_type: Some("code".into()),
                    client_id: self.app.client_id.clone(),
                    redirect_uri: Some(REDIRECT.into()),
                    scope: Some(scope.into()),
                    state: Some("xyz".into()),
                    code_challenge: Some(CHALLENGE.into()),
                    code_challenge_method: Some("S256".into()),
                    nonce: Some("n-0S6_WzA2Mj".into()),
                },
            )
            .await
            .expect("begin");
        let url = self
            .oauth
            .complete_authorization(&self.acme, &pending.request_id, "alice", PASSWORD, true)
            .await
            .expect("signed in");
        assert!(url.starts_with(&format!("{REDIRECT}?code=")), "{url}");
        assert!(url.ends_with("&state=xyz"), "{url}");
        url.split("code=")
            .nth(1)
            .and_then(|s| s.split('&').next())
            .expect("code")
            .to_string()
    }

    async fn redeem(&self, code: &str, verifier: &str) -> Result<TokenResponse, OAuthError> {
        let request = TokenRequest {
            code: Some(code.into()),
            redirect_uri: Some(REDIRECT.into()),
            code_verifier: Some(verifier.into()),
            ..grant("authorization_code")
        };
        self.oauth.token(&self.acme, &self.app, &request).await
    }

    async fn refresh(&self, token: &str) -> Result<TokenResponse, OAuthError> {
        let request = TokenRequest {
            refresh_token: Some(token.into()),
            ..grant("refresh_token")
        };
        self.oauth.token(&self.acme, &self.app, &request).await
    }

    async fn poll(&self, device_code: &str) -> Result<TokenResponse, OAuthError> {
        let request = TokenRequest {
            device_code: Some(device_code.into()),
            ..grant(GrantType::DeviceCode.as_str())
        };
        self.oauth.token(&self.acme, &self.app, &request).await
    }
}

#[tokio::test]
async fn client_credentials_give_a_tenant_scoped_jwt() {
    let f = fixture().await;
    let token = f.client_token().await;
    assert_eq!(token.token_type, "Bearer");
    assert!(
        token.refresh_token.is_none(),
        "RFC 6749 4.4.3: no refresh token"
    );
    assert_eq!(token.scope, "tern:read tern:write");
    let claims = claims_of(&token.access_token);
    assert_eq!(claims["iss"], "https://tern.example/oauth2/acme");
    assert_eq!(claims["aud"], "tern-api");
    assert_eq!(claims["tid"], f.acme.id.to_string());
    let principal = f
        .oauth
        .verify_access_token(&token.access_token)
        .await
        .expect("verify");
    assert_eq!(principal.caller, Caller::Tenant(f.acme.id));
    assert!(principal.caller.may_access(f.acme.id) && !principal.caller.may_access(f.globex.id));

    // Narrower scope on request; wider is refused.
    let narrow = TokenRequest {
        scope: Some("tern:read".into()),
        ..grant("client_credentials")
    };
    let token = f
        .oauth
        .token(&f.acme, &f.service, &narrow)
        .await
        .expect("narrow");
    assert_eq!(token.scope, "tern:read");
    let wide = TokenRequest {
        scope: Some("tern:admin".into()),
        ..grant("client_credentials")
    };
    let err = f.oauth.token(&f.acme, &f.service, &wide).await.unwrap_err();
    assert_eq!(err.error, "invalid_scope");

    let wrong_secret = ClientCredentials {
        client_secret: Some("tern_cs_wrong".into()),
        ..f.service.clone()
    };
    let err = f
        .oauth
        .token(&f.acme, &wrong_secret, &grant("client_credentials"))
        .await
        .unwrap_err();
    assert_eq!((err.error, err.status()), ("invalid_client", 401));
    let err = f
        .oauth
        .token(&f.globex, &f.service, &grant("client_credentials"))
        .await
        .unwrap_err();
    assert_eq!(
        err.error, "invalid_client",
        "a client of acme is unknown to globex"
    );
    let err = f
        .oauth
        .token(&f.acme, &f.service, &grant("password"))
        .await
        .unwrap_err();
    assert_eq!(err.error, "unsupported_grant_type");
    let err = f
        .oauth
        .token(&f.acme, &f.app, &grant("client_credentials"))
        .await
        .unwrap_err();
    assert_eq!(err.error, "unauthorized_client");
}

#[tokio::test]
async fn jwt_verification_rejects_forgeries() {
    let f = fixture().await;
    let good = f.client_token().await.access_token;
    let mut claims = claims_of(&good);
    let verify = |token: String| {
        let oauth = &f.oauth;
        async move { oauth.verify_access_token(&token).await.is_err() }
    };

    // alg: none, with the claims of a valid token.
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"at+jwt"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    assert!(verify(format!("{header}.{body}.")).await, "alg none");
    // A valid token's signature on changed claims.
    let parts: Vec<&str> = good.split('.').collect();
    claims["scope"] = "tern:read tern:write tern:admin".into();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        parts[2]
    );
    assert!(verify(forged).await, "wrong signature");
    // Signed by our key, but expired / for another audience / another tenant's issuer.
    let now = now_ms() / 1000;
    let mut expired = claims_of(&good);
    expired["exp"] = (now - 1).into();
    assert!(
        verify(f.keys.sign("at+jwt", &expired).expect("sign")).await,
        "expired"
    );
    let mut audience = claims_of(&good);
    audience["aud"] = "tern-device".into();
    assert!(
        verify(f.keys.sign("at+jwt", &audience).expect("sign")).await,
        "audience"
    );
    let mut issuer = claims_of(&good);
    issuer["iss"] = "https://tern.example/oauth2/globex".into();
    assert!(
        verify(f.keys.sign("at+jwt", &issuer).expect("sign")).await,
        "wrong tenant"
    );
    // Another installation's key.
    let other = fixture().await;
    assert!(
        verify(other.client_token().await.access_token).await,
        "foreign key"
    );
    // And the untouched token passes, so the checks above are not vacuous.
    assert!(!verify(good).await);
}

#[tokio::test]
async fn code_with_pkce_gives_id_token_and_refuses_wrong_verifier_and_reuse() {
    let f = fixture().await;
    let code = f.code("openid profile email tern:read tern:admin").await;
    let err = f
        .redeem(&code, "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXx")
        .await
        .unwrap_err();
    assert_eq!(err.error, "invalid_grant", "wrong PKCE verifier");
    let tokens = f.redeem(&code, VERIFIER).await.expect("redeem");
    // alice is an editor: tern:admin is not hers to grant.
    assert_eq!(tokens.scope, "email openid profile tern:read");
    let id = claims_of(tokens.id_token.as_deref().expect("id token"));
    assert_eq!(id["aud"], f.app.client_id.clone().expect("id"));
    assert_eq!(id["nonce"], "n-0S6_WzA2Mj");
    assert_eq!(id["preferred_username"], "alice");
    assert_eq!(id["email"], "alice@example.com");
    let info = f
        .oauth
        .userinfo(&tokens.access_token)
        .await
        .expect("userinfo");
    assert_eq!(info["sub"], id["sub"]);
    assert_eq!(info["groups"], serde_json::json!(["ops"]));

    // The code again: refused, and what it gave is revoked.
    let err = f.redeem(&code, VERIFIER).await.unwrap_err();
    assert_eq!(err.error, "invalid_grant");
    assert!(
        f.oauth
            .verify_access_token(&tokens.access_token)
            .await
            .is_err()
    );
    let refresh = tokens.refresh_token.expect("refresh");
    assert_eq!(
        f.refresh(&refresh).await.unwrap_err().error,
        "invalid_grant"
    );
}

#[tokio::test]
async fn authorization_requests_are_checked_before_and_after_the_redirect_uri() {
    let f = fixture().await;
    let base = AuthorizationRequest {
        response_type: Some("code".into()),
        client_id: f.app.client_id.clone(),
        redirect_uri: Some(REDIRECT.into()),
        state: Some("s1".into()),
        code_challenge: Some(CHALLENGE.into()),
        code_challenge_method: Some("S256".into()),
        ..Default::default()
    };
    let unregistered = AuthorizationRequest {
        redirect_uri: Some("https://evil.example/cb".into()),
        ..base.clone()
    };
    assert!(matches!(
        f.oauth.begin_authorization(&f.acme, &unregistered).await,
        Err(AuthorizeFailure::Page(_))
    ));
    let plain = AuthorizationRequest {
        code_challenge_method: Some("plain".into()),
        ..base.clone()
    };
    match f.oauth.begin_authorization(&f.acme, &plain).await {
        Err(AuthorizeFailure::Redirect(url)) => {
            assert!(
                url.starts_with(&format!("{REDIRECT}?error=invalid_request")),
                "{url}"
            );
            assert!(url.ends_with("&state=s1"));
        }
        other => panic!("expected a redirect, got {other:?}"),
    }
    let no_pkce = AuthorizationRequest {
        code_challenge: None,
        ..base.clone()
    };
    assert!(matches!(
        f.oauth.begin_authorization(&f.acme, &no_pkce).await,
        Err(AuthorizeFailure::Redirect(_))
    ));
    let pending = f
        .oauth
        .begin_authorization(&f.acme, &base)
        .await
        .expect("begin");
    assert!(matches!(
        f.oauth
            .complete_authorization(&f.acme, &pending.request_id, "alice", "wrong", true)
            .await,
        Err(AuthorizeFailure::SignInFailed(_))
    ));
    match f
        .oauth
        .complete_authorization(&f.acme, &pending.request_id, "", "", false)
        .await
    {
        Err(AuthorizeFailure::Redirect(url)) => assert!(url.contains("error=access_denied")),
        other => panic!("expected access_denied, got {other:?}"),
    }
    assert!(
        matches!(
            f.oauth
                .complete_authorization(&f.acme, &pending.request_id, "alice", PASSWORD, true)
                .await,
            Err(AuthorizeFailure::Page(_))
        ),
        "a cancelled form is spent"
    );
}

/// Single use holds across processes: two authorization servers on one store, the same code
/// (then the same refresh token) presented to both at once, exactly one answers with tokens and
/// the other sees a second use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_accept_each_code_and_refresh_token_only_once() {
    let f = fixture().await;
    let code = TokenRequest {
        code: Some(f.code("tern:read").await),
        redirect_uri: Some(REDIRECT.into()),
        code_verifier: Some(VERIFIER.into()),
        ..grant("authorization_code")
    };
    let (a, b) = tokio::join!(
        f.oauth.token(&f.acme, &f.app, &code),
        f.twin.token(&f.acme, &f.app, &code)
    );
    let (_tokens, refused) = match (a, b) {
        (Ok(tokens), Err(e)) | (Err(e), Ok(tokens)) => (tokens, e),
        (a, b) => panic!("exactly one redemption must succeed: {a:?} / {b:?}"),
    };
    assert!(refused.description.contains("already used"), "{refused}");

    let fresh = f
        .redeem(&f.code("tern:read").await, VERIFIER)
        .await
        .expect("redeem");
    let refresh = TokenRequest {
        refresh_token: fresh.refresh_token.clone(),
        ..grant("refresh_token")
    };
    let (a, b) = tokio::join!(
        f.oauth.token(&f.acme, &f.app, &refresh),
        f.twin.token(&f.acme, &f.app, &refresh)
    );
    assert_eq!(
        [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "exactly one rotation: {a:?} / {b:?}"
    );

    // An approved device code, polled through both at once.
    let auth = f
        .oauth
        .device_authorization(&f.acme, &f.app, Some("tern:read"))
        .await
        .expect("device authorization");
    f.twin
        .decide_device_code(&f.acme, &auth.user_code, "alice", PASSWORD, true)
        .await
        .expect("approve");
    let poll = TokenRequest {
        device_code: Some(auth.device_code.clone()),
        ..grant(GrantType::DeviceCode.as_str())
    };
    let (a, b) = tokio::join!(
        f.oauth.token(&f.acme, &f.app, &poll),
        f.twin.token(&f.acme, &f.app, &poll)
    );
    assert_eq!(
        [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "exactly one device token: {a:?} / {b:?}"
    );
}

#[tokio::test]
async fn refresh_tokens_rotate_and_reuse_revokes_the_family() {
    let f = fixture().await;
    let first = f
        .redeem(&f.code("tern:read").await, VERIFIER)
        .await
        .expect("redeem");
    let rt1 = first.refresh_token.clone().expect("refresh");
    let second = f.refresh(&rt1).await.expect("rotate");
    let rt2 = second.refresh_token.clone().expect("rotated");
    assert_ne!(rt1, rt2);
    assert!(
        f.oauth
            .verify_access_token(&second.access_token)
            .await
            .is_ok()
    );
    // rt1 is spent: presenting it again means it leaked.
    let err = f.refresh(&rt1).await.unwrap_err();
    assert_eq!(err.error, "invalid_grant");
    assert!(err.description.contains("family"), "{err}");
    assert_eq!(
        f.refresh(&rt2).await.unwrap_err().error,
        "invalid_grant",
        "rt2 is revoked too"
    );
    assert!(
        f.oauth
            .verify_access_token(&second.access_token)
            .await
            .is_err(),
        "so are the family's access tokens"
    );
    // Another client cannot use a refresh token.
    let fresh = f
        .redeem(&f.code("tern:read").await, VERIFIER)
        .await
        .expect("redeem");
    let request = TokenRequest {
        refresh_token: fresh.refresh_token.clone(),
        ..grant("refresh_token")
    };
    let err = f
        .oauth
        .token(&f.acme, &f.service, &request)
        .await
        .unwrap_err();
    assert_eq!(err.error, "unauthorized_client");
}

#[tokio::test]
async fn device_flow_pending_slow_down_approval_and_denial() {
    let f = fixture().await;
    let auth = f
        .oauth
        .device_authorization(&f.acme, &f.app, Some("tern:read"))
        .await
        .expect("device authorization");
    assert_eq!(
        auth.verification_uri,
        "https://tern.example/oauth2/acme/device"
    );
    assert!(auth.verification_uri_complete.ends_with(&auth.user_code));
    assert_eq!(
        f.poll(&auth.device_code).await.unwrap_err().error,
        "authorization_pending"
    );

    // Wrong password: nothing approved.
    assert!(
        f.oauth
            .decide_device_code(&f.acme, &auth.user_code, "alice", "wrong", true)
            .await
            .is_err()
    );
    let lower = auth.user_code.to_lowercase();
    let client = f
        .oauth
        .decide_device_code(&f.acme, &lower, "alice", PASSWORD, true)
        .await
        .expect("approve");
    assert_eq!(client, "portal");
    tokio::time::sleep(Duration::from_millis(1_050)).await; // the polling interval
    let tokens = f.poll(&auth.device_code).await.expect("tokens");
    assert_eq!(tokens.scope, "tern:read");
    assert!(tokens.refresh_token.is_some());
    let principal = f
        .oauth
        .verify_access_token(&tokens.access_token)
        .await
        .expect("verify");
    assert_eq!(principal.caller, Caller::Tenant(f.acme.id));
    assert_eq!(
        f.poll(&auth.device_code).await.unwrap_err().error,
        "invalid_grant",
        "single use"
    );

    let denied = f
        .oauth
        .device_authorization(&f.acme, &f.app, None)
        .await
        .expect("auth");
    f.oauth
        .decide_device_code(&f.acme, &denied.user_code, "alice", PASSWORD, false)
        .await
        .expect("deny");
    assert_eq!(
        f.poll(&denied.device_code).await.unwrap_err().error,
        "access_denied"
    );
    // A user code of acme means nothing in globex.
    let other = f
        .oauth
        .device_authorization(&f.acme, &f.app, None)
        .await
        .expect("auth");
    assert!(
        f.oauth
            .decide_device_code(&f.globex, &other.user_code, "alice", PASSWORD, true)
            .await
            .is_err()
    );
    assert_eq!(
        f.poll(&other.device_code).await.unwrap_err().error,
        "authorization_pending"
    );
    let err = f.poll(&other.device_code).await.unwrap_err();
    assert_eq!(err.error, "slow_down", "polled faster than the interval");
    assert!(err.description.contains("every 6 seconds"), "{err}");
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    assert_eq!(
        f.poll(&other.device_code).await.unwrap_err().error,
        "slow_down",
        "the interval grew by 5 seconds"
    );
}

#[tokio::test]
async fn expired_device_codes_say_expired_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
    let registry = Arc::new(Registry::new(store.clone()));
    let config = IdentityConfig {
        public_url: "https://tern.example".into(),
        device_code_ttl_secs: 1,
        ..Default::default()
    };
    let keys = Arc::new(
        Keyring::load(store.clone(), 86_400, 3600)
            .await
            .expect("keys"),
    );
    let credentials = device_credentials(&store, &registry, &keys);
    let oauth = OAuth::new(store, registry.clone(), keys, credentials, config)
        .await
        .expect("oauth");
    let acme = registry.create_tenant("acme").await.expect("tenant");
    let client = oauth
        .clients
        .create(
            acme.id,
            NewClient {
                name: "sensor".into(),
                confidential: false,
                grant_types: vec![GrantType::DeviceCode],
                redirect_uris: vec![],
                scope: None,
            },
        )
        .await
        .expect("client");
    let credentials = ClientCredentials {
        client_id: Some(client.client_id),
        client_secret: None,
    };
    let auth = oauth
        .device_authorization(&acme, &credentials, None)
        .await
        .expect("auth");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let request = TokenRequest {
        device_code: Some(auth.device_code),
        ..grant(GrantType::DeviceCode.as_str())
    };
    let err = oauth
        .token(&acme, &credentials, &request)
        .await
        .unwrap_err();
    assert_eq!(err.error, "expired_token");
}

#[tokio::test]
async fn introspection_and_revocation() {
    let f = fixture().await;
    let token = f.client_token().await.access_token;
    let info = f
        .oauth
        .introspect(&f.acme, &token)
        .await
        .expect("introspect");
    assert_eq!(info["active"], true);
    assert_eq!(info["scope"], "tern:read tern:write");
    assert_eq!(info["client_id"], f.service.client_id.clone().expect("id"));
    let foreign = f
        .oauth
        .introspect(&f.globex, &token)
        .await
        .expect("introspect");
    assert_eq!(
        foreign,
        serde_json::json!({"active": false}),
        "another tenant learns nothing"
    );
    let garbage = f
        .oauth
        .introspect(&f.acme, "not a token")
        .await
        .expect("introspect");
    assert_eq!(garbage["active"], false);

    // Only the client the token was issued to can revoke it.
    let app_id = f.app.client_id.clone().expect("id");
    f.oauth
        .revoke(&f.acme, &app_id, &token)
        .await
        .expect("ignored");
    assert!(f.oauth.verify_access_token(&token).await.is_ok());
    let service_id = f.service.client_id.clone().expect("id");
    f.oauth
        .revoke(&f.acme, &service_id, &token)
        .await
        .expect("revoke");
    assert!(f.oauth.verify_access_token(&token).await.is_err());
    assert_eq!(
        f.oauth
            .introspect(&f.acme, &token)
            .await
            .expect("introspect")["active"],
        false
    );

    // A refresh token: introspected as such, revoked with its family.
    let tokens = f
        .redeem(&f.code("tern:read").await, VERIFIER)
        .await
        .expect("redeem");
    let refresh = tokens.refresh_token.expect("refresh");
    let info = f
        .oauth
        .introspect(&f.acme, &refresh)
        .await
        .expect("introspect");
    assert_eq!(
        (info["active"].clone(), info["token_type"].clone()),
        (true.into(), "refresh_token".into())
    );
    f.oauth
        .revoke(&f.acme, &app_id, &refresh)
        .await
        .expect("revoke");
    assert_eq!(
        f.refresh(&refresh).await.unwrap_err().error,
        "invalid_grant"
    );
    assert!(
        f.oauth
            .verify_access_token(&tokens.access_token)
            .await
            .is_err()
    );
}

/// Enrolment (scope `tern:device`): an enrolment client may do nothing else, a person cannot
/// take the code for themselves, and bound to a registry device the poll answers with that
/// device's own credentials.
#[tokio::test]
async fn enrolment_codes_give_the_bound_device_its_own_credentials() {
    let f = fixture().await;
    let new = |scope: &str, grant_types: Vec<GrantType>| NewClient {
        name: "enrolment".into(),
        confidential: false,
        grant_types,
        redirect_uris: vec![],
        scope: Some(scope.into()),
    };
    let clients = &f.oauth.clients;
    let mixed = new("tern:device tern:read", vec![GrantType::DeviceCode]);
    let err = clients.create(f.acme.id, mixed).await.unwrap_err();
    assert!(err.to_string().contains("`scope`"), "{err}");
    let refreshing = new(
        "tern:device",
        vec![GrantType::DeviceCode, GrantType::RefreshToken],
    );
    let err = clients.create(f.acme.id, refreshing).await.unwrap_err();
    assert!(err.to_string().contains("`grant_types`"), "{err}");
    let client = clients
        .create(f.acme.id, new("tern:device", vec![GrantType::DeviceCode]))
        .await
        .expect("enrolment client");
    let enrol = ClientCredentials {
        client_id: Some(client.client_id),
        client_secret: None,
    };
    let err = f
        .oauth
        .device_authorization(&f.acme, &f.app, Some("tern:device"))
        .await
        .unwrap_err();
    assert_eq!(err.error, "invalid_scope", "only enrolment clients enrol");

    let auth = f
        .oauth
        .device_authorization(&f.acme, &enrol, None)
        .await
        .expect("device authorization");
    let device = f
        .oauth
        .registry
        .create_device(
            "acme",
            tern_core::NewDevice {
                name: "pi".into(),
                ..Default::default()
            },
        )
        .await
        .expect("device");
    let plain = f
        .oauth
        .device_authorization(&f.acme, &f.app, Some("tern:read"))
        .await
        .expect("device authorization");
    assert!(matches!(
        f.oauth
            .approve_enrolment(&f.acme, &plain.user_code, device.id, "operator")
            .await,
        Err(IdentityError::Invalid(_))
    ));
    let err = f
        .oauth
        .decide_device_code(&f.acme, &auth.user_code, "alice", PASSWORD, true)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--device"), "{err}");
    assert!(matches!(
        f.oauth
            .check_enrolment_code(&f.globex, &auth.user_code)
            .await,
        Err(IdentityError::NotFound(_))
    ));
    f.oauth
        .check_enrolment_code(&f.acme, &auth.user_code)
        .await
        .expect("a pending enrolment");

    let poll = TokenRequest {
        device_code: Some(auth.device_code.clone()),
        ..grant(GrantType::DeviceCode.as_str())
    };
    let err = f.oauth.token(&f.acme, &enrol, &poll).await.unwrap_err();
    assert_eq!(err.error, "authorization_pending");
    let approved = f
        .oauth
        .approve_enrolment(
            &f.acme,
            &auth.user_code.to_lowercase(),
            device.id,
            "operator",
        )
        .await
        .expect("approve");
    assert_eq!(approved.client, "enrolment");
    tokio::time::sleep(Duration::from_millis(1_050)).await; // the polling interval
    let tokens = f.oauth.token(&f.acme, &enrol, &poll).await.expect("tokens");
    assert_eq!(tokens.scope, "tern:device");
    assert_eq!(
        (tokens.device_id, tokens.tenant_id),
        (Some(device.id), Some(f.acme.id))
    );
    let principal = f
        .oauth
        .device_credentials
        .verify(&tokens.access_token)
        .expect("a device access token");
    assert_eq!(principal.device_id, device.id);
    assert!(
        f.oauth
            .verify_access_token(&tokens.access_token)
            .await
            .is_err(),
        "not an API token"
    );
    let refreshed = f
        .oauth
        .device_credentials
        .refresh(tokens.refresh_token.as_deref().expect("refresh token"))
        .await
        .expect("the device's refresh token works");
    assert_eq!(refreshed.device_id, device.id);
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    let err = f.oauth.token(&f.acme, &enrol, &poll).await.unwrap_err();
    assert_eq!(err.error, "invalid_grant", "single use");
}
