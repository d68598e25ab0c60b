//! The HTTP device API: telemetry and events stored before the 201, commands by long-poll and
//! answered over HTTP, with the same credentials and isolation as MQTT.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Provisioned, Tern};

async fn device_call(
    tern: &Tern,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", tern.http()))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    let r = request.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn post(tern: &Tern, p: &Provisioned, path: &str, body: &[u8]) -> (u16, Value) {
    device_call(
        tern,
        &p.access_token,
        reqwest::Method::POST,
        path,
        Some(body.to_vec()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_and_events_over_http_are_stored_and_credentials_are_checked() {
    let tern = Tern::start();
    let p = tern.provision("acme", "a");
    let (status, body) = post(&tern, &p, "/device/v1/telemetry", br#"{"temp": 20.5}"#).await;
    assert_eq!(status, 201, "{body}");
    let points = tern.wait_points(&p, "temp", 1).await;
    assert_eq!(points[0]["value"], 20.5);
    assert_eq!(
        post(&tern, &p, "/device/v1/event", b"\x01door").await.0,
        201
    );

    // An API token, a garbage token and a disabled device are all refused.
    let as_api = Provisioned {
        access_token: p.api_token.clone(),
        ..tern.provision("acme", "b")
    };
    assert_eq!(
        post(&tern, &as_api, "/device/v1/telemetry", b"{}").await.0,
        401
    );
    let garbage = Provisioned {
        access_token: "nope".into(),
        ..tern.provision("acme", "c")
    };
    assert_eq!(
        post(&tern, &garbage, "/device/v1/telemetry", b"{}").await.0,
        401
    );
    let out = tern.cli(&["device", "disable", "a", "--tenant", "acme"]);
    assert!(out.status.success());
    let (status, body) = post(&tern, &p, "/device/v1/telemetry", b"{}").await;
    assert_eq!(status, 403, "{body}");
    let big = vec![b'x'; 300 * 1024];
    let other = tern.provision("acme", "d");
    assert_eq!(post(&tern, &other, "/device/v1/event", &big).await.0, 413);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_command_reaches_a_long_polling_http_device() {
    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let poll = {
        let (http, token) = (tern.http(), a.access_token.clone());
        tokio::spawn(async move {
            let r = reqwest::Client::new()
                .get(format!("{http}/device/v1/commands?wait=20s"))
                .bearer_auth(token)
                .send()
                .await
                .expect("poll");
            (r.status().as_u16(), r.json::<Value>().await.expect("json"))
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let send = {
        let (http, token) = (tern.http(), a.api_token.clone());
        tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(format!("{http}/api/v1/tenants/acme/devices/a/commands"))
                .bearer_auth(token)
                .json(&json!({"name": "reboot", "payload": {"in_s": 1}, "wait_secs": 20}))
                .send()
                .await
                .expect("send");
            (r.status().as_u16(), r.json::<Value>().await.expect("json"))
        })
    };
    let (status, polled) = poll.await.expect("poll task");
    assert_eq!(status, 200, "{polled}");
    let command = &polled["commands"][0];
    assert_eq!(
        (command["name"].as_str(), command["state"].as_str()),
        (Some("reboot"), Some("delivered"))
    );
    assert_eq!(command["payload"], json!({"in_s": 1}));
    let id = command["id"].as_str().expect("id");
    let path = format!("/device/v1/commands/{id}/response");
    let answer = br#"{"status": 200, "payload": {"rebooting": true}}"#.to_vec();

    // Another device cannot answer it.
    let (status, _) = device_call(
        &tern,
        &b.access_token,
        reqwest::Method::POST,
        &path,
        Some(answer.clone()),
    )
    .await;
    assert_eq!(status, 404);
    let (status, done) = device_call(
        &tern,
        &a.access_token,
        reqwest::Method::POST,
        &path,
        Some(answer),
    )
    .await;
    assert_eq!(
        (status, done["state"].as_str()),
        (200, Some("succeeded")),
        "{done}"
    );

    let (status, result) = send.await.expect("send task");
    assert_eq!(status, 200, "{result}");
    assert_eq!(
        result["result"],
        json!({"status": 200, "payload": {"rebooting": true}})
    );

    // Nothing pending: an immediate poll returns an empty list; a bad wait names the field.
    let (status, empty) = device_call(
        &tern,
        &a.access_token,
        reqwest::Method::GET,
        "/device/v1/commands",
        None,
    )
    .await;
    assert_eq!((status, &empty["commands"]), (200, &json!([])));
    let (status, err) = device_call(
        &tern,
        &a.access_token,
        reqwest::Method::GET,
        "/device/v1/commands?wait=forever",
        None,
    )
    .await;
    assert_eq!((status, &err["error"]["field"]), (400, &json!("wait")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_devices_are_online_within_the_heartbeat_window_and_mqtt_ones_only_while_connected() {
    let tern = Tern::start_with_env(&[("TERN_DEVICES__HEARTBEAT_WINDOW_SECS", "2")]);
    let p = tern.provision("acme", "http-only");
    let status = async |p: &Provisioned| {
        let path = format!("/api/v1/tenants/acme/devices/{}/status", p.device_id);
        tern.get(&p.api_token, &path).await.1
    };
    assert_eq!(status(&p).await["online"], false, "never heard from");
    let (code, body) = post(&tern, &p, "/device/v1/telemetry", br#"{"temp": 1}"#).await;
    assert_eq!(code, 201, "{body}");
    tern.wait_points(&p, "temp", 1).await;
    let heard = status(&p).await;
    assert_eq!(heard["online"], true, "{heard}");
    assert_eq!(heard["online_by"], "heartbeat");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let quiet = status(&p).await;
    assert_eq!(quiet["online"], false, "the window passed: {quiet}");

    // An MQTT device that sent data and then disconnected is offline at once, window or not.
    let m = tern.provision("acme", "mqtt");
    let mut device = crate::harness::Mqtt::device(&tern, &m).await;
    device
        .publish_acked("telemetry", vec![br#"{"temp": 2}"#.to_vec()])
        .await;
    tern.wait_points(&m, "temp", 1).await;
    assert_eq!(status(&m).await["online_by"], "mqtt");
    drop(device);
    let mut offline = false;
    for _ in 0..100 {
        let now = status(&m).await;
        if now["online"] == false {
            assert_eq!(now["last_lifecycle"]["event"], "disconnected", "{now}");
            offline = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        offline,
        "offline after its disconnect, within the heartbeat window"
    );
}
