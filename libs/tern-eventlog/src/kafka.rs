//! The event log on Kafka (librdkafka through rdkafka), for the distributed mode.
//!
//! Each stream is the Kafka topic `{namespace}{topic}`, each (group, stream) the consumer group
//! `{namespace}{group}.{topic}`: the trait's consumer reads one stream, and separate Kafka groups
//! per stream keep a rule engine's three consumers from rebalancing each other. The producer is
//! idempotent with `acks=all`, so an append answers only once every in-sync replica has the
//! batch, and retries cannot duplicate or reorder it. Keys are hashed with murmur2 like the Java
//! client, so other producers keyed by `tenant/device` land on the same partitions.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::{Assignment, Consumed, Consumer, EventLog, LogError, Position, Record, validate_name};

/// Settings of the Kafka log (`[eventlog.kafka]` in the config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaLogConfig {
    /// Bootstrap brokers, `host:port` separated by commas.
    pub brokers: String,
    /// Prefix of every topic and consumer group, so installations can share a cluster.
    pub namespace: String,
    /// Create missing topics (with the settings below). Off where the cluster's topics are
    /// managed elsewhere: Tern then expects `{namespace}telemetry` and the other streams to exist.
    pub create_topics: bool,
    /// Partitions of each topic Tern creates (existing topics keep theirs).
    pub partitions: u32,
    /// Replicas of each topic Tern creates.
    pub replication_factor: u16,
    /// `retention.ms` of each topic Tern creates, in hours.
    pub retention_hours: u64,
    /// Producer compression: `none`, `snappy` or `lz4` (the codecs built into librdkafka without
    /// extra C libraries).
    pub compression: String,
    /// How long the producer waits to fill a batch, in milliseconds (`linger.ms`).
    pub linger_ms: u64,
    /// Upper bound on how long an append may take before it fails, in milliseconds
    /// (`delivery.timeout.ms`); the device gets no acknowledgement and sends again.
    pub delivery_timeout_ms: u64,
    /// Records the producer may hold unacknowledged; appends beyond it wait (back-pressure).
    pub max_queued_records: u32,
    /// A consumer that stops heartbeating for this long loses its partitions to the others.
    pub session_timeout_ms: u64,
    /// How long the broker may hold a fetch that finds nothing new (`fetch.wait.max.ms`).
    /// Kafka answers as soon as data arrives, so this only sets how often idle consumers ask.
    pub fetch_wait_max_ms: u64,
}

impl Default for KafkaLogConfig {
    fn default() -> Self {
        Self {
            brokers: "localhost:9092".into(),
            namespace: "tern.".into(),
            create_topics: true,
            partitions: 12,
            replication_factor: 3,
            retention_hours: 7 * 24,
            compression: "lz4".into(),
            linger_ms: 5,
            delivery_timeout_ms: 30_000,
            max_queued_records: 100_000,
            session_timeout_ms: 10_000,
            fetch_wait_max_ms: 500,
        }
    }
}

impl KafkaLogConfig {
    /// Names the first setting that cannot work, as `eventlog.kafka.<key>: reason`.
    pub fn validate(&self) -> Result<(), LogError> {
        let invalid = |field: &'static str, reason: &str| {
            Err(LogError::Invalid {
                field,
                reason: reason.into(),
            })
        };
        if self.brokers.trim().is_empty() {
            return invalid("eventlog.kafka.brokers", "must name at least one host:port");
        }
        let namespace_ok = self.namespace.len() <= 100
            && self
                .namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !namespace_ok {
            return invalid(
                "eventlog.kafka.namespace",
                "must be at most 100 characters of [a-zA-Z0-9._-]",
            );
        }
        if self.partitions == 0 {
            return invalid("eventlog.kafka.partitions", "must be at least 1");
        }
        if self.replication_factor == 0 {
            return invalid("eventlog.kafka.replication_factor", "must be at least 1");
        }
        if self.retention_hours == 0 {
            return invalid("eventlog.kafka.retention_hours", "must be at least 1");
        }
        if !["none", "snappy", "lz4"].contains(&self.compression.as_str()) {
            return invalid("eventlog.kafka.compression", "must be none, snappy or lz4");
        }
        if self.delivery_timeout_ms < 1000 {
            return invalid(
                "eventlog.kafka.delivery_timeout_ms",
                "must be at least 1000",
            );
        }
        if self.max_queued_records == 0 {
            return invalid("eventlog.kafka.max_queued_records", "must be at least 1");
        }
        Ok(())
    }

    fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "tern");
        config
    }

    /// The producer's settings: idempotent with `acks=all`, so an acknowledged append is on
    /// every in-sync replica and retries neither duplicate nor reorder it. Public for the
    /// benchmark that compares the log with a bare producer of the same settings.
    pub fn producer_config(&self) -> ClientConfig {
        let mut config = self.client();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("compression.type", &self.compression)
            .set("linger.ms", self.linger_ms.to_string())
            .set("delivery.timeout.ms", self.delivery_timeout_ms.to_string())
            .set(
                "queue.buffering.max.messages",
                self.max_queued_records.to_string(),
            );
        config
    }
}

