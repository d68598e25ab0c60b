//! The embedded event log on fjall: one keyspace of records keyed by
//! `topic 0x00 partition(u32 BE) offset(u64 BE)`, one keyspace of committed offsets keyed by
//! `group 0x00 topic 0x00 partition(u32 BE)`. Appends go through one writer thread that commits
//! whatever is queued as one batch with one fsync (group commit), so durability costs one sync per
//! batch rather than per message.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{Assignment, Consumed, Consumer, EventLog, LogError, Position, Record, validate_name};

/// Settings of the embedded log.
#[derive(Debug, Clone)]
pub struct EmbeddedLogConfig {
    pub dir: PathBuf,
    /// Partitions per topic; fixed once a topic has data.
    pub partitions: u32,
    /// Appends queued beyond this make producers wait (back-pressure instead of unbounded memory).
    pub queue_depth: usize,
}

impl EmbeddedLogConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            partitions: 4,
            queue_depth: 1024,
        }
    }
}

type AppendReply = oneshot::Sender<Result<Vec<Position>, LogError>>;

struct Shared {
    db: Database,
    records: Keyspace,
    offsets: Keyspace,
    partitions: u32,
    /// Per topic, bumped after every durable batch with records of it, so that the consumers
    /// waiting on that topic wake up (and those of quiet topics sleep on).
    appended: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Shared {
    fn appended_to(&self, topic: &str) -> watch::Receiver<u64> {
        let mut appended = self.appended.lock().unwrap_or_else(|e| e.into_inner());
        match appended.get(topic) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = watch::channel(0);
                appended.insert(topic.to_string(), sender);
                receiver
            }
        }
    }

    fn notify(&self, pending: &[(Vec<Record>, AppendReply)]) {
        let mut topics: Vec<&str> = Vec::new();
        for record in pending.iter().flat_map(|(records, _)| records) {
            if !topics.contains(&record.topic.as_str()) {
                topics.push(&record.topic);
            }
        }
        let appended = self.appended.lock().unwrap_or_else(|e| e.into_inner());
        for topic in topics {
            if let Some(sender) = appended.get(topic) {
                sender.send_modify(|batches| *batches += 1);
            }
        }
    }
}

/// The embedded, durable event log used by `tern up`.
pub struct EmbeddedLog {
    shared: Arc<Shared>,
    queue: Option<mpsc::Sender<(Vec<Record>, AppendReply)>>,
    writer: Option<JoinHandle<()>>,
}

impl EmbeddedLog {
    pub fn open(config: EmbeddedLogConfig) -> Result<Self, LogError> {
        if config.partitions == 0 {
            return Err(LogError::Invalid {
                field: "partitions",
                reason: "must be at least 1".into(),
            });
        }
        let db = Database::builder(&config.dir).open().map_err(storage)?;
        let records = db
            .keyspace("log_records", KeyspaceCreateOptions::default)
            .map_err(storage)?;
        let offsets = db
            .keyspace("log_offsets", KeyspaceCreateOptions::default)
            .map_err(storage)?;
        let shared = Arc::new(Shared {
            db,
            records,
            offsets,
            partitions: config.partitions,
            appended: Mutex::new(HashMap::new()),
        });
        let (tx, rx) = mpsc::channel(config.queue_depth.max(1));
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("tern-eventlog-writer".into())
            .spawn(move || write_loop(writer_shared, rx))
            .map_err(|e| LogError::Storage(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            shared,
            queue: Some(tx),
            writer: Some(writer),
        })
    }
}

