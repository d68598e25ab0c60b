//! Decoding device payloads: a JSON object of metric name to number (optionally with `ts`) is
//! telemetry; anything else is kept as a raw event.

use serde_json::Value;

/// Metrics decoded from a telemetry payload.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedTelemetry {
    /// The device's own timestamp (`ts`, milliseconds since the epoch), if it sent one.
    pub device_time_ms: Option<i64>,
    pub metrics: Vec<(String, f64)>,
}

/// Decodes `{"temp": 21.5, "ts": 1700000000000}`. Returns `None` when the payload is not a JSON
/// object with at least one numeric member; booleans count as 0/1, other non-numbers are skipped.
pub fn decode_telemetry(payload: &[u8]) -> Option<DecodedTelemetry> {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(payload) else {
        return None;
    };
    let mut device_time_ms = None;
    let mut metrics = Vec::with_capacity(map.len());
    for (name, value) in map {
        if !is_valid_metric_name(&name) {
            continue;
        }
        if name == "ts" {
            device_time_ms = value.as_i64().or_else(|| value.as_f64().map(|f| f as i64));
            continue;
        }
        let number = match value {
            Value::Number(n) => n.as_f64(),
            Value::Bool(b) => Some(if b { 1.0 } else { 0.0 }),
            _ => None,
        };
        if let Some(number) = number.filter(|n| n.is_finite()) {
            metrics.push((name, number));
        }
    }
    if metrics.is_empty() {
        return None;
    }
    // By name, whatever order the device sent them in (and whatever order the JSON map keeps).
    metrics.sort_by(|a, b| a.0.cmp(&b.0));
    Some(DecodedTelemetry {
        device_time_ms,
        metrics,
    })
}

/// Metric names become storage keys and label values: 1..=128 bytes, no control characters.
fn is_valid_metric_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && !name.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_numbers_and_timestamp() {
        let t =
            decode_telemetry(br#"{"temp": 21.5, "on": true, "label": "x", "ts": 1700000000000}"#)
                .unwrap();
        assert_eq!(t.device_time_ms, Some(1_700_000_000_000));
        assert_eq!(
            t.metrics,
            vec![("on".to_string(), 1.0), ("temp".to_string(), 21.5)]
        );
    }

    #[test]
    fn non_objects_and_objects_without_numbers_are_not_telemetry() {
        assert_eq!(decode_telemetry(b"hello"), None);
        assert_eq!(decode_telemetry(b"[1,2]"), None);
        assert_eq!(decode_telemetry(br#"{"msg":"hi"}"#), None);
        assert_eq!(decode_telemetry(&[0xff, 0xfe]), None);
        assert_eq!(decode_telemetry(br#"{"bad\u0000name": 1}"#), None);
    }
}
