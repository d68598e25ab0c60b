use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tern_runtime::MetricsRegistry;
use tern_runtime::metrics::latency_histogram;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StreamLabel {
    pub stream: String,
}

#[derive(Clone)]
pub(crate) struct IngestMetrics {
    pub records: Family<StreamLabel, Counter>,
    pub points: Counter,
    pub events: Counter,
    pub skipped: Family<StreamLabel, Counter>,
    pub store_write_seconds: Histogram,
    pub lag: Family<StreamLabel, Gauge>,
}

impl IngestMetrics {
    pub fn register(registry: &MetricsRegistry) -> Self {
        let m = Self {
            records: Family::default(),
            points: Counter::default(),
            events: Counter::default(),
            skipped: Family::default(),
            store_write_seconds: latency_histogram(),
            lag: Family::default(),
        };
        registry.register("tern_analytics", |r| {
            r.register(
                "records",
                "Event-log records consumed, by stream",
                m.records.clone(),
            );
            r.register(
                "points_written",
                "Time-series points written",
                m.points.clone(),
            );
            r.register("events_written", "Raw events written", m.events.clone());
            r.register(
                "records_skipped",
                "Records that could not be decoded or stored, by stream",
                m.skipped.clone(),
            );
            r.register(
                "store_write_seconds",
                "Latency of durable store writes",
                m.store_write_seconds.clone(),
            );
            r.register(
                "consumer_lag",
                "Records appended but not yet ingested, by stream",
                m.lag.clone(),
            );
        });
        m
    }
}
