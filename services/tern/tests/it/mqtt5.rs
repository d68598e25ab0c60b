//! MQTT 5 conformance: each test is named after the section of the OASIS MQTT 5.0 standard it
//! checks, driven by rumqttc's MQTT 5 client (and raw MQTT 5 packets where the client will
//! not send what the test needs) against `tern up`.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnectReturnCode, DisconnectReasonCode, Filter, Packet, PubAckReason, Publish,
    PublishProperties, RetainForwardRule, SubscribeProperties, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};

use crate::harness::{PATIENCE, Provisioned, Tern};

struct Client {
    client: AsyncClient,
    events: EventLoop,
    connack: ConnAck,
}

fn options(tern: &Tern, p: &Provisioned) -> MqttOptions {
    let mut options = MqttOptions::new(p.device_id.clone(), "127.0.0.1", tern.mqtt_port);
    options.set_credentials(p.device_id.clone(), p.access_token.clone());
    options.set_keep_alive(Duration::from_secs(30));
    options
}

async fn connect(options: MqttOptions) -> Result<Client, ConnectionError> {
    let (client, mut events) = AsyncClient::new(options, 100);
    loop {
        match tokio::time::timeout(PATIENCE, events.poll())
            .await
            .expect("CONNACK in time")?
        {
            Event::Incoming(Packet::ConnAck(connack)) => {
                return Ok(Client {
                    client,
                    events,
                    connack,
                });
            }
            _ => continue,
        }
    }
}

impl Client {
    async fn device(tern: &Tern, p: &Provisioned) -> Self {
        connect(options(tern, p)).await.expect("connect")
    }

    /// A device subscribed to `path` with default options.
    async fn watching(tern: &Tern, p: &Provisioned, path: &str) -> Self {
        let mut client = Self::device(tern, p).await;
        client
            .subscribe(
                vec![filter(path, false, false, RetainForwardRule::Never)],
                None,
            )
            .await;
        client
    }

    async fn next(&mut self) -> Result<Packet, ConnectionError> {
        loop {
            match tokio::time::timeout(Duration::from_secs(15), self.events.poll())
                .await
                .expect("an event in time")?
            {
                Event::Incoming(packet) => return Ok(packet),
                Event::Outgoing(_) => continue,
            }
        }
    }

    async fn subscribe(
        &mut self,
        filters: Vec<Filter>,
        id: Option<usize>,
    ) -> Vec<SubscribeReasonCode> {
        let properties = SubscribeProperties {
            id,
            user_properties: Vec::new(),
        };
        self.client
            .subscribe_many_with_properties(filters, properties)
            .await
            .expect("queue subscribe");
        loop {
            match self.next().await.expect("alive") {
                Packet::SubAck(ack) => return ack.return_codes,
                Packet::Publish(p) => panic!("PUBLISH before SUBACK on {:?}", p.topic),
                _ => {}
            }
        }
    }

    async fn publish(
        &mut self,
        topic: &str,
        payload: &str,
        retain: bool,
        properties: PublishProperties,
    ) -> PubAckReason {
        self.client
            .publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                retain,
                payload.to_string(),
                properties,
            )
            .await
            .expect("queue publish");
        loop {
            if let Packet::PubAck(ack) = self.next().await.expect("alive") {
                return ack.reason;
            }
        }
    }

    async fn received(&mut self) -> Publish {
        loop {
            if let Packet::Publish(p) = self.next().await.expect("alive") {
                return p;
            }
        }
    }

    /// Proves nothing else arrives first: publishes a marker and expects it next.
    async fn expect_only_marker(&mut self, from: &mut Client, topic: &str) {
        from.publish(topic, "marker", false, PublishProperties::default())
            .await;
        let got = self.received().await;
        assert_eq!(
            (&got.topic[..], &got.payload[..]),
            (topic.as_bytes(), &b"marker"[..])
        );
    }
}

