//! The OAuth 2.0 authorization server end to end: Authlib (a third-party client) through every
//! grant, the CLI for clients, users and device approval, and OAuth tokens at the REST API and
//! gRPC with their scopes and their tenant.

use std::process::{Command, Stdio};

use serde_json::{Value, json};
use tern_proto::tonic;
use tern_proto::v1::{ListDevicesRequest, registry_client::RegistryClient};

use crate::harness::Tern;

const PASSWORD: &str = "correct horse battery";

/// The status code of a failed call (`None` if it succeeded).
fn denied<T>(result: Result<T, tonic::Status>) -> Option<tonic::Code> {
    result.err().map(|e| e.code())
}

fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata"),
    );
    req
}

/// Creates user alice (editor) and the clients the tests use in `tenant`.
fn setup(tern: &Tern, tenant: &str) -> (Value, Value) {
    if !tern.cli(&["tenant", "show", tenant]).status.success() {
        tern.cli_json(&["tenant", "create", tenant]);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "user", "create", "alice", "--role", "editor", "--group", "ops",
        ])
        .args(["--tenant", tenant, "--output", "json"])
        .env("TERN_SERVER", tern.http())
        .env("TERN_TOKEN_FILE", tern.data_dir().join("admin.token"))
        .env("TERN_PASSWORD", PASSWORD)
        .output()
        .expect("tern user create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let user: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(user.get("password").is_none() && user.get("password_hash").is_none());
    let service = tern.cli_json(&[
        "client",
        "create",
        "--tenant",
        tenant,
        "--name",
        "billing",
        "--grant",
        "client_credentials",
        "--scope",
        "tern:read tern:write",
    ]);
    let app = tern.cli_json(&[
        "client",
        "create",
        "--tenant",
        tenant,
        "--name",
        "portal",
        "--public",
        "--grant",
        "authorization_code",
        "--grant",
        "refresh_token",
        "--grant",
        "device_code",
        "--redirect-uri",
        "http://127.0.0.1:9/callback",
        "--scope",
        "openid profile tern:read tern:write",
    ]);
    assert!(
        app["client_secret"].is_null(),
        "public clients have no secret"
    );
    (service, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authlib_completes_every_grant_against_tern() {
    let tern = Tern::start();
    let (service, app) = setup(&tern, "acme");
    let issuer = format!("http://localhost:{}/oauth2/acme", tern.http_port);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/interop/authlib_oauth.py"
    );
    let out = tokio::task::block_in_place(|| {
        Command::new("/usr/bin/python3")
            .arg(script)
            .arg(&issuer)
            .arg(service["client_id"].as_str().expect("id"))
            .arg(service["client_secret"].as_str().expect("secret"))
            .arg(app["client_id"].as_str().expect("id"))
            .args(["alice", PASSWORD])
            .output()
            .expect("run /usr/bin/python3 (make deps installs python3-authlib)")
    });
    assert!(
        out.status.success(),
        "authlib: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tokens: Value = serde_json::from_slice(&out.stdout).expect("json");

    // What Authlib obtained works at the API, within its scope and tenant.
    let device_flow = tokens["device_flow_token"].as_str().expect("token");
    assert_eq!(
        tern.get(device_flow, "/api/v1/tenants/acme/devices")
            .await
            .0,
        200
    );
    let (status, body) = tern
        .send_json(
            reqwest::Method::POST,
            device_flow,
            "/api/v1/tenants/acme/devices",
            &json!({"name": "d"}),
        )
        .await;
    assert_eq!(status, 403, "tern:read only: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("tern:write")
    );
    for revoked in ["service_token", "revoked_family_token"] {
        let token = tokens[revoked].as_str().expect("token");
        assert_eq!(
            tern.get(token, "/api/v1/tenants/acme/devices").await.0,
            401,
            "{revoked}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_tokens_reach_only_their_tenant_over_rest_and_grpc() {
    let tern = Tern::start();
    let (service, _) = setup(&tern, "acme");
    tern.provision("acme", "a1");
    tern.provision("globex", "g1");
    let token = tern
        .client_token("acme", &service, "tern:read tern:write")
        .await;

    assert_eq!(
        tern.get(&token, "/api/v1/tenants/acme/devices").await.0,
        200
    );
    let (status, _) = tern
        .send_json(
            reqwest::Method::POST,
            &token,
            "/api/v1/tenants/acme/devices",
            &json!({"name": "a2"}),
        )
        .await;
    assert_eq!(status, 201, "tern:write creates devices");
    for path in [
        "/api/v1/tenants/globex",
        "/api/v1/tenants/globex/devices",
        "/api/v1/tenants/globex/devices/g1/telemetry",
        "/api/v1/tenants/globex/rules",
    ] {
        assert_eq!(tern.get(&token, path).await.0, 403, "{path}");
    }
    let (status, tenants) = tern.get(&token, "/api/v1/tenants").await;
    assert_eq!(status, 200);
    assert_eq!(
        tenants.as_array().map(Vec::len),
        Some(1),
        "sees only acme: {tenants}"
    );
    // Credentials need tern:admin, which this client was not given.
    for path in [
        "/api/v1/tenants/acme/users",
        "/api/v1/tenants/acme/oauth-clients",
    ] {
        assert_eq!(tern.get(&token, path).await.0, 403, "{path}");
    }
    // The token endpoint of globex does not know acme's client.
    let r = reqwest::Client::new()
        .post(format!("{}/oauth2/globex/token", tern.http()))
        .basic_auth(
            service["client_id"].as_str().expect("id"),
            service["client_secret"].as_str(),
        )
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect("token");
    assert_eq!(r.status().as_u16(), 401);

    // gRPC: the same token lists acme's devices and nothing of globex.
    let mut grpc = RegistryClient::connect(format!("http://127.0.0.1:{}", tern.grpc_port))
        .await
        .expect("grpc");
    let list = |tenant: &str| {
        let mut req = tonic::Request::new(ListDevicesRequest {
            tenant_id: tenant.into(),
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("metadata"),
        );
        req
    };
    let devices = grpc
        .list_devices(list("acme"))
        .await
        .expect("acme")
        .into_inner();
    assert_eq!(devices.devices.len(), 2);
    let err = grpc.list_devices(list("globex")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_approves_device_codes_and_lockout_is_lifted_by_an_admin() {
    let tern = Tern::start();
    let (_, app) = setup(&tern, "acme");
    let http = reqwest::Client::new();
    let app_id = app["client_id"].as_str().expect("id");
    let device: Value = http
        .post(format!("{}/oauth2/acme/device_authorization", tern.http()))
        .form(&[("client_id", app_id), ("scope", "tern:read")])
        .send()
        .await
        .expect("device authorization")
        .json()
        .await
        .expect("json");
    let user_code = device["user_code"].as_str().expect("user code");

    // The person approves from the CLI, the password on stdin.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "token",
            "approve",
            user_code,
            "--user",
            "alice",
            "--password-stdin",
        ])
        .args(["--tenant", "acme", "--output", "json"])
        .env("TERN_SERVER", tern.http())
        .env("TERN_TOKEN_FILE", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tern token approve");
    use std::io::Write;
    writeln!(child.stdin.take().expect("stdin"), "{PASSWORD}").expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (answer["approved"].clone(), answer["client"].clone()),
        (json!(true), json!("portal"))
    );
    tokio::time::sleep(std::time::Duration::from_secs(
        device["interval"].as_u64().expect("interval"),
    ))
    .await;
    let token: Value = http
        .post(format!("{}/oauth2/acme/token", tern.http()))
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device["device_code"].as_str().expect("code")),
            ("client_id", app_id),
        ])
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("json");
    let access = token["access_token"].as_str().expect("access token");
    assert_eq!(
        tern.get(access, "/api/v1/tenants/acme/devices").await.0,
        200
    );

    // Five wrong passwords lock alice; the right one then fails until an admin unlocks her.
    let wrong = |password: &'static str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern"));
        cmd.args([
            "token",
            "approve",
            "BCDF-GHJK",
            "--user",
            "alice",
            "--tenant",
            "acme",
        ])
        .env("TERN_SERVER", tern.http())
        .env("TERN_TOKEN_FILE", "/nonexistent")
        .env("TERN_PASSWORD", password);
        cmd.output().expect("tern token approve")
    };
    for _ in 0..5 {
        let out = wrong("not the password");
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("401"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let user = tern.cli_json(&["user", "show", "alice", "--tenant", "acme"]);
    assert!(user["locked_until_ms"].as_i64().is_some(), "{user}");
    assert!(
        String::from_utf8_lossy(&wrong(PASSWORD).stderr).contains("401"),
        "locked"
    );
    tern.cli_json(&["user", "unlock", "alice", "--tenant", "acme"]);
    let out = wrong(PASSWORD);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "signed in; the unknown code is what fails now: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The isolation matrix: an OAuth token of acme holding every scope gets 403 on every route
/// of globex, REST and gRPC, and changes nothing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acme_token_with_every_scope_can_do_nothing_in_globex() {
    use tern_proto::v1::identity_client::IdentityClient;
    use tern_proto::v1::{
        AuthorizeRequest, CreateApiTokenRequest, CreateDeviceRequest, GetDeviceRequest,
        IssueDeviceTokensRequest,
    };

    let tern = Tern::start();
    let (_, _) = setup(&tern, "acme");
    let admin = tern.cli_json(&[
        "client",
        "create",
        "--tenant",
        "acme",
        "--name",
        "root",
        "--grant",
        "client_credentials",
        "--scope",
        "tern:read tern:write tern:admin",
    ]);
    let token = tern
        .client_token("acme", &admin, "tern:read tern:write tern:admin")
        .await;
    let g = tern.provision("globex", "g1");
    let t = "/api/v1/tenants/globex";
    let d = "/api/v1/tenants/globex/devices/g1";
    let routes: Vec<(reqwest::Method, String)> = {
        use reqwest::Method as M;
        vec![
            (M::GET, t.into()),
            (M::DELETE, t.into()),
            (M::GET, format!("{t}/devices")),
            (M::POST, format!("{t}/devices")),
            (M::POST, format!("{t}/api-tokens")),
            (M::GET, format!("{t}/oauth-clients")),
            (M::POST, format!("{t}/oauth-clients")),
            (M::GET, format!("{t}/users")),
            (M::POST, format!("{t}/users")),
            (M::PUT, format!("{t}/users/alice/password")),
            (M::POST, format!("{t}/commands")),
            (M::GET, format!("{t}/rules")),
            (M::POST, format!("{t}/rules")),
            (M::POST, format!("{t}/rule-tests")),
            (M::GET, format!("{t}/alerts")),
            (M::GET, format!("{t}/jobs")),
            (M::POST, format!("{t}/jobs/rebuild-rollups")),
            (M::GET, format!("{t}/retention")),
            (M::PUT, format!("{t}/retention")),
            (M::GET, format!("{t}/cas")),
            (M::GET, format!("{t}/policies")),
            (M::PUT, format!("{t}/policies/allow-all")),
            (M::POST, format!("{t}/policy-rollback")),
            (M::GET, format!("{t}/policy-decisions")),
            (M::PUT, format!("{t}/policy-audit")),
            (M::POST, format!("{t}/pdp/authorize")),
            (M::GET, d.into()),
            (M::PATCH, d.into()),
            (M::DELETE, d.into()),
            (M::POST, format!("{d}/tokens")),
            (M::DELETE, format!("{d}/tokens")),
            (M::GET, format!("{d}/telemetry")),
            (M::GET, format!("{d}/telemetry/latest")),
            (M::GET, format!("{d}/events")),
            (M::GET, format!("{d}/status")),
            (M::GET, format!("{d}/twin")),
            (M::PATCH, format!("{d}/twin/desired")),
            (M::POST, format!("{d}/commands")),
            (M::GET, format!("{d}/commands")),
            (M::POST, format!("{d}/operations/reboot")),
        ]
    };
    for (method, path) in routes {
        let (status, body) = tern
            .send_json(method.clone(), &token, &path, &json!({}))
            .await;
        assert_eq!(status, 403, "{method} {path}: {body}");
    }
    // globex is untouched: its device is still there and enabled.
    let (status, device) = tern
        .get(&g.api_token, "/api/v1/tenants/globex/devices/g1")
        .await;
    assert_eq!((status, device["disabled"].clone()), (200, json!(false)));

    let endpoint = format!("http://127.0.0.1:{}", tern.grpc_port);
    let mut registry = RegistryClient::connect(endpoint.clone())
        .await
        .expect("grpc");
    let get = GetDeviceRequest {
        tenant_id: "globex".into(),
        device_id: "g1".into(),
    };
    assert_eq!(
        denied(registry.get_device(bearer(get, &token)).await),
        Some(tonic::Code::PermissionDenied)
    );
    let create = CreateDeviceRequest {
        tenant_id: "globex".into(),
        name: "intruder".into(),
        ..Default::default()
    };
    assert_eq!(
        denied(registry.create_device(bearer(create, &token)).await),
        Some(tonic::Code::PermissionDenied)
    );
    let mut identity = IdentityClient::connect(endpoint).await.expect("grpc");
    let issue = IssueDeviceTokensRequest {
        tenant_id: "globex".into(),
        device_id: "g1".into(),
    };
    assert_eq!(
        denied(identity.issue_device_tokens(bearer(issue, &token)).await),
        Some(tonic::Code::PermissionDenied)
    );
    let api = CreateApiTokenRequest {
        tenant_id: "globex".into(),
        name: "x".into(),
    };
    assert_eq!(
        denied(identity.create_api_token(bearer(api, &token)).await),
        Some(tonic::Code::PermissionDenied)
    );
    let authorize = AuthorizeRequest {
        tenant_id: "globex".into(),
        requests: vec![],
    };
    assert_eq!(
        denied(identity.authorize(bearer(authorize, &token)).await),
        Some(tonic::Code::PermissionDenied)
    );
}
