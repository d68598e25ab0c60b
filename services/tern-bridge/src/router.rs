//! Plain publish/subscribe inside a tenant's namespace: who subscribed to what, and fan-out.
//!
//! Subscriptions are kept per tenant, so a publish can only ever reach subscribers of its own
//! tenant. Each connection has a bounded queue of deliveries. When a subscriber's queue is
//! full, the delivery (QoS 0 too) is handed back to the publishing connection, which waits for
//! room before it reads on or acknowledges (back pressure), for a bounded time: a fast publisher
//! slows to what its subscribers take instead of losing messages, and memory stays bounded. A persistent session whose client is away keeps its
//! subscriptions here with an [`Away`](crate::persistent::Away) mailbox instead: its QoS 1 and 2
//! deliveries are queued durably for the client's return (`persistent.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use tern_core::{CommandId, TenantId};
use tokio::sync::mpsc;

use crate::persistent::Away;
use crate::topics::{matches, parse_filter};

/// A message on its way to one subscriber.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub topic: Arc<str>,
    pub payload: Bytes,
    /// Already the lower of the publish QoS and the subscription's granted QoS.
    pub qos: QoS,
    /// Set for retained messages sent because of a new subscription (3.3.1-8, -9), and with
    /// MQTT 5 "retain as published".
    pub retain: bool,
    /// The command this delivers, whose state advances when the device acknowledges it.
    pub command: Option<CommandId>,
    /// MQTT 5 properties forwarded from the publisher unaltered (3.3.2.3): response topic,
    /// correlation data, user properties, content type, payload format, message expiry.
    pub properties: Option<Arc<PublishProperties>>,
    /// MQTT 5 identifiers of the subscriptions this matched (3.3.4).
    pub subscription_ids: Vec<usize>,
    /// Its record in a persistent session's queue, deleted once the client completes it.
    pub stored: Option<u64>,
    /// The packet id of an earlier attempt: resent with DUP and that id (4.4.0-1).
    pub resend: Option<u16>,
}

impl Delivery {
    /// A plain delivery (no MQTT 5 extras).
    pub fn new(topic: Arc<str>, payload: Bytes, qos: QoS, retain: bool) -> Self {
        Self {
            topic,
            payload,
            qos,
            retain,
            command: None,
            properties: None,
            subscription_ids: Vec::new(),
            stored: None,
            resend: None,
        }
    }

    /// A delivery read back from a stored PUBLISH (see `persistent.rs`).
    pub fn from_publish(publish: Publish) -> Self {
        let mut properties = publish.properties;
        let subscription_ids = properties
            .as_mut()
            .map(|p| std::mem::take(&mut p.subscription_identifiers))
            .unwrap_or_default();
        Self {
            properties: properties.map(Arc::new),
            subscription_ids,
            resend: publish.dup.then_some(publish.pkid),
            ..Self::new(
                String::from_utf8_lossy(&publish.topic).into(),
                publish.payload,
                publish.qos,
                publish.retain,
            )
        }
    }
}

/// Where a subscription's deliveries go.
#[derive(Clone)]
pub(crate) enum Mailbox {
    /// A connected client's bounded queue.
    Live(mpsc::Sender<Delivery>),
    /// A persistent session whose client is away.
    Away(Arc<Away>),
}

/// What a subscription asked for (MQTT 5 subscription options; 3.1.1 uses the defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SubscriptionOptions {
    pub qos: QoS,
    /// Do not send the connection's own publishes back to it.
    pub no_local: bool,
    /// Keep the publisher's RETAIN flag instead of clearing it.
    pub retain_as_published: bool,
    pub id: Option<usize>,
}

#[cfg(test)]
impl SubscriptionOptions {
    pub fn qos(qos: QoS) -> Self {
        Self {
            qos,
            no_local: false,
            retain_as_published: false,
            id: None,
        }
    }
}

struct Subscriber {
    connection: u64,
    /// As subscribed, `$share/{group}/` included: what UNSUBSCRIBE names.
    filter: String,
    /// Shared subscriptions (4.8.2): the group, and where the matched filter starts.
    group: Option<(Box<str>, usize)>,
    options: SubscriptionOptions,
    mailbox: Mailbox,
}

