//! `tern rule test`: runs a rule's SQL over stored telemetry and reports the rows it would
//! have emitted, acting on none of them.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Map;
use tern_core::{Selector, TenantId, ValidationError};
use tern_registry::{Registry, RegistryError, Twins};
use tern_store::{RangeQuery, Store};

use super::sql::compile;
use super::window::{Message, RuleState};

/// Devices and messages a test reads at most, so a test stays a sample.
const MAX_DEVICES: usize = 1000;
const MAX_MESSAGES: usize = 100_000;
const MAX_ROWS: usize = 1000;

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

struct Stored {
    device: usize,
    message_id: String,
    ts_ms: i64,
    metrics: Vec<(String, f64)>,
}

/// Replays the tenant's telemetry in `[from_ms, to_ms)` through the rule, in time order.
/// Windows that end by `to_ms` close; the one still open at `to_ms` does not.
/// Where a test reads devices, twins and telemetry.
pub struct Sources<'a> {
    pub store: &'a dyn Store,
    pub registry: &'a Registry,
    pub twins: &'a Twins,
}

pub async fn test_rule(
    sources: &Sources<'_>,
    tenant: TenantId,
    sql: &str,
    from_ms: i64,
    to_ms: i64,
    lateness_secs: u64,
) -> Result<TestReport, RegistryError> {
    let plan = compile(sql).map_err(|e| ValidationError::new("sql", e.to_string()))?;
    if plan.stream != "telemetry" {
        return Err(ValidationError::new("sql", "rule tests replay stored telemetry; FROM event and FROM lifecycle cannot be tested yet").into());
    }
    let (devices, more) = sources
        .registry
        .select_devices(tenant, &Selector::default(), None, MAX_DEVICES)
        .await?;
    let mut truncated = more.is_some();
    let mut messages: Vec<Stored> = Vec::new();
    for (index, device) in devices.iter().enumerate() {
        let (tenant, id) = (tenant.to_string(), device.id.to_string());
        let mut by_message: BTreeMap<(i64, String), Vec<(String, f64)>> = BTreeMap::new();
        for latest in sources.store.latest(&tenant, &id).await? {
            let query = RangeQuery {
                tenant: tenant.clone(),
                device: id.clone(),
                from_ms,
                to_ms,
                limit: MAX_MESSAGES,
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
        if messages.len() >= MAX_MESSAGES {
            truncated = true;
            break;
        }
    }
    messages.sort_by_key(|m| m.ts_ms);
    messages.truncate(MAX_MESSAGES);

    let lateness_ms = (lateness_secs * 1000) as i64;
    let mut state = RuleState::default();
    let mut fired = Vec::new();
    // The clock advances with the messages, in steps of at least a second and at most a
    // thousand steps over the range, as the live engine's ticks would.
    let step = ((to_ms - from_ms) / 1000).max(1000);
    let mut clock = from_ms;
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
    for stored in &messages {
        if stored.ts_ms >= clock + step {
            clock = stored.ts_ms;
            state.on_time(&plan, lateness_ms, clock, &mut fired);
        }
        let device = &devices[stored.device];
        let id = device.id.to_string();
        let message = Message {
            device: &id,
            message_id: &stored.message_id,
            ts_ms: stored.ts_ms,
            arrived_ms: stored.ts_ms,
            metrics: &stored.metrics,
            fields: &[],
            twin: twins[stored.device].as_ref(),
            labels: &device.labels,
        };
        state.on_message(&plan, lateness_ms, usize::MAX, &message, &mut fired);
    }
    state.on_time(
        &plan,
        lateness_ms,
        to_ms.saturating_add(lateness_ms),
        &mut fired,
    );
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
        truncated,
    })
}
