//! The embedded store on fjall (one directory, five keyspaces: points, rollups, latest, events,
//! records).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::keys::{component, decode_ts, encode_ts, prefix};
use crate::{
    LatestValue, Point, RangeQuery, RawEvent, RecordSwap, RecordWrite, Resolution, Rollup,
    RollupDelta, Store, StoreError, WriteBatch,
};

struct Inner {
    db: Database,
    points: Keyspace,
    /// `series 0 resolution 0 bucket-start` → count, sum, min, max.
    rollups: Keyspace,
    latest: Keyspace,
    events: Keyspace,
    records: Keyspace,
    /// Serialises writes, so the read-modify-writes of latest values and of rollups cannot
    /// interleave.
    write_lock: Mutex<()>,
    /// Serialises compare-and-swap of records (one process owns the embedded store).
    swap_lock: Mutex<()>,
    syncs: GroupSync,
}

/// Group commit for the store's journal. A committed write is in the journal's buffer and
/// becomes durable with the next sync; concurrent writers share that sync instead of queueing
/// one fsync each (under load, hundreds of registry and command writes, each on its own
/// blocking thread, waited on the journal one by one).
#[derive(Default)]
struct GroupSync {
    /// Writes committed so far; a write's ticket is the count just after its commit.
    committed: AtomicU64,
    /// The highest ticket a finished sync covers. Held while syncing, so that writers
    /// arriving meanwhile wait and are then usually covered by the next single sync.
    synced: Mutex<u64>,
    /// Syncs performed.
    performed: AtomicU64,
}

impl Inner {
    /// Makes every write committed so far durable; call after committing a write.
    fn sync(&self) -> Result<(), StoreError> {
        let ticket = self.syncs.committed.fetch_add(1, Ordering::SeqCst) + 1;
        let mut synced = self.syncs.synced.lock().unwrap_or_else(|e| e.into_inner());
        if *synced >= ticket {
            return Ok(());
        }
        // Every ticket up to here belongs to a write whose commit had returned.
        let covered = self.syncs.committed.load(Ordering::SeqCst);
        self.db.persist(PersistMode::SyncData).map_err(storage)?;
        self.syncs.performed.fetch_add(1, Ordering::Relaxed);
        *synced = covered;
        Ok(())
    }
}

/// The embedded store used by `tern up`.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl EmbeddedStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = Database::builder(dir).open().map_err(storage)?;
        let keyspace = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(storage)
        };
        let inner = Inner {
            points: keyspace("points")?,
            rollups: keyspace("rollups")?,
            latest: keyspace("latest")?,
            events: keyspace("events")?,
            records: keyspace("records")?,
            db,
            write_lock: Mutex::new(()),
            swap_lock: Mutex::new(()),
            syncs: GroupSync::default(),
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Storage(format!("store task failed: {e}")))?
    }
}

fn series_prefix(tenant: &str, device: &str, metric: &str) -> Result<Vec<u8>, StoreError> {
    Ok(prefix(&[
        component("tenant", tenant)?,
        component("device", device)?,
        component("metric", metric)?,
    ]))
}

fn device_prefix(tenant: &str, device: &str) -> Result<Vec<u8>, StoreError> {
    Ok(prefix(&[
        component("tenant", tenant)?,
        component("device", device)?,
    ]))
}

fn record_key(kind: &str, key: &str) -> Result<Vec<u8>, StoreError> {
    let mut k = prefix(&[component("kind", kind)?]);
    k.extend_from_slice(component("key", key)?.as_bytes());
    Ok(k)
}

fn rollup_prefix(series: &[u8], resolution: Resolution) -> Vec<u8> {
    let mut key = series.to_vec();
    key.extend_from_slice(resolution.as_str().as_bytes());
    key.push(0);
    key
}

fn encode_rollup(r: &Rollup) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(&r.count.to_be_bytes());
    for f in [r.sum, r.min, r.max] {
        out.extend_from_slice(&f.to_be_bytes());
    }
    out
}

fn decode_rollup(start_ms: i64, bytes: &[u8]) -> Result<Rollup, StoreError> {
    let word = |i: usize| -> Result<[u8; 8], StoreError> {
        bytes
            .get(i * 8..i * 8 + 8)
            .and_then(|w| w.try_into().ok())
            .ok_or_else(corrupt)
    };
    Ok(Rollup {
        start_ms,
        count: u64::from_be_bytes(word(0)?),
        sum: f64::from_be_bytes(word(1)?),
        min: f64::from_be_bytes(word(2)?),
        max: f64::from_be_bytes(word(3)?),
    })
}

