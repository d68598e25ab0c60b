//! Replaying stored telemetry through a rule, in time order, as the live engine would have
//! seen it. `tern rule test` reports what a rule would have done over a sample, acting on
//! nothing; a re-run job (`rerun`) goes over a whole range and acts, under the same
//! idempotency keys as the live engine, so no command the engine already sent is sent again.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Map;
use tern_core::{Device, Selector, TenantId, ValidationError};
use tern_registry::{Registry, RegistryError, Twins};
use tern_store::{RangeQuery, Store};

use super::actions::RuleActions;
use super::model::Rule;
use super::sql::{Plan, compile};
use super::window::{Firing, Message, RuleState, TwinDocuments};

/// Devices and messages a test reads at most, so a test stays a sample.
const MAX_DEVICES: usize = 1000;
const MAX_MESSAGES: usize = 100_000;
const MAX_ROWS: usize = 1000;
/// Messages a re-run holds at once: a time slice with more is halved.
const MAX_SLICE_MESSAGES: usize = 200_000;
/// Devices a re-run covers at most.
const MAX_RERUN_DEVICES: usize = 100_000;

#[derive(Debug, Serialize)]
pub struct TestRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    pub ts: i64,
    /// The row ends a condition (HYSTERESIS left, an ABSENCE is over).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub clear: bool,
    pub row: Map<String, serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct TestReport {
    /// Messages the rule saw.
    pub messages: usize,
    /// Rows it would have emitted (at most 1000).
    pub rows: Vec<TestRow>,
    /// Whether the sample was cut at a limit (devices or messages).
    pub truncated: bool,
}

/// Where a replay reads devices, twins and telemetry.
pub struct Sources<'a> {
    pub store: &'a dyn Store,
    pub registry: &'a Registry,
    pub twins: &'a Twins,
}

struct Stored {
    device: usize,
    message_id: String,
    ts_ms: i64,
    metrics: Vec<(String, f64)>,
}

/// One rule over stored telemetry: its state carries from one slice of time to the next.
struct Replay {
    plan: Plan,
    tenant: TenantId,
    devices: Vec<Device>,
    twins: Vec<Option<TwinDocuments>>,
    state: RuleState,
    lateness_ms: i64,
    /// The clock advances with the messages, in steps of at least a second and at most a
    /// thousand steps over the range, as the live engine's ticks would.
    step: i64,
    clock: i64,
}

/// Whether a rule can be replayed (it reads telemetry).
pub(crate) fn validate_replay(sql: &str) -> Result<(), RegistryError> {
    replayable(sql).map(|_| ())
}

/// The rule's plan, if it is one a replay can run (telemetry only).
fn replayable(sql: &str) -> Result<Plan, RegistryError> {
    let plan = compile(sql).map_err(|e| ValidationError::new("sql", e.to_string()))?;
    if plan.stream != "telemetry" {
        return Err(ValidationError::new(
            "sql",
            "replays read stored telemetry; FROM event and FROM lifecycle cannot be replayed yet",
        )
        .into());
    }
    Ok(plan)
}

impl Replay {
    async fn new(
        sources: &Sources<'_>,
        tenant: TenantId,
        plan: Plan,
        devices: Vec<Device>,
        (from_ms, to_ms): (i64, i64),
        lateness_secs: u64,
    ) -> Result<Self, RegistryError> {
        let mut twins = Vec::with_capacity(devices.len());
        for device in &devices {
            twins.push(match plan.uses_twin() {
                true => sources
                    .twins
                    .get(tenant, device.id)
                    .await
                    .ok()
                    .map(|t| (t.desired, t.reported)),
                false => None,
            });
        }
        Ok(Self {
            plan,
            tenant,
            devices,
            twins,
            state: RuleState::default(),
            lateness_ms: (lateness_secs * 1000) as i64,
            step: ((to_ms - from_ms) / 1000).max(1000),
            clock: from_ms,
        })
    }

    /// Every device's messages in `[from_ms, to_ms)`, oldest first, and whether there were
    /// more than `limit` (reading stops at the first device past it).
    async fn read(
        &self,
        sources: &Sources<'_>,
        (from_ms, to_ms): (i64, i64),
        limit: usize,
    ) -> Result<(Vec<Stored>, bool), RegistryError> {
        let tenant = self.tenant.to_string();
        let mut messages: Vec<Stored> = Vec::new();
        for (index, device) in self.devices.iter().enumerate() {
            let id = device.id.to_string();
            let mut by_message: BTreeMap<(i64, String), Vec<(String, f64)>> = BTreeMap::new();
            for latest in sources.store.latest(&tenant, &id).await? {
                let query = RangeQuery {
                    tenant: tenant.clone(),
                    device: id.clone(),
                    from_ms,
                    to_ms,
                    limit,
                    descending: false,
                };
                for point in sources.store.points(&query, &latest.metric).await? {
                    by_message
                        .entry((point.ts_ms, point.message_id))
                        .or_default()
                        .push((point.metric, point.value));
                }
            }
            messages.extend(
                by_message
                    .into_iter()
                    .map(|((ts_ms, message_id), metrics)| Stored {
                        device: index,
                        message_id,
                        ts_ms,
                        metrics,
                    }),
            );
            if messages.len() > limit {
                break;
            }
        }
        messages.sort_by_key(|m| m.ts_ms);
        let cut = messages.len() > limit;
        Ok((messages, cut))
    }

