//! The kgs producer: the only writer of a pool's keys. It generates keys in
//! an unguessable order into `keys.<pool>`, moves batches of them to
//! `used_keys.<pool>` and publishes each batch exactly once to the pool's
//! Kafka topic, as the single leader of the pool.
//!
//! # Layout
//! - [`cli`], [`config`], [`duration`]: command line, TOML/env configuration.
//! - [`pool`]: `init` and `reserve`.
//! - [`permutation`], [`generate`]: the keyed order and crash-safe generation.
//! - [`lease`]: one leader per pool.
//! - [`mover`]: the batch move/publish protocol, its recovery, returned keys.
//! - [`kafka`]: transactional publishing, backlog, search for a batch.
//! - [`leader`]: the `run` loop; [`http`] and [`metrics`]: observability.
//! - [`recycle`]: requests to recycle handed-out keys, and their execution.
//! - [`stats`]: the `stats` command; [`store`]: MongoDB access.
//! - [`failpoint`]: test-only fault injection (`KGS_FAILPOINT`).

pub mod cli;
pub mod config;
pub mod duration;
pub mod error;
pub mod failpoint;
pub mod generate;
pub mod http;
pub mod kafka;
pub mod leader;
pub mod lease;
pub mod metrics;
pub mod mover;
pub mod permutation;
pub mod pool;
pub mod recycle;
pub mod sizer;
pub mod stats;
pub mod store;

use std::future::Future;
use std::time::Duration;

pub use cli::{Cli, Command};
pub use config::Config;
pub use error::{Error, Result};

use crate::lease::{Lease, LeaseKeeper, LeaseState};
use crate::store::Store;

/// Runs one command to completion (`run` until `shutdown` resolves).
pub async fn run(
    command: Command,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    match command {
        Command::Init { spec, initial_keys } => {
            config.validate()?;
            config.check_batch_fits(&spec.format)?;
            let store = Store::connect(&config).await?;
            let outcome = pool::init(&config, &store, &spec).await?;
            let generated = initial_generation(&config, &store, &spec.name, initial_keys).await?;
            let doc = store.pool(&spec.name).await?;
            println!(
                "pool {}: {}; space {}, generated {} ({} now), topic {} ({} partitions)",
                spec.name,
                match outcome {
                    pool::InitOutcome::Created => "created",
                    pool::InitOutcome::Unchanged => "already exists with these settings",
                },
                doc.space,
                doc.cursor,
                generated,
                doc.topic,
                doc.partitions
            );
            Ok(())
        }
        Command::Run { pool } => {
            let metrics = metrics::Metrics::new(&pool);
            leader::run(config, pool, metrics, shutdown).await
        }
        Command::Stats { pool, json } => {
            let all = stats::stats(&config, pool.as_deref()).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&all).expect("stats serialize")
                );
            } else {
                for s in &all {
                    print!("{}", stats::render(s));
                }
            }
            Ok(())
        }
        Command::Recycle { pool, keys } => recycle_command(&config, &pool, keys).await,
        Command::Reserve { pool, keys } => {
            let store = Store::connect(&config).await?;
            for key in keys {
                let outcome = pool::reserve(&store, &pool, &key).await?;
                println!("{key}: {outcome:?}");
            }
            Ok(())
        }
    }
}

/// `recycle`: one line per key (`<key>: accepted` or `<key>: refused
/// (<kind>): <reason>`); an error (non-zero exit) if any was refused. With no
/// keys, or `-`, reads whitespace-separated keys from stdin.
async fn recycle_command(config: &Config, pool: &str, keys: Vec<String>) -> Result<()> {
    let keys = if keys.is_empty() || keys == ["-"] {
        let mut input = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut input)
            .map_err(|e| Error::Config(format!("reading keys from stdin: {e}")))?;
        input.split_whitespace().map(str::to_owned).collect()
    } else {
        keys
    };
    let store = Store::connect(config).await?;
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".to_owned());
    let requester = recycle::Requester::new(&store, pool, format!("kgs-producer@{host}")).await?;
    let mut refused = 0;
    for key in &keys {
        match requester.request(key).await? {
            recycle::RecycleOutcome::Accepted(_) => println!("{key}: accepted"),
            recycle::RecycleOutcome::BadKey(e) => {
                refused += 1;
                println!("{key}: refused (bad_key): {e}");
            }
            recycle::RecycleOutcome::Refused(r) => {
                refused += 1;
                println!("{key}: refused ({}): {r}", r.kind());
            }
        }
    }
    if refused > 0 {
        return Err(Error::Refused(format!(
            "{refused} of {} keys refused",
            keys.len()
        )));
    }
    Ok(())
}

/// Generates a new pool's first keys (up to `initial_keys`, at most the
/// target size) under the pool's lease, so it never runs next to a leading
/// producer, which tops the pool up itself.
async fn initial_generation(
    config: &Config,
    store: &Store,
    pool: &str,
    initial_keys: Option<u64>,
) -> Result<u64> {
    let doc = store.pool(pool).await?;
    let target = config.target_size.unwrap_or(doc.space.min(1_000_000));
    let target = initial_keys.map_or(target, |n| n.min(target));
    let holder = format!(
        "init-{}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    );
    let keeper = LeaseKeeper::spawn(Lease::new(
        store.clone(),
        pool,
        &holder,
        config.lease_duration,
    ));
    let mut guard = keeper.guard();
    // A crashed init or producer holds the lease until it expires: wait that long.
    let wait = config.lease_duration + config.lease_duration / 2;
    // A renewal that comes back late (a slow database) lapses the lease
    // locally; generation is crash-safe step by step, so take the lease
    // again and carry on, a bounded number of times.
    const MAX_LAPSES: u32 = 5;
    let mut lapses = 0;
    let result = loop {
        let leading = tokio::time::timeout(wait, guard.wait_leader())
            .await
            .is_ok();
        if !leading {
            if guard.state() == LeaseState::Standby {
                tracing::warn!(
                    pool,
                    "a producer leads this pool; it tops the pool up itself"
                );
            }
            break Ok(0);
        }
        let doc = store.pool(pool).await?;
        let bar = generate::progress_bar(
            target.min(doc.space - doc.cursor.min(doc.space)),
            "generating",
        );
        let r = generate::top_up(
            store,
            pool,
            target,
            config.generate_chunk,
            u64::MAX,
            &guard,
            Some(&bar),
        )
        .await;
        bar.finish_and_clear();
        match r {
            Err(Error::LeaseLost(_)) if lapses < MAX_LAPSES => {
                lapses += 1;
                tracing::warn!(
                    pool,
                    lapses,
                    "lease lapsed during generation (slow database?); taking it again"
                );
            }
            other => break other,
        }
    };
    keeper.stop().await;
    result
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown requested");
    // Give log lines a moment to flush before the drain starts.
    tokio::time::sleep(Duration::from_millis(1)).await;
}
