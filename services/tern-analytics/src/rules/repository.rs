//! Saved rules: validated when saved (SQL compiled, actions parsed), unique names per tenant,
//! and a change signal the engine follows so that changes apply without a restart, in this
//! process at once and in the others sharing the store within [`Rules::follow_store`]'s period.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tern_core::{TenantId, ValidationError, now_ms, validate_name};
use tern_registry::RegistryError;
use tern_runtime::Shutdown;
use tern_store::Store;
use tokio::sync::{Mutex, watch};
use uuid::Uuid;

use super::model::{Action, Rule};
use super::sql::{Plan, compile};
use super::webhooks::{delete_secret, ensure_secret};

const RULE: &str = "rule";
const RULE_NAME: &str = "rule_name";
/// One record whose value changes with every change to any rule: what other processes watch.
const RULES_CHANGED: (&str, &str) = ("rules_changed", "all");
/// Longest rule text accepted.
const MAX_SQL_BYTES: usize = 16 * 1024;
const MAX_LATENESS_SECS: u64 = 3600;
const DEFAULT_LATENESS_SECS: u64 = 5;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRule {
    pub name: String,
    pub sql: String,
    pub actions: Vec<String>,
    pub enabled: Option<bool>,
    pub allowed_lateness_secs: Option<u64>,
}

/// A change to a rule; absent fields stay.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulePatch {
    pub sql: Option<String>,
    pub actions: Option<Vec<String>>,
    pub enabled: Option<bool>,
    pub allowed_lateness_secs: Option<u64>,
}

pub struct Rules {
    store: Arc<dyn Store>,
    max_per_tenant: usize,
    /// Bumped on every change; the engine reloads when it moves.
    changed: watch::Sender<u64>,
    write_lock: Mutex<()>,
}

/// Checks a rule's parts together; returns its plan.
pub fn validate(
    sql: &str,
    actions: &[Action],
    lateness_secs: u64,
) -> Result<Plan, ValidationError> {
    if sql.len() > MAX_SQL_BYTES {
        return Err(ValidationError::new(
            "sql",
            format!("is longer than {MAX_SQL_BYTES} bytes"),
        ));
    }
    let plan = compile(sql).map_err(|e| ValidationError::new("sql", e.to_string()))?;
    if actions.is_empty() {
        return Err(ValidationError::new(
            "actions",
            "a rule needs at least one action",
        ));
    }
    for action in actions {
        if let Action::Command {
            name,
            selector: None,
        } = action
            && !plan.per_device()
        {
            return Err(ValidationError::new(
                "actions",
                format!(
                    "command:{name} goes to the row's device, but this rule's rows are not per device: group by device or give a selector (command:{name}@SELECTOR)"
                ),
            ));
        }
    }
    if lateness_secs > MAX_LATENESS_SECS {
        return Err(ValidationError::new(
            "allowed_lateness_secs",
            format!("must be 0..={MAX_LATENESS_SECS}"),
        ));
    }
    Ok(plan)
}

