//! `tern`: the all-in-one platform (`tern up`) and the admin CLI.

mod cli;
mod client;
mod config;
mod nats_fanout;
mod output;
mod roles;
mod store;
mod up;

use std::process::ExitCode;

use clap::Parser;
use roles::{Role, Roles};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            cli::Command::Up(args) => up::run(args, Roles::All).await,
            cli::Command::Bridge(args) => up::run(args, Roles::One(Role::Bridge)).await,
            cli::Command::Registry(args) => up::run(args, Roles::One(Role::Registry)).await,
            cli::Command::Identity(args) => up::run(args, Roles::One(Role::Identity)).await,
            cli::Command::Analytics(args) => up::run(args, Roles::One(Role::Analytics)).await,
            cli::Command::Gateway(args) => up::run(args, Roles::One(Role::Gateway)).await,
            cli::Command::Dashboard(args) => up::run(args, Roles::One(Role::Dashboard)).await,
            cli::Command::Store(args) => store::run(args).await,
            cli::Command::Admin(command) => client::run(cli.global, command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
