//! The distributed shape: every service its own process (`tern identity`, `tern registry`,
//! `tern gateway`, `tern analytics`, `tern bridge`, `tern dashboard`) on one served store, a
//! Kafka-protocol log and a nats-server. A device's telemetry goes bridge → Kafka → analytics →
//! store → REST; a REST command reaches the device through the bridge and its answer comes
//! back; a rule's republish crosses from analytics to the bridge; two analytics processes
//! split the per-device rules' partitions; and one killed with SIGKILL mid-stream (then
//! replaced) leaves nothing acknowledged lost or stored twice, no window short or counted
//! twice, no action repeated, and the fleet-wide rules go on in a survivor.
//!
//! Kafka is librdkafka's mock cluster (the Kafka protocol on real TCP ports): tansu 0.6 does
//! not re-form a consumer group whose member died without leaving, which is what kill -9 does
//! (see kafka.rs).

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use std::time::Duration;

use rumqttc::{Event, Packet, QoS};
use serde_json::Value;
use tern_proto::tonic::Request;
use tern_proto::tonic::metadata::MetadataValue;
use tern_proto::v1::GetDeviceRequest;
use tern_proto::v1::registry_client::RegistryClient;
use tern_registry::testing::NatsServer;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::{Mqtt, PATIENCE, Provisioned, Tern, ping_round_trip, values};
use crate::rules::{PER_MINUTE, create_rule, device_labelled, readings};
use crate::served_store::StoreServer;

