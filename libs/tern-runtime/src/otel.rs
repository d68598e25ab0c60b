//! Traces over OpenTelemetry, exported by OTLP/gRPC when `tracing.otlp_endpoint` is set.
//!
//! Only the spans of the message pipeline are exported (names starting with `tern.`): one per
//! device message in the bridge, the event-log append, the analytics ingest and the store write.
//! A message carries its W3C trace context onward (the device may send one as the MQTT 5 user
//! property `traceparent`; the envelope's `trace_context` carries it through the event log), so
//! one message is one trace across the services it passes. With no endpoint, nothing is created.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::registry::LookupSpan;

/// `[tracing]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The OTLP/gRPC collector, `http://host:4317`; empty turns tracing off.
    pub otlp_endpoint: String,
    /// Share of new traces kept, 0.0..=1.0; a message that arrives with a sampled trace context
    /// is always traced.
    pub sampling_ratio: f64,
    /// `service.name` of the exported spans.
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            sampling_ratio: 1.0,
            service_name: "tern".into(),
        }
    }
}

impl TracingConfig {
    /// Names the first setting that cannot work, as (`tracing.<key>`, reason).
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if !self.otlp_endpoint.is_empty() && !self.otlp_endpoint.starts_with("http://") {
            return Err((
                "tracing.otlp_endpoint",
                "must be empty (off) or http://host:port (OTLP/gRPC without TLS)",
            ));
        }
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(("tracing.sampling_ratio", "must be between 0.0 and 1.0"));
        }
        if self.service_name.is_empty() {
            return Err(("tracing.service_name", "must not be empty"));
        }
        Ok(())
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported; the hot paths create pipeline spans only then.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Flushes and stops the exporter when dropped (at the end of `main`).
#[must_use]
pub struct TracingGuard(Option<SdkTracerProvider>);

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("flushing traces failed: {e}");
        }
    }
}

/// The exporting layer, or none when tracing is off. Must run inside the Tokio runtime (the
/// gRPC channel's worker is spawned on it).
pub(crate) fn layer<S>(
    config: &TracingConfig,
) -> Result<(Option<impl Layer<S>>, TracingGuard), String>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    if config.otlp_endpoint.is_empty() {
        return Ok((None, TracingGuard(None)));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&config.otlp_endpoint)
        .build()
        .map_err(|e| format!("`tracing.otlp_endpoint`: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sampling_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tern"))
        .with_filter(filter_fn(|meta| {
            meta.is_span() && meta.name().starts_with("tern.")
        }));
    ENABLED.store(true, Ordering::Relaxed);
    Ok((Some(layer), TracingGuard(Some(provider))))
}

/// The W3C trace context (`traceparent`, `tracestate`) of `span`, for a message to carry on.
pub fn inject(span: &Span) -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier
}

/// Makes `span` continue the trace that `carrier` holds; a missing or malformed context leaves
/// it a new trace.
pub fn set_parent(span: &Span, carrier: &HashMap<String, String>) {
    let parent = TraceContextPropagator::new().extract(carrier);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Records that `span` also covers the message traced by `other` (a batch handled as one).
pub fn link(span: &Span, other: &Span) {
    let context = other.context();
    let other = context.span().span_context().clone();
    if other.is_valid() {
        span.add_link(other);
    }
}
