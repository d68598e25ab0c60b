//! The rule engine: every enabled rule, run over the `telemetry`, `event` and `lifecycle`
//! streams.
//!
//! On an embedded store (`tern up`) one process runs every rule, as the consumer group
//! `analytics-rules`, with one checkpoint per stream. On a shared store, per-device rules run
//! as `analytics-rules`, which splits the streams' partitions between the analytics processes,
//! with a checkpoint per partition; fleet-wide rules run as `analytics-fleet-rules` in one
//! process at a time, with one checkpoint per stream. After each batch the engine carries out the batch's actions; at most
//! once a second it then saves the checkpoints (each rule's window state and the last offset
//! folded into it) and commits the offsets they cover. After a crash or a rebalance, a
//! partition's next reader restores its checkpoint and skips records already folded into it,
//! so windows lose and double-count nothing; actions of the batch that was in flight run again
//! with the same idempotency keys, so none is repeated in effect.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tern_core::{TenantId, now_ms};
use tern_eventlog::{
    Assignment, Consumed, Consumer, EventLog, LogError, Position, Record, TELEMETRY_TOPIC,
};
use tern_proto::v1::Event;
use tern_registry::{Commands, Registry, Twins};
use tern_runtime::{MetricsRegistry, Shutdown};
use tern_store::Store;

use super::actions::RuleActions;
use super::budget::{Admission, Budgets};
use super::expr::Value;
use super::model::Rule;
use super::shuffle::{SHUFFLE_TOPIC, Shuffled};
use super::slots::{self, EnabledRule, Running, Scope, Slot, Slots};
use super::sql::{Plan, STREAMS, compile};
use super::webhooks::Webhooks;
use super::window::{Firing, Message, Outcome, TwinDocuments, group_key};
use crate::alerts::Alerts;
use crate::metrics::{RuleMetrics, StreamLabel};
use crate::rules::Rules;

/// The consumer group of per-device rules.
pub const RULES_GROUP: &str = "analytics-rules";
/// The consumer group of fleet-wide rules.
pub(super) const FLEET_RULES_GROUP: &str = "analytics-fleet-rules";
const BATCH: usize = 1024;
const POLL_WAIT: Duration = Duration::from_millis(200);
const DEVICE_INFO_TTL: Duration = Duration::from_secs(5);
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

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

/// Whose log the rule engine reads.
pub enum RuleLog {
    /// This process's own (the embedded log): it runs every rule. `checkpoint_prefix` keeps
    /// its checkpoints apart from other processes' on a shared store (empty on its own store).
    Own { checkpoint_prefix: String },
    /// A log shared by the analytics processes (Kafka) with a shared store: the work splits by
    /// partition.
    Shared,
}

