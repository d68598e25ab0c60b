//! Serving a store over gRPC.

use std::collections::HashMap;
use std::sync::Arc;

use aws_lc_rs::constant_time::verify_slices_are_equal;
use aws_lc_rs::digest::{SHA256, digest};
use tern_proto::tonic::{Request, Response, Status};
use tern_proto::v1::{self, store_server};
use tracing::Instrument;

use super::{
    FIELD, MAX_MESSAGE_BYTES, event_in, event_out, point_in, point_out, range_in, rollup_in,
    rollup_out,
};
use crate::{RecordSwap, RecordWrite, Resolution, RollupDelta, Store, StoreError, WriteBatch};

/// `tern.v1.Store` over a store this process owns.
pub struct StoreService {
    store: Arc<dyn Store>,
    token_hash: Vec<u8>,
}

/// Refuses calls without the store token.
#[derive(Clone)]
struct TokenCheck(Arc<Vec<u8>>);

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let hash = digest(&SHA256, presented.as_bytes());
        if verify_slices_are_equal(hash.as_ref(), &self.0).is_err() {
            return Err(Status::unauthenticated("a valid store token is required"));
        }
        Ok(req)
    }
}

impl StoreService {
    pub fn new(store: Arc<dyn Store>, token: &str) -> Self {
        Self {
            store,
            token_hash: digest(&SHA256, token.as_bytes()).as_ref().to_vec(),
        }
    }

    /// The service with its token check, as routes to serve (health and reflection can be
    /// added beside it).
    pub fn into_routes(self) -> tonic::service::Routes {
        let check = TokenCheck(Arc::new(self.token_hash.clone()));
        let server = store_server::StoreServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let checked = tonic::service::interceptor::InterceptedService::new(server, check);
        tonic::service::Routes::new(checked)
    }
}

/// A `tern.store.serve` span continuing the caller's trace (W3C trace context in the call's
/// metadata), when traces are exported and the call is traced; else no span.
fn serve_span<T>(req: &Request<T>) -> tracing::Span {
    if !tern_runtime::otel::enabled() {
        return tracing::Span::none();
    }
    let carrier: HashMap<String, String> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|key| {
            let value = req.metadata().get(key)?.to_str().ok()?;
            Some((key.to_string(), value.to_string()))
        })
        .collect();
    if carrier.is_empty() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(parent: None, "tern.store.serve", "tern.service" = "store");
    tern_runtime::otel::set_parent(&span, &carrier);
    span
}

fn status(e: StoreError) -> Status {
    match e {
        StoreError::Invalid { field, reason } => {
            let mut status = Status::invalid_argument(format!("invalid {field}: {reason}"));
            if let Ok(value) = field.parse() {
                status.metadata_mut().insert(FIELD, value);
            }
            status
        }
        StoreError::Storage(reason) => Status::unavailable(reason),
    }
}

fn resolution(text: &str) -> Result<Resolution, Status> {
    Resolution::parse(text).ok_or_else(|| {
        Status::invalid_argument(format!("resolution: 1m, 1h or 1d expected, got {text:?}"))
    })
}

fn count(n: u64) -> Response<v1::StoreCount> {
    Response::new(v1::StoreCount { count: n })
}

