//! The REST API: authentication, tenant isolation and clear errors.

use serde_json::{Value, json};

use crate::harness::Tern;

async fn call(
    tern: &Tern,
    method: &str,
    token: Option<&str>,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut req = client.request(
        method.parse().expect("method"),
        format!("{}{path}", tern.http()),
    );
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_and_tokens_are_checked() {
    let tern = Tern::start();
    let acme = tern.provision("acme", "a1");
    let globex = tern.provision("globex", "g1");

    // No token, a wrong token.
    let (status, body) = call(&tern, "GET", None, "/api/v1/tenants", None).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthenticated");
    let (status, _) = call(
        &tern,
        "GET",
        Some("tern_api_forged"),
        "/api/v1/tenants",
        None,
    )
    .await;
    assert_eq!(status, 401);

    // acme's API token: its own data yes, globex's no (by name or by id), tenants no.
    let latest = |t: &str, d: &str| format!("/api/v1/tenants/{t}/devices/{d}/telemetry/latest");
    let (status, _) = call(
        &tern,
        "GET",
        Some(&acme.api_token),
        &latest("acme", &acme.device_id),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = call(
        &tern,
        "GET",
        Some(&acme.api_token),
        &latest("globex", &globex.device_id),
        None,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let globex_id = tern.cli_json(&["tenant", "show", "globex"])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (status, _) = call(
        &tern,
        "GET",
        Some(&acme.api_token),
        &latest(&globex_id, &globex.device_id),
        None,
    )
    .await;
    assert_eq!(status, 403);
    // globex's device id under acme's own tenant is simply not there.
    let (status, _) = call(
        &tern,
        "GET",
        Some(&acme.api_token),
        &latest("acme", &globex.device_id),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &tern,
        "POST",
        Some(&acme.api_token),
        "/api/v1/tenants",
        Some(json!({"name": "evil"})),
    )
    .await;
    assert_eq!(status, 403);
    let (status, body) = call(&tern, "GET", Some(&acme.api_token), "/api/v1/tenants", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        body.as_array().map(Vec::len),
        Some(1),
        "a tenant token lists only its tenant"
    );

    // A device token is not an API token.
    let (status, _) = call(
        &tern,
        "GET",
        Some(&acme.access_token),
        "/api/v1/tenants",
        None,
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field() {
    let tern = Tern::start();
    let p = tern.provision("acme", "d");
    let op = tern.operator_token();
    let devices = "/api/v1/tenants/acme/devices";

    let (status, body) = call(
        &tern,
        "POST",
        Some(&op),
        devices,
        Some(json!({"name": "x", "labels": {"bad key": "v"}})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["field"], "labels.bad key");
    let (status, body) = call(
        &tern,
        "POST",
        Some(&op),
        devices,
        Some(json!({"nmae": "typo"})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("nmae"),
        "{body}"
    );
    let (status, body) = call(
        &tern,
        "POST",
        Some(&op),
        devices,
        Some(json!({"name": "d"})),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = call(
        &tern,
        "POST",
        Some(&op),
        "/api/v1/tenants",
        Some(json!({"name": "Not A Slug"})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["field"], "name");

    let telemetry = format!("/api/v1/tenants/acme/devices/{}/telemetry", p.device_id);
    let (status, body) = call(&tern, "GET", Some(&op), &telemetry, None).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["field"], "metric");
    let (status, body) = call(
        &tern,
        "GET",
        Some(&op),
        &format!("{telemetry}?metric=t&limit=0"),
        None,
    )
    .await;
    assert_eq!(
        (status, body["error"]["field"].clone()),
        (400, json!("limit"))
    );
    let (status, body) = call(
        &tern,
        "GET",
        Some(&op),
        &format!("{telemetry}?metric=t&from=abc"),
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = call(
        &tern,
        "GET",
        Some(&op),
        "/api/v1/tenants/nope/devices",
        None,
    )
    .await;
    assert_eq!(status, 404);

    // Deleting a tenant with devices is refused, after deleting them it works.
    let (status, _) = call(&tern, "DELETE", Some(&op), "/api/v1/tenants/acme", None).await;
    assert_eq!(status, 409);
    let (status, _) = call(
        &tern,
        "DELETE",
        Some(&op),
        "/api/v1/tenants/acme/devices/d",
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = call(&tern, "DELETE", Some(&op), "/api/v1/tenants/acme", None).await;
    assert_eq!(status, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_tokens_rotate_and_revocation_ends_them() {
    let tern = Tern::start();
    let _p = tern.provision("acme", "d");
    let first = tern.cli_json(&["token", "device", "d", "--tenant", "acme"]);
    let refresh = first["refresh_token"]
        .as_str()
        .expect("refresh")
        .to_string();

    let (status, second) = call(
        &tern,
        "POST",
        None,
        "/api/v1/token/refresh",
        Some(json!({"refresh_token": refresh})),
    )
    .await;
    assert_eq!(status, 200, "{second}");
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    let (status, _) = call(
        &tern,
        "POST",
        None,
        "/api/v1/token/refresh",
        Some(json!({"refresh_token": refresh})),
    )
    .await;
    assert_eq!(status, 401, "a rotated refresh token is spent");

    let op = tern.operator_token();
    let (status, body) = call(
        &tern,
        "DELETE",
        Some(&op),
        "/api/v1/tenants/acme/devices/d/tokens",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(body["revoked"].as_u64().expect("count") >= 1);
    let (status, _) = call(
        &tern,
        "POST",
        None,
        "/api/v1/token/refresh",
        Some(json!({"refresh_token": second["refresh_token"]})),
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let tern = Tern::start();
    let (status, _) = call(&tern, "GET", None, "/healthz", None).await;
    assert_eq!(status, 200);
    let (status, _) = call(&tern, "GET", None, "/readyz", None).await;
    assert_eq!(status, 200);
    let text = tern.metrics_text().await;
    for metric in [
        "tern_bridge_connections",
        "tern_bridge_log_append_seconds",
        "tern_analytics_store_write_seconds",
        "tern_gateway_http_requests_total",
    ] {
        assert!(text.contains(metric), "{metric} missing from /metrics");
    }
}

#[test]
fn cli_errors_are_clear() {
    let tern = Tern::start();
    let out = tern.cli(&["device", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tenant"));
    let out = tern.cli(&["device", "list", "--tenant", "ghost"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    let out = std::process::Command::new(crate::harness::TERN)
        .args([
            "tenant",
            "list",
            "--server",
            "http://127.0.0.1:9",
            "--token",
            "x",
        ])
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the Tern server"));
    // Human output is a table with a header; JSON output parses.
    tern.cli_json(&["tenant", "create", "acme"]);
    let human = String::from_utf8_lossy(&tern.cli(&["tenant", "list"]).stdout).into_owned();
    assert!(human.starts_with("ID") && human.contains("acme"), "{human}");
}
