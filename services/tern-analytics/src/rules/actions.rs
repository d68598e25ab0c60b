//! Carrying out what rules emit: alerts raised and cleared together in one write, commands
//! through the registry, webhooks queued for their worker, republishes to the tenant's MQTT
//! subscribers. Every action carries an idempotency key made from the rule, the action and
//! the row's trigger, so a row run again (after a crash, or in a re-run over history) sends
//! no command twice and hands receivers the same key; what cannot be done becomes a dead
//! letter.
//!
//! Shared by the live engine and the re-run jobs.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tern_core::{Selector, TenantId, now_ms};
use tern_registry::{NewCommand, RegistryError};
use tern_store::Store;
use uuid::Uuid;

use super::engine::{Firings, RuleServices};
use super::model::{Action, Rule};
use super::webhooks::{Delivery, delivery_key};
use super::window::Firing;
use crate::alerts::{AlertChange, AlertOp, stable_id};
use crate::metrics::{ActionLabel, RuleMetrics};

const DEAD_LETTER: &str = "rule_dead_letter";
const ATTEMPTS: u32 = 5;
/// Devices a `command:NAME@SELECTOR` action reaches at most.
const MAX_SELECTED: usize = 10_000;

pub struct RuleActions {
    services: Arc<RuleServices>,
    metrics: RuleMetrics,
}

impl RuleActions {
    pub(crate) fn new(services: Arc<RuleServices>, metrics: RuleMetrics) -> Self {
        Self { services, metrics }
    }

    pub(crate) fn services(&self) -> &RuleServices {
        &self.services
    }

    /// Carries out the rows' actions: commands one by one, alerts together in one write,
    /// webhooks queued together in one write (a worker posts them).
    pub(crate) async fn act(&self, firings: Firings) {
        let mut alerts = Vec::new();
        let mut webhooks = Vec::new();
        for (rule, firing, _) in &firings {
            self.metrics.firings.inc();
            for action in &rule.actions {
                match action {
                    Action::Webhook { url } => {
                        webhooks.push((rule, firing, delivery(rule, url, firing)))
                    }
                    Action::Republish { topic } => {
                        self.republish(rule, action, topic, firing).await
                    }
                    Action::Alert(severity) => alerts.push(AlertOp {
                        rule,
                        severity: *severity,
                        firing,
                    }),
                    // A clearing row ends a condition; it commands nothing.
                    Action::Command { .. } if firing.clear => {}
                    Action::Command { name, selector } => {
                        let outcome = self
                            .with_retries(rule, action, firing, || {
                                self.send_command(rule, name, selector.as_deref(), action, firing)
                            })
                            .await;
                        self.count_action("command", outcome);
                    }
                }
            }
        }
        if !alerts.is_empty() {
            self.apply_alerts(&alerts).await;
        }
        if !webhooks.is_empty() {
            self.queue_webhooks(webhooks).await;
        }
        let now = now_ms();
        for arrived_ms in firings.iter().filter_map(|f| f.2) {
            let seconds = (now - arrived_ms).max(0) as f64 / 1000.0;
            self.metrics.publish_to_action_seconds.observe(seconds);
        }
    }