#[tonic::async_trait]
impl store_server::Store for StoreService {
    async fn write(
        &self,
        req: Request<v1::StoreWriteRequest>,
    ) -> Result<Response<v1::StoreEmpty>, Status> {
        let span = serve_span(&req);
        let req = req.into_inner();
        let batch = WriteBatch {
            points: req.points.into_iter().map(point_in).collect(),
            events: req.events.into_iter().map(event_in).collect(),
        };
        self.store
            .write(batch)
            .instrument(span)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::StoreEmpty {}))
    }

    async fn points(
        &self,
        req: Request<v1::StorePointsRequest>,
    ) -> Result<Response<v1::StorePoints>, Status> {
        let req = req.into_inner();
        let points = self
            .store
            .points(&range_in(req.range), &req.metric)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::StorePoints {
            points: points.into_iter().map(point_out).collect(),
        }))
    }

    async fn rollups(
        &self,
        req: Request<v1::StoreRollupsRequest>,
    ) -> Result<Response<v1::StoreRollups>, Status> {
        let req = req.into_inner();
        let rollups = self
            .store
            .rollups(
                &range_in(req.range),
                &req.metric,
                resolution(&req.resolution)?,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(v1::StoreRollups {
            rollups: rollups.into_iter().map(rollup_out).collect(),
        }))
    }

    async fn merge_rollups(
        &self,
        req: Request<v1::StoreMergeRollupsRequest>,
    ) -> Result<Response<v1::StoreDone>, Status> {
        let req = req.into_inner();
        let checkpoint = req
            .checkpoint
            .ok_or_else(|| Status::invalid_argument("checkpoint: required"))?;
        let checkpoint = RecordSwap {
            kind: checkpoint.kind,
            key: checkpoint.key,
            expected: checkpoint.expected.map(Into::into),
            new: checkpoint
                .new
                .ok_or_else(|| Status::invalid_argument("checkpoint.new: required"))?
                .into(),
        };
        let deltas = req
            .deltas
            .into_iter()
            .map(|d| {
                Ok(RollupDelta {
                    tenant: d.tenant,
                    device: d.device,
                    metric: d.metric,
                    resolution: resolution(&d.resolution)?,
                    rollup: rollup_in(
                        d.rollup
                            .ok_or_else(|| Status::invalid_argument("deltas.rollup: required"))?,
                    ),
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let done = self
            .store
            .merge_rollups(deltas, checkpoint)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::StoreDone { done }))
    }

    async fn delete_before(
        &self,
        req: Request<v1::StoreDeleteBeforeRequest>,
    ) -> Result<Response<v1::StoreCount>, Status> {
        let req = req.into_inner();
        let resolution = match req.resolution.as_str() {
            "" => None,
            text => Some(resolution(text)?),
        };
        let deleted = self
            .store
            .delete_before(&req.tenant, resolution, req.before_ms)
            .await
            .map_err(status)?;
        Ok(count(deleted))
    }

    async fn series(
        &self,
        req: Request<v1::StoreTenant>,
    ) -> Result<Response<v1::StoreSeries>, Status> {
        let series = self
            .store
            .series(&req.into_inner().tenant)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::StoreSeries {
            series: series
                .into_iter()
                .map(|(device, metric)| v1::store_series::Entry { device, metric })
                .collect(),
        }))
    }

    async fn rebuild_rollups(
        &self,
        req: Request<v1::StoreRebuildRequest>,
    ) -> Result<Response<v1::StoreCount>, Status> {
        let r = req.into_inner();
        let read = self
            .store
            .rebuild_rollups(&r.tenant, &r.device, &r.metric, r.from_ms, r.to_ms)
            .await
            .map_err(status)?;
        Ok(count(read))
    }

    async fn latest(
        &self,
        req: Request<v1::StoreDevice>,
    ) -> Result<Response<v1::StoreLatest>, Status> {
        let r = req.into_inner();
        let values = self
            .store
            .latest(&r.tenant, &r.device)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::StoreLatest {
            values: values
                .into_iter()
                .map(|v| v1::StoreLatestValue {
                    metric: v.metric,
                    ts_ms: v.ts_ms,
                    value: v.value,
                })
                .collect(),
        }))
    }

    async fn events(
        &self,
        req: Request<v1::StoreEventsRequest>,
    ) -> Result<Response<v1::StoreEvents>, Status> {
        let r = req.into_inner();
        let events = self
            .store
            .events(&range_in(r.range), r.kind.as_deref())
            .await
            .map_err(status)?;
        Ok(Response::new(v1::StoreEvents {
            events: events.into_iter().map(event_out).collect(),
        }))
    }

    async fn write_records(
        &self,
        req: Request<v1::StoreWriteRecordsRequest>,
    ) -> Result<Response<v1::StoreEmpty>, Status> {
        let writes = req
            .into_inner()
            .writes
            .into_iter()
            .map(|w| RecordWrite {
                kind: w.kind,
                key: w.key,
                value: w.value.map(Into::into),
            })
            .collect();
        self.store.write_records(writes).await.map_err(status)?;
        Ok(Response::new(v1::StoreEmpty {}))
    }

    async fn get_record(
        &self,
        req: Request<v1::StoreRecordKey>,
    ) -> Result<Response<v1::StoreMaybeValue>, Status> {
        let r = req.into_inner();
        let value = self
            .store
            .get_record(&r.kind, &r.key)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::StoreMaybeValue {
            value: value.map(|v| v.to_vec()),
        }))
    }

    async fn compare_and_swap(
        &self,
        req: Request<v1::StoreCompareAndSwapRequest>,
    ) -> Result<Response<v1::StoreDone>, Status> {
        let r = req.into_inner();
        let done = self
            .store
            .compare_and_swap(
                &r.kind,
                &r.key,
                r.expected.map(Into::into),
                r.new.map(Into::into),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(v1::StoreDone { done }))
    }

    async fn delete_record(
        &self,
        req: Request<v1::StoreRecordKey>,
    ) -> Result<Response<v1::StoreDone>, Status> {
        let r = req.into_inner();
        let done = self
            .store
            .delete_record(&r.kind, &r.key)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::StoreDone { done }))
    }

    async fn list_records(
        &self,
        req: Request<v1::StoreListRecordsRequest>,
    ) -> Result<Response<v1::StoreRecords>, Status> {
        let r = req.into_inner();
        let limit = usize::try_from(r.limit).unwrap_or(usize::MAX);
        let records = self
            .store
            .list_records(&r.kind, &r.prefix, r.after.as_deref(), limit)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::StoreRecords {
            records: records
                .into_iter()
                .map(|(key, value)| v1::StoreRecord {
                    key,
                    value: value.to_vec(),
                })
                .collect(),
        }))
    }
}
