//! Retained messages (MQTT 3.1.1 section 3.3.1.3): the last retained publish per topic of each
//! tenant, handed to every new matching subscription.
//!
//! They live in memory for matching and in the store (`retained` records) so they survive a
//! restart. A record's key is the tenant and the SHA-256 of the topic, because topics may be
//! longer than a store key; the topic itself is inside the value.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use aws_lc_rs::digest::{SHA256, digest};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use tern_core::TenantId;
use tern_core::now_ms;
use tern_store::{Store, StoreError};

use crate::topics::matches;

const RECORD_KIND: &str = "retained";
/// Records read per page when loading at start-up.
const LOAD_PAGE: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RetainedMessage {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    /// MQTT 5 properties kept with the message (3.3.1.3): user properties, response topic,
    /// content type...; the expiry interval is recomputed on delivery.
    pub properties: Option<Arc<PublishProperties>>,
    /// From the MQTT 5 message expiry interval: no longer delivered after this.
    pub expires_at_ms: Option<i64>,
}

/// What [`Retained::set`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RetainOutcome {
    Stored,
    Cleared,
    /// The tenant already holds its maximum number of retained topics; nothing changed.
    QuotaExceeded,
}

pub(crate) struct Retained {
    store: Arc<dyn Store>,
    max_per_tenant: usize,
    tenants: RwLock<HashMap<TenantId, BTreeMap<Arc<str>, RetainedMessage>>>,
}

impl Retained {
    /// Loads every retained message from the store.
    pub async fn load(store: Arc<dyn Store>, max_per_tenant: usize) -> Result<Self, StoreError> {
        let mut tenants: HashMap<TenantId, BTreeMap<Arc<str>, RetainedMessage>> = HashMap::new();
        let mut after: Option<String> = None;
        loop {
            let page = store
                .list_records(RECORD_KIND, "", after.as_deref(), LOAD_PAGE)
                .await?;
            for (key, value) in &page {
                let tenant = key
                    .split_once('/')
                    .and_then(|(t, _)| TenantId::parse(t).ok());
                match (tenant, decode(value.clone())) {
                    (Some(tenant), Some(message)) => {
                        tenants
                            .entry(tenant)
                            .or_default()
                            .insert(message.topic.clone(), message);
                    }
                    _ => tracing::warn!(key, "skipping an unreadable retained message record"),
                }
            }
            match page.last() {
                Some((key, _)) if page.len() == LOAD_PAGE => after = Some(key.clone()),
                _ => break,
            }
        }
        Ok(Self {
            store,
            max_per_tenant,
            tenants: RwLock::new(tenants),
        })
    }

    /// Stores (or, with an empty payload, clears) the retained message of a topic, durably.
    pub async fn set(
        &self,
        tenant: TenantId,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        properties: Option<Arc<PublishProperties>>,
    ) -> Result<RetainOutcome, StoreError> {
        let key = record_key(tenant, topic);
        match self.remember(tenant, topic, payload, qos, properties) {
            (RetainOutcome::Cleared, _) => {
                self.store.delete_record(RECORD_KIND, &key).await?;
                Ok(RetainOutcome::Cleared)
            }
            (RetainOutcome::Stored, Some(value)) => {
                self.store.put_record(RECORD_KIND, &key, value).await?;
                Ok(RetainOutcome::Stored)
            }
            (outcome, _) => Ok(outcome),
        }
    }

