//! A [`Store`] served by another process (`tern store`).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tern_proto::tonic::metadata::{MetadataKey, MetadataValue};
use tern_proto::tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tern_proto::tonic::{Code, Request, Status};
use tern_proto::v1::{self, store_client::StoreClient};

use super::{
    FIELD, MAX_MESSAGE_BYTES, event_in, event_out, point_in, point_out, range_out, rollup_in,
    rollup_out,
};
use crate::{
    LatestValue, Point, RangeQuery, RawEvent, RecordSwap, RecordWrite, Resolution, Rollup,
    RollupDelta, Store, StoreError, WriteBatch,
};

/// Longest a call may take: a store call that hangs longer is failed rather than waited on.
const DEADLINE: Duration = Duration::from_secs(30);
/// The fields a served store names in its errors (`StoreError::Invalid` wants them static).
const FIELDS: [&str; 7] = [
    "tenant",
    "device",
    "metric",
    "message_id",
    "kind",
    "key",
    "value",
];

#[derive(Clone)]
pub struct RemoteStore {
    client: StoreClient<Channel>,
    authorization: MetadataValue<tonic::metadata::Ascii>,
}

/// TLS to a served store: the CA that signed its certificate, and this process's own
/// certificate and key (PEM) when the store asks for one (mutual TLS).
#[derive(Clone, Default)]
pub struct StoreTls {
    pub ca_pem: Vec<u8>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl RemoteStore {
    /// A store at `url` (`http://host:port`), called with `token`. Connects on first use and
    /// reconnects after failures.
    pub fn connect(url: &str, token: &str) -> Result<Self, StoreError> {
        Self::connect_with_tls(url, token, None)
    }

    /// As [`RemoteStore::connect`], over TLS when `tls` is given (`url` is then `https://`;
    /// the store's certificate must name the URL's host).
    pub fn connect_with_tls(
        url: &str,
        token: &str,
        tls: Option<StoreTls>,
    ) -> Result<Self, StoreError> {
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| StoreError::Storage(format!("store url {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .timeout(DEADLINE);
        if let Some(tls) = tls {
            let mut config =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(tls.ca_pem));
            if let Some((cert, key)) = tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| StoreError::Storage(format!("store TLS: {e}")))?;
        }
        let authorization = format!("Bearer {token}")
            .parse()
            .map_err(|_| StoreError::Storage("the store token is not valid ASCII".into()))?;
        let client = StoreClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            client,
            authorization,
        })
    }

    /// A call with the token, the deadline and, when traces are exported, the W3C trace
    /// context of the current span, so the served store's span joins the caller's trace.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert("authorization", self.authorization.clone());
        if tern_runtime::otel::enabled() {
            for (key, value) in tern_runtime::otel::inject(&tracing::Span::current()) {
                if let (Ok(key), Ok(value)) = (
                    MetadataKey::from_bytes(key.as_bytes()),
                    MetadataValue::try_from(value.as_str()),
                ) {
                    metadata.insert(key, value);
                }
            }
        }
        request.set_timeout(DEADLINE);
        request
    }

    fn client(&self) -> StoreClient<Channel> {
        self.client.clone()
    }
}

fn error(status: Status) -> StoreError {
    if status.code() == Code::InvalidArgument {
        let named = status
            .metadata()
            .get(FIELD)
            .and_then(|v| v.to_str().ok())
            .and_then(|name| FIELDS.into_iter().find(|f| *f == name));
        if let Some(field) = named {
            let reason = status
                .message()
                .split_once(": ")
                .map_or(status.message(), |(_, r)| r);
            return StoreError::Invalid {
                field,
                reason: reason.to_string(),
            };
        }
    }
    StoreError::Storage(format!(
        "the store service answered {:?}: {}",
        status.code(),
        status.message()
    ))
}

