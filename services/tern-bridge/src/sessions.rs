//! Live connections by device: for session takeover (when a device connects again, the older
//! connection is closed, MQTT 3.1.1 section 3.1.4) and for revocation (a disabled, deleted or
//! revoked device's connection is closed at once). A new connection waits for the one it
//! replaces to end, so that a persistent session is parked before it is taken back, and
//! cancels the device's delayed will (MQTT 5 Will Delay Interval, 3.1.3.2.2).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tern_core::{DeviceId, TenantId};
use tern_registry::AccessRevoked;
use tern_registry::nats::{DevicePresence, TakenOver};
use tokio_util::sync::CancellationToken;

/// How long a new connection waits for the one it replaces to wind down.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

struct Live {
    id: u64,
    taken_over: CancellationToken,
    revoked: CancellationToken,
    /// Cancelled when the connection has ended (its guard dropped).
    ended: CancellationToken,
}

#[derive(Default)]
pub(crate) struct Sessions {
    live: Mutex<HashMap<(TenantId, DeviceId), Live>>,
    /// Wills waiting out their delay, cancelled when the device connects again.
    delayed_wills: Mutex<HashMap<(TenantId, DeviceId), CancellationToken>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Told of every claim and every guard's drop (the NATS endpoint, in the distributed mode).
    presence: OnceLock<Arc<dyn DevicePresence>>,
}

/// Removes the session when the connection ends (unless a newer one took it over).
pub(crate) struct SessionGuard {
    sessions: Arc<Sessions>,
    key: (TenantId, DeviceId),
    /// Unique per connection for the life of the process.
    pub id: u64,
    /// Cancelled when a newer connection of the device takes over.
    pub closed: CancellationToken,
    /// Cancelled when the device's access is revoked.
    pub revoked: CancellationToken,
    ended: CancellationToken,
}

impl Sessions {
    /// A connection id unique for the life of the process (also used for the subscriptions
    /// of persistent sessions loaded at start-up).
    pub fn next_id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_presence(&self, presence: Arc<dyn DevicePresence>) {
        let _ = self.presence.set(presence);
    }

    /// Registers a connection, closes the device's previous one (if any) and waits for it to
    /// end; cancels the device's delayed will.
    pub async fn claim(self: &Arc<Self>, tenant: TenantId, device: DeviceId) -> SessionGuard {
        if let Some(presence) = self.presence.get() {
            presence.attached(tenant, device);
        }
        let id = self.next_id();
        let (closed, revoked, ended) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let previous = self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(
            (tenant, device),
            Live {
                id,
                taken_over: closed.clone(),
                revoked: revoked.clone(),
                ended: ended.clone(),
            },
        );
        let guard = SessionGuard {
            sessions: self.clone(),
            key: (tenant, device),
            id,
            closed,
            revoked,
            ended,
        };
        if let Some(old) = previous {
            old.taken_over.cancel();
            if tokio::time::timeout(TAKEOVER_WAIT, old.ended.cancelled())
                .await
                .is_err()
            {
                tracing::warn!(%tenant, %device, "the replaced connection did not end in time");
            }
        }
        // After the previous connection ended: it may have just delayed its will.
        if let Some(will) = self.delayed_wills().remove(&(tenant, device)) {
            will.cancel();
        }
        guard
    }

    /// Registers a will waiting out its delay; the token is cancelled if the device connects
    /// again first.
    pub fn delay_will(&self, tenant: TenantId, device: DeviceId) -> CancellationToken {
        let token = CancellationToken::new();
        if let Some(older) = self.delayed_wills().insert((tenant, device), token.clone()) {
            older.cancel();
        }
        token
    }

    /// Forgets a delayed will that was published.
    pub fn will_published(&self, tenant: TenantId, device: DeviceId, token: &CancellationToken) {
        let mut wills = self.delayed_wills();
        if wills.get(&(tenant, device)).is_some_and(|t| t.eq(token)) {
            wills.remove(&(tenant, device));
        }
    }

    fn delayed_wills(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(TenantId, DeviceId), CancellationToken>> {
        self.delayed_wills.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TakenOver for Sessions {
    fn taken_over(&self, tenant: TenantId, device: DeviceId) {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(session) = live.get(&(tenant, device)) {
            session.taken_over.cancel();
        }
    }
}

#[async_trait::async_trait]
impl AccessRevoked for Sessions {
    async fn access_revoked(&self, tenant: TenantId, device: DeviceId) {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(session) = live.get(&(tenant, device)) {
            session.revoked.cancel();
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut live = self.sessions.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.get(&self.key).is_some_and(|l| l.id == self.id) {
            live.remove(&self.key);
        }
        if let Some(presence) = self.sessions.presence.get() {
            presence.detached(self.key.0, self.key.1);
        }
        self.ended.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_claim_closes_the_first_waits_for_it_and_survives_its_drop() {
        let sessions = Arc::new(Sessions::default());
        let (t, d) = (TenantId::random(), DeviceId::random());
        let first = sessions.claim(t, d).await;
        let claiming = tokio::spawn({
            let sessions = sessions.clone();
            async move { sessions.claim(t, d).await }
        });
        first.closed.cancelled().await;
        tokio::task::yield_now().await;
        assert!(!claiming.is_finished(), "waits for the first to end");
        drop(first);
        let second = claiming.await.expect("claimed");
        assert!(!second.closed.is_cancelled());
        let third = tokio::spawn({
            let sessions = sessions.clone();
            async move { sessions.claim(t, d).await }
        });
        second.closed.cancelled().await;
        drop(second);
        let third = third.await.expect("claimed");
        drop(third);
        assert!(sessions.live.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn a_new_connection_cancels_the_delayed_will() {
        let sessions = Arc::new(Sessions::default());
        let (t, d) = (TenantId::random(), DeviceId::random());
        let will = sessions.delay_will(t, d);
        let other = sessions.delay_will(t, DeviceId::random());
        let _live = sessions.claim(t, d).await;
        assert!(will.is_cancelled());
        assert!(!other.is_cancelled());
    }

    #[tokio::test]
    async fn revocation_closes_only_that_devices_live_session() {
        let sessions = Arc::new(Sessions::default());
        let (t, d) = (TenantId::random(), DeviceId::random());
        let other = sessions.claim(t, DeviceId::random()).await;
        let live = sessions.claim(t, d).await;
        sessions.access_revoked(t, d).await;
        assert!(live.revoked.is_cancelled());
        assert!(!live.closed.is_cancelled(), "not a takeover");
        assert!(!other.revoked.is_cancelled());
        sessions.access_revoked(TenantId::random(), d).await;
    }
}
