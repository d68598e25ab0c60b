//! Structured logs with tracing. `RUST_LOG` wins over the configured level so an operator can
//! turn up one module without a config change.

use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::otel::{self, TracingConfig, TracingGuard};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber: logs to stderr (so stdout stays for command output) and, when
/// `tracing.otlp_endpoint` is set, the pipeline's spans to the collector. Keep the guard until
/// the process ends: dropping it flushes the spans not yet sent.
pub fn init(
    level: &str,
    format: LogFormat,
    tracing: &TracingConfig,
) -> Result<TracingGuard, String> {
    // The storage engine's own info lines (journal rotation, flushes) are noise for operators.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},fjall=warn,lsm_tree=warn")));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let (spans, guard) = otel::layer(tracing)?;
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(spans)
        .try_init();
    Ok(guard)
}
