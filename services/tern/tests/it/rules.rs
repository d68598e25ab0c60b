//! Rules end to end: a device publishes over MQTT, a rule fires, a second device gets the
//! command and an alert opens; windowed state survives kill -9 without lost or repeated
//! actions; rule SQL errors point at the token; tenants cannot see each other's rules.

use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::{Value, json};

use crate::harness::{Mqtt, Provisioned, Tern};

const PATIENCE: Duration = Duration::from_secs(20);

/// A device of `tenant` with one label and no others.
pub(crate) fn device_labelled(tern: &Tern, tenant: &str, name: &str, label: &str) -> Provisioned {
    let base = tern.provision(tenant, &format!("{name}-probe"));
    let d = tern.cli_json(&[
        "device", "create", name, "--tenant", tenant, "--label", label,
    ]);
    let tokens = tern.cli_json(&["token", "device", name, "--tenant", tenant]);
    Provisioned {
        device_id: d["id"].as_str().expect("id").to_string(),
        access_token: tokens["access_token"].as_str().expect("token").to_string(),
        ..base
    }
}

/// Saves a rule with the CLI; returns what it printed (JSON).
pub(crate) fn create_rule(
    tern: &Tern,
    tenant: &str,
    name: &str,
    sql: &str,
    actions: &[&str],
) -> Value {
    let mut args = vec![
        "rule", "create", "--tenant", tenant, "--name", name, "--sql", sql,
    ];
    for action in actions {
        args.extend(["--action", action]);
    }
    tern.cli_json(&args)
}

/// A per-device window over a meter's `kwh` readings: a `report` row per device and minute.
pub(crate) const PER_MINUTE: &str = "SELECT device, window_start, count(*) AS n, \
    sum(kwh) AS total FROM telemetry GROUP BY device, TUMBLE(ts, INTERVAL '1' MINUTE)";

/// Readings `from..from + n` of a meter: `kwh` is the index, and the device's own clock puts
/// them 100 ms apart from `minute`.
pub(crate) fn readings(minute: i64, from: i64, n: i64) -> Vec<Vec<u8>> {
    (from..from + n)
        .map(|i| {
            json!({"kwh": i, "ts": minute + i * 100})
                .to_string()
                .into_bytes()
        })
        .collect()
}

