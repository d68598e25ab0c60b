//! The rule engine: every enabled rule, run over the `telemetry` stream as the consumer group
//! `analytics-rules`.
//!
//! After each batch the engine carries out the batch's actions; at most once a second it then
//! saves one checkpoint record (each rule's window state and the last offset folded into it,
//! per partition), then commits the offsets the checkpoint covers. After a crash it restores the checkpoint and skips records already
//! folded into it, so windows lose and double-count nothing; actions of the batch that was in
//! flight run again with the same idempotency keys, so none is repeated in effect.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tern_core::{TenantId, now_ms};
use tern_eventlog::{Consumed, Consumer, EventLog, LogError, Position, TELEMETRY_TOPIC};
use tern_proto::v1::Event;
use tern_registry::{Commands, Lease, Registry, Twins};
use tern_runtime::{MetricsRegistry, Shutdown};
use tern_store::Store;
use uuid::Uuid;

use super::actions::RuleActions;
use super::budget::{Admission, Budgets};
use super::expr::Value;
use super::model::Rule;
use super::sql::{Plan, STREAMS, compile};
use super::webhooks::Webhooks;
use super::window::{Firing, Message, Outcome, RuleState, TwinDocuments};
use crate::alerts::Alerts;
use crate::metrics::RuleMetrics;
use crate::rules::Rules;

pub const RULES_GROUP: &str = "analytics-rules";
const CHECKPOINT: &str = "rule_checkpoint";
const BATCH: usize = 1024;
const POLL_WAIT: Duration = Duration::from_millis(200);
const DEVICE_INFO_TTL: Duration = Duration::from_secs(5);
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// How long the rule engine's lease lasts unrenewed: how soon a standby takes over from a
/// process that died.
pub const RULES_LEASE_TTL: Duration = Duration::from_secs(10);
/// How often the holder renews it (and a standby asks for it).
const RULES_LEASE_RENEW: Duration = Duration::from_secs(2);

/// Limits (`[rules]` in the config file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    pub max_rules_per_tenant: usize,
    /// Open groups (devices, label values) one windowed rule keeps; messages that would open
    /// more are refused and counted, so one tenant's rule cannot exhaust memory.
    pub max_groups_per_rule: usize,
    /// Let `webhook:` actions reach loopback, private and link-local addresses. Off: a
    /// tenant's rule cannot be pointed at the platform's own network.
    pub webhook_allow_private_networks: bool,
    /// Evaluation time one tenant's rules may spend per second on a stream; messages beyond
    /// it are skipped by that tenant's rules (and counted) until the budget refills.
    pub max_tenant_cpu_ms_per_sec: u64,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            max_rules_per_tenant: 100,
            max_groups_per_rule: 100_000,
            webhook_allow_private_networks: false,
            max_tenant_cpu_ms_per_sec: 250,
        }
    }
}

/// Where `republish:` actions go: the tenant's MQTT subscribers (the bridge, in process).
#[async_trait::async_trait]
pub trait Republish: Send + Sync {
    async fn publish(
        &self,
        tenant: TenantId,
        topic: &str,
        payload: Bytes,
        user_properties: Vec<(String, String)>,
    ) -> Result<(), String>;
}

pub struct RuleServices {
    pub log: Arc<dyn EventLog>,
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub twins: Arc<Twins>,
    pub commands: Arc<Commands>,
    pub rules: Arc<Rules>,
    pub alerts: Arc<Alerts>,
    pub webhooks: Arc<Webhooks>,
    pub republish: Arc<dyn Republish>,
}

pub struct RuleEngine {
    services: Arc<RuleServices>,
    actions: Arc<RuleActions>,
    config: RulesConfig,
    metrics: RuleMetrics,
}

#[derive(Default, Serialize, Deserialize)]
struct Checkpoint {
    /// The last offset folded into the states, per partition.
    applied: BTreeMap<u32, u64>,
    states: BTreeMap<Uuid, SavedState>,
}

