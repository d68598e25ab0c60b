//! Rollups: the consumer group `analytics-rollups` keeps the per-minute, per-hour and per-day
//! buckets of every numeric series, apart from ingest so that storing a point costs one write
//! instead of four.
//!
//! Each stream's consumer folds the metrics of the records it reads into per-bucket deltas in
//! memory. At most once a second it merges them into the stored buckets together with a
//! checkpoint per partition (the last offset folded in), in one atomic store write, then
//! commits the offsets. After a crash or a rebalance, a partition's next reader skips the
//! records its checkpoint covers, so no point is counted twice or missed. The checkpoint is
//! written by compare-and-swap: a process that lost a partition, and has not noticed yet,
//! cannot merge it again. Rollups therefore trail raw points by about a second.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tern_eventlog::{Assignment, Consumed, Consumer, EventLog, LogError, Position};
use tern_proto::v1::EventMetrics;
use tern_runtime::{MetricsRegistry, Shutdown};
use tern_store::{RecordSwap, RollupDeltas, Store, StoreError};

use crate::ingest::{consume_streams, message_ts};
use crate::metrics::{RollupMetrics, StreamLabel};

/// The consumer group that keeps rollups.
pub const ROLLUPS_GROUP: &str = "analytics-rollups";
/// The record kind of the checkpoints.
const CHECKPOINT: &str = "rollup_checkpoint";
const BATCH: usize = 4096;
const POLL_WAIT: Duration = Duration::from_millis(200);
/// How often deltas are merged: each merge is a durable write per partition with new points.
const MERGE_INTERVAL: Duration = Duration::from_secs(1);

pub struct Rollups {
    log: Arc<dyn EventLog>,
    store: Arc<dyn Store>,
    group: &'static str,
    /// Keeps this process's checkpoints apart from other processes' when each has its own log
    /// on a shared store (empty otherwise), as for rule checkpoints.
    checkpoint_prefix: String,
    metrics: RollupMetrics,
}

/// A checkpoint as stored.
#[derive(Serialize, Deserialize)]
struct Checkpoint {
    /// The last offset whose points the stored buckets hold.
    applied: u64,
}

/// What a consumer holds for one partition it reads.
struct Partition {
    key: String,
    /// The checkpoint as this process last read or wrote it: what a merge expects to replace.
    stored: Option<Bytes>,
    /// The last offset folded in, merged or not.
    applied: Option<u64>,
    /// The last offset folded in since the last merge.
    unmerged: Option<u64>,
    deltas: RollupDeltas,
}

/// The partitions one consumer holds, for the assignment generation they were loaded for.
#[derive(Default)]
struct Held {
    generation: Option<u64>,
    partitions: HashMap<u32, Partition>,
    /// Partitions another process merged since this one read their checkpoint: skipped until
    /// the next rebalance.
    fenced: HashSet<u32>,
}

impl Rollups {
    pub fn new(
        log: Arc<dyn EventLog>,
        store: Arc<dyn Store>,
        checkpoint_prefix: String,
        metrics: &MetricsRegistry,
    ) -> Self {
        Self {
            log,
            store,
            group: ROLLUPS_GROUP,
            checkpoint_prefix,
            metrics: RollupMetrics::register(metrics),
        }
    }

