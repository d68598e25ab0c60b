//! Plain publish/subscribe inside a tenant: wildcards, QoS, tenant isolation, `$` topics,
//! unsubscribe, and protocol errors in filters and topic names.

use std::time::Duration;

use rumqttc::{Event, Packet, QoS, SubscribeReasonCode};

use crate::harness::{Mqtt, Provisioned, Tern};

async fn connect(tern: &Tern, p: &Provisioned) -> Mqtt {
    Mqtt::connect(Mqtt::options(tern.mqtt_port, &p.device_id, &p.access_token))
        .await
        .expect("connect")
}

/// Subscribes and waits for the SUBACK; returns its return codes.
async fn subscribe(mqtt: &mut Mqtt, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
    mqtt.client
        .subscribe(filter, qos)
        .await
        .expect("queue subscribe");
    loop {
        if let Event::Incoming(Packet::SubAck(ack)) = next(mqtt).await {
            return ack.return_codes;
        }
    }
}

async fn next(mqtt: &mut Mqtt) -> Event {
    tokio::time::timeout(Duration::from_secs(15), mqtt.events.poll())
        .await
        .expect("an event in time")
        .expect("connection alive")
}

/// The next PUBLISH received, as (topic, payload, QoS).
async fn received(mqtt: &mut Mqtt) -> (String, String, QoS) {
    loop {
        if let Event::Incoming(Packet::Publish(p)) = next(mqtt).await {
            return (
                p.topic,
                String::from_utf8_lossy(&p.payload).into_owned(),
                p.qos,
            );
        }
    }
}

/// Publishes QoS 1 and drives the publisher until its PUBACK.
async fn publish(mqtt: &mut Mqtt, topic: &str, payload: &str) {
    mqtt.client
        .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
        .await
        .expect("queue publish");
    loop {
        if let Event::Incoming(Packet::PubAck(_)) = next(mqtt).await {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_matching_publishes_of_their_own_tenant_only() {
    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let g = tern.provision("globex", "g");
    let (mut sub, mut pubr, mut other) = (
        connect(&tern, &a).await,
        connect(&tern, &b).await,
        connect(&tern, &g).await,
    );

    let codes = subscribe(&mut sub, "sensors/+/temp", QoS::ExactlyOnce).await;
    assert_eq!(
        codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
        "QoS 2 is granted as 1"
    );
    assert_eq!(
        subscribe(&mut sub, "$SYS/#", QoS::AtMostOnce).await.len(),
        1
    );

    publish(&mut pubr, "sensors/b/temp", "21.5").await;
    assert_eq!(
        received(&mut sub).await,
        ("sensors/b/temp".into(), "21.5".into(), QoS::AtLeastOnce)
    );

    // None of these may arrive: another level, another tenant. The marker after them must be
    // the next thing the subscriber sees.
    publish(&mut pubr, "sensors/b/humidity", "40").await;
    publish(&mut other, "sensors/g/temp", "from globex").await;
    publish(&mut pubr, "sensors/b/temp", "marker").await;
    assert_eq!(received(&mut sub).await.1, "marker");

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
    let (mut sub, mut pubr) = (connect(&tern, &a).await, connect(&tern, &b).await);
    subscribe(&mut sub, "#", QoS::AtMostOnce).await;
    subscribe(&mut sub, "alerts/#", QoS::AtLeastOnce).await;

    publish(&mut pubr, "$internal/x", "hidden from #").await;
    publish(&mut pubr, "metrics/x", "qos0 copy").await;
    assert_eq!(
        received(&mut sub).await,
        ("metrics/x".into(), "qos0 copy".into(), QoS::AtMostOnce)
    );
    publish(&mut pubr, "alerts/fire", "one copy at QoS 1").await;
    assert_eq!(
        received(&mut sub).await,
        (
            "alerts/fire".into(),
            "one copy at QoS 1".into(),
            QoS::AtLeastOnce
        )
    );

    sub.client
        .unsubscribe("#")
        .await
        .expect("queue unsubscribe");
    loop {
        if let Event::Incoming(Packet::UnsubAck(_)) = next(&mut sub).await {
            break;
        }
    }
    publish(&mut pubr, "metrics/x", "after unsubscribe").await;
    publish(&mut pubr, "alerts/marker", "marker").await;
    assert_eq!(
        received(&mut sub).await.1,
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
    let mut mqtt = connect(&tern, &a).await;
    assert_eq!(
        subscribe(&mut mqtt, "a/+/b", QoS::AtMostOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
}