    fn feed(&mut self, messages: &[Stored], fired: &mut Vec<Firing>) {
        for stored in messages {
            if stored.ts_ms >= self.clock + self.step {
                self.clock = stored.ts_ms;
                self.state
                    .on_time(&self.plan, self.lateness_ms, self.clock, fired);
            }
            let device = &self.devices[stored.device];
            let id = device.id.to_string();
            let message = Message {
                device: &id,
                message_id: &stored.message_id,
                ts_ms: stored.ts_ms,
                arrived_ms: stored.ts_ms,
                metrics: &stored.metrics,
                fields: &[],
                twin: self.twins[stored.device].as_ref(),
                labels: &device.labels,
            };
            self.state
                .on_message(&self.plan, self.lateness_ms, usize::MAX, &message, fired);
        }
    }

    /// Windows that end by `to_ms` close; the one still open at `to_ms` does not.
    fn finish(&mut self, to_ms: i64, fired: &mut Vec<Firing>) {
        let end = to_ms.saturating_add(self.lateness_ms);
        self.state.on_time(&self.plan, self.lateness_ms, end, fired);
    }
}

/// Replays the tenant's telemetry in `[from_ms, to_ms)` through the rule and reports the rows
/// it would have emitted; acts on none of them.
pub async fn test_rule(
    sources: &Sources<'_>,
    tenant: TenantId,
    sql: &str,
    from_ms: i64,
    to_ms: i64,
    lateness_secs: u64,
) -> Result<TestReport, RegistryError> {
    let plan = replayable(sql)?;
    let (devices, more) = sources
        .registry
        .select_devices(tenant, &Selector::default(), None, MAX_DEVICES)
        .await?;
    let range = (from_ms, to_ms);
    let mut replay = Replay::new(sources, tenant, plan, devices, range, lateness_secs).await?;
    let (mut messages, cut) = replay.read(sources, range, MAX_MESSAGES).await?;
    messages.truncate(MAX_MESSAGES);
    let mut fired = Vec::new();
    replay.feed(&messages, &mut fired);
    replay.finish(to_ms, &mut fired);
    Ok(TestReport {
        messages: messages.len(),
        rows: fired
            .into_iter()
            .take(MAX_ROWS)
            .map(|f| TestRow {
                device: f.device,
                ts: f.ts_ms,
                clear: f.clear,
                row: f.row,
            })
            .collect(),
        truncated: more.is_some() || cut,
    })
}

/// How far a re-run got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RerunProgress {
    /// Everything before this time has been replayed and acted on.
    pub covered_to_ms: i64,
    pub messages: u64,
    pub rows: u64,
}

/// Re-runs `rule` over the tenant's telemetry in `[from_ms, to_ms)` and carries out what it
/// emits, slice of time by slice (a slice with too many messages is halved), publishing the
/// progress after each.
pub(crate) async fn rerun(
    actions: &RuleActions,
    rule: Arc<Rule>,
    (from_ms, to_ms): (i64, i64),
    progress: &tokio::sync::watch::Sender<RerunProgress>,
) -> Result<RerunProgress, RegistryError> {
    let services = actions.services();
    let sources = Sources {
        store: services.store.as_ref(),
        registry: &services.registry,
        twins: &services.twins,
    };
    let plan = replayable(&rule.sql)?;
    let (devices, more) = sources
        .registry
        .select_devices(
            rule.tenant_id,
            &Selector::default(),
            None,
            MAX_RERUN_DEVICES,
        )
        .await?;
    if more.is_some() {
        return Err(ValidationError::new(
            "rule",
            format!("a re-run covers at most {MAX_RERUN_DEVICES} devices"),
        )
        .into());
    }
    let lateness = rule.allowed_lateness_secs;
    let range = (from_ms, to_ms);
    let mut replay = Replay::new(&sources, rule.tenant_id, plan, devices, range, lateness).await?;
    let mut done = RerunProgress {
        covered_to_ms: from_ms,
        ..Default::default()
    };
    // A slice per hour to start with; halved while one holds too many messages.
    let mut slice = 3_600_000i64.min(to_ms - from_ms).max(1);
    while done.covered_to_ms < to_ms {
        let end = done.covered_to_ms.saturating_add(slice).min(to_ms);
        let (messages, cut) = replay
            .read(&sources, (done.covered_to_ms, end), MAX_SLICE_MESSAGES)
            .await?;
        if cut {
            if slice <= 1000 {
                return Err(ValidationError::new(
                    "range",
                    format!("more than {MAX_SLICE_MESSAGES} messages within one second"),
                )
                .into());
            }
            slice /= 2;
            continue;
        }
        let mut fired = Vec::new();
        replay.feed(&messages, &mut fired);
        if end == to_ms {
            replay.finish(to_ms, &mut fired);
        }
        done.messages += messages.len() as u64;
        done.rows += fired.len() as u64;
        let firings = fired.into_iter().map(|f| (rule.clone(), f, None)).collect();
        actions.act(firings).await;
        done.covered_to_ms = end;
        progress.send_replace(done);
    }
    Ok(done)
}
