//! `cargo bench -p tern-analytics --bench rules`: how fast one core evaluates rules, and how
//! much state a rule keeps per device. Prints one JSON object; `make bench` puts it in
//! docs/benchmarks.md. Measures the rule state machine alone (no log, store or network), which
//! is what the per-core goals are about; end-to-end latency is measured separately.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use tern_analytics::rules::sql::compile;
use tern_analytics::rules::window::{Firing, Message, RuleState};

const MINUTE: i64 = 60_000;

struct Fleet {
    devices: Vec<String>,
    ids: Vec<String>,
    labels: BTreeMap<String, String>,
}

impl Fleet {
    fn new(devices: usize) -> Self {
        Self {
            devices: (0..devices)
                .map(|i| format!("0190aaaa-0000-7000-8000-{i:012}"))
                .collect(),
            ids: (0..1024)
                .map(|i| format!("0190bbbb-0000-7000-8000-{i:012}"))
                .collect(),
            labels: BTreeMap::from([("site".into(), "berlin".into())]),
        }
    }
}

struct Run {
    events_per_s: f64,
    rows: usize,
}

/// Feeds `events` messages round-robin over the fleet, `step_ms` apart, with temperatures that
/// cycle through 0..100; `tick_every` events the wall clock moves to the latest time.
fn feed(
    sql: &str,
    fleet: &Fleet,
    events: usize,
    step_us: i64,
    tick_every: usize,
) -> (Run, RuleState) {
    let plan = compile(sql).expect("benchmark SQL compiles");
    let mut state = RuleState::default();
    let mut out: Vec<Firing> = Vec::with_capacity(1024);
    let mut rows = 0;
    let metrics: Vec<Vec<(String, f64)>> = (0..100)
        .map(|t| vec![("temp".to_string(), t as f64)])
        .collect();
    let started = Instant::now();
    for i in 0..events {
        let ts = i as i64 * step_us / 1000;
        let message = Message {
            device: &fleet.devices[i % fleet.devices.len()],
            message_id: &fleet.ids[i % fleet.ids.len()],
            ts_ms: ts,
            arrived_ms: ts,
            metrics: &metrics[i % 97],
            fields: &[],
            twin: None,
            labels: &fleet.labels,
        };
        state.on_message(&plan, 5_000, usize::MAX, &message, &mut out);
        if tick_every > 0 && i % tick_every == 0 {
            state.on_time(&plan, 5_000, ts, &mut out);
        }
        rows += out.len();
        black_box(&out);
        out.clear();
    }
    let seconds = started.elapsed().as_secs_f64();
    (
        Run {
            events_per_s: events as f64 / seconds,
            rows,
        },
        state,
    )
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Builds a rule's state for `devices` devices (one message each) and returns it with the
/// resident memory it added, per device. Callers keep the state alive until all measurements
/// are done, so that freed memory from one is not reused by the next.
fn state_per_device(sql: &str, devices: usize) -> (RuleState, f64) {
    let fleet = Fleet::new(devices);
    let before = rss_kib();
    let (_, state) = feed(sql, &fleet, devices, 1000, 0);
    let after = rss_kib();
    assert_eq!(state.groups(), devices);
    (
        state,
        (after.saturating_sub(before) * 1024) as f64 / devices as f64,
    )
}

fn main() {
    let filter_sql = "SELECT device, temp FROM telemetry WHERE temp > 90";
    let window_sql = "SELECT device, avg(temp) AS t FROM telemetry GROUP BY device, TUMBLE(ts, INTERVAL '1' MINUTE)";
    let absence_sql =
        "SELECT device, window_start FROM telemetry GROUP BY device, ABSENCE(INTERVAL '5' MINUTE)";

    // Memory first, in a fresh heap.
    let (absence_state, absence_bytes) = state_per_device(absence_sql, 100_000);
    let (window_state, window_bytes) = state_per_device(window_sql, 100_000);
    black_box((&absence_state, &window_state));
    drop((absence_state, window_state));

    let (filter, _) = feed(filter_sql, &Fleet::new(10_000), 5_000_000, 1000, 0);
    // 10k devices, one message each per second of message time (one every 100 µs in all): a
    // window per device closes every minute, after 60 messages.
    let (window, _) = feed(window_sql, &Fleet::new(10_000), 3_000_000, 100, 0);
    // The worst case: each device's messages 1,000 s apart, so every message closes the
    // device's previous window and opens another (a row per message).
    let (window_sparse, _) = feed(window_sql, &Fleet::new(10_000), 3_000_000, 100_000, 0);
    // 100k devices. The engine sweeps for silent devices once a second of wall time; the
    // sweep is timed on its own, over 100k groups of which all have gone silent.
    let (absence, mut state) = feed(absence_sql, &Fleet::new(100_000), 3_000_000, 1000, 0);
    let plan = compile(absence_sql).expect("compiles");
    let mut out = Vec::new();
    let started = Instant::now();
    state.on_time(&plan, 5_000, 3_000_000 + 10 * MINUTE, &mut out);
    let sweep_ms = started.elapsed().as_secs_f64() * 1000.0;
    let silent = out.len();
    out.clear();
    let started = Instant::now();
    state.on_time(&plan, 5_000, 3_000_000 + 11 * MINUTE, &mut out);
    let quiet_sweep_ms = started.elapsed().as_secs_f64() * 1000.0;

    let report = serde_json::json!({
        "filter": {"events_per_s": filter.events_per_s, "rows": filter.rows, "devices": 10_000},
        "tumbling_1m_avg": {"events_per_s": window.events_per_s, "rows": window.rows, "devices": 10_000},
        "tumbling_1m_avg_row_per_message": {"events_per_s": window_sparse.events_per_s, "rows": window_sparse.rows, "devices": 10_000},
        "absence_5m": {
            "events_per_s": absence.events_per_s,
            "devices": 100_000,
            "sweep_reporting_all_ms": sweep_ms,
            "silent_reported": silent,
            "sweep_nothing_new_ms": quiet_sweep_ms,
        },
        "state_bytes_per_device": {"tumbling_1m_avg": window_bytes, "absence_5m": absence_bytes},
    });
    println!("{report}");
}
