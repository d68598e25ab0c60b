//! Persistent sessions (MQTT 3.1.1 CleanSession 0, MQTT 5 Session Expiry Interval): what a
//! client keeps while it is away, and gets back when it connects again.
//!
//! While the client is connected, its session record (`session` records: expiry and
//! subscriptions) is rewritten, durably, whenever its subscriptions change. When it leaves, its
//! subscriptions stay in the router with an [`Away`] mailbox: QoS 1 and 2 messages that match
//! are stored (`session_message` records) before their publisher is acknowledged, and handed
//! to the client, in order, when it returns. QoS 0 messages are not kept (3.1.2.5 allows it).
//! Sessions and queued messages are loaded at start-up, so both survive a restart; a session
//! ends when its expiry interval has passed since the client left (a restart counts as
//! leaving, so no session ends early because the process was down).
//!
//! What a connected client has in flight lives in its connection's memory: if the process
//! dies while the client is connected, deliveries that came straight from publishers and were
//! not yet acknowledged are lost; those that came from the stored queue are sent again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use rumqttc::v5::mqttbytes::QoS;
use serde::{Deserialize, Serialize};
use tern_core::{DeviceId, TenantId, now_ms};
use tern_store::{Store, StoreError};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::codec::Version;
use crate::connection::to_publish;
use crate::retained::{decode_publish, encode_publish};
use crate::router::{Delivery, Mailbox, Router, SubscriptionOptions};

const SESSION_KIND: &str = "session";
const MESSAGE_KIND: &str = "session_message";
/// Records read per page when loading at start-up.
const LOAD_PAGE: usize = 1000;
/// How long a publisher waits to hand a message to a client that has just returned.
const HAND_OVER_WAIT: Duration = Duration::from_secs(5);

/// A subscription as a session keeps it (plain and `command/` filters alike).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SavedSubscription {
    pub filter: String,
    pub qos: u8,
    #[serde(default)]
    pub no_local: bool,
    #[serde(default)]
    pub retain_as_published: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<usize>,
}

impl SavedSubscription {
    pub fn new(filter: &str, options: SubscriptionOptions) -> Self {
        Self {
            filter: filter.to_string(),
            qos: options.qos as u8,
            no_local: options.no_local,
            retain_as_published: options.retain_as_published,
            id: options.id,
        }
    }

