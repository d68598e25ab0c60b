//! What every Tern binary shares: layered configuration, logging, traces, metrics and shutdown.

pub mod config;
pub mod logging;
pub mod metrics;
pub mod otel;
pub mod shutdown;

pub use config::{ConfigError, load_config};
pub use metrics::MetricsRegistry;
pub use shutdown::{Shutdown, shutdown_signal};
