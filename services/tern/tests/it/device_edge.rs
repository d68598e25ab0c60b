//! The MQTT edge: authentication, publishing, and bad input that must close one connection
//! and nothing else.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use rumqttc::{ConnectReturnCode, ConnectionError, QoS};
use serde_json::Value;

use crate::harness::{Mqtt, Tern, mosquitto_pub};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_from_mosquitto_pub_and_rumqttc_reads_back_over_rest() {
    let tern = Tern::start();
    let p = tern.provision("acme", "boiler-1");

    let out = mosquitto_pub(
        tern.mqtt_port,
        &p.device_id,
        &p.access_token,
        "telemetry",
        r#"{"temp": 21.5, "ts": 1700000000000}"#,
    );
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut mqtt = Mqtt::connect(Mqtt::options(tern.mqtt_port, &p.device_id, &p.access_token))
        .await
        .expect("connect");
    let payloads = (1..=20)
        .map(|i| format!(r#"{{"temp": {i}, "ts": {}}}"#, 1_700_000_000_000i64 + i).into_bytes())
        .collect();
    mqtt.publish_acked("telemetry", payloads).await;

    let points = tern.wait_points(&p, "temp", 21).await;
    assert_eq!(points.len(), 21);
    assert_eq!(points[0]["ts"], 1_700_000_000_000i64);
    assert_eq!(points[0]["value"], 21.5);
    assert_eq!(points[20]["value"], 20.0);

    let (status, latest) = tern
        .get(
            &p.api_token,
            &format!(
                "/api/v1/tenants/acme/devices/{}/telemetry/latest",
                p.device_id
            ),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(latest["values"]["temp"]["value"], 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused_and_other_clients_keep_working() {
    let tern = Tern::start();
    let a = tern.provision("acme", "a");
    let b = tern.provision("acme", "b");
    let mut good = Mqtt::connect(Mqtt::options(tern.mqtt_port, &a.device_id, &a.access_token))
        .await
        .expect("connect");

    // Wrong token: CONNACK 4 (bad user name or password), as mosquitto_pub reports it.
    let out = mosquitto_pub(
        tern.mqtt_port,
        &a.device_id,
        "not-a-token",
        "telemetry",
        "{}",
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad user name or password"),
        "{out:?}"
    );

    // Another device's (valid) token.
    let refused = Mqtt::connect(Mqtt::options(tern.mqtt_port, &b.device_id, &a.access_token)).await;
    assert!(
        matches!(
            refused,
            Err(ConnectionError::ConnectionRefused(
                ConnectReturnCode::BadUserNamePassword
            ))
        ),
        "{:?}",
        refused.err()
    );

    // A token of a deleted device.
    let c = tern.provision("acme", "c");
    assert!(
        tern.cli(&["device", "delete", "c", "--tenant", "acme"])
            .status
            .success()
    );
    let refused = Mqtt::connect(Mqtt::options(tern.mqtt_port, &c.device_id, &c.access_token)).await;
    assert!(
        matches!(
            refused,
            Err(ConnectionError::ConnectionRefused(
                ConnectReturnCode::NotAuthorized
            ))
        ),
        "{:?}",
        refused.err()
    );

    good.publish_acked("telemetry", vec![br#"{"v": 1}"#.to_vec()])
        .await;
    assert_eq!(tern.wait_points(&a, "v", 1).await.len(), 1);
}

/// Raw bytes on the MQTT port: the server must answer by closing this connection only.
fn send_raw(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    stream.write_all(bytes).expect("write");
    let mut answer = Vec::new();
    // Returns when the server closes the connection (EOF) or resets it.
    let _ = stream.read_to_end(&mut answer);
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_packets_close_only_their_connection() {
    let tern = Tern::start_with_env(&[("TERN_MQTT__MAX_PACKET_SIZE", "1024")]);
    let p = tern.provision("acme", "d");
    let mut good = Mqtt::connect(Mqtt::options(tern.mqtt_port, &p.device_id, &p.access_token))
        .await
        .expect("connect");

    // Garbage instead of CONNECT: closed without a CONNACK.
    assert!(send_raw(tern.mqtt_port, b"\xff\xff\xff\xff\xff garbage").is_empty());
    // A CONNECT with an impossible remaining length (5 continuation bytes).
    assert!(send_raw(tern.mqtt_port, &[0x10, 0xff, 0xff, 0xff, 0xff, 0x7f]).is_empty());
    // An unsupported protocol level gets CONNACK 1 (unacceptable protocol version).
    let mut connect_v3 = vec![0x10, 0x0c, 0x00, 0x04];
    connect_v3.extend_from_slice(b"MQTT");
    connect_v3.extend_from_slice(&[0x09, 0x02, 0x00, 0x3c, 0x00, 0x00]);
    assert_eq!(
        send_raw(tern.mqtt_port, &connect_v3),
        vec![0x20, 0x02, 0x00, 0x01]
    );

    // An authenticated client that sends a packet bigger than mqtt.max_packet_size.
    let q = tern.provision("acme", "e");
    let mut big = Mqtt::connect(Mqtt::options(tern.mqtt_port, &q.device_id, &q.access_token))
        .await
        .expect("connect");
    big.client
        .publish("telemetry", QoS::AtLeastOnce, false, vec![b'x'; 4096])
        .await
        .expect("queue");
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(15), big.events.poll())
            .await
            .expect("closed in time")
        {
            Err(e) => break e,
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                panic!("an oversized publish was acknowledged")
            }
            Ok(_) => {}
        }
    };
    assert!(
        matches!(
            closed,
            ConnectionError::Io(_) | ConnectionError::MqttState(_)
        ),
        "{closed}"
    );

    // Everyone else is unaffected: the connection opened before all this still works.
    good.publish_acked("telemetry", vec![br#"{"ok": 1}"#.to_vec()])
        .await;
    assert_eq!(tern.wait_points(&p, "ok", 1).await.len(), 1);
    let (status, _) = tern.get(&p.api_token, "/api/v1/tenants/acme").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_json_payloads_are_kept_as_raw_events() {
    let tern = Tern::start();
    let p = tern.provision("acme", "cam");
    let mut mqtt = Mqtt::connect(Mqtt::options(tern.mqtt_port, &p.device_id, &p.access_token))
        .await
        .expect("connect");
    mqtt.publish_acked("telemetry", vec![b"plain text reading".to_vec()])
        .await;
    mqtt.publish_acked("event", vec![b"\xff\x01door".to_vec()])
        .await;

    let path = format!("/api/v1/tenants/acme/devices/{}/events?from=0", p.device_id);
    let mut events = Vec::new();
    for _ in 0..300 {
        let (status, body) = tern.get(&p.api_token, &path).await;
        assert_eq!(status, 200);
        events = body["events"].as_array().cloned().unwrap_or_default();
        events.retain(|e| e["kind"] != "lifecycle");
        if events.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(events.len(), 2, "{events:?}");
    let text = events
        .iter()
        .find(|e| e["kind"] == "telemetry")
        .expect("telemetry event");
    assert_eq!(text["payload"], "plain text reading");
    assert_eq!(text["content_type"], "application/octet-stream");
    let binary = events.iter().find(|e| e["kind"] == "event").expect("event");
    assert_eq!(
        binary["payload_base64"], "/wFkb29y",
        "non-UTF-8 payloads come back as base64"
    );
    let (_, only_events) = tern.get(&p.api_token, &format!("{path}&kind=event")).await;
    let kinds: Vec<&Value> = only_events["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| &e["kind"])
        .collect();
    assert_eq!(kinds, ["event"]);
    let (status, error) = tern.get(&p.api_token, &format!("{path}&kind=bogus")).await;
    assert_eq!(
        (status, &error["error"]["field"]),
        (400, &Value::from("kind"))
    );
    let (_, latest) = tern
        .get(
            &p.api_token,
            &format!(
                "/api/v1/tenants/acme/devices/{}/telemetry/latest",
                p.device_id
            ),
        )
        .await;
    assert!(
        latest["values"].as_object().expect("values").is_empty(),
        "no time series from non-JSON"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_and_2_are_stored_and_a_resent_qos_2_publish_is_stored_once() {
    use bytes::BytesMut;
    use rumqttc::mqttbytes::v4::{Connect, Packet, PubRel, Publish};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let tern = Tern::start();
    let p = tern.provision("acme", "q");

    // rumqttc: QoS 0 then QoS 2; the final PUBCOMP means everything before it is durable.
    let mut mqtt = Mqtt::connect(Mqtt::options(tern.mqtt_port, &p.device_id, &p.access_token))
        .await
        .expect("connect");
    for i in 0..3 {
        mqtt.client
            .publish(
                "telemetry",
                QoS::AtMostOnce,
                false,
                format!(r#"{{"zero": {i}}}"#),
            )
            .await
            .expect("queue");
    }
    mqtt.client
        .publish("telemetry", QoS::ExactlyOnce, false, r#"{"two": 1}"#)
        .await
        .expect("queue");
    loop {
        match tokio::time::timeout(Duration::from_secs(15), mqtt.events.poll())
            .await
            .expect("PUBCOMP in time")
            .expect("connection")
        {
            rumqttc::Event::Incoming(rumqttc::Packet::PubComp(_)) => break,
            _ => continue,
        }
    }
    assert_eq!(tern.wait_points(&p, "zero", 3).await.len(), 3);
    assert_eq!(tern.wait_points(&p, "two", 1).await.len(), 1);
    drop(mqtt);

    // Raw packets: the same QoS 2 publish twice (a resend before PUBREL), then PUBREL.
    let encode = |packets: &[Packet]| {
        let mut buf = BytesMut::new();
        for packet in packets {
            packet.write(&mut buf, usize::MAX).expect("encode");
        }
        buf
    };
    let mut connect = Connect::new(p.device_id.clone());
    connect.set_login(p.device_id.clone(), p.access_token.clone());
    let mut publish = Publish::new("telemetry", QoS::ExactlyOnce, br#"{"once": 1}"#.to_vec());
    publish.pkid = 9;
    let mut resent = publish.clone();
    resent.dup = true;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", tern.mqtt_port))
        .await
        .expect("connect");
    let bytes = encode(&[
        Packet::Connect(connect),
        Packet::Publish(publish),
        Packet::Publish(resent),
        Packet::PubRel(PubRel::new(9)),
    ]);
    stream.write_all(&bytes).await.expect("write");
    // CONNACK, PUBREC 9, PUBREC 9, PUBCOMP 9: 4 + 4 + 4 + 4 bytes.
    let mut answer = vec![0u8; 16];
    tokio::time::timeout(Duration::from_secs(15), stream.read_exact(&mut answer))
        .await
        .expect("answers in time")
        .expect("read");
    assert_eq!(
        answer,
        [0x20, 2, 0, 0, 0x50, 2, 0, 9, 0x50, 2, 0, 9, 0x70, 2, 0, 9],
        "CONNACK, PUBREC, PUBREC, PUBCOMP in order"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        tern.wait_points(&p, "once", 1).await.len(),
        1,
        "stored exactly once"
    );
}
