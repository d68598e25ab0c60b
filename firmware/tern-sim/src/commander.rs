//! Sends Tern commands at a steady rate through the REST API (synchronous: the request waits
//! for the device's answer) and measures the round trip: REST → bridge → device → bridge →
//! registry → REST.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

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
    let phases = Arc::new(Mutex::new(Phases::default()));
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
        let (api, latency, outcomes, phases) = (
            api.clone(),
            latency.clone(),
            outcomes.clone(),
            phases.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let begun = Instant::now();
            let begun_ms = unix_ms();
            let body =
                json!({"name": "ping", "payload": {"n": sent}, "wait_secs": 10, "ttl_secs": 10});
            let result = api.call(reqwest::Method::POST, &path, Some(body)).await;
            let elapsed = micros_since(begun).max(1);
            let mut outcomes = outcomes.lock().unwrap_or_else(|e| e.into_inner());
            match result {
                Ok((200, command)) if command["state"] == "succeeded" => {
                    outcomes.0 += 1;
                    phases.lock().unwrap_or_else(|e| e.into_inner()).record(
                        begun_ms,
                        &command,
                        unix_ms(),
                    );
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
    let phases = std::mem::take(&mut *phases.lock().unwrap_or_else(|e| e.into_inner()));
    json!({
        "sent": sent,
        "succeeded": succeeded,
        "failed": failed,
        "rate_per_s": sent as f64 / duration.as_secs_f64(),
        "round_trip": summary(&Some(histogram)),
        "phases": phases.report(),
        "errors": errors,
    })
}

/// Wall-clock milliseconds, the unit of a command's history.
fn unix_ms() -> i64 {
    (crate::now_ns() / 1_000_000) as i64
}

/// Where a round trip's time went, from the command's own history (the server's clock, in
/// milliseconds; the generator runs on the same machine, so the clocks agree).
struct Phases {
    /// Request sent to command created: REST, authorisation and the store writes.
    created: Histogram<u64>,
    /// Created to delivered: routing to the device and its PUBACK.
    delivered: Histogram<u64>,
    /// Delivered to succeeded: the device's answer reaching the registry.
    answered: Histogram<u64>,
    /// Succeeded to the REST answer read by the generator.
    returned: Histogram<u64>,
}

impl Default for Phases {
    fn default() -> Self {
        Self {
            created: histogram(),
            delivered: histogram(),
            answered: histogram(),
            returned: histogram(),
        }
    }
}

impl Phases {
    fn record(&mut self, begun_ms: i64, command: &Value, done_ms: i64) {
        let at = |state: &str| {
            command["history"].as_array().and_then(|history| {
                history
                    .iter()
                    .find(|t| t["state"] == state)
                    .and_then(|t| t["at_ms"].as_i64())
            })
        };
        let (Some(created), Some(succeeded)) = (at("pending"), at("succeeded")) else {
            return;
        };
        // A response may overtake the delivery acknowledgement.
        let delivered = at("delivered").unwrap_or(succeeded).min(succeeded);
        let micros = |from: i64, to: i64| ((to - from).max(0) as u64 * 1000).max(1);
        let _ = self.created.record(micros(begun_ms, created));
        let _ = self.delivered.record(micros(created, delivered));
        let _ = self.answered.record(micros(delivered, succeeded));
        let _ = self.returned.record(micros(succeeded, done_ms));
    }

    fn report(self) -> Value {
        json!({
            "created": summary(&Some(self.created)),
            "delivered": summary(&Some(self.delivered)),
            "answered": summary(&Some(self.answered)),
            "returned": summary(&Some(self.returned)),
        })
    }
}
