//! Plain publish/subscribe inside a tenant: wildcards, QoS, tenant isolation, `$` topics,
//! unsubscribe, and protocol errors in filters and topic names.

use std::time::Duration;

use rumqttc::{Event, Packet, QoS, SubscribeReasonCode};

use crate::harness::{Mqtt, Provisioned, Tern};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_matching_publishes_of_their_own_tenant_only() {
    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let g = tern.provision("globex", "g");
    let (mut sub, mut pubr, mut other) = (
        Mqtt::device(&tern, &a).await,
        Mqtt::device(&tern, &b).await,
        Mqtt::device(&tern, &g).await,
    );

    let codes = sub.subscribe("sensors/+/temp", QoS::ExactlyOnce).await;
    assert_eq!(
        codes,
        vec![SubscribeReasonCode::Success(QoS::ExactlyOnce)],
        "QoS 2 is granted"
    );
    assert_eq!(sub.subscribe("$SYS/#", QoS::AtMostOnce).await.len(), 1);

    pubr.publish("sensors/b/temp", "21.5").await;
    assert_eq!(
        sub.received().await.triple(),
        ("sensors/b/temp", "21.5", QoS::AtLeastOnce)
    );

    // None of these may arrive: another level, another tenant. The marker after them must be
    // the next thing the subscriber sees.
    pubr.publish("sensors/b/humidity", "40").await;
    other.publish("sensors/g/temp", "from globex").await;
    pubr.publish("sensors/b/temp", "marker").await;
    assert_eq!(sub.received().await.payload, "marker");

    // Plain topics are not telemetry: nothing was stored for the publisher.
    let (_, latest) = tern
        .get(
            &b.api_token,
            &format!(
                "/api/v1/tenants/acme/devices/{}/telemetry/latest",
                b.device_id
            ),
        )
        .await;
    assert!(latest["values"].as_object().expect("values").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_unsubscribe_and_qos_0() {
    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let (mut sub, mut pubr) = (Mqtt::device(&tern, &a).await, Mqtt::device(&tern, &b).await);
    sub.subscribe("#", QoS::AtMostOnce).await;
    sub.subscribe("alerts/#", QoS::AtLeastOnce).await;

    pubr.publish("$internal/x", "hidden from #").await;
    pubr.publish("metrics/x", "qos0 copy").await;
    assert_eq!(
        sub.received().await.triple(),
        ("metrics/x", "qos0 copy", QoS::AtMostOnce)
    );
    pubr.publish("alerts/fire", "one copy at QoS 1").await;
    assert_eq!(
        sub.received().await.triple(),
        ("alerts/fire", "one copy at QoS 1", QoS::AtLeastOnce)
    );

    sub.client
        .unsubscribe("#")
        .await
        .expect("queue unsubscribe");
    loop {
        if let Event::Incoming(Packet::UnsubAck(_)) = sub.next().await {
            break;
        }
    }
    pubr.publish("metrics/x", "after unsubscribe").await;
    pubr.publish("alerts/marker", "marker").await;
    assert_eq!(
        sub.received().await.payload,
        "marker",
        "only `alerts/#` is left"
    );
}

/// Connects with raw packets, sends `packet`, and returns everything the server sent until it
/// closed the connection. (rumqttc refuses to send malformed filters and topics itself.)
async fn raw_exchange(
    tern: &Tern,
    p: &Provisioned,
    packet: rumqttc::mqttbytes::v4::Packet,
) -> Vec<u8> {
    use rumqttc::mqttbytes::v4::{Connect, Packet as Raw};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut connect = Connect::new(p.device_id.clone());
    connect.set_login(p.device_id.clone(), p.access_token.clone());
    let mut bytes = bytes::BytesMut::new();
    for packet in [Raw::Connect(connect), packet] {
        packet.write(&mut bytes, usize::MAX).expect("encode");
    }
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", tern.mqtt_port))
        .await
        .expect("connect");
    stream.write_all(&bytes).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer))
        .await
        .expect("closed in time")
        .expect("read");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_filters_and_topic_names_close_the_connection() {
    use rumqttc::mqttbytes::v4::{Packet as Raw, Publish, Subscribe};

    let tern = Tern::start();
    let a = tern.provision("acme", "a");
    let connack = [0x20, 2, 0, 0];
    let mut bad_filter = Subscribe::new("a/#/b", QoS::AtMostOnce);
    bad_filter.pkid = 1;
    assert_eq!(
        raw_exchange(&tern, &a, Raw::Subscribe(bad_filter)).await,
        connack,
        "no SUBACK, closed"
    );
    let mut publish = Publish::new("a/+", QoS::AtLeastOnce, b"x".to_vec());
    publish.pkid = 1;
    assert_eq!(
        raw_exchange(&tern, &a, Raw::Publish(publish)).await,
        connack,
        "no PUBACK, closed"
    );
    // The server is still serving this device.
    let mut mqtt = Mqtt::device(&tern, &a).await;
    assert_eq!(
        mqtt.subscribe("a/+/b", QoS::AtMostOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
}