/// The event log of the distributed mode.
pub struct KafkaLog {
    config: KafkaLogConfig,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Topics known to exist, so only the first append to a stream asks the cluster.
    created: Mutex<HashSet<String>>,
    /// Held while a batch is handed to the producer, so concurrent appends cannot interleave
    /// and a batch waiting for queue space is not overtaken (order per key).
    order: tokio::sync::Mutex<()>,
}

impl KafkaLog {
    /// Connects lazily: brokers are contacted by the first append or consumer.
    pub fn new(config: KafkaLogConfig) -> Result<Self, LogError> {
        config.validate()?;
        let producer = config
            .producer_config()
            .create()
            .map_err(kafka("cannot create the Kafka producer"))?;
        let admin = config
            .client()
            .create()
            .map_err(kafka("cannot create the Kafka admin client"))?;
        Ok(Self {
            config,
            producer,
            admin,
            created: Mutex::new(HashSet::new()),
            order: tokio::sync::Mutex::new(()),
        })
    }

    fn kafka_topic(&self, topic: &str) -> String {
        format!("{}{topic}", self.config.namespace)
    }

    /// Creates the Kafka topics of `topics` that are not known to exist yet.
    async fn ensure_topics(&self, topics: &[String]) -> Result<(), LogError> {
        let missing: Vec<&String> = {
            let created = self.created.lock().unwrap_or_else(|e| e.into_inner());
            topics.iter().filter(|t| !created.contains(*t)).collect()
        };
        if missing.is_empty() || !self.config.create_topics {
            return Ok(());
        }
        let retention = (self.config.retention_hours * 3_600_000).to_string();
        let new_topics: Vec<NewTopic> = missing
            .iter()
            .map(|name| {
                NewTopic::new(
                    name,
                    self.config.partitions as i32,
                    TopicReplication::Fixed(i32::from(self.config.replication_factor)),
                )
                .set("retention.ms", &retention)
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = self
            .admin
            .create_topics(&new_topics, &options)
            .await
            .map_err(kafka("cannot create Kafka topics"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(LogError::Storage(format!(
                        "cannot create the Kafka topic {name}: {code}"
                    )));
                }
            }
        }
        let mut created = self.created.lock().unwrap_or_else(|e| e.into_inner());
        created.extend(missing.into_iter().cloned());
        Ok(())
    }

    /// Hands one record to the producer, waiting while its queue is full.
    async fn enqueue(&self, topic: &str, record: &Record) -> Result<DeliveryFuture, LogError> {
        let started = Instant::now();
        loop {
            let mut future = FutureRecord::to(topic)
                .key(record.key.as_ref())
                .payload(record.value.as_ref());
            if !record.headers.is_empty() {
                let headers = record.headers.iter().fold(
                    OwnedHeaders::new_with_capacity(record.headers.len()),
                    |headers, (key, value)| {
                        headers.insert(Header {
                            key,
                            value: Some(value.as_ref()),
                        })
                    },
                );
                future = future.headers(headers);
            }
            match self.producer.send_result(future) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                    if started.elapsed().as_millis()
                        < u128::from(self.config.delivery_timeout_ms) =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(LogError::Storage(format!(
                        "cannot append to the Kafka topic {topic}: {e}"
                    )));
                }
            }
        }
    }
}

