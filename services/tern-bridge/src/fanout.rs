//! Handing publishes to subscribers on behalf of a connection or of the server itself: waiting
//! for room in full queues, storing retained messages, and publishing wills.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, PublishProperties};
use tern_core::{DeviceId, TenantId};
use tern_eventlog::Record;
use tern_proto::v1::EventKind;
use tokio::sync::mpsc;

use crate::Bridge;
use crate::lifecycle;
use crate::persistent::{Away, Enqueued};
use crate::retained::RetainOutcome;
use crate::router::{Delivery, Message};
use tern_eventlog::{EVENT_TOPIC, TELEMETRY_TOPIC, device_record as record};

/// How long a publisher waits for room in a full subscriber queue before that delivery is
/// dropped: long enough to ride out bursts, short enough that a stuck subscriber cannot stall
/// publishers indefinitely.
const DELIVERY_WAIT: Duration = Duration::from_secs(5);

/// Waits for room in full subscriber queues (a publisher's back pressure), for at most
/// `DELIVERY_WAIT` each; a subscriber stuck that long loses the delivery, counted. A full
/// queue of the publishing connection itself cannot drain while it waits, so that delivery is
/// dropped at once.
pub(crate) async fn hand_over(
    bridge: &Bridge,
    waiting: Vec<(mpsc::Sender<Delivery>, Delivery)>,
    own: Option<&mpsc::Sender<Delivery>>,
) {
    let metrics = &bridge.metrics;
    for (queue, delivery) in waiting {
        if own.is_some_and(|own| queue.same_channel(own)) {
            metrics.deliveries_dropped.inc();
            continue;
        }
        let counter = match queue.send_timeout(delivery, DELIVERY_WAIT).await {
            Ok(()) => &metrics.deliveries,
            Err(_) => &metrics.deliveries_dropped,
        };
        counter.inc();
    }
}

/// Stores deliveries for persistent sessions whose clients are away; `Err` means the store
/// failed and the publish must not be acknowledged.
pub(crate) async fn store_for_away(
    bridge: &Bridge,
    away: Vec<(Arc<Away>, Delivery)>,
) -> Result<(), ()> {
    if away.is_empty() {
        return Ok(());
    }
    let Enqueued {
        stored,
        handed_over,
        dropped,
    } = bridge.persistent.enqueue(away).await.map_err(|e| {
        tracing::error!(error = %e, "cannot store a message for away sessions");
    })?;
    let metrics = &bridge.metrics;
    metrics.session_messages_stored.inc_by(stored);
    metrics.deliveries.inc_by(handed_over);
    metrics.deliveries_dropped.inc_by(dropped);
    Ok(())
}

/// A publish to keep as its topic's retained message.
pub(crate) struct ToRetain {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub properties: Option<Arc<PublishProperties>>,
}

/// Sets or clears (empty payload, 3.3.1-10) a retained message. A tenant at its retained quota
/// keeps its old messages and the publish is only delivered; `Err` means the store failed and
/// the publish must not be acknowledged.
pub(crate) async fn retain_message(
    bridge: &Bridge,
    tenant: TenantId,
    message: ToRetain,
) -> Result<(), ()> {
    let ToRetain {
        topic,
        payload,
        qos,
        properties,
    } = message;
    let topic = topic.as_str();
    match bridge
        .retained
        .set(tenant, topic, payload, qos, properties)
        .await
    {
        Ok(RetainOutcome::Stored | RetainOutcome::Cleared) => Ok(()),
        Ok(RetainOutcome::QuotaExceeded) => {
            bridge.metrics.retained_refused.inc();
            tracing::info!(
                topic,
                limit = bridge.config.max_retained_per_tenant,
                "retained message quota reached; delivered but not retained"
            );
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, topic, "cannot store a retained message");
            Err(())
        }
    }
}