    pub fn options(&self) -> SubscriptionOptions {
        SubscriptionOptions {
            qos: qos(self.qos),
            no_local: self.no_local,
            retain_as_published: self.retain_as_published,
            id: self.id,
        }
    }
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

#[derive(Serialize, Deserialize)]
struct SessionRecord {
    expiry_secs: u32,
    subscriptions: Vec<SavedSubscription>,
}

/// A persistent session whose client is away.
pub(crate) struct Away {
    tenant: TenantId,
    device: DeviceId,
    /// The id its subscriptions have in the router while it is away.
    connection: u64,
    state: Mutex<AwayState>,
}

struct AwayState {
    queued: VecDeque<Queued>,
    /// Set when the client returned: a publisher that routed here just before goes straight
    /// to the client's queue.
    returned: Option<mpsc::Sender<Delivery>>,
    /// Expired: late deliveries are dropped.
    ended: bool,
    expires_at: Instant,
    subscriptions: Vec<SavedSubscription>,
    /// QoS 2 deliveries the client received (PUBREC) but did not complete: PUBREL is resent.
    released: Vec<u16>,
    /// QoS 2 packet ids the client sent and did not release yet.
    qos2_received: HashSet<u16>,
}

struct Queued {
    delivery: Delivery,
    expires_at_ms: Option<i64>,
}

impl Away {
    fn state(&self) -> MutexGuard<'_, AwayState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a client that left hands to its session.
#[derive(Default)]
pub(crate) struct Leftovers {
    /// Seconds the session outlives the connection.
    pub expiry_secs: u32,
    pub subscriptions: Vec<SavedSubscription>,
    /// Deliveries not completed, in the order they are owed (those in flight carry `resend`).
    pub deliveries: Vec<Delivery>,
    pub released: Vec<u16>,
    pub qos2_received: HashSet<u16>,
}

/// What a returning client gets back.
pub(crate) struct Resumed {
    pub subscriptions: Vec<SavedSubscription>,
    pub deliveries: Vec<Delivery>,
    pub released: Vec<u16>,
    pub qos2_received: HashSet<u16>,
}

/// What happened to the deliveries of one publish for away sessions.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Enqueued {
    pub stored: u64,
    /// The client had just returned: handed to its connection instead.
    pub handed_over: u64,
    /// The session's queue was full (`mqtt.max_queued_messages`) or the session ended.
    pub dropped: u64,
}

pub(crate) struct PersistentSessions {
    store: Arc<dyn Store>,
    away: Mutex<HashMap<(TenantId, DeviceId), Arc<Away>>>,
    /// `tern_bridge_sessions_away`, kept equal to `away`'s size.
    away_gauge: Gauge,
    /// Deletions of completed messages, waited for at shutdown.
    deletions: TaskTracker,
    next_seq: AtomicU64,
    max_queued: usize,
}

fn session_key(tenant: TenantId, device: DeviceId) -> String {
    format!("{tenant}/{device}")
}

fn message_key(tenant: TenantId, device: DeviceId, seq: u64) -> String {
    format!("{tenant}/{device}/{seq:020}")
}

impl PersistentSessions {
    /// Loads every stored session and its queued messages, subscribing them in `router` as
    /// away (their connection ids come from `connection_id`).
    pub async fn load(
        store: Arc<dyn Store>,
        router: &Router,
        max_queued: usize,
        away_gauge: Gauge,
        mut connection_id: impl FnMut() -> u64,
    ) -> Result<Self, StoreError> {
        let mut away = HashMap::new();
        let mut last_seq = 0;
        for (key, value) in list_all(&*store, SESSION_KIND, "").await? {
            let parsed = key
                .split_once('/')
                .and_then(|(t, d)| Some((TenantId::parse(t).ok()?, DeviceId::parse(d).ok()?)));
            let (Some((tenant, device)), Ok(record)) =
                (parsed, serde_json::from_slice::<SessionRecord>(&value))
            else {
                tracing::warn!(key, "skipping an unreadable session record");
                continue;
            };
            let mut queued = VecDeque::new();
            for (key, value) in list_all(&*store, MESSAGE_KIND, &format!("{key}/")).await? {
                let seq = key.rsplit('/').next().and_then(|s| s.parse::<u64>().ok());
                match (seq, decode_publish(value)) {
                    (Some(seq), Some((publish, expires_at_ms))) => {
                        last_seq = last_seq.max(seq);
                        let mut delivery = Delivery::from_publish(publish);
                        delivery.stored = Some(seq);
                        queued.push_back(Queued {
                            delivery,
                            expires_at_ms,
                        });
                    }
                    _ => tracing::warn!(key, "skipping an unreadable queued message"),
                }
            }
            let session = Arc::new(Away {
                tenant,
                device,
                connection: connection_id(),
                state: Mutex::new(AwayState {
                    queued,
                    returned: None,
                    ended: false,
                    expires_at: Instant::now() + expiry(record.expiry_secs),
                    subscriptions: record.subscriptions,
                    released: Vec::new(),
                    qos2_received: HashSet::new(),
                }),
            });
            subscribe_away(router, &session);
            away.insert((tenant, device), session);
        }
        if !away.is_empty() {
            tracing::info!(sessions = away.len(), "persistent sessions loaded");
        }
        let micros = u64::try_from(now_ms()).unwrap_or(0) * 1000;
        away_gauge.set(away.len() as i64);
        Ok(Self {
            store,
            away_gauge,
            deletions: TaskTracker::new(),
            away: Mutex::new(away),
            next_seq: AtomicU64::new(micros.max(last_seq + 1)),
            max_queued,
        })
    }

