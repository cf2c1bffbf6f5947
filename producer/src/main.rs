//! The `kgs-producer` binary: parses the command line, installs logging, and
//! runs the command from the library; errors are printed as one line.

use anyhow::Context;
use clap::Parser;
use kgs_producer::{Cli, Command};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
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
    let code = match result {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("kgs-producer: {err:#}");
            1
        }
    };
    // Exit here, with the runtime still up: dropping it stops the MongoDB
    // driver's background tasks mid-request, and one of them can panic on
    // the way out (a second, confusing line after the one-line error). The
    // command's work is done (and `run` has released its lease) by now.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}