    /// Consumes every stream until `shutdown`, merging what was folded in before returning.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), LogError> {
        let (log, group) = (self.log.clone(), self.group);
        let this = Arc::new(self);
        consume_streams(
            log.as_ref(),
            group,
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
        let mut held = Held::default();
        let mut last_merge = Instant::now();
        loop {
            if !self
                .follow_assignment(stream, &mut held, consumer.assignment(), &shutdown)
                .await
            {
                return;
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.merge(stream, &mut held, consumer.as_mut(), &shutdown).await;
                    return;
                }
                batch = consumer.poll(BATCH, POLL_WAIT) => match batch {
                    Ok(records) => {
                        // The batch belongs to the assignment as it is after the poll.
                        if !self.follow_assignment(stream, &mut held, consumer.assignment(), &shutdown).await {
                            return;
                        }
                        self.fold(stream, &mut held, records);
                    }
                    Err(e) => {
                        tracing::error!(stream, error = %e, "rollups cannot read the event log; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            if last_merge.elapsed() >= MERGE_INTERVAL {
                if !self
                    .merge(stream, &mut held, consumer.as_mut(), &shutdown)
                    .await
                {
                    return;
                }
                last_merge = Instant::now();
            }
        }
    }

    /// Adds the records' metrics to their partitions' deltas, skipping what is merged already.
    fn fold(&self, stream: &'static str, held: &mut Held, records: Vec<Consumed>) {
        for record in records {
            let Position { partition, offset } = record.position;
            let Some(part) = held.partitions.get_mut(&partition) else {
                continue;
            };
            if part.applied.is_some_and(|applied| applied >= offset) {
                continue;
            }
            part.applied = Some(offset);
            part.unmerged = Some(offset);
            // Undecodable records are counted by ingest, which skips them too.
            let Ok(event) = EventMetrics::decode(record.value.as_ref()) else {
                continue;
            };
            let ts_ms = message_ts(event.device_time_ms, event.ingest_time_ms);
            for (i, metric) in event.metrics.iter().enumerate() {
                // A name given twice in one message is one point (the last value), as stored.
                if event.metrics[i + 1..].iter().any(|m| m.name == metric.name) {
                    continue;
                }
                let added = part.deltas.add(
                    &event.tenant_id,
                    &event.device_id,
                    &metric.name,
                    ts_ms,
                    metric.value,
                );
                if let Err(e) = added {
                    tracing::debug!(stream, offset, error = %e, "point left out of rollups");
                }
            }
        }
    }

    /// Loads the checkpoint of each partition the consumer reads now. After a rebalance every
    /// partition is dropped unmerged: the consumer reads each again from the committed offset,
    /// and the checkpoint says what to skip. Returns false only when shutdown came first.
    async fn follow_assignment(
        &self,
        stream: &'static str,
        held: &mut Held,
        assignment: Assignment,
        shutdown: &Shutdown,
    ) -> bool {
        if held.generation != Some(assignment.generation) {
            held.generation = Some(assignment.generation);
            held.partitions.clear();
            held.fenced.clear();
        }
        for partition in assignment.partitions {
            if held.partitions.contains_key(&partition) || held.fenced.contains(&partition) {
                continue;
            }
            let key = format!("{}{stream}/{partition}", self.checkpoint_prefix);
            let stored = loop {
                match self.store.get_record(CHECKPOINT, &key).await {
                    Ok(stored) => break stored,
                    Err(e) => {
                        tracing::error!(checkpoint = %key, error = %e, "cannot read the rollup checkpoint; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = shutdown.cancelled() => return false,
                        }
                    }
                }
            };
            let applied = match stored.as_deref().map(serde_json::from_slice::<Checkpoint>) {
                Some(Ok(checkpoint)) => Some(checkpoint.applied),
                Some(Err(e)) => {
                    tracing::error!(checkpoint = %key, error = %e, "rollup checkpoint unreadable; the partition is folded in from the committed offset");
                    None
                }
                None => None,
            };
            held.partitions.insert(
                partition,
                Partition {
                    key,
                    stored,
                    applied,
                    unmerged: None,
                    deltas: RollupDeltas::default(),
                },
            );
        }
        true
    }

    /// Merges every partition's deltas with its checkpoint, then commits the offsets merged.
    /// Storage failures are retried (the consumer reads nothing meanwhile, so memory stays
    /// bounded). Returns false only when shutdown interrupted the retries: nothing unmerged
    /// is committed, and it is read again after restart.
    async fn merge(
        &self,
        stream: &'static str,
        held: &mut Held,
        consumer: &mut dyn Consumer,
        shutdown: &Shutdown,
    ) -> bool {
        let mut done = Vec::new();
        let mut fenced = Vec::new();
        for (&partition, part) in &mut held.partitions {
            let Some(offset) = part.unmerged else {
                continue;
            };
            let position = Position { partition, offset };
            if part.deltas.is_empty() {
                // Nothing to add: the records up to here carried no points.
                done.push(position);
                part.unmerged = None;
                continue;
            }
            let new = Bytes::from(
                serde_json::to_vec(&Checkpoint { applied: offset }).unwrap_or_default(),
            );
            match self.merge_partition(part, new, shutdown).await {
                Some(true) => {
                    done.push(position);
                    part.unmerged = None;
                }
                Some(false) => {
                    tracing::warn!(checkpoint = %part.key, "another analytics process merged this partition's rollups: it moved there");
                    fenced.push(partition);
                }
                None => return false,
            }
        }
        for partition in fenced {
            held.partitions.remove(&partition);
            held.fenced.insert(partition);
        }
        if !done.is_empty()
            && let Err(e) = consumer.commit(&done).await
        {
            tracing::warn!(stream, error = %e, "rollup offset commit failed; the checkpoints cover the records");
        }
        if let Ok(lag) = consumer.lag().await {
            let label = StreamLabel {
                stream: stream.to_string(),
            };
            self.metrics.lag.get_or_create(&label).set(lag as i64);
        }
        true
    }

    /// One partition's merge, retried while the store fails. `Some(false)`: another process
    /// wrote the checkpoint; `None`: shutdown came first.
    async fn merge_partition(
        &self,
        part: &mut Partition,
        new: Bytes,
        shutdown: &Shutdown,
    ) -> Option<bool> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let swap = RecordSwap {
                kind: CHECKPOINT.to_string(),
                key: part.key.clone(),
                expected: part.stored.clone(),
                new: new.clone(),
            };
            let merged = match self
                .store
                .merge_rollups(part.deltas.clone().into_deltas(), swap)
                .await
            {
                // A refused swap after a failed call may be that call's own success.
                Ok(false) => match self.store.get_record(CHECKPOINT, &part.key).await {
                    Ok(current) => Ok(current.as_ref() == Some(&new)),
                    Err(e) => Err(e),
                },
                other => other,
            };
            match merged {
                Ok(true) => {
                    let deltas = std::mem::take(&mut part.deltas);
                    self.metrics.points.inc_by(deltas.points());
                    part.stored = Some(new);
                    return Some(true);
                }
                Ok(false) => return Some(false),
                Err(StoreError::Invalid { field, reason }) => {
                    // Deltas are checked as they are folded; should one be refused anyway,
                    // the partition must not stall on it.
                    tracing::error!(checkpoint = %part.key, field, reason, "rollup deltas refused by the store; dropped");
                    part.deltas = RollupDeltas::default();
                }
                Err(e) => {
                    tracing::error!(checkpoint = %part.key, error = %e, "rollup merge failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return None,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tern_eventlog::{EmbeddedLog, EmbeddedLogConfig, Record};
    use tern_proto::v1::{Event, EventKind, Metric};
    use tern_store::{EmbeddedStore, RangeQuery, Resolution, Rollup};

    use super::*;

    const MIN: i64 = 60_000;

    fn reading(device: &str, ts_ms: i64, metrics: &[(&str, f64)]) -> Record {
        let event = Event {
            tenant_id: "t".into(),
            device_id: device.into(),
            kind: EventKind::Telemetry as i32,
            message_id: uuid::Uuid::new_v4().to_string(),
            device_time_ms: ts_ms,
            // Hours later: buckets must come from the device's time.
            ingest_time_ms: ts_ms + 7_200_000,
            content_type: "application/json".into(),
            payload: b"{}".to_vec(),
            metrics: metrics
                .iter()
                .map(|(name, value)| Metric {
                    name: (*name).into(),
                    value: *value,
                })
                .collect(),
            trace_context: Default::default(),
            topic: "telemetry".into(),
        };
        Record::new("telemetry", device.to_string(), event.encode_to_vec())
    }

    async fn minutes(store: &dyn Store, device: &str) -> Vec<(i64, u64, f64)> {
        let all = RangeQuery {
            tenant: "t".into(),
            device: device.into(),
            from_ms: 0,
            to_ms: i64::MAX,
            limit: 1000,
            descending: false,
        };
        let rollups: Vec<Rollup> = store
            .rollups(&all, "kwh", Resolution::Minute)
            .await
            .expect("rollups");
        rollups
            .iter()
            .map(|r| (r.start_ms, r.count, r.sum))
            .collect()
    }

    /// Runs a rollups consumer of `group` until it has committed everything, then stops it.
    async fn run_until_caught_up(
        log: &Arc<dyn EventLog>,
        store: &Arc<dyn Store>,
        group: &'static str,
    ) {
        let mut rollups = Rollups::new(
            log.clone(),
            store.clone(),
            String::new(),
            &MetricsRegistry::default(),
        );
        rollups.group = group;
        let shutdown = Shutdown::new();
        let task = tokio::spawn(rollups.run(shutdown.clone()));
        for _ in 0..200 {
            let consumer = log.consumer(group, "telemetry").await.expect("consumer");
            if consumer.lag().await.expect("lag") == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
        task.await.expect("join").expect("run");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn buckets_count_each_record_once_across_replays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log: Arc<dyn EventLog> = Arc::new(
            EmbeddedLog::open(EmbeddedLogConfig::new(dir.path().join("log"))).expect("log"),
        );
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("store")).expect("store"));
        log.append(vec![
            reading("a", 10, &[("kwh", 1.0), ("temp", 20.0)]),
            reading("a", 20, &[("kwh", 2.0), ("kwh", 3.0)]),
            reading("b", 30, &[("kwh", 5.0)]),
            Record::new("telemetry", "a", b"\xff not protobuf".to_vec()),
            reading("a", MIN + 1, &[("kwh", f64::NAN)]),
            reading("a", MIN + 2, &[("kwh", 4.0)]),
        ])
        .await
        .expect("append");
        run_until_caught_up(&log, &store, ROLLUPS_GROUP).await;
        assert_eq!(
            minutes(store.as_ref(), "a").await,
            [(0, 2, 4.0), (MIN, 1, 4.0)],
            "a name given twice counts once with its last value; no NaN"
        );
        assert_eq!(minutes(store.as_ref(), "b").await, [(0, 1, 5.0)]);

        // A consumer whose committed offsets were lost reads everything again: the
        // checkpoints skip what the buckets hold, and only new records add.
        log.append(vec![reading("a", MIN + 3, &[("kwh", 6.0)])])
            .await
            .expect("append");
        run_until_caught_up(&log, &store, "analytics-rollups-replay").await;
        assert_eq!(
            minutes(store.as_ref(), "a").await,
            [(0, 2, 4.0), (MIN, 2, 10.0)]
        );
        assert_eq!(minutes(store.as_ref(), "b").await, [(0, 1, 5.0)]);
    }
}
