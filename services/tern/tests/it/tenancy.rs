//! The cross-tenant matrix of the device edge: for each way one device could reach another
//! tenant (publish, subscribe, retained, will, shared subscription, gateway topic, commands,
//! HTTP, REST),
//! tenant globex's device tries to reach or see tenant acme and gets nothing.

use rumqttc::{LastWill, QoS, SubscribeReasonCode};
use serde_json::json;

use crate::harness::{Mqtt, Tern};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_crosses_between_tenants_on_any_path() {
    let tern = Tern::start();
    let acme = tern.provision("acme", "a");
    let acme_pub = tern.provision("acme", "a-pub");
    let globex = tern.provision("globex", "g");
    let globex_pub = tern.provision("globex", "g-pub");

    // acme leaves a retained message and a will behind, and has a command pending.
    let mut acme_publisher = Mqtt::device(&tern, &acme_pub).await;
    acme_publisher
        .publish_retained("shared/name", "acme retained", true)
        .await;
    let mut options = Mqtt::options(tern.mqtt_port, &acme.device_id, &acme.access_token);
    options.set_last_will(LastWill::new(
        "shared/name",
        "acme will",
        QoS::AtLeastOnce,
        false,
    ));
    let dying = Mqtt::connect(options).await.expect("connect");
    let mut acme_watcher = Mqtt::device(&tern, &tern.provision("acme", "a-watch")).await;
    acme_watcher
        .subscribe("shared/name", QoS::AtLeastOnce)
        .await;
    assert_eq!(acme_watcher.received().await.payload, "acme retained");
    let out = tern.cli(&["command", "send", "a", "secret", "--tenant", "acme"]);
    assert!(out.status.success());

    // globex subscribes to everything it can name: `#`, the same topic, commands, shared.
    let mut spy = Mqtt::device(&tern, &globex).await;
    for filter in ["#", "shared/name", "command/req/#"] {
        spy.subscribe(filter, QoS::AtLeastOnce).await;
    }
    // The same share name in both tenants: two separate groups.
    assert_eq!(
        spy.subscribe("$share/g/#", QoS::AtLeastOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let mut acme_worker = Mqtt::device(&tern, &tern.provision("acme", "a-worker")).await;
    acme_worker
        .subscribe("$share/g/shared/name", QoS::AtLeastOnce)
        .await;

    // Live traffic, the will and a new command in acme: none of it reaches globex.
    acme_publisher.publish("shared/name", "acme live").await;
    drop(dying.events);
    // Inside acme both arrive, so they were published before globex's marker below.
    assert_eq!(acme_watcher.received().await.payload, "acme live");
    assert_eq!(acme_watcher.received().await.payload, "acme will");
    // acme's group of one got both: globex's member of a group named alike took nothing.
    assert_eq!(acme_worker.received().await.payload, "acme live");
    assert_eq!(acme_worker.received().await.payload, "acme will");
    let out = tern.cli(&["command", "send", "a", "secret-2", "--tenant", "acme"]);
    assert!(out.status.success());
    let mut globex_publisher = Mqtt::device(&tern, &globex_pub).await;
    spy.expect_only_marker(&mut globex_publisher, "shared/name")
        .await;
    drop(dying.client);

    // globex cannot answer acme's command over MQTT or HTTP, nor read acme over REST.
    let (status, commands) = tern
        .get(&acme.api_token, "/api/v1/tenants/acme/devices/a/commands")
        .await;
    assert_eq!(status, 200);
    let id = commands["commands"][0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    globex_publisher
        .publish(&format!("command/res/{id}/200"), "{}")
        .await;
    let r = reqwest::Client::new()
        .post(format!("{}/device/v1/commands/{id}/response", tern.http()))
        .bearer_auth(&globex.access_token)
        .json(&json!({"status": 200}))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status().as_u16(), 404);
    let (_, command) = tern
        .get(
            &acme.api_token,
            &format!("/api/v1/tenants/acme/devices/a/commands/{id}"),
        )
        .await;
    assert_ne!(command["state"], "succeeded", "{command}");
    // globex's device cannot publish as acme's through the gateway topic (3.1.1: closed).
    let mut would_be_gateway = Mqtt::device(&tern, &tern.provision("globex", "g-gw")).await;
    would_be_gateway
        .publish_expecting_close(&format!("telemetry/{}", acme.device_id), r#"{"stolen": 1}"#)
        .await;
    let (_, stolen) = tern
        .get(
            &acme.api_token,
            "/api/v1/tenants/acme/devices/a/telemetry?metric=stolen&from=0",
        )
        .await;
    assert_eq!(stolen["points"], json!([]));
    for path in [
        "/api/v1/tenants/acme/devices",
        "/api/v1/tenants/acme/devices/a/telemetry/latest",
        "/api/v1/tenants/acme/devices/a/events?from=0",
        "/api/v1/tenants/acme/devices/a/commands",
    ] {
        assert_eq!(tern.get(&globex.api_token, path).await.0, 403, "{path}");
    }
}
