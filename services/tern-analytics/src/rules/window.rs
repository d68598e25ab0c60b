//! Running one rule over messages: filters emit a row per matching message; grouped rules keep
//! per-group windows (a row per window when it closes) or patterns: ABSENCE (a row when a
//! group has been silent for the interval, a clearing row when it is back), HYSTERESIS (a row
//! on entering, a clearing row on leaving) and SEQUENCE (a row when `then` follows `first`
//! within the interval).
//!
//! Event time: each message's own timestamp. Each group (a device, when grouping by device)
//! has a watermark, the newest timestamp it has seen; a window closes when the watermark passes
//! its end plus the allowed lateness, or when the wall clock does (so a device that goes quiet
//! still gets its last window). Out-of-order messages inside the lateness count; later ones are
//! dropped and counted as late.
//!
//! The state is plain data (serde), checkpointed to the store by the engine; every row carries
//! a deterministic `trigger` (the message id, or the group and window start or message) that becomes its
//! actions' idempotency key, so a replay after a crash repeats no action.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::Map;

use super::expr::{Column, Scope, Value};
use super::sql::{AggregateFn, Plan, Trigger, WindowSpec, Windowed};

/// A twin's desired and reported documents.
pub type TwinDocuments = (
    Map<String, serde_json::Value>,
    Map<String, serde_json::Value>,
);

/// A message as rules see it.
pub struct Message<'a> {
    pub device: &'a str,
    pub message_id: &'a str,
    /// The message's time: the device's, else its arrival.
    pub ts_ms: i64,
    /// When the platform received it (ABSENCE follows arrivals, not device clocks).
    pub arrived_ms: i64,
    pub metrics: &'a [(String, f64)],
    /// Other fields: the members of an event's or lifecycle event's JSON object.
    pub fields: &'a [(String, Value)],
    pub labels: &'a BTreeMap<String, String>,
    /// The device's twin (desired, reported), when the rule reads it.
    pub twin: Option<&'a TwinDocuments>,
}

impl Message<'_> {
    /// Appends the column's part of a group key without building a [`Value`] for the device.
    fn key_part(&self, column: &Column, out: &mut String) {
        match column {
            Column::Device => Value::write_text_key(self.device, out),
            other => self.column(other).write_key(out),
        }
    }
}

impl Scope for Message<'_> {
    fn column(&self, column: &Column) -> Value {
        match column {
            Column::Device => Value::Text(self.device.to_string()),
            Column::Ts => Value::Number(self.ts_ms as f64),
            Column::Metric(name) => match self.metrics.iter().find(|(n, _)| n == name) {
                Some((_, v)) => Value::Number(*v),
                None => self
                    .fields
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(Value::Null, |(_, v)| v.clone()),
            },
            Column::Label(name) => self
                .labels
                .get(name)
                .map_or(Value::Null, |v| Value::Text(v.clone())),
            Column::Twin { reported, path } => {
                let Some((desired, reported_doc)) = self.twin else {
                    return Value::Null;
                };
                let document = if *reported { reported_doc } else { desired };
                let mut at = document.get(&path[0]);
                for part in &path[1..] {
                    at = at.and_then(|v| v.get(part));
                }
                at.map_or(Value::Null, Value::from)
            }
        }
    }
}

/// A row a rule emits, to be acted on.
#[derive(Debug, Clone, PartialEq)]
pub struct Firing {
    /// Unique per rule and row, stable across replays.
    pub trigger: String,
    /// The device the row is about, when it is about one.
    pub device: Option<String>,
    /// The group the row is about (its key values joined), for alert deduplication.
    pub subject: String,
    pub ts_ms: i64,
    /// The row ends a condition (HYSTERESIS left, a silent group is back): alerts the rule
    /// raised for the subject are cleared, and other actions do not run.
    pub clear: bool,
    pub row: Map<String, serde_json::Value>,
}

/// Values a percentile keeps per window: exact up to this many, a uniform sample beyond.
const PERCENTILE_SAMPLE: usize = 256;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Accumulator {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    /// Percentiles only: the values, or a reservoir sample of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    samples: Vec<f64>,
}

