//! `kgs-producer run`: wait for the pool's lease, then, while leading, keep
//! every partition's backlog between the watermarks, top the pool up, put
//! returned and recycled keys back, and finish any unfinished batch first.

pub mod lead;
pub mod lease;
pub mod sizer;

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::kafka::topic_partition_count;
use crate::metrics::Metrics;
use crate::store::Store;
use lead::lead;
use lease::{Lease, LeaseKeeper};

/// Runs the producer of `pool` until `shutdown` resolves: standby until the
/// lease is free, leader after. Returns after releasing the lease.
pub async fn run(
    config: Config,
    pool: String,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    config.validate()?;
    let store = Store::connect(&config).await?;
    let doc = store.pool(&pool).await?;
    let format = crate::writer::generate::pool_format(&doc)?;
    config.check_batch_fits(&format)?;
    let max_batch = config.max_batch_for(&format);
    // Fail at start, in one line, if Kafka or the topic is missing.
    if topic_partition_count(&config, &doc.topic).await?.is_none() {
        return Err(Error::topic_missing(&doc.topic));
    }
    metrics.key_space(doc.space);
    let holder = config.instance_id.clone().unwrap_or_else(instance_id);
    tracing::info!(pool = %pool, holder = %holder, "producer started");
    let keeper = LeaseKeeper::spawn(Lease::new(
        store.clone(),
        &pool,
        &holder,
        config.lease_duration,
    ));
    let mut lease = keeper.lease_check();
    let http = match config.http_addr {
        Some(addr) => Some(crate::http::spawn(addr, metrics.clone(), keeper.lease_check()).await?),
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let epoch = tokio::select! {
            _ = &mut shutdown => break,
            epoch = lease.wait_leader() => epoch,
        };
        metrics.leading(&pool, epoch);
        let leading = lead(
            &config,
            &store,
            &doc,
            max_batch,
            &lease,
            &metrics,
            stop_rx.clone(),
        );
        let mut leading = std::pin::pin!(leading);
        let result = tokio::select! {
            r = &mut leading => r,
            _ = &mut shutdown => {
                // Let the current step finish, within the deadline.
                let _ = stop_tx.send(true);
                match tokio::time::timeout(config.shutdown_timeout, &mut leading).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(timeout_s = config.shutdown_timeout.as_secs(), "shutdown deadline passed; stopping mid-step (recovery will finish it)");
                        Ok(())
                    }
                }
            }
        };
        metrics.not_leading();
        match result {
            Ok(()) => break,
            Err(e @ Error::Unauthorized { .. }) => {
                // No retry can succeed (an ACL or the credentials): hand the
                // lease back at once, so a correctly configured standby
                // takes over, and end with one line.
                metrics.error(&e, "leading");
                keeper.stop().await;
                if let Some(http) = http {
                    http.stop().await;
                }
                return Err(e);
            }
            Err(e @ (Error::LeaseLost(_) | Error::Fenced(_))) => {
                metrics.error(&e, "leading");
                tracing::warn!(pool = %pool, epoch, "stepped down");
                // Wait for the keeper to notice before trying again.
                tokio::time::sleep(config.lease_duration / 3).await;
            }
            Err(e) => {
                metrics.error(&e, "leading");
                tokio::time::sleep(config.poll_interval.max(Duration::from_secs(1))).await;
            }
        }
        if *stop_rx.borrow() {
            break;
        }
    }
    keeper.stop().await;
    if let Some(http) = http {
        http.stop().await;
    }
    tracing::info!(pool = %pool, "producer stopped");
    Ok(())
}

/// `<host>-<pid>-<random>`: unique per process, readable in the lease doc.
fn instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "host".to_owned());
    format!(
        "{host}-{}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    )
}