    async fn apply_alerts(&self, ops: &[AlertOp<'_>]) {
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=ATTEMPTS {
            match self.services.alerts.apply(ops).await {
                Ok(changes) => {
                    for (op, change) in ops.iter().zip(changes) {
                        match change {
                            AlertChange::Opened(a) => {
                                tracing::info!(tenant = %a.tenant_id, rule = %op.rule.name, alert = %a.id, subject = %a.subject, "alert raised")
                            }
                            AlertChange::Cleared(a) => {
                                tracing::info!(tenant = %a.tenant_id, rule = %op.rule.name, alert = %a.id, subject = %a.subject, "alert cleared by its rule")
                            }
                            AlertChange::Updated | AlertChange::Unchanged => {}
                        }
                    }
                    self.metrics
                        .actions
                        .get_or_create(&ActionLabel {
                            action: "alert".into(),
                            outcome: "done".into(),
                        })
                        .inc_by(ops.len() as u64);
                    return;
                }
                Err(RegistryError::Storage(e)) if attempt < ATTEMPTS => {
                    tracing::warn!(attempt, error = %e, "alerts could not be stored; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(e) => {
                    for op in ops {
                        let action = Action::Alert(op.severity);
                        tracing::error!(tenant = %op.rule.tenant_id, rule = %op.rule.id, error = %e, "alert action failed; dead-lettered");
                        self.dead_letter(op.rule, &action, op.firing, &e).await;
                        self.count_action("alert", "dead_letter");
                    }
                    return;
                }
            }
        }
    }

    async fn queue_webhooks(&self, queued: Vec<(&Arc<Rule>, &Firing, Delivery)>) {
        let deliveries: Vec<Delivery> = queued.iter().map(|q| q.2.clone()).collect();
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=ATTEMPTS {
            match self.services.webhooks.enqueue(deliveries.clone()).await {
                Ok(()) => {
                    for _ in &deliveries {
                        self.count_action("webhook", "queued");
                    }
                    return;
                }
                Err(RegistryError::Storage(e)) if attempt < ATTEMPTS => {
                    tracing::warn!(attempt, error = %e, "webhooks could not be queued; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(e) => {
                    for (rule, firing, d) in &queued {
                        let action = Action::Webhook { url: d.url.clone() };
                        self.dead_letter(rule, &action, firing, &e).await;
                        self.count_action("webhook", "dead_letter");
                    }
                    return;
                }
            }
        }
    }

    async fn republish(&self, rule: &Rule, action: &Action, topic: &str, firing: &Firing) {
        let key = delivery_key(rule.id, topic, &firing.trigger);
        let properties = vec![
            ("tern-rule".to_string(), rule.name.clone()),
            ("tern-idempotency-key".to_string(), key),
        ];
        let body = Bytes::from(row_body(rule, firing).to_string());
        let outcome = match self
            .services
            .republish
            .publish(rule.tenant_id, topic, body, properties)
            .await
        {
            Ok(()) => "done",
            Err(e) => {
                let error = RegistryError::FailedPrecondition(e);
                tracing::error!(tenant = %rule.tenant_id, rule = %rule.id, action = %action, error = %error, "republish failed; dead-lettered");
                self.dead_letter(rule, action, firing, &error).await;
                "dead_letter"
            }
        };
        self.count_action("republish", outcome);
    }

    fn count_action(&self, action: &str, outcome: &str) {
        self.metrics
            .actions
            .get_or_create(&ActionLabel {
                action: action.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Runs an action, retrying storage failures with backoff; what cannot be done goes to
    /// the rule's dead letters. Returns the outcome for the metrics.
    async fn with_retries<F, Fut>(
        &self,
        rule: &Rule,
        action: &Action,
        firing: &Firing,
        attempt_once: F,
    ) -> &'static str
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), RegistryError>>,
    {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            match attempt_once().await {
                Ok(()) => return "done",
                Err(RegistryError::Storage(e)) if attempt < ATTEMPTS => {
                    tracing::warn!(rule = %rule.id, attempt, error = %e, "rule action failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                Err(e) => {
                    tracing::error!(tenant = %rule.tenant_id, rule = %rule.id, action = %action, error = %e, "rule action failed; dead-lettered");
                    self.dead_letter(rule, action, firing, &e).await;
                    return "dead_letter";
                }
            }
        }
    }

    async fn send_command(
        &self,
        rule: &Rule,
        name: &str,
        selector: Option<&str>,
        action: &Action,
        firing: &Firing,
    ) -> Result<(), RegistryError> {
        let registry = &self.services.registry;
        let targets = match (selector, &firing.device) {
            (Some(selector), _) => {
                let selector = Selector::parse(selector)?;
                registry
                    .select_devices(rule.tenant_id, &selector, None, MAX_SELECTED)
                    .await?
                    .0
            }
            (None, Some(device)) => vec![registry.device_of(rule.tenant_id, device).await?],
            (None, None) => {
                return Err(RegistryError::FailedPrecondition(
                    "the row names no device".into(),
                ));
            }
        };
        let key = format!(
            "rule-{}",
            stable_id(&[&rule.id.to_string(), &action.to_string(), &firing.trigger])
        );
        for device in targets {
            let command = NewCommand {
                name: name.to_string(),
                payload: serde_json::json!({"rule": rule.name, "row": firing.row}),
                ttl_secs: None,
                idempotency_key: Some(key.clone()),
            };
            self.services.commands.send(&device, command).await?;
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        rule: &Rule,
        action: &Action,
        firing: &Firing,
        error: &RegistryError,
    ) {
        let letter = DeadLetter {
            tenant_id: rule.tenant_id,
            rule_id: rule.id,
            rule_name: &rule.name,
            action: action.to_string(),
            trigger: &firing.trigger,
            row: serde_json::Value::Object(firing.row.clone()),
            error: error.to_string(),
            at_ms: now_ms(),
        };
        store_dead_letter(self.services.store.as_ref(), &letter).await;
    }
}

/// What webhooks and republished messages carry: the row and where it came from.
fn row_body(rule: &Rule, firing: &Firing) -> serde_json::Value {
    serde_json::json!({
        "rule": rule.name,
        "rule_id": rule.id,
        "tenant_id": rule.tenant_id,
        "trigger": firing.trigger,
        "device": firing.device,
        "clear": firing.clear,
        "ts": firing.ts_ms,
        "row": firing.row,
    })
}

/// The queued POST of one row to one webhook.
fn delivery(rule: &Rule, url: &str, firing: &Firing) -> Delivery {
    let body = row_body(rule, firing);
    Delivery {
        tenant_id: rule.tenant_id,
        rule_id: rule.id,
        rule_name: rule.name.clone(),
        url: url.to_string(),
        body: body.to_string(),
        idempotency_key: delivery_key(rule.id, url, &firing.trigger),
        trigger: firing.trigger.clone(),
        attempts: 0,
        next_at_ms: 0,
    }
}

/// An action that could not be carried out, kept for the tenant to look at.
#[derive(Serialize)]
pub(crate) struct DeadLetter<'a> {
    #[serde(skip)]
    pub tenant_id: TenantId,
    pub rule_id: Uuid,
    pub rule_name: &'a str,
    pub action: String,
    pub trigger: &'a str,
    pub row: serde_json::Value,
    pub error: String,
    pub at_ms: i64,
}

pub(crate) async fn store_dead_letter(store: &dyn Store, letter: &DeadLetter<'_>) {
    let key = format!("{}/{}/{}", letter.tenant_id, letter.rule_id, Uuid::now_v7());
    let bytes = Bytes::from(serde_json::to_vec(letter).unwrap_or_default());
    if let Err(e) = store.put_record(DEAD_LETTER, &key, bytes).await {
        tracing::error!(rule = %letter.rule_id, error = %e, "cannot store a dead letter");
    }
}

/// A rule's dead letters (actions that could not be carried out), oldest first.
pub async fn dead_letters(
    store: &dyn Store,
    rule: &Rule,
    limit: usize,
) -> Result<Vec<serde_json::Value>, RegistryError> {
    let records = store
        .list_records(
            DEAD_LETTER,
            &format!("{}/{}/", rule.tenant_id, rule.id),
            None,
            limit,
        )
        .await?;
    Ok(records
        .iter()
        .filter_map(|(_, bytes)| serde_json::from_slice(bytes).ok())
        .collect())
}
