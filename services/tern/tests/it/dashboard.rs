//! The dashboard in a real browser: Debian's Chromium, headless, against `tern up`.

use std::process::Command;

use crate::harness::{Mqtt, Tern};
use crate::webdriver::Driver;

/// Loads `url` in headless Chromium, lets its scripts and fetches run, and returns the DOM.
fn rendered_dom(url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=15000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .output()
        .expect("chromium must be installed (make deps)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_and_latest_values_show_up_in_the_browser() {
    let tern = Tern::start();
    let p = tern.provision("acme", "boiler-1");
    let mut mqtt = Mqtt::connect(Mqtt::options(tern.mqtt_port, &p.device_id, &p.access_token))
        .await
        .expect("connect");
    mqtt.publish_acked(
        "telemetry",
        vec![br#"{"temp": 21.5, "pressure": 1013}"#.to_vec()],
    )
    .await;
    assert_eq!(tern.wait_points(&p, "temp", 1).await.len(), 1);

    let url = format!("{}/#tenant=acme&token={}", tern.http(), p.api_token);
    let dom = tokio::task::spawn_blocking(move || rendered_dom(&url))
        .await
        .expect("browser");
    assert!(
        dom.contains(&format!("data-device=\"{}\"", p.device_id)),
        "{dom}"
    );
    assert!(
        dom.contains("boiler-1") && dom.contains("site=test"),
        "{dom}"
    );
    assert!(
        dom.contains("data-metric=\"temp\"") && dom.contains("<b>21.5</b>"),
        "{dom}"
    );
    assert!(dom.contains("<b>1013</b>"), "{dom}");
    assert!(
        dom.contains("<form id=\"sign-in\" hidden"),
        "signed in: the form is hidden"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_session_the_sign_in_form_shows_and_a_foreign_token_is_refused() {
    let tern = Tern::start();
    let acme = tern.provision("acme", "a");
    tern.provision("globex", "g");

    let url = format!("{}/", tern.http());
    let dom = tokio::task::spawn_blocking(move || rendered_dom(&url))
        .await
        .expect("browser");
    assert!(dom.contains("<form id=\"sign-in\">"), "{dom}");
    assert!(dom.contains("<section id=\"devices\" hidden"), "{dom}");

    // acme's token asking for globex: the page signs out with the server's reason.
    let url = format!("{}/#tenant=globex&token={}", tern.http(), acme.api_token);
    let dom = tokio::task::spawn_blocking(move || rendered_dom(&url))
        .await
        .expect("browser");
    assert!(
        dom.contains("Signed out: this token is not valid for tenant"),
        "{dom}"
    );
    assert!(
        !dom.contains("data-device="),
        "no device of either tenant is shown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_carry_a_strict_content_security_policy() {
    let tern = Tern::start();
    let response = reqwest::get(format!("{}/", tern.http()))
        .await
        .expect("GET /");
    assert_eq!(response.status(), 200);
    let csp = response.headers()["content-security-policy"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(response.headers()["x-frame-options"], "DENY");
    let js = reqwest::get(format!("{}/assets/app.js", tern.http()))
        .await
        .expect("GET app.js");
    assert!(
        js.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/javascript")
    );
    assert!(
        !js.text().await.expect("body").contains("innerHTML"),
        "data is rendered as text only"
    );
}

/// A person signs in to the dashboard with their account: the sign-in page of the tenant's
/// authorization server (authorization code with PKCE, the built-in `tern-portal` client),
/// back to the dashboard, which shows the tenant's devices and keeps renewing its short-lived
/// access token with the refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_with_their_account_and_stays_signed_in() {
    // Access tokens live 2 s, so the page must renew several times while it is watched.
    let tern = Tern::start_with_env(&[("TERN_IDENTITY__ACCESS_TOKEN_TTL_SECS", "2")]);
    let p = tern.provision("acme", "boiler-1");
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "user", "create", "alice", "--role", "viewer", "--tenant", "acme",
        ])
        .env("TERN_SERVER", tern.http())
        .env("TERN_TOKEN_FILE", tern.data_dir().join("admin.token"))
        .env("TERN_PASSWORD", "correct horse battery")
        .output()
        .expect("tern user create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let driver = Driver::start().await;
    // `localhost`, the default public_url: the portal client redirects there only.
    let dashboard = format!("http://localhost:{}/", tern.http_port);
    driver.goto(&dashboard).await;
    driver.type_into("#tenant", "acme").await;
    driver.click("#sign-in-account").await;
    // The authorization server's page: a wrong password first.
    driver.type_into("input[name=username]", "alice").await;
    driver.type_into("input[name=password]", "wrong").await;
    driver.click("button[value=approve]").await;
    driver.find("#error").await;
    driver.type_into("input[name=username]", "alice").await;
    driver
        .type_into("input[name=password]", "correct horse battery")
        .await;
    driver.click("button[value=approve]").await;

    let row = format!("tr[data-device=\"{}\"]", p.device_id);
    driver.find(&row).await;
    assert_eq!(
        driver.current_url().await,
        dashboard,
        "the code is gone from the address bar"
    );
    assert_eq!(driver.text("#who").await, "alice in tenant acme");
    // Three lifetimes later the page still loads devices with renewed tokens.
    tokio::time::sleep(std::time::Duration::from_secs(7)).await;
    let updated = driver.text("#updated").await;
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    assert_ne!(driver.text("#updated").await, updated, "still refreshing");
    driver.find(&row).await;
    assert!(driver.text("#error").await.is_empty());

    // Signing out revokes the refresh token on the server as well.
    let stored = driver
        .execute("return sessionStorage.getItem('tern.session')")
        .await;
    let stored: serde_json::Value =
        serde_json::from_str(stored.as_str().expect("a session")).expect("JSON");
    let refresh_token = stored["refresh"]
        .as_str()
        .expect("refresh token")
        .to_string();
    driver.click("#sign-out").await;
    driver.find("#sign-in:not([hidden])").await;
    driver.quit().await;
    let token_endpoint = format!("{}/oauth2/acme/token", tern.http());
    let refused = async || {
        let r = reqwest::Client::new()
            .post(&token_endpoint)
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token.as_str()),
                ("client_id", "tern-portal"),
            ])
            .send()
            .await
            .expect("token request");
        r.status() == 400
    };
    assert!(
        tern_eventlog::testing::eventually(refused).await,
        "the refresh token was revoked"
    );
}
