//! Gateway devices (design.md, "Device-facing contract"): a gateway publishes
//! `telemetry/{device}` and `event/{device}` for the child devices that name it as their
//! gateway, and for no other device, in its tenant or another.

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use serde_json::json;

use crate::harness::{Mqtt, PATIENCE, Provisioned, Tern};

struct Gateway {
    client: AsyncClient,
    events: EventLoop,
}

impl Gateway {
    async fn connect(tern: &Tern, p: &Provisioned) -> Self {
        let mut options = MqttOptions::new(p.device_id.clone(), "127.0.0.1", tern.mqtt_port);
        options.set_credentials(p.device_id.clone(), p.access_token.clone());
        let (client, events) = AsyncClient::new(options, 10);
        let mut gateway = Self { client, events };
        while !matches!(gateway.next().await, Packet::ConnAck(_)) {}
        gateway
    }

    async fn next(&mut self) -> Packet {
        loop {
            match tokio::time::timeout(PATIENCE, self.events.poll())
                .await
                .expect("an event in time")
                .expect("alive")
            {
                Event::Incoming(packet) => return packet,
                Event::Outgoing(_) => continue,
            }
        }
    }

    /// Publishes QoS 1; returns the PUBACK's reason.
    async fn publish(&mut self, topic: &str, payload: &str) -> PubAckReason {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
            .await
            .expect("queue");
        loop {
            if let Packet::PubAck(ack) = self.next().await {
                return ack.reason;
            }
        }
    }
}

/// A device of `tenant` created with `--gateway`, seen through the gateway's API token.
fn child(tern: &Tern, gateway: &Provisioned, name: &str) -> Provisioned {
    let created = tern.cli_json(&[
        "device",
        "create",
        name,
        "--tenant",
        &gateway.tenant,
        "--gateway",
        &gateway.device_id,
    ]);
    assert_eq!(created["gateway_id"], gateway.device_id.as_str());
    Provisioned {
        device_id: created["id"].as_str().expect("id").to_string(),
        access_token: String::new(),
        ..gateway.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_publishes_for_its_children_and_for_no_other_device() {
    let tern = Tern::start();
    let gw = tern.provision("acme", "gw");
    let kid = child(&tern, &gw, "kid");
    let stranger = tern.provision("acme", "stranger");
    let globex_gw = tern.provision("globex", "gw");
    let globex_kid = child(&tern, &globex_gw, "kid");

    let mut gateway = Gateway::connect(&tern, &gw).await;
    assert_eq!(
        gateway.publish("telemetry/kid", r#"{"temp": 20}"#).await,
        PubAckReason::Success,
        "by name"
    );
    let by_id = format!("telemetry/{}", kid.device_id);
    assert_eq!(
        gateway.publish(&by_id, r#"{"temp": 21}"#).await,
        PubAckReason::Success,
        "by id"
    );
    for refused in [
        "telemetry/stranger".to_string(),
        format!("event/{}", stranger.device_id),
        format!("telemetry/{}", globex_kid.device_id),
        "telemetry/nobody".to_string(),
        "telemetry/".to_string(),
    ] {
        assert_eq!(
            gateway.publish(&refused, r#"{"temp": 99}"#).await,
            PubAckReason::NotAuthorized,
            "{refused}"
        );
    }
    assert_eq!(
        gateway.publish("event/kid", "door open").await,
        PubAckReason::Success
    );

    let points = tern.wait_points(&kid, "temp", 2).await;
    let values = crate::harness::values(&points);
    assert_eq!(values, [20.0, 21.0], "stored as the child's, in order");
    // Refused publishes never reach the log; the gateway's own series stays empty too.
    for other in [&stranger, &gw] {
        let path = format!(
            "/api/v1/tenants/acme/devices/{}/telemetry?metric=temp&from=0",
            other.device_id
        );
        assert_eq!(tern.get(&gw.api_token, &path).await.1["points"], json!([]));
    }
    let (_, globex_points) = tern
        .get(
            &globex_gw.api_token,
            &format!(
                "/api/v1/tenants/globex/devices/{}/telemetry?metric=temp&from=0",
                globex_kid.device_id
            ),
        )
        .await;
    assert_eq!(globex_points["points"], json!([]));

    // Taking the gateway away ends its right at once.
    let r = reqwest::Client::new()
        .patch(format!("{}/api/v1/tenants/acme/devices/kid", tern.http()))
        .bearer_auth(&gw.api_token)
        .json(&json!({"gateway": null}))
        .send()
        .await
        .expect("PATCH");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        gateway.publish("telemetry/kid", r#"{"temp": 22}"#).await,
        PubAckReason::NotAuthorized
    );

    // MQTT 3.1.1 has no refusal code: the connection is closed instead.
    let mut v311 = Mqtt::device(&tern, &tern.provision("acme", "gw311")).await;
    v311.publish_expecting_close("telemetry/kid", "{}").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_must_be_a_device_of_the_same_tenant() {
    let tern = Tern::start();
    let gw = tern.provision("acme", "gw");
    let globex_gw = tern.provision("globex", "gw2");
    for (gateway, why) in [
        (globex_gw.device_id.as_str(), "another tenant's device"),
        ("nobody", "no such device"),
    ] {
        let out = tern.cli(&[
            "device",
            "create",
            "kid",
            "--tenant",
            "acme",
            "--gateway",
            gateway,
        ]);
        assert!(!out.status.success(), "{why}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("gateway"), "names the field: {stderr}");
    }
    let r = reqwest::Client::new()
        .patch(format!("{}/api/v1/tenants/acme/devices/gw", tern.http()))
        .bearer_auth(&gw.api_token)
        .json(&json!({"gateway": "gw"}))
        .send()
        .await
        .expect("PATCH");
    assert_eq!(r.status().as_u16(), 400, "its own gateway");
}
