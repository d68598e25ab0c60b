use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tern_eventlog::{Consumed, Consumer, EventLog, LogError};
use tern_proto::v1::{Event, EventKind};
use tern_runtime::{MetricsRegistry, Shutdown, otel};
use tern_store::{Point, RawEvent, Store, StoreError, WriteBatch};
use tracing::Instrument;

use crate::metrics::{IngestMetrics, StreamLabel};

/// The consumer group of the ingest pipeline.
pub const INGEST_GROUP: &str = "analytics-ingest";
/// The streams ingest and rollups read.
pub(crate) const STREAMS: [&str; 4] = ["telemetry", "event", "lifecycle", "commands"];
/// Records per store write and offset commit: each costs an fsync, so bigger batches are cheaper
/// per record; the bound keeps one batch's memory and latency small.
const BATCH: usize = 4096;
const POLL_WAIT: Duration = Duration::from_millis(500);

pub struct Ingest {
    log: Arc<dyn EventLog>,
    store: Arc<dyn Store>,
    metrics: IngestMetrics,
}

/// Runs `consume` with a consumer of `group` for each of [`STREAMS`], each on a task of its
/// own, until all of them return.
pub(crate) async fn consume_streams<F, Fut>(
    log: &dyn EventLog,
    group: &str,
    shutdown: Shutdown,
    consume: F,
) -> Result<(), LogError>
where
    F: Fn(&'static str, Box<dyn Consumer>, Shutdown) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut tasks = Vec::new();
    for stream in STREAMS {
        let consumer = log.consumer(group, stream).await?;
        tasks.push(tokio::spawn(consume(stream, consumer, shutdown.clone())));
    }
    for task in tasks {
        if let Err(e) = task.await {
            tracing::error!(group, error = %e, "consumer task failed");
        }
    }
    Ok(())
}

/// When a message happened: the device's time if it sent one, else when it arrived.
pub(crate) fn message_ts(device_time_ms: i64, ingest_time_ms: i64) -> i64 {
    if device_time_ms > 0 {
        device_time_ms
    } else {
        ingest_time_ms
    }
}

/// The store writes for one envelope: one point per decoded metric, or one raw event.
pub fn event_to_writes(event: Event, out: &mut WriteBatch) {
    let ts_ms = message_ts(event.device_time_ms, event.ingest_time_ms);
    if !event.metrics.is_empty() {
        for metric in event.metrics {
            out.points.push(Point {
                tenant: event.tenant_id.clone(),
                device: event.device_id.clone(),
                metric: metric.name,
                ts_ms,
                value: metric.value,
                message_id: event.message_id.clone(),
            });
        }
        return;
    }
    let kind = match EventKind::try_from(event.kind) {
        Ok(EventKind::Event) => "event",
        Ok(EventKind::Lifecycle) => "lifecycle",
        Ok(EventKind::Command) => "command",
        _ => "telemetry",
    };
    out.events.push(RawEvent {
        tenant: event.tenant_id,
        device: event.device_id,
        ts_ms,
        message_id: event.message_id,
        kind: kind.to_string(),
        topic: event.topic,
        content_type: event.content_type,
        payload: event.payload.into(),
    });
}

/// A `tern.ingest` span continuing the message's trace, if it is traced and traces are exported.
fn ingest_span(stream: &str, event: &Event) -> Option<tracing::Span> {
    if event.trace_context.is_empty() || !otel::enabled() {
        return None;
    }
    let span = tracing::info_span!(parent: None, "tern.ingest", "tern.service" = "analytics",
        stream, tenant = %event.tenant_id, device = %event.device_id, message = %event.message_id);
    otel::set_parent(&span, &event.trace_context);
    Some(span)
}

/// The span of one store write: a child of its first traced message, linked to the others.
fn store_span(traced: &[tracing::Span], batch: &WriteBatch) -> Option<tracing::Span> {
    let (first, others) = traced.split_first()?;
    let span = tracing::info_span!(parent: first, "tern.store.write", "tern.service" = "store",
        points = batch.points.len(), events = batch.events.len());
    for other in others {
        otel::link(&span, other);
    }
    Some(span)
}

impl Ingest {
    pub fn new(log: Arc<dyn EventLog>, store: Arc<dyn Store>, metrics: &MetricsRegistry) -> Self {
        Self {
            log,
            store,
            metrics: IngestMetrics::register(metrics),
        }
    }

