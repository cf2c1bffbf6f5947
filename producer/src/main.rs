//! The `kgs-producer` binary: parses the command line, installs logging, and
//! runs the command from the library; errors are printed as one line.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use kgs_producer::{Cli, Command};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = async {
        let (command, config) = cli.resolve().context("configuration")?;
        // `run` is a service and logs its life at INFO; the one-shot commands
        // print their result and only log warnings.
        let default = if matches!(command, Command::Run { .. }) {
            "info"
        } else {
            "warn"
        };
        tracing_subscriber::fmt()
            .with_env_filter(
                EnvFilter::try_from_env("KGS_LOG").unwrap_or_else(|_| EnvFilter::new(default)),
            )
            .with_writer(std::io::stderr)
            .init();
        kgs_producer::run(command, config, kgs_producer::shutdown_signal()).await?;
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kgs-producer: {err:#}");
            ExitCode::FAILURE
        }
    }
}