/// A fixed scrambling of `n` (splitmix64): reservoir sampling that a replay repeats exactly.
fn scramble(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Accumulator {
    fn add(&mut self, value: f64, function: AggregateFn) {
        if self.count == 0 {
            (self.min, self.max) = (value, value);
        }
        self.count += 1;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        if let AggregateFn::Percentile(_) = function {
            if self.samples.len() < PERCENTILE_SAMPLE {
                self.samples.push(value);
            } else {
                let slot = (scramble(self.count) % self.count) as usize;
                if let Some(kept) = self.samples.get_mut(slot) {
                    *kept = value;
                }
            }
        }
    }

    fn result(&self, function: AggregateFn) -> Value {
        if function == AggregateFn::Count {
            return Value::Number(self.count as f64);
        }
        if self.count == 0 {
            return Value::Null;
        }
        Value::Number(match function {
            AggregateFn::Sum => self.sum,
            AggregateFn::Avg => self.sum / self.count as f64,
            AggregateFn::Min => self.min,
            AggregateFn::Max => self.max,
            AggregateFn::Percentile(ppm) => {
                // Linear interpolation between the closest ranks (PERCENTILE_CONT).
                let mut sorted = self.samples.clone();
                sorted.sort_by(f64::total_cmp);
                let rank = f64::from(ppm) / 1e6 * (sorted.len() - 1) as f64;
                let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
                sorted[low] + (sorted[high] - sorted[low]) * (rank - low as f64)
            }
            AggregateFn::Count => self.count as f64,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Group {
    keys: Vec<Value>,
    watermark_ms: i64,
    /// Windows ending at or before this have fired; a message for them is late.
    fired_until_ms: i64,
    /// Open windows by start: one accumulator per aggregate of the rule.
    windows: BTreeMap<i64, Vec<Accumulator>>,
    #[serde(default)]
    pattern: PatternState,
    /// SESSION: the open session.
    #[serde(default)]
    session: Option<Session>,
}

/// A session window: messages no further apart than the gap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Session {
    start_ms: i64,
    last_ms: i64,
    accumulators: Vec<Accumulator>,
}

/// The state of ABSENCE, HYSTERESIS and SEQUENCE for one group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct PatternState {
    /// ABSENCE: when the group's latest message arrived, and whether its silence since then
    /// has been reported.
    last_arrival_ms: i64,
    silent: bool,
    /// HYSTERESIS: entered and not yet left.
    on: bool,
    /// SEQUENCE: times of `first` messages still waiting for a `then`, oldest first.
    pending: VecDeque<i64>,
}

/// SEQUENCE keeps at most this many unmatched `first` messages per group.
const MAX_PENDING: usize = 64;

/// The group a message belongs to: its key values, joined.
pub fn group_key(windowed: &Windowed, message: &Message) -> String {
    let mut key = String::with_capacity(48);
    for (i, column) in windowed.keys.iter().enumerate() {
        if i > 0 {
            key.push(',');
        }
        message.key_part(column, &mut key);
    }
    key
}

/// What became of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Filtered out, emitted, or added to its windows.
    Taken,
    /// Every window it belongs to had closed.
    Late,
    /// It would open a group beyond the rule's limit.
    OverLimit,
}

/// The state of one rule: its open windows or patterns per group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleState {
    groups: HashMap<String, Group>,
    /// Messages dropped because their windows had closed.
    pub late_messages: u64,
}

/// What a grouped rule's output sees: the group's keys, its aggregates (windows), the span,
/// and the message that completed a pattern.
struct GroupScope<'a> {
    keys: &'a [Value],
    aggregates: Vec<Value>,
    window: (i64, i64),
    message: Option<&'a Message<'a>>,
}

impl Scope for GroupScope<'_> {
    fn column(&self, column: &Column) -> Value {
        self.message.map_or(Value::Null, |m| m.column(column))
    }
    fn group_key(&self, index: usize) -> Value {
        self.keys.get(index).cloned().unwrap_or(Value::Null)
    }
    fn aggregate(&self, index: usize) -> Value {
        self.aggregates.get(index).cloned().unwrap_or(Value::Null)
    }
    fn window(&self) -> Option<(i64, i64)> {
        Some(self.window)
    }
}

/// JSON for a value; whole numbers (counts, timestamps) come out as integers.
fn json(value: Value) -> serde_json::Value {
    match value {
        Value::Number(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => (n as i64).into(),
        // NaN and infinities have no JSON form.
        Value::Number(n) => {
            serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, Into::into)
        }
        Value::Text(t) => t.into(),
        Value::Bool(b) => b.into(),
        Value::Null => serde_json::Value::Null,
    }
}