    /// Sets or clears the retained message in memory only: for one another bridge process
    /// has stored already. The second value is the record to store, when one is.
    pub fn remember(
        &self,
        tenant: TenantId,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        properties: Option<Arc<PublishProperties>>,
    ) -> (RetainOutcome, Option<Bytes>) {
        if payload.is_empty() {
            self.write_tenants(|tenants| {
                if let Some(topics) = tenants.get_mut(&tenant) {
                    topics.remove(topic);
                }
            });
            return (RetainOutcome::Cleared, None);
        }
        let expires_at_ms = properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|secs| now_ms() + i64::from(secs) * 1000);
        let message = RetainedMessage {
            topic: Arc::from(topic),
            payload,
            qos,
            properties,
            expires_at_ms,
        };
        let value = encode(&message);
        let stored = self.write_tenants(|tenants| {
            let topics = tenants.entry(tenant).or_default();
            if topics.len() >= self.max_per_tenant && !topics.contains_key(topic) {
                return false;
            }
            topics.insert(message.topic.clone(), message);
            true
        });
        if !stored {
            return (RetainOutcome::QuotaExceeded, None);
        }
        (RetainOutcome::Stored, Some(value))
    }

    /// The unexpired retained messages of a tenant whose topics match `filter`, each with the
    /// expiry interval that remains (3.3.2.3.3).
    pub fn matching(&self, tenant: TenantId, filter: &str) -> Vec<RetainedMessage> {
        let now = now_ms();
        let tenants = self.tenants.read().unwrap_or_else(|e| e.into_inner());
        let Some(topics) = tenants.get(&tenant) else {
            return Vec::new();
        };
        topics
            .values()
            .filter(|m| matches(filter, &m.topic))
            .filter_map(|m| match m.expires_at_ms {
                None => Some(m.clone()),
                Some(at) if at <= now => None,
                Some(at) => {
                    let mut properties = m.properties.as_deref().cloned().unwrap_or_default();
                    properties.message_expiry_interval =
                        Some(((at - now + 999) / 1000).clamp(1, i64::from(u32::MAX)) as u32);
                    Some(RetainedMessage {
                        properties: Some(Arc::new(properties)),
                        ..m.clone()
                    })
                }
            })
            .collect()
    }

    fn write_tenants<T>(
        &self,
        f: impl FnOnce(&mut HashMap<TenantId, BTreeMap<Arc<str>, RetainedMessage>>) -> T,
    ) -> T {
        f(&mut self.tenants.write().unwrap_or_else(|e| e.into_inner()))
    }
}

fn record_key(tenant: TenantId, topic: &str) -> String {
    let hash = digest(&SHA256, topic.as_bytes());
    let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{tenant}/{hex}")
}

/// Marks the current record format: `[FORMAT][expires_at_ms: i64, 0 = never][the message as
/// an MQTT 5 PUBLISH]`, so that properties are kept without a format of our own. Persistent
/// sessions store their queued messages the same way.
const FORMAT: u8 = 0xFF;

/// A PUBLISH as a record value, with the time its message expires.
pub(crate) fn encode_publish(publish: Publish, expires_at_ms: Option<i64>) -> Bytes {
    let mut buf = BytesMut::with_capacity(16 + publish.topic.len() + publish.payload.len());
    buf.put_u8(FORMAT);
    buf.put_i64(expires_at_ms.unwrap_or(0));
    // Encoding an in-memory PUBLISH fails only beyond MQTT's size limits, which the bridge's
    // packet limit keeps it under.
    let _ = Packet::Publish(publish).write(&mut buf, None);
    buf.freeze()
}

/// The PUBLISH and expiry time of a record written by [`encode_publish`].
pub(crate) fn decode_publish(mut value: Bytes) -> Option<(Publish, Option<i64>)> {
    if value.first() != Some(&FORMAT) || value.len() < 9 {
        return None;
    }
    value.advance(1);
    let expires_at_ms = Some(value.get_i64()).filter(|at| *at != 0);
    match Packet::read(&mut BytesMut::from(&value[..]), None) {
        Ok(Packet::Publish(publish)) => Some((publish, expires_at_ms)),
        _ => None,
    }
}

fn encode(message: &RetainedMessage) -> Bytes {
    let publish = Publish {
        dup: false,
        qos: message.qos,
        retain: true,
        topic: Bytes::copy_from_slice(message.topic.as_bytes()),
        pkid: u16::from(message.qos != QoS::AtMostOnce),
        payload: message.payload.clone(),
        properties: message.properties.as_deref().cloned(),
    };
    encode_publish(publish, message.expires_at_ms)
}