#[async_trait]
impl EventLog for KafkaLog {
    async fn append(&self, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let mut topics = Vec::new();
        for record in &records {
            validate_name("topic", &record.topic)?;
            let topic = self.kafka_topic(&record.topic);
            if !topics.contains(&topic) {
                topics.push(topic);
            }
        }
        self.ensure_topics(&topics).await?;
        let deliveries = {
            let _order = self.order.lock().await;
            let mut deliveries = Vec::with_capacity(records.len());
            for record in &records {
                let topic = self.kafka_topic(&record.topic);
                deliveries.push(self.enqueue(&topic, record).await?);
            }
            deliveries
        };
        let mut positions = Vec::with_capacity(deliveries.len());
        for delivery in futures_util::future::join_all(deliveries).await {
            match delivery {
                Ok(Ok(delivered)) => positions.push(Position {
                    partition: u32::try_from(delivered.partition).unwrap_or_default(),
                    offset: u64::try_from(delivered.offset).unwrap_or_default(),
                }),
                Ok(Err((e, _))) => {
                    return Err(LogError::Storage(format!("Kafka refused an append: {e}")));
                }
                Err(_) => return Err(LogError::Closed),
            }
        }
        Ok(positions)
    }

    async fn consumer(&self, group: &str, topic: &str) -> Result<Box<dyn Consumer>, LogError> {
        validate_name("group", group)?;
        validate_name("topic", topic)?;
        let kafka_topic = self.kafka_topic(topic);
        self.ensure_topics(std::slice::from_ref(&kafka_topic))
            .await?;
        let consumer: StreamConsumer<Rebalances> = self
            .config
            .client()
            .set(
                "group.id",
                format!("{}{group}.{topic}", self.config.namespace),
            )
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set(
                "fetch.wait.max.ms",
                self.config.fetch_wait_max_ms.to_string(),
            )
            .set(
                "session.timeout.ms",
                self.config.session_timeout_ms.to_string(),
            )
            .create_with_context(Rebalances::default())
            .map_err(kafka("cannot create a Kafka consumer"))?;
        consumer
            .subscribe(&[&kafka_topic])
            .map_err(kafka("cannot subscribe to a Kafka topic"))?;
        let mut consumer = KafkaConsumer {
            consumer: Arc::new(consumer),
            topic: topic.to_string(),
            kafka_topic,
            buffered: VecDeque::new(),
        };
        consumer.join_group().await?;
        Ok(Box::new(consumer))
    }
}

/// Follows the group's rebalances for [`Consumer::assignment`]. librdkafka calls it from within
/// `recv`, so a record returned after a change belongs to the new assignment.
#[derive(Default)]
struct Rebalances {
    assignment: Mutex<Assignment>,
}

impl ClientContext for Rebalances {}

impl ConsumerContext for Rebalances {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut assignment = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
        assignment.generation += 1;
        match rebalance {
            Rebalance::Assign(partitions) => {
                assignment.partitions = partitions
                    .elements()
                    .iter()
                    .filter_map(|p| u32::try_from(p.partition()).ok())
                    .collect();
                assignment.partitions.sort_unstable();
            }
            Rebalance::Revoke(_) | Rebalance::Error(_) => assignment.partitions.clear(),
        }
    }
}

struct KafkaConsumer {
    consumer: Arc<StreamConsumer<Rebalances>>,
    topic: String,
    kafka_topic: String,
    /// Records that arrived while joining the group, handed out by the next polls.
    buffered: VecDeque<Consumed>,
}

/// How long a new consumer waits for the group to give it partitions. A consumer that gets none
/// in time (more members than partitions) still works: it reads once a rebalance gives it some.
const JOIN_WAIT: Duration = Duration::from_secs(30);

impl KafkaConsumer {
    /// Waits until the group coordinator assigned partitions, so the first poll reads instead of
    /// timing out during the rebalance.
    async fn join_group(&mut self) -> Result<(), LogError> {
        let deadline = Instant::now() + JOIN_WAIT;
        while Instant::now() < deadline {
            let assigned = self
                .consumer
                .assignment()
                .map_err(kafka("cannot read the Kafka assignment"))?;
            if assigned.count() > 0 {
                return Ok(());
            }
            if let Ok(message) =
                tokio::time::timeout(Duration::from_millis(50), self.consumer.recv()).await
            {
                let consumed = self.consumed(message)?;
                self.buffered.push_back(consumed);
                return Ok(());
            }
        }
        tracing::warn!(topic = %self.kafka_topic, "no Kafka partitions assigned yet");
        Ok(())
    }