impl Drop for EmbeddedLog {
    /// Closing the queue lets the writer finish what is queued; joining it makes sure the files
    /// are released before the log can be opened again.
    fn drop(&mut self) {
        self.queue.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[async_trait]
impl EventLog for EmbeddedLog {
    async fn append(&self, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        for record in &records {
            validate_name("topic", &record.topic)?;
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        let queue = self.queue.as_ref().ok_or(LogError::Closed)?;
        queue
            .send((records, reply_tx))
            .await
            .map_err(|_| LogError::Closed)?;
        reply_rx.await.map_err(|_| LogError::Closed)?
    }

    async fn consumer(&self, group: &str, topic: &str) -> Result<Box<dyn Consumer>, LogError> {
        validate_name("group", group)?;
        validate_name("topic", topic)?;
        let shared = self.shared.clone();
        let (group, topic) = (group.to_string(), topic.to_string());
        let cursors = blocking(move || {
            let mut cursors = Vec::with_capacity(shared.partitions as usize);
            for partition in 0..shared.partitions {
                let key = offset_key(&group, &topic, partition);
                let committed = shared
                    .offsets
                    .get(&key)
                    .map_err(storage)?
                    .map(|v| decode_u64(&v))
                    .transpose()?
                    .unwrap_or(0);
                cursors.push(committed);
            }
            Ok(EmbeddedConsumer {
                appended: shared.appended_to(&topic),
                shared,
                group,
                topic,
                cursors,
                next_partition: 0,
            })
        })
        .await?;
        Ok(Box::new(cursors))
    }
}

fn write_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<(Vec<Record>, AppendReply)>) {
    // Next offset per (topic, partition), found lazily from the last stored record.
    let mut next_offsets: HashMap<(String, u32), u64> = HashMap::new();
    while let Some(first) = rx.blocking_recv() {
        let mut pending = vec![first];
        while pending.len() < 256 {
            match rx.try_recv() {
                Ok(more) => pending.push(more),
                Err(_) => break,
            }
        }
        let result = write_batch(&shared, &mut next_offsets, &pending);
        if result.is_err() {
            // Offsets handed out in a failed batch are not on disk; rediscover them.
            next_offsets.clear();
        }
        match result {
            Ok(mut positions) => {
                shared.notify(&pending);
                for ((records, reply), assigned) in pending.into_iter().zip(positions.drain(..)) {
                    debug_assert_eq!(records.len(), assigned.len());
                    let _ = reply.send(Ok(assigned));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "event log append failed");
                for (_, reply) in pending {
                    let _ = reply.send(Err(LogError::Storage(e.to_string())));
                }
            }
        }
    }
    if let Err(e) = shared.db.persist(PersistMode::SyncAll) {
        tracing::error!(error = %e, "event log final sync failed");
    }
}

fn write_batch(
    shared: &Shared,
    next_offsets: &mut HashMap<(String, u32), u64>,
    pending: &[(Vec<Record>, AppendReply)],
) -> Result<Vec<Vec<Position>>, LogError> {
    let mut batch = shared.db.batch();
    let mut all = Vec::with_capacity(pending.len());
    for (records, _) in pending {
        let mut positions = Vec::with_capacity(records.len());
        for record in records {
            let partition = partition_for(&record.key, shared.partitions);
            let slot = (record.topic.clone(), partition);
            let next = match next_offsets.get_mut(&slot) {
                Some(next) => next,
                None => {
                    let first_free = last_offset(&shared.records, &record.topic, partition)?
                        .map_or(0, |last| last + 1);
                    next_offsets.entry(slot).or_insert(first_free)
                }
            };
            let offset = *next;
            *next += 1;
            batch.insert(
                &shared.records,
                record_key(&record.topic, partition, offset),
                encode_record(&record.key, &record.value),
            );
            positions.push(Position { partition, offset });
        }
        all.push(positions);
    }
    batch.commit().map_err(storage)?;
    shared.db.persist(PersistMode::SyncData).map_err(storage)?;
    Ok(all)
}

fn last_offset(records: &Keyspace, topic: &str, partition: u32) -> Result<Option<u64>, LogError> {
    let prefix = partition_prefix(topic, partition);
    match records.prefix(&prefix).next_back() {
        None => Ok(None),
        Some(guard) => {
            let key = guard.key().map_err(storage)?;
            Ok(Some(decode_u64(&key[prefix.len()..])?))
        }
    }
}

struct EmbeddedConsumer {
    shared: Arc<Shared>,
    appended: watch::Receiver<u64>,
    group: String,
    topic: String,
    /// Next offset to read, per partition.
    cursors: Vec<u64>,
    /// Partition the next read starts at.
    next_partition: usize,
}

impl EmbeddedConsumer {
    /// Reads up to `max` records, starting at a different partition each time so that one busy
    /// partition cannot starve the others.
    async fn read(&mut self, max: usize) -> Result<Vec<Consumed>, LogError> {
        let shared = self.shared.clone();
        let topic = self.topic.clone();
        let cursors = self.cursors.clone();
        let first = self.next_partition;
        self.next_partition = (self.next_partition + 1) % cursors.len();
        blocking(move || {
            let mut out = Vec::new();
            for i in 0..cursors.len() {
                let partition = (first + i) % cursors.len();
                let start = record_key(&topic, partition as u32, cursors[partition]);
                let end = record_key(&topic, partition as u32, u64::MAX);
                for guard in shared.records.range(start..end).take(max - out.len()) {
                    let (key, value) = guard.into_inner().map_err(storage)?;
                    let offset = decode_u64(&key[key.len() - 8..])?;
                    let (rkey, rvalue) = decode_record(&value)?;
                    out.push(Consumed {
                        topic: topic.clone(),
                        position: Position {
                            partition: partition as u32,
                            offset,
                        },
                        key: rkey,
                        value: rvalue,
                    });
                }
                if out.len() >= max {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Consumed>, LogError> {
        let max = max.max(1);
        self.appended.borrow_and_update();
        let mut batch = self.read(max).await?;
        if batch.is_empty() {
            // Either something is appended in time (read again) or we return empty.
            if let Ok(Ok(())) = tokio::time::timeout(wait, self.appended.changed()).await {
                batch = self.read(max).await?;
            }
        }
        for record in &batch {
            let cursor = &mut self.cursors[record.position.partition as usize];
            *cursor = (*cursor).max(record.position.offset + 1);
        }
        Ok(batch)
    }

    async fn commit(&mut self, positions: &[Position]) -> Result<(), LogError> {
        let mut next: HashMap<u32, u64> = HashMap::new();
        for p in positions {
            if p.partition >= self.shared.partitions {
                return Err(LogError::Invalid {
                    field: "partition",
                    reason: format!("{} is not below {}", p.partition, self.shared.partitions),
                });
            }
            let entry = next.entry(p.partition).or_default();
            *entry = (*entry).max(p.offset + 1);
        }
        let shared = self.shared.clone();
        let (group, topic) = (self.group.clone(), self.topic.clone());
        blocking(move || {
            let mut batch = shared.db.batch();
            for (partition, offset) in next {
                batch.insert(
                    &shared.offsets,
                    offset_key(&group, &topic, partition),
                    offset.to_be_bytes().to_vec(),
                );
            }
            batch.commit().map_err(storage)?;
            shared.db.persist(PersistMode::SyncData).map_err(storage)
        })
        .await
    }

    async fn lag(&self) -> Result<u64, LogError> {
        let shared = self.shared.clone();
        let (group, topic) = (self.group.clone(), self.topic.clone());
        blocking(move || {
            let mut lag = 0;
            for partition in 0..shared.partitions {
                let end = last_offset(&shared.records, &topic, partition)?.map_or(0, |l| l + 1);
                let committed = shared
                    .offsets
                    .get(offset_key(&group, &topic, partition))
                    .map_err(storage)?
                    .map(|v| decode_u64(&v))
                    .transpose()?
                    .unwrap_or(0);
                lag += end.saturating_sub(committed);
            }
            Ok(lag)
        })
        .await
    }

    /// One process reads every partition of the embedded log.
    fn assignment(&self) -> Assignment {
        Assignment {
            generation: 0,
            partitions: (0..self.shared.partitions).collect(),
        }
    }
}

/// FNV-1a: stable across processes and releases (the partition of a key must never change).
fn partition_for(key: &[u8], partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions
}

fn partition_prefix(topic: &str, partition: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(topic.len() + 5);
    key.extend_from_slice(topic.as_bytes());
    key.push(0);
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

fn record_key(topic: &str, partition: u32, offset: u64) -> Vec<u8> {
    let mut key = partition_prefix(topic, partition);
    key.extend_from_slice(&offset.to_be_bytes());
    key
}

fn offset_key(group: &str, topic: &str, partition: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(group.len() + topic.len() + 6);
    key.extend_from_slice(group.as_bytes());
    key.push(0);
    key.extend_from_slice(&partition_prefix(topic, partition));
    key
}

/// A stored record: key length (u32 BE), key, value.
fn encode_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + key.len() + value.len());
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    out
}

fn decode_record(stored: &[u8]) -> Result<(Bytes, Bytes), LogError> {
    let corrupt = || LogError::Storage("corrupt record in the event log".into());
    let len_bytes: [u8; 4] = stored
        .get(..4)
        .ok_or_else(corrupt)?
        .try_into()
        .map_err(|_| corrupt())?;
    let key_len = u32::from_be_bytes(len_bytes) as usize;
    let key = stored.get(4..4 + key_len).ok_or_else(corrupt)?;
    let value = &stored[4 + key_len..];
    Ok((Bytes::copy_from_slice(key), Bytes::copy_from_slice(value)))
}

fn decode_u64(bytes: &[u8]) -> Result<u64, LogError> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| LogError::Storage("corrupt offset in the event log".into()))?;
    Ok(u64::from_be_bytes(array))
}

fn storage(e: impl std::fmt::Display) -> LogError {
    LogError::Storage(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, LogError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LogError::Storage(format!("event log task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> Arc<dyn EventLog> {
        Arc::new(EmbeddedLog::open(EmbeddedLogConfig::new(dir)).expect("open log"))
    }

    crate::eventlog_conformance_tests!(open);

    #[test]
    fn partitioning_is_stable() {
        // Changing the hash would reorder existing devices' data across partitions.
        assert_eq!(partition_for(b"device-1", 4), partition_for(b"device-1", 4));
        assert_eq!(partition_for(b"", 7), 0x811c_9dc5 % 7);
    }

    /// A consumer waiting on a quiet topic sleeps through appends to other topics (each
    /// wake-up is a read on the blocking pool; under load, appends come by the thousand).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_wake_only_the_consumers_of_their_topic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path());
        let mut quiet = log.consumer("g", "quiet").await.expect("consumer");
        let mut busy = log.consumer("g", "busy").await.expect("consumer");
        let appender = {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..20u8 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    log.append(vec![Record::new("busy", "k", vec![i])])
                        .await
                        .expect("append");
                }
            })
        };
        let wait = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let polled = quiet.poll(10, wait).await.expect("poll");
        assert!(polled.is_empty());
        assert!(
            started.elapsed() >= wait,
            "woken by another topic's appends after {:?}",
            started.elapsed()
        );
        appender.await.expect("appender");
        assert!(!busy.poll(100, wait).await.expect("poll").is_empty());
        log.append(vec![Record::new("quiet", "k", b"now".to_vec())])
            .await
            .expect("append");
        assert_eq!(quiet.poll(10, wait).await.expect("poll").len(), 1);
    }

    #[test]
    fn zero_partitions_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = EmbeddedLogConfig::new(dir.path());
        config.partitions = 0;
        assert!(matches!(
            EmbeddedLog::open(config),
            Err(LogError::Invalid {
                field: "partitions",
                ..
            })
        ));
    }
}