impl RuleState {
    /// Open groups; the engine bounds them per rule.
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// Feeds one message; rows it completes go to `out`. A grouped rule keeps at most
    /// `max_groups` groups.
    pub fn on_message(
        &mut self,
        plan: &Plan,
        lateness_ms: i64,
        max_groups: usize,
        message: &Message,
        out: &mut Vec<Firing>,
    ) -> Outcome {
        if plan.filter.as_ref().is_some_and(|f| !f.holds(message)) {
            return Outcome::Taken;
        }
        let Some(windowed) = &plan.windowed else {
            out.push(Firing {
                trigger: message.message_id.to_string(),
                device: Some(message.device.to_string()),
                subject: message.device.to_string(),
                ts_ms: message.ts_ms,
                clear: false,
                row: output_row(plan, message, Some(message)),
            });
            return Outcome::Taken;
        };
        // The hot path: one allocation for the key; the key values only for a new group.
        let key = group_key(windowed, message);
        if !self.groups.contains_key(&key) {
            if self.groups.len() >= max_groups {
                return Outcome::OverLimit;
            }
            let group = Group {
                keys: windowed.keys.iter().map(|k| message.column(k)).collect(),
                watermark_ms: i64::MIN,
                fired_until_ms: i64::MIN,
                windows: BTreeMap::new(),
                pattern: PatternState::default(),
                session: None,
            };
            self.groups.insert(key.clone(), group);
        }
        let Some(group) = self.groups.get_mut(&key) else {
            return Outcome::Taken;
        };
        let emit = Emitter {
            plan,
            windowed,
            key: &key,
        };
        match &windowed.trigger {
            Trigger::Window(spec) => {
                if !add_to_windows(windowed, *spec, lateness_ms, group, message) {
                    self.late_messages += 1;
                    return Outcome::Late;
                }
                group.watermark_ms = group.watermark_ms.max(message.ts_ms);
                let until = group.watermark_ms.saturating_sub(lateness_ms);
                fire_windows(&emit, *spec, group, until, out);
            }
            Trigger::Session { gap_ms } => {
                let ts = message.ts_ms;
                // A message more than the gap after the open session ends it first.
                if group
                    .session
                    .as_ref()
                    .is_some_and(|s| ts > s.last_ms + gap_ms)
                {
                    fire_session(&emit, *gap_ms, group, i64::MAX, out);
                }
                let joins = ts > group.fired_until_ms
                    && group
                        .session
                        .as_ref()
                        .is_none_or(|s| ts >= s.start_ms - gap_ms);
                if !joins {
                    self.late_messages += 1;
                    return Outcome::Late;
                }
                let session = group.session.get_or_insert_with(|| Session {
                    start_ms: ts,
                    last_ms: ts,
                    accumulators: vec![Accumulator::default(); windowed.aggregates.len()],
                });
                session.start_ms = session.start_ms.min(ts);
                session.last_ms = session.last_ms.max(ts);
                accumulate(windowed, &mut session.accumulators, message);
                group.watermark_ms = group.watermark_ms.max(ts);
            }
            Trigger::Absence { timeout_ms } => {
                let state = &mut group.pattern;
                if state.silent {
                    // The group is back: its absence row is cleared.
                    let span = (state.last_arrival_ms, state.last_arrival_ms + timeout_ms);
                    out.push(emit.row(
                        &group.keys,
                        span,
                        None,
                        format!("{key}@{}/back", state.last_arrival_ms),
                        true,
                    ));
                }
                state.silent = false;
                state.last_arrival_ms = state.last_arrival_ms.max(message.arrived_ms);
            }
            Trigger::Hysteresis { enter, leave } => {
                let on = group.pattern.on;
                let flips = if on {
                    leave.holds(message)
                } else {
                    enter.holds(message)
                };
                if flips {
                    group.pattern.on = !on;
                    let trigger = format!("{key}@{}", message.message_id);
                    let span = (message.ts_ms, message.ts_ms);
                    out.push(emit.row(&group.keys, span, Some(message), trigger, on));
                }
            }
            Trigger::Sequence {
                first,
                then,
                within_ms,
            } => {
                let pending = &mut group.pattern.pending;
                let ts = message.ts_ms;
                pending.retain(|&at| at >= ts - within_ms);
                if then.holds(message)
                    && let Some(i) = pending.iter().position(|&at| at <= ts)
                    && let Some(at) = pending.remove(i)
                {
                    let trigger = format!("{key}@{}", message.message_id);
                    out.push(emit.row(&group.keys, (at, ts), Some(message), trigger, false));
                }
                if first.holds(message) {
                    if pending.len() == MAX_PENDING {
                        pending.pop_front();
                    }
                    pending.push_back(ts);
                }
            }
        }
        Outcome::Taken
    }

