//! Alerts raised by rules: one per rule and subject (the device, or the group a windowed rule
//! emits for), deduplicated while it is open, acknowledged and cleared by people.
//!
//! A rule that fires again for an open alert updates it (`count`, `last_raised_at_ms`,
//! `details`) instead of opening another; the same trigger twice (a replay) changes nothing.
//! Once cleared (by a person, or by the rule when its condition ends: HYSTERESIS left, a
//! silent device is back), the next firing opens a new occurrence.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Map;
use tern_core::{TenantId, ValidationError, now_ms};
use tern_registry::RegistryError;
use tern_store::Store;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::rules::window::Firing;
use crate::rules::{Rule, Severity};

const ALERT: &str = "alert";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Active,
    Acknowledged,
    Cleared,
}

impl AlertState {
    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        match text {
            "active" => Ok(Self::Active),
            "acknowledged" => Ok(Self::Acknowledged),
            "cleared" => Ok(Self::Cleared),
            _ => Err(ValidationError::new(
                "state",
                format!("must be active, acknowledged or cleared, not {text:?}"),
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub rule_id: Uuid,
    pub rule_name: String,
    /// What the alert is about: the device id, or a windowed rule's group key.
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub severity: Severity,
    pub state: AlertState,
    pub raised_at_ms: i64,
    pub last_raised_at_ms: i64,
    /// Firings folded into this occurrence.
    pub count: u64,
    /// The row of the latest firing.
    pub details: Map<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleared_at_ms: Option<i64>,
    last_trigger: String,
}

/// Which alerts to list; absent fields do not filter.
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    pub state: Option<AlertState>,
    pub rule_id: Option<Uuid>,
    pub device_id: Option<String>,
}

pub struct Alerts {
    store: Arc<dyn Store>,
    write_lock: Mutex<()>,
}

/// A stable id from its parts: the same rule and subject always name the same alert.
pub(crate) fn stable_id(parts: &[&str]) -> Uuid {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, parts.join("\0").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

fn key(tenant: TenantId, id: Uuid) -> String {
    format!("{tenant}/{id}")
}

impl Alerts {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            write_lock: Mutex::new(()),
        }
    }

    async fn load(&self, tenant: TenantId, id: Uuid) -> Result<Option<Alert>, RegistryError> {
        let key = key(tenant, id);
        let Some(bytes) = self.store.get_record(ALERT, &key).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RegistryError::Corrupt {
                key,
                reason: e.to_string(),
            })
    }

    async fn save(&self, alert: &Alert) -> Result<(), RegistryError> {
        let bytes = Bytes::from(serde_json::to_vec(alert).unwrap_or_default());
        Ok(self
            .store
            .put_record(ALERT, &key(alert.tenant_id, alert.id), bytes)
            .await?)
    }

    /// Opens or updates the rule's alert for the firing's subject. Returns the alert and
    /// whether it is a new occurrence.
    pub async fn raise(
        &self,
        rule: &Rule,
        severity: Severity,
        firing: &Firing,
    ) -> Result<(Alert, bool), RegistryError> {
        let id = stable_id(&[&rule.id.to_string(), &firing.subject]);
        let _guard = self.write_lock.lock().await;
        let now = now_ms();
        let existing = self.load(rule.tenant_id, id).await?;
        let (alert, new) = match existing {
            Some(alert)
                if alert.state != AlertState::Cleared && alert.last_trigger == firing.trigger =>
            {
                return Ok((alert, false));
            }
            Some(mut alert) if alert.state != AlertState::Cleared => {
                alert.count += 1;
                alert.last_raised_at_ms = now;
                alert.details = firing.row.clone();
                alert.severity = severity;
                alert.last_trigger = firing.trigger.clone();
                (alert, false)
            }
            _ => (
                Alert {
                    id,
                    tenant_id: rule.tenant_id,
                    rule_id: rule.id,
                    rule_name: rule.name.clone(),
                    subject: firing.subject.clone(),
                    device_id: firing.device.clone(),
                    severity,
                    state: AlertState::Active,
                    raised_at_ms: now,
                    last_raised_at_ms: now,
                    count: 1,
                    details: firing.row.clone(),
                    acknowledged_at_ms: None,
                    cleared_at_ms: None,
                    last_trigger: firing.trigger.clone(),
                },
                true,
            ),
        };
        self.save(&alert).await?;
        Ok((alert, new))
    }