#[derive(Serialize, Deserialize)]
struct SavedState {
    version: u64,
    state: RuleState,
}

struct Running {
    rule: Arc<Rule>,
    plan: Plan,
    state: RuleState,
}

impl Running {
    fn lateness_ms(&self) -> i64 {
        (self.rule.allowed_lateness_secs * 1000) as i64
    }
}

/// Rows to act on, with the arrival time of the message that caused a filter rule's row.
/// Rows to act on: the rule, the row, and when its message arrived (live rows only).
pub(crate) type Firings = Vec<(Arc<Rule>, Firing, Option<i64>)>;

/// What rules may read about a device besides its messages.
#[derive(Default)]
struct DeviceInfo {
    labels: BTreeMap<String, String>,
    twin: Option<TwinDocuments>,
}

/// Device labels and twins for rules that read them, briefly cached (a change shows within
/// `DEVICE_INFO_TTL`).
#[derive(Default)]
struct DeviceCache {
    entries: HashMap<(TenantId, String), (Arc<DeviceInfo>, Instant)>,
}

impl DeviceCache {
    async fn get(
        &mut self,
        services: &RuleServices,
        tenant: TenantId,
        device: &str,
        twin: bool,
    ) -> Arc<DeviceInfo> {
        let key = (tenant, device.to_string());
        if let Some((info, at)) = self.entries.get(&key)
            && at.elapsed() < DEVICE_INFO_TTL
            && (info.twin.is_some() || !twin)
        {
            return info.clone();
        }
        let mut info = DeviceInfo::default();
        if let Ok(found) = services.registry.device_of(tenant, device).await {
            if twin && let Ok(t) = services.twins.get(tenant, found.id).await {
                info.twin = Some((t.desired, t.reported));
            }
            info.labels = found.labels;
        }
        let info = Arc::new(info);
        if self.entries.len() >= 100_000 {
            self.entries.clear();
        }
        self.entries.insert(key, (info.clone(), Instant::now()));
        info
    }
}

impl RuleEngine {
    pub fn new(services: RuleServices, config: RulesConfig, metrics: &MetricsRegistry) -> Self {
        let services = Arc::new(services);
        let metrics = RuleMetrics::register(metrics);
        Self {
            actions: Arc::new(RuleActions::new(services.clone(), metrics.clone())),
            services,
            config,
            metrics,
        }
    }

    /// What carries out rules' rows: for jobs that re-run a rule over history.
    pub fn actions(&self) -> Arc<RuleActions> {
        self.actions.clone()
    }

    /// Runs the rules until `shutdown`: at once when this process is alone on its store, else
    /// while it holds the `rule-engine` lease.
    ///
    /// Rules keep state (windows, patterns) that spans devices and so log partitions; one
    /// process at a time runs them, on every partition, from the checkpoint the previous holder
    /// saved. Analytics processes without the lease still ingest. A holder that stops renewing
    /// (killed, or cut off from the store) loses the lease within [`RULES_LEASE_TTL`] and
    /// another takes over; the rows it re-evaluates act under the same idempotency keys.
    pub async fn run(self, shutdown: Shutdown, shared_store: bool) -> Result<(), LogError> {
        let this = Arc::new(self);
        if !shared_store {
            return this.run_streams(shutdown).await;
        }
        let lease = Lease::new(this.services.store.clone(), "rule-engine", RULES_LEASE_TTL);
        loop {
            // Standby: ask for the lease until it is free.
            loop {
                match lease.hold().await {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot read the rule-engine lease"),
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(RULES_LEASE_RENEW) => {}
                }
            }
            tracing::info!("this process runs the rules (it holds the rule-engine lease)");
            let term = shutdown.child_token();
            let engine = tokio::spawn(this.clone().run_streams(term.clone()));
            let mut renewed = Instant::now();
            let lost = loop {
                tokio::select! {
                    () = shutdown.cancelled() => break false,
                    () = tokio::time::sleep(RULES_LEASE_RENEW) => {}
                }
                match lease.hold().await {
                    Ok(true) => renewed = Instant::now(),
                    Ok(false) => break true,
                    // The store is unreachable: others may take the lease once it expires.
                    Err(_) if renewed.elapsed() >= RULES_LEASE_TTL => break true,
                    Err(e) => tracing::warn!(error = %e, "cannot renew the rule-engine lease"),
                }
            };
            term.cancel();
            let outcome = engine.await.unwrap_or(Ok(()));
            if !lost {
                lease.release().await;
                return outcome;
            }
            tracing::warn!("lost the rule-engine lease: another process runs the rules now");
            outcome?;
        }
    }

