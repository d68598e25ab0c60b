//! Device twins end to end: an operator's desired state reaches the device on `twin/desired`
//! (at once when subscribed, and the current one when it subscribes), the device reports on
//! `twin/reported` or over HTTP, versions guard concurrent operators, tenants stay apart.

use rumqttc::QoS;
use serde_json::{Value, json};

use crate::harness::{Mqtt, Tern};

fn desired(got: &crate::harness::Received) -> Value {
    serde_json::from_str(&got.payload).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_reaches_the_device_and_reported_state_comes_back() {
    let tern = Tern::start();
    let p = tern.provision("acme", "thermostat");
    let shown = tern.cli_json(&[
        "device",
        "desire",
        "thermostat",
        r#"{"setpoint": 21}"#,
        "--tenant",
        "acme",
    ]);
    assert_eq!(shown["desired_version"], 1);

    // Subscribing gets the current desired state, like a retained message.
    let mut device = Mqtt::device(&tern, &p).await;
    device.subscribe("twin/desired", QoS::AtLeastOnce).await;
    let got = device.received().await;
    assert_eq!(got.topic, "twin/desired");
    assert_eq!(
        desired(&got),
        json!({"version": 1, "desired": {"setpoint": 21}})
    );

    // A change while it is connected arrives at once, whole.
    let http = reqwest::Client::new();
    let url = format!(
        "{}/api/v1/tenants/acme/devices/thermostat/twin/desired",
        tern.http()
    );
    let r = http
        .patch(format!("{url}?version=1"))
        .bearer_auth(&p.api_token)
        .json(&json!({"mode": "eco"}))
        .send()
        .await
        .expect("PATCH");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        desired(&device.received().await),
        json!({"version": 2, "desired": {"setpoint": 21, "mode": "eco"}})
    );
    // An operator working from version 1 is told it changed meanwhile.
    let stale = http
        .patch(format!("{url}?version=1"))
        .bearer_auth(&p.api_token)
        .json(&json!({"mode": "off"}))
        .send()
        .await
        .expect("PATCH");
    assert_eq!(stale.status().as_u16(), 409);

    // The device reports over MQTT (acknowledged once stored) and over HTTP; both merge.
    device
        .publish("twin/reported", r#"{"setpoint": 21, "firmware": "1.0"}"#)
        .await;
    let r = http
        .patch(format!("{}/device/v1/twin/reported", tern.http()))
        .bearer_auth(&p.access_token)
        .json(&json!({"firmware": "1.1", "battery": 80}))
        .send()
        .await
        .expect("PATCH");
    assert_eq!(r.status().as_u16(), 200);
    let (status, twin) = tern
        .get(&p.api_token, "/api/v1/tenants/acme/devices/thermostat/twin")
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        twin["reported"],
        json!({"setpoint": 21, "firmware": "1.1", "battery": 80})
    );
    assert_eq!(twin["reported_version"], 2);
    assert!(twin["metadata"]["reported"]["battery"].as_i64().is_some());
    let own = http
        .get(format!("{}/device/v1/twin", tern.http()))
        .bearer_auth(&p.access_token)
        .send()
        .await
        .expect("GET")
        .json::<Value>()
        .await
        .expect("JSON");
    assert_eq!(own["desired_version"], 2);

    // Another tenant can neither read nor change it.
    let globex = tern.provision("globex", "g");
    let (status, _) = tern
        .get(
            &globex.api_token,
            "/api/v1/tenants/acme/devices/thermostat/twin",
        )
        .await;
    assert_eq!(status, 403);

    // A reported state that is not a JSON object is refused (3.1.1: the connection closes)
    // and changes nothing.
    device
        .publish_expecting_close("twin/reported", "not json")
        .await;
    let (_, twin) = tern
        .get(&p.api_token, "/api/v1/tenants/acme/devices/thermostat/twin")
        .await;
    assert_eq!(twin["reported_version"], 2);
}