    /// Consumes every stream until `shutdown`; the batch in hand is finished and committed first.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), LogError> {
        let log = self.log.clone();
        let this = Arc::new(self);
        consume_streams(
            log.as_ref(),
            INGEST_GROUP,
            shutdown,
            move |stream, consumer, stop| {
                let this = this.clone();
                async move { this.consume(stream, consumer, stop).await }
            },
        )
        .await
    }

    async fn consume(
        &self,
        stream: &'static str,
        mut consumer: Box<dyn Consumer>,
        shutdown: Shutdown,
    ) {
        let label = StreamLabel {
            stream: stream.to_string(),
        };
        loop {
            let batch = tokio::select! {
                _ = shutdown.cancelled() => return,
                batch = consumer.poll(BATCH, POLL_WAIT) => batch,
            };
            let records = match batch {
                Ok(records) => records,
                Err(e) => {
                    tracing::error!(stream, error = %e, "cannot read the event log; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if records.is_empty() {
                continue;
            }
            self.metrics
                .records
                .get_or_create(&label)
                .inc_by(records.len() as u64);
            let positions: Vec<_> = records.iter().map(|r| r.position).collect();
            // Commit only what is stored; if shutdown interrupted the retries, nothing is
            // committed and the batch is read again after restart.
            if !self.store_durably(stream, records, &shutdown).await {
                return;
            }
            if let Err(e) = consumer.commit(&positions).await {
                tracing::error!(stream, error = %e, "offset commit failed; the batch will be replayed");
            }
            if let Ok(lag) = consumer.lag().await {
                self.metrics.lag.get_or_create(&label).set(lag as i64);
            }
        }
    }

    /// Writes a batch, retrying storage failures with backoff. Records that cannot be stored at
    /// all (undecodable, or refused as invalid) are logged and skipped so they cannot block the
    /// stream. Returns false only when shutdown interrupted the retries.
    async fn store_durably(
        &self,
        stream: &'static str,
        records: Vec<Consumed>,
        shutdown: &Shutdown,
    ) -> bool {
        let label = StreamLabel {
            stream: stream.to_string(),
        };
        let mut batch = WriteBatch::default();
        // The traced messages' spans, ended once the batch is stored.
        let mut traced = Vec::new();
        for record in &records {
            match Event::decode(record.value.as_ref()) {
                Ok(event) => {
                    traced.extend(ingest_span(stream, &event));
                    event_to_writes(event, &mut batch);
                }
                Err(e) => {
                    tracing::error!(stream, offset = record.position.offset, error = %e, "undecodable envelope skipped");
                    self.metrics.skipped.get_or_create(&label).inc();
                }
            }
        }
        let write_span = store_span(&traced, &batch);
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            let write = self.store.write(batch.clone());
            let written = match &write_span {
                Some(span) => write.instrument(span.clone()).await,
                None => write.await,
            };
            match written {
                Ok(()) => {
                    self.metrics
                        .store_write_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics.points.inc_by(batch.points.len() as u64);
                    self.metrics.events.inc_by(batch.events.len() as u64);
                    return true;
                }
                Err(StoreError::Invalid { .. }) => {
                    self.store_one_by_one(&label, batch).await;
                    return true;
                }
                Err(e) => {
                    tracing::error!(stream, error = %e, "store write failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return false,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn store_one_by_one(&self, label: &StreamLabel, batch: WriteBatch) {
        let singles = batch
            .points
            .into_iter()
            .map(|p| WriteBatch {
                points: vec![p],
                events: vec![],
            })
            .chain(batch.events.into_iter().map(|e| WriteBatch {
                points: vec![],
                events: vec![e],
            }));
        for single in singles {
            if let Err(e) = self.store.write(single).await {
                tracing::error!(stream = %label.stream, error = %e, "record refused by the store; skipped");
                self.metrics.skipped.get_or_create(label).inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tern_eventlog::{EmbeddedLog, EmbeddedLogConfig, Record};
    use tern_proto::v1::Metric;
    use tern_store::{EmbeddedStore, RangeQuery};

    use super::*;

    fn envelope(id: &str, metrics: Vec<(&str, f64)>, payload: &[u8]) -> Event {
        Event {
            tenant_id: "t".into(),
            device_id: "d".into(),
            kind: EventKind::Telemetry as i32,
            message_id: id.into(),
            device_time_ms: 0,
            ingest_time_ms: 1_000,
            content_type: "application/json".into(),
            payload: payload.to_vec(),
            metrics: metrics
                .into_iter()
                .map(|(n, v)| Metric {
                    name: n.into(),
                    value: v,
                })
                .collect(),
            trace_context: Default::default(),
            topic: "telemetry".into(),
        }
    }

    fn all() -> RangeQuery {
        RangeQuery {
            tenant: "t".into(),
            device: "d".into(),
            from_ms: i64::MIN,
            to_ms: i64::MAX,
            limit: 100,
            descending: false,
        }
    }

    #[test]
    fn metrics_become_points_and_the_rest_raw_events() {
        let mut batch = WriteBatch::default();
        let mut with_ts = envelope("m1", vec![("temp", 21.5), ("hum", 40.0)], b"{}");
        with_ts.device_time_ms = 500;
        event_to_writes(with_ts, &mut batch);
        event_to_writes(envelope("m2", vec![], b"hello"), &mut batch);
        assert_eq!(batch.points.len(), 2);
        assert_eq!(batch.points[0].ts_ms, 500, "the device timestamp wins");
        assert_eq!(batch.events.len(), 1);
        assert_eq!(
            batch.events[0].ts_ms, 1_000,
            "ingest time when the device sent none"
        );
        assert_eq!(batch.events[0].kind, "telemetry");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ingest_stores_commits_and_skips_poison_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log: Arc<dyn EventLog> = Arc::new(
            EmbeddedLog::open(EmbeddedLogConfig::new(dir.path().join("log"))).expect("log"),
        );
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("store")).expect("store"));
        let good = envelope("m1", vec![("temp", 21.5)], b"{}");
        log.append(vec![
            Record::new("telemetry", "k", b"\xff not protobuf".to_vec()),
            Record::new("telemetry", "k", good.encode_to_vec()),
            // Replayed message: stored once.
            Record::new("telemetry", "k", good.encode_to_vec()),
        ])
        .await
        .expect("append");

        let shutdown = Shutdown::new();
        let ingest = Ingest::new(log.clone(), store.clone(), &MetricsRegistry::default());
        let task = tokio::spawn(ingest.run(shutdown.clone()));
        let mut lag = u64::MAX;
        for _ in 0..100 {
            let consumer = log
                .consumer(INGEST_GROUP, "telemetry")
                .await
                .expect("consumer");
            lag = consumer.lag().await.expect("lag");
            if lag == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
        task.await.expect("join").expect("run");
        assert_eq!(lag, 0, "everything committed, the poison record included");
        let points = store.points(&all(), "temp").await.expect("points");
        assert_eq!(points.len(), 1);
        assert_eq!(points[0].value, 21.5);
    }
}