    /// Clears the rule's open alert for the firing's subject, if there is one (the condition
    /// that raised it has ended).
    pub async fn resolve(
        &self,
        rule: &Rule,
        firing: &Firing,
    ) -> Result<Option<Alert>, RegistryError> {
        let id = stable_id(&[&rule.id.to_string(), &firing.subject]);
        let _guard = self.write_lock.lock().await;
        let Some(mut alert) = self.load(rule.tenant_id, id).await? else {
            return Ok(None);
        };
        if alert.state == AlertState::Cleared {
            return Ok(None);
        }
        alert.state = AlertState::Cleared;
        alert.cleared_at_ms = Some(now_ms());
        alert.details = firing.row.clone();
        self.save(&alert).await?;
        Ok(Some(alert))
    }

    /// A tenant's alerts, newest raised first.
    pub async fn list(
        &self,
        tenant: TenantId,
        filter: &AlertFilter,
    ) -> Result<Vec<Alert>, RegistryError> {
        let records = self
            .store
            .list_records(ALERT, &format!("{tenant}/"), None, usize::MAX)
            .await?;
        let mut alerts = Vec::new();
        for (key, bytes) in records {
            let alert: Alert =
                serde_json::from_slice(&bytes).map_err(|e| RegistryError::Corrupt {
                    key,
                    reason: e.to_string(),
                })?;
            let keep = filter.state.is_none_or(|s| s == alert.state)
                && filter.rule_id.is_none_or(|r| r == alert.rule_id)
                && filter
                    .device_id
                    .as_ref()
                    .is_none_or(|d| alert.device_id.as_ref() == Some(d));
            if keep {
                alerts.push(alert);
            }
        }
        alerts.sort_by_key(|a| std::cmp::Reverse(a.last_raised_at_ms));
        Ok(alerts)
    }

    pub async fn get(&self, tenant: TenantId, id: &str) -> Result<Alert, RegistryError> {
        let not_found = || RegistryError::NotFound(format!("alert {id:?}"));
        let id = Uuid::parse_str(id).map_err(|_| not_found())?;
        self.load(tenant, id).await?.ok_or_else(not_found)
    }

    /// Someone is on it: an active alert becomes acknowledged (a no-op when it already is).
    pub async fn acknowledge(&self, tenant: TenantId, id: &str) -> Result<Alert, RegistryError> {
        self.transition(tenant, id, AlertState::Acknowledged).await
    }

    /// Closes the occurrence; the rule's next firing opens a new one.
    pub async fn clear(&self, tenant: TenantId, id: &str) -> Result<Alert, RegistryError> {
        self.transition(tenant, id, AlertState::Cleared).await
    }

    async fn transition(
        &self,
        tenant: TenantId,
        id: &str,
        to: AlertState,
    ) -> Result<Alert, RegistryError> {
        let _guard = self.write_lock.lock().await;
        let mut alert = self.get(tenant, id).await?;
        if alert.state == to {
            return Ok(alert);
        }
        if alert.state == AlertState::Cleared {
            return Err(RegistryError::Conflict(format!("alert {id} is cleared")));
        }
        alert.state = to;
        match to {
            AlertState::Acknowledged => alert.acknowledged_at_ms = Some(now_ms()),
            AlertState::Cleared => alert.cleared_at_ms = Some(now_ms()),
            AlertState::Active => {}
        }
        self.save(&alert).await?;
        Ok(alert)
    }
}
