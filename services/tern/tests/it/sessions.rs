//! Persistent sessions, MQTT 3.1.1 (CleanSession 0) and MQTT 5 (Session Expiry Interval, Will
//! Delay Interval): subscriptions and queued QoS 1 messages survive a disconnect and a kill -9
//! of the process; in-flight messages are resent with DUP; sessions end when they expire or a
//! clean start discards them. Tests are named after the normative statements they check.

use std::time::Duration;

use rumqttc::{Event, Packet, QoS};

use crate::harness::{Mqtt, PATIENCE, Provisioned, Tern};

/// Connects as `p` with the given CleanSession flag; returns the client and the CONNACK's
/// Session Present flag.
async fn connect_311(tern: &Tern, p: &Provisioned, clean: bool) -> (Mqtt, bool) {
    let mut options = Mqtt::options(tern.mqtt_port, &p.device_id, &p.access_token);
    options.set_clean_session(clean);
    connect_with(options).await
}

async fn connect_with(options: rumqttc::MqttOptions) -> (Mqtt, bool) {
    let (client, mut events) = rumqttc::AsyncClient::new(options, 100);
    loop {
        match tokio::time::timeout(PATIENCE, events.poll())
            .await
            .expect("CONNACK in time")
            .expect("connected")
        {
            Event::Incoming(Packet::ConnAck(ack)) => {
                return (Mqtt { client, events }, ack.session_present);
            }
            _ => continue,
        }
    }
}

/// Disconnects normally and waits until the connection is closed.
async fn leave(mut mqtt: Mqtt) {
    mqtt.client.disconnect().await.expect("queue DISCONNECT");
    while tokio::time::timeout(PATIENCE, mqtt.events.poll())
        .await
        .expect("closed in time")
        .is_ok()
    {}
}