#[async_trait]
impl Store for RemoteStore {
    async fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let message = v1::StoreWriteRequest {
            points: batch.points.into_iter().map(point_out).collect(),
            events: batch.events.into_iter().map(event_out).collect(),
        };
        self.client()
            .write(self.request(message))
            .await
            .map_err(error)?;
        Ok(())
    }

    async fn points(&self, query: &RangeQuery, metric: &str) -> Result<Vec<Point>, StoreError> {
        let message = v1::StorePointsRequest {
            range: Some(range_out(query)),
            metric: metric.to_string(),
        };
        let points = self
            .client()
            .points(self.request(message))
            .await
            .map_err(error)?;
        Ok(points
            .into_inner()
            .points
            .into_iter()
            .map(point_in)
            .collect())
    }

    async fn rollups(
        &self,
        query: &RangeQuery,
        metric: &str,
        resolution: Resolution,
    ) -> Result<Vec<Rollup>, StoreError> {
        let message = v1::StoreRollupsRequest {
            range: Some(range_out(query)),
            metric: metric.to_string(),
            resolution: resolution.as_str().to_string(),
        };
        let rollups = self
            .client()
            .rollups(self.request(message))
            .await
            .map_err(error)?;
        Ok(rollups
            .into_inner()
            .rollups
            .into_iter()
            .map(rollup_in)
            .collect())
    }

    async fn merge_rollups(
        &self,
        deltas: Vec<RollupDelta>,
        checkpoint: RecordSwap,
    ) -> Result<bool, StoreError> {
        let message = v1::StoreMergeRollupsRequest {
            deltas: deltas
                .into_iter()
                .map(|d| v1::store_merge_rollups_request::Delta {
                    tenant: d.tenant,
                    device: d.device,
                    metric: d.metric,
                    resolution: d.resolution.as_str().to_string(),
                    rollup: Some(rollup_out(d.rollup)),
                })
                .collect(),
            checkpoint: Some(v1::StoreCompareAndSwapRequest {
                kind: checkpoint.kind,
                key: checkpoint.key,
                expected: checkpoint.expected.map(|b| b.to_vec()),
                new: Some(checkpoint.new.to_vec()),
            }),
        };
        let done = self
            .client()
            .merge_rollups(self.request(message))
            .await
            .map_err(error)?;
        Ok(done.into_inner().done)
    }

    async fn delete_before(
        &self,
        tenant: &str,
        resolution: Option<Resolution>,
        before_ms: i64,
    ) -> Result<u64, StoreError> {
        let message = v1::StoreDeleteBeforeRequest {
            tenant: tenant.to_string(),
            resolution: resolution.map_or("", Resolution::as_str).to_string(),
            before_ms,
        };
        let deleted = self
            .client()
            .delete_before(self.request(message))
            .await
            .map_err(error)?;
        Ok(deleted.into_inner().count)
    }

    async fn series(&self, tenant: &str) -> Result<Vec<(String, String)>, StoreError> {
        let message = v1::StoreTenant {
            tenant: tenant.to_string(),
        };
        let series = self
            .client()
            .series(self.request(message))
            .await
            .map_err(error)?;
        Ok(series
            .into_inner()
            .series
            .into_iter()
            .map(|s| (s.device, s.metric))
            .collect())
    }

    async fn rebuild_rollups(
        &self,
        tenant: &str,
        device: &str,
        metric: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<u64, StoreError> {
        let message = v1::StoreRebuildRequest {
            tenant: tenant.to_string(),
            device: device.to_string(),
            metric: metric.to_string(),
            from_ms,
            to_ms,
        };
        let read = self
            .client()
            .rebuild_rollups(self.request(message))
            .await
            .map_err(error)?;
        Ok(read.into_inner().count)
    }

    async fn latest(&self, tenant: &str, device: &str) -> Result<Vec<LatestValue>, StoreError> {
        let message = v1::StoreDevice {
            tenant: tenant.to_string(),
            device: device.to_string(),
        };
        let latest = self
            .client()
            .latest(self.request(message))
            .await
            .map_err(error)?;
        Ok(latest
            .into_inner()
            .values
            .into_iter()
            .map(|v| LatestValue {
                metric: v.metric,
                ts_ms: v.ts_ms,
                value: v.value,
            })
            .collect())
    }

    async fn events(
        &self,
        query: &RangeQuery,
        kind: Option<&str>,
    ) -> Result<Vec<RawEvent>, StoreError> {
        let message = v1::StoreEventsRequest {
            range: Some(range_out(query)),
            kind: kind.map(str::to_string),
        };
        let events = self
            .client()
            .events(self.request(message))
            .await
            .map_err(error)?;
        Ok(events
            .into_inner()
            .events
            .into_iter()
            .map(event_in)
            .collect())
    }

    async fn write_records(&self, writes: Vec<RecordWrite>) -> Result<(), StoreError> {
        let message = v1::StoreWriteRecordsRequest {
            writes: writes
                .into_iter()
                .map(|w| v1::StoreRecordWrite {
                    kind: w.kind,
                    key: w.key,
                    value: w.value.map(|v| v.to_vec()),
                })
                .collect(),
        };
        self.client()
            .write_records(self.request(message))
            .await
            .map_err(error)?;
        Ok(())
    }

    async fn get_record(&self, kind: &str, key: &str) -> Result<Option<Bytes>, StoreError> {
        let message = v1::StoreRecordKey {
            kind: kind.to_string(),
            key: key.to_string(),
        };
        let value = self
            .client()
            .get_record(self.request(message))
            .await
            .map_err(error)?;
        Ok(value.into_inner().value.map(Bytes::from))
    }

    async fn compare_and_swap(
        &self,
        kind: &str,
        key: &str,
        expected: Option<Bytes>,
        new: Option<Bytes>,
    ) -> Result<bool, StoreError> {
        let message = v1::StoreCompareAndSwapRequest {
            kind: kind.to_string(),
            key: key.to_string(),
            expected: expected.map(|b| b.to_vec()),
            new: new.map(|b| b.to_vec()),
        };
        let done = self
            .client()
            .compare_and_swap(self.request(message))
            .await
            .map_err(error)?;
        Ok(done.into_inner().done)
    }

    async fn delete_record(&self, kind: &str, key: &str) -> Result<bool, StoreError> {
        let message = v1::StoreRecordKey {
            kind: kind.to_string(),
            key: key.to_string(),
        };
        let done = self
            .client()
            .delete_record(self.request(message))
            .await
            .map_err(error)?;
        Ok(done.into_inner().done)
    }

    async fn list_records(
        &self,
        kind: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Bytes)>, StoreError> {
        let message = v1::StoreListRecordsRequest {
            kind: kind.to_string(),
            prefix: prefix.to_string(),
            after: after.map(str::to_string),
            limit: limit as u64,
        };
        let records = self
            .client()
            .list_records(self.request(message))
            .await
            .map_err(error)?;
        Ok(records
            .into_inner()
            .records
            .into_iter()
            .map(|r| (r.key, Bytes::from(r.value)))
            .collect())
    }
}