    fn away(&self) -> MutexGuard<'_, HashMap<(TenantId, DeviceId), Arc<Away>>> {
        self.away.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, tenant: TenantId, device: DeviceId) -> Option<Arc<Away>> {
        let mut away = self.away();
        let taken = away.remove(&(tenant, device));
        self.away_gauge.set(away.len() as i64);
        taken
    }

    /// Whether the device has a session to resume.
    pub fn has(&self, tenant: TenantId, device: DeviceId) -> bool {
        self.away().contains_key(&(tenant, device))
    }

    /// Takes back the session of a returning client (if it has one), moving its
    /// subscriptions to the new connection.
    pub fn resume(
        &self,
        router: &Router,
        tenant: TenantId,
        device: DeviceId,
        connection: u64,
        queue: &mpsc::Sender<Delivery>,
    ) -> Option<Resumed> {
        let session = self.take(tenant, device)?;
        router.rebind(
            tenant,
            session.connection,
            connection,
            Mailbox::Live(queue.clone()),
        );
        let mut state = session.state();
        state.returned = Some(queue.clone());
        let now = now_ms();
        let deliveries = state
            .queued
            .drain(..)
            .filter_map(|q| remaining(q, now))
            .collect();
        Some(Resumed {
            subscriptions: std::mem::take(&mut state.subscriptions),
            deliveries,
            released: std::mem::take(&mut state.released),
            qos2_received: std::mem::take(&mut state.qos2_received),
        })
    }

    /// Ends a client's session, if it has one (a clean start, or an expiry).
    pub async fn discard(
        &self,
        router: &Router,
        tenant: TenantId,
        device: DeviceId,
    ) -> Result<(), StoreError> {
        let session = self.take(tenant, device);
        if let Some(session) = &session {
            session.state().ended = true;
            router.drop_connection(tenant, session.connection);
        }
        self.delete_stored(tenant, device).await
    }

    async fn delete_stored(&self, tenant: TenantId, device: DeviceId) -> Result<(), StoreError> {
        let key = session_key(tenant, device);
        for (message, _) in list_all(&*self.store, MESSAGE_KIND, &format!("{key}/")).await? {
            self.store.delete_record(MESSAGE_KIND, &message).await?;
        }
        self.store.delete_record(SESSION_KIND, &key).await?;
        Ok(())
    }

    /// Writes a connected client's session (its expiry and subscriptions), durably.
    pub async fn save(
        &self,
        tenant: TenantId,
        device: DeviceId,
        expiry_secs: u32,
        subscriptions: Vec<SavedSubscription>,
    ) -> Result<(), StoreError> {
        let record = SessionRecord {
            expiry_secs,
            subscriptions,
        };
        let value = serde_json::to_vec(&record).map_err(|e| StoreError::Storage(e.to_string()))?;
        self.store
            .put_record(SESSION_KIND, &session_key(tenant, device), value.into())
            .await
    }