fn decode(mut value: Bytes) -> Option<RetainedMessage> {
    if value.first() == Some(&FORMAT) {
        let (p, expires_at_ms) = decode_publish(value)?;
        return Some(RetainedMessage {
            topic: std::str::from_utf8(&p.topic).ok()?.into(),
            payload: p.payload,
            qos: p.qos,
            properties: p.properties.map(Arc::new),
            expires_at_ms,
        });
    }
    // The first format: `[qos: u8][topic length: u32][topic][payload]`.
    if value.len() < 5 {
        return None;
    }
    let qos = match value.get_u8() {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => return None,
    };
    let topic_len = value.get_u32() as usize;
    if value.len() < topic_len {
        return None;
    }
    let topic = std::str::from_utf8(&value.split_to(topic_len)).ok()?.into();
    Some(RetainedMessage {
        topic,
        payload: value,
        qos,
        properties: None,
        expires_at_ms: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_store::EmbeddedStore;

    fn store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
        Arc::new(EmbeddedStore::open(dir.path()).expect("store"))
    }

    #[tokio::test]
    async fn set_replace_clear_and_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tenant = TenantId::random();
        let long_topic = format!("a/{}", "x".repeat(1000));
        {
            let retained = Retained::load(store(&dir), 10).await.expect("load");
            for (topic, payload, expected) in [
                ("a/b", &b"1"[..], RetainOutcome::Stored),
                ("a/b", b"2", RetainOutcome::Stored),
                ("a/c", b"3", RetainOutcome::Stored),
                ("a/c", b"", RetainOutcome::Cleared),
                (long_topic.as_str(), b"4", RetainOutcome::Stored),
            ] {
                let outcome = retained
                    .set(
                        tenant,
                        topic,
                        Bytes::copy_from_slice(payload),
                        QoS::AtLeastOnce,
                        None,
                    )
                    .await
                    .expect("set");
                assert_eq!(outcome, expected, "{topic}");
            }
        }
        let retained = Retained::load(store(&dir), 10).await.expect("reload");
        let mut found: Vec<(String, Bytes)> = retained
            .matching(tenant, "a/+")
            .into_iter()
            .map(|m| (m.topic.to_string(), m.payload))
            .collect();
        found.sort();
        assert_eq!(
            found,
            vec![
                ("a/b".to_string(), Bytes::from_static(b"2")),
                (long_topic, Bytes::from_static(b"4")),
            ]
        );
        assert!(retained.matching(TenantId::random(), "#").is_empty());
    }

    #[tokio::test]
    async fn a_full_tenant_may_replace_but_not_add() {
        let dir = tempfile::tempdir().expect("tempdir");
        let retained = Retained::load(store(&dir), 1).await.expect("load");
        let tenant = TenantId::random();
        let other = TenantId::random();
        for (owner, topic, expected) in [
            (tenant, "a", RetainOutcome::Stored),
            (tenant, "b", RetainOutcome::QuotaExceeded),
            (tenant, "a", RetainOutcome::Stored), // replacing is not adding
            (other, "b", RetainOutcome::Stored),  // the quota is per tenant
        ] {
            let outcome = retained
                .set(
                    owner,
                    topic,
                    Bytes::from_static(b"x"),
                    QoS::AtMostOnce,
                    None,
                )
                .await
                .expect("set");
            assert_eq!(outcome, expected, "{topic}");
        }
    }

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let message = RetainedMessage {
            topic: Arc::from("t/ü"),
            payload: Bytes::from_static(b"\x00\x01"),
            qos: QoS::ExactlyOnce,
            properties: Some(Arc::new(PublishProperties {
                user_properties: vec![("k".into(), "v".into())],
                ..PublishProperties::default()
            })),
            expires_at_ms: Some(123),
        };
        assert_eq!(decode(encode(&message)), Some(message));
        let first_format = Bytes::from_static(b"\x01\0\0\0\x01ab");
        let old = decode(first_format).expect("the first format still reads");
        assert_eq!((&*old.topic, &old.payload[..]), ("a", &b"b"[..]));
        assert_eq!(decode(Bytes::from_static(b"\x07\0\0\0\0")), None);
        assert_eq!(decode(Bytes::from_static(b"\x01\0\0\0\x09ab")), None);
    }
}
