//! `tern-agent enroll` and `tern-agent run`; see docs/agent.md.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tern_agent::config::AgentConfig;
use tern_agent::{Agent, Exit};

#[derive(Parser)]
#[command(
    name = "tern-agent",
    version,
    about = "The Tern device agent for Linux devices"
)]
struct Cli {
    /// The agent's configuration file.
    #[arg(
        long,
        global = true,
        default_value = "/etc/tern-agent.toml",
        env = "TERN_AGENT_CONFIG"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Exchange a pre-issued refresh token (`tern token device`) for the device's own
    /// credentials and store them under the root directory.
    Enroll {
        /// Read from the environment rather than the command line, so it stays out of `ps`.
        #[arg(long, env = "TERN_AGENT_REFRESH_TOKEN", hide_env_values = true)]
        refresh_token: String,
    },
    /// Connect and serve the platform until stopped.
    Run,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let config = AgentConfig::load(&cli.config)?;
    let agent = Agent::new(config)?;
    match cli.command {
        Command::Enroll { refresh_token } => {
            let credentials = agent.enroll(&refresh_token).await?;
            println!(
                "{}",
                serde_json::json!({
                    "tenant_id": credentials.tenant_id,
                    "device_id": credentials.device_id,
                })
            );
        }
        Command::Run => {
            let signals = agent.clone();
            tokio::spawn(async move {
                if shutdown_signal().await.is_ok() {
                    signals.shut_down();
                }
            });
            match agent.run().await.context("tern-agent stopped")? {
                Exit::Stopped => tracing::info!("stopped"),
                Exit::Wiped => tracing::warn!("wiped: enroll the device again to reconnect it"),
                Exit::Decommissioned => tracing::warn!("decommissioned"),
            }
        }
    }
    Ok(())
}

async fn shutdown_signal() -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = terminate.recv() => Ok(()),
    }
}