    /// Keeps the session of a client that left: its subscriptions stay in the router (as
    /// away) and what it was owed (`leftovers`, then whatever is still in its queue) is
    /// stored for its return.
    pub async fn park(
        &self,
        router: &Router,
        tenant: TenantId,
        device: DeviceId,
        connection: u64,
        leftovers: Leftovers,
        mut queue: Option<mpsc::Receiver<Delivery>>,
    ) -> Result<(), StoreError> {
        let session = Arc::new(Away {
            tenant,
            device,
            connection,
            state: Mutex::new(AwayState {
                queued: VecDeque::new(),
                returned: None,
                ended: false,
                expires_at: Instant::now() + expiry(leftovers.expiry_secs),
                subscriptions: leftovers.subscriptions.clone(),
                released: leftovers.released,
                qos2_received: leftovers.qos2_received,
            }),
        });
        let records = {
            // Locked until the router sends here, so that what the client was owed stays
            // ahead of what publishers store for it from now on.
            let mut state = session.state();
            router.rebind(
                tenant,
                connection,
                connection,
                Mailbox::Away(session.clone()),
            );
            let late = std::iter::from_fn(|| queue.as_mut().and_then(|q| q.try_recv().ok()));
            let now = now_ms();
            let mut records = Vec::new();
            for mut delivery in leftovers.deliveries.into_iter().chain(late) {
                // Commands wait in the registry, not here: they are owed again on return.
                if delivery.qos == QoS::AtMostOnce || delivery.command.is_some() {
                    continue;
                }
                let stored = delivery.stored.is_some();
                if !stored {
                    delivery.stored = Some(self.next_seq.fetch_add(1, Ordering::Relaxed));
                }
                let queued = Queued {
                    expires_at_ms: expires_at(&delivery, now),
                    delivery,
                };
                if !stored {
                    records.push(record(tenant, device, &queued));
                }
                state.queued.push_back(queued);
            }
            records
        };
        self.store.put_records(MESSAGE_KIND, records).await?;
        self.save(
            tenant,
            device,
            leftovers.expiry_secs,
            leftovers.subscriptions,
        )
        .await?;
        // Counted once stored: a client that sees it parked may rely on it surviving.
        let mut away = self.away();
        away.insert((tenant, device), session);
        self.away_gauge.set(away.len() as i64);
        Ok(())
    }

    /// Stores one publish's deliveries for away clients, durably and in one write; the
    /// publisher is acknowledged after. A client that has just returned gets its delivery
    /// handed to its connection instead.
    pub async fn enqueue(
        &self,
        deliveries: Vec<(Arc<Away>, Delivery)>,
    ) -> Result<Enqueued, StoreError> {
        let mut outcome = Enqueued::default();
        let mut records = Vec::new();
        let mut returned = Vec::new();
        for (session, mut delivery) in deliveries {
            let mut state = session.state();
            if let Some(queue) = state.returned.clone() {
                returned.push((queue, delivery));
            } else if state.ended || state.queued.len() >= self.max_queued {
                outcome.dropped += 1;
            } else {
                delivery.stored = Some(self.next_seq.fetch_add(1, Ordering::Relaxed));
                let queued = Queued {
                    expires_at_ms: expires_at(&delivery, now_ms()),
                    delivery,
                };
                records.push(record(session.tenant, session.device, &queued));
                state.queued.push_back(queued);
                outcome.stored += 1;
            }
        }
        self.store.put_records(MESSAGE_KIND, records).await?;
        for (queue, delivery) in returned {
            match queue.send_timeout(delivery, HAND_OVER_WAIT).await {
                Ok(()) => outcome.handed_over += 1,
                Err(_) => outcome.dropped += 1,
            }
        }
        Ok(outcome)
    }

    /// A stored delivery the client completed: its record goes (in the background).
    pub fn completed(&self, tenant: TenantId, device: DeviceId, seq: u64) {
        let store = self.store.clone();
        self.deletions.spawn(async move {
            let key = message_key(tenant, device, seq);
            if let Err(e) = store.delete_record(MESSAGE_KIND, &key).await {
                tracing::warn!(error = %e, key, "cannot delete a delivered session message");
            }
        });
    }

    /// Waits for the deletions under way (at shutdown, after the last connection ended), so
    /// that a restart does not send completed messages again.
    pub async fn flush(&self) {
        self.deletions.close();
        self.deletions.wait().await;
    }

    /// Ends the sessions whose expiry passed; returns how many.
    pub async fn sweep(&self, router: &Router) -> usize {
        let now = Instant::now();
        // Taken out of the map in one step with the check: a session its client resumed (or
        // resumed and parked again, with a new expiry) since is not this one any more.
        let expired: Vec<Arc<Away>> = {
            let mut away = self.away();
            let keys: Vec<(TenantId, DeviceId)> = away
                .iter()
                .filter(|(_, s)| s.state().expires_at <= now)
                .map(|(key, _)| *key)
                .collect();
            let taken = keys.iter().filter_map(|key| away.remove(key)).collect();
            self.away_gauge.set(away.len() as i64);
            taken
        };
        for session in &expired {
            let (tenant, device) = (session.tenant, session.device);
            tracing::info!(%tenant, %device, "persistent session expired");
            session.state().ended = true;
            router.drop_connection(tenant, session.connection);
            if let Err(e) = self.delete_stored(tenant, device).await {
                tracing::warn!(error = %e, %tenant, %device, "cannot delete an expired session");
            }
        }
        expired.len()
    }
}

