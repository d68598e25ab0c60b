//! Retention: how long a tenant keeps raw points and each rollup resolution. A sweeper deletes
//! what has aged out, so a tenant can keep a year of hourly data without a year of raw points.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tern_core::{TenantId, ValidationError, now_ms};
use tern_registry::{Lease, RegistryError};
use tern_runtime::Shutdown;
use tern_store::{Resolution, Store};

const RETENTION: &str = "retention";
const DAY_MS: i64 = 86_400_000;
/// The longest retention that can be set, in days (100 years).
const MAX_DAYS: u32 = 36_500;

/// Days to keep, per resolution; absent means forever.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_days: Option<u32>,
    #[serde(default, rename = "1m_days", skip_serializing_if = "Option::is_none")]
    pub minute_days: Option<u32>,
    #[serde(default, rename = "1h_days", skip_serializing_if = "Option::is_none")]
    pub hour_days: Option<u32>,
    #[serde(default, rename = "1d_days", skip_serializing_if = "Option::is_none")]
    pub day_days: Option<u32>,
}

impl RetentionPolicy {
    /// Each resolution (`None` = raw) with its days, finest first.
    fn levels(&self) -> [(Option<Resolution>, &'static str, Option<u32>); 4] {
        [
            (None, "raw_days", self.raw_days),
            (Some(Resolution::Minute), "1m_days", self.minute_days),
            (Some(Resolution::Hour), "1h_days", self.hour_days),
            (Some(Resolution::Day), "1d_days", self.day_days),
        ]
    }

    /// Days are 1..=36500, and a coarser resolution is kept at least as long as a finer one
    /// (else `resolution=auto` would find holes where the finer data still is).
    pub fn validate(&self) -> Result<(), ValidationError> {
        let levels = self.levels();
        for (_, field, days) in levels {
            if days.is_some_and(|d| d == 0 || d > MAX_DAYS) {
                return Err(ValidationError::new(
                    field,
                    format!("must be 1..={MAX_DAYS} days, or absent to keep forever"),
                ));
            }
        }
        for pair in levels.windows(2) {
            let (finer, coarser) = (pair[0], pair[1]);
            let forever = |d: Option<u32>| d.unwrap_or(u32::MAX);
            if forever(coarser.2) < forever(finer.2) {
                return Err(ValidationError::new(
                    coarser.1,
                    format!(
                        "must be at least `{}`: a coarser resolution is kept at least as long as a finer one",
                        finer.1
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `[retention]` in the config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// How often aged-out telemetry is deleted.
    pub sweep_interval_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            sweep_interval_secs: 3600,
        }
    }
}

pub struct Retention {
    store: Arc<dyn Store>,
}

impl Retention {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    pub async fn get(&self, tenant: TenantId) -> Result<RetentionPolicy, RegistryError> {
        let key = tenant.to_string();
        match self.store.get_record(RETENTION, &key).await? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| RegistryError::Corrupt {
                key,
                reason: e.to_string(),
            }),
            None => Ok(RetentionPolicy::default()),
        }
    }

    pub async fn set(
        &self,
        tenant: TenantId,
        policy: RetentionPolicy,
    ) -> Result<RetentionPolicy, RegistryError> {
        policy.validate()?;
        let bytes = Bytes::from(serde_json::to_vec(&policy).unwrap_or_default());
        self.store
            .put_record(RETENTION, &tenant.to_string(), bytes)
            .await?;
        Ok(policy)
    }

    /// Deletes, for every tenant with a policy, what its policy no longer keeps. Returns the
    /// number of entries deleted.
    pub async fn sweep(&self) -> Result<u64, RegistryError> {
        let now = now_ms();
        let mut deleted = 0;
        for (tenant, bytes) in self
            .store
            .list_records(RETENTION, "", None, usize::MAX)
            .await?
        {
            let policy: RetentionPolicy =
                serde_json::from_slice(&bytes).map_err(|e| RegistryError::Corrupt {
                    key: tenant.clone(),
                    reason: e.to_string(),
                })?;
            for (resolution, _, days) in policy.levels() {
                if let Some(days) = days {
                    let before = now - i64::from(days) * DAY_MS;
                    deleted += self
                        .store
                        .delete_before(&tenant, resolution, before)
                        .await?;
                }
            }
        }
        Ok(deleted)
    }

    /// Sweeps every `every` until `shutdown`.
    pub async fn run(self: Arc<Self>, every: Duration, shutdown: Shutdown) {
        let mut tick = tokio::time::interval(every);
        // One process sweeps when several share the store (sweeps are idempotent, so a lease
        // that lapses between two hourly ticks only lets another process take a turn).
        let ttl = (every * 3).min(Duration::from_secs(600));
        let lease = Lease::new(self.store.clone(), "retention-sweep", ttl);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    lease.release().await;
                    return;
                }
                _ = tick.tick() => {}
            }
            match lease.hold().await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "retention: cannot read its lease");
                    continue;
                }
            }
            match self.sweep().await {
                Ok(0) => {}
                Ok(deleted) => {
                    tracing::info!(deleted, "retention sweep deleted aged-out telemetry")
                }
                Err(e) => tracing::error!(error = %e, "retention sweep failed; will retry"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarser_resolutions_are_kept_at_least_as_long() {
        let ok = RetentionPolicy {
            raw_days: Some(30),
            minute_days: Some(90),
            hour_days: None,
            day_days: None,
        };
        assert!(ok.validate().is_ok());
        let bad = RetentionPolicy {
            raw_days: Some(30),
            minute_days: Some(7),
            ..Default::default()
        };
        assert_eq!(
            bad.validate().map_err(|e| e.field),
            Err("1m_days".to_string())
        );
        let forever_raw = RetentionPolicy {
            hour_days: Some(365),
            ..Default::default()
        };
        assert_eq!(
            forever_raw.validate().map_err(|e| e.field),
            Err("1h_days".to_string()),
            "raw forever, hours not"
        );
        let zero = RetentionPolicy {
            raw_days: Some(0),
            ..Default::default()
        };
        assert_eq!(
            zero.validate().map_err(|e| e.field),
            Err("raw_days".to_string())
        );
    }
}
