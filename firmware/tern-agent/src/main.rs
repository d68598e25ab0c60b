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
    /// Obtain the device's own credentials and store them under the root directory: by a
    /// code a person approves (`[enrolment]` in the configuration), or by exchanging a
    /// pre-issued refresh token (`tern token device`).
    Enroll {
        /// Read from the environment rather than the command line, so it stays out of `ps`.
        #[arg(long, env = "TERN_AGENT_REFRESH_TOKEN", hide_env_values = true)]
        refresh_token: Option<String>,
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
            let credentials = match refresh_token {
                Some(token) => agent.enroll(&token).await?,
                None => agent.enroll_with_code(show_code).await?,
            };
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

/// Tells the person at the device's console what to approve (standard error: standard output
/// is the result).
fn show_code(code: &tern_agent::enrolment::UserCode) {
    let minutes = code.expires_in.div_ceil(60);
    eprintln!(
        "Enrolment code: {user_code}\n\
         Within {minutes} minutes, approve it with\n  \
         tern token approve {user_code} --device NAME\n\
         (the device NAME is created if it does not exist yet).",
        user_code = code.user_code,
    );
}

async fn shutdown_signal() -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = terminate.recv() => Ok(()),
    }
}
