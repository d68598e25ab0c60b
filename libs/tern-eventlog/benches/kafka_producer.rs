//! `cargo bench -p tern-eventlog --bench kafka_producer`: the Kafka log's appends against a bare
//! librdkafka producer with the same settings, on one tansu broker (in memory) started here.
//! Prints one JSON object; `make bench` puts it in docs/benchmarks.md as K1.
//!
//! Both sides send the same records (100-byte values keyed by 1,000 devices) from the same
//! number of concurrent senders (64, then 1,024), each waiting for its record to be
//! acknowledged before sending the next, as devices wait for their PUBACK. The goal: at
//! least 80% of the bare producer's throughput, adding under 2 ms at p99.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::json;
use tern_eventlog::testing::Tansu;
use tern_eventlog::{EventLog, KafkaLog, KafkaLogConfig, Record};

/// Concurrent senders of each load.
const LOADS: [usize; 2] = [64, 1024];
const RECORDS: usize = 100_000;
const WARM_UP: usize = 5_000;
const DEVICES: usize = 1_000;

struct Run {
    records_per_s: f64,
    /// Append (or send) to acknowledgement, milliseconds, sorted.
    latencies_ms: Vec<f64>,
}

impl Run {
    fn percentile(&self, q: f64) -> f64 {
        let i = ((self.latencies_ms.len() as f64 * q) as usize).min(self.latencies_ms.len() - 1);
        self.latencies_ms[i]
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "records_per_s": self.records_per_s.round(),
            "p50_ms": (self.percentile(0.50) * 1000.0).round() / 1000.0,
            "p99_ms": (self.percentile(0.99) * 1000.0).round() / 1000.0,
            "p999_ms": (self.percentile(0.999) * 1000.0).round() / 1000.0,
        })
    }
}

fn key(i: usize) -> String {
    format!("bench/0190aaaa-0000-7000-8000-{:012}", i % DEVICES)
}

/// Sends `records` from `senders` concurrent senders, one record in flight each.
async fn drive<F, Fut>(senders: usize, records: usize, send: F) -> Run
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let send = Arc::new(send);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..senders {
        let send = send.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(records / senders + 1);
            for i in (s..records).step_by(senders) {
                let t0 = Instant::now();
                send(i).await;
                latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            latencies
        }));
    }
    let mut latencies_ms = Vec::with_capacity(records);
    for task in tasks {
        latencies_ms.extend(task.await.expect("sender"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies_ms.sort_by(f64::total_cmp);
    Run {
        records_per_s: records as f64 / elapsed,
        latencies_ms,
    }
}

async fn tern(log: Arc<KafkaLog>, senders: usize, records: usize) -> Run {
    let value = vec![b'x'; 100];
    drive(senders, records, move |i| {
        let log = log.clone();
        let record = Record::new("telemetry", key(i), value.clone());
        async move {
            log.append(vec![record]).await.expect("append");
        }
    })
    .await
}

async fn bare(producer: FutureProducer, topic: String, senders: usize, records: usize) -> Run {
    let value = vec![b'x'; 100];
    drive(senders, records, move |i| {
        let producer = producer.clone();
        let topic = topic.clone();
        let value = value.clone();
        async move {
            let key = key(i);
            let record = FutureRecord::to(&topic).key(&key).payload(&value);
            producer
                .send(record, Timeout::Never)
                .await
                .expect("bare send");
        }
    })
    .await
}

fn main() {
    let broker = Tansu::start();
    // tansu holds fetches for fetch.wait.max.ms; nothing here consumes, but keep the tests' value.
    let config = KafkaLogConfig {
        brokers: broker.address.clone(),
        namespace: "k1.".into(),
        partitions: 4,
        replication_factor: 1,
        fetch_wait_max_ms: 10,
        ..KafkaLogConfig::default()
    };
    // The producer settings KafkaLog::new uses, on a plain FutureProducer.
    let producer: FutureProducer = config.producer_config().create().expect("bare producer");
    let topic = format!("{}telemetry", config.namespace);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = runtime.block_on(async move {
        let log = Arc::new(KafkaLog::new(config).expect("Kafka log"));
        // Creates the topic and warms both clients' connections and metadata.
        tern(log.clone(), LOADS[0], WARM_UP).await;
        bare(producer.clone(), topic.clone(), LOADS[0], WARM_UP).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut loads = Vec::new();
        for senders in LOADS {
            let bare_run = bare(producer.clone(), topic.clone(), senders, RECORDS).await;
            let tern_run = tern(log.clone(), senders, RECORDS).await;
            loads.push(json!({
                "senders": senders,
                "bare": bare_run.json(),
                "tern": tern_run.json(),
                "throughput_ratio": (tern_run.records_per_s / bare_run.records_per_s * 1000.0).round() / 1000.0,
                "added_p99_ms": ((tern_run.percentile(0.99) - bare_run.percentile(0.99)) * 1000.0).round() / 1000.0,
            }));
        }
        json!({"records": RECORDS, "value_bytes": 100, "loads": loads})
    });
    drop(broker);
    println!("{result}");
}
