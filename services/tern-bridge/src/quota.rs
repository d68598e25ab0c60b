//! Per-tenant and per-device limits: connections per tenant (refused with MQTT 5 "quota
//! exceeded") and publishes per second per device and per tenant (token buckets; a device over
//! either rate is slowed down by not reading its connection, never by dropping what it sent).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_core::TenantId;
use tokio::time::Instant;

/// Publishes per second with a burst of one second's worth.
pub(crate) struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate_per_s: u32, now: Instant) -> Self {
        let rate = f64::from(rate_per_s.max(1));
        Self {
            rate,
            tokens: rate,
            last: now,
        }
    }

    /// Takes one token; when the bucket is empty, how long until the next one.
    pub fn take(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.last = now;
        self.tokens -= 1.0;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// One bucket per tenant, shared by all its connections (`mqtt.max_publish_rate_per_tenant`).
#[derive(Default)]
pub(crate) struct TenantRates {
    buckets: Mutex<HashMap<TenantId, TokenBucket>>,
}

impl TenantRates {
    /// Takes one of the tenant's tokens; when none is left, how long until the next one.
    pub fn take(&self, tenant: TenantId, rate_per_s: u32, now: Instant) -> Option<Duration> {
        self.buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tenant)
            .or_insert_with(|| TokenBucket::new(rate_per_s, now))
            .take(now)
    }
}

/// Open connections per tenant.
#[derive(Default)]
pub(crate) struct TenantConnections {
    open: Mutex<HashMap<TenantId, usize>>,
}

/// Holds one of a tenant's connection slots until dropped.
pub(crate) struct TenantSlot {
    connections: Arc<TenantConnections>,
    tenant: TenantId,
}

impl TenantConnections {
    /// A slot, unless the tenant already has `limit` connections (0: no limit).
    pub fn reserve(self: &Arc<Self>, tenant: TenantId, limit: usize) -> Option<TenantSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(tenant).or_default();
        if limit > 0 && *count >= limit {
            return None;
        }
        *count += 1;
        Some(TenantSlot {
            connections: self.clone(),
            tenant,
        })
    }
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        let mut open = self
            .connections
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_paces() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, start);
        for _ in 0..10 {
            assert_eq!(bucket.take(start), None, "one second's burst");
        }
        let wait = bucket.take(start).expect("empty");
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        // After the wait, the debt is paid and the next token is due 0.1 s later.
        assert_eq!(bucket.take(start + Duration::from_millis(200)), None);
        assert!(bucket.take(start + Duration::from_millis(200)).is_some());
    }

    #[test]
    fn a_tenants_connections_share_one_bucket_and_tenants_do_not() {
        let rates = TenantRates::default();
        let (a, b) = (TenantId::random(), TenantId::random());
        let now = Instant::now();
        for _ in 0..5 {
            assert_eq!(rates.take(a, 5, now), None);
        }
        assert!(
            rates.take(a, 5, now).is_some(),
            "a's burst is spent, whoever asks"
        );
        assert_eq!(rates.take(b, 5, now), None, "b has its own");
    }

    #[test]
    fn tenants_have_their_own_connection_limit() {
        let connections = Arc::new(TenantConnections::default());
        let (a, b) = (TenantId::random(), TenantId::random());
        let first = connections.reserve(a, 2).expect("1");
        let _second = connections.reserve(a, 2).expect("2");
        assert!(connections.reserve(a, 2).is_none(), "a is full");
        assert!(connections.reserve(b, 2).is_some(), "b is not");
        drop(first);
        assert!(connections.reserve(a, 2).is_some(), "a slot came back");
        assert!(connections.reserve(a, 0).is_some(), "0 means no limit");
    }
}