/// A session expiry interval as a duration (`u32::MAX` is "never", 3.1.2.11.2).
fn expiry(secs: u32) -> Duration {
    if secs == u32::MAX {
        Duration::from_secs(100 * 365 * 24 * 3600)
    } else {
        Duration::from_secs(u64::from(secs))
    }
}

fn subscribe_away(router: &Router, session: &Arc<Away>) {
    for s in &session.state().subscriptions {
        if !crate::commands::is_device_topic(&s.filter) {
            router.subscribe(
                session.tenant,
                session.connection,
                &s.filter,
                s.options(),
                Mailbox::Away(session.clone()),
            );
        }
    }
}

/// When a delivery's MQTT 5 message expiry interval runs out.
fn expires_at(delivery: &Delivery, now: i64) -> Option<i64> {
    delivery
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
        .map(|secs| now + i64::from(secs) * 1000)
}

/// A queued delivery unless it expired (3.3.2-5), with the expiry interval that remains.
fn remaining(queued: Queued, now: i64) -> Option<Delivery> {
    let Queued {
        mut delivery,
        expires_at_ms,
    } = queued;
    if let Some(at) = expires_at_ms {
        if at <= now {
            return None;
        }
        let mut properties = delivery.properties.as_deref().cloned().unwrap_or_default();
        properties.message_expiry_interval =
            Some(((at - now + 999) / 1000).clamp(1, i64::from(u32::MAX)) as u32);
        delivery.properties = Some(Arc::new(properties));
    }
    Some(delivery)
}

fn record(tenant: TenantId, device: DeviceId, queued: &Queued) -> (String, Bytes) {
    let seq = queued.delivery.stored.unwrap_or_default();
    let mut publish = to_publish(queued.delivery.clone(), Version::V5);
    publish.pkid = queued.delivery.resend.unwrap_or(1);
    publish.dup = queued.delivery.resend.is_some();
    (
        message_key(tenant, device, seq),
        encode_publish(publish, queued.expires_at_ms),
    )
}