    /// What the wall clock decides: closes the windows it has passed (plus lateness), reports
    /// silent groups (ABSENCE), and forgets groups with nothing left to track.
    pub fn on_time(&mut self, plan: &Plan, lateness_ms: i64, now_ms: i64, out: &mut Vec<Firing>) {
        let Some(windowed) = &plan.windowed else {
            return;
        };
        let until = now_ms.saturating_sub(lateness_ms);
        for (key, group) in self.groups.iter_mut() {
            let emit = Emitter {
                plan,
                windowed,
                key,
            };
            match &windowed.trigger {
                Trigger::Window(spec) => fire_windows(&emit, *spec, group, until, out),
                Trigger::Session { gap_ms } => fire_session(&emit, *gap_ms, group, until, out),
                Trigger::Absence { timeout_ms } => {
                    let state = &mut group.pattern;
                    let since = state.last_arrival_ms;
                    if !state.silent && now_ms.saturating_sub(since) >= *timeout_ms {
                        state.silent = true;
                        let trigger = format!("{key}@{since}");
                        out.push(emit.row(
                            &group.keys,
                            (since, since + timeout_ms),
                            None,
                            trigger,
                            false,
                        ));
                    }
                }
                Trigger::Hysteresis { .. } | Trigger::Sequence { .. } => {}
            }
        }
        self.groups.retain(|_, g| match &windowed.trigger {
            Trigger::Window(spec) => {
                !g.windows.is_empty() || g.watermark_ms > until.saturating_sub(spec.size_ms)
            }
            Trigger::Session { .. } => g.session.is_some(),
            Trigger::Absence { .. } => true,
            Trigger::Hysteresis { .. } => g.pattern.on,
            Trigger::Sequence { .. } => !g.pattern.pending.is_empty(),
        });
    }
}

/// Adds a message to every open window that covers it; false when all of them had closed.
fn add_to_windows(
    windowed: &Windowed,
    spec: WindowSpec,
    lateness_ms: i64,
    group: &mut Group,
    message: &Message,
) -> bool {
    let ts = message.ts_ms;
    let mut accepted = false;
    let mut start = ts.div_euclid(spec.slide_ms) * spec.slide_ms;
    while start > ts - spec.size_ms {
        let end = start + spec.size_ms;
        let closed =
            end <= group.fired_until_ms || end.saturating_add(lateness_ms) <= group.watermark_ms;
        if !closed {
            accepted = true;
            let accumulators = group
                .windows
                .entry(start)
                .or_insert_with(|| vec![Accumulator::default(); windowed.aggregates.len()]);
            accumulate(windowed, accumulators, message);
        }
        start -= spec.slide_ms;
    }
    accepted
}

/// Adds a message to one window's accumulators.
fn accumulate(windowed: &Windowed, accumulators: &mut [Accumulator], message: &Message) {
    for (aggregate, acc) in windowed.aggregates.iter().zip(accumulators.iter_mut()) {
        let function = aggregate.function;
        match &aggregate.argument {
            None => acc.add(0.0, function),
            Some(argument) => match argument.eval(message) {
                Value::Number(n) => acc.add(n, function),
                Value::Null => {}
                // count(x) counts non-NULL values of any type.
                _ if function == AggregateFn::Count => acc.add(0.0, function),
                _ => {}
            },
        }
    }
}

/// Builds a grouped rule's rows.
struct Emitter<'a> {
    plan: &'a Plan,
    windowed: &'a Windowed,
    key: &'a str,
}

