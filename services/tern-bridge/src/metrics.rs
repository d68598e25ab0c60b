use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tern_runtime::MetricsRegistry;
use tern_runtime::metrics::latency_histogram;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub reason: &'static str,
}

/// Bridge metrics; labels are bounded (no tenant or device ids, which are unbounded).
#[derive(Clone)]
pub(crate) struct BridgeMetrics {
    pub connections: Gauge,
    pub connections_total: Counter,
    pub refused_connections: Counter,
    pub tls_failures: Counter,
    pub rate_limited: Counter,
    pub connect_failures: Family<ReasonLabel, Counter>,
    pub closed_on_error: Family<ReasonLabel, Counter>,
    pub messages_in: Family<KindLabel, Counter>,
    /// `messages_in` by kind, resolved once: a label lookup per message costs a hash and a
    /// lock on the hot path.
    pub telemetry_in: Counter,
    pub events_in: Counter,
    pub pubsub_in: Counter,
    pub command_responses_in: Counter,
    pub bytes_in: Counter,
    pub packets_out: Counter,
    pub deliveries: Counter,
    pub deliveries_dropped: Counter,
    pub retained_refused: Counter,
    pub append_seconds: Histogram,
    pub sessions_away: Gauge,
    pub session_messages_stored: Counter,
    pub coap_requests: Counter,
    pub coap_duplicates: Counter,
    pub coap_malformed: Counter,
    pub coap_refused: Counter,
    pub coap_observers: Gauge,
}

impl BridgeMetrics {
    pub fn register(registry: &MetricsRegistry) -> Self {
        let messages_in: Family<KindLabel, Counter> = Family::default();
        let kind = |kind| messages_in.get_or_create(&KindLabel { kind }).clone();
        let (telemetry_in, events_in, pubsub_in, command_responses_in) = (
            kind("telemetry"),
            kind("event"),
            kind("pubsub"),
            kind("command_response"),
        );
        let m = Self {
            connections: Gauge::default(),
            connections_total: Counter::default(),
            refused_connections: Counter::default(),
            tls_failures: Counter::default(),
            rate_limited: Counter::default(),
            connect_failures: Family::default(),
            closed_on_error: Family::default(),
            messages_in,
            telemetry_in,
            events_in,
            pubsub_in,
            command_responses_in,
            bytes_in: Counter::default(),
            packets_out: Counter::default(),
            deliveries: Counter::default(),
            deliveries_dropped: Counter::default(),
            retained_refused: Counter::default(),
            append_seconds: latency_histogram(),
            sessions_away: Gauge::default(),
            session_messages_stored: Counter::default(),
            coap_requests: Counter::default(),
            coap_duplicates: Counter::default(),
            coap_malformed: Counter::default(),
            coap_refused: Counter::default(),
            coap_observers: Gauge::default(),
        };
        registry.register("tern_bridge", |r| {
            r.register(
                "connections",
                "Open MQTT connections",
                m.connections.clone(),
            );
            r.register(
                "connections_accepted",
                "MQTT connections authenticated",
                m.connections_total.clone(),
            );
            r.register(
                "connections_refused",
                "Connections refused at the connection limit",
                m.refused_connections.clone(),
            );
            r.register(
                "rate_limited",
                "Times a device over mqtt.max_publish_rate_per_device was paused",
                m.rate_limited.clone(),
            );
            r.register(
                "tls_handshake_failures",
                "TLS handshakes that failed or timed out",
                m.tls_failures.clone(),
            );
            r.register(
                "connect_failures",
                "CONNECT attempts refused, by reason",
                m.connect_failures.clone(),
            );
            r.register(
                "closed_on_error",
                "Connections closed for a protocol or client error",
                m.closed_on_error.clone(),
            );
            r.register(
                "messages_in",
                "Device messages accepted, by kind",
                m.messages_in.clone(),
            );
            r.register("bytes_in", "Payload bytes accepted", m.bytes_in.clone());
            r.register("packets_out", "MQTT packets sent", m.packets_out.clone());
            r.register(
                "deliveries",
                "Publishes queued for subscribers",
                m.deliveries.clone(),
            );
            r.register(
                "deliveries_dropped",
                "Deliveries dropped: a subscriber's queue stayed full, or QoS 0 to an away session",
                m.deliveries_dropped.clone(),
            );
            r.register(
                "retained_refused",
                "Retained publishes not retained because the tenant's quota was reached",
                m.retained_refused.clone(),
            );
            r.register(
                "sessions_away",
                "Persistent sessions whose clients are away",
                m.sessions_away.clone(),
            );
            r.register(
                "session_messages_stored",
                "QoS 1 and 2 messages stored for away persistent sessions",
                m.session_messages_stored.clone(),
            );
            r.register(
                "coap_requests",
                "CoAP requests handled",
                m.coap_requests.clone(),
            );
            r.register(
                "coap_duplicates",
                "CoAP retransmissions answered from the exchange cache",
                m.coap_duplicates.clone(),
            );
            r.register(
                "coap_malformed",
                "CoAP datagrams that could not be parsed",
                m.coap_malformed.clone(),
            );
            r.register(
                "coap_refused",
                "CoAP requests refused with 5.03 because the endpoint was overloaded",
                m.coap_refused.clone(),
            );
            r.register(
                "coap_observers",
                "Devices observing their commands over CoAP",
                m.coap_observers.clone(),
            );
            r.register(
                "log_append_seconds",
                "Time from receipt to durable in the event log",
                m.append_seconds.clone(),
            );
        });
        m
    }
}
