//! The store over gRPC (`tern.v1.Store`): [`StoreService`] serves a store that one process
//! owns, [`RemoteStore`] is a [`Store`](crate::Store) for the other processes. The remote
//! store passes the same conformance suite as the embedded one. Calls carry a shared secret
//! (`authorization: Bearer`), compared in constant time by its SHA-256.

mod client;
mod server;

pub use client::{RemoteStore, StoreTls};
pub use server::StoreService;

use tern_proto::v1;

use crate::{Point, RangeQuery, RawEvent, Rollup};

/// The metadata key that names the field of an `INVALID_ARGUMENT`.
const FIELD: &str = "tern-field";
/// Largest message either way: a page of records or a batch of points.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

fn point_out(p: Point) -> v1::StorePoint {
    v1::StorePoint {
        tenant: p.tenant,
        device: p.device,
        metric: p.metric,
        ts_ms: p.ts_ms,
        value: p.value,
        message_id: p.message_id,
    }
}

fn point_in(p: v1::StorePoint) -> Point {
    Point {
        tenant: p.tenant,
        device: p.device,
        metric: p.metric,
        ts_ms: p.ts_ms,
        value: p.value,
        message_id: p.message_id,
    }
}

fn event_out(e: RawEvent) -> v1::StoreEvent {
    v1::StoreEvent {
        tenant: e.tenant,
        device: e.device,
        ts_ms: e.ts_ms,
        message_id: e.message_id,
        kind: e.kind,
        topic: e.topic,
        content_type: e.content_type,
        payload: e.payload.to_vec(),
    }
}

fn event_in(e: v1::StoreEvent) -> RawEvent {
    RawEvent {
        tenant: e.tenant,
        device: e.device,
        ts_ms: e.ts_ms,
        message_id: e.message_id,
        kind: e.kind,
        topic: e.topic,
        content_type: e.content_type,
        payload: e.payload.into(),
    }
}

fn range_out(q: &RangeQuery) -> v1::StoreRange {
    v1::StoreRange {
        tenant: q.tenant.clone(),
        device: q.device.clone(),
        from_ms: q.from_ms,
        to_ms: q.to_ms,
        limit: q.limit as u64,
        descending: q.descending,
    }
}

fn range_in(q: Option<v1::StoreRange>) -> RangeQuery {
    let q = q.unwrap_or_default();
    RangeQuery {
        tenant: q.tenant,
        device: q.device,
        from_ms: q.from_ms,
        to_ms: q.to_ms,
        limit: usize::try_from(q.limit).unwrap_or(usize::MAX),
        descending: q.descending,
    }
}

fn rollup_out(r: Rollup) -> v1::StoreRollup {
    v1::StoreRollup {
        start_ms: r.start_ms,
        count: r.count,
        sum: r.sum,
        min: r.min,
        max: r.max,
    }
}

fn rollup_in(r: v1::StoreRollup) -> Rollup {
    Rollup {
        start_ms: r.start_ms,
        count: r.count,
        sum: r.sum,
        min: r.min,
        max: r.max,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex, OnceLock};

    use super::*;
    use crate::{EmbeddedStore, Store, StoreError};

    const TOKEN: &str = "a store token for the tests";

    /// The server of a directory, started on first use and kept for reopens: a reopen is a new
    /// client of the same server (the embedded store's own suite covers its durability).
    fn serve(dir: &Path) -> SocketAddr {
        static SERVERS: OnceLock<Mutex<HashMap<PathBuf, SocketAddr>>> = OnceLock::new();
        let mut servers = SERVERS
            .get_or_init(Default::default)
            .lock()
            .expect("servers");
        *servers.entry(dir.to_path_buf()).or_insert_with(|| {
            let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir).expect("open store"));
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let address = listener.local_addr().expect("address");
            listener.set_nonblocking(true).expect("nonblocking");
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let router = StoreService::new(store, TOKEN)
                .into_routes()
                .into_axum_router();
            tokio::spawn(async move { axum::serve(listener, router).await });
            address
        })
    }

    fn open(dir: &Path) -> Arc<dyn Store> {
        let url = format!("http://{}", serve(dir));
        Arc::new(RemoteStore::connect(&url, TOKEN).expect("client"))
    }

    crate::store_conformance_tests!(open);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_token_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("http://{}", serve(dir.path()));
        let stranger = RemoteStore::connect(&url, "not the token").expect("client");
        let err = stranger.get_record("k", "a").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Storage(m) if m.contains("token")),
            "{err}"
        );
    }
}