/// Everything the services share, started on loopback: a Kafka-protocol broker (librdkafka's
/// mock cluster), a nats-server and `tern store`; and the environment that points a service
/// at them, as a platform team's configuration would.
pub struct Platform {
    _cluster: MockCluster<'static, DefaultProducerContext>,
    _nats: NatsServer,
    _store: StoreServer,
    env: Vec<(&'static str, String)>,
    /// Shared by the services (the identity service writes the operator token here).
    data: tempfile::TempDir,
}

impl Platform {
    /// `env` goes to every process, `tern store` included.
    pub fn start(env: &[(&'static str, &str)]) -> Self {
        let cluster: MockCluster<'static, DefaultProducerContext> =
            MockCluster::new(1).expect("mock cluster");
        for stream in [
            "telemetry",
            "event",
            "lifecycle",
            "commands",
            "notices",
            "rules-shuffle",
        ] {
            cluster
                .create_topic(&format!("tern.{stream}"), 3, 1)
                .expect("create topic");
        }
        let nats = NatsServer::start();
        let store = StoreServer::start_with_env(env);
        let mut shared = vec![
            ("TERN_STORE__URL", store.url.clone()),
            (
                "TERN_STORE__TOKEN_FILE",
                store.token_file.to_str().expect("utf-8").into(),
            ),
            ("TERN_EVENTLOG__BACKEND", "kafka".into()),
            ("TERN_EVENTLOG__KAFKA__BROKERS", cluster.bootstrap_servers()),
            ("TERN_EVENTLOG__KAFKA__CREATE_TOPICS", "false".into()),
            ("TERN_ROUTING__BACKEND", "nats".into()),
            ("TERN_ROUTING__NATS__URL", nats.url.clone()),
            // One issuer for every process, as behind one ingress.
            (
                "TERN_IDENTITY__PUBLIC_URL",
                "https://iot.example.test".into(),
            ),
            // Within the harness's stop deadline: after a kill -9, a consumer leaving the Kafka
            // group can wait out the dead member's session (10 s) while the group rebalances.
            ("TERN_SHUTDOWN_TIMEOUT_SECS", "15".into()),
            // The rules catch up on a backlog after the kill -9, in a debug build beside the
            // other tests: the default budget (250 ms a second per tenant and stream, wall
            // time) could skip messages, which is tested elsewhere (rules.rs), not here.
            ("TERN_RULES__MAX_TENANT_CPU_MS_PER_SEC", "1000".into()),
        ];
        shared.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
        Self {
            _cluster: cluster,
            _nats: nats,
            _store: store,
            env: shared,
            data: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// Starts `tern {service}` on the shared parts.
    pub fn service(&self, service: &'static str) -> Tern {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Tern::start_service(service, self.data.path(), &env)
    }
}

async fn serving(grpc_port: u16, service: &str) -> ServingStatus {
    let channel =
        tern_proto::tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))
            .expect("url")
            .connect()
            .await
            .expect("connect");
    let mut health = HealthClient::new(channel);
    let answer = health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health");
    answer.into_inner().status()
}

async fn publish_seqs(bridge: &Tern, p: &Provisioned, seqs: std::ops::Range<u32>) {
    let mut device = Mqtt::connect(Mqtt::options(
        bridge.mqtt_port,
        &p.device_id,
        &p.access_token,
    ))
    .await
    .expect("connect");
    device
        .publish_acked(
            "telemetry",
            seqs.map(|i| format!(r#"{{"seq": {i}}}"#).into_bytes())
                .collect(),
        )
        .await;
}

/// Publishes a hot reading marked `mark` every second until the rule's republish of one of
/// them reaches the device (subscribed to `alerts/#`): the analytics processes pick a new rule
/// up within a second, and a dead one's partitions move to the others once its Kafka session
/// times out, so a reading may pass unmatched first. Returns the republished row.
async fn republished(device: &mut Mqtt, mark: u32) -> Value {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let reading = format!(r#"{{"temp": 61, "mark": {mark}}}"#);
        device
            .publish_acked("telemetry", vec![reading.into_bytes()])
            .await;
        let second = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(event) = tokio::time::timeout_at(second, device.events.poll()).await {
            if let Ok(Event::Incoming(Packet::Publish(p))) = event {
                assert_eq!(p.topic, "alerts/hot");
                let body: Value = serde_json::from_slice(&p.payload).expect("JSON");
                if body["row"]["mark"] == mark {
                    return body["row"].clone();
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "republished across processes"
        );
    }
}

/// How many partitions of `topic` an analytics process runs rules on.
async fn rule_partitions(analytics: &Tern, topic: &str) -> u64 {
    let series = format!(r#"tern_rules_partitions{{stream="{topic}"}}"#);
    analytics.metric(&series).await.unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_in_its_own_process() {
    let shared = Platform::start(&[]);
    // Identity first: it makes the operator token the others' callers use.
    let identity = shared.service("identity");
    let registry = shared.service("registry");
    let gateway = shared.service("gateway");
    let mut analytics = shared.service("analytics");
    let second = shared.service("analytics");
    let bridge = shared.service("bridge");
    let dashboard = shared.service("dashboard");

    // Each answers gRPC health for itself and for the services it serves.
    assert_eq!(
        serving(registry.grpc_port, "tern.v1.Registry").await,
        ServingStatus::Serving
    );
    assert_eq!(
        serving(identity.grpc_port, "tern.v1.Identity").await,
        ServingStatus::Serving
    );
    for process in [&gateway, &analytics, &bridge, &dashboard] {
        assert_eq!(serving(process.grpc_port, "").await, ServingStatus::Serving);
    }
    let page = reqwest::get(dashboard.http()).await.expect("dashboard");
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("page").contains("<html"));
    let api = reqwest::get(format!("{}/api/v1/tenants", dashboard.http()))
        .await
        .expect("GET");
    assert_eq!(api.status(), 404, "the dashboard serves pages, not the API");

    // Provisioned through the gateway's REST API; read back through the registry's gRPC.
    let p = gateway.provision("acme", "pump");
    let mut grpc = RegistryClient::connect(format!("http://127.0.0.1:{}", registry.grpc_port))
        .await
        .expect("connect");
    let mut get = Request::new(GetDeviceRequest {
        tenant_id: "acme".into(),
        device_id: "pump".into(),
    });
    let bearer: MetadataValue<_> = format!("Bearer {}", gateway.operator_token())
        .parse()
        .expect("metadata");
    get.metadata_mut().insert("authorization", bearer);
    let device = grpc.get_device(get).await.expect("GetDevice").into_inner();
    assert_eq!(device.id, p.device_id);

    // Telemetry: MQTT to the bridge, Kafka, analytics, the store, REST on the gateway.
    publish_seqs(&bridge, &p, 0..100).await;
    let seqs = |points: &[Value]| {
        let mut v = values(points);
        v.sort_by(f64::total_cmp);
        v
    };
    let expected = |n: u32| (0..n).map(f64::from).collect::<Vec<_>>();
    assert_eq!(
        seqs(&gateway.wait_points(&p, "seq", 100).await),
        expected(100)
    );

    // A command through the gateway reaches the device on the bridge (over NATS), and the
    // device's answer, stored by the bridge, ends the gateway's wait.
    let mut device = Mqtt::device(&bridge, &p).await;
    device.subscribe("command/req/#", QoS::AtLeastOnce).await;
    let command = ping_round_trip(gateway.http(), &p.api_token, "pump", &mut device).await;
    assert_eq!(command["state"], "succeeded", "{command}");
    assert_eq!(command["result"]["payload"]["pong"], true, "{command}");

    // A rule's republish goes from the analytics process to the bridge's subscribers.
    gateway.cli_json(&[
        "rule",
        "create",
        "--tenant",
        "acme",
        "--name",
        "hot",
        "--sql",
        "SELECT device, temp, mark FROM telemetry WHERE temp > 50",
        "--action",
        "republish:alerts/hot",
    ]);
    // Its own device (the pump's connection is taken over below).
    let watcher = gateway.provision("acme", "watcher");
    let mut watching = Mqtt::device(&bridge, &watcher).await;
    watching.subscribe("alerts/#", QoS::AtLeastOnce).await;
    let row = republished(&mut watching, 1).await;
    assert_eq!(row["temp"], 61, "{row}");

    // The two analytics processes split the partitions: of the streams (per-device rules),
    // and of `rules-shuffle` (fleet-wide rules).
    for topic in ["telemetry", "rules-shuffle"] {
        let deadline = std::time::Instant::now() + PATIENCE;
        let split = loop {
            let split = (
                rule_partitions(&analytics, topic).await,
                rule_partitions(&second, topic).await,
            );
            if split.0 > 0 && split.1 > 0 || std::time::Instant::now() > deadline {
                break split;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(
            split.0 > 0 && split.1 > 0 && split.0 + split.1 == 3,
            "{topic}: {split:?}"
        );
    }

    // Windows whose state outlives the process that held it: per meter, on the streams'
    // partitions; per site, on `rules-shuffle`'s. A minute a few minutes ahead, so that only
    // the devices' own clocks close it.
    create_rule(
        &gateway,
        "acme",
        "per-minute",
        PER_MINUTE,
        &["command:report"],
    );
    create_rule(
        &gateway,
        "acme",
        "site-minute",
        "SELECT labels.site, count(*) AS n, sum(kwh) AS total FROM telemetry \
         GROUP BY labels.site, TUMBLE(ts, INTERVAL '1' MINUTE)",
        &["alert"],
    );
    let minute = (tern_core::now_ms() / 60_000 + 5) * 60_000;
    // Each meter is its own site: a site's messages then keep their order (one partition),
    // so the count a site's window closes with is known.
    // Eight, so that the killed process almost surely runs some of them.
    let meters: Vec<Provisioned> = (0..8)
        .map(|i| {
            device_labelled(
                &gateway,
                "acme",
                &format!("meter{i}"),
                &format!("site=s{i}"),
            )
        })
        .collect();
    // One connection per meter for the whole test (the bridge outlives the analytics kill),
    // with a keepalive longer than the waits between their uses (nothing polls them then).
    let mut devices = Vec::new();
    for meter in &meters {
        let mut options = Mqtt::options(bridge.mqtt_port, &meter.device_id, &meter.access_token);
        options.set_keep_alive(Duration::from_secs(600));
        devices.push(Mqtt::connect(options).await.expect("connect"));
    }
    for (meter, device) in meters.iter().zip(&mut devices) {
        device
            .publish_acked("telemetry", readings(minute, 0, 30))
            .await;
        gateway.wait_points(meter, "kwh", 30).await;
    }

    // kill -9 the first analytics process mid-stream (it holds some of both kinds of
    // partition) and start another: every acknowledged message is stored, none twice; the survivors
    // resume the windows from the checkpoints, and the rules go on.
    publish_seqs(&bridge, &p, 100..300).await;
    // Readings the dead process has taken but not checkpointed are read again by the
    // survivors, and passed on to `rules-shuffle` again: they must count once.
    for device in &mut devices {
        device
            .publish_acked("telemetry", readings(minute, 30, 10))
            .await;
    }
    analytics.kill9();
    let replacement = shared.service("analytics");
    let points = gateway.wait_points(&p, "seq", 300).await;
    assert_eq!(seqs(&points), expected(300), "nothing lost, nothing twice");
    republished(&mut watching, 2).await;
    for device in &mut devices {
        device
            .publish_acked("telemetry", readings(minute, 40, 10))
            .await;
        // Two minutes on: past the window and its lateness.
        let later = serde_json::json!({"kwh": 0, "ts": minute + 120_000});
        device
            .publish_acked("telemetry", vec![later.to_string().into_bytes()])
            .await;
    }
    let total = (0..50).sum::<i64>();
    let reports = async |meter: &Provisioned| -> Vec<Value> {
        let path = format!("/api/v1/tenants/acme/devices/{}/commands", meter.device_id);
        let body = gateway.get(&p.api_token, &path).await.1;
        body["commands"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["name"] == "report")
            .cloned()
            .collect()
    };
    let deadline = std::time::Instant::now() + PATIENCE;
    for meter in &meters {
        while reports(meter).await.is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Give a duplicate, if there were one, time to appear.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for meter in &meters {
        let reports = reports(meter).await;
        assert_eq!(reports.len(), 1, "one command for the window: {reports:?}");
        let row = &reports[0]["payload"]["row"];
        assert_eq!(row["window_start"], minute);
        assert_eq!(
            (&row["n"], &row["total"]),
            (&50.into(), &total.into()),
            "{row}"
        );
    }
    // The meters' sites (the provisioned devices' own site, `test`, has its own alert).
    let sites = |body: Value| -> Vec<Value> {
        let mut alerts: Vec<Value> = body
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["details"]["site"] != "test")
            .cloned()
            .collect();
        alerts.sort_by_key(|a| a["details"]["site"].to_string());
        alerts
    };
    let deadline = std::time::Instant::now() + PATIENCE;
    let alerts = loop {
        let (_, body) = gateway
            .get(&p.api_token, "/api/v1/tenants/acme/alerts?rule=site-minute")
            .await;
        let alerts = sites(body);
        if alerts.len() >= meters.len() || std::time::Instant::now() > deadline {
            break alerts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let raised: Vec<&str> = alerts
        .iter()
        .filter_map(|a| a["details"]["site"].as_str())
        .collect();
    let expected_sites: Vec<String> = (0..meters.len()).map(|i| format!("s{i}")).collect();
    let warnings = |t: &Tern| -> String {
        t.log()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    if raised != expected_sites {
        let shares = (
            rule_partitions(&second, "rules-shuffle").await,
            rule_partitions(&replacement, "rules-shuffle").await,
        );
        panic!(
            "sites alerted: {raised:?}; rules-shuffle partitions (second, replacement): \
             {shares:?}\nsecond:\n{}\nreplacement:\n{}",
            warnings(&second),
            warnings(&replacement)
        );
    }
    for alert in &alerts {
        assert_eq!(alert["count"], 1, "raised once: {alert}");
        let row = &alert["details"];
        assert_eq!(
            (&row["n"], &row["total"]),
            (&50.into(), &total.into()),
            "{alert}"
        );
    }
    for mut survivor in [second, replacement] {
        assert!(survivor.stop(), "clean exit; log:\n{}", survivor.log());
    }
}
