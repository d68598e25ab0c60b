//! `tern up` on the Kafka event log: device data goes device → Kafka → analytics → REST, and a
//! kill -9 in the middle loses nothing the device saw acknowledged and stores nothing twice.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tern_eventlog::testing::Tansu;
use tern_eventlog::{EventLog, KafkaLog, KafkaLogConfig};

use crate::harness::{Mqtt, Provisioned, Tern, values};

fn tern_on(brokers: &str, extra: &[(&str, &str)]) -> Tern {
    let mut env = vec![
        ("TERN_EVENTLOG__BACKEND", "kafka"),
        ("TERN_EVENTLOG__KAFKA__BROKERS", brokers),
        ("TERN_EVENTLOG__KAFKA__PARTITIONS", "3"),
        ("TERN_EVENTLOG__KAFKA__REPLICATION_FACTOR", "1"),
        // tansu holds every fetch for the full wait (see libs/tern-eventlog/tests/kafka.rs).
        ("TERN_EVENTLOG__KAFKA__FETCH_WAIT_MAX_MS", "10"),
    ];
    env.extend_from_slice(extra);
    Tern::start_with_env(&env)
}

async fn publish_seqs(tern: &Tern, p: &Provisioned, seqs: std::ops::Range<u32>) {
    let mut mqtt = Mqtt::connect(Mqtt::options(tern.mqtt_port, &p.device_id, &p.access_token))
        .await
        .expect("connect");
    mqtt.publish_acked(
        "telemetry",
        seqs.map(|i| format!(r#"{{"seq": {i}}}"#).into_bytes())
            .collect(),
    )
    .await;
}

/// Waits for `n` points of `seq` and returns their values, sorted.
async fn stored_seqs(tern: &Tern, p: &Provisioned, n: usize) -> Vec<f64> {
    let mut seqs = values(&tern.wait_points(p, "seq", n).await);
    seqs.sort_by(f64::total_cmp);
    seqs
}

fn range(n: u32) -> Vec<f64> {
    (0..n).map(f64::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_goes_through_kafka_and_resumes_after_a_restart() {
    let kafka = Tansu::start();
    let mut tern = tern_on(&kafka.address, &[]);
    let p = tern.provision("acme", "pump");
    publish_seqs(&tern, &p, 0..100).await;
    assert_eq!(stored_seqs(&tern, &p, 100).await, range(100));

    // The records are in Kafka's topic, keyed by tenant/device: read them as another group.
    let log: Arc<dyn EventLog> = Arc::new(
        KafkaLog::new(KafkaLogConfig {
            brokers: kafka.address.clone(),
            fetch_wait_max_ms: 10,
            ..KafkaLogConfig::default()
        })
        .expect("kafka log"),
    );
    let mut consumer = log.consumer("audit", "telemetry").await.expect("consumer");
    let mut in_kafka = 0;
    loop {
        let batch = consumer
            .poll(500, Duration::from_secs(2))
            .await
            .expect("poll");
        if batch.is_empty() {
            break;
        }
        for record in &batch {
            assert!(
                record.key.ends_with(p.device_id.as_bytes()),
                "keyed by tenant/device: {:?}",
                record.key
            );
        }
        in_kafka += batch.len();
    }
    assert_eq!(in_kafka, 100);

    // Analytics leaves its groups on SIGTERM and resumes from the committed offsets.
    tern.restart();
    publish_seqs(&tern, &p, 100..150).await;
    assert_eq!(stored_seqs(&tern, &p, 150).await, range(150));
}

/// On librdkafka's mock cluster: tansu 0.6 does not re-form a consumer group whose leader died
/// without leaving (after evicting it at the session timeout, the new member never gets an
/// assignment), which is exactly what kill -9 does. The mock cluster cannot create topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_acknowledged_and_stores_nothing_twice() {
    let cluster: MockCluster<'static, DefaultProducerContext> =
        MockCluster::new(1).expect("mock cluster");
    for stream in ["telemetry", "event", "lifecycle", "commands"] {
        cluster
            .create_topic(&format!("tern.{stream}"), 3, 1)
            .expect("create topic");
    }
    let brokers = cluster.bootstrap_servers();
    let mut tern = tern_on(
        &brokers,
        &[("TERN_EVENTLOG__KAFKA__CREATE_TOPICS", "false")],
    );
    let p = tern.provision("acme", "pump");
    publish_seqs(&tern, &p, 0..200).await;
    // Every PUBACK is in; the process dies before analytics can have stored or committed all.
    tern.kill9();
    tern.start_again();
    assert_eq!(stored_seqs(&tern, &p, 200).await, range(200));
}
