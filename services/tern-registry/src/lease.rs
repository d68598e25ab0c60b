//! Leases: which process does a platform-wide chore (advancing OTA campaigns, sweeping
//! retention, posting webhooks, rotating signing keys) when several share a store. A lease is
//! a store record `{holder, expires_at_ms}` taken and renewed by compare-and-swap, so at most
//! one holder has it at a time; a holder that dies loses it when it expires. With one process
//! (`tern up`) it always holds its leases.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tern_core::now_ms;
use tern_store::Store;
use uuid::Uuid;

use crate::RegistryError;

const LEASE: &str = "lease";

#[derive(Serialize, Deserialize)]
struct Record {
    holder: Uuid,
    expires_at_ms: i64,
}

pub struct Lease {
    store: Arc<dyn Store>,
    name: String,
    holder: Uuid,
    ttl: Duration,
}

impl Lease {
    /// The lease `name` for this process, held for `ttl` at a time: renew it well within that
    /// (every tick of the chore it guards).
    pub fn new(store: Arc<dyn Store>, name: &str, ttl: Duration) -> Self {
        Self {
            store,
            name: name.to_string(),
            holder: Uuid::new_v4(),
            ttl,
        }
    }

    /// Takes or renews the lease; whether this process holds it now.
    pub async fn hold(&self) -> Result<bool, RegistryError> {
        let current = self.store.get_record(LEASE, &self.name).await?;
        let now = now_ms();
        if let Some(bytes) = &current {
            let held = serde_json::from_slice::<Record>(bytes).ok();
            if held.is_some_and(|r| r.holder != self.holder && r.expires_at_ms > now) {
                return Ok(false);
            }
        }
        let mine = Record {
            holder: self.holder,
            expires_at_ms: now + self.ttl.as_millis() as i64,
        };
        let bytes = Bytes::from(serde_json::to_vec(&mine).unwrap_or_default());
        Ok(self
            .store
            .compare_and_swap(LEASE, &self.name, current, Some(bytes))
            .await?)
    }

    /// Gives the lease up (at shutdown), so another process takes over at once.
    pub async fn release(&self) {
        let Ok(Some(current)) = self.store.get_record(LEASE, &self.name).await else {
            return;
        };
        let mine =
            serde_json::from_slice::<Record>(&current).is_ok_and(|r| r.holder == self.holder);
        if mine {
            let _ = self
                .store
                .compare_and_swap(LEASE, &self.name, Some(current), None)
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use tern_store::EmbeddedStore;

    use super::*;

    #[tokio::test]
    async fn one_holder_at_a_time_until_it_expires_or_is_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let ttl = Duration::from_millis(300);
        let (a, b) = (
            Lease::new(store.clone(), "chore", ttl),
            Lease::new(store.clone(), "chore", ttl),
        );
        assert!(a.hold().await.expect("hold"));
        assert!(!b.hold().await.expect("hold"), "a holds it");
        assert!(a.hold().await.expect("renew"), "a renews");
        assert!(
            Lease::new(store.clone(), "other", ttl)
                .hold()
                .await
                .expect("hold"),
            "leases are independent"
        );
        tokio::time::sleep(ttl + Duration::from_millis(50)).await;
        assert!(b.hold().await.expect("hold"), "a's lease expired");
        assert!(!a.hold().await.expect("hold"), "now b holds it");
        b.release().await;
        assert!(a.hold().await.expect("hold"), "released: taken at once");
    }
}
