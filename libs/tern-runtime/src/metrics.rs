//! Prometheus metrics. Each service registers its own metrics under its prefix when it is built;
//! the HTTP edge renders the registry at `/metrics`.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use prometheus_client::metrics;

/// The one bucket layout for latencies, 100 µs to about 3.3 s, so every service's histograms
/// line up on the same dashboards.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// A shared registry; services add metrics while starting, scrapes render it.
#[derive(Clone, Default)]
pub struct MetricsRegistry {
    inner: Arc<Mutex<Registry>>,
}

impl MetricsRegistry {
    /// Registers metrics under `prefix` (e.g. `tern_bridge`).
    pub fn register(&self, prefix: &str, f: impl FnOnce(&mut Registry)) {
        let mut root = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(root.sub_registry_with_prefix(prefix));
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let root = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        if encode(&mut out, &root).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn registered_metrics_are_rendered_with_prefix() {
        let registry = MetricsRegistry::default();
        let counter = Counter::<u64>::default();
        registry.register("tern_test", |r| {
            r.register("things", "Things seen", counter.clone())
        });
        counter.inc_by(3);
        let text = registry.render();
        assert!(text.contains("tern_test_things_total 3"), "{text}");
    }
}