impl Emitter<'_> {
    fn device(&self, keys: &[Value]) -> Option<String> {
        let i = self
            .windowed
            .keys
            .iter()
            .position(|k| *k == Column::Device)?;
        match &keys[i] {
            Value::Text(d) => Some(d.clone()),
            _ => None,
        }
    }

    /// A window's (or session's) row, unless HAVING refuses it.
    fn window_row(
        &self,
        keys: &[Value],
        span: (i64, i64),
        accumulators: &[Accumulator],
        out: &mut Vec<Firing>,
    ) {
        let scope = GroupScope {
            keys,
            aggregates: self
                .windowed
                .aggregates
                .iter()
                .zip(accumulators)
                .map(|(a, acc)| acc.result(a.function))
                .collect(),
            window: span,
            message: None,
        };
        if self
            .windowed
            .having
            .as_ref()
            .is_some_and(|h| !h.holds(&scope))
        {
            return;
        }
        out.push(Firing {
            trigger: format!("{}@{}", self.key, span.0),
            device: self.device(keys),
            subject: self.key.to_string(),
            ts_ms: span.1,
            clear: false,
            row: output_row(self.plan, &scope, None),
        });
    }

    /// A pattern's row: keys, the span, and the message that completed it (if any).
    fn row(
        &self,
        keys: &[Value],
        span: (i64, i64),
        message: Option<&Message>,
        trigger: String,
        clear: bool,
    ) -> Firing {
        let scope = GroupScope {
            keys,
            aggregates: Vec::new(),
            window: span,
            message,
        };
        Firing {
            trigger,
            device: self.device(keys),
            subject: self.key.to_string(),
            ts_ms: span.1,
            clear,
            row: output_row(self.plan, &scope, message),
        }
    }
}

/// Fires, in order, the group's windows that end at or before `until`.
fn fire_windows(
    emit: &Emitter,
    spec: WindowSpec,
    group: &mut Group,
    until: i64,
    out: &mut Vec<Firing>,
) {
    while let Some(entry) = group.windows.first_entry() {
        let start = *entry.key();
        let end = start + spec.size_ms;
        if end > until {
            break;
        }
        let accumulators = entry.remove();
        group.fired_until_ms = group.fired_until_ms.max(end);
        emit.window_row(&group.keys, (start, end), &accumulators, out);
    }
}

/// Closes the group's session if its gap (plus lateness) has passed by `until`.
fn fire_session(emit: &Emitter, gap_ms: i64, group: &mut Group, until: i64, out: &mut Vec<Firing>) {
    if let Some(session) = group.session.take_if(|s| s.last_ms + gap_ms <= until) {
        group.fired_until_ms = group.fired_until_ms.max(session.last_ms);
        let span = (session.start_ms, session.last_ms + gap_ms);
        emit.window_row(&group.keys, span, &session.accumulators, out);
    }
}

