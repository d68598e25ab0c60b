//! Readings: system metrics from /proc and /sys, scripts that print a JSON object, and files
//! holding one. A source that fails is logged and skipped; the others still count.

use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::config::TelemetryConfig;
use crate::hooks::{self, Invocation};

/// One reading of every configured source, merged (later sources win on equal names).
pub async fn collect(config: &TelemetryConfig, timeout: Duration) -> Map<String, Value> {
    let mut readings = Map::new();
    if config.system {
        readings.extend(system());
    }
    for script in &config.scripts {
        match hooks::run(script, Invocation::default(), timeout).await {
            Ok(out) => match object(out.as_bytes()) {
                Some(values) => readings.extend(values),
                None => tracing::warn!(%script, "telemetry script did not print a JSON object"),
            },
            Err(e) => tracing::warn!(error = %e, "telemetry script failed"),
        }
    }
    for file in &config.files {
        match std::fs::read(file).ok().and_then(|bytes| object(&bytes)) {
            Some(values) => readings.extend(values),
            None => tracing::warn!(file = %file.display(), "telemetry file is not a JSON object"),
        }
    }
    readings
}

fn object(bytes: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice(bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// Load average, memory use, uptime and CPU temperature, where the kernel offers them.
pub fn system() -> Map<String, Value> {
    let mut readings = Map::new();
    let read = |path: &str| std::fs::read_to_string(Path::new(path)).ok();
    if let Some(load) = read("/proc/loadavg").and_then(|s| first_number(&s)) {
        readings.insert("load_1m".into(), load.into());
    }
    if let Some(uptime) = read("/proc/uptime").and_then(|s| first_number(&s)) {
        readings.insert("uptime_s".into(), uptime.round().into());
    }
    if let Some(meminfo) = read("/proc/meminfo") {
        let field = |name: &str| {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(first_number)
        };
        if let (Some(total), Some(available)) = (field("MemTotal:"), field("MemAvailable:"))
            && total > 0.0
        {
            let used = 100.0 * (total - available) / total;
            readings.insert(
                "memory_used_pct".into(),
                ((used * 10.0).round() / 10.0).into(),
            );
        }
    }
    if let Some(millidegrees) =
        read("/sys/class/thermal/thermal_zone0/temp").and_then(|s| first_number(&s))
    {
        readings.insert("cpu_temp_c".into(), (millidegrees / 1000.0).into());
    }
    readings
}

fn first_number(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sources_merge_and_broken_ones_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("readings.json");
        std::fs::write(&file, r#"{"humidity": 40, "temp": 1}"#).expect("write");
        let config = TelemetryConfig {
            system: true,
            scripts: vec![
                r#"echo '{"temp": 21.5}'"#.into(),
                "echo not json".into(),
                "exit 1".into(),
            ],
            files: vec![file, dir.path().join("missing.json")],
            ..TelemetryConfig::default()
        };
        let readings = collect(&config, Duration::from_secs(10)).await;
        assert_eq!(readings["humidity"], 40);
        assert_eq!(readings["temp"], 1, "the file comes after the script");
        assert!(readings["uptime_s"].as_f64().expect("uptime") > 0.0);
        assert!(readings.contains_key("memory_used_pct"));
    }
}
