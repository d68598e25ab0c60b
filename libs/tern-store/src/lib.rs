//! The store: time series, latest values, raw events and registry records.
//!
//! Every numeric series also has per-minute, per-hour and per-day [`Rollup`]s. A consumer of
//! the log folds points into [`RollupDeltas`] and merges them with [`Store::merge_rollups`],
//! together with the log offsets they cover, so rollups trail raw points by about a second
//! and each bucket is written once per merge instead of once per point.
//!
//! Time series are keyed by (tenant, device, metric, timestamp, message id): the natural ScyllaDB
//! partition/clustering layout and the same key order in the embedded LSM store, so a range query
//! is one contiguous scan. Writes are idempotent: writing a point or event with the same message id
//! again leaves one copy.
//!
//! Implementations: [`EmbeddedStore`] (fjall), and [`RemoteStore`], a store another process
//! serves ([`StoreService`], `tern store`). Every implementation must pass [`conformance`].

pub mod conformance;
mod deltas;
mod embedded;
mod keys;
mod remote;

use async_trait::async_trait;
use bytes::Bytes;
use thiserror::Error;

pub use deltas::{RollupDelta, RollupDeltas};
pub use embedded::EmbeddedStore;
pub use remote::{RemoteStore, StoreService, StoreTls};

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

/// The bucket size of a rollup: the store keeps per-minute, per-hour and per-day aggregates of
/// every metric so that long ranges are read from a few buckets instead of every raw point.
/// Buckets are aligned to the epoch (UTC days for [`Resolution::Day`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resolution {
    Minute,
    Hour,
    Day,
}

impl Resolution {
    /// Finest first.
    pub const ALL: [Resolution; 3] = [Resolution::Minute, Resolution::Hour, Resolution::Day];

    pub fn bucket_ms(self) -> i64 {
        match self {
            Resolution::Minute => 60_000,
            Resolution::Hour => 3_600_000,
            Resolution::Day => 86_400_000,
        }
    }

    /// The start of the bucket that holds `ts_ms`.
    pub fn bucket_start(self, ts_ms: i64) -> i64 {
        ts_ms.div_euclid(self.bucket_ms()) * self.bucket_ms()
    }

    /// `1m`, `1h` or `1d`, as in the query API.
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Minute => "1m",
            Resolution::Hour => "1h",
            Resolution::Day => "1d",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

/// The aggregates of one metric over one bucket. The mean is `sum / count`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rollup {
    /// The bucket's start, milliseconds since the epoch.
    pub start_ms: i64,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl Rollup {
    /// The rollup of a single value.
    pub fn of(start_ms: i64, value: f64) -> Self {
        Self {
            start_ms,
            count: 1,
            sum: value,
            min: value,
            max: value,
        }
    }

    /// Adds another rollup of the same bucket.
    pub fn merge(&mut self, other: &Rollup) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }
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

/// One change to a registry record: `value` `None` deletes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordWrite {
    pub kind: String,
    pub key: String,
    pub value: Option<Bytes>,
}

impl RecordWrite {
    pub fn put(kind: &str, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Self {
            kind: kind.to_string(),
            key: key.into(),
            value: Some(value.into()),
        }
    }

    pub fn delete(kind: &str, key: impl Into<String>) -> Self {
        Self {
            kind: kind.to_string(),
            key: key.into(),
            value: None,
        }
    }
}

/// Sets a record to `new` if it still holds `expected` (`None`: absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSwap {
    pub kind: String,
    pub key: String,
    pub expected: Option<Bytes>,
    pub new: Bytes,
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
    /// Rollups are not touched: see [`Store::merge_rollups`].
    async fn write(&self, batch: WriteBatch) -> Result<(), StoreError>;

    /// Points of one metric in a time range.
    async fn points(&self, query: &RangeQuery, metric: &str) -> Result<Vec<Point>, StoreError>;

    /// Rollups of one metric: the buckets of `resolution` that overlap the range (so the first
    /// may start before `from_ms`).
    async fn rollups(
        &self,
        query: &RangeQuery,
        metric: &str,
        resolution: Resolution,
    ) -> Result<Vec<Rollup>, StoreError>;

    /// Adds each delta to its stored bucket and sets the `checkpoint` record, atomically and
    /// durably, if the checkpoint still holds what it expects; returns whether it did (when
    /// not, nothing is written). The checkpoint records which log offsets the deltas cover, so
    /// that after a crash their consumer skips what the buckets already hold, and the
    /// comparison stops a consumer that lost its partitions to another from counting twice.
    async fn merge_rollups(
        &self,
        deltas: Vec<RollupDelta>,
        checkpoint: RecordSwap,
    ) -> Result<bool, StoreError>;

    /// Deletes a tenant's raw points (`resolution` `None`) or rollups of one resolution older
    /// than `before_ms` (rollups: buckets that start before it), for every series. Latest
    /// values stay. Returns how many entries were deleted.
    async fn delete_before(
        &self,
        tenant: &str,
        resolution: Option<Resolution>,
        before_ms: i64,
    ) -> Result<u64, StoreError>;

    /// Every series (device, metric) of a tenant that has points, in key order.
    async fn series(&self, tenant: &str) -> Result<Vec<(String, String)>, StoreError>;

    /// Recomputes a series' rollups from its raw points over the whole UTC days that cover
    /// `[from_ms, to_ms)`: for data stored before rollups existed, or after raw points were
    /// imported around the log. Buckets without points are removed. Points stored but not yet
    /// merged into rollups (about the last second's) are counted twice in today's buckets:
    /// rebuild past days. Returns the points read.
    async fn rebuild_rollups(
        &self,
        tenant: &str,
        device: &str,
        metric: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<u64, StoreError>;

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
    async fn put_record(&self, kind: &str, key: &str, value: Bytes) -> Result<(), StoreError> {
        self.write_records(vec![RecordWrite::put(kind, key, value)])
            .await
    }
    /// Puts several records of one kind, made durable together (one sync, not one each).
    async fn put_records(
        &self,
        kind: &str,
        records: Vec<(String, Bytes)>,
    ) -> Result<(), StoreError> {
        let writes = records
            .into_iter()
            .map(|(key, value)| RecordWrite::put(kind, key, value))
            .collect();
        self.write_records(writes).await
    }
    /// Puts and deletes records of any kinds atomically, made durable together (one sync):
    /// all of them or, after a failure or crash, none. Every key is checked before anything
    /// is written.
    async fn write_records(&self, writes: Vec<RecordWrite>) -> Result<(), StoreError>;
    async fn get_record(&self, kind: &str, key: &str) -> Result<Option<Bytes>, StoreError>;
    /// Sets the record to `new` (`None` deletes it) only if it is still `expected` (`None`:
    /// absent), durably; returns whether it did. Atomic against other `compare_and_swap`s of
    /// the record, across processes where the backend is shared: what single use (an OAuth code,
    /// a refresh token) and uniqueness rest on instead of a lock in one process.
    async fn compare_and_swap(
        &self,
        kind: &str,
        key: &str,
        expected: Option<Bytes>,
        new: Option<Bytes>,
    ) -> Result<bool, StoreError>;
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
