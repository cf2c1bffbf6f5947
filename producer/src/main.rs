//! The `kgs-producer` binary: parses the command line, installs logging,
//! runs the command from the library and prints what it did; errors are
//! printed as one line.

use anyhow::Context;
use clap::Parser;
use kgs_producer::cmd::{self, init::InitOutcome, recycle::RecycleOutcome};
use kgs_producer::{Cli, Command, Config, Error};
use kgs_schemas::process::shutdown_signal;

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
        kgs_schemas::process::init_logging(default);
        run(command, config).await?;
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

/// Runs one command to completion (`run` until SIGTERM or Ctrl-C) and
/// prints its result on stdout.
async fn run(command: Command, config: Config) -> kgs_producer::Result<()> {
    match command {
        Command::Init { spec, initial_keys } => {
            let report = cmd::init::run(&config, &spec, initial_keys).await?;
            let doc = &report.pool;
            println!(
                "pool {}: {}; space {}, generated {} ({} now), topic {} ({} partitions)",
                spec.name,
                match report.outcome {
                    InitOutcome::Created => "created",
                    InitOutcome::Unchanged => "already exists with these settings",
                },
                doc.space,
                doc.cursor,
                report.generated,
                doc.topic,
                doc.partitions
            );
        }
        Command::Run { pool } => {
            let metrics = kgs_producer::metrics::Metrics::new(&pool);
            kgs_producer::leader::run(config, pool, metrics, shutdown_signal()).await?;
        }
        Command::Stats { pool, json } => {
            let all = cmd::stats::stats(&config, pool.as_deref()).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&all).expect("stats serialize")
                );
            } else {
                for s in &all {
                    print!("{}", cmd::stats::render(s));
                }
            }
        }
        Command::Recycle { pool, keys } => {
            // One line per key (`<key>: accepted` or `<key>: refused
            // (<kind>): <reason>`); an error (non-zero exit) if any was
            // refused. With no keys, or `-`, reads whitespace-separated
            // keys from stdin.
            let keys = if keys.is_empty() || keys == ["-"] {
                let mut input = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut input)
                    .map_err(|e| Error::Config(format!("reading keys from stdin: {e}")))?;
                input.split_whitespace().map(str::to_owned).collect()
            } else {
                keys
            };
            let mut refused = 0;
            cmd::recycle::run(&config, &pool, &keys, |key, outcome| match outcome {
                RecycleOutcome::Accepted(_) => println!("{key}: accepted"),
                RecycleOutcome::Quarantined(_, until) => println!(
                    "{key}: accepted, quarantined until {}",
                    until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
                RecycleOutcome::BadKey(e) => {
                    refused += 1;
                    println!("{key}: refused (bad_key): {e}");
                }
                RecycleOutcome::Refused(r) => {
                    refused += 1;
                    println!("{key}: refused ({}): {r}", r.kind());
                }
            })
            .await?;
            if refused > 0 {
                return Err(Error::Refused(format!(
                    "{refused} of {} keys refused",
                    keys.len()
                )));
            }
        }
        Command::BlocklistAdd { pool, words } => {
            match cmd::blocklist::add(&config, &pool, &words).await? {
                None => println!("pool {pool}: every word is listed already; nothing added"),
                Some((added, from)) => println!(
                    "pool {pool}: added {added} words; positions from {from} on skip them, and the leading producer takes the matching keys already generated out of keys.{pool} at its next pass (see stats)"
                ),
            }
        }
        Command::Reserve { pool, keys } => {
            cmd::reserve::run(&config, &pool, &keys, |key, outcome| {
                println!("{key}: {outcome:?}")
            })
            .await?;
        }
    }
    Ok(())
}