/// What stage one of a stream's consumer works on: the rules it runs, and the fleet-wide rules
/// whose messages it passes on.
struct Stage<'a> {
    running: &'a mut HashMap<TenantId, Vec<Running>>,
    shuffles: &'a HashMap<TenantId, Vec<EnabledRule>>,
    shuffled: &'a mut Vec<Record>,
}

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

    /// Runs the rules until `shutdown`. A process on its own log runs them all, as one consumer
    /// per stream with one checkpoint per stream.
    ///
    /// On a log shared by several analytics processes, every one runs both stages below, and
    /// the log's consumer groups split the partitions between them; each partition's rule
    /// state is a checkpoint of its own, which the partition's next reader resumes from.
    /// - Per-device rules (filters, groups keyed by device): on the streams, as
    ///   [`RULES_GROUP`]. The same consumer also passes fleet-wide rules' messages on to
    ///   `rules-shuffle`.
    /// - Fleet-wide rules (groups that span devices): on `rules-shuffle`, as
    ///   `analytics-fleet-rules`.
    pub async fn run(self, shutdown: Shutdown, log: RuleLog) -> Result<(), LogError> {
        let this = Arc::new(self);
        if let RuleLog::Own { checkpoint_prefix } = log {
            let scope = Scope::All {
                prefix: Arc::from(checkpoint_prefix),
            };
            return this.run_streams(scope, shutdown).await;
        }
        let per_device = tokio::spawn(this.clone().run_streams(Scope::Devices, shutdown.clone()));
        let fleet = this.run_streams(Scope::Fleet, shutdown).await;
        per_device.await.unwrap_or(Ok(()))?;
        fleet
    }

    /// Runs the rules of `scope` on each of its topics until `shutdown`, saving checkpoints
    /// before it returns.
    async fn run_streams(
        self: Arc<Self>,
        scope: Scope,
        shutdown: Shutdown,
    ) -> Result<(), LogError> {
        let mut tasks = Vec::new();
        let streams: &[&'static str] = match scope {
            Scope::Fleet => &[SHUFFLE_TOPIC],
            Scope::All { .. } | Scope::Devices => &STREAMS,
        };
        for &stream in streams {
            let consumer = self.services.log.consumer(scope.group(), stream).await?;
            let (this, scope, shutdown) = (self.clone(), scope.clone(), shutdown.clone());
            tasks.push(tokio::spawn(async move {
                this.run_stream(stream, scope, consumer, shutdown).await
            }));
        }
        for task in tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "rule engine task failed");
            }
        }
        Ok(())
    }

    /// The rules of one stream and scope, as one consumer of the scope's group.
    async fn run_stream(
        &self,
        stream: &'static str,
        scope: Scope,
        mut consumer: Box<dyn Consumer>,
        shutdown: Shutdown,
    ) {
        let mut changes = self.services.rules.changes();
        let mut rules = self.enabled_rules(stream, &scope).await;
        let mut shuffles = self.shuffled_rules(stream, &scope).await;
        let mut slots = Slots::new(stream, scope.clone());
        let mut devices = DeviceCache::default();
        let mut budgets = Budgets::new(self.config.max_tenant_cpu_ms_per_sec);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_checkpoint = Instant::now();
        loop {
            self.follow_assignment(&mut slots, consumer.assignment(), &rules)
                .await;
            let mut firings = Firings::new();
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.save_checkpoints(&mut slots, consumer.as_mut()).await;
                    return;
                }
                Ok(()) = changes.changed() => {
                    rules = self.enabled_rules(stream, &scope).await;
                    shuffles = self.shuffled_rules(stream, &scope).await;
                    for slot in slots.held.values_mut() {
                        slot.reload(&rules);
                    }
                    continue;
                }
                _ = tick.tick() => {
                    let now = now_ms();
                    for rule in slots.held.values_mut().flat_map(|s| s.running.values_mut().flatten()) {
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
                    // The batch belongs to the assignment as it is after the poll.
                    self.follow_assignment(&mut slots, consumer.assignment(), &rules).await;
                    let mut shuffled = Vec::new();
                    for record in records {
                        let Some(slot) = slots.of(record.position.partition) else {
                            continue;
                        };
                        let Position { partition, offset } = record.position;
                        if slot.applied.get(&partition).is_some_and(|o| *o >= offset) {
                            continue;
                        }
                        if scope == Scope::Fleet {
                            self.evaluate_shuffled(&record, slot, &mut budgets, &mut firings);
                        } else {
                            let stage = Stage { running: &mut slot.running, shuffles: &shuffles, shuffled: &mut shuffled };
                            self.evaluate(&record, stage, &mut devices, &mut budgets, &mut firings).await;
                        }
                        slot.applied.insert(partition, offset);
                        slot.unsaved.insert(partition, offset);
                    }
                    // Durable before the checkpoint that covers their sources is saved.
                    if !shuffled.is_empty() && !self.append_shuffled(shuffled, &shutdown).await {
                        return;
                    }
                }
            }
            self.actions.act(firings).await;
            // Checkpoint and commit at most once a second: each is a durable write, and what a
            // crash loses in between is replayed (skipped by the checkpoint's offsets, or acted
            // on again under the same idempotency keys).
            if last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
                self.save_checkpoints(&mut slots, consumer.as_mut()).await;
                last_checkpoint = Instant::now();
            }
        }
    }

    /// Holds a slot for each partition the consumer reads now. After a rebalance every slot is
    /// dropped unsaved and read again from its checkpoint: the consumer, too, reads each
    /// partition again from the offset committed with that checkpoint.
    async fn follow_assignment(
        &self,
        slots: &mut Slots,
        assignment: Assignment,
        rules: &[EnabledRule],
    ) {
        if slots.generation != Some(assignment.generation) {
            slots.generation = Some(assignment.generation);
            slots.held.clear();
            slots.fenced.clear();
            self.metrics
                .partitions
                .get_or_create(&StreamLabel {
                    stream: slots.stream.to_string(),
                })
                .set(i64::try_from(assignment.partitions.len()).unwrap_or(i64::MAX));
        }
        for partition in assignment.partitions {
            let number = slots.number(partition);
            if slots.held.contains_key(&number) || slots.fenced.contains(&number) {
                continue;
            }
            let key = slots.key(number);
            let slot = slots::load(self.services.store.as_ref(), key, rules).await;
            slots.held.insert(number, slot);
        }
    }

    /// Saves every slot with unsaved progress, then commits the offsets the saved ones cover.
    /// A slot whose checkpoint another process wrote since this one read it belongs to that
    /// process now (this one lost its partition and has not noticed yet): it is dropped, and
    /// its records are skipped until the next rebalance.
    async fn save_checkpoints(&self, slots: &mut Slots, consumer: &mut dyn Consumer) {
        let mut done = Vec::new();
        let mut fenced = Vec::new();
        for (number, slot) in &mut slots.held {
            if slot.unsaved.is_empty() {
                continue;
            }
            if slots::save(self.services.store.as_ref(), slot).await {
                done.extend(
                    slot.unsaved
                        .iter()
                        .map(|(&partition, &offset)| Position { partition, offset }),
                );
                slot.unsaved.clear();
            } else {
                tracing::warn!(checkpoint = %slot.key, "another analytics process saved this rule checkpoint: its partition moved there");
                fenced.push(*number);
            }
        }
        for number in fenced {
            slots.held.remove(&number);
            slots.fenced.insert(number);
        }
        if !done.is_empty()
            && let Err(e) = consumer.commit(&done).await
        {
            tracing::warn!(error = %e, "rules offset commit failed; the checkpoint covers the records");
        }
    }

    async fn evaluate(
        &self,
        record: &Consumed,
        stage: Stage<'_>,
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
        let has_rules =
            |t: &TenantId| stage.running.contains_key(t) || stage.shuffles.contains_key(t);
        if keyed_tenant.is_some_and(|t| !has_rules(&t)) {
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
        if !has_rules(&tenant) {
            return;
        }
        let mut rules = stage.running.get_mut(&tenant);
        let shuffles = stage.shuffles.get(&tenant).map_or(&[][..], Vec::as_slice);
        if let Admission::Skip { log } = budgets.admit(tenant, Instant::now()) {
            self.metrics.throttled.inc();
            if log {
                tracing::warn!(tenant = %tenant, budget_ms = self.config.max_tenant_cpu_ms_per_sec, "the tenant's rules are over their CPU budget; skipping its messages until it refills");
            }
            return;
        }
        self.metrics.messages.inc();
        let plans = || {
            let running = rules.iter().flat_map(|r| r.iter()).map(|r| &*r.plan);
            running.chain(shuffles.iter().map(|(_, plan)| &**plan))
        };
        let (labels, twin) = (plans().any(Plan::uses_labels), plans().any(Plan::uses_twin));
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
        for rule in rules.iter_mut().flat_map(|r| r.iter_mut()) {
            let arrived = rule.plan.windowed.is_none().then_some(event.ingest_time_ms);
            self.fold(tenant, rule, &message, arrived, firings);
        }
        let source = format!("{}/{}", record.topic, record.position.partition);
        for (rule, plan) in shuffles {
            let Some(windowed) = &plan.windowed else {
                continue;
            };
            if plan.filter.as_ref().is_some_and(|f| !f.holds(&message)) {
                continue;
            }
            let shuffled = Shuffled {
                tenant,
                rule: rule.id,
                version: rule.version,
                source: source.clone(),
                offset: record.position.offset,
                device: event.device_id.clone(),
                message_id: event.message_id.clone(),
                ts_ms: message.ts_ms,
                arrived_ms: message.arrived_ms,
                metrics: metrics.clone(),
                fields: fields.clone(),
                labels: if plan.uses_labels() {
                    device.labels.clone()
                } else {
                    BTreeMap::new()
                },
                twin: if plan.uses_twin() {
                    device.twin.clone()
                } else {
                    None
                },
            };
            stage
                .shuffled
                .push(shuffled.record(&group_key(windowed, &message)));
        }
        budgets.charge(tenant, started.elapsed());
    }

    /// Stage two of a fleet-wide rule: one message from `rules-shuffle` into its windows,
    /// unless it is one stage one appended again after a crash.
    fn evaluate_shuffled(
        &self,
        record: &Consumed,
        slot: &mut Slot,
        budgets: &mut Budgets,
        firings: &mut Firings,
    ) {
        let shuffled = match Shuffled::decode(&record.value) {
            Ok(shuffled) => shuffled,
            Err(e) => {
                tracing::warn!(error = %e, position = ?record.position, "unreadable record in rules-shuffle; skipped");
                return;
            }
        };
        // A rule changed since stage one saw the message starts its windows afresh.
        let Some(rule) = slot.running.get_mut(&shuffled.tenant).and_then(|rules| {
            rules
                .iter_mut()
                .find(|r| r.rule.id == shuffled.rule && r.rule.version == shuffled.version)
        }) else {
            return;
        };
        let source = shuffled.source_key();
        if slot
            .sources
            .get(&source)
            .is_some_and(|o| *o >= shuffled.offset)
        {
            return;
        }
        slot.sources.insert(source, shuffled.offset);
        if let Admission::Skip { log } = budgets.admit(shuffled.tenant, Instant::now()) {
            self.metrics.throttled.inc();
            if log {
                tracing::warn!(tenant = %shuffled.tenant, budget_ms = self.config.max_tenant_cpu_ms_per_sec, "the tenant's fleet-wide rules are over their CPU budget; skipping its messages until it refills");
            }
            return;
        }
        let started = Instant::now();
        self.fold(shuffled.tenant, rule, &shuffled.message(), None, firings);
        budgets.charge(shuffled.tenant, started.elapsed());
    }

    /// Feeds one message to one rule; its rows join `firings`.
    fn fold(
        &self,
        tenant: TenantId,
        rule: &mut Running,
        message: &Message,
        arrived: Option<i64>,
        firings: &mut Firings,
    ) {
        let mut out = Vec::new();
        match rule.state.on_message(
            &rule.plan,
            rule.lateness_ms(),
            self.config.max_groups_per_rule,
            message,
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
        firings.extend(out.into_iter().map(|f| (rule.rule.clone(), f, arrived)));
    }

    /// Appends stage one's messages, retrying while the log refuses them. False when shutdown
    /// came first: the batch is then neither checkpointed nor committed, and is read again.
    async fn append_shuffled(&self, records: Vec<Record>, shutdown: &Shutdown) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.services.log.append(records.clone()).await {
                Ok(_) => return true,
                Err(e) => tracing::error!(error = %e, "cannot append to rules-shuffle; retrying"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// The enabled rules of `stream` and `scope`, compiled.
    async fn enabled_rules(&self, stream: &str, scope: &Scope) -> Vec<EnabledRule> {
        let rules = loop {
            match self.services.rules.enabled().await {
                Ok(rules) => break rules,
                Err(e) => {
                    tracing::error!(error = %e, "cannot load rules; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let enabled: Vec<EnabledRule> = rules
            .into_iter()
            .filter_map(|rule| match compile(&rule.sql) {
                Ok(plan) if (plan.stream == stream || *scope == Scope::Fleet) && scope.includes(&plan) => {
                    Some((Arc::new(rule), Arc::new(plan)))
                }
                Ok(_) => None,
                Err(e) => {
                    tracing::error!(rule = %rule.id, error = %e, "saved rule no longer compiles; skipped");
                    None
                }
            })
            .collect();
        tracing::debug!(stream, scope = ?scope, rules = enabled.len(), "rules loaded");
        enabled
    }

    /// The fleet-wide rules whose messages stage one passes on from `stream`, by tenant.
    async fn shuffled_rules(
        &self,
        stream: &str,
        scope: &Scope,
    ) -> HashMap<TenantId, Vec<EnabledRule>> {
        let mut by_tenant: HashMap<TenantId, Vec<EnabledRule>> = HashMap::new();
        if *scope != Scope::Devices {
            return by_tenant;
        }
        for (rule, plan) in self.enabled_rules(stream, &Scope::Fleet).await {
            if plan.stream == stream {
                by_tenant
                    .entry(rule.tenant_id)
                    .or_default()
                    .push((rule, plan));
            }
        }
        by_tenant
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