/// Polls a REST path until `done` holds for its JSON body.
async fn wait_for(tern: &Tern, token: &str, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = tern.get(token, path).await;
        assert_eq!(status, 200, "{body}");
        if done(&body) || Instant::now() > deadline {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_fires_a_rule_that_commands_another_device_and_raises_an_alert() {
    let tern = Tern::start();
    let sensor = device_labelled(&tern, "acme", "boiler", "site=berlin");
    let valve = device_labelled(&tern, "acme", "valve", "role=valve");
    let rule = create_rule(
        &tern,
        "acme",
        "hot",
        "SELECT device, temp, labels.site FROM telemetry WHERE temp > 50 AND labels.site = 'berlin'",
        &["alert:critical", "command:open-valve@role=valve"],
    );
    assert_eq!(
        (&rule["name"], &rule["enabled"]),
        (&json!("hot"), &json!(true)),
        "{rule}"
    );
    assert_eq!(
        rule["actions"],
        json!(["alert:critical", "command:open-valve@role=valve"])
    );

    let mut valve_mqtt = Mqtt::device(&tern, &valve).await;
    valve_mqtt
        .subscribe("command/req/#", QoS::AtLeastOnce)
        .await;
    let mut boiler = Mqtt::device(&tern, &sensor).await;
    boiler
        .publish_acked(
            "telemetry",
            vec![br#"{"temp": 40}"#.to_vec(), br#"{"temp": 61.5}"#.to_vec()],
        )
        .await;

    let got = tokio::time::timeout(PATIENCE, valve_mqtt.received())
        .await
        .expect("command in time");
    let parts: Vec<&str> = got.topic.split('/').collect();
    assert_eq!(parts[..2], ["command", "req"]);
    assert_eq!(parts[3], "open-valve");
    let payload: Value = serde_json::from_str(&got.payload).expect("JSON");
    assert_eq!(
        payload,
        json!({"rule": "hot", "row": {"device": sensor.device_id, "temp": 61.5, "site": "berlin"}})
    );

    let alerts_path = "/api/v1/tenants/acme/alerts?state=active";
    let alerts = wait_for(&tern, &sensor.api_token, alerts_path, |b| {
        b.as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    let alert = &alerts[0];
    assert_eq!(
        (&alert["rule_name"], &alert["severity"], &alert["count"]),
        (&json!("hot"), &json!("critical"), &json!(1))
    );
    assert_eq!(alert["device_id"], sensor.device_id);
    assert_eq!(alert["details"]["temp"], 61.5);

    // A second hot reading folds into the open alert rather than opening another.
    boiler
        .publish_acked("telemetry", vec![br#"{"temp": 70}"#.to_vec()])
        .await;
    let alerts = wait_for(&tern, &sensor.api_token, alerts_path, |b| {
        b[0]["count"] == 2
    })
    .await;
    assert_eq!(alerts.as_array().map(Vec::len), Some(1), "{alerts}");
    let id = alerts[0]["id"].as_str().expect("id").to_string();
    let acked = tern.cli_json(&["alert", "ack", &id, "--tenant", "acme"]);
    assert_eq!(acked["state"], "acknowledged");
    let cleared = tern.cli_json(&["alert", "clear", &id, "--tenant", "acme"]);
    assert_eq!(cleared["state"], "cleared");
    let listed = tern.cli_json(&["alert", "list", "--tenant", "acme", "--state", "cleared"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1));

    // Disabled, the rule stops acting; the change applies without a restart.
    let disabled = tern.cli_json(&["rule", "disable", "hot", "--tenant", "acme"]);
    assert_eq!(disabled["enabled"], false);
    boiler
        .publish_acked("telemetry", vec![br#"{"temp": 99}"#.to_vec()])
        .await;
    // The later, cooler device's reading proves the engine has moved past the hot one.
    let witness = create_rule(
        &tern,
        "acme",
        "witness",
        "SELECT device FROM telemetry WHERE marker = 1",
        &["alert:info"],
    );
    assert_eq!(witness["enabled"], true);
    boiler
        .publish_acked("telemetry", vec![br#"{"marker": 1}"#.to_vec()])
        .await;
    wait_for(
        &tern,
        &sensor.api_token,
        "/api/v1/tenants/acme/alerts?rule=witness",
        |b| b.as_array().is_some_and(|a| !a.is_empty()),
    )
    .await;
    let hot = tern.cli_json(&["alert", "list", "--tenant", "acme", "--rule", "hot"]);
    assert_eq!(
        hot.as_array().map(Vec::len),
        Some(1),
        "no new occurrence while disabled: {hot}"
    );
    assert_eq!(hot[0]["state"], "cleared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_state_survives_kill_9_without_lost_or_repeated_actions() {
    let mut tern = Tern::start();
    let p = tern.provision("acme", "meter");
    create_rule(&tern, "acme", "per-minute", PER_MINUTE, &["command:report"]);
    // A minute a few minutes ahead, so that only the device's own clock closes it.
    let minute = (tern_core::now_ms() / 60_000 + 5) * 60_000;
    let batch = |from, n| readings(minute, from, n);
    let mut device = Mqtt::device(&tern, &p).await;
    device.publish_acked("telemetry", batch(0, 30)).await;
    tern.wait_points(&p, "kwh", 30).await;
    tern.kill9();
    tern.start_again();
    let mut device = Mqtt::device(&tern, &p).await;
    device.publish_acked("telemetry", batch(30, 20)).await;
    // A message two minutes on moves the device's watermark past the window and its lateness.
    device
        .publish_acked(
            "telemetry",
            vec![
                json!({"kwh": 0, "ts": minute + 120_000})
                    .to_string()
                    .into_bytes(),
            ],
        )
        .await;

    let commands = format!("/api/v1/tenants/acme/devices/{}/commands", p.device_id);
    wait_for(&tern, &p.api_token, &commands, |b| {
        b["commands"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    // Give a duplicate, if there were one, time to appear.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listed = tern.get(&p.api_token, &commands).await.1;
    let reports: Vec<&Value> = listed["commands"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|c| c["name"] == "report")
        .collect();
    assert_eq!(reports.len(), 1, "one command for the window: {listed}");
    let row = &reports[0]["payload"]["row"];
    assert_eq!(row["window_start"], minute);
    assert_eq!(
        row["n"], 50,
        "every message counted once across the crash: {row}"
    );
    assert_eq!(row["total"], (0..50).sum::<i64>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_errors_are_specific_and_rules_are_per_tenant() {
    let tern = Tern::start();
    let acme = tern.provision("acme", "a");
    let globex = tern.provision("globex", "g");
    // What the API says to a rule `acme` saves: the status and the field at fault.
    let save = |token: &str, tenant: &str, body: Value| {
        let (token, path) = (token.to_string(), format!("/api/v1/tenants/{tenant}/rules"));
        let tern = &tern;
        async move {
            tern.send_json(reqwest::Method::POST, &token, &path, &body)
                .await
        }
    };
    let refused = |body: Value| {
        let save = &save;
        let token = acme.api_token.clone();
        async move {
            let (status, body) = save(&token, "acme", body).await;
            assert_eq!(status, 400, "{body}");
            (
                body["error"]["field"].clone(),
                body["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        }
    };
    let (field, message) = refused(json!({"name": "bad", "sql": "SELECT device FROM telemetry WHERE temp >> 5", "actions": ["alert"]})).await;
    assert_eq!(field, "sql");
    assert!(message.contains("line 1, column 36"), "{message}");
    let sitewide = "SELECT labels.site, avg(temp) FROM telemetry GROUP BY labels.site, TUMBLE(ts, INTERVAL '1' MINUTE)";
    let (field, _) =
        refused(json!({"name": "sitewide", "sql": sitewide, "actions": ["command:cool"]})).await;
    assert_eq!(field, "actions", "command:NAME needs rows per device");
    let (field, _) = refused(
        json!({"name": "bad", "sql": "SELECT device FROM telemetry", "actions": ["page:someone"]}),
    )
    .await;
    assert_eq!(field, "actions");

    let ok = json!({"name": "hot", "sql": "SELECT device FROM telemetry WHERE temp > 1", "actions": ["alert"]});
    assert_eq!(save(&acme.api_token, "acme", ok.clone()).await.0, 201);
    assert_eq!(
        save(&acme.api_token, "acme", ok.clone()).await.0,
        409,
        "names are unique per tenant"
    );
    assert_eq!(
        save(&globex.api_token, "globex", ok).await.0,
        201,
        "another tenant may reuse it"
    );

    // A tenant's token sees none of another tenant's rules or alerts.
    let (status, _) = tern
        .get(&globex.api_token, "/api/v1/tenants/acme/rules")
        .await;
    assert_eq!(status, 403);
    let (status, _) = tern
        .get(&globex.api_token, "/api/v1/tenants/acme/alerts")
        .await;
    assert_eq!(status, 403);
    let (_, rules) = tern
        .get(&globex.api_token, "/api/v1/tenants/globex/rules")
        .await;
    assert_eq!(rules.as_array().map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_test_replays_stored_telemetry_without_acting() {
    let tern = Tern::start();
    let p = tern.provision("acme", "meter");
    let mut device = Mqtt::device(&tern, &p).await;
    let base = (tern_core::now_ms() / 60_000 - 30) * 60_000;
    let payloads = [
        (0, 10.0),
        (20_000, 30.0),
        (60_000, 5.0),
        (61_000, 7.0),
        (200_000, 1.0),
    ]
    .iter()
    .map(|(at, v)| json!({"temp": v, "ts": base + at}).to_string().into_bytes())
    .collect();
    device.publish_acked("telemetry", payloads).await;
    tern.wait_points(&p, "temp", 5).await;
    let from = base.to_string();
    let to = (base + 180_000).to_string();
    let report = tern.cli_json(&[
        "rule", "test", "--tenant", "acme", "--from", &from, "--to", &to,
        "--sql", "SELECT device, window_start, avg(temp) AS t FROM telemetry GROUP BY device, TUMBLE(ts, INTERVAL '1' MINUTE) HAVING avg(temp) > 5",
    ]);
    assert_eq!(report["messages"], 4, "{report}");
    let rows: Vec<(f64, f64)> = report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["row"]["window_start"].as_f64().unwrap_or_default(),
                r["row"]["t"].as_f64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![(base as f64, 20.0), ((base + 60_000) as f64, 6.0)]
    );
    let (_, alerts) = tern.get(&p.api_token, "/api/v1/tenants/acme/alerts").await;
    assert_eq!(alerts, json!([]), "a test acts on nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_raises_an_absence_alert_that_clears_when_it_is_back() {
    let tern = Tern::start();
    let p = tern.provision("acme", "heartbeat");
    create_rule(
        &tern,
        "acme",
        "silent",
        "SELECT device, window_start AS last_seen FROM telemetry \
                  GROUP BY device, ABSENCE(INTERVAL '2' SECOND)",
        &["alert:warning"],
    );
    let mut device = Mqtt::device(&tern, &p).await;
    device
        .publish_acked("telemetry", vec![br#"{"alive": 1}"#.to_vec()])
        .await;
    let active = "/api/v1/tenants/acme/alerts?state=active";
    let alerts = wait_for(&tern, &p.api_token, active, |b| {
        b.as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    assert_eq!(alerts[0]["device_id"], p.device_id, "{alerts}");
    assert!(
        alerts[0]["details"]["last_seen"].as_i64().is_some(),
        "{alerts}"
    );

    device
        .publish_acked("telemetry", vec![br#"{"alive": 1}"#.to_vec()])
        .await;
    let cleared = "/api/v1/tenants/acme/alerts?state=cleared";
    let alerts = wait_for(&tern, &p.api_token, cleared, |b| {
        b.as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    assert_eq!(
        alerts.as_array().map(Vec::len),
        Some(1),
        "the rule cleared its alert: {alerts}"
    );
}

/// A webhook receiver on a free loopback port: answers `/reject` with 400 and other paths
/// with the next status of `statuses` (then 200), and records what it got.
async fn receiver(
    statuses: Vec<u16>,
) -> (
    u16,
    std::sync::Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, String)>>>,
) {
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<(axum::http::HeaderMap, String)>>> = Arc::default();
    let script = Arc::new(Mutex::new(statuses.into_iter()));
    let app = {
        let seen = seen.clone();
        axum::Router::new().route(
            "/{*path}",
            axum::routing::post(
                move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| {
                    let (seen, script) = (seen.clone(), script.clone());
                    async move {
                        seen.lock().expect("lock").push((headers, body));
                        let status = if uri.path() == "/reject" {
                            400
                        } else {
                            script.lock().expect("lock").next().unwrap_or(200)
                        };
                        axum::http::StatusCode::from_u16(status).expect("status")
                    }
                },
            ),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, seen)
}

fn verify(secret: &str, signature: &str, body: &str) -> bool {
    use aws_lc_rs::hmac;
    let Some((t, v1)) = signature
        .strip_prefix("t=")
        .and_then(|s| s.split_once(",v1="))
    else {
        return false;
    };
    let bytes: Vec<u8> = (0..v1.len() / 2)
        .filter_map(|i| u8::from_str_radix(&v1[2 * i..2 * i + 2], 16).ok())
        .collect();
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hmac::verify(&key, format!("{t}.{body}").as_bytes(), &bytes).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_and_dead_lettered() {
    let tern = Tern::start_with_env(&[("TERN_RULES__WEBHOOK_ALLOW_PRIVATE_NETWORKS", "true")]);
    let p = tern.provision("acme", "boiler");
    let (port, seen) = receiver(vec![503, 503]).await;
    let created = create_rule(
        &tern,
        "acme",
        "hook",
        "SELECT device, temp FROM telemetry WHERE temp > 50",
        &[&format!("webhook:http://127.0.0.1:{port}/hook")],
    );
    let secret = created["webhook_secret"]
        .as_str()
        .expect("secret shown at creation")
        .to_string();
    let shown = tern.cli_json(&["rule", "show", "hook", "--tenant", "acme"]);
    assert!(
        shown.get("webhook_secret").is_none(),
        "and never again: {shown}"
    );
    let rejected = create_rule(
        &tern,
        "acme",
        "rejected",
        "SELECT device FROM telemetry WHERE temp > 50",
        &[&format!("webhook:http://127.0.0.1:{port}/reject")],
    );
    assert!(rejected["webhook_secret"].is_string());

    let mut device = Mqtt::device(&tern, &p).await;
    device
        .publish_acked("telemetry", vec![br#"{"temp": 61}"#.to_vec()])
        .await;

    // Two 503s, then 200: three attempts at /hook, one second and two seconds apart.
    let deadline = Instant::now() + PATIENCE;
    let hook =
        |all: &Vec<(axum::http::HeaderMap, String)>| -> Vec<(axum::http::HeaderMap, String)> {
            all.iter()
                .filter(|(h, _)| h.get("x-tern-signature").is_some())
                .cloned()
                .collect()
        };
    loop {
        let attempts = seen.lock().expect("lock").len();
        if attempts >= 4 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all = hook(&seen.lock().expect("lock"));
    let to_hook: Vec<_> = all
        .iter()
        .filter(|(_, b)| b.contains("\"rule\":\"hook\""))
        .collect();
    assert_eq!(
        to_hook.len(),
        3,
        "retried until it succeeded, then not again"
    );
    let keys: std::collections::HashSet<_> = to_hook
        .iter()
        .map(|(h, _)| h["x-tern-idempotency-key"].clone())
        .collect();
    assert_eq!(keys.len(), 1, "one idempotency key for every attempt");
    for (headers, body) in &to_hook {
        let signature = headers["x-tern-signature"].to_str().expect("ascii");
        assert!(verify(&secret, signature, body), "{signature}");
        assert!(!verify("whsec_wrong", signature, body));
    }
    let body: Value = serde_json::from_str(&to_hook[0].1).expect("JSON");
    assert_eq!(
        (&body["row"]["temp"], &body["device"]),
        (&json!(61), &json!(p.device_id))
    );

    // The receiver refused the other rule's post outright: dead-lettered, not retried.
    let letters = wait_for(
        &tern,
        &p.api_token,
        "/api/v1/tenants/acme/rules/rejected/dead-letters",
        |b| b.as_array().is_some_and(|a| !a.is_empty()),
    )
    .await;
    let error = letters[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("400"), "{letters}");
    assert_eq!(
        letters[0]["action"],
        format!("webhook:http://127.0.0.1:{port}/reject")
    );
    assert_eq!(
        all.iter()
            .filter(|(_, b)| b.contains("\"rule\":\"rejected\""))
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_to_private_addresses_are_refused_by_default() {
    let tern = Tern::start();
    let p = tern.provision("acme", "boiler");
    let (port, seen) = receiver(vec![]).await;
    create_rule(
        &tern,
        "acme",
        "inside",
        "SELECT device FROM telemetry WHERE temp > 50",
        &[&format!("webhook:http://127.0.0.1:{port}/admin")],
    );
    let mut device = Mqtt::device(&tern, &p).await;
    device
        .publish_acked("telemetry", vec![br#"{"temp": 61}"#.to_vec()])
        .await;
    let letters = wait_for(
        &tern,
        &p.api_token,
        "/api/v1/tenants/acme/rules/inside/dead-letters",
        |b| b.as_array().is_some_and(|a| !a.is_empty()),
    )
    .await;
    assert!(
        letters[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("private address"),
        "{letters}"
    );
    assert!(
        seen.lock().expect("lock").is_empty(),
        "nothing reached the loopback receiver"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_read_events_and_lifecycle_too() {
    let tern = Tern::start();
    let p = tern.provision("acme", "door");
    create_rule(
        &tern,
        "acme",
        "door-open",
        "SELECT device, door, code FROM event WHERE door = 'open'",
        &["alert:warning"],
    );
    create_rule(
        &tern,
        "acme",
        "gone",
        "SELECT device, reason FROM lifecycle WHERE event = 'disconnected'",
        &["alert:info"],
    );
    let mut device = Mqtt::device(&tern, &p).await;
    device
        .publish_acked(
            "event",
            vec![
                br#"{"door": "closed"}"#.to_vec(),
                br#"{"door": "open", "code": 7}"#.to_vec(),
            ],
        )
        .await;
    let alerts = wait_for(
        &tern,
        &p.api_token,
        "/api/v1/tenants/acme/alerts?rule=door-open",
        |b| b.as_array().is_some_and(|a| !a.is_empty()),
    )
    .await;
    assert_eq!(
        alerts[0]["details"],
        json!({"device": p.device_id, "door": "open", "code": 7})
    );
    assert_eq!(alerts[0]["count"], 1, "the closed door did not match");

    device.client.disconnect().await.expect("DISCONNECT");
    let _ = tokio::time::timeout(Duration::from_secs(2), device.events.poll()).await;
    let alerts = wait_for(
        &tern,
        &p.api_token,
        "/api/v1/tenants/acme/alerts?rule=gone",
        |b| b.as_array().is_some_and(|a| !a.is_empty()),
    )
    .await;
    assert_eq!(alerts[0]["device_id"], p.device_id);
    assert!(alerts[0]["details"]["reason"].is_string(), "{alerts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republished_rows_reach_the_tenants_subscribers_only() {
    let tern = Tern::start();
    let sensor = tern.provision("acme", "sensor");
    let watcher = tern.provision("acme", "watcher");
    let outsider = tern.provision("globex", "outsider");
    create_rule(
        &tern,
        "acme",
        "hot",
        "SELECT device, temp FROM telemetry WHERE temp > 50",
        &["republish:alerts/hot"],
    );
    let mut watching = Mqtt::device(&tern, &watcher).await;
    watching.subscribe("alerts/#", QoS::AtLeastOnce).await;
    let mut other = Mqtt::device(&tern, &outsider).await;
    other.subscribe("alerts/#", QoS::AtLeastOnce).await;
    let mut device = Mqtt::device(&tern, &sensor).await;
    device
        .publish_acked("telemetry", vec![br#"{"temp": 61}"#.to_vec()])
        .await;

    let got = tokio::time::timeout(PATIENCE, watching.received())
        .await
        .expect("republished in time");
    assert_eq!(
        (got.topic.as_str(), got.qos),
        ("alerts/hot", QoS::AtLeastOnce)
    );
    let body: Value = serde_json::from_str(&got.payload).expect("JSON");
    assert_eq!(
        (&body["rule"], &body["row"]["temp"]),
        (&json!("hot"), &json!(61))
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), other.received())
            .await
            .is_err(),
        "another tenant's subscriber got nothing"
    );

    let (status, refused) = tern
        .send_json(
            reqwest::Method::POST,
            &sensor.api_token,
            "/api/v1/tenants/acme/rules",
            &json!({"name": "loop", "sql": "SELECT * FROM telemetry", "actions": ["republish:telemetry"]}),
        )
        .await;
    assert_eq!(
        (status, &refused["error"]["field"]),
        (400, &json!("actions")),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_join_the_devices_twin() {
    let tern = Tern::start();
    let old = tern.provision("acme", "old-firmware");
    let new = tern.provision("acme", "new-firmware");
    for (device, version) in [(&old, "1.0"), (&new, "2.0")] {
        let body = json!({"firmware": {"version": version}});
        let (status, twin) = tern
            .send_json(
                reqwest::Method::PATCH,
                &device.access_token,
                "/device/v1/twin/reported",
                &body,
            )
            .await;
        assert_eq!(status, 200, "{twin}");
    }
    create_rule(
        &tern,
        "acme",
        "hot-on-old-firmware",
        "SELECT device, temp, twin.reported.firmware.version AS fw FROM telemetry \
                  WHERE temp > 50 AND twin.reported.firmware.version < '2'",
        &["alert"],
    );
    for device in [&new, &old] {
        let mut mqtt = Mqtt::device(&tern, device).await;
        mqtt.publish_acked("telemetry", vec![br#"{"temp": 70}"#.to_vec()])
            .await;
    }
    let alerts = wait_for(&tern, &old.api_token, "/api/v1/tenants/acme/alerts", |b| {
        b.as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    assert_eq!(alerts.as_array().map(Vec::len), Some(1), "{alerts}");
    assert_eq!(alerts[0]["device_id"], old.device_id);
    assert_eq!(alerts[0]["details"]["fw"], "1.0");
}

/// A rule re-run over stored telemetry acts on what it emits (a backfill job with progress),
/// under the live engine's idempotency keys: running it twice sends no command twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_rerun_over_history_acts_once() {
    let tern = Tern::start();
    let meter = device_labelled(&tern, "acme", "meter", "site=berlin");
    device_labelled(&tern, "acme", "valve", "role=valve");
    let mut device = Mqtt::device(&tern, &meter).await;
    let base = tern_core::now_ms() - 30 * 60_000;
    let payloads = [(0, 60.0), (10_000, 20.0), (20_000, 70.0)]
        .iter()
        .map(|(at, v)| json!({"temp": v, "ts": base + at}).to_string().into_bytes())
        .collect();
    device.publish_acked("telemetry", payloads).await;
    tern.wait_points(&meter, "temp", 3).await;
    // Disabled: the live engine never runs it, so whatever it does comes from the re-run.
    let mut args = vec![
        "rule",
        "create",
        "--tenant",
        "acme",
        "--name",
        "hot",
        "--disabled",
        "--sql",
        "SELECT device, temp FROM telemetry WHERE temp > 50",
    ];
    args.extend([
        "--action",
        "alert:warning",
        "--action",
        "command:cool@role=valve",
    ]);
    tern.cli_json(&args);

    let from = (base - 1_000).to_string();
    let to = (base + 60_000).to_string();
    let rerun = || {
        tern.cli_json(&[
            "job",
            "rerun-rule",
            "hot",
            "--from",
            &from,
            "--to",
            &to,
            "--wait",
            "--tenant",
            "acme",
        ])
    };
    let job = rerun();
    assert_eq!(
        (
            &job["kind"],
            &job["state"],
            &job["messages_read"],
            &job["rows_emitted"]
        ),
        (
            &json!("rerun-rule"),
            &json!("succeeded"),
            &json!(3),
            &json!(2)
        ),
        "{job}"
    );
    assert_eq!(job["covered_to_ms"].as_i64(), Some(base + 60_000));
    let commands = || tern.cli_json(&["command", "list", "valve", "--tenant", "acme"]);
    let sent = commands();
    let names: Vec<&str> = sent
        .as_array()
        .expect("commands")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["cool", "cool"], "{sent}");
    let alerts = tern.cli_json(&["alert", "list", "--tenant", "acme", "--rule", "hot"]);
    assert_eq!(alerts.as_array().map(Vec::len), Some(1), "{alerts}");

    // Again over the same range: the same idempotency keys, no new command.
    rerun();
    assert_eq!(commands().as_array().map(Vec::len), Some(2));

    // Only telemetry can be replayed; the error names the SQL.
    create_rule(
        &tern,
        "acme",
        "doors",
        "SELECT device FROM event",
        &["alert"],
    );
    let out = tern.cli(&[
        "job",
        "rerun-rule",
        "doors",
        "--from",
        &from,
        "--tenant",
        "acme",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sql"));
}

/// A tenant whose rules use up their CPU budget has its messages skipped by its rules (and
/// counted), while another tenant's rules keep acting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_rule_cpu_budget_does_not_hold_up_another() {
    // 1 ms of evaluation per second: a burst of thousands of messages is far more.
    let tern = Tern::start_with_env(&[("TERN_RULES__MAX_TENANT_CPU_MS_PER_SEC", "1")]);
    let heavy = tern.provision("heavy", "firehose");
    let light = tern.provision("light", "thermostat");
    for tenant in ["heavy", "light"] {
        create_rule(
            &tern,
            tenant,
            "hot",
            "SELECT device, temp FROM telemetry WHERE temp > 50",
            &["alert"],
        );
    }
    // The heavy tenant's other rules make each of its messages cost more.
    for n in 0..10 {
        create_rule(
            &tern,
            "heavy",
            &format!("stats-{n}"),
            "SELECT device, avg(temp) AS a, percentile(temp, 0.99) AS p FROM telemetry \
             GROUP BY device, HOP(ts, INTERVAL '10' SECOND, INTERVAL '1' MINUTE)",
            &["alert"],
        );
    }
    let mut firehose = Mqtt::device(&tern, &heavy).await;
    for batch in 0..10 {
        let payloads = (0..500)
            .map(|i| {
                json!({"temp": 10 + (batch * 500 + i) % 40})
                    .to_string()
                    .into_bytes()
            })
            .collect();
        firehose.publish_acked("telemetry", payloads).await;
    }
    let mut thermostat = Mqtt::device(&tern, &light).await;
    thermostat
        .publish_acked("telemetry", vec![br#"{"temp": 80}"#.to_vec()])
        .await;
    let alerts = wait_for(
        &tern,
        &light.api_token,
        "/api/v1/tenants/light/alerts",
        |b| b.as_array().is_some_and(|a| !a.is_empty()),
    )
    .await;
    assert_eq!(alerts[0]["details"]["temp"], 80, "{alerts}");
    let throttled = tern
        .metric("tern_rules_throttled_messages_total")
        .await
        .expect("the throttled counter");
    assert!(
        throttled > 0.0,
        "the heavy tenant was throttled: {throttled}"
    );
}
