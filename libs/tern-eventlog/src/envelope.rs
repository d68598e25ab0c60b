//! Turning an accepted device message into the event-log envelope (`tern.v1.Event`), the same
//! way for every way in (MQTT, HTTP).

use std::collections::HashMap;

use bytes::Bytes;
use prost::Message;
use tern_core::{DeviceId, TenantId, decode_telemetry, now_ms};
use tern_proto::v1::{Event, EventKind, Metric};

use crate::Record;

/// Event-log topic of numeric and other telemetry.
pub const TELEMETRY_TOPIC: &str = "telemetry";
/// Event-log topic of discrete device events.
pub const EVENT_TOPIC: &str = "event";
/// Event-log topic of connection lifecycle events, produced by the bridge itself.
pub const LIFECYCLE_TOPIC: &str = "lifecycle";

/// Builds the log record: keyed by tenant/device so each device's messages stay in order.
/// `trace_context` is the W3C trace context of the message's trace, if it is traced.
pub fn device_record(
    tenant: TenantId,
    device: DeviceId,
    kind: EventKind,
    topic: &str,
    payload: Bytes,
    trace_context: HashMap<String, String>,
) -> Record {
    let decoded = decode_telemetry(&payload);
    let content_type =
        if decoded.is_some() || serde_json::from_slice::<serde::de::IgnoredAny>(&payload).is_ok() {
            "application/json"
        } else {
            "application/octet-stream"
        };
    let (device_time_ms, metrics) = match decoded {
        Some(t) => (
            t.device_time_ms.unwrap_or(0),
            t.metrics
                .into_iter()
                .map(|(name, value)| Metric { name, value })
                .collect(),
        ),
        None => (0, Vec::new()),
    };
    let event = Event {
        tenant_id: tenant.to_string(),
        device_id: device.to_string(),
        kind: kind as i32,
        // Time-ordered: a device's messages stored with the same millisecond keep the order
        // they arrived in (points are keyed by timestamp, then message id).
        message_id: uuid::Uuid::now_v7().to_string(),
        device_time_ms,
        ingest_time_ms: now_ms(),
        content_type: content_type.to_string(),
        payload: payload.to_vec(),
        metrics,
        trace_context,
        topic: topic.to_string(),
    };
    let log_topic = match kind {
        EventKind::Event => EVENT_TOPIC,
        EventKind::Lifecycle => LIFECYCLE_TOPIC,
        _ => TELEMETRY_TOPIC,
    };
    let headers = event
        .trace_context
        .iter()
        .map(|(name, value)| (name.clone(), Bytes::from(value.clone())))
        .collect();
    Record {
        headers,
        ..Record::new(
            log_topic,
            format!("{tenant}/{device}"),
            event.encode_to_vec(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_telemetry_is_decoded_into_the_envelope() {
        let (t, d) = (TenantId::random(), DeviceId::random());
        let r = device_record(
            t,
            d,
            EventKind::Telemetry,
            "telemetry",
            Bytes::from_static(br#"{"temp":21.5,"ts":5}"#),
            HashMap::new(),
        );
        assert_eq!(r.topic, "telemetry");
        assert_eq!(r.key, Bytes::from(format!("{t}/{d}")));
        let e = Event::decode(r.value).expect("decode");
        assert_eq!(e.content_type, "application/json");
        assert_eq!(e.device_time_ms, 5);
        assert_eq!(
            e.metrics,
            vec![Metric {
                name: "temp".into(),
                value: 21.5
            }]
        );
        assert_eq!(e.tenant_id, t.to_string());
        assert!(uuid::Uuid::parse_str(&e.message_id).is_ok());
    }

    #[test]
    fn message_ids_follow_arrival_order_within_a_millisecond() {
        let (t, d) = (TenantId::random(), DeviceId::random());
        let ids: Vec<String> = (0..1000)
            .map(|_| {
                let r = device_record(
                    t,
                    d,
                    EventKind::Telemetry,
                    "telemetry",
                    Bytes::from_static(b"{}"),
                    HashMap::new(),
                );
                Event::decode(r.value).expect("decode").message_id
            })
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    }

    #[test]
    fn a_traced_message_carries_its_context_in_the_envelope_and_the_headers() {
        let (t, d) = (TenantId::random(), DeviceId::random());
        let context = HashMap::from([(
            "traceparent".to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(),
        )]);
        let r = device_record(
            t,
            d,
            EventKind::Telemetry,
            "telemetry",
            Bytes::from_static(b"{}"),
            context.clone(),
        );
        assert_eq!(
            r.headers,
            [(
                "traceparent".to_string(),
                Bytes::from(context["traceparent"].clone())
            )]
        );
        assert_eq!(
            Event::decode(r.value).expect("decode").trace_context,
            context
        );
    }

    #[test]
    fn other_payloads_are_kept_raw() {
        let (t, d) = (TenantId::random(), DeviceId::random());
        let r = device_record(
            t,
            d,
            EventKind::Event,
            "event",
            Bytes::from_static(b"\x01\x02door open"),
            HashMap::new(),
        );
        assert_eq!(r.topic, "event");
        let e = Event::decode(r.value).expect("decode");
        assert_eq!(e.content_type, "application/octet-stream");
        assert!(e.metrics.is_empty());
        assert_eq!(e.payload, b"\x01\x02door open");
    }
}
