//! Decision audit: who asked for what, which policies decided, and the outcome; off, sampled or
//! in full, per tenant. Records are written off the request path and listed newest first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use tern_core::{TenantId, ValidationError, now_ms};
use tern_store::Store;

use super::{AccessRequest, Decision};
use crate::{IdentityError, records};

const CONFIG: &str = "pdp_audit_config";
const RECORD: &str = "pdp_audit";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditMode {
    #[default]
    Off,
    /// A fraction (`sample_rate`) of decisions, and every Deny and Indeterminate.
    Sampled,
    Full,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    pub mode: AuditMode,
    /// For `sampled`: 0 < rate ≤ 1.
    #[serde(default = "default_rate")]
    pub sample_rate: f64,
}

fn default_rate() -> f64 {
    0.01
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            mode: AuditMode::Off,
            sample_rate: default_rate(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at_ms: i64,
    pub policy_version: u64,
    pub request: AccessRequest,
    pub decision: Decision,
}

pub struct Auditor {
    store: Arc<dyn Store>,
    configs: RwLock<HashMap<TenantId, AuditConfig>>,
    sequence: AtomicU64,
}

impl Auditor {
    pub(super) fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            configs: RwLock::new(HashMap::new()),
            sequence: AtomicU64::new(0),
        }
    }

    pub async fn config(&self, tenant: TenantId) -> Result<AuditConfig, IdentityError> {
        if let Some(c) = self
            .configs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&tenant)
        {
            return Ok(c.clone());
        }
        let config: AuditConfig = records::get(&*self.store, CONFIG, &tenant.to_string())
            .await?
            .unwrap_or_default();
        self.configs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tenant, config.clone());
        Ok(config)
    }

    pub async fn set_config(
        &self,
        tenant: TenantId,
        config: AuditConfig,
    ) -> Result<(), IdentityError> {
        if !(config.sample_rate > 0.0 && config.sample_rate <= 1.0) {
            return Err(
                ValidationError::new("sample_rate", "must be above 0 and at most 1").into(),
            );
        }
        records::put(&*self.store, CONFIG, &tenant.to_string(), &config).await?;
        self.configs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tenant, config);
        Ok(())
    }

    pub(super) async fn record(
        &self,
        tenant: TenantId,
        policy_version: u64,
        request: &AccessRequest,
        decision: &Decision,
    ) {
        let config = match self.config(tenant).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(%tenant, error = %e, "cannot read the audit configuration");
                return;
            }
        };
        let wanted = match config.mode {
            AuditMode::Off => false,
            AuditMode::Full => true,
            AuditMode::Sampled => !decision.allowed() || sample(config.sample_rate),
        };
        if !wanted {
            return;
        }
        let at_ms = now_ms();
        let record = AuditRecord {
            at_ms,
            policy_version,
            request: request.clone(),
            decision: decision.clone(),
        };
        // Newest first in key order; the sequence orders decisions of the same millisecond.
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        let key = format!("{tenant}/{:020}-{:020}", i64::MAX - at_ms, u64::MAX - seq);
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = records::put(&*store, RECORD, &key, &record).await {
                tracing::error!(error = %e, "cannot write an audit record");
            }
        });
    }

    /// The most recent audit records of a tenant.
    pub async fn recent(
        &self,
        tenant: TenantId,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, IdentityError> {
        let page = self
            .store
            .list_records(RECORD, &format!("{tenant}/"), None, limit)
            .await?;
        page.into_iter()
            .map(|(_, bytes)| {
                serde_json::from_slice(&bytes)
                    .map_err(|e| IdentityError::Keys(format!("corrupt audit record: {e}")))
            })
            .collect()
    }
}

fn sample(rate: f64) -> bool {
    let mut b = [0u8; 4];
    if SystemRandom::new().fill(&mut b).is_err() {
        return true;
    }
    (u32::from_le_bytes(b) as f64 / u32::MAX as f64) < rate
}
