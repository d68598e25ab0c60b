//! Commands end to end: REST (and the CLI) to a device over MQTT and back, offline delivery
//! in order, expiry, cancellation, idempotency, and isolation between devices and tenants.

use std::time::Duration;

use rumqttc::{Event, Packet, QoS};
use serde_json::{Value, json};

use crate::harness::{Mqtt, Provisioned, Tern};

async fn send(tern: &Tern, p: &Provisioned, device: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/tenants/{}/devices/{device}/commands",
            tern.http(),
            p.tenant
        ))
        .bearer_auth(&p.api_token)
        .json(&body)
        .send()
        .await
        .expect("POST");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The next command the device receives: (id, name, payload).
async fn next_command(mqtt: &mut Mqtt) -> (String, String, Value) {
    let got = mqtt.received().await;
    let parts: Vec<&str> = got.topic.split('/').collect();
    assert_eq!(parts[..2], ["command", "req"], "{}", got.topic);
    (
        parts[2].to_string(),
        parts[3].to_string(),
        serde_json::from_str(&got.payload).expect("JSON payload"),
    )
}

/// Answers every command it receives with `status`, echoing the command's payload.
fn answering_device(mut mqtt: Mqtt, status: u16) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match mqtt.events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let id = p.topic.split('/').nth(2).unwrap_or_default().to_string();
                    mqtt.client
                        .publish(
                            format!("command/res/{id}/{status}"),
                            QoS::AtLeastOnce,
                            false,
                            p.payload.to_vec(),
                        )
                        .await
                        .expect("queue response");
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_command_reaches_its_device_and_the_answer_comes_back() {
    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let mut device = Mqtt::device(&tern, &a).await;
    device.subscribe("command/req/#", QoS::AtLeastOnce).await;
    let mut bystander = Mqtt::device(&tern, &b).await;
    bystander.subscribe("#", QoS::AtLeastOnce).await;
    bystander.subscribe("command/#", QoS::AtLeastOnce).await;

    let request = {
        let (tern_http, a_tenant, token) = (tern.http(), a.tenant.clone(), a.api_token.clone());
        tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(format!(
                    "{tern_http}/api/v1/tenants/{a_tenant}/devices/a/commands"
                ))
                .bearer_auth(token)
                .json(&json!({"name": "set-interval", "payload": {"seconds": 5}, "wait_secs": 20}))
                .send()
                .await
                .expect("POST");
            (r.status().as_u16(), r.json::<Value>().await.expect("JSON"))
        })
    };
    let (id, name, payload) = next_command(&mut device).await;
    assert_eq!(
        (name.as_str(), &payload),
        ("set-interval", &json!({"seconds": 5}))
    );
    device
        .publish(&format!("command/res/{id}/200"), r#"{"applied": true}"#)
        .await;

    let (status, command) = request.await.expect("request task");
    assert_eq!(status, 200, "{command}");
    assert_eq!(command["id"], id);
    assert_eq!(command["state"], "succeeded");
    assert_eq!(
        command["result"],
        json!({"status": 200, "payload": {"applied": true}})
    );
    let states: Vec<&str> = command["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["state"].as_str())
        .collect();
    assert_eq!(states.first(), Some(&"pending"));
    assert_eq!(states.last(), Some(&"succeeded"));

    // Neither `#` nor its own `command/#` showed another device's command to the bystander.
    let mut marker_source = Mqtt::device(&tern, &tern.provision("acme", "c")).await;
    bystander
        .expect_only_marker(&mut marker_source, "acme/marker")
        .await;

    // The finished command is in the event log, stored as an event of kind `command`.
    let path = format!(
        "/api/v1/tenants/acme/devices/{}/events?from=0&kind=command",
        a.device_id
    );
    let mut logged = Vec::new();
    for _ in 0..200 {
        logged = tern.get(&a.api_token, &path).await.1["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !logged.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(logged.len(), 1);
    let body: Value =
        serde_json::from_str(logged[0]["payload"].as_str().expect("text")).expect("json");
    assert_eq!(
        (body["id"].as_str(), body["state"].as_str()),
        (Some(id.as_str()), Some("succeeded"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_devices_get_pending_commands_in_order_and_expired_or_cancelled_ones_never() {
    let tern = Tern::start();
    let a = tern.provision("acme", "a");
    let mut ids = Vec::new();
    for name in ["first", "short-lived", "cancelled", "second"] {
        let ttl = if name == "short-lived" { 1 } else { 60 };
        let (status, c) = send(&tern, &a, "a", json!({"name": name, "ttl_secs": ttl})).await;
        assert_eq!((status, c["state"].as_str()), (201, Some("pending")), "{c}");
        ids.push(c["id"].as_str().expect("id").to_string());
    }
    let cancelled = tern.cli_json(&["command", "cancel", "a", &ids[2], "--tenant", "acme"]);
    assert_eq!(cancelled["state"], "cancelled");
    let again = tern.cli(&["command", "cancel", "a", &ids[2], "--tenant", "acme"]);
    assert!(
        !again.status.success(),
        "a finished command cannot be cancelled"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let mut device = Mqtt::device(&tern, &a).await;
    device.subscribe("command/req/+/+", QoS::AtLeastOnce).await;
    assert_eq!(next_command(&mut device).await.1, "first");
    assert_eq!(next_command(&mut device).await.1, "second");

    // Newest first; `first` becomes delivered once the device's PUBACK is recorded.
    let expected = [
        ("second", "pending|delivered"),
        ("cancelled", "cancelled"),
        ("short-lived", "expired"),
        ("first", "delivered"),
    ];
    let deadline = std::time::Instant::now() + crate::harness::PATIENCE;
    loop {
        let list = tern.cli_json(&["command", "list", "a", "--tenant", "acme"]);
        let states: Vec<(String, String)> = list
            .as_array()
            .expect("commands")
            .iter()
            .map(|c| (text(&c["name"]), text(&c["state"])))
            .collect();
        let matches = states.len() == expected.len()
            && states
                .iter()
                .zip(expected)
                .all(|((name, state), (n, s))| name == n && s.split('|').any(|s| s == state));
        if matches {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{states:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_waits_for_the_answer_and_fails_when_the_device_does() {
    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let mut ok_device = Mqtt::device(&tern, &a).await;
    ok_device.subscribe("command/req/#", QoS::AtLeastOnce).await;
    let mut failing_device = Mqtt::device(&tern, &b).await;
    failing_device
        .subscribe("command/req/#", QoS::AtLeastOnce)
        .await;
    let _ok = answering_device(ok_device, 200);
    let _failing = answering_device(failing_device, 503);

    let cli = |device: &'static str| {
        let tern_args = [
            "command",
            "send",
            device,
            "reboot",
            "--payload",
            r#"{"now":true}"#,
            "--wait",
            "20",
            "--tenant",
            "acme",
            "--output",
            "json",
        ];
        let out = tern.cli(&tern_args);
        let body: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
        (out.status.success(), body)
    };
    let (ok, body) = tokio::task::block_in_place(|| cli("a"));
    assert!(ok, "{body}");
    assert_eq!(
        body["result"],
        json!({"status": 200, "payload": {"now": true}})
    );
    let (ok, body) = tokio::task::block_in_place(|| cli("b"));
    assert!(!ok, "a failed command fails the CLI");
    assert_eq!(
        (body["state"].as_str(), &body["result"]["status"]),
        (Some("failed"), &json!(503))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_private_to_their_device_and_tenant() {
    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let g = tern.provision("globex", "g");

    let keyed = json!({"name": "open-valve", "idempotency_key": "job-7"});
    let (status, first) = send(&tern, &a, "a", keyed.clone()).await;
    assert_eq!(status, 201);
    let (status, again) = send(&tern, &a, "a", keyed).await;
    assert_eq!((status, &again["id"]), (200, &first["id"]), "idempotent");
    let id = first["id"].as_str().expect("id");

    // Another tenant's token sees neither the device nor its commands.
    let foreign = Provisioned {
        tenant: "acme".into(),
        ..g
    };
    assert_eq!(
        send(&tern, &foreign, "a", json!({"name": "x"})).await.0,
        403
    );
    let (status, _) = tern
        .get(
            &foreign.api_token,
            &format!("/api/v1/tenants/acme/devices/a/commands/{id}"),
        )
        .await;
    assert_eq!(status, 403);

    // Device b answering a's command changes nothing.
    let mut other = Mqtt::device(&tern, &b).await;
    other.publish(&format!("command/res/{id}/200"), "{}").await;
    let (_, still) = tern
        .get(
            &a.api_token,
            &format!("/api/v1/tenants/acme/devices/a/commands/{id}"),
        )
        .await;
    assert_eq!(still["state"], "pending");

    // Publishing a command request is not for devices: the connection is closed.
    other
        .client
        .publish(
            format!("command/req/{id}/open-valve"),
            QoS::AtLeastOnce,
            false,
            "{}",
        )
        .await
        .expect("queue");
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match other.events.poll().await {
                Err(_) => return true,
                Ok(Event::Incoming(Packet::PubAck(_))) => return false,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("an answer in time");
    assert!(closed, "no PUBACK for a forbidden publish");

    let (status, err) = send(&tern, &a, "a", json!({"name": "bad/name"})).await;
    assert_eq!((status, &err["error"]["field"]), (400, &json!("name")));
    let (status, err) = send(&tern, &a, "a", json!({"name": "x", "wait_secs": 100000})).await;
    assert_eq!((status, &err["error"]["field"]), (400, &json!("wait_secs")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_operations_are_validated_and_reach_the_device_as_tern_commands() {
    let tern = Tern::start();
    let p = tern.provision("acme", "cam-1");
    let mut device = Mqtt::device(&tern, &p).await;
    device.subscribe("command/req/#", QoS::AtLeastOnce).await;

    let sent = tern.cli_json(&[
        "device",
        "operate",
        "cam-1",
        "feature",
        "--params",
        r#"{"feature": "camera", "enabled": false}"#,
        "--tenant",
        "acme",
    ]);
    assert_eq!(sent["name"], "tern.feature");
    let got = device.received().await;
    assert_eq!(
        got.topic,
        format!(
            "command/req/{}/tern.feature",
            sent["id"].as_str().expect("id")
        )
    );
    let payload: Value = serde_json::from_str(&got.payload).expect("JSON");
    assert_eq!(
        payload,
        json!({"operation": "feature", "feature": "camera", "enabled": false})
    );

    let operate = |operation: &str, body: Value| {
        let path = format!("/api/v1/tenants/acme/devices/cam-1/operations/{operation}");
        let (tern, token) = (&tern, p.api_token.clone());
        async move {
            tern.send_json(reqwest::Method::POST, &token, &path, &body)
                .await
        }
    };
    let (status, reboot) = operate("reboot", json!({"delay_s": 5, "ttl_secs": 30})).await;
    assert_eq!(status, 201);
    assert_eq!(
        reboot["payload"],
        json!({"operation": "reboot", "delay_s": 5})
    );
    for (operation, body, field) in [
        ("feature", json!({"enabled": true}), "feature"),
        (
            "update",
            json!({"version": "2", "url": "https://x", "sha256": "zz"}),
            "sha256",
        ),
        ("self_destruct", json!({}), "self_destruct"),
    ] {
        let (status, error) = operate(operation, body).await;
        assert_eq!(status, 400, "{operation}");
        assert!(error.to_string().contains(field), "{operation}: {error}");
    }
    // The tern. names are the operations' own.
    let (status, error) = send(&tern, &p, "cam-1", json!({"name": "tern.wipe"})).await;
    assert_eq!(status, 400);
    assert!(error.to_string().contains("operations"), "{error}");
}