/// Waits until `n` persistent sessions are away (parked and stored), per `/metrics`.
async fn wait_away(tern: &Tern, n: usize) {
    let expected = format!("tern_bridge_sessions_away {n}\n");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if tern.metrics_text().await.contains(&expected) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {expected:?} in /metrics"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_2_4_persistent_session_keeps_subscriptions_and_queued_qos_1_across_kill_9() {
    let mut tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let (mut sub, present) = connect_311(&tern, &a, false).await;
    assert!(!present, "3.2.2-2: no session yet");
    sub.subscribe("alerts/#", QoS::AtLeastOnce).await;
    leave(sub).await;
    wait_away(&tern, 1).await;

    let mut publisher = Mqtt::device(&tern, &b).await;
    let payloads: Vec<Vec<u8>> = (0..50).map(|i| format!("alert {i}").into_bytes()).collect();
    publisher.publish_acked("alerts/fire", payloads).await;
    // QoS 0 is not kept for an absent client; the QoS 1 after it proves it was routed first.
    publisher
        .client
        .publish("alerts/qos0", QoS::AtMostOnce, false, "not kept")
        .await
        .expect("queue");
    publisher.publish("alerts/last", "last").await;
    tern.kill9();
    tern.start_again();

    let (mut sub, present) = connect_311(&tern, &a, false).await;
    assert!(present, "3.2.2-2: the session survived the kill");
    for i in 0..50 {
        let got = sub.received().await;
        assert_eq!(
            got.triple(),
            (
                "alerts/fire",
                format!("alert {i}").as_str(),
                QoS::AtLeastOnce
            ),
            "4.6.0-2: in order"
        );
    }
    assert_eq!(sub.received().await.payload, "last", "QoS 0 was not kept");

    // Completed messages are forgotten: a restart resends none of them, and the
    // subscription is still there.
    leave(sub).await;
    wait_away(&tern, 1).await;
    tern.restart();
    let (mut sub, present) = connect_311(&tern, &a, false).await;
    assert!(present);
    let mut publisher = Mqtt::device(&tern, &b).await;
    sub.expect_only_marker(&mut publisher, "alerts/marker")
        .await;

    // 3.1.2-6: a clean session discards the stored one, and its subscriptions with it.
    leave(sub).await;
    wait_away(&tern, 1).await;
    let (clean, present) = connect_311(&tern, &a, true).await;
    assert!(!present, "3.2.2-1: a clean session is never present");
    leave(clean).await;
    wait_away(&tern, 0).await;
    publisher.publish("alerts/fire", "nobody listens").await;
    let (mut sub, present) = connect_311(&tern, &a, false).await;
    assert!(!present);
    sub.subscribe("check/#", QoS::AtLeastOnce).await;
    sub.expect_only_marker(&mut publisher, "check/marker").await;

    // Another tenant's persistent `#` never saw any of it.
    let g = tern.provision("globex", "g");
    let (mut other, _) = connect_311(&tern, &g, false).await;
    other.subscribe("#", QoS::AtLeastOnce).await;
    let mut globex = Mqtt::device(&tern, &tern.provision("globex", "g2")).await;
    other.expect_only_marker(&mut globex, "globex/marker").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_4_4_0_1_unacknowledged_messages_are_resent_with_dup_and_the_same_packet_id() {
    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let mut options = Mqtt::options(tern.mqtt_port, &a.device_id, &a.access_token);
    options.set_clean_session(false);
    options.set_manual_acks(true);
    let (mut sub, _) = connect_with(options.clone()).await;
    sub.subscribe("jobs/#", QoS::AtLeastOnce).await;
    let mut publisher = Mqtt::device(&tern, &b).await;
    publisher.publish("jobs/1", "first").await;
    let first = next_publish(&mut sub).await;
    assert!(!first.dup);
    // Dropped without a PUBACK: the connection just ends.
    drop(sub);
    wait_away(&tern, 1).await;
    publisher.publish("jobs/2", "second").await;

    let (mut sub, present) = connect_with(options).await;
    assert!(present);
    let again = next_publish(&mut sub).await;
    assert_eq!(
        (&again.payload[..], again.pkid, again.dup),
        (&b"first"[..], first.pkid, true),
        "resent with its packet id and DUP"
    );
    sub.client.ack(&again).await.expect("ack");
    let second = next_publish(&mut sub).await;
    assert_eq!((&second.payload[..], second.dup), (&b"second"[..], false));
    sub.client.ack(&second).await.expect("ack");
}

async fn next_publish(mqtt: &mut Mqtt) -> rumqttc::Publish {
    loop {
        if let Event::Incoming(Packet::Publish(p)) = mqtt.next().await {
            return p;
        }
    }
}

mod mqtt5 {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties, Packet};
    use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

    use super::*;

    struct Client {
        client: AsyncClient,
        events: EventLoop,
        session_present: bool,
        granted_expiry: Option<u32>,
    }

    fn options(tern: &Tern, p: &Provisioned, expiry: u32) -> MqttOptions {
        let mut options = MqttOptions::new(p.device_id.clone(), "127.0.0.1", tern.mqtt_port);
        options.set_credentials(p.device_id.clone(), p.access_token.clone());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(expiry));
        options
    }

    async fn connect(options: MqttOptions) -> Client {
        let (client, mut events) = AsyncClient::new(options, 100);
        loop {
            match tokio::time::timeout(PATIENCE, events.poll())
                .await
                .expect("CONNACK in time")
                .expect("connected")
            {
                Event::Incoming(Packet::ConnAck(ack)) => {
                    return Client {
                        client,
                        events,
                        session_present: ack.session_present,
                        granted_expiry: ack.properties.and_then(|p| p.session_expiry_interval),
                    };
                }
                _ => continue,
            }
        }
    }

    impl Client {
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

        async fn subscribe(&mut self, filter: &str) {
            self.client
                .subscribe(filter, QoS::AtLeastOnce)
                .await
                .expect("queue");
            while !matches!(self.next().await, Packet::SubAck(_)) {}
        }

        async fn publish(&mut self, topic: &str, payload: &str) {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
                .await
                .expect("queue");
            while !matches!(self.next().await, Packet::PubAck(_)) {}
        }

        async fn received(&mut self) -> (String, String) {
            loop {
                if let Packet::Publish(p) = self.next().await {
                    return (
                        String::from_utf8_lossy(&p.topic).into_owned(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    );
                }
            }
        }

        async fn leave(mut self) {
            self.client.disconnect().await.expect("queue");
            while tokio::time::timeout(PATIENCE, self.events.poll())
                .await
                .expect("closed in time")
                .is_ok()
            {}
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mqtt5_3_1_2_11_2_session_expiry_is_capped_resumed_and_ends_the_session() {
        let tern = Tern::start_with_env(&[("TERN_MQTT__MAX_SESSION_EXPIRY_SECS", "2")]);
        let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
        let mut sub = connect(options(&tern, &a, 3600)).await;
        assert_eq!(
            (sub.session_present, sub.granted_expiry),
            (false, Some(2)),
            "3.2.2.3.2: the server's cap is announced"
        );
        sub.subscribe("alerts/#").await;
        sub.leave().await;
        wait_away(&tern, 1).await;
        let mut publisher = connect(options(&tern, &b, 0)).await;
        publisher.publish("alerts/x", "while away").await;

        let mut sub = connect(options(&tern, &a, 2)).await;
        assert!(sub.session_present);
        assert_eq!(sub.granted_expiry, None, "granted as asked");
        assert_eq!(sub.received().await.1, "while away");
        sub.leave().await;
        wait_away(&tern, 1).await;
        // The interval passes with the client away: the session and its subscription end.
        wait_away(&tern, 0).await;
        let sub = connect(options(&tern, &a, 2)).await;
        assert!(!sub.session_present, "expired");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mqtt5_3_14_2_2_2_disconnect_with_session_expiry_0_ends_the_session() {
        let tern = Tern::start();
        let a = tern.provision("acme", "a");
        let mut sub = connect(options(&tern, &a, 600)).await;
        sub.subscribe("alerts/#").await;
        // rumqttc's disconnect carries no properties: this DISCONNECT sets the expiry to 0.
        let disconnect = rumqttc::v5::mqttbytes::v5::Disconnect {
            reason_code: rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::NormalDisconnection,
            properties: Some(rumqttc::v5::mqttbytes::v5::DisconnectProperties {
                session_expiry_interval: Some(0),
                reason_string: None,
                user_properties: Vec::new(),
                server_reference: None,
            }),
        };
        let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", tern.mqtt_port))
            .await
            .expect("tcp");
        drop(sub);
        wait_away(&tern, 1).await;
        raw_session(&mut raw, &a, 600).await;
        let mut bytes = bytes::BytesMut::new();
        disconnect.write(&mut bytes).expect("encode");
        tokio::io::AsyncWriteExt::write_all(&mut raw, &bytes)
            .await
            .expect("send");
        wait_away(&tern, 0).await;
        let sub = connect(options(&tern, &a, 600)).await;
        assert!(
            !sub.session_present,
            "the session ended with the connection"
        );
    }

    /// Opens an MQTT 5 session over a raw socket and reads the CONNACK; returns Session Present.
    async fn raw_session(raw: &mut tokio::net::TcpStream, p: &Provisioned, expiry: u32) -> bool {
        use rumqttc::v5::mqttbytes::v5::{Connect, ConnectProperties, Login};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut properties = ConnectProperties::new();
        properties.session_expiry_interval = Some(expiry);
        let connect = Connect {
            keep_alive: 30,
            client_id: p.device_id.clone(),
            clean_start: false,
            properties: Some(properties),
        };
        let login = Login::new(p.device_id.clone(), p.access_token.clone());
        let mut bytes = bytes::BytesMut::new();
        connect
            .write(&None, &Some(login), &mut bytes)
            .expect("encode");
        raw.write_all(&bytes).await.expect("send");
        let mut buf = bytes::BytesMut::new();
        loop {
            match Packet::read(&mut buf, None) {
                Ok(Packet::ConnAck(ack)) => return ack.session_present,
                Ok(other) => panic!("expected CONNACK, got {other:?}"),
                Err(_) => {
                    assert!(raw.read_buf(&mut buf).await.expect("read") > 0, "closed");
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mqtt5_3_1_3_2_2_will_delay_waits_and_a_returning_device_cancels_the_will() {
        let tern = Tern::start();
        let (a, b, c) = (
            tern.provision("acme", "a"),
            tern.provision("acme", "b"),
            tern.provision("acme", "c"),
        );
        let mut watcher = connect(options(&tern, &a, 0)).await;
        watcher.subscribe("wills/#").await;
        let with_delayed_will = |p: &Provisioned, topic: &str| {
            let mut options = options(&tern, p, 60);
            let properties = LastWillProperties {
                delay_interval: Some(1),
                payload_format_indicator: None,
                message_expiry_interval: None,
                content_type: None,
                response_topic: None,
                correlation_data: None,
                user_properties: Vec::new(),
            };
            options.set_last_will(LastWill::new(
                topic,
                "gone",
                QoS::AtLeastOnce,
                false,
                Some(properties),
            ));
            options
        };
        // b vanishes for good; c vanishes and is back within the delay.
        let b_client = connect(with_delayed_will(&b, "wills/b")).await;
        let c_client = connect(with_delayed_will(&c, "wills/c")).await;
        drop(b_client);
        drop(c_client);
        let back = connect(with_delayed_will(&c, "wills/c")).await;
        assert!(back.session_present);
        let got = watcher.received().await;
        assert_eq!(got, ("wills/b".to_string(), "gone".to_string()));
        // c's will was cancelled: the next message is a marker published after its delay.
        let mut publisher = connect(options(&tern, &tern.provision("acme", "p"), 0)).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        publisher.publish("wills/marker", "marker").await;
        assert_eq!(watcher.received().await.0, "wills/marker");
    }
}
