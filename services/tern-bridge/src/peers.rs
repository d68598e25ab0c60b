//! Bridge processes as peers. With several bridges, a client's publish on one must reach the
//! subscribers the others hold: each bridge hands its clients' plain publishes (and wills) to
//! [`PeerBridges`], which carries them to the other bridges (over NATS in the `tern` binary),
//! and each delivers what it receives from a peer to its own subscribers. The bridge that
//! received the publish stores a retained message; its peers only remember it.
//!
//! Across bridges delivery is at most once: a peer that is unreachable at that moment misses
//! the message (its subscribers' QoS 1 is kept within a bridge, not across).

use std::sync::Arc;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use tern_core::TenantId;

use crate::Bridge;
use crate::fanout::{platform_properties, route_from_platform};
use crate::retained::{decode_publish, encode_publish};
use crate::router::Message;

/// Carries a publish (in its wire form) to every other bridge process of the tenant's
/// platform. Must not block: a full channel drops the message (counted by the implementation).
pub trait PeerBridges: Send + Sync {
    fn forward(&self, tenant: TenantId, wire: Bytes);
}

/// A plain publish as it goes to the peers.
pub(crate) struct ToPeers<'a> {
    pub topic: &'a str,
    pub payload: &'a Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Option<&'a Arc<PublishProperties>>,
}

/// A message of the platform's own (a rule's republish) in the peers' wire form, for every
/// bridge to deliver as [`Bridge::publish`] would: QoS 1, not retained, JSON, with `user_properties`.
/// `Err` names why `topic` cannot be published to.
pub fn platform_message(
    topic: &str,
    payload: Bytes,
    user_properties: Vec<(String, String)>,
) -> Result<Bytes, String> {
    crate::topics::validate_name(topic).map_err(|e| e.0.to_string())?;
    let properties = Some(platform_properties(user_properties));
    Ok(wire(topic, payload, QoS::AtLeastOnce, false, properties))
}

/// A PUBLISH in the form peers exchange (Tern's record form, as retained messages are kept).
fn wire(
    topic: &str,
    payload: Bytes,
    qos: QoS,
    retain: bool,
    properties: Option<PublishProperties>,
) -> Bytes {
    let publish = Publish {
        dup: false,
        qos,
        retain,
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        pkid: u16::from(qos != QoS::AtMostOnce),
        payload,
        properties,
    };
    encode_publish(publish, None)
}

impl Bridge {
    /// Sets where this bridge's clients' publishes go besides its own subscribers; once,
    /// before serving.
    pub fn set_peers(&self, peers: Arc<dyn PeerBridges>) {
        let _ = self.peers.set(peers);
    }

    pub(crate) fn forward_to_peers(&self, tenant: TenantId, message: ToPeers<'_>) {
        let Some(peers) = self.peers.get() else {
            return;
        };
        let properties = message.properties.map(|p| (**p).clone());
        peers.forward(
            tenant,
            wire(
                message.topic,
                message.payload.clone(),
                message.qos,
                message.retain,
                properties,
            ),
        );
    }

    /// Delivers a publish a peer bridge received to this bridge's subscribers (and remembers
    /// it as retained when flagged). `Err` says why it was not delivered.
    pub async fn deliver_from_peer(&self, tenant: TenantId, wire: Bytes) -> Result<(), String> {
        let (publish, _) = decode_publish(wire).ok_or("not a PUBLISH in Tern's record form")?;
        let topic = std::str::from_utf8(&publish.topic).map_err(|_| "a topic that is not UTF-8")?;
        crate::topics::validate_name(topic).map_err(|e| e.0.to_string())?;
        let properties = publish.properties.map(Arc::new);
        let message = Message {
            topic,
            payload: &publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties: properties.clone(),
            from: None,
        };
        route_from_platform(self, tenant, &message)
            .await
            .map_err(|()| "could not store the message for away persistent sessions")?;
        if publish.retain {
            self.retained
                .remember(tenant, topic, publish.payload, publish.qos, properties);
        }
        Ok(())
    }
}
