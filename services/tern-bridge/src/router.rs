//! Plain publish/subscribe inside a tenant's namespace: who subscribed to what, and fan-out.
//!
//! Subscriptions are kept per tenant, so a publish can only ever reach subscribers of its own
//! tenant. Each connection has a bounded queue of deliveries; when a subscriber does not keep
//! up and its queue is full, further deliveries to it are dropped and counted (as Mosquitto's
//! `max_queued_messages` does), so one slow subscriber cannot stall publishers or grow memory.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tern_core::TenantId;
use tokio::sync::mpsc;

use crate::topics::matches;

/// A message on its way to one subscriber.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub topic: Arc<str>,
    pub payload: Bytes,
    /// Already the lower of the publish QoS and the subscription's granted QoS.
    pub qos: QoS,
}

struct Subscriber {
    connection: u64,
    filter: String,
    qos: QoS,
    queue: mpsc::Sender<Delivery>,
}

/// What routing one publish did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Routed {
    pub delivered: usize,
    pub dropped: usize,
}

#[derive(Default)]
pub(crate) struct Router {
    tenants: RwLock<HashMap<TenantId, Vec<Subscriber>>>,
}

fn qos_rank(qos: QoS) -> u8 {
    qos as u8
}

impl Router {
    /// Adds or replaces (same connection, same filter) a subscription.
    pub fn subscribe(
        &self,
        tenant: TenantId,
        connection: u64,
        filter: &str,
        qos: QoS,
        queue: mpsc::Sender<Delivery>,
    ) {
        let mut tenants = self.tenants.write().unwrap_or_else(|e| e.into_inner());
        let subscribers = tenants.entry(tenant).or_default();
        subscribers.retain(|s| !(s.connection == connection && s.filter == filter));
        subscribers.push(Subscriber {
            connection,
            filter: filter.to_string(),
            qos,
            queue,
        });
    }

    pub fn unsubscribe(&self, tenant: TenantId, connection: u64, filter: &str) {
        self.remove(tenant, |s| s.connection == connection && s.filter == filter);
    }

    /// Removes every subscription of a connection that has ended.
    pub fn drop_connection(&self, tenant: TenantId, connection: u64) {
        self.remove(tenant, |s| s.connection == connection);
    }

    fn remove(&self, tenant: TenantId, doomed: impl Fn(&Subscriber) -> bool) {
        let mut tenants = self.tenants.write().unwrap_or_else(|e| e.into_inner());
        if let Some(subscribers) = tenants.get_mut(&tenant) {
            subscribers.retain(|s| !doomed(s));
            if subscribers.is_empty() {
                tenants.remove(&tenant);
            }
        }
    }

    /// Delivers a publish to every matching subscriber of the tenant, once per connection at
    /// the highest QoS among its matching subscriptions (capped by the publish QoS).
    pub fn route(&self, tenant: TenantId, topic: &str, payload: &Bytes, qos: QoS) -> Routed {
        let tenants = self.tenants.read().unwrap_or_else(|e| e.into_inner());
        let Some(subscribers) = tenants.get(&tenant) else {
            return Routed::default();
        };
        // connection -> (granted QoS, queue); a handful of entries, so a Vec beats a map.
        let mut targets: Vec<(u64, QoS, &mpsc::Sender<Delivery>)> = Vec::new();
        for s in subscribers.iter().filter(|s| matches(&s.filter, topic)) {
            match targets.iter_mut().find(|t| t.0 == s.connection) {
                Some(t) if qos_rank(s.qos) > qos_rank(t.1) => t.1 = s.qos,
                Some(_) => {}
                None => targets.push((s.connection, s.qos, &s.queue)),
            }
        }
        let topic: Arc<str> = Arc::from(topic);
        let mut routed = Routed::default();
        for (_, granted, queue) in targets {
            let delivery = Delivery {
                topic: topic.clone(),
                payload: payload.clone(),
                qos: if qos_rank(granted) < qos_rank(qos) {
                    granted
                } else {
                    qos
                },
            };
            match queue.try_send(delivery) {
                Ok(()) => routed.delivered += 1,
                Err(_) => routed.dropped += 1,
            }
        }
        routed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscriber(capacity: usize) -> (mpsc::Sender<Delivery>, mpsc::Receiver<Delivery>) {
        mpsc::channel(capacity)
    }

    #[test]
    fn publishes_reach_matching_subscribers_of_their_tenant_only() {
        let router = Router::default();
        let (acme, globex) = (TenantId::random(), TenantId::random());
        let (tx1, mut rx1) = subscriber(8);
        let (tx2, mut rx2) = subscriber(8);
        router.subscribe(acme, 1, "sensors/+/temp", QoS::AtLeastOnce, tx1);
        router.subscribe(globex, 2, "#", QoS::AtLeastOnce, tx2);
        let payload = Bytes::from_static(b"21.5");
        assert_eq!(
            router
                .route(acme, "sensors/a/temp", &payload, QoS::AtLeastOnce)
                .delivered,
            1
        );
        assert_eq!(
            router
                .route(acme, "sensors/a/hum", &payload, QoS::AtLeastOnce)
                .delivered,
            0
        );
        let got = rx1.try_recv().expect("delivered");
        assert_eq!((&*got.topic, got.qos), ("sensors/a/temp", QoS::AtLeastOnce));
        assert!(rx2.try_recv().is_err(), "globex's `#` sees nothing of acme");
    }

    #[test]
    fn one_copy_per_connection_at_the_highest_granted_qos() {
        let router = Router::default();
        let tenant = TenantId::random();
        let (tx, mut rx) = subscriber(8);
        router.subscribe(tenant, 1, "a/#", QoS::AtMostOnce, tx.clone());
        router.subscribe(tenant, 1, "a/+", QoS::AtLeastOnce, tx);
        router.route(tenant, "a/b", &Bytes::new(), QoS::ExactlyOnce);
        assert_eq!(rx.try_recv().expect("one").qos, QoS::AtLeastOnce);
        assert!(rx.try_recv().is_err(), "only one copy");
        router.route(tenant, "a/b", &Bytes::new(), QoS::AtMostOnce);
        assert_eq!(
            rx.try_recv().expect("one").qos,
            QoS::AtMostOnce,
            "capped by the publish"
        );
    }

    #[test]
    fn full_queues_drop_and_unsubscribed_connections_get_nothing() {
        let router = Router::default();
        let tenant = TenantId::random();
        let (tx, mut rx) = subscriber(1);
        router.subscribe(tenant, 7, "t", QoS::AtMostOnce, tx);
        let p = Bytes::new();
        assert_eq!(
            router.route(tenant, "t", &p, QoS::AtMostOnce),
            Routed {
                delivered: 1,
                dropped: 0
            }
        );
        assert_eq!(
            router.route(tenant, "t", &p, QoS::AtMostOnce),
            Routed {
                delivered: 0,
                dropped: 1
            }
        );
        rx.try_recv().expect("first");
        router.unsubscribe(tenant, 7, "t");
        assert_eq!(
            router.route(tenant, "t", &p, QoS::AtMostOnce),
            Routed::default()
        );
        let (tx, _rx) = subscriber(1);
        router.subscribe(tenant, 8, "t", QoS::AtMostOnce, tx);
        router.drop_connection(tenant, 8);
        assert_eq!(
            router.route(tenant, "t", &p, QoS::AtMostOnce),
            Routed::default()
        );
    }
}
