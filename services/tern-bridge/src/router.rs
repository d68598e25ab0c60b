//! Plain publish/subscribe inside a tenant's namespace: who subscribed to what, and fan-out.
//!
//! Subscriptions are kept per tenant, so a publish can only ever reach subscribers of its own
//! tenant. Each connection has a bounded queue of deliveries. When a subscriber's queue is
//! full, a QoS 0 delivery is dropped and counted (at most once allows it); a QoS 1 delivery is
//! handed back to the publishing connection, which waits for room before acknowledging (back
//! pressure), for a bounded time.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tern_core::{CommandId, TenantId};
use tokio::sync::mpsc;

use crate::topics::matches;

/// A message on its way to one subscriber.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub topic: Arc<str>,
    pub payload: Bytes,
    /// Already the lower of the publish QoS and the subscription's granted QoS.
    pub qos: QoS,
    /// Set only for retained messages sent because of a new subscription (3.3.1-8, -9).
    pub retain: bool,
    /// The command this delivers, whose state advances when the device acknowledges it.
    pub command: Option<CommandId>,
}

struct Subscriber {
    connection: u64,
    filter: String,
    qos: QoS,
    queue: mpsc::Sender<Delivery>,
}

/// What routing one publish did.
#[derive(Debug, Default)]
pub(crate) struct Routed {
    pub delivered: usize,
    pub dropped: usize,
    /// QoS 1 deliveries whose subscriber queue was full: the publisher waits to hand them over.
    pub waiting: Vec<(mpsc::Sender<Delivery>, Delivery)>,
}

#[derive(Default)]
pub(crate) struct Router {
    tenants: RwLock<HashMap<TenantId, Vec<Subscriber>>>,
}

fn qos_rank(qos: QoS) -> u8 {
    qos as u8
}

pub(crate) fn lower_qos(a: QoS, b: QoS) -> QoS {
    if qos_rank(a) < qos_rank(b) { a } else { b }
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
                qos: lower_qos(granted, qos),
                retain: false,
                command: None,
            };
            match queue.try_send(delivery) {
                Ok(()) => routed.delivered += 1,
                Err(mpsc::error::TrySendError::Full(delivery))
                    if delivery.qos != QoS::AtMostOnce =>
                {
                    routed.waiting.push((queue.clone(), delivery));
                }
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
    fn full_queues_drop_qos_0_and_unsubscribed_connections_get_nothing() {
        let router = Router::default();
        let tenant = TenantId::random();
        let (tx, mut rx) = subscriber(1);
        router.subscribe(tenant, 7, "t", QoS::AtMostOnce, tx);
        let p = Bytes::new();
        let counts = |r: Routed| (r.delivered, r.dropped, r.waiting.len());
        assert_eq!(
            counts(router.route(tenant, "t", &p, QoS::AtMostOnce)),
            (1, 0, 0)
        );
        assert_eq!(
            counts(router.route(tenant, "t", &p, QoS::AtMostOnce)),
            (0, 1, 0)
        );
        rx.try_recv().expect("first");
        router.unsubscribe(tenant, 7, "t");
        assert_eq!(
            counts(router.route(tenant, "t", &p, QoS::AtMostOnce)),
            (0, 0, 0)
        );
        let (tx, _rx) = subscriber(1);
        router.subscribe(tenant, 8, "t", QoS::AtMostOnce, tx);
        router.drop_connection(tenant, 8);
        assert_eq!(
            counts(router.route(tenant, "t", &p, QoS::AtMostOnce)),
            (0, 0, 0)
        );
    }

    #[test]
    fn full_queues_hand_qos_1_deliveries_back_to_the_publisher() {
        let router = Router::default();
        let tenant = TenantId::random();
        let (tx, mut rx) = subscriber(1);
        router.subscribe(tenant, 1, "t", QoS::AtLeastOnce, tx);
        let p = Bytes::from_static(b"x");
        assert_eq!(router.route(tenant, "t", &p, QoS::AtLeastOnce).delivered, 1);
        let routed = router.route(tenant, "t", &p, QoS::AtLeastOnce);
        assert_eq!(
            (routed.delivered, routed.dropped, routed.waiting.len()),
            (0, 0, 1)
        );
        let (queue, delivery) = routed.waiting.into_iter().next().expect("waiting");
        rx.try_recv().expect("first");
        queue.try_send(delivery).expect("room again");
        assert_eq!(rx.try_recv().expect("second").payload, p);
    }
}
