//! Stream processing on the event log. Ingest consumes the telemetry and event streams as the
//! consumer group `analytics-ingest` and writes numeric telemetry as time series (and latest
//! values) and everything else as raw events; [`Rollups`] (`analytics-rollups`) keeps their
//! minute, hour and day aggregates; the rule engine, alerts, jobs and retention build on them.
//!
//! Ingest is at-least-once: offsets are committed only after the store write is durable, and
//! store writes are idempotent by message id, so a replay after a crash stores nothing twice.
//! Rollups are exactly-once: a checkpoint of the offsets merged is saved with the buckets.

pub mod alerts;
mod ingest;
pub mod jobs;
mod metrics;
pub mod retention;
mod rollups;
pub mod rules;

pub use ingest::{INGEST_GROUP, Ingest, event_to_writes};
pub use rollups::{ROLLUPS_GROUP, Rollups};
