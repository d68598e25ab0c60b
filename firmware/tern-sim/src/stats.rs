//! Latency histograms (HDR), counters, the generator's own CPU time, and the JSON report.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Microsecond histogram up to 60 s with 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

#[derive(Default)]
pub struct DeviceStats {
    pub sent: u64,
    pub acked: u64,
    pub received: u64,
    pub ack_us: Option<Histogram<u64>>,
    pub e2e_us: Option<Histogram<u64>>,
    pub connect_us: Option<Histogram<u64>>,
    pub connect_failures: u64,
    pub errors: Vec<String>,
}

impl DeviceStats {
    pub fn new() -> Self {
        Self {
            ack_us: Some(histogram()),
            e2e_us: Some(histogram()),
            connect_us: Some(histogram()),
            ..Default::default()
        }
    }

    pub fn merge(&mut self, other: DeviceStats) {
        self.sent += other.sent;
        self.acked += other.acked;
        self.received += other.received;
        self.connect_failures += other.connect_failures;
        for (mine, theirs) in [
            (&mut self.ack_us, other.ack_us),
            (&mut self.e2e_us, other.e2e_us),
            (&mut self.connect_us, other.connect_us),
        ] {
            if let (Some(mine), Some(theirs)) = (mine.as_mut(), theirs) {
                let _ = mine.add(theirs);
            }
        }
        if self.errors.len() < 10 {
            self.errors
                .extend(other.errors.into_iter().take(10 - self.errors.len()));
        }
    }
}

#[derive(Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

pub fn summary(h: &Option<Histogram<u64>>) -> Option<Latency> {
    let h = h.as_ref()?;
    (!h.is_empty()).then(|| Latency {
        count: h.len(),
        p50_us: h.value_at_quantile(0.50),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
    })
}

/// User plus system CPU seconds of this process, from /proc/self/stat (Linux).
pub fn own_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
