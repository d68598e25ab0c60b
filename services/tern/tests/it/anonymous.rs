//! Anonymous mode (`mqtt.anonymous_tenant`): clients without credentials land in one named
//! tenant and can do nothing outside it.

use std::process::Command;

use rumqttc::{MqttOptions, QoS};

use crate::harness::{Mqtt, Tern};

fn anonymous_options(tern: &Tern, client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", tern.mqtt_port);
    options.set_keep_alive(std::time::Duration::from_secs(30));
    options
}

/// mosquitto_pub without a user name or password.
fn anonymous_pub(tern: &Tern, client_id: &str, topic: &str, message: &str) -> bool {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &tern.mqtt_port.to_string()])
        .args(["-i", client_id, "-q", "1", "-t", topic, "-m", message])
        .status()
        .expect("mosquitto_pub must be installed (make deps)")
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_share_one_tenant_and_reach_nothing_else() {
    let tern = Tern::start_with_env(&[("TERN_MQTT__ANONYMOUS_TENANT", "dev")]);
    let mut watcher = Mqtt::connect(anonymous_options(&tern, "watcher"))
        .await
        .expect("anonymous CONNECT is accepted");
    watcher.subscribe("sensors/#", QoS::AtLeastOnce).await;
    let acme = tern.provision("acme", "a");
    let mut acme_sub = Mqtt::device(&tern, &acme).await;
    acme_sub.subscribe("#", QoS::AtLeastOnce).await;

    assert!(anonymous_pub(&tern, "thermo", "sensors/1", "hello"));
    assert_eq!(
        watcher.received().await.triple(),
        ("sensors/1", "hello", QoS::AtLeastOnce)
    );
    let mut acme_pub = Mqtt::device(&tern, &tern.provision("acme", "b")).await;
    acme_sub
        .expect_only_marker(&mut acme_pub, "acme/marker")
        .await;
    // Nor does acme's traffic reach the anonymous tenant.
    acme_pub.publish("sensors/2", "acme only").await;
    let mut anon_pub = Mqtt::connect(anonymous_options(&tern, "thermo-2"))
        .await
        .expect("connect");
    watcher
        .expect_only_marker(&mut anon_pub, "sensors/marker")
        .await;

    // A client id naming a registered device of the tenant publishes as that device.
    let device = tern.provision("dev", "sensor-1");
    assert!(anonymous_pub(
        &tern,
        "sensor-1",
        "telemetry",
        r#"{"temp": 19.5}"#
    ));
    let points = tern.wait_points(&device, "temp", 1).await;
    assert_eq!(points.len(), 1);
    assert_eq!(points[0]["value"], 19.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_anonymous_mode_clients_need_credentials() {
    let tern = Tern::start();
    let refused = Mqtt::connect(anonymous_options(&tern, "watcher")).await;
    assert!(refused.is_err(), "refused without credentials");
    assert!(!anonymous_pub(&tern, "thermo", "sensors/1", "hello"));
}
