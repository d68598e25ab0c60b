//! The store: time series, latest values, raw events and registry records.
//!
//! Time series are keyed by (tenant, device, metric, timestamp, message id): the natural ScyllaDB
//! partition/clustering layout and the same key order in the embedded LSM store, so a range query
//! is one contiguous scan. Writes are idempotent: writing a point or event with the same message id
//! again leaves one copy.
//!
//! Implementations: [`EmbeddedStore`] (fjall). Every implementation must pass [`conformance`].

pub mod conformance;
mod embedded;
mod keys;

use async_trait::async_trait;
use bytes::Bytes;
use thiserror::Error;

pub use embedded::EmbeddedStore;

/// One numeric sample of one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub tenant: String,
    pub device: String,
    pub metric: String,
    pub ts_ms: i64,
    pub value: f64,
    /// Identifies the message the point came from; rewriting the same message is a no-op.
    pub message_id: String,
}

/// A message that is not numeric telemetry, kept as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    pub tenant: String,
    pub device: String,
    pub ts_ms: i64,
    pub message_id: String,
    /// `event`, `telemetry` (non-numeric telemetry) or `lifecycle`.
    pub kind: String,
    pub topic: String,
    pub content_type: String,
    pub payload: Bytes,
}

/// The newest value of one metric of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct LatestValue {
    pub metric: String,
    pub ts_ms: i64,
    pub value: f64,
}

/// A time range `[from_ms, to_ms)` of one device, newest first when `descending`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeQuery {
    pub tenant: String,
    pub device: String,
    pub from_ms: i64,
    pub to_ms: i64,
    pub limit: usize,
    pub descending: bool,
}

/// What one write makes durable together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriteBatch {
    pub points: Vec<Point>,
    pub events: Vec<RawEvent>,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("store failed: {0}")]
    Storage(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Writes points and events durably; latest values advance only to newer timestamps.
    async fn write(&self, batch: WriteBatch) -> Result<(), StoreError>;

    /// Points of one metric in a time range.
    async fn points(&self, query: &RangeQuery, metric: &str) -> Result<Vec<Point>, StoreError>;

    /// The latest value of every metric of a device, by metric name.
    async fn latest(&self, tenant: &str, device: &str) -> Result<Vec<LatestValue>, StoreError>;

    /// Raw events in a time range; only those of `kind` (`event`, `telemetry`, `lifecycle`)
    /// when given, with `limit` counting the matching ones.
    async fn events(
        &self,
        query: &RangeQuery,
        kind: Option<&str>,
    ) -> Result<Vec<RawEvent>, StoreError>;

    /// Registry records: opaque values under a `kind` and a key. Keys that share a prefix ending
    /// in `/` form a listable collection (e.g. `{tenant}/{device}`).
    async fn put_record(&self, kind: &str, key: &str, value: Bytes) -> Result<(), StoreError>;
    /// Puts several records of one kind, made durable together (one sync, not one each).
    async fn put_records(
        &self,
        kind: &str,
        records: Vec<(String, Bytes)>,
    ) -> Result<(), StoreError>;
    async fn get_record(&self, kind: &str, key: &str) -> Result<Option<Bytes>, StoreError>;
    /// Returns whether the record existed.
    async fn delete_record(&self, kind: &str, key: &str) -> Result<bool, StoreError>;
    /// Up to `limit` records whose key starts with `prefix`, in key order, after the key `after`.
    async fn list_records(
        &self,
        kind: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Bytes)>, StoreError>;
}