/// Publishes a message of the platform's own (a rule's republish) to a tenant's subscribers at
/// QoS 1, not retained, with MQTT 5 user properties. `Err` names why it was refused or could
/// not be kept for away sessions.
pub(crate) async fn publish_from_platform(
    bridge: &Bridge,
    tenant: TenantId,
    topic: &str,
    payload: Bytes,
    user_properties: Vec<(String, String)>,
) -> Result<(), String> {
    crate::topics::validate_name(topic).map_err(|e| e.0.to_string())?;
    let properties = Arc::new(platform_properties(user_properties));
    let message = Message {
        topic,
        payload: &payload,
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Some(properties),
        from: None,
    };
    route_from_platform(bridge, tenant, &message)
        .await
        .map_err(|()| "could not store the message for away persistent sessions".to_string())
}

/// The properties of the platform's own messages: JSON, with the caller's user properties.
pub(crate) fn platform_properties(user_properties: Vec<(String, String)>) -> PublishProperties {
    PublishProperties {
        content_type: Some("application/json".into()),
        user_properties,
        ..PublishProperties::default()
    }
}

/// Routes a message the platform publishes itself (no publishing connection): counts the
/// deliveries, waits for room in full queues, and stores what away sessions must keep.
pub(crate) async fn route_from_platform(
    bridge: &Bridge,
    tenant: TenantId,
    message: &Message<'_>,
) -> Result<(), ()> {
    let routed = bridge.router.route(tenant, message);
    bridge.metrics.deliveries.inc_by(routed.delivered as u64);
    bridge
        .metrics
        .deliveries_dropped
        .inc_by(routed.dropped as u64);
    hand_over(bridge, routed.waiting, None).await;
    store_for_away(bridge, routed.away).await
}

/// Publishes a will as if the device had sent it: `telemetry`/`event` wills go to the event log,
/// others to the tenant's subscribers (and the retained store when flagged). Returns the records
/// to append, the lifecycle event first.
pub(crate) async fn publish_will(
    bridge: &Bridge,
    tenant: TenantId,
    device: DeviceId,
    will: LastWill,
) -> Vec<Record> {
    let topic = String::from_utf8_lossy(&will.topic).into_owned();
    let mut records = vec![lifecycle::will_published(tenant, device, &topic)];
    match topic.as_str() {
        TELEMETRY_TOPIC => records.push(record(
            tenant,
            device,
            EventKind::Telemetry,
            TELEMETRY_TOPIC,
            will.message,
            HashMap::new(),
        )),
        EVENT_TOPIC => records.push(record(
            tenant,
            device,
            EventKind::Event,
            EVENT_TOPIC,
            will.message,
            HashMap::new(),
        )),
        topic => {
            // MQTT 5 will properties travel with the will like a publish's (3.1.3.2).
            let properties = will.properties.map(|p| {
                Arc::new(PublishProperties {
                    payload_format_indicator: p.payload_format_indicator,
                    message_expiry_interval: p.message_expiry_interval,
                    response_topic: p.response_topic,
                    correlation_data: p.correlation_data,
                    user_properties: p.user_properties,
                    content_type: p.content_type,
                    ..PublishProperties::default()
                })
            });
            let message = Message {
                topic,
                payload: &will.message,
                qos: will.qos,
                retain: will.retain,
                properties: properties.clone(),
                from: None,
            };
            let _ = route_from_platform(bridge, tenant, &message).await;
            bridge.forward_to_peers(
                tenant,
                crate::peers::ToPeers {
                    topic,
                    payload: &will.message,
                    qos: will.qos,
                    retain: will.retain,
                    properties: properties.as_ref(),
                },
            );
            if will.retain {
                let will = ToRetain {
                    topic: topic.to_string(),
                    payload: will.message,
                    qos: will.qos,
                    properties,
                };
                let _ = retain_message(bridge, tenant, will).await;
            }
        }
    }
    tracing::info!(%topic, "will published");
    records
}
