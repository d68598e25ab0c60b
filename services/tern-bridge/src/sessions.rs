//! Live connections by device: for session takeover (when a device connects again, the older
//! connection is closed, MQTT 3.1.1 section 3.1.4) and for revocation (a disabled, deleted or
//! revoked device's connection is closed at once).

use std::collections::HashMap;
use std::sync::Mutex;

use tern_core::{DeviceId, TenantId};
use tern_registry::AccessRevoked;
use tokio_util::sync::CancellationToken;

struct Live {
    id: u64,
    taken_over: CancellationToken,
    revoked: CancellationToken,
}

#[derive(Default)]
pub(crate) struct Sessions {
    live: Mutex<HashMap<(TenantId, DeviceId), Live>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// Removes the session when the connection ends (unless a newer one took it over).
pub(crate) struct SessionGuard<'a> {
    sessions: &'a Sessions,
    key: (TenantId, DeviceId),
    /// Unique per connection for the life of the process.
    pub id: u64,
    /// Cancelled when a newer connection of the device takes over.
    pub closed: CancellationToken,
    /// Cancelled when the device's access is revoked.
    pub revoked: CancellationToken,
}

impl Sessions {
    /// Registers a connection and closes the device's previous one, if any.
    pub fn claim(&self, tenant: TenantId, device: DeviceId) -> SessionGuard<'_> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (closed, revoked) = (CancellationToken::new(), CancellationToken::new());
        let previous = self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(
            (tenant, device),
            Live {
                id,
                taken_over: closed.clone(),
                revoked: revoked.clone(),
            },
        );
        if let Some(old) = previous {
            old.taken_over.cancel();
        }
        SessionGuard {
            sessions: self,
            key: (tenant, device),
            id,
            closed,
            revoked,
        }
    }
}

impl AccessRevoked for Sessions {
    fn access_revoked(&self, tenant: TenantId, device: DeviceId) {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(session) = live.get(&(tenant, device)) {
            session.revoked.cancel();
        }
    }
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        let mut live = self.sessions.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.get(&self.key).is_some_and(|l| l.id == self.id) {
            live.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_closes_the_first_and_survives_its_drop() {
        let sessions = Sessions::default();
        let (t, d) = (TenantId::random(), DeviceId::random());
        let first = sessions.claim(t, d);
        let second = sessions.claim(t, d);
        assert!(first.closed.is_cancelled());
        assert!(!second.closed.is_cancelled());
        drop(first);
        let third = sessions.claim(t, d);
        assert!(
            second.closed.is_cancelled(),
            "the first guard's drop must not remove the second"
        );
        drop(third);
        assert!(sessions.live.lock().expect("lock").is_empty());
    }

    #[test]
    fn revocation_closes_only_that_devices_live_session() {
        let sessions = Sessions::default();
        let (t, d) = (TenantId::random(), DeviceId::random());
        let other = sessions.claim(t, DeviceId::random());
        let live = sessions.claim(t, d);
        sessions.access_revoked(t, d);
        assert!(live.revoked.is_cancelled());
        assert!(!live.closed.is_cancelled(), "not a takeover");
        assert!(!other.revoked.is_cancelled());
        sessions.access_revoked(TenantId::random(), d);
    }
}