fn parse_actions(texts: &[String]) -> Result<Vec<Action>, ValidationError> {
    texts.iter().map(|t| t.parse()).collect()
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn encode(rule: &Rule) -> Bytes {
    Bytes::from(serde_json::to_vec(rule).unwrap_or_default())
}

impl Rules {
    pub fn new(store: Arc<dyn Store>, max_per_tenant: usize) -> Self {
        Self {
            store,
            max_per_tenant,
            changed: watch::Sender::new(0),
            write_lock: Mutex::new(()),
        }
    }

    /// Moves whenever a rule is created, changed or deleted.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Tells this process's engine at once, and other processes through the store. The rule
    /// itself is saved already, so a failed announcement only delays the others.
    async fn announce_change(&self) {
        self.changed.send_modify(|v| *v += 1);
        let marker = Bytes::from(Uuid::now_v7().to_string());
        if let Err(e) = self
            .store
            .put_record(RULES_CHANGED.0, RULES_CHANGED.1, marker)
            .await
        {
            tracing::warn!(error = %e, "cannot announce a rule change to other processes");
        }
    }

    /// Reads the change marker every `every` until `stop`, and signals [`Rules::changes`]
    /// when another process changed a rule. For processes sharing a store.
    pub async fn follow_store(self: Arc<Self>, every: Duration, stop: Shutdown) {
        let mut seen = None;
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let marker = match self
                .store
                .get_record(RULES_CHANGED.0, RULES_CHANGED.1)
                .await
            {
                Ok(marker) => marker,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the rules' change marker");
                    continue;
                }
            };
            if seen.is_some() && seen.as_ref() != Some(&marker) {
                self.changed.send_modify(|v| *v += 1);
            }
            seen = Some(marker);
        }
    }

    /// Saves a new rule. The second value is the rule's webhook secret when it has a webhook
    /// action: it signs the requests, and is shown only here.
    pub async fn create(
        &self,
        tenant: TenantId,
        new: NewRule,
    ) -> Result<(Rule, Option<String>), RegistryError> {
        validate_name("name", &new.name)?;
        let actions = parse_actions(&new.actions)?;
        let lateness = new.allowed_lateness_secs.unwrap_or(DEFAULT_LATENESS_SECS);
        validate(&new.sql, &actions, lateness)?;
        let _guard = self.write_lock.lock().await;
        let name_key = format!("{tenant}/{}", new.name);
        if self.store.get_record(RULE_NAME, &name_key).await?.is_some() {
            return Err(RegistryError::Conflict(format!(
                "a rule named {:?} exists",
                new.name
            )));
        }
        let count = self
            .store
            .list_records(RULE, &format!("{tenant}/"), None, self.max_per_tenant)
            .await?
            .len();
        if count >= self.max_per_tenant {
            return Err(RegistryError::FailedPrecondition(format!(
                "the tenant has {count} rules, the limit (`rules.max_rules_per_tenant`)"
            )));
        }
        let now = now_ms();
        let rule = Rule {
            id: Uuid::now_v7(),
            tenant_id: tenant,
            name: new.name,
            sql: new.sql,
            actions,
            enabled: new.enabled.unwrap_or(true),
            allowed_lateness_secs: lateness,
            version: 1,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let secret = self.webhook_secret(&rule).await?;
        self.store
            .put_record(RULE, &format!("{tenant}/{}", rule.id), encode(&rule))
            .await?;
        self.store
            .put_record(RULE_NAME, &name_key, Bytes::from(rule.id.to_string()))
            .await?;
        self.announce_change().await;
        Ok((rule, secret))
    }

    /// A new webhook secret when the rule has a webhook action and no secret yet.
    async fn webhook_secret(&self, rule: &Rule) -> Result<Option<String>, RegistryError> {
        if !rule
            .actions
            .iter()
            .any(|a| matches!(a, Action::Webhook { .. }))
        {
            return Ok(None);
        }
        ensure_secret(self.store.as_ref(), rule.tenant_id, rule.id).await
    }

    /// A tenant's rules, oldest first.
    pub async fn list(&self, tenant: TenantId) -> Result<Vec<Rule>, RegistryError> {
        let records = self
            .store
            .list_records(RULE, &format!("{tenant}/"), None, usize::MAX)
            .await?;
        records
            .iter()
            .map(|(key, bytes)| decode(key, bytes))
            .collect()
    }

    /// Every tenant's enabled rules, for the engine.
    pub async fn enabled(&self) -> Result<Vec<Rule>, RegistryError> {
        let records = self.store.list_records(RULE, "", None, usize::MAX).await?;
        let rules: Vec<Rule> = records
            .iter()
            .map(|(key, bytes)| decode(key, bytes))
            .collect::<Result<_, _>>()?;
        Ok(rules.into_iter().filter(|r| r.enabled).collect())
    }

    /// A rule by id or name.
    pub async fn get(&self, tenant: TenantId, reference: &str) -> Result<Rule, RegistryError> {
        let id = match Uuid::parse_str(reference) {
            Ok(id) => id.to_string(),
            Err(_) => match self
                .store
                .get_record(RULE_NAME, &format!("{tenant}/{reference}"))
                .await?
            {
                Some(id) => String::from_utf8_lossy(&id).into_owned(),
                None => return Err(RegistryError::NotFound(format!("rule {reference:?}"))),
            },
        };
        let key = format!("{tenant}/{id}");
        match self.store.get_record(RULE, &key).await? {
            Some(bytes) => decode(&key, &bytes),
            None => Err(RegistryError::NotFound(format!("rule {reference:?}"))),
        }
    }

    /// Changes a rule; the second value is a new webhook secret when a webhook action was
    /// added to a rule that had none.
    pub async fn update(
        &self,
        tenant: TenantId,
        reference: &str,
        patch: RulePatch,
    ) -> Result<(Rule, Option<String>), RegistryError> {
        let _guard = self.write_lock.lock().await;
        let mut rule = self.get(tenant, reference).await?;
        if let Some(sql) = patch.sql {
            rule.sql = sql;
        }
        if let Some(actions) = patch.actions {
            rule.actions = parse_actions(&actions)?;
        }
        if let Some(enabled) = patch.enabled {
            rule.enabled = enabled;
        }
        if let Some(lateness) = patch.allowed_lateness_secs {
            rule.allowed_lateness_secs = lateness;
        }
        validate(&rule.sql, &rule.actions, rule.allowed_lateness_secs)?;
        rule.version += 1;
        rule.updated_at_ms = now_ms();
        let secret = self.webhook_secret(&rule).await?;
        self.store
            .put_record(RULE, &format!("{tenant}/{}", rule.id), encode(&rule))
            .await?;
        self.announce_change().await;
        Ok((rule, secret))
    }

    pub async fn delete(&self, tenant: TenantId, reference: &str) -> Result<Rule, RegistryError> {
        let _guard = self.write_lock.lock().await;
        let rule = self.get(tenant, reference).await?;
        self.store
            .delete_record(RULE, &format!("{tenant}/{}", rule.id))
            .await?;
        self.store
            .delete_record(RULE_NAME, &format!("{tenant}/{}", rule.name))
            .await?;
        delete_secret(self.store.as_ref(), tenant, rule.id).await?;
        self.announce_change().await;
        Ok(rule)
    }
}

#[cfg(test)]
mod tests {
    use tern_store::EmbeddedStore;

    use super::*;

    #[tokio::test]
    async fn a_rule_saved_by_one_process_reaches_another_sharing_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let (here, there) = (
            Rules::new(store.clone(), 10),
            Arc::new(Rules::new(store, 10)),
        );
        let stop = Shutdown::new();
        let mut changes = there.changes();
        tokio::spawn(
            there
                .clone()
                .follow_store(Duration::from_millis(10), stop.clone()),
        );
        // Let the follower read the marker as it was before the change.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!changes.has_changed().expect("open"));

        let rule = NewRule {
            name: "hot".into(),
            sql: "SELECT device, temp FROM telemetry WHERE temp > 50".into(),
            actions: vec!["alert:warning".into()],
            ..NewRule::default()
        };
        here.create(TenantId::random(), rule).await.expect("create");
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .expect("the other process hears of it")
            .expect("open");
        stop.cancel();
    }
}