fn with_ts(mut prefix: Vec<u8>, ts_ms: i64, suffix: &str) -> Vec<u8> {
    prefix.extend_from_slice(&encode_ts(ts_ms));
    prefix.extend_from_slice(suffix.as_bytes());
    prefix
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        if batch.points.is_empty() && batch.events.is_empty() {
            return Ok(());
        }
        self.run(move |inner| {
            let guard = inner
                .write_lock
                .lock()
                .map_err(|_| StoreError::Storage("store write lock poisoned".into()))?;
            let mut write = inner.db.batch();
            // Newest value per series in this batch, to merge with what is stored.
            let mut newest: HashMap<Vec<u8>, (i64, f64)> = HashMap::new();
            for p in &batch.points {
                let series = series_prefix(&p.tenant, &p.device, &p.metric)?;
                component("message_id", &p.message_id)?;
                if !p.value.is_finite() {
                    return Err(StoreError::Invalid {
                        field: "value",
                        reason: "must be a finite number".into(),
                    });
                }
                let key = with_ts(series.clone(), p.ts_ms, &p.message_id);
                write.insert(&inner.points, key, p.value.to_be_bytes().to_vec());
                let slot = newest.entry(series).or_insert((p.ts_ms, p.value));
                if p.ts_ms >= slot.0 {
                    *slot = (p.ts_ms, p.value);
                }
            }
            for (series, (ts, value)) in newest {
                let stored_ts = inner
                    .latest
                    .get(&series)
                    .map_err(storage)?
                    .and_then(|v| decode_ts(&v[..8.min(v.len())]));
                if stored_ts.is_none_or(|stored| ts >= stored) {
                    let mut v = encode_ts(ts).to_vec();
                    v.extend_from_slice(&value.to_be_bytes());
                    write.insert(&inner.latest, series, v);
                }
            }
            for e in &batch.events {
                component("message_id", &e.message_id)?;
                let key = with_ts(device_prefix(&e.tenant, &e.device)?, e.ts_ms, &e.message_id);
                write.insert(&inner.events, key, encode_event(e));
            }
            write.commit().map_err(storage)?;
            drop(guard);
            inner.sync()
        })
        .await
    }

    async fn merge_rollups(
        &self,
        deltas: Vec<RollupDelta>,
        checkpoint: RecordSwap,
    ) -> Result<bool, StoreError> {
        let checkpoint_key = record_key(&checkpoint.kind, &checkpoint.key)?;
        let buckets = deltas
            .into_iter()
            .map(|d| {
                let series = series_prefix(&d.tenant, &d.device, &d.metric)?;
                let key = with_ts(rollup_prefix(&series, d.resolution), d.rollup.start_ms, "");
                Ok((key, d.rollup))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.run(move |inner| {
            // The write lock keeps rebuilds out of the buckets' read-modify-write; the swap
            // lock keeps other swaps of the checkpoint out of the comparison.
            let guard = inner
                .write_lock
                .lock()
                .map_err(|_| StoreError::Storage("store write lock poisoned".into()))?;
            let swap = inner.swap_lock.lock().unwrap_or_else(|e| e.into_inner());
            let current = inner.records.get(&checkpoint_key).map_err(storage)?;
            if current.as_deref() != checkpoint.expected.as_deref() {
                return Ok(false);
            }
            let mut write = inner.db.batch();
            for (key, mut rollup) in buckets {
                if let Some(stored) = inner.rollups.get(&key).map_err(storage)? {
                    rollup.merge(&decode_rollup(rollup.start_ms, &stored)?);
                }
                write.insert(&inner.rollups, key, encode_rollup(&rollup));
            }
            write.insert(&inner.records, checkpoint_key, checkpoint.new.to_vec());
            write.commit().map_err(storage)?;
            drop(swap);
            drop(guard);
            inner.sync()?;
            Ok(true)
        })
        .await
    }

    async fn points(&self, query: &RangeQuery, metric: &str) -> Result<Vec<Point>, StoreError> {
        let series = series_prefix(&query.tenant, &query.device, metric)?;
        let query = query.clone();
        let metric = metric.to_string();
        self.run(move |inner| {
            let start = with_ts(series.clone(), query.from_ms, "");
            let end = with_ts(series.clone(), query.to_ms, "");
            let mut out = Vec::new();
            let range = inner.points.range(start..end);
            let iter: Box<dyn Iterator<Item = fjall::Guard>> = if query.descending {
                Box::new(range.rev())
            } else {
                Box::new(range)
            };
            for guard in iter.take(query.limit) {
                let (key, value) = guard.into_inner().map_err(storage)?;
                let rest = &key[series.len()..];
                let ts_ms = decode_ts(&rest[..8]).ok_or_else(corrupt)?;
                let value: [u8; 8] = value.as_ref().try_into().map_err(|_| corrupt())?;
                out.push(Point {
                    tenant: query.tenant.clone(),
                    device: query.device.clone(),
                    metric: metric.clone(),
                    ts_ms,
                    value: f64::from_be_bytes(value),
                    message_id: String::from_utf8_lossy(&rest[8..]).into_owned(),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn rollups(
        &self,
        query: &RangeQuery,
        metric: &str,
        resolution: Resolution,
    ) -> Result<Vec<Rollup>, StoreError> {
        let prefix = rollup_prefix(
            &series_prefix(&query.tenant, &query.device, metric)?,
            resolution,
        );
        let query = query.clone();
        self.run(move |inner| {
            let start = with_ts(prefix.clone(), resolution.bucket_start(query.from_ms), "");
            let end = with_ts(prefix.clone(), query.to_ms, "");
            let range = inner.rollups.range(start..end);
            let iter: Box<dyn Iterator<Item = fjall::Guard>> = if query.descending {
                Box::new(range.rev())
            } else {
                Box::new(range)
            };
            let mut out = Vec::new();
            for guard in iter.take(query.limit) {
                let (key, value) = guard.into_inner().map_err(storage)?;
                let start_ms = decode_ts(&key[prefix.len()..]).ok_or_else(corrupt)?;
                out.push(decode_rollup(start_ms, &value)?);
            }
            Ok(out)
        })
        .await
    }

    async fn delete_before(
        &self,
        tenant: &str,
        resolution: Option<Resolution>,
        before_ms: i64,
    ) -> Result<u64, StoreError> {
        let tenant_prefix = prefix(&[component("tenant", tenant)?]);
        self.run(move |inner| {
            // Every series of the tenant has a latest value: its key is the series prefix.
            let series: Vec<Vec<u8>> = inner
                .latest
                .prefix(&tenant_prefix)
                .map(|guard| guard.key().map(|k| k.to_vec()).map_err(storage))
                .collect::<Result<_, _>>()?;
            let (keyspace, to_prefix): (&Keyspace, &dyn Fn(&[u8]) -> Vec<u8>) = match resolution {
                None => (&inner.points, &|s: &[u8]| s.to_vec()),
                Some(r) => (&inner.rollups, &move |s: &[u8]| rollup_prefix(s, r)),
            };
            let mut deleted = 0u64;
            for series in series {
                let start = with_ts(to_prefix(&series), i64::MIN, "");
                let end = with_ts(to_prefix(&series), before_ms, "");
                // In slices, so that a large backlog is not one huge batch.
                loop {
                    let keys: Vec<_> = keyspace
                        .range(start.clone()..end.clone())
                        .take(10_000)
                        .map(|guard| guard.key().map_err(storage))
                        .collect::<Result<_, _>>()?;
                    if keys.is_empty() {
                        break;
                    }
                    let mut batch = inner.db.batch();
                    for key in &keys {
                        batch.remove(keyspace, key.clone());
                    }
                    batch.commit().map_err(storage)?;
                    deleted += keys.len() as u64;
                }
            }
            inner.sync()?;
            Ok(deleted)
        })
        .await
    }

    async fn series(&self, tenant: &str) -> Result<Vec<(String, String)>, StoreError> {
        let tenant_prefix = prefix(&[component("tenant", tenant)?]);
        self.run(move |inner| {
            let mut out = Vec::new();
            for guard in inner.latest.prefix(&tenant_prefix) {
                let key = guard.key().map_err(storage)?;
                let rest = &key[tenant_prefix.len()..key.len().saturating_sub(1)];
                let mut parts = rest.splitn(2, |b| *b == 0);
                let (Some(device), Some(metric)) = (parts.next(), parts.next()) else {
                    return Err(corrupt());
                };
                out.push((
                    String::from_utf8_lossy(device).into_owned(),
                    String::from_utf8_lossy(metric).into_owned(),
                ));
            }
            Ok(out)
        })
        .await
    }

    async fn rebuild_rollups(
        &self,
        tenant: &str,
        device: &str,
        metric: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<u64, StoreError> {
        let series = series_prefix(tenant, device, metric)?;
        let day = Resolution::Day;
        let start = day.bucket_start(from_ms);
        let end = day
            .bucket_start(to_ms.saturating_sub(1))
            .saturating_add(day.bucket_ms());
        self.run(move |inner| {
            // Under the write lock: no new point can slip between the scan and the rewrite.
            let _guard = inner
                .write_lock
                .lock()
                .map_err(|_| StoreError::Storage("store write lock poisoned".into()))?;
            let mut buckets: HashMap<Resolution, BTreeMap<i64, Rollup>> = HashMap::new();
            let mut points = 0u64;
            let range = with_ts(series.clone(), start, "")..with_ts(series.clone(), end, "");
            for guard in inner.points.range(range) {
                let (key, value) = guard.into_inner().map_err(storage)?;
                let ts = decode_ts(&key[series.len()..series.len() + 8]).ok_or_else(corrupt)?;
                let value: [u8; 8] = value.as_ref().try_into().map_err(|_| corrupt())?;
                let value = f64::from_be_bytes(value);
                points += 1;
                for resolution in Resolution::ALL {
                    let bucket = resolution.bucket_start(ts);
                    let one = Rollup::of(bucket, value);
                    buckets
                        .entry(resolution)
                        .or_default()
                        .entry(bucket)
                        .and_modify(|r| r.merge(&one))
                        .or_insert(one);
                }
            }
            let mut write = inner.db.batch();
            for resolution in Resolution::ALL {
                let prefix = rollup_prefix(&series, resolution);
                let old = inner
                    .rollups
                    .range(with_ts(prefix.clone(), start, "")..with_ts(prefix.clone(), end, ""));
                for guard in old {
                    write.remove(&inner.rollups, guard.key().map_err(storage)?);
                }
                for (bucket, rollup) in buckets.remove(&resolution).unwrap_or_default() {
                    write.insert(
                        &inner.rollups,
                        with_ts(prefix.clone(), bucket, ""),
                        encode_rollup(&rollup),
                    );
                }
            }
            write.commit().map_err(storage)?;
            inner.sync()?;
            Ok(points)
        })
        .await
    }

    async fn latest(&self, tenant: &str, device: &str) -> Result<Vec<LatestValue>, StoreError> {
        let device_prefix = device_prefix(tenant, device)?;
        self.run(move |inner| {
            let mut out = Vec::new();
            for guard in inner.latest.prefix(&device_prefix) {
                let (key, value) = guard.into_inner().map_err(storage)?;
                let metric = &key[device_prefix.len()..key.len() - 1];
                if value.len() != 16 {
                    return Err(corrupt());
                }
                let number: [u8; 8] = value[8..].try_into().map_err(|_| corrupt())?;
                out.push(LatestValue {
                    metric: String::from_utf8_lossy(metric).into_owned(),
                    ts_ms: decode_ts(&value[..8]).ok_or_else(corrupt)?,
                    value: f64::from_be_bytes(number),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn events(
        &self,
        query: &RangeQuery,
        kind: Option<&str>,
    ) -> Result<Vec<RawEvent>, StoreError> {
        let device_prefix = device_prefix(&query.tenant, &query.device)?;
        let query = query.clone();
        let kind = kind.map(str::to_string);
        self.run(move |inner| {
            let start = with_ts(device_prefix.clone(), query.from_ms, "");
            let end = with_ts(device_prefix.clone(), query.to_ms, "");
            let range = inner.events.range(start..end);
            let iter: Box<dyn Iterator<Item = fjall::Guard>> = if query.descending {
                Box::new(range.rev())
            } else {
                Box::new(range)
            };
            let mut out = Vec::new();
            for guard in iter {
                if out.len() >= query.limit {
                    break;
                }
                let (key, value) = guard.into_inner().map_err(storage)?;
                let rest = &key[device_prefix.len()..];
                let ts_ms = decode_ts(&rest[..8]).ok_or_else(corrupt)?;
                let message_id = String::from_utf8_lossy(&rest[8..]).into_owned();
                let event = decode_event(&query.tenant, &query.device, ts_ms, message_id, &value)?;
                if kind.as_ref().is_none_or(|k| *k == event.kind) {
                    out.push(event);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn write_records(&self, writes: Vec<RecordWrite>) -> Result<(), StoreError> {
        let writes = writes
            .into_iter()
            .map(|w| Ok((record_key(&w.kind, &w.key)?, w.value)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        if writes.is_empty() {
            return Ok(());
        }
        self.run(move |inner| {
            let mut batch = inner.db.batch();
            for (key, value) in writes {
                match value {
                    Some(value) => batch.insert(&inner.records, key, value.to_vec()),
                    None => batch.remove(&inner.records, key),
                }
            }
            batch.commit().map_err(storage)?;
            inner.sync()
        })
        .await
    }

    /// Point reads run inline: they are served from the memtable or block cache in
    /// microseconds, and a blocking-pool hop per read cost more than the read itself when
    /// thousands of devices connect at once (each connect looks its device up).
    async fn get_record(&self, kind: &str, key: &str) -> Result<Option<Bytes>, StoreError> {
        let key = record_key(kind, key)?;
        Ok(self
            .inner
            .records
            .get(key)
            .map_err(storage)?
            .map(|v| Bytes::copy_from_slice(&v)))
    }

    async fn compare_and_swap(
        &self,
        kind: &str,
        key: &str,
        expected: Option<Bytes>,
        new: Option<Bytes>,
    ) -> Result<bool, StoreError> {
        let key = record_key(kind, key)?;
        self.run(move |inner| {
            let swap = inner.swap_lock.lock().unwrap_or_else(|e| e.into_inner());
            let current = inner.records.get(&key).map_err(storage)?;
            if current.as_deref() != expected.as_deref() {
                return Ok(false);
            }
            match new {
                Some(value) => inner.records.insert(key, value.to_vec()).map_err(storage)?,
                None => inner.records.remove(key).map_err(storage)?,
            }
            drop(swap);
            inner.sync()?;
            Ok(true)
        })
        .await
    }

    async fn delete_record(&self, kind: &str, key: &str) -> Result<bool, StoreError> {
        let key = record_key(kind, key)?;
        self.run(move |inner| {
            let existed = inner.records.contains_key(&key).map_err(storage)?;
            if existed {
                inner.records.remove(key).map_err(storage)?;
                inner.sync()?;
            }
            Ok(existed)
        })
        .await
    }

    async fn list_records(
        &self,
        kind: &str,
        prefix_str: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Bytes)>, StoreError> {
        let kind_prefix = prefix(&[component("kind", kind)?]);
        let mut scan_prefix = kind_prefix.clone();
        scan_prefix.extend_from_slice(prefix_str.as_bytes());
        let mut start = scan_prefix.clone();
        if let Some(after) = after {
            // Keys never contain NUL, so `after 0x00` is the smallest key strictly after `after`.
            let mut after_key = kind_prefix.clone();
            after_key.extend_from_slice(after.as_bytes());
            after_key.push(0);
            start = start.max(after_key);
        }
        self.run(move |inner| {
            let mut out = Vec::new();
            for guard in inner.records.range(start..) {
                if out.len() >= limit {
                    break;
                }
                let (key, value) = guard.into_inner().map_err(storage)?;
                if !key.starts_with(&scan_prefix) {
                    break;
                }
                let name = String::from_utf8_lossy(&key[kind_prefix.len()..]).into_owned();
                out.push((name, Bytes::copy_from_slice(&value)));
            }
            Ok(out)
        })
        .await
    }
}

/// Events are stored as length-prefixed fields: kind, topic, content type, then the payload.
fn encode_event(e: &RawEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        12 + e.kind.len() + e.topic.len() + e.content_type.len() + e.payload.len(),
    );
    for field in [&e.kind, &e.topic, &e.content_type] {
        out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    out.extend_from_slice(&e.payload);
    out
}

fn decode_event(
    tenant: &str,
    device: &str,
    ts_ms: i64,
    message_id: String,
    mut bytes: &[u8],
) -> Result<RawEvent, StoreError> {
    let mut fields = Vec::with_capacity(3);
    for _ in 0..3 {
        let len: [u8; 4] = bytes
            .get(..4)
            .ok_or_else(corrupt)?
            .try_into()
            .map_err(|_| corrupt())?;
        let len = u32::from_be_bytes(len) as usize;
        let field = bytes.get(4..4 + len).ok_or_else(corrupt)?;
        fields.push(String::from_utf8_lossy(field).into_owned());
        bytes = &bytes[4 + len..];
    }
    let content_type = fields.pop().unwrap_or_default();
    let topic = fields.pop().unwrap_or_default();
    let kind = fields.pop().unwrap_or_default();
    Ok(RawEvent {
        tenant: tenant.to_string(),
        device: device.to_string(),
        ts_ms,
        message_id,
        kind,
        topic,
        content_type,
        payload: Bytes::copy_from_slice(bytes),
    })
}

fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(e.to_string())
}

fn corrupt() -> StoreError {
    StoreError::Storage("corrupt entry in the store".into())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn open(dir: &Path) -> Arc<dyn Store> {
        Arc::new(EmbeddedStore::open(dir).expect("open store"))
    }

    crate::store_conformance_tests!(open);

    #[test]
    fn writers_waiting_on_a_sync_share_the_next_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path()).expect("open store");
        let inner = store.inner.clone();
        // A sync in progress: every writer below commits, takes its ticket and waits.
        let in_progress = inner.syncs.synced.lock().expect("lock");
        let writers: Vec<_> = (0..16)
            .map(|i| {
                let inner = inner.clone();
                std::thread::spawn(move || {
                    inner
                        .records
                        .insert(format!("k{i}"), b"v".to_vec())
                        .expect("insert");
                    inner.sync().expect("sync");
                })
            })
            .collect();
        while inner.syncs.committed.load(Ordering::SeqCst) < 16 {
            std::thread::yield_now();
        }
        drop(in_progress);
        for writer in writers {
            writer.join().expect("writer");
        }
        assert_eq!(
            inner.syncs.performed.load(Ordering::Relaxed),
            1,
            "the first writer's sync covers all sixteen"
        );
        assert_eq!(*inner.syncs.synced.lock().expect("lock"), 16);
        inner.records.insert("k16", b"v".to_vec()).expect("insert");
        inner.sync().expect("sync");
        assert_eq!(inner.syncs.performed.load(Ordering::Relaxed), 2);
    }

    mod rollup_properties {
        use proptest::prelude::*;

        use crate::conformance::{assert_rollups_eq, expected_rollups, merge_points};
        use crate::{Point, RangeQuery, Resolution};

        /// Points over about two days with values of any sign, in any order.
        fn points() -> impl Strategy<Value = Vec<Point>> {
            prop::collection::vec((-3_600_000i64..2 * 86_400_000, -1e6f64..1e6), 1..150).prop_map(
                |samples| {
                    samples
                        .into_iter()
                        .enumerate()
                        .map(|(i, (ts_ms, value))| Point {
                            tenant: "t".into(),
                            device: "d".into(),
                            metric: "m".into(),
                            ts_ms,
                            value,
                            message_id: format!("m{i}"),
                        })
                        .collect()
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]

            /// However points are split into merges, every rollup equals the aggregate of the
            /// points in its bucket.
            #[test]
            fn rollups_equal_aggregates_of_the_merged_points(
                points in points(),
                cuts in prop::collection::vec(0usize..150, 0..6),
            ) {
                let dir = tempfile::tempdir().expect("tempdir");
                let store = super::open(dir.path());
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (points.len() + 1)).collect();
                bounds.extend([0, points.len()]);
                bounds.sort_unstable();
                runtime.block_on(async {
                    for pair in bounds.windows(2) {
                        merge_points(store.as_ref(), &points[pair[0]..pair[1]]).await;
                    }
                    let all = RangeQuery {
                        tenant: "t".into(),
                        device: "d".into(),
                        from_ms: i64::MIN / 2,
                        to_ms: i64::MAX,
                        limit: 100_000,
                        descending: false,
                    };
                    for resolution in Resolution::ALL {
                        let actual = store.rollups(&all, "m", resolution).await.expect("rollups");
                        assert_rollups_eq(&actual, &expected_rollups(&points, resolution));
                    }
                });
            }
        }
    }
}