impl Subscriber {
    fn topic_filter(&self) -> &str {
        match &self.group {
            Some((_, start)) => &self.filter[*start..],
            None => &self.filter,
        }
    }
}

/// A publish to route.
pub(crate) struct Message<'a> {
    pub topic: &'a str,
    pub payload: &'a Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Option<Arc<PublishProperties>>,
    /// The publishing connection, for "no local"; `None` for the server's own publishes.
    pub from: Option<u64>,
}

/// What routing one publish did.
#[derive(Default)]
pub(crate) struct Routed {
    pub delivered: usize,
    pub dropped: usize,
    /// QoS 1 deliveries whose subscriber queue was full: the publisher waits to hand them over.
    pub waiting: Vec<(mpsc::Sender<Delivery>, Delivery)>,
    /// QoS 1 and 2 deliveries to persistent sessions whose clients are away: stored before
    /// the publisher is acknowledged.
    pub away: Vec<(Arc<Away>, Delivery)>,
}

#[derive(Default)]
pub(crate) struct Router {
    tenants: RwLock<HashMap<TenantId, Vec<Subscriber>>>,
    /// Turns through the members of shared subscription groups.
    next_share: AtomicUsize,
}

fn qos_rank(qos: QoS) -> u8 {
    qos as u8
}

pub(crate) fn lower_qos(a: QoS, b: QoS) -> QoS {
    if qos_rank(a) < qos_rank(b) { a } else { b }
}

/// One connection's share of a publish: the best QoS among its matching subscriptions.
struct Target<'a> {
    connection: u64,
    qos: QoS,
    retain: bool,
    ids: Vec<usize>,
    mailbox: &'a Mailbox,
}

impl Router {
    /// Adds or replaces (same connection, same filter) a subscription; returns whether it is
    /// new (MQTT 5 retain handling 1 sends retained messages only to new subscriptions).
    /// `filter` must be valid (`topics::parse_filter`).
    pub fn subscribe(
        &self,
        tenant: TenantId,
        connection: u64,
        filter: &str,
        options: SubscriptionOptions,
        mailbox: Mailbox,
    ) -> bool {
        let group = parse_filter(filter).ok().and_then(|parsed| {
            let start = filter.len() - parsed.filter.len();
            parsed.group.map(|group| (Box::from(group), start))
        });
        let mut tenants = self.tenants.write().unwrap_or_else(|e| e.into_inner());
        let subscribers = tenants.entry(tenant).or_default();
        let before = subscribers.len();
        subscribers.retain(|s| !(s.connection == connection && s.filter == filter));
        let new = subscribers.len() == before;
        subscribers.push(Subscriber {
            connection,
            filter: filter.to_string(),
            group,
            options,
            mailbox,
        });
        new
    }

    /// Moves a connection's subscriptions to another connection id and mailbox: a persistent
    /// session parked when its client leaves, or taken back when it returns.
    pub fn rebind(&self, tenant: TenantId, from: u64, to: u64, mailbox: Mailbox) {
        let mut tenants = self.tenants.write().unwrap_or_else(|e| e.into_inner());
        for s in tenants
            .get_mut(&tenant)
            .into_iter()
            .flatten()
            .filter(|s| s.connection == from)
        {
            s.connection = to;
            s.mailbox = mailbox.clone();
        }
    }

    /// Returns whether the subscription existed.
    pub fn unsubscribe(&self, tenant: TenantId, connection: u64, filter: &str) -> bool {
        self.remove(tenant, |s| s.connection == connection && s.filter == filter) > 0
    }

    /// Removes every subscription of a connection that has ended.
    pub fn drop_connection(&self, tenant: TenantId, connection: u64) {
        self.remove(tenant, |s| s.connection == connection);
    }

    fn remove(&self, tenant: TenantId, doomed: impl Fn(&Subscriber) -> bool) -> usize {
        let mut tenants = self.tenants.write().unwrap_or_else(|e| e.into_inner());
        let Some(subscribers) = tenants.get_mut(&tenant) else {
            return 0;
        };
        let before = subscribers.len();
        subscribers.retain(|s| !doomed(s));
        let removed = before - subscribers.len();
        if subscribers.is_empty() {
            tenants.remove(&tenant);
        }
        removed
    }