    fn consumed(
        &self,
        message: Result<rdkafka::message::BorrowedMessage<'_>, KafkaError>,
    ) -> Result<Consumed, LogError> {
        let message = message.map_err(kafka("cannot read from Kafka"))?;
        Ok(Consumed {
            topic: self.topic.clone(),
            position: Position {
                partition: u32::try_from(message.partition()).unwrap_or_default(),
                offset: u64::try_from(message.offset()).unwrap_or_default(),
            },
            key: Bytes::copy_from_slice(message.key().unwrap_or_default()),
            value: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&StreamConsumer<Rebalances>) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || f(&consumer))
            .await
            .map_err(|e| LogError::Storage(format!("Kafka call failed: {e}")))?
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Consumed>, LogError> {
        let max = max.max(1);
        let mut batch: Vec<Consumed> = self
            .buffered
            .drain(..self.buffered.len().min(max))
            .collect();
        let mut generation = self.assignment().generation;
        if batch.is_empty() {
            match tokio::time::timeout(wait, self.consumer.recv()).await {
                Ok(message) => batch.push(self.consumed(message)?),
                Err(_) => return Ok(batch),
            }
        }
        // Take what librdkafka already fetched, without waiting for more.
        loop {
            let now = self.assignment().generation;
            if now != generation {
                // A rebalance came between these records: the ones before it are read again
                // from the committed offsets by whoever has their partitions now.
                let last = batch.pop();
                batch.clear();
                batch.extend(last);
                generation = now;
            }
            if batch.len() >= max {
                break;
            }
            match self.consumer.recv().now_or_never() {
                Some(message) => batch.push(self.consumed(message)?),
                None => break,
            }
        }
        Ok(batch)
    }

    async fn commit(&mut self, positions: &[Position]) -> Result<(), LogError> {
        let mut next = std::collections::BTreeMap::<u32, u64>::new();
        for p in positions {
            let entry = next.entry(p.partition).or_default();
            *entry = (*entry).max(p.offset + 1);
        }
        let mut offsets = TopicPartitionList::new();
        for (partition, offset) in next {
            let offset = Offset::Offset(i64::try_from(offset).unwrap_or(i64::MAX));
            offsets
                .add_partition_offset(&self.kafka_topic, partition as i32, offset)
                .map_err(kafka("invalid Kafka offset"))?;
        }
        self.blocking(move |consumer| {
            consumer
                .commit(&offsets, CommitMode::Sync)
                .map_err(kafka("cannot commit Kafka offsets"))
        })
        .await
    }

    async fn lag(&self) -> Result<u64, LogError> {
        let topic = self.kafka_topic.clone();
        self.blocking(move |consumer| {
            let timeout = Duration::from_secs(10);
            let metadata = consumer
                .fetch_metadata(Some(&topic), timeout)
                .map_err(kafka("cannot read Kafka metadata"))?;
            let mut partitions = TopicPartitionList::new();
            for t in metadata.topics() {
                for p in t.partitions() {
                    partitions.add_partition(&topic, p.id());
                }
            }
            let committed = consumer
                .committed_offsets(partitions, timeout)
                .map_err(kafka("cannot read committed Kafka offsets"))?;
            let mut lag = 0u64;
            for element in committed.elements() {
                let (low, high) = consumer
                    .fetch_watermarks(&topic, element.partition(), timeout)
                    .map_err(kafka("cannot read Kafka watermarks"))?;
                let done = match element.offset() {
                    Offset::Offset(committed) => committed.max(low),
                    _ => low,
                };
                lag += u64::try_from(high - done).unwrap_or_default();
            }
            Ok(lag)
        })
        .await
    }

    fn assignment(&self) -> Assignment {
        self.consumer
            .context()
            .assignment
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn kafka(context: &'static str) -> impl Fn(KafkaError) -> LogError {
    move |e| LogError::Storage(format!("{context}: {e}"))
}