fn filter(path: &str, nolocal: bool, retain_as_published: bool, rule: RetainForwardRule) -> Filter {
    Filter {
        path: path.into(),
        qos: QoS::AtLeastOnce,
        nolocal,
        preserve_retain: retain_as_published,
        retain_forward_rule: rule,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_3_2_2_3_connack_properties_announce_what_the_server_supports() {
    let tern = Tern::start();
    let p = tern.provision("acme", "a");
    let mut opts = options(&tern, &p);
    opts.set_client_id(String::new());
    opts.set_session_expiry_interval(Some(u32::MAX));
    let client = connect(opts).await.expect("connect");
    assert_eq!(client.connack.code, ConnectReturnCode::Success);
    let props = client
        .connack
        .properties
        .expect("MQTT 5 CONNACK properties");
    assert_eq!(props.receive_max, Some(64), "mqtt.max_inflight");
    assert_eq!(props.max_packet_size, Some(262_144), "mqtt.max_packet_size");
    assert_eq!(props.topic_alias_max, Some(64));
    assert_eq!(props.retain_available, Some(1));
    assert_eq!(props.shared_subscription_available, Some(1));
    assert_eq!(props.subscription_identifiers_available, Some(1));
    assert_eq!(
        props.session_expiry_interval,
        Some(604_800),
        "3.2.2.3.2: \"never\" is capped by mqtt.max_session_expiry_secs"
    );
    assert_eq!(
        props.assigned_client_identifier.as_deref(),
        Some(p.device_id.as_str()),
        "3.2.2.3.7: an empty client id gets one assigned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_3_2_2_2_refusals_carry_reason_codes_and_strings() {
    let tern = Tern::start();
    let p = tern.provision("acme", "a");
    let mut bad = options(&tern, &p);
    bad.set_credentials(p.device_id.clone(), "not-a-token");
    match connect(bad).await {
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::BadUserNamePassword)
        }
        other => panic!("expected a refusal, got {:?}", other.map(|c| c.connack)),
    }
    let mut wrong_id = options(&tern, &p);
    wrong_id.set_client_id("someone-else".into());
    match connect(wrong_id).await {
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::ClientIdentifierNotValid)
        }
        other => panic!("expected a refusal, got {:?}", other.map(|c| c.connack)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_3_3_2_3_request_response_and_user_properties_are_forwarded() {
    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let mut responder = Client::device(&tern, &a).await;
    responder
        .subscribe(
            vec![filter(
                "rpc/ask",
                false,
                false,
                RetainForwardRule::OnEverySubscribe,
            )],
            None,
        )
        .await;
    let mut requester = Client::device(&tern, &b).await;
    requester
        .subscribe(
            vec![filter(
                "rpc/answer/b",
                false,
                false,
                RetainForwardRule::OnEverySubscribe,
            )],
            None,
        )
        .await;

    let asked = PublishProperties {
        response_topic: Some("rpc/answer/b".into()),
        correlation_data: Some(Bytes::from_static(b"req-42")),
        user_properties: vec![("traceparent".into(), "00-abc-def-01".into())],
        content_type: Some("application/json".into()),
        ..PublishProperties::default()
    };
    assert_eq!(
        requester
            .publish("rpc/ask", r#"{"q":1}"#, false, asked)
            .await,
        PubAckReason::Success
    );
    let got = responder.received().await;
    let props = got.properties.expect("properties forwarded");
    assert_eq!(props.response_topic.as_deref(), Some("rpc/answer/b"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"req-42"[..]));
    assert_eq!(
        props.user_properties,
        vec![("traceparent".into(), "00-abc-def-01".into())]
    );
    assert_eq!(props.content_type.as_deref(), Some("application/json"));

    let answer = PublishProperties {
        correlation_data: props.correlation_data.clone(),
        ..PublishProperties::default()
    };
    responder.publish("rpc/answer/b", "42", false, answer).await;
    let reply = requester.received().await;
    assert_eq!(reply.payload, Bytes::from_static(b"42"));
    assert_eq!(
        reply.properties.and_then(|p| p.correlation_data).as_deref(),
        Some(&b"req-42"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_3_8_3_1_subscription_options_no_local_retain_as_published_retain_handling() {
    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let mut me = Client::device(&tern, &a).await;
    let mut other = Client::device(&tern, &b).await;
    other
        .publish("state/x", "retained-1", true, PublishProperties::default())
        .await;

    // Retain handling 2: no retained message at subscribe. No local: my own publishes skip me.
    me.subscribe(
        vec![filter("state/#", true, true, RetainForwardRule::Never)],
        None,
    )
    .await;
    me.publish("state/x", "from me", false, PublishProperties::default())
        .await;
    // Retain as published: an established subscription sees RETAIN 1 as sent.
    other
        .publish("state/x", "retained-2", true, PublishProperties::default())
        .await;
    let got = me.received().await;
    assert_eq!((&got.payload[..], got.retain), (&b"retained-2"[..], true));

    // Retain handling 1: retained messages only for a new subscription, not a repeated one.
    let mut late = Client::device(&tern, &tern.provision("acme", "c")).await;
    late.subscribe(
        vec![filter(
            "state/x",
            false,
            false,
            RetainForwardRule::OnNewSubscribe,
        )],
        None,
    )
    .await;
    let first = late.received().await;
    assert_eq!(
        (&first.payload[..], first.retain),
        (&b"retained-2"[..], true)
    );
    late.subscribe(
        vec![filter(
            "state/x",
            false,
            false,
            RetainForwardRule::OnNewSubscribe,
        )],
        None,
    )
    .await;
    late.expect_only_marker(&mut other, "state/x").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_3_8_2_1_2_subscription_identifiers_are_carried_by_one_copy() {
    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let mut sub = Client::device(&tern, &a).await;
    sub.subscribe(
        vec![filter("m/+", false, false, RetainForwardRule::Never)],
        Some(11),
    )
    .await;
    sub.subscribe(
        vec![filter("m/#", false, false, RetainForwardRule::Never)],
        Some(22),
    )
    .await;

    let mut publisher = Client::device(&tern, &b).await;
    publisher
        .publish("m/1", "x", false, PublishProperties::default())
        .await;
    let got = sub.received().await;
    let mut ids = got.properties.expect("ids").subscription_identifiers;
    ids.sort_unstable();
    assert_eq!(ids, [11, 22], "one copy carrying both identifiers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_4_8_2_shared_subscriptions_give_each_message_to_one_member_of_the_group() {
    let tern = Tern::start();
    let p = |name| tern.provision("acme", name);
    let (w1, w2, watcher, b) = (p("w1"), p("w2"), p("watcher"), p("b"));
    let shared = |path| {
        vec![filter(
            path,
            false,
            false,
            RetainForwardRule::OnEverySubscribe,
        )]
    };
    let mut publisher = Client::device(&tern, &b).await;
    // A retained message is not sent to a new shared subscription (4.8.2).
    publisher
        .publish("jobs/old", "retained", true, PublishProperties::default())
        .await;
    let mut workers = Vec::new();
    for w in [&w1, &w2] {
        let mut worker = Client::device(&tern, w).await;
        let codes = worker
            .subscribe(shared("$share/workers/jobs/+"), None)
            .await;
        assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
        workers.push(worker);
    }
    let mut everything = Client::watching(&tern, &watcher, "jobs/+").await;
    // Commands are one device's own: `$share` cannot reach them.
    let codes = workers[0]
        .subscribe(shared("$share/workers/command/req/#"), None)
        .await;
    assert_eq!(codes, vec![SubscribeReasonCode::NotAuthorized]);

    for i in 0..6 {
        publisher
            .publish(
                &format!("jobs/{i}"),
                "job",
                false,
                PublishProperties::default(),
            )
            .await;
    }
    for _ in 0..6 {
        everything.received().await;
    }
    let mut got = Vec::new();
    for worker in &mut workers {
        let mut mine = Vec::new();
        while mine.len() < 3 {
            let p = worker.received().await;
            mine.push(String::from_utf8_lossy(&p.topic).into_owned());
        }
        got.extend(mine);
    }
    got.sort();
    let expected: Vec<String> = (0..6).map(|i| format!("jobs/{i}")).collect();
    assert_eq!(got, expected, "each job once, split between the members");
    // And nothing more: each worker's next message is its own marker.
    for (worker, name) in workers.iter_mut().zip(["w1", "w2"]) {
        let topic = format!("only/{name}");
        worker
            .subscribe(
                vec![filter(&topic, false, false, RetainForwardRule::Never)],
                None,
            )
            .await;
        worker.expect_only_marker(&mut publisher, &topic).await;
    }
    // No Local on a shared subscription is a protocol error (3.8.3-4).
    let mut rude = Client::device(&tern, &tern.provision("acme", "rude")).await;
    rude.client
        .subscribe_many(vec![filter(
            "$share/g/a",
            true,
            false,
            RetainForwardRule::Never,
        )])
        .await
        .expect("queue");
    let reason = loop {
        match rude.next().await {
            Ok(_) => continue,
            Err(ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
                reason_code,
                ..
            })) => break reason_code,
            Err(other) => panic!("expected DISCONNECT 0x82, got {other:?}"),
        }
    };
    assert_eq!(reason, DisconnectReasonCode::ProtocolError);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_3_3_4_unauthorised_publishes_get_puback_0x87_and_the_connection_lives() {
    let tern = Tern::start();
    let a = tern.provision("acme", "a");
    let mut device = Client::device(&tern, &a).await;
    let reason = device
        .publish(
            "command/req/x/reboot",
            "{}",
            false,
            PublishProperties::default(),
        )
        .await;
    assert_eq!(reason, PubAckReason::NotAuthorized);
    assert_eq!(
        device
            .publish("still/alive", "yes", false, PublishProperties::default())
            .await,
        PubAckReason::Success
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_3_14_2_1_takeover_is_announced_with_reason_0x8e() {
    let tern = Tern::start();
    let a = tern.provision("acme", "a");
    let mut first = Client::device(&tern, &a).await;
    let _second = Client::device(&tern, &a).await;
    // rumqttc reports the server's DISCONNECT as the end of the connection, with its reason.
    match first.next().await {
        Err(ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
            reason_code,
            reason_string,
        })) => {
            assert_eq!(reason_code, DisconnectReasonCode::SessionTakenOver);
            assert!(reason_string.is_some(), "with a reason string");
        }
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_3_14_2_1_disconnect_with_will_message_publishes_the_will() {
    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let mut watcher = Client::watching(&tern, &a, "wills/#").await;

    // Raw packets: rumqttc's client always disconnects with reason 0x00.
    let mut raw = Raw::connect(&tern, &b, Some(("wills/b", "bye"))).await;
    // Reason 0x04 and no properties: remaining length 1 (3.14.2.2.1).
    raw.send_bytes(&[0xE0, 0x01, 0x04]).await;
    let got = watcher.received().await;
    assert_eq!(
        (&got.topic[..], &got.payload[..]),
        (&b"wills/b"[..], &b"bye"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_3_3_2_3_4_topic_aliases_set_and_use_and_out_of_range_is_0x94() {
    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let mut watcher = Client::watching(&tern, &a, "alias/#").await;
    let mut raw = Raw::connect(&tern, &b, None).await;
    let with_alias = |topic: &'static str, alias: u16, payload: &'static str| {
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: Bytes::from_static(topic.as_bytes()),
            pkid: 0,
            payload: Bytes::from_static(payload.as_bytes()),
            properties: Some(PublishProperties {
                topic_alias: Some(alias),
                ..PublishProperties::default()
            }),
        })
    };
    raw.send(with_alias("alias/long/topic/name", 3, "one"))
        .await;
    raw.send(with_alias("", 3, "two")).await;
    for expected in ["one", "two"] {
        let got = watcher.received().await;
        assert_eq!(&got.topic[..], b"alias/long/topic/name");
        assert_eq!(&got.payload[..], expected.as_bytes());
        assert!(
            got.properties.is_none_or(|p| p.topic_alias.is_none()),
            "aliases are per connection, not forwarded"
        );
    }
    raw.send(with_alias("alias/x", 65, "too high")).await;
    assert_eq!(
        raw.disconnect_reason().await,
        Some(DisconnectReasonCode::TopicAliasInvalid)
    );
}

/// A raw MQTT 5 connection, for packets rumqttc's client will not send.
struct Raw {
    stream: tokio::net::TcpStream,
    buf: BytesMut,
}

impl Raw {
    /// Connects and consumes the CONNACK.
    async fn connect(
        tern: &Tern,
        p: &Provisioned,
        will: Option<(&'static str, &'static str)>,
    ) -> Self {
        use rumqttc::v5::mqttbytes::v5::{Connect, LastWill, Login};
        let connect = Packet::Connect(
            Connect {
                keep_alive: 30,
                client_id: p.device_id.clone(),
                clean_start: true,
                properties: None,
            },
            will.map(|(topic, message)| {
                LastWill::new(topic, message, QoS::AtLeastOnce, false, None)
            }),
            Some(Login::new(p.device_id.clone(), p.access_token.clone())),
        );
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", tern.mqtt_port))
            .await
            .expect("connect");
        let mut raw = Self {
            stream,
            buf: BytesMut::new(),
        };
        raw.send(connect).await;
        match raw.read().await {
            Some(Packet::ConnAck(c)) => assert_eq!(c.code, ConnectReturnCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        raw
    }

    async fn send(&mut self, packet: Packet) {
        let mut buf = BytesMut::new();
        packet.write(&mut buf, None).expect("encode");
        self.send_bytes(&buf).await;
    }

    async fn send_bytes(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.expect("write");
    }

    /// The next packet, or `None` once the server closed.
    async fn read(&mut self) -> Option<Packet> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Ok(packet) = Packet::read(&mut self.buf, None) {
                return Some(packet);
            }
            let n = tokio::time::timeout(PATIENCE, self.stream.read_buf(&mut self.buf))
                .await
                .expect("data in time")
                .expect("read");
            if n == 0 {
                return None;
            }
        }
    }

    /// Reads until the server's DISCONNECT (its reason) or the end of the stream (`None`).
    async fn disconnect_reason(&mut self) -> Option<DisconnectReasonCode> {
        loop {
            if let Packet::Disconnect(d) = self.read().await? {
                return Some(d.reason_code);
            }
        }
    }
}

#[test]
fn mqtt5_interoperates_with_the_eclipse_paho_python_client() {
    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/interop/paho_mqtt5.py"
    );
    // Debian's interpreter, where python3-paho-mqtt (make deps) is installed.
    let out = std::process::Command::new("/usr/bin/python3")
        .arg(script)
        .arg(tern.mqtt_port.to_string())
        .args([&a.device_id, &a.access_token, &b.device_id, &b.access_token])
        .output()
        .expect("run /usr/bin/python3 (make deps installs python3-paho-mqtt)");
    assert!(
        out.status.success(),
        "paho: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_telemetry_from_mosquitto_pub_is_stored() {
    let tern = Tern::start();
    let p = tern.provision("acme", "a");
    let out = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &tern.mqtt_port.to_string(),
            "-V",
            "mqttv5",
        ])
        .args([
            "-i",
            &p.device_id,
            "-u",
            &p.device_id,
            "-P",
            &p.access_token,
        ])
        .args(["-D", "publish", "user-property", "origin", "mosquitto"])
        .args(["-q", "1", "-t", "telemetry", "-m", r#"{"temp": 23.5}"#])
        .output()
        .expect("mosquitto_pub must be installed (make deps)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let points = tern.wait_points(&p, "temp", 1).await;
    assert_eq!(points[0]["value"], 23.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_3_3_2_3_3_retained_messages_keep_properties_and_expire() {
    let tern = Tern::start();
    let (a, b) = (tern.provision("acme", "a"), tern.provision("acme", "b"));
    let mut publisher = Client::device(&tern, &b).await;
    let lasting = PublishProperties {
        user_properties: vec![("unit".into(), "celsius".into())],
        ..PublishProperties::default()
    };
    publisher.publish("r/lasting", "21", true, lasting).await;
    let brief = PublishProperties {
        message_expiry_interval: Some(1),
        ..PublishProperties::default()
    };
    publisher.publish("r/brief", "soon gone", true, brief).await;

    let mut early = Client::device(&tern, &a).await;
    early
        .subscribe(
            vec![filter(
                "r/#",
                false,
                false,
                RetainForwardRule::OnEverySubscribe,
            )],
            None,
        )
        .await;
    let mut got = [early.received().await, early.received().await];
    got.sort_by(|x, y| x.topic.cmp(&y.topic));
    let brief_props = got[0].properties.clone().expect("properties");
    assert!(
        brief_props.message_expiry_interval.is_some_and(|s| s <= 1),
        "the remaining expiry interval: {brief_props:?}"
    );
    assert_eq!(
        got[1]
            .properties
            .clone()
            .expect("properties")
            .user_properties,
        vec![("unit".to_string(), "celsius".to_string())],
        "a retained message keeps its user properties"
    );

    // After its expiry interval the brief one is no longer handed to new subscriptions.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut late = Client::device(&tern, &tern.provision("acme", "c")).await;
    late.subscribe(
        vec![filter(
            "r/#",
            false,
            false,
            RetainForwardRule::OnEverySubscribe,
        )],
        None,
    )
    .await;
    assert_eq!(&late.received().await.topic[..], b"r/lasting");
    late.expect_only_marker(&mut publisher, "r/marker").await;
}

/// The tenant's policies decide publishes and subscribes per topic: refused ones get 0x87
/// (PUBACK, SUBACK) and the connection lives on; a policy change applies to live connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_policies_refuse_publish_and_subscribe_with_0x87() {
    let tern = Tern::start();
    let sensor = tern.provision("acme", "sensor");
    let siren = tern.provision("acme", "siren");
    let (status, _) = tern
        .send_json(
            reqwest::Method::PATCH,
            &siren.api_token,
            "/api/v1/tenants/acme/devices/siren",
            &serde_json::json!({"labels": {"role": "siren"}}),
        )
        .await;
    assert_eq!(status, 200);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("alarms.cedar");
    std::fs::write(
        &file,
        r#"// Only sirens may raise alarms or listen to them.
forbid (principal is Device, action, resource is Topic)
when { resource.name like "alarms/*" }
unless { principal.hasTag("role") && principal.getTag("role") == "siren" };
"#,
    )
    .expect("write");
    let file = file.display().to_string();

    let mut sensor_client = Client::device(&tern, &sensor).await;
    let props = PublishProperties::default;
    assert_eq!(
        sensor_client
            .publish("alarms/fire", "1", false, props())
            .await,
        PubAckReason::Success
    );
    tern.cli_json(&[
        "policy",
        "put",
        "alarms-for-sirens",
        &file,
        "--tenant",
        "acme",
    ]);
    assert_eq!(
        sensor_client
            .publish("alarms/fire", "2", false, props())
            .await,
        PubAckReason::NotAuthorized,
        "the change reached the live connection"
    );
    let codes = sensor_client
        .subscribe(
            vec![filter("alarms/#", false, false, RetainForwardRule::Never)],
            None,
        )
        .await;
    assert_eq!(codes, vec![SubscribeReasonCode::NotAuthorized]);
    assert_eq!(
        sensor_client
            .publish("status/ok", "yes", false, props())
            .await,
        PubAckReason::Success,
        "other topics, and the connection, are unaffected"
    );

    let mut siren_client = Client::device(&tern, &siren).await;
    let codes = siren_client
        .subscribe(
            vec![filter("alarms/#", false, false, RetainForwardRule::Never)],
            None,
        )
        .await;
    assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    assert_eq!(
        siren_client
            .publish("alarms/fire", "3", false, props())
            .await,
        PubAckReason::Success
    );
}
