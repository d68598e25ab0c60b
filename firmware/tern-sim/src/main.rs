//! `tern-sim`: simulates many MQTT devices against Tern or any MQTT broker and reports
//! throughput and latency as JSON. See `tern-sim --help` and docs/benchmarks.md.

use anyhow::Context;
use clap::Parser;
use tern_sim::{Args, run};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let report = runtime.block_on(run(args.clone()))?;
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &args.report {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
