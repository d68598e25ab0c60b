//! Sends Tern commands at a steady rate through the REST API (synchronous: the request waits
//! for the device's answer) and measures the round trip: REST → bridge → device → bridge →
//! registry → REST.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::provision::Api;
use crate::stats::{histogram, summary};
use tern_mqtt_client::micros_since;

/// Commands sent over `duration` at `rate` per second, spread over `devices` in turn; returns
/// the report section (counts and round-trip latency).
pub async fn run(
    api: Arc<Api>,
    tenant: &str,
    devices: &[String],
    rate: f64,
    duration: Duration,
) -> Value {
    let latency = Arc::new(Mutex::new(histogram()));
    let outcomes = Arc::new(Mutex::new((0u64, 0u64, Vec::<String>::new())));
    let gap = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    let mut next = started;
    let mut tasks = Vec::new();
    let mut sent = 0u64;
    while next < started + duration && !devices.is_empty() {
        tokio::time::sleep_until(next.into()).await;
        let device = &devices[sent as usize % devices.len()];
        let path = format!("/api/v1/tenants/{tenant}/devices/{device}/commands");
        let (api, latency, outcomes) = (api.clone(), latency.clone(), outcomes.clone());
        tasks.push(tokio::spawn(async move {
            let begun = Instant::now();
            let body =
                json!({"name": "ping", "payload": {"n": sent}, "wait_secs": 10, "ttl_secs": 10});
            let result = api.call(reqwest::Method::POST, &path, Some(body)).await;
            let elapsed = micros_since(begun).max(1);
            let mut outcomes = outcomes.lock().unwrap_or_else(|e| e.into_inner());
            match result {
                Ok((200, command)) if command["state"] == "succeeded" => {
                    outcomes.0 += 1;
                    let _ = latency
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(elapsed);
                }
                Ok((status, command)) => {
                    outcomes.1 += 1;
                    if outcomes.2.len() < 10 {
                        outcomes.2.push(format!("{status}: {}", command["state"]));
                    }
                }
                Err(e) => {
                    outcomes.1 += 1;
                    if outcomes.2.len() < 10 {
                        outcomes.2.push(format!("{e:#}"));
                    }
                }
            }
        }));
        sent += 1;
        next += gap;
    }
    for task in tasks {
        let _ = task.await;
    }
    let (succeeded, failed, errors) = outcomes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let histogram = latency.lock().unwrap_or_else(|e| e.into_inner()).clone();
    json!({
        "sent": sent,
        "succeeded": succeeded,
        "failed": failed,
        "rate_per_s": sent as f64 / duration.as_secs_f64(),
        "round_trip": summary(&Some(histogram)),
        "errors": errors,
    })
}
