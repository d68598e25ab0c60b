//! Alerts raised by rules: one per rule and subject (the device, or the group a windowed rule
//! emits for), deduplicated while it is open, acknowledged and cleared by people.
//!
//! A rule that fires again for an open alert updates it (`count`, `last_raised_at_ms`,
//! `details`) instead of opening another; the same trigger twice (a replay) changes nothing.
//! Once cleared (by a person, or by the rule when its condition ends: HYSTERESIS left, a
//! silent device is back), the next firing opens a new occurrence.

use std::collections::HashMap;
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

fn encode(alert: &Alert) -> Bytes {
    Bytes::from(serde_json::to_vec(alert).unwrap_or_default())
}

/// One alert action of a rule for one row.
pub struct AlertOp<'a> {
    pub rule: &'a Rule,
    pub severity: Severity,
    pub firing: &'a Firing,
}

/// What an [`AlertOp`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum AlertChange {
    Opened(Alert),
    /// Folded into the open alert.
    Updated,
    /// Cleared by a clearing row.
    Cleared(Alert),
    /// Nothing to do: a trigger seen already, or a clearing row with no open alert.
    Unchanged,
}

/// Applies one op to the alert in `slot` (none yet, or the stored one).
fn fold(slot: &mut Option<Alert>, id: Uuid, op: &AlertOp, now: i64) -> AlertChange {
    let firing = op.firing;
    let open = slot.as_mut().filter(|a| a.state != AlertState::Cleared);
    match (open, firing.clear) {
        (None, true) => AlertChange::Unchanged,
        (Some(alert), true) => {
            alert.state = AlertState::Cleared;
            alert.cleared_at_ms = Some(now);
            alert.details = firing.row.clone();
            alert.last_trigger = firing.trigger.clone();
            AlertChange::Cleared(alert.clone())
        }
        (Some(alert), false) if alert.last_trigger == firing.trigger => AlertChange::Unchanged,
        (Some(alert), false) => {
            alert.count += 1;
            alert.last_raised_at_ms = now;
            alert.details = firing.row.clone();
            alert.severity = op.severity;
            alert.last_trigger = firing.trigger.clone();
            AlertChange::Updated
        }
        (None, false) => {
            let alert = Alert {
                id,
                tenant_id: op.rule.tenant_id,
                rule_id: op.rule.id,
                rule_name: op.rule.name.clone(),
                subject: firing.subject.clone(),
                device_id: firing.device.clone(),
                severity: op.severity,
                state: AlertState::Active,
                raised_at_ms: now,
                last_raised_at_ms: now,
                count: 1,
                details: firing.row.clone(),
                acknowledged_at_ms: None,
                cleared_at_ms: None,
                last_trigger: firing.trigger.clone(),
            };
            *slot = Some(alert.clone());
            AlertChange::Opened(alert)
        }
    }
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
        Ok(self
            .store
            .put_record(ALERT, &key(alert.tenant_id, alert.id), encode(alert))
            .await?)
    }

    /// Applies a batch of rule alert actions in order, with one durable write: each raises
    /// the rule's alert for the row's subject, or clears it for a clearing row.
    pub async fn apply(&self, ops: &[AlertOp<'_>]) -> Result<Vec<AlertChange>, RegistryError> {
        let _guard = self.write_lock.lock().await;
        let now = now_ms();
        let mut current: HashMap<(TenantId, Uuid), Option<Alert>> = HashMap::new();
        let mut dirty: Vec<(TenantId, Uuid)> = Vec::new();
        let mut changes = Vec::with_capacity(ops.len());
        for op in ops {
            let slot_key = (
                op.rule.tenant_id,
                stable_id(&[&op.rule.id.to_string(), &op.firing.subject]),
            );
            if let std::collections::hash_map::Entry::Vacant(vacant) = current.entry(slot_key) {
                vacant.insert(self.load(slot_key.0, slot_key.1).await?);
            }
            let Some(slot) = current.get_mut(&slot_key) else {
                continue;
            };
            let change = fold(slot, slot_key.1, op, now);
            if change != AlertChange::Unchanged && !dirty.contains(&slot_key) {
                dirty.push(slot_key);
            }
            changes.push(change);
        }
        let records: Vec<(String, Bytes)> = dirty
            .iter()
            .filter_map(|k| current.get(k).and_then(Option::as_ref))
            .map(|alert| (key(alert.tenant_id, alert.id), encode(alert)))
            .collect();
        self.store.put_records(ALERT, records).await?;
        Ok(changes)
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

#[cfg(test)]
mod tests {
    use tern_store::EmbeddedStore;

    use super::*;

    fn rule() -> Rule {
        Rule {
            id: Uuid::now_v7(),
            tenant_id: TenantId::random(),
            name: "hot".into(),
            sql: "SELECT device FROM telemetry".into(),
            actions: vec![],
            enabled: true,
            allowed_lateness_secs: 0,
            version: 1,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn firing(trigger: &str, clear: bool) -> Firing {
        Firing {
            trigger: trigger.into(),
            device: Some("d".into()),
            subject: "d".into(),
            ts_ms: 0,
            clear,
            row: Map::new(),
        }
    }

    #[tokio::test]
    async fn one_alert_per_subject_replays_change_nothing_and_clearing_ends_the_occurrence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let alerts = Alerts::new(Arc::new(EmbeddedStore::open(dir.path()).expect("store")));
        let rule = rule();
        let op = |f| AlertOp {
            rule: &rule,
            severity: Severity::Critical,
            firing: f,
        };
        let (a, b, a_again) = (
            firing("m1", false),
            firing("m2", false),
            firing("m1", false),
        );
        let changes = alerts
            .apply(&[op(&a), op(&b), op(&a_again)])
            .await
            .expect("apply");
        assert!(matches!(changes[0], AlertChange::Opened(_)));
        assert_eq!(
            changes[1..],
            [AlertChange::Updated, AlertChange::Updated],
            "m1 again after m2 is a new firing"
        );
        let replay = alerts.apply(&[op(&a_again)]).await.expect("apply");
        assert_eq!(
            replay,
            [AlertChange::Unchanged],
            "the last trigger replayed"
        );
        let listed = alerts
            .list(rule.tenant_id, &AlertFilter::default())
            .await
            .expect("list");
        assert_eq!((listed.len(), listed[0].count), (1, 3));

        let clear = firing("m3", true);
        assert!(matches!(
            alerts.apply(&[op(&clear)]).await.expect("apply")[0],
            AlertChange::Cleared(_)
        ));
        assert_eq!(
            alerts.apply(&[op(&clear)]).await.expect("apply"),
            [AlertChange::Unchanged]
        );
        let reopened = alerts
            .apply(&[op(&firing("m4", false))])
            .await
            .expect("apply");
        let AlertChange::Opened(alert) = &reopened[0] else {
            panic!("a new occurrence: {reopened:?}");
        };
        assert_eq!(
            (alert.count, alert.id),
            (1, listed[0].id),
            "same alert id, new occurrence"
        );
    }
}
