//! Nothing acknowledged is lost: across a restart, and across SIGTERM in the middle of a burst.

use rumqttc::{Event, Packet, QoS};

use crate::harness::{Mqtt, PATIENCE, Tern};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_credentials_survive_a_restart() {
    let mut tern = Tern::start();
    let p = tern.provision("acme", "boiler");
    let mut mqtt = Mqtt::connect(Mqtt::options(tern.mqtt_port, &p.device_id, &p.access_token))
        .await
        .expect("connect");
    mqtt.publish_acked(
        "telemetry",
        (0..10)
            .map(|i| format!(r#"{{"t": {i}}}"#).into_bytes())
            .collect(),
    )
    .await;
    let before = tern.wait_points(&p, "t", 10).await;
    assert_eq!(before.len(), 10);
    drop(mqtt);

    tern.restart();
    let after = tern.wait_points(&p, "t", 10).await;
    assert_eq!(after, before, "same points after restart, none duplicated");
    // The signing key, the device and the API token persisted too.
    let mut mqtt = Mqtt::connect(Mqtt::options(tern.mqtt_port, &p.device_id, &p.access_token))
        .await
        .expect("same token after restart");
    mqtt.publish_acked("telemetry", vec![br#"{"t": 99}"#.to_vec()])
        .await;
    assert_eq!(tern.wait_points(&p, "t", 11).await.len(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_burst_loses_nothing_acknowledged() {
    let mut tern = Tern::start();
    let p = tern.provision("acme", "burst");
    let mut mqtt = Mqtt::connect(Mqtt::options(tern.mqtt_port, &p.device_id, &p.access_token))
        .await
        .expect("connect");
    let client = mqtt.client.clone();
    let total = 2000;
    tokio::spawn(async move {
        for i in 0..total {
            if client
                .publish(
                    "telemetry",
                    QoS::AtLeastOnce,
                    false,
                    format!(r#"{{"seq": {i}}}"#),
                )
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // Count PUBACKs; stop the server after the first few hundred, while publishes are in flight.
    let mut acked = 0usize;
    let mut stopping = None;
    loop {
        match tokio::time::timeout(PATIENCE, mqtt.events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                acked += 1;
                if acked == 300 && stopping.is_none() {
                    let pid = tern.pid().to_string();
                    stopping = Some(
                        std::process::Command::new("kill")
                            .args(["-TERM", &pid])
                            .status(),
                    );
                }
                if acked == total {
                    break;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    assert!(
        stopping.is_some(),
        "the server was stopped mid-burst (acked {acked})"
    );
    assert!(acked >= 300);
    assert!(
        tern.stop(),
        "clean exit 0 after SIGTERM; log:\n{}",
        tern.log()
    );
    tern.start_again();
    let points = tern.wait_points(&p, "seq", acked).await;
    assert!(
        points.len() >= acked,
        "{} points stored, {acked} acknowledged; log:\n{}",
        points.len(),
        tern.log()
    );
}