    /// Delivers a publish to every matching subscriber of the tenant, once per connection at
    /// the highest QoS among its matching subscriptions (capped by the publish QoS).
    pub fn route(&self, tenant: TenantId, message: &Message<'_>) -> Routed {
        let tenants = self.tenants.read().unwrap_or_else(|e| e.into_inner());
        let Some(subscribers) = tenants.get(&tenant) else {
            return Routed::default();
        };
        // A handful of targets per publish, so a Vec beats a map.
        let mut targets: Vec<Target<'_>> = Vec::new();
        let mut groups: Vec<(&str, &str, Vec<&Subscriber>)> = Vec::new();
        for s in subscribers
            .iter()
            .filter(|s| matches(s.topic_filter(), message.topic))
        {
            if let Some((group, _)) = &s.group {
                let filter = s.topic_filter();
                match groups
                    .iter_mut()
                    .find(|(g, f, _)| g == &&**group && *f == filter)
                {
                    Some((_, _, members)) => members.push(s),
                    None => groups.push((group, filter, vec![s])),
                }
                continue;
            }
            if s.options.no_local && message.from == Some(s.connection) {
                continue;
            }
            let retain = s.options.retain_as_published && message.retain;
            let target = match targets.iter_mut().find(|t| t.connection == s.connection) {
                Some(t) => t,
                None => {
                    targets.push(Target {
                        connection: s.connection,
                        qos: s.options.qos,
                        retain,
                        ids: Vec::new(),
                        mailbox: &s.mailbox,
                    });
                    targets.last_mut().expect("just pushed")
                }
            };
            if qos_rank(s.options.qos) > qos_rank(target.qos) {
                target.qos = s.options.qos;
            }
            target.retain |= retain;
            target.ids.extend(s.options.id);
        }
        // 4.8.2: each group's message goes to one member: the next in turn whose queue has
        // room, else the next in turn.
        for (_, _, members) in groups {
            let start = self.next_share.fetch_add(1, Ordering::Relaxed);
            let n = members.len();
            let s = (0..n)
                .map(|i| members[(start + i) % n])
                .find(|s| matches!(&s.mailbox, Mailbox::Live(q) if q.capacity() > 0))
                .unwrap_or(members[start % n]);
            targets.push(Target {
                connection: s.connection,
                qos: s.options.qos,
                retain: s.options.retain_as_published && message.retain,
                ids: s.options.id.into_iter().collect(),
                mailbox: &s.mailbox,
            });
        }
        let topic: Arc<str> = Arc::from(message.topic);
        let mut routed = Routed::default();
        for target in targets {
            let delivery = Delivery {
                properties: message.properties.clone(),
                subscription_ids: target.ids,
                ..Delivery::new(
                    topic.clone(),
                    message.payload.clone(),
                    lower_qos(target.qos, message.qos),
                    target.retain,
                )
            };
            let queue = match target.mailbox {
                Mailbox::Live(queue) => queue,
                // At most once is not kept for an absent client.
                Mailbox::Away(_) if delivery.qos == QoS::AtMostOnce => {
                    routed.dropped += 1;
                    continue;
                }
                Mailbox::Away(away) => {
                    routed.away.push((away.clone(), delivery));
                    continue;
                }
            };
            match queue.try_send(delivery) {
                Ok(()) => routed.delivered += 1,
                Err(mpsc::error::TrySendError::Full(delivery)) => {
                    routed.waiting.push((queue.clone(), delivery));
                }
                Err(mpsc::error::TrySendError::Closed(_)) => routed.dropped += 1,
            }
        }
        routed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg<'a>(topic: &'a str, payload: &'a Bytes, qos: QoS) -> Message<'a> {
        Message {
            topic,
            payload,
            qos,
            retain: false,
            properties: None,
            from: None,
        }
    }

    fn subscriber(capacity: usize) -> (Mailbox, mpsc::Receiver<Delivery>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Mailbox::Live(tx), rx)
    }

