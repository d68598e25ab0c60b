//! The bridge's part of a device message's trace (docs/operations.md, "Traces"): a
//! `tern.publish` span from the PUBLISH to its acknowledgement, continuing the trace the device
//! sent as the MQTT 5 user properties `traceparent`/`tracestate`, and a `tern.eventlog.append`
//! span for the batch append that makes it durable. Created only while traces are exported.

use std::collections::HashMap;

use rumqttc::v5::mqttbytes::v5::Publish;
use tern_core::{DeviceId, TenantId};
use tern_runtime::otel;
use tracing::Span;

/// The span of one device message, if traces are exported.
pub(crate) fn publish_span(
    publish: &Publish,
    tenant: TenantId,
    device: DeviceId,
    topic: &str,
) -> Option<Span> {
    if !otel::enabled() {
        return None;
    }
    // No parent: the connection's own span lives as long as the connection; each message is a
    // trace of its own (or of the device's).
    let span = tracing::info_span!(parent: None, "tern.publish",
        "tern.service" = "bridge", "messaging.system" = "mqtt",
        "messaging.destination.name" = topic, tenant = %tenant, device = %device);
    let carried: HashMap<String, String> = publish
        .properties
        .iter()
        .flat_map(|p| p.user_properties.iter())
        .filter(|(key, _)| key == "traceparent" || key == "tracestate")
        .cloned()
        .collect();
    otel::set_parent(&span, &carried);
    Some(span)
}

/// The span of appending a batch: a child of its first traced message, linked to the others.
pub(crate) fn append_span(messages: &[Span], records: usize) -> Option<Span> {
    let (first, others) = messages.split_first()?;
    let span = tracing::info_span!(parent: first, "tern.eventlog.append",
        "tern.service" = "eventlog", records);
    for other in others {
        otel::link(&span, other);
    }
    Some(span)
}
