//! Connection lifecycle events, appended to the `lifecycle` stream of the event log so that
//! availability tracking and audit see every connect, disconnect (with its reason) and will.

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::Bytes;
use serde_json::json;
use tern_core::{DeviceId, TenantId};
use tern_eventlog::Record;
use tern_proto::v1::EventKind;

use tern_eventlog::{LIFECYCLE_TOPIC, device_record as record};

fn lifecycle(tenant: TenantId, device: DeviceId, body: serde_json::Value) -> Record {
    record(
        tenant,
        device,
        EventKind::Lifecycle,
        LIFECYCLE_TOPIC,
        Bytes::from(body.to_string()),
        HashMap::new(),
    )
}

pub(crate) fn connected(
    tenant: TenantId,
    device: DeviceId,
    peer: SocketAddr,
    protocol: &str,
    transport: &str,
) -> Record {
    lifecycle(
        tenant,
        device,
        json!({
            "event": "connected",
            "peer": peer.to_string(),
            "protocol": protocol,
            "transport": transport,
        }),
    )
}

pub(crate) fn disconnected(tenant: TenantId, device: DeviceId, reason: &str) -> Record {
    lifecycle(
        tenant,
        device,
        json!({"event": "disconnected", "reason": reason}),
    )
}

pub(crate) fn will_published(tenant: TenantId, device: DeviceId, topic: &str) -> Record {
    lifecycle(
        tenant,
        device,
        json!({"event": "will_published", "topic": topic}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use tern_proto::v1::Event;

    #[test]
    fn lifecycle_events_are_json_without_metrics() {
        let (t, d) = (TenantId::random(), DeviceId::random());
        let r = disconnected(t, d, "keepalive_expired");
        assert_eq!(r.topic, LIFECYCLE_TOPIC);
        assert_eq!(r.key, format!("{t}/{d}"));
        let e = Event::decode(r.value).expect("decode");
        assert_eq!(e.kind, EventKind::Lifecycle as i32);
        assert!(e.metrics.is_empty());
        let body: serde_json::Value = serde_json::from_slice(&e.payload).expect("json");
        assert_eq!(body["event"], "disconnected");
        assert_eq!(body["reason"], "keepalive_expired");
    }
}
