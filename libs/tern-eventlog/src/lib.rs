//! The event log: the durable, replayable stream between the bridge and everything downstream.
//!
//! Producers append batches and get an answer only once the batch is durable; consumers read as a
//! named group from the group's committed offsets, so a restarted consumer resumes where it left
//! off (at-least-once; consumers write idempotently by message id). Records with the same key go
//! to the same partition and keep their order, like Kafka.
//!
//! Implementations: [`EmbeddedLog`] (fjall on local disk, for `tern up`) and [`KafkaLog`] (the
//! distributed mode). Every implementation must pass the [`conformance`] suite.

pub mod conformance;
mod embedded;
pub mod envelope;
mod kafka;
pub mod testing;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use thiserror::Error;

pub use embedded::{EmbeddedLog, EmbeddedLogConfig};
pub use envelope::{EVENT_TOPIC, LIFECYCLE_TOPIC, TELEMETRY_TOPIC, device_record};
pub use kafka::{KafkaLog, KafkaLogConfig};

/// One record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The stream, e.g. `telemetry`. Topic names are 1..=64 characters of `[a-z0-9._-]`.
    pub topic: String,
    /// Decides the partition: records with equal keys keep their relative order.
    pub key: Bytes,
    pub value: Bytes,
    /// Metadata for other readers of the log, such as the W3C `traceparent`: Kafka keeps them
    /// as record headers; the embedded log, which only Tern reads, does not keep them. Tern's
    /// own consumers never depend on them (the envelope carries what they need).
    pub headers: Vec<(String, Bytes)>,
}

impl Record {
    pub fn new(topic: impl Into<String>, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            key: key.into(),
            value: value.into(),
            headers: Vec::new(),
        }
    }
}

/// Where a record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    pub partition: u32,
    pub offset: u64,
}

/// The partitions a consumer reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Changes whenever the group took partitions from this consumer or gave it some (a
    /// rebalance). Whoever reads a partition after a change starts at the group's committed
    /// offset, so records polled after a change may repeat ones polled before it.
    pub generation: u64,
    pub partitions: Vec<u32>,
}

/// A record read by a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    pub topic: String,
    pub position: Position,
    pub key: Bytes,
    pub value: Bytes,
}

#[derive(Debug, Error)]
pub enum LogError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("event log storage failed: {0}")]
    Storage(String),
    #[error("event log is closed")]
    Closed,
}

#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends a batch and returns each record's position once all of them are durable.
    async fn append(&self, records: Vec<Record>) -> Result<Vec<Position>, LogError>;

    /// A consumer for `group` on `topic`, starting at the group's committed offsets.
    async fn consumer(&self, group: &str, topic: &str) -> Result<Box<dyn Consumer>, LogError>;
}

#[async_trait]
pub trait Consumer: Send {
    /// Up to `max` records after this consumer's cursor, waiting up to `wait` when none are ready.
    /// Returns an empty batch when nothing arrived in time.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Consumed>, LogError>;

    /// Marks `positions` (and everything before them in their partitions) as done for the group.
    async fn commit(&mut self, positions: &[Position]) -> Result<(), LogError>;

    /// Records appended but not yet committed by this group, summed over partitions.
    async fn lag(&self) -> Result<u64, LogError>;

    /// The partitions this consumer reads now. The records of one poll all come from the
    /// assignment that this reports after it.
    fn assignment(&self) -> Assignment;
}

/// Validates a topic or group name so that it can be embedded in storage keys unambiguously.
pub(crate) fn validate_name(field: &'static str, name: &str) -> Result<(), LogError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(LogError::Invalid {
            field,
            reason: format!("{name:?} must be 1..=64 characters of [a-z0-9._-]"),
        })
    }
}