    #[test]
    fn publishes_reach_matching_subscribers_of_their_tenant_only() {
        let router = Router::default();
        let (acme, globex) = (TenantId::random(), TenantId::random());
        let (tx1, mut rx1) = subscriber(8);
        let (tx2, mut rx2) = subscriber(8);
        router.subscribe(
            acme,
            1,
            "sensors/+/temp",
            SubscriptionOptions::qos(QoS::AtLeastOnce),
            tx1,
        );
        router.subscribe(
            globex,
            2,
            "#",
            SubscriptionOptions::qos(QoS::AtLeastOnce),
            tx2,
        );
        let payload = Bytes::from_static(b"21.5");
        assert_eq!(
            router
                .route(acme, &msg("sensors/a/temp", &payload, QoS::AtLeastOnce))
                .delivered,
            1
        );
        assert_eq!(
            router
                .route(acme, &msg("sensors/a/hum", &payload, QoS::AtLeastOnce))
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
        router.subscribe(
            tenant,
            1,
            "a/#",
            SubscriptionOptions::qos(QoS::AtMostOnce),
            tx.clone(),
        );
        router.subscribe(
            tenant,
            1,
            "a/+",
            SubscriptionOptions::qos(QoS::AtLeastOnce),
            tx,
        );
        router.route(tenant, &msg("a/b", &Bytes::new(), QoS::ExactlyOnce));
        assert_eq!(rx.try_recv().expect("one").qos, QoS::AtLeastOnce);
        assert!(rx.try_recv().is_err(), "only one copy");
        router.route(tenant, &msg("a/b", &Bytes::new(), QoS::AtMostOnce));
        assert_eq!(
            rx.try_recv().expect("one").qos,
            QoS::AtMostOnce,
            "capped by the publish"
        );
    }

    #[test]
    fn full_queues_hand_qos_0_back_too_and_unsubscribed_connections_get_nothing() {
        let router = Router::default();
        let tenant = TenantId::random();
        let (tx, mut rx) = subscriber(1);
        router.subscribe(
            tenant,
            7,
            "t",
            SubscriptionOptions::qos(QoS::AtMostOnce),
            tx,
        );
        let p = Bytes::new();
        let counts = |r: Routed| (r.delivered, r.dropped, r.waiting.len());
        assert_eq!(
            counts(router.route(tenant, &msg("t", &p, QoS::AtMostOnce))),
            (1, 0, 0)
        );
        assert_eq!(
            counts(router.route(tenant, &msg("t", &p, QoS::AtMostOnce))),
            (0, 0, 1),
            "a full queue makes the publisher wait, even at QoS 0"
        );
        rx.try_recv().expect("first");
        router.unsubscribe(tenant, 7, "t");
        assert_eq!(
            counts(router.route(tenant, &msg("t", &p, QoS::AtMostOnce))),
            (0, 0, 0)
        );
        let (tx, _rx) = subscriber(1);
        router.subscribe(
            tenant,
            8,
            "t",
            SubscriptionOptions::qos(QoS::AtMostOnce),
            tx,
        );
        router.drop_connection(tenant, 8);
        assert_eq!(
            counts(router.route(tenant, &msg("t", &p, QoS::AtMostOnce))),
            (0, 0, 0)
        );
    }

    #[test]
    fn full_queues_hand_qos_1_deliveries_back_to_the_publisher() {
        let router = Router::default();
        let tenant = TenantId::random();
        let (tx, mut rx) = subscriber(1);
        router.subscribe(
            tenant,
            1,
            "t",
            SubscriptionOptions::qos(QoS::AtLeastOnce),
            tx,
        );
        let p = Bytes::from_static(b"x");
        assert_eq!(
            router
                .route(tenant, &msg("t", &p, QoS::AtLeastOnce))
                .delivered,
            1
        );
        let routed = router.route(tenant, &msg("t", &p, QoS::AtLeastOnce));
        assert_eq!(
            (routed.delivered, routed.dropped, routed.waiting.len()),
            (0, 0, 1)
        );
        let (queue, delivery) = routed.waiting.into_iter().next().expect("waiting");
        rx.try_recv().expect("first");
        queue.try_send(delivery).expect("room again");
        assert_eq!(rx.try_recv().expect("second").payload, p);
    }

    #[test]
    fn mqtt5_options_no_local_retain_as_published_and_subscription_ids() {
        let router = Router::default();
        let tenant = TenantId::random();
        let (tx, mut rx) = subscriber(8);
        let options = |id, no_local, retain_as_published| SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local,
            retain_as_published,
            id: Some(id),
        };
        assert!(router.subscribe(tenant, 1, "a/+", options(7, false, true), tx.clone()));
        assert!(router.subscribe(tenant, 1, "a/#", options(9, false, false), tx.clone()));
        assert!(
            !router.subscribe(tenant, 1, "a/#", options(9, false, false), tx.clone()),
            "replaced"
        );
        let payload = Bytes::from_static(b"x");
        let retained = Message {
            retain: true,
            ..msg("a/b", &payload, QoS::AtLeastOnce)
        };
        router.route(tenant, &retained);
        let got = rx.try_recv().expect("one copy");
        assert!(
            got.retain,
            "one matching subscription keeps RETAIN as published"
        );
        assert_eq!(got.subscription_ids, [7, 9]);
        assert!(rx.try_recv().is_err());

        let (own, mut own_rx) = subscriber(8);
        router.subscribe(tenant, 2, "a/b", options(1, true, false), own);
        let from_self = Message {
            from: Some(2),
            ..msg("a/b", &payload, QoS::AtMostOnce)
        };
        router.route(tenant, &from_self);
        assert!(own_rx.try_recv().is_err(), "no local");
        assert!(rx.try_recv().is_ok(), "others still get it");
        assert!(router.unsubscribe(tenant, 2, "a/b"));
        assert!(!router.unsubscribe(tenant, 2, "a/b"));
    }

