//! Request ids, access logs and HTTP metrics.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use tern_runtime::MetricsRegistry;
use tern_runtime::metrics::latency_histogram;
use tracing::Instrument;

use crate::Gateway;

const REQUEST_ID: &str = "x-request-id";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    method: String,
    status: u16,
}

#[derive(Clone)]
pub(crate) struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    seconds: Histogram,
}

impl HttpMetrics {
    pub fn register(registry: &MetricsRegistry) -> Self {
        let m = Self {
            requests: Family::default(),
            seconds: latency_histogram(),
        };
        registry.register("tern_gateway", |r| {
            r.register(
                "http_requests",
                "HTTP requests, by method and status",
                m.requests.clone(),
            );
            r.register(
                "http_request_seconds",
                "HTTP request latency",
                m.seconds.clone(),
            );
        });
        m
    }
}

/// Gives every request an id (the caller's `x-request-id` if it sent a sane one), logs it with
/// method, path, status and latency, and returns it in the response.
pub(crate) async fn observe(
    State(gateway): State<Arc<Gateway>>,
    req: Request,
    next: Next,
) -> Response {
    let request_id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let span = tracing::info_span!("http", %method, %path, request_id = %request_id);
    let started = Instant::now();
    let mut response = next.run(req).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    span.in_scope(|| tracing::info!(status, elapsed_ms = elapsed.as_millis() as u64, "request"));
    gateway
        .http_metrics
        .requests
        .get_or_create(&RequestLabels {
            method: method.to_string(),
            status,
        })
        .inc();
    gateway.http_metrics.seconds.observe(elapsed.as_secs_f64());
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}