    /// Runs every stream's rules until `shutdown`, saving checkpoints before it returns.
    async fn run_streams(self: Arc<Self>, shutdown: Shutdown) -> Result<(), LogError> {
        let this = self;
        let mut tasks = Vec::new();
        for stream in STREAMS {
            let consumer = this.services.log.consumer(RULES_GROUP, stream).await?;
            let (this, shutdown) = (this.clone(), shutdown.clone());
            tasks.push(tokio::spawn(async move {
                this.run_stream(stream, consumer, shutdown).await
            }));
        }
        for task in tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "rule engine task failed");
            }
        }
        Ok(())
    }

    /// The rules of one stream, as one consumer of the group.
    async fn run_stream(
        &self,
        stream: &'static str,
        mut consumer: Box<dyn Consumer>,
        shutdown: Shutdown,
    ) {
        let mut checkpoint = self.load_checkpoint(stream).await;
        let mut changes = self.services.rules.changes();
        let mut running = self
            .load_rules(stream, &mut checkpoint.states, HashMap::new())
            .await;
        let mut applied = checkpoint.applied;
        let mut devices = DeviceCache::default();
        let mut budgets = Budgets::new(self.config.max_tenant_cpu_ms_per_sec);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // Offsets of records acted on but not yet covered by a saved checkpoint.
        let mut uncommitted: Vec<Position> = Vec::new();
        let mut last_checkpoint = Instant::now();
        loop {
            let mut firings = Firings::new();
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.save_checkpoint(stream, &applied, &running).await;
                    if let Err(e) = consumer.commit(&uncommitted).await {
                        tracing::warn!(error = %e, "rules offset commit failed; the checkpoint covers the records");
                    }
                    return;
                }
                Ok(()) = changes.changed() => {
                    running = self.load_rules(stream, &mut BTreeMap::new(), running).await;
                    continue;
                }
                _ = tick.tick() => {
                    let now = now_ms();
                    for rule in running.values_mut().flatten() {
                        let mut out = Vec::new();
                        rule.state.on_time(&rule.plan, rule.lateness_ms(), now, &mut out);
                        firings.extend(out.into_iter().map(|f| (rule.rule.clone(), f, None)));
                    }
                }
                batch = consumer.poll(BATCH, POLL_WAIT) => {
                    let records = match batch {
                        Ok(records) if records.is_empty() => continue,
                        Ok(records) => records,
                        Err(e) => {
                            tracing::error!(error = %e, "rules cannot read the event log; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    uncommitted.extend(records.iter().map(|r| r.position));
                    for record in records {
                        if applied.get(&record.position.partition).is_some_and(|o| *o >= record.position.offset) {
                            continue;
                        }
                        self.evaluate(&record, &mut running, &mut devices, &mut budgets, &mut firings).await;
                        applied.insert(record.position.partition, record.position.offset);
                    }
                }
            }
            self.actions.act(firings).await;
            // Checkpoint and commit at most once a second: each is a durable write, and what a
            // crash loses in between is replayed (skipped by the checkpoint's offsets, or acted
            // on again under the same idempotency keys).
            if !uncommitted.is_empty() && last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
                self.save_checkpoint(stream, &applied, &running).await;
                if let Err(e) = consumer.commit(&uncommitted).await {
                    tracing::warn!(error = %e, "rules offset commit failed; the checkpoint covers the records");
                }
                uncommitted.clear();
                last_checkpoint = Instant::now();
            }
        }
    }

    async fn evaluate(
        &self,
        record: &Consumed,
        running: &mut HashMap<TenantId, Vec<Running>>,
        devices: &mut DeviceCache,
        budgets: &mut Budgets,
        firings: &mut Firings,
    ) {
        // Records are keyed `tenant/device`: a tenant without rules on this stream costs no
        // decoding (in a platform of many tenants, most records).
        let keyed_tenant = std::str::from_utf8(&record.key)
            .ok()
            .and_then(|k| k.split('/').next())
            .and_then(|t| TenantId::parse(t).ok());
        if keyed_tenant.is_some_and(|t| !running.contains_key(&t)) {
            return;
        }
        let Ok(event) = Event::decode(record.value.as_ref()) else {
            return;
        };
        let fields = match record.topic.as_str() {
            // Numeric telemetry only: the rest is not telemetry a rule can compare.
            TELEMETRY_TOPIC if event.metrics.is_empty() => return,
            TELEMETRY_TOPIC => Vec::new(),
            _ => fields_of(&event.payload),
        };
        let Ok(tenant) = TenantId::parse(&event.tenant_id) else {
            return;
        };
        let Some(rules) = running.get_mut(&tenant) else {
            return;
        };
        if let Admission::Skip { log } = budgets.admit(tenant, Instant::now()) {
            self.metrics.throttled.inc();
            if log {
                tracing::warn!(tenant = %tenant, budget_ms = self.config.max_tenant_cpu_ms_per_sec, "the tenant's rules are over their CPU budget; skipping its messages until it refills");
            }
            return;
        }
        self.metrics.messages.inc();
        let (labels, twin) = (
            rules.iter().any(|r| r.plan.uses_labels()),
            rules.iter().any(|r| r.plan.uses_twin()),
        );
        let device = if labels || twin {
            devices
                .get(&self.services, tenant, &event.device_id, twin)
                .await
        } else {
            Arc::default()
        };
        let metrics: Vec<(String, f64)> = event
            .metrics
            .iter()
            .map(|m| (m.name.clone(), m.value))
            .collect();
        let message = Message {
            device: &event.device_id,
            message_id: &event.message_id,
            ts_ms: if event.device_time_ms > 0 {
                event.device_time_ms
            } else {
                event.ingest_time_ms
            },
            arrived_ms: event.ingest_time_ms,
            metrics: &metrics,
            fields: &fields,
            labels: &device.labels,
            twin: device.twin.as_ref(),
        };
        let started = Instant::now();
        for rule in rules.iter_mut() {
            let mut out = Vec::new();
            match rule.state.on_message(
                &rule.plan,
                rule.lateness_ms(),
                self.config.max_groups_per_rule,
                &message,
                &mut out,
            ) {
                Outcome::Taken => {}
                Outcome::Late => {
                    self.metrics.late.inc();
                }
                Outcome::OverLimit => {
                    self.metrics.over_limit.inc();
                    tracing::warn!(tenant = %tenant, rule = %rule.rule.name, limit = self.config.max_groups_per_rule, "rule is at its group limit; message not counted");
                }
            }
            let arrived = rule.plan.windowed.is_none().then_some(event.ingest_time_ms);
            firings.extend(out.into_iter().map(|f| (rule.rule.clone(), f, arrived)));
        }
        budgets.charge(tenant, started.elapsed());
    }

    async fn load_checkpoint(&self, stream: &str) -> Checkpoint {
        match self.services.store.get_record(CHECKPOINT, stream).await {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(error = %e, "rule checkpoint unreadable; rules start with empty windows");
                Checkpoint::default()
            }),
            Ok(None) => Checkpoint::default(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the rule checkpoint; rules start with empty windows");
                Checkpoint::default()
            }
        }
    }

    /// Retries until the store takes the checkpoint or shutdown: the offsets are committed
    /// only after it.
    async fn save_checkpoint(
        &self,
        stream: &str,
        applied: &BTreeMap<u32, u64>,
        running: &HashMap<TenantId, Vec<Running>>,
    ) {
        #[derive(Serialize)]
        struct Saved<'a> {
            version: u64,
            state: &'a RuleState,
        }
        #[derive(Serialize)]
        struct CheckpointRef<'a> {
            applied: &'a BTreeMap<u32, u64>,
            states: BTreeMap<Uuid, Saved<'a>>,
        }
        let states = running
            .values()
            .flatten()
            .filter(|r| r.plan.windowed.is_some())
            .map(|r| {
                (
                    r.rule.id,
                    Saved {
                        version: r.rule.version,
                        state: &r.state,
                    },
                )
            })
            .collect();
        let bytes = match serde_json::to_vec(&CheckpointRef { applied, states }) {
            Ok(bytes) => Bytes::from(bytes),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode the rule checkpoint");
                return;
            }
        };
        let mut backoff = Duration::from_millis(100);
        while let Err(e) = self
            .services
            .store
            .put_record(CHECKPOINT, stream, bytes.clone())
            .await
        {
            tracing::error!(error = %e, "cannot save the rule checkpoint; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// The enabled rules by tenant. A rule keeps its state when it is unchanged (same
    /// version) in `previous`, or takes it from a checkpoint saved at the same version.
    async fn load_rules(
        &self,
        stream: &str,
        saved: &mut BTreeMap<Uuid, SavedState>,
        mut previous: HashMap<TenantId, Vec<Running>>,
    ) -> HashMap<TenantId, Vec<Running>> {
        let rules = loop {
            match self.services.rules.enabled().await {
                Ok(rules) => break rules,
                Err(e) => {
                    tracing::error!(error = %e, "cannot load rules; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let mut kept: HashMap<(Uuid, u64), RuleState> = previous
            .drain()
            .flat_map(|(_, rules)| rules)
            .map(|r| ((r.rule.id, r.rule.version), r.state))
            .collect();
        let mut running: HashMap<TenantId, Vec<Running>> = HashMap::new();
        for rule in rules {
            let plan = match compile(&rule.sql) {
                Ok(plan) if plan.stream != stream => continue,
                Ok(plan) => plan,
                Err(e) => {
                    tracing::error!(rule = %rule.id, error = %e, "saved rule no longer compiles; skipped");
                    continue;
                }
            };
            let state = kept
                .remove(&(rule.id, rule.version))
                .or_else(|| {
                    saved
                        .remove(&rule.id)
                        .filter(|s| s.version == rule.version)
                        .map(|s| s.state)
                })
                .unwrap_or_default();
            running.entry(rule.tenant_id).or_default().push(Running {
                rule: Arc::new(rule),
                plan,
                state,
            });
        }
        let count: usize = running.values().map(Vec::len).sum();
        tracing::info!(rules = count, "rules loaded");
        running
    }
}

/// The columns of an event or lifecycle event: the members of its JSON object (numbers, text,
/// booleans), or its text as `payload` when it is not an object.
fn fields_of(payload: &[u8]) -> Vec<(String, Value)> {
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter_map(|(name, value)| {
                let value = match value {
                    serde_json::Value::Number(n) => Value::Number(n.as_f64()?),
                    serde_json::Value::String(s) => Value::Text(s),
                    serde_json::Value::Bool(b) => Value::Bool(b),
                    _ => return None,
                };
                Some((name, value))
            })
            .collect(),
        _ => vec![(
            "payload".into(),
            Value::Text(String::from_utf8_lossy(payload).into_owned()),
        )],
    }
}
