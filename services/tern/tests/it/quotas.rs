//! Per-tenant connection quotas and per-device and per-tenant publish rates
//! (mqtt.max_connections_per_tenant, mqtt.max_publish_rate_per_device, ..._per_tenant).

use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};

use crate::harness::{Mqtt, PATIENCE, Provisioned, Tern};

async fn connect_v5(tern: &Tern, p: &Provisioned) -> Result<AsyncClient, ConnectionError> {
    let mut options = MqttOptions::new(p.device_id.clone(), "127.0.0.1", tern.mqtt_port);
    options.set_credentials(p.device_id.clone(), p.access_token.clone());
    let (client, mut events) = AsyncClient::new(options, 10);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = tokio::time::timeout(PATIENCE, events.poll())
            .await
            .expect("in time")?
        {
            // Keep the connection served in the background.
            tokio::spawn(async move { while events.poll().await.is_ok() {} });
            return Ok(client);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_connection_quota_is_refused_and_others_are_not() {
    let tern = Tern::start_with_env(&[("TERN_MQTT__MAX_CONNECTIONS_PER_TENANT", "2")]);
    let devices: Vec<Provisioned> = (0..3)
        .map(|i| tern.provision("acme", &format!("d{i}")))
        .collect();
    let _first = connect_v5(&tern, &devices[0]).await.expect("1 of 2");
    let _second = connect_v5(&tern, &devices[1]).await.expect("2 of 2");
    match connect_v5(&tern, &devices[2]).await {
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::QuotaExceeded)
        }
        other => panic!("expected 0x97, got {:?}", other.map(|_| ())),
    }
    // 3.1.1 clients get "server unavailable" (3).
    let refused = Mqtt::connect(Mqtt::options(
        tern.mqtt_port,
        &devices[2].device_id,
        &devices[2].access_token,
    ))
    .await;
    assert!(
        matches!(
            refused,
            Err(rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::ServiceUnavailable
            ))
        ),
        "{:?}",
        refused.err()
    );
    let other = tern.provision("globex", "g");
    connect_v5(&tern, &other)
        .await
        .expect("another tenant has its own quota");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_over_its_publish_rate_is_slowed_down_not_dropped() {
    let tern = Tern::start_with_env(&[("TERN_MQTT__MAX_PUBLISH_RATE_PER_DEVICE", "20")]);
    let p = tern.provision("acme", "a");
    let mut mqtt = Mqtt::device(&tern, &p).await;
    let started = Instant::now();
    let payloads = (0..60)
        .map(|i| format!(r#"{{"n": {i}}}"#).into_bytes())
        .collect();
    mqtt.publish_acked("telemetry", payloads).await;
    let took = started.elapsed();
    // A burst of 20, then 20/s: the last 40 need at least 2 s. (A lower bound only.)
    assert!(
        took >= Duration::from_millis(1800),
        "not slowed down: {took:?}"
    );
    assert_eq!(
        tern.wait_points(&p, "n", 60).await.len(),
        60,
        "nothing dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_publish_rate_is_slowed_down_across_devices_not_dropped() {
    let tern = Tern::start_with_env(&[("TERN_MQTT__MAX_PUBLISH_RATE_PER_TENANT", "20")]);
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let payloads = || {
        (0..30)
            .map(|i| format!(r#"{{"n": {i}}}"#).into_bytes())
            .collect::<Vec<_>>()
    };
    let (mut first, mut second) = (Mqtt::device(&tern, &a).await, Mqtt::device(&tern, &b).await);
    let started = Instant::now();
    tokio::join!(
        first.publish_acked("telemetry", payloads()),
        second.publish_acked("telemetry", payloads())
    );
    let took = started.elapsed();
    // 60 publishes against one tenant bucket of 20/s with a burst of 20: at least 2 s, though
    // no device has a limit of its own. (A lower bound only.)
    assert!(
        took >= Duration::from_millis(1800),
        "not slowed down: {took:?}"
    );
    for p in [&a, &b] {
        assert_eq!(
            tern.wait_points(p, "n", 30).await.len(),
            30,
            "nothing dropped"
        );
    }
}