/// The output columns evaluated in `scope`; `SELECT *` adds the message's device, time,
/// metrics and fields first.
fn output_row(
    plan: &Plan,
    scope: &dyn Scope,
    message: Option<&Message>,
) -> Map<String, serde_json::Value> {
    let mut row = Map::new();
    if plan.select_all
        && let Some(message) = message
    {
        row.insert("device".into(), message.device.into());
        row.insert("ts".into(), message.ts_ms.into());
        for (name, value) in message.metrics {
            row.insert(name.clone(), json(Value::Number(*value)));
        }
        for (name, value) in message.fields {
            row.insert(name.clone(), json(value.clone()));
        }
    }
    for (name, e) in &plan.columns {
        row.insert(name.clone(), json(e.eval(scope)));
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::sql::compile;

    const MIN: i64 = 60_000;

    struct Feed {
        plan: Plan,
        state: RuleState,
        lateness: i64,
        labels: BTreeMap<String, String>,
        fired: Vec<Firing>,
        n: u32,
    }

    impl Feed {
        fn new(sql: &str, lateness: i64) -> Self {
            Self {
                plan: compile(sql).expect("plan"),
                state: RuleState::default(),
                lateness,
                labels: BTreeMap::from([("site".to_string(), "berlin".to_string())]),
                fired: Vec::new(),
                n: 0,
            }
        }

        fn send(&mut self, device: &str, ts_ms: i64, temp: f64) -> bool {
            self.send_metrics(device, ts_ms, &[("temp", temp)])
        }

        /// Sends a message that arrives at its own time.
        fn send_metrics(&mut self, device: &str, ts_ms: i64, metrics: &[(&str, f64)]) -> bool {
            self.n += 1;
            let metrics: Vec<(String, f64)> =
                metrics.iter().map(|(n, v)| (n.to_string(), *v)).collect();
            let message = Message {
                device,
                message_id: &format!("m{}", self.n),
                ts_ms,
                arrived_ms: ts_ms,
                metrics: &metrics,
                fields: &[],
                labels: &self.labels,
                twin: None,
            };
            let outcome =
                self.state
                    .on_message(&self.plan, self.lateness, 2, &message, &mut self.fired);
            outcome == Outcome::Taken
        }

        fn rows(&mut self) -> Vec<(i64, f64)> {
            self.fired
                .drain(..)
                .map(|f| {
                    (
                        f.row["window_start"].as_f64().unwrap_or(f64::NAN) as i64,
                        f.row["v"].as_f64().unwrap_or(f64::NAN),
                    )
                })
                .collect()
        }
    }

    fn tick(feed: &mut Feed, now_ms: i64) {
        let mut out = Vec::new();
        feed.state
            .on_time(&feed.plan, feed.lateness, now_ms, &mut out);
        feed.fired.extend(out);
    }

    #[test]
    fn absence_reports_a_silent_device_once_and_clears_when_it_is_back() {
        let sql = "SELECT device, window_start AS last_seen FROM telemetry \
                   GROUP BY device, ABSENCE(INTERVAL '5' MINUTE)";
        let mut feed = Feed::new(sql, 0);
        feed.send("d", 0, 1.0);
        feed.send("e", 3 * MIN, 1.0);
        tick(&mut feed, 5 * MIN - 1);
        assert!(feed.fired.is_empty());
        tick(&mut feed, 5 * MIN);
        tick(&mut feed, 6 * MIN);
        let rows: Vec<_> = feed
            .fired
            .drain(..)
            .map(|f| (f.subject, f.row["last_seen"].clone(), f.clear))
            .collect();
        assert_eq!(
            rows,
            vec![("\"d\"".to_string(), serde_json::json!(0), false)],
            "once, for d only"
        );
        feed.send("d", 7 * MIN, 1.0);
        assert_eq!(feed.fired.len(), 1);
        assert!(feed.fired[0].clear, "d is back");
        feed.fired.clear();
        tick(&mut feed, 12 * MIN);
        let mut triggers: Vec<_> = feed.fired.iter().map(|f| f.trigger.clone()).collect();
        triggers.sort();
        assert_eq!(
            triggers,
            vec![format!("\"d\"@{}", 7 * MIN), format!("\"e\"@{}", 3 * MIN)]
        );
    }

    #[test]
    fn hysteresis_enters_above_and_leaves_only_below_the_lower_threshold() {
        let sql =
            "SELECT device, temp FROM telemetry GROUP BY device, HYSTERESIS(temp > 80, temp < 70)";
        let mut feed = Feed::new(sql, 0);
        for (i, temp) in [75.0, 85.0, 90.0, 75.0, 65.0, 72.0, 85.0]
            .into_iter()
            .enumerate()
        {
            feed.send("d", i as i64, temp);
        }
        let rows: Vec<_> = feed
            .fired
            .iter()
            .map(|f| (f.row["temp"].as_f64().unwrap_or_default(), f.clear))
            .collect();
        assert_eq!(rows, vec![(85.0, false), (65.0, true), (85.0, false)]);
    }

    #[test]
    fn sequence_matches_then_after_first_within_the_interval_once() {
        let sql = "SELECT device, window_start, window_end FROM telemetry \
                   GROUP BY device, SEQUENCE(door = 1, motion = 1, INTERVAL '10' SECOND)";
        let mut feed = Feed::new(sql, 0);
        let s = 1000;
        feed.send_metrics("d", 0, &[("door", 1.0)]);
        feed.send_metrics("d", 5 * s, &[("motion", 1.0)]);
        feed.send_metrics("d", 6 * s, &[("motion", 1.0)]); // the door was matched already
        feed.send_metrics("d", 20 * s, &[("door", 1.0)]);
        feed.send_metrics("d", 31 * s, &[("motion", 1.0)]); // 11 s later: too late
        feed.send_metrics("e", 32 * s, &[("door", 1.0)]);
        feed.send_metrics("d", 40 * s, &[("door", 1.0), ("motion", 1.0)]); // a door, not yet a pair
        feed.send_metrics("e", 41 * s, &[("motion", 1.0)]);
        feed.send_metrics("d", 45 * s, &[("motion", 1.0)]);
        let spans: Vec<_> = feed
            .fired
            .iter()
            .map(|f| {
                (
                    f.device.clone().unwrap_or_default(),
                    f.row["window_start"].clone(),
                    f.row["window_end"].clone(),
                )
            })
            .collect();
        assert_eq!(
            spans,
            vec![
                ("d".into(), serde_json::json!(0), serde_json::json!(5 * s)),
                (
                    "e".into(),
                    serde_json::json!(32 * s),
                    serde_json::json!(41 * s)
                ),
                (
                    "d".into(),
                    serde_json::json!(40 * s),
                    serde_json::json!(45 * s)
                ),
            ]
        );
    }

    #[test]
    fn percentiles_are_exact_for_small_windows_and_sampled_for_large_ones() {
        let sql = "SELECT device, median(temp) AS v, percentile(temp, 0.9) AS p90 FROM telemetry \
                   GROUP BY device, TUMBLE(ts, INTERVAL '1' MINUTE)";
        let mut feed = Feed::new(sql, 0);
        for (i, temp) in [7.0, 1.0, 11.0, 3.0, 5.0, 9.0, 2.0, 4.0, 6.0, 8.0, 10.0]
            .into_iter()
            .enumerate()
        {
            feed.send("d", i as i64, temp);
        }
        for i in 0..10_000 {
            feed.send("d", MIN + i, i as f64);
        }
        feed.send("d", 3 * MIN, 0.0);
        let rows: Vec<_> = feed
            .fired
            .iter()
            .map(|f| {
                (
                    f.row["v"].as_f64().unwrap_or(-1.0),
                    f.row["p90"].as_f64().unwrap_or(-1.0),
                )
            })
            .collect();
        assert_eq!(rows[0], (6.0, 10.0), "exact: 11 values");
        let (median, p90) = rows[1];
        assert!(
            (median - 5000.0).abs() < 1000.0 && (p90 - 9000.0).abs() < 1000.0,
            "sampled: {rows:?}"
        );
    }

    #[test]
    fn sessions_close_after_the_gap_by_message_or_by_clock() {
        let sql = "SELECT device, window_start, window_end, count(*) AS v FROM telemetry \
                   GROUP BY device, SESSION(ts, INTERVAL '10' SECOND)";
        let mut feed = Feed::new(sql, 0);
        let s = 1000;
        for at in [0, 4 * s, 9 * s, 2 * s] {
            feed.send("d", at, 1.0); // one burst; the last one out of order
        }
        assert!(feed.fired.is_empty());
        feed.send("d", 30 * s, 1.0); // 21 s after the last: a new session
        assert!(!feed.send("d", 5 * s, 1.0), "its session has closed: late");
        tick(&mut feed, 39 * s);
        assert_eq!(
            feed.fired.len(),
            1,
            "the second session is 9 s quiet, not yet 10"
        );
        tick(&mut feed, 40 * s);
        let spans: Vec<_> = feed
            .fired
            .iter()
            .map(|f| {
                (
                    f.row["window_start"].clone(),
                    f.row["window_end"].clone(),
                    f.row["v"].clone(),
                )
            })
            .collect();
        let j = |n: i64| serde_json::json!(n);
        assert_eq!(
            spans,
            vec![(j(0), j(19 * s), j(4)), (j(30 * s), j(40 * s), j(1))]
        );
    }

    #[test]
    fn a_filter_emits_matching_messages_with_label_columns() {
        let mut feed = Feed::new(
            "SELECT device, temp, labels.site FROM telemetry WHERE temp > 50 AND labels.site = 'berlin'",
            0,
        );
        feed.send("d1", 1, 40.0);
        feed.send("d1", 2, 60.0);
        feed.labels.insert("site".into(), "paris".into());
        feed.send("d1", 3, 70.0);
        assert_eq!(feed.fired.len(), 1);
        let firing = &feed.fired[0];
        assert_eq!(
            (firing.trigger.as_str(), firing.device.as_deref()),
            ("m2", Some("d1"))
        );
        assert_eq!(
            serde_json::Value::Object(firing.row.clone()),
            serde_json::json!({"device": "d1", "temp": 60, "site": "berlin"})
        );
    }

    #[test]
    fn tumbling_windows_take_out_of_order_messages_within_lateness_and_drop_later_ones() {
        let sql = "SELECT device, window_start, sum(temp) AS v FROM telemetry GROUP BY device, TUMBLE(ts, INTERVAL '1' MINUTE)";
        let mut feed = Feed::new(sql, 10_000);
        feed.send("d", 5_000, 1.0);
        feed.send("d", 61_000, 2.0);
        // Out of order but within the lateness: still counts for the first minute.
        feed.send("d", 30_000, 4.0);
        assert!(
            feed.rows().is_empty(),
            "the first window waits for its lateness"
        );
        feed.send("d", MIN + 10_000, 8.0);
        assert_eq!(feed.rows(), vec![(0, 5.0)]);
        // Too late: the first window has fired.
        assert!(!feed.send("d", 59_000, 100.0));
        assert_eq!(feed.state.late_messages, 1);
        // The wall clock closes the last window of a device that went quiet.
        let mut fired = Vec::new();
        feed.state
            .on_time(&feed.plan, feed.lateness, 2 * MIN + 10_000, &mut fired);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].row["v"], 10);
        assert_eq!(fired[0].trigger, format!("{:?}@{MIN}", "d"));
    }

    #[test]
    fn hopping_windows_count_each_message_in_every_window_that_covers_it() {
        let sql = "SELECT window_start, count(*) AS v FROM telemetry GROUP BY HOP(ts, INTERVAL '1' MINUTE, INTERVAL '3' MINUTE)";
        let mut feed = Feed::new(sql, MIN);
        feed.send("a", 90_000, 1.0); // windows starting at -1, 0 and 1 minute
        feed.send("b", 150_000, 1.0); // 0, 1, 2 (another device, same global group)
        // Out of order: the windows starting at -1 and 0 are open (their end plus a minute of
        // lateness is after the watermark, 2.5 minutes); the one at -2 is closed.
        assert!(feed.send("a", 30_000, 1.0));
        assert_eq!(
            feed.state.late_messages, 0,
            "late only for some of its windows"
        );
        feed.send("a", 10 * MIN, 1.0);
        assert_eq!(
            feed.rows(),
            vec![(-MIN, 2.0), (0, 3.0), (MIN, 2.0), (2 * MIN, 1.0)]
        );
    }

    #[test]
    fn having_filters_windows_and_groups_by_label() {
        let sql = "SELECT labels.site, avg(temp) AS v, window_start FROM telemetry \
                   GROUP BY labels.site, TUMBLE(ts, INTERVAL '1' MINUTE) HAVING avg(temp) > 10";
        let mut feed = Feed::new(sql, 0);
        feed.send("a", 1_000, 5.0);
        feed.send("b", 2_000, 25.0);
        feed.send("a", MIN + 1_000, 1.0);
        feed.send("a", 2 * MIN + 1_000, 1.0);
        assert_eq!(feed.fired.len(), 1, "the second minute's average is 1");
        assert_eq!(feed.fired[0].row["site"], "berlin");
        assert_eq!(
            feed.fired[0].device, None,
            "grouped by label: no single device"
        );
        assert_eq!(feed.rows(), vec![(0, 15.0)]);
    }

    #[test]
    fn state_round_trips_through_json() {
        let sql = "SELECT device, sum(temp) AS v FROM telemetry GROUP BY device, TUMBLE(ts, INTERVAL '1' MINUTE)";
        let mut feed = Feed::new(sql, 0);
        feed.send("d", 1_000, 2.0);
        // The feed allows two groups: a third device is refused, a known one is not.
        feed.send("e", 1_000, 2.0);
        assert!(!feed.send("f", 1_000, 2.0));
        assert_eq!(feed.state.groups(), 2);
        let saved = serde_json::to_vec(&feed.state).expect("encode");
        feed.state = serde_json::from_slice(&saved).expect("decode");
        feed.send("d", 2_000, 3.0);
        feed.send("d", MIN, 0.0);
        assert_eq!(feed.fired[0].row["v"], 5);
    }
}
