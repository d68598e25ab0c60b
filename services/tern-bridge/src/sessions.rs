//! Live connections by device, for session takeover: when a device connects again, the older
//! connection is closed (MQTT 3.1.1 section 3.1.4).

use std::collections::HashMap;
use std::sync::Mutex;

use tern_core::{DeviceId, TenantId};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub(crate) struct Sessions {
    live: Mutex<HashMap<(TenantId, DeviceId), (u64, CancellationToken)>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// Removes the session when the connection ends (unless a newer one took it over).
pub(crate) struct SessionGuard<'a> {
    sessions: &'a Sessions,
    key: (TenantId, DeviceId),
    /// Unique per connection for the life of the process.
    pub id: u64,
    pub closed: CancellationToken,
}

impl Sessions {
    /// Registers a connection and closes the device's previous one, if any.
    pub fn claim(&self, tenant: TenantId, device: DeviceId) -> SessionGuard<'_> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let closed = CancellationToken::new();
        let previous = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((tenant, device), (id, closed.clone()));
        if let Some((_, old)) = previous {
            old.cancel();
        }
        SessionGuard {
            sessions: self,
            key: (tenant, device),
            id,
            closed,
        }
    }
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        let mut live = self.sessions.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
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
}
