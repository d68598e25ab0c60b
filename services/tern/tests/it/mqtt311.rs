//! MQTT 3.1.1 conformance: each test is named after the normative statements it checks
//! (`[MQTT-x.y.z-n]` in the OASIS specification), driven by rumqttc against `tern up`. Every
//! test also checks that nothing crosses into another tenant.

use std::time::{Duration, Instant};

use rumqttc::{LastWill, QoS};
use serde_json::Value;

use crate::harness::{Mqtt, PATIENCE, Provisioned, Tern};

/// A tenant "acme" with devices `a` (subscriber) and `b` (publisher), and "globex" with `g`.
fn three_devices(tern: &Tern) -> (Provisioned, Provisioned, Provisioned) {
    (
        tern.provision("acme", "a"),
        tern.provision("acme", "b"),
        tern.provision("globex", "g"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_3_1_5_6_8_retained_message_goes_to_new_subscriptions_flagged_retained() {
    let tern = Tern::start();
    let (a, b, g) = three_devices(&tern);
    let mut publisher = Mqtt::device(&tern, &b).await;
    publisher.publish_retained("status/b", "online", true).await;

    let mut sub = Mqtt::device(&tern, &a).await;
    sub.subscribe("status/+", QoS::AtLeastOnce).await;
    let got = sub.received().await;
    assert_eq!(got.triple(), ("status/b", "online", QoS::AtLeastOnce));
    assert!(got.retain, "3.3.1-8: sent because of a new subscription");

    // 3.8.4-3: subscribing again to the same filter re-sends the retained message.
    sub.subscribe("status/+", QoS::AtMostOnce).await;
    let again = sub.received().await;
    assert_eq!(again.triple(), ("status/b", "online", QoS::AtMostOnce));
    assert!(again.retain);

    // Another tenant's `#` sees none of acme's retained messages.
    let mut other = Mqtt::device(&tern, &g).await;
    other.subscribe("#", QoS::AtLeastOnce).await;
    let mut globex_publisher = Mqtt::device(&tern, &tern.provision("globex", "g2")).await;
    other
        .expect_only_marker(&mut globex_publisher, "globex/marker")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_3_1_5_retained_replaced_and_3_3_1_9_established_subscriptions_get_retain_0() {
    let tern = Tern::start();
    let (a, b, _) = three_devices(&tern);
    let mut publisher = Mqtt::device(&tern, &b).await;
    let mut established = Mqtt::device(&tern, &a).await;
    established.subscribe("config/#", QoS::AtLeastOnce).await;

    publisher.publish_retained("config/x", "v1", true).await;
    publisher.publish_retained("config/x", "v2", true).await;
    for expected in ["v1", "v2"] {
        let got = established.received().await;
        assert_eq!(got.payload, expected);
        assert!(
            !got.retain,
            "3.3.1-9: an established subscription gets RETAIN 0"
        );
    }

    let mut late = Mqtt::device(&tern, &a).await;
    late.subscribe("config/x", QoS::AtLeastOnce).await;
    let got = late.received().await;
    assert_eq!(
        (got.payload.as_str(), got.retain),
        ("v2", true),
        "only the last one"
    );
    late.expect_only_marker(&mut publisher, "config/x").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_3_1_10_11_empty_retained_clears_and_3_3_1_12_retain_0_leaves_it() {
    let tern = Tern::start();
    let (a, b, _) = three_devices(&tern);
    let mut publisher = Mqtt::device(&tern, &b).await;
    publisher.publish_retained("door/1", "open", true).await;
    publisher.publish_retained("door/2", "closed", true).await;
    // 3.3.1-12: a publish without RETAIN neither stores nor replaces the retained message.
    publisher.publish("door/2", "transient").await;

    let mut established = Mqtt::device(&tern, &a).await;
    established.subscribe("door/1", QoS::AtLeastOnce).await;
    assert_eq!(established.received().await.payload, "open");
    // 3.3.1-10: the empty retained publish is delivered as normal, and clears.
    publisher.publish_retained("door/1", "", true).await;
    let cleared = established.received().await;
    assert_eq!((cleared.payload.as_str(), cleared.retain), ("", false));

    let mut late = Mqtt::device(&tern, &a).await;
    late.subscribe("door/+", QoS::AtLeastOnce).await;
    let got = late.received().await;
    assert_eq!(
        (got.topic.as_str(), got.payload.as_str(), got.retain),
        ("door/2", "closed", true),
        "3.3.1-11: door/1 is gone; 3.3.1-12: door/2 kept its retained value"
    );
    late.expect_only_marker(&mut publisher, "door/marker").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_restart() {
    let mut tern = Tern::start();
    let (a, b, _) = three_devices(&tern);
    Mqtt::device(&tern, &b)
        .await
        .publish_retained("fw/version", "1.4.2", true)
        .await;
    tern.restart();
    let mut sub = Mqtt::device(&tern, &a).await;
    sub.subscribe("fw/#", QoS::AtLeastOnce).await;
    let got = sub.received().await;
    assert_eq!((got.payload.as_str(), got.retain), ("1.4.2", true));
}

fn with_will(tern: &Tern, p: &Provisioned, topic: &str, message: &str, retain: bool) -> Mqtt {
    let mut options = Mqtt::options(tern.mqtt_port, &p.device_id, &p.access_token);
    options.set_last_will(LastWill::new(topic, message, QoS::AtLeastOnce, retain));
    let (client, events) = rumqttc::AsyncClient::new(options, 10);
    Mqtt { client, events }
}

/// Lifecycle events of a device once at least `n` exist. (Events stored in the same
/// millisecond have no defined order, so tests look them up rather than index them.)
async fn lifecycle(tern: &Tern, p: &Provisioned, n: usize) -> Vec<Value> {
    let path = format!(
        "/api/v1/tenants/{}/devices/{}/events?from=0&limit=1000&kind=lifecycle",
        p.tenant, p.device_id
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = tern.get(&p.api_token, &path).await;
        assert_eq!(status, 200, "{body}");
        let events: Vec<Value> = body["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| serde_json::from_str(e["payload"].as_str().expect("text")).expect("json"))
            .collect();
        if events.len() >= n || Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_2_8_will_published_when_the_connection_breaks_and_logged() {
    let tern = Tern::start();
    let (a, b, g) = three_devices(&tern);
    let mut sub = Mqtt::device(&tern, &a).await;
    sub.subscribe("wills/#", QoS::AtLeastOnce).await;
    let mut other = Mqtt::device(&tern, &g).await;
    other.subscribe("#", QoS::AtLeastOnce).await;

    let mut dying = with_will(&tern, &b, "wills/b", "gone", false);
    dying.next().await; // CONNACK
    drop(dying); // the socket closes without DISCONNECT

    let got = sub.received().await;
    assert_eq!(got.triple(), ("wills/b", "gone", QoS::AtLeastOnce));
    assert!(
        !got.retain,
        "3.1.2-16: will retain 0 is published non-retained"
    );
    let mut globex_publisher = Mqtt::device(&tern, &tern.provision("globex", "g2")).await;
    other
        .expect_only_marker(&mut globex_publisher, "globex/marker")
        .await;

    let events = lifecycle(&tern, &b, 3).await;
    let mut names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or(""))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["connected", "disconnected", "will_published"]);
    assert_eq!(find(&events, "will_published")["topic"], "wills/b");
    assert_eq!(find(&events, "disconnected")["reason"], "client_closed");
    assert_eq!(find(&events, "connected")["protocol"], "mqtt/3.1.1");
}

fn find<'a>(events: &'a [Value], event: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["event"] == event)
        .unwrap_or_else(|| panic!("no {event} in {events:?}"))
}

fn reasons(events: &[Value]) -> Vec<&str> {
    let mut reasons: Vec<&str> = events.iter().filter_map(|e| e["reason"].as_str()).collect();
    reasons.sort_unstable();
    reasons
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_2_10_no_will_after_disconnect_and_3_1_2_17_retained_will() {
    let tern = Tern::start();
    let (a, b, _) = three_devices(&tern);
    let mut sub = Mqtt::device(&tern, &a).await;
    sub.subscribe("wills/#", QoS::AtLeastOnce).await;

    let mut polite = with_will(&tern, &b, "wills/polite", "never sent", false);
    polite.next().await;
    polite.client.disconnect().await.expect("queue DISCONNECT");
    while polite.events.poll().await.is_ok() {}

    let mut dying = with_will(&tern, &b, "wills/retained", "last words", true);
    dying.next().await;
    drop(dying);
    let got = sub.received().await;
    assert_eq!(
        got.topic, "wills/retained",
        "the will of the clean DISCONNECT never came"
    );

    let mut late = Mqtt::device(&tern, &a).await;
    late.subscribe("wills/+", QoS::AtLeastOnce).await;
    let got = late.received().await;
    assert_eq!(
        (got.topic.as_str(), got.payload.as_str(), got.retain),
        ("wills/retained", "last words", true),
        "3.1.2-17: a will with retain 1 is retained"
    );
    let events = lifecycle(&tern, &b, 5).await;
    assert_eq!(reasons(&events), ["client_closed", "client_disconnect"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_2_24_silent_clients_are_disconnected_after_one_and_a_half_keepalives() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tern = Tern::start();
    let (_, b, _) = three_devices(&tern);
    let mut connect = rumqttc::mqttbytes::v4::Connect::new(b.device_id.clone());
    connect.keep_alive = 1;
    connect.set_login(b.device_id.clone(), b.access_token.clone());
    let mut bytes = bytes::BytesMut::new();
    rumqttc::mqttbytes::v4::Packet::Connect(connect)
        .write(&mut bytes, usize::MAX)
        .expect("encode");
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", tern.mqtt_port))
        .await
        .expect("connect");
    stream.write_all(&bytes).await.expect("write");
    let opened = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .expect("closed by the server")
        .expect("read");
    assert_eq!(
        answer,
        [0x20, 2, 0, 0],
        "CONNACK, then nothing until closed"
    );
    assert!(
        opened.elapsed() >= Duration::from_millis(1500),
        "not before 1.5 keepalive periods: {:?}",
        opened.elapsed()
    );
    let events = lifecycle(&tern, &b, 2).await;
    assert_eq!(reasons(&events), ["keepalive_expired"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_4_2_a_second_connect_with_the_same_client_id_takes_over() {
    let tern = Tern::start();
    let b = tern.provision("acme", "b");
    let mut first = Mqtt::device(&tern, &b).await;
    let _second = Mqtt::device(&tern, &b).await;
    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            if first.events.poll().await.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the first connection was closed");
    let events = lifecycle(&tern, &b, 3).await;
    assert_eq!(reasons(&events), ["session_taken_over"]);
}

/// Polls the device's status until `done` holds for it.
async fn status_until(tern: &Tern, p: &Provisioned, done: impl Fn(&Value) -> bool) -> Value {
    let path = format!(
        "/api/v1/tenants/{}/devices/{}/status",
        p.tenant, p.device_id
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (code, status) = tern.get(&p.api_token, &path).await;
        assert_eq!(code, 200, "{status}");
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "status never matched: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_status_follows_connections_and_traffic() {
    let tern = Tern::start();
    let p = tern.provision("acme", "a");
    let never = status_until(&tern, &p, |_| true).await;
    assert_eq!(never["online"], false);
    assert!(never.get("last_seen_ms").is_none(), "{never}");

    let mut device = Mqtt::device(&tern, &p).await;
    let online = status_until(&tern, &p, |s| s["online"] == true).await;
    assert_eq!(online["last_lifecycle"]["transport"], "tcp");
    assert_eq!(online["last_lifecycle"]["protocol"], "mqtt/3.1.1");
    let before_publish = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    device
        .publish_acked("telemetry", vec![br#"{"t": 1}"#.to_vec()])
        .await;
    tern.wait_points(&p, "t", 1).await;
    let seen = status_until(&tern, &p, |s| {
        s["last_seen_ms"]
            .as_i64()
            .is_some_and(|t| t >= before_publish)
    })
    .await;
    assert_eq!(seen["online"], true);

    drop(device);
    let offline = status_until(&tern, &p, |s| s["online"] == false).await;
    assert_eq!(offline["last_lifecycle"]["reason"], "client_closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_by_a_crash_does_not_look_online_after_restart() {
    let mut tern = Tern::start();
    let p = tern.provision("acme", "a");
    let _device = Mqtt::device(&tern, &p).await;
    status_until(&tern, &p, |s| s["online"] == true).await;
    // kill -9: no `disconnected` event is written.
    tern.kill9();
    tern.start_again();
    let after = status_until(&tern, &p, |_| true).await;
    assert_eq!(after["online"], false, "{after}");
    assert_eq!(
        after["last_lifecycle"]["event"], "connected",
        "the crash left no disconnect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_4_3_3_qos_2_deliveries_follow_pubrec_pubrel_pubcomp() {
    use bytes::BytesMut;
    use rumqttc::mqttbytes::v4::{
        Connect, Packet as Raw, PubComp, PubRec, Subscribe, SubscribeReasonCode as Code,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", tern.mqtt_port))
        .await
        .expect("connect");
    let mut inbox = BytesMut::new();
    let send = |packet: Raw| {
        let mut out = BytesMut::new();
        packet.write(&mut out, usize::MAX).expect("encode");
        out
    };
    let mut connect = Connect::new(a.device_id.clone());
    connect.set_login(a.device_id.clone(), a.access_token.clone());
    let mut subscribe = Subscribe::new("q2/#", QoS::ExactlyOnce);
    subscribe.pkid = 1;
    for packet in [Raw::Connect(connect), Raw::Subscribe(subscribe)] {
        stream.write_all(&send(packet)).await.expect("write");
    }
    async fn next(stream: &mut tokio::net::TcpStream, inbox: &mut BytesMut) -> Raw {
        loop {
            if let Ok(packet) = Raw::read(inbox, usize::MAX) {
                return packet;
            }
            let n = tokio::time::timeout(PATIENCE, stream.read_buf(inbox))
                .await
                .expect("in time")
                .expect("read");
            assert!(n > 0, "closed by the server");
        }
    }
    assert!(matches!(
        next(&mut stream, &mut inbox).await,
        Raw::ConnAck(_)
    ));
    match next(&mut stream, &mut inbox).await {
        Raw::SubAck(ack) => assert_eq!(ack.return_codes, [Code::Success(QoS::ExactlyOnce)]),
        other => panic!("expected SUBACK, got {other:?}"),
    }

    let Mqtt {
        client: publisher,
        mut events,
    } = Mqtt::device(&tern, &b).await;
    let driver = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    publisher
        .publish("q2/x", QoS::ExactlyOnce, false, "once")
        .await
        .expect("queue");
    let pkid = match next(&mut stream, &mut inbox).await {
        Raw::Publish(p) => {
            assert_eq!((p.qos, &p.payload[..]), (QoS::ExactlyOnce, &b"once"[..]));
            p.pkid
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    stream
        .write_all(&send(Raw::PubRec(PubRec::new(pkid))))
        .await
        .expect("write");
    match next(&mut stream, &mut inbox).await {
        Raw::PubRel(rel) => assert_eq!(rel.pkid, pkid),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    stream
        .write_all(&send(Raw::PubComp(PubComp::new(pkid))))
        .await
        .expect("write");
    // The exchange is complete: the next message comes with its own exchange, not a resend.
    publisher
        .publish("q2/y", QoS::AtLeastOnce, false, "next")
        .await
        .expect("queue");
    match next(&mut stream, &mut inbox).await {
        Raw::Publish(p) => assert_eq!(&p.payload[..], b"next"),
        other => panic!("expected the next PUBLISH, got {other:?}"),
    }
    driver.abort();
}
