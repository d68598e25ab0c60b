//! Stream processing on the event log. This first part is ingest: it consumes the telemetry and
//! event streams as the consumer group `analytics-ingest` and writes numeric telemetry as time
//! series (and latest values) and everything else as raw events.
//!
//! Delivery is at-least-once: offsets are committed only after the store write is durable, and
//! store writes are idempotent by message id, so a replay after a crash stores nothing twice.

pub mod alerts;
mod ingest;
pub mod jobs;
mod metrics;
pub mod retention;
pub mod rules;

pub use ingest::{INGEST_GROUP, Ingest, event_to_writes};