async fn list_all(
    store: &dyn Store,
    kind: &str,
    prefix: &str,
) -> Result<Vec<(String, Bytes)>, StoreError> {
    let mut all = Vec::new();
    loop {
        let after = all.last().map(|(key, _): &(String, Bytes)| key.clone());
        let page = store
            .list_records(kind, prefix, after.as_deref(), LOAD_PAGE)
            .await?;
        let full = page.len() == LOAD_PAGE;
        all.extend(page);
        if !full {
            return Ok(all);
        }
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use tern_store::EmbeddedStore;

    use super::*;

    fn delivery(payload: &'static str, qos: QoS) -> Delivery {
        Delivery::new(
            "t/a".into(),
            Bytes::from_static(payload.as_bytes()),
            qos,
            false,
        )
    }

    fn payloads(resumed: &Resumed) -> Vec<(&[u8], Option<u16>)> {
        resumed
            .deliveries
            .iter()
            .map(|d| (&d.payload[..], d.resend))
            .collect()
    }

    async fn open(dir: &tempfile::TempDir, router: &Router) -> PersistentSessions {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let mut ids = 100..;
        PersistentSessions::load(store, router, 3, Gauge::default(), || {
            ids.next().expect("ids")
        })
        .await
        .expect("load")
    }

    #[tokio::test]
    async fn parked_sessions_queue_in_order_survive_a_reload_and_resume() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tenant, device) = (TenantId::random(), DeviceId::random());
        let subscription = SavedSubscription::new(
            "t/#",
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                id: Some(7),
            },
        );
        {
            let router = Router::default();
            let sessions = open(&dir, &router).await;
            let (queue, _rx) = mpsc::channel(8);
            router.subscribe(
                tenant,
                1,
                "t/#",
                subscription.options(),
                Mailbox::Live(queue),
            );
            let mut in_flight = delivery("in flight", QoS::AtLeastOnce);
            in_flight.resend = Some(42);
            let leftovers = Leftovers {
                expiry_secs: 600,
                subscriptions: vec![subscription.clone()],
                deliveries: vec![in_flight, delivery("qos 0", QoS::AtMostOnce)],
                ..Leftovers::default()
            };
            sessions
                .park(&router, tenant, device, 1, leftovers, None)
                .await
                .expect("park");
            assert!(sessions.has(tenant, device));

            let payload = Bytes::from_static(b"routed");
            let routed = router.route(
                tenant,
                &crate::router::Message {
                    topic: "t/b",
                    payload: &payload,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    properties: None,
                    from: None,
                },
            );
            assert_eq!(routed.away.len(), 1, "routed to the away session");
            let (away, routed) = routed.away.into_iter().next().expect("away");
            let enqueue = |d: Delivery| sessions.enqueue(vec![(away.clone(), d)]);
            let stored = Enqueued {
                stored: 1,
                ..Enqueued::default()
            };
            assert_eq!(enqueue(routed).await.expect("enqueue"), stored);
            let mut expiring = delivery("expired", QoS::AtLeastOnce);
            expiring.properties = Some(Arc::new(PublishProperties {
                message_expiry_interval: Some(0),
                ..PublishProperties::default()
            }));
            assert_eq!(enqueue(expiring).await.expect("enqueue"), stored);
            assert_eq!(
                enqueue(delivery("over", QoS::AtLeastOnce))
                    .await
                    .expect("enqueue"),
                Enqueued {
                    dropped: 1,
                    ..Enqueued::default()
                },
                "the queue holds max_queued"
            );
        }
        // A restart: everything comes back from the store.
        let router = Router::default();
        let sessions = open(&dir, &router).await;
        let (queue, mut rx) = mpsc::channel(8);
        let resumed = sessions
            .resume(&router, tenant, device, 5, &queue)
            .expect("resumed");
        assert_eq!(resumed.subscriptions, vec![subscription]);
        assert_eq!(
            payloads(&resumed),
            vec![(&b"in flight"[..], Some(42)), (&b"routed"[..], None)],
            "in order, QoS 0 and expired messages dropped"
        );
        assert_eq!(resumed.deliveries[1].subscription_ids, vec![7]);
        assert!(!sessions.has(tenant, device));
        // Its subscription now feeds the new connection.
        let payload = Bytes::from_static(b"live");
        router.route(
            tenant,
            &crate::router::Message {
                topic: "t/c",
                payload: &payload,
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: None,
                from: None,
            },
        );
        assert_eq!(rx.try_recv().expect("live").payload, payload);
    }

    #[tokio::test]
    async fn expired_and_discarded_sessions_leave_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tenant, device) = (TenantId::random(), DeviceId::random());
        {
            let router = Router::default();
            let sessions = open(&dir, &router).await;
            let leftovers = Leftovers {
                expiry_secs: 0,
                deliveries: vec![delivery("owed", QoS::AtLeastOnce)],
                ..Leftovers::default()
            };
            sessions
                .park(&router, tenant, device, 1, leftovers, None)
                .await
                .expect("park");
            assert_eq!(sessions.sweep(&router).await, 1);
            assert!(!sessions.has(tenant, device));
        }
        let router = Router::default();
        let sessions = open(&dir, &router).await;
        assert!(!sessions.has(tenant, device), "deleted from the store too");
        let records = sessions
            .store
            .list_records(MESSAGE_KIND, "", None, 10)
            .await
            .expect("list");
        assert!(records.is_empty());
    }
}