    #[test]
    fn shared_groups_give_each_message_to_one_member_in_turn() {
        let router = Router::default();
        let tenant = TenantId::random();
        let (w1, mut rx1) = subscriber(8);
        let (w2, mut rx2) = subscriber(8);
        let (plain, mut rx_plain) = subscriber(8);
        let qos1 = SubscriptionOptions::qos(QoS::AtLeastOnce);
        router.subscribe(tenant, 1, "$share/g/jobs/+", qos1, w1);
        router.subscribe(tenant, 2, "$share/g/jobs/+", qos1, w2.clone());
        // The same connection with a plain subscription too gets its own copy of each.
        router.subscribe(tenant, 2, "jobs/#", qos1, w2);
        router.subscribe(tenant, 3, "jobs/+", qos1, plain);
        let payload = Bytes::from_static(b"job");
        for _ in 0..4 {
            router.route(tenant, &msg("jobs/x", &payload, QoS::AtLeastOnce));
        }
        let drain =
            |rx: &mut mpsc::Receiver<Delivery>| std::iter::from_fn(|| rx.try_recv().ok()).count();
        let (one, two) = (drain(&mut rx1), drain(&mut rx2));
        assert_eq!(
            one + two,
            4 + 4,
            "4 shared copies in all, plus connection 2's own 4"
        );
        assert_eq!(one, 2, "the group takes turns");
        assert_eq!(drain(&mut rx_plain), 4);
        assert!(router.unsubscribe(tenant, 1, "$share/g/jobs/+"));
        router.route(tenant, &msg("jobs/x", &payload, QoS::AtLeastOnce));
        assert_eq!(
            (drain(&mut rx1), drain(&mut rx2)),
            (0, 2),
            "the other member gets it"
        );
    }

    #[test]
    fn a_full_member_is_skipped_for_one_with_room() {
        let router = Router::default();
        let tenant = TenantId::random();
        let (full, mut rx_full) = subscriber(1);
        let (roomy, mut rx_roomy) = subscriber(8);
        let qos1 = SubscriptionOptions::qos(QoS::AtLeastOnce);
        router.subscribe(tenant, 1, "$share/g/t", qos1, full);
        router.subscribe(tenant, 2, "$share/g/t", qos1, roomy);
        let payload = Bytes::new();
        for _ in 0..5 {
            let routed = router.route(tenant, &msg("t", &payload, QoS::AtLeastOnce));
            assert!(
                routed.waiting.is_empty(),
                "never waits while a member has room"
            );
        }
        assert_eq!(rx_full.try_recv().ok().map(|_| 1).unwrap_or(0), 1);
        assert_eq!(std::iter::from_fn(|| rx_roomy.try_recv().ok()).count(), 4);
    }
}
