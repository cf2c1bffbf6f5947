//! `kgs-producer run`: wait for the pool's lease, then, while leading, keep
//! every partition's backlog between the watermarks, top the pool up, put
//! returned and recycled keys back, and finish any unfinished batch first.

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::generate::{top_up, unused_keys};
use crate::kafka::{PartitionBacklog, PoolKafka};
use crate::lease::{Lease, LeaseGuard, LeaseKeeper};
use crate::metrics::Metrics;
use crate::mover::Mover;
use crate::sizer::BatchSizer;
use crate::store::Store;

/// How often the pool gauges are refreshed from the pool document.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// How often `used_keys` is counted for its gauge: a collection count is
/// metadata on MongoDB but a scan on some MongoDB-wire servers, so it is
/// kept out of every iteration.
const COUNT_INTERVAL: Duration = Duration::from_secs(60);

/// At most this many batches are moved per iteration of the leader's loop,
/// and for at most [`FILL_BUDGET`], so returns, recycles, recovery and the
/// topic check still come round while consumers drain fast.
const MAX_FILL: usize = 64;

/// See [`MAX_FILL`].
const FILL_BUDGET: Duration = Duration::from_secs(3);

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
    let format = kgs_schemas::KeyFormat::try_from(&doc.format)
        .map_err(|e| Error::Corrupt(format!("pool {pool:?} has a bad format: {e}")))?;
    config.check_batch_fits(&format)?;
    let max_batch = config.max_batch_for(&format);
    // Fail at start, in one line, if Kafka or the topic is missing.
    if crate::pool::topic_partition_count(&config, &doc.topic)
        .await?
        .is_none()
    {
        return Err(Error::Config(format!(
            "topic {} of pool {pool:?} does not exist: run `kgs-producer init`",
            doc.topic
        )));
    }
    metrics.key_space.set(doc.space as i64);
    let holder = config.instance_id.clone().unwrap_or_else(instance_id);
    tracing::info!(pool = %pool, holder = %holder, "producer started");
    let keeper = LeaseKeeper::spawn(Lease::new(
        store.clone(),
        &pool,
        &holder,
        config.lease_duration,
    ));
    let mut guard = keeper.guard();
    let http = match config.http_addr {
        Some(addr) => Some(crate::http::spawn(addr, metrics.clone(), keeper.guard()).await?),
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let epoch = tokio::select! {
            _ = &mut shutdown => break,
            epoch = guard.wait_leader() => epoch,
        };
        metrics.leader.set(1);
        metrics.lease_epoch.set(epoch as i64);
        tracing::info!(pool = %pool, epoch, "leading");
        let leading = lead(
            &config,
            &store,
            &doc,
            max_batch,
            &guard,
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
                        tracing::error!(timeout_s = config.shutdown_timeout.as_secs(), "shutdown deadline passed; stopping mid-step (recovery will finish it)");
                        Ok(())
                    }
                }
            }
        };
        metrics.leader.set(0);
        match result {
            Ok(()) => break,
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

/// One leadership: returns `Ok` on shutdown, an error when it must end.
/// Batches grow up to `max_batch` keys while demand is high.
async fn lead(
    config: &Config,
    store: &Store,
    doc: &kgs_schemas::docs::PoolDoc,
    max_batch: usize,
    guard: &LeaseGuard,
    metrics: &Metrics,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let pool = doc.name.as_str();
    let kafka = PoolKafka::start(config, doc).await?;
    // The topic generation may have moved on since `run` started.
    let generation = store.pool(pool).await?.topic_generation;
    let mover = Mover::new(store, doc, generation, guard, &kafka, metrics);
    mover.load_last_offsets().await?;
    // A re-publish after a topic re-creation that a previous leader did not
    // finish (cheap when there is nothing left: no old-generation record
    // without a claim).
    let mut republish = (generation > 0).then_some(generation);
    let target = config.target_size.unwrap_or(doc.space.min(1_000_000));
    let mut sizer = BatchSizer::new(config.batch_size, max_batch, doc.partitions);
    let mut filling: HashSet<i32> = HashSet::new();
    let mut last_recovery: Option<Instant> = None;
    let mut last_gauges: Option<Instant> = None;
    let mut last_count: Option<Instant> = None;
    let mut last_topic_check: Option<Instant> = None;
    let mut topic_ok = false;
    let mut exhausted = false;
    let mut errors_in_a_row = 0u32;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let step = async {
            if last_topic_check.is_none_or(|t| t.elapsed() >= GAUGE_INTERVAL) {
                last_topic_check = Some(Instant::now());
                topic_ok = false;
                kafka.check_topic().await?;
                if mover.topic_recreated().await? {
                    republish = Some(next_topic_generation(store, pool, &mover).await?);
                }
                topic_ok = true;
            }
            if !topic_ok {
                // Broken topic: idle until the next check.
                return Ok(false);
            }
            if let Some(generation) = republish {
                let n = mover.republish_unclaimed(generation, 0).await?;
                if n > 0 {
                    tracing::warn!(
                        pool,
                        generation,
                        batches = n,
                        "unclaimed batches of the old topic published again"
                    );
                }
                republish = None;
            }
            let generation = mover
                .topic_generation
                .load(std::sync::atomic::Ordering::Acquire);
            let mut backlog = exact_backlog(&kafka, store, pool, generation).await?;
            sizer.observe(Instant::now(), backlog.iter().map(|b| b.batches).sum());
            metrics.batch_size.set(sizer.size() as i64);
            metrics.demand.set(sizer.rate().unwrap_or(0.0) as i64);
            let size = sizer.size();
            let smallest = backlog
                .iter()
                .min_by_key(|b| (b.batches, b.partition))
                .map(|b| b.partition)
                .unwrap_or(0);
            let mut published = 0;
            if last_recovery.is_none_or(|t| t.elapsed() >= config.recovery_interval) {
                published += mover.recover(smallest).await?;
                published += mover.sweep(size, smallest).await? as u64;
                last_recovery = Some(Instant::now());
            }
            published += mover.process_returns(size, smallest).await?;
            published += mover.process_recycles(size, smallest).await?;
            if published > 0 {
                // Those batches are in the backlog now: the fill plan below
                // must count them, or it overfills.
                backlog = exact_backlog(&kafka, store, pool, generation).await?;
            }
            if last_gauges.is_none_or(|t| t.elapsed() >= GAUGE_INTERVAL) {
                let count = last_count.is_none_or(|t| t.elapsed() >= COUNT_INTERVAL);
                refresh_gauges(store, pool, metrics, count).await?;
                last_gauges = Some(Instant::now());
                if count {
                    last_count = last_gauges;
                }
            }
            for b in &backlog {
                metrics
                    .backlog
                    .with_label_values(&[&b.partition.to_string()])
                    .set(b.batches as i64);
                if b.batches <= config.low_watermark {
                    filling.insert(b.partition);
                }
                if b.batches >= config.high_watermark {
                    filling.remove(&b.partition);
                }
            }
            let plan = fill_plan(&backlog, &filling, config.high_watermark, MAX_FILL);
            let wanted = !plan.is_empty();
            let (batches, keys) = if wanted {
                mover.fill(size, &plan, FILL_BUDGET).await?
            } else {
                (0, 0)
            };
            sizer.published(batches as u64, keys);
            let moved = batches > 0;
            // One generation chunk per iteration, after the move: a pool
            // being filled (a fresh `init --initial-keys`, or top-up after
            // a burst) keeps publishing between chunks instead of making
            // consumers wait for the whole target size.
            let generated = top_up(
                store,
                pool,
                target,
                config.generate_chunk,
                config.generate_chunk,
                guard,
                None,
            )
            .await?;
            if wanted && !moved && generated == 0 {
                pool_empty(store, pool, metrics, &mut exhausted).await?;
            } else if moved && exhausted {
                exhausted = false;
                metrics.pool_exhausted.set(0);
            }
            Ok::<bool, Error>(moved || generated > 0)
        };
        match step.await {
            Ok(true) => {
                errors_in_a_row = 0;
                continue;
            }
            Ok(false) => errors_in_a_row = 0,
            Err(e @ (Error::LeaseLost(_) | Error::Fenced(_))) => return Err(e),
            Err(e @ Error::Topic { .. }) => {
                // Not transient: said (at ERROR) once per check interval;
                // nothing is published meanwhile, and the lease is kept so
                // no other producer publishes either.
                metrics.error(&e, "topic check");
            }
            Err(e) => {
                metrics.error(&e, "batch step");
                // Whatever was half done is finished by the next recovery pass.
                last_recovery = None;
                errors_in_a_row += 1;
                if errors_in_a_row >= 10 {
                    return Err(e);
                }
            }
        }
        // Idle (backlog full or pool empty) or after an error: wait a little.
        tokio::select! {
            _ = tokio::time::sleep(config.poll_interval) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Each partition's backlog: where the group resumes, from Kafka, and the
/// number of this pool's published batches at or after it (an index range
/// count on `{pool, partition, offset}`) instead of the offset difference:
/// aborted transactions then count for nothing. Only batches of the topic's
/// current generation count: after a re-creation, the records of the old
/// topic's batches name offsets of a topic that is gone.
async fn exact_backlog(
    kafka: &PoolKafka,
    store: &Store,
    pool: &str,
    generation: u64,
) -> Result<Vec<PartitionBacklog>> {
    let mut backlog = kafka.backlog().await?;
    for b in backlog.iter_mut() {
        let n = store
            .batches
            .count_documents(bson::doc! {
                "pool": pool,
                "partition": b.partition,
                "offset": { "$gte": b.start },
                "state": "published",
                "topic_generation": generation as i64,
            })
            .await
            .map_err(Error::store("count backlog"))?;
        b.batches = n;
    }
    Ok(backlog)
}

/// The topic was re-created: moves the pool to the next topic generation
/// (conditional on the current one, by the leader only) and returns it.
async fn next_topic_generation(store: &Store, pool: &str, mover: &Mover<'_>) -> Result<u64> {
    let current = mover
        .topic_generation
        .load(std::sync::atomic::Ordering::Acquire);
    mover.guard.check()?;
    store
        .pools
        .update_one(
            bson::doc! { "_id": pool, "topic_generation": current as i64 },
            bson::doc! { "$set": { "topic_generation": (current + 1) as i64 } },
        )
        .await
        .map_err(Error::store("start a topic generation"))?;
    let now = store.pool(pool).await?.topic_generation;
    if now <= current {
        return Err(Error::LeaseLost(pool.to_owned()));
    }
    tracing::warn!(pool, generation = now, "topic re-created: batches published into the old one and never claimed are published again");
    Ok(now)
}

/// `keys` is empty while partitions want batches. If the whole key space is
/// generated, the pool is exhausted: said once at ERROR (an operator must
/// add a pool or recycle keys) and shown by `kgs_producer_pool_exhausted`;
/// app servers answer "no keys" once their buffers run dry.
async fn pool_empty(
    store: &Store,
    pool: &str,
    metrics: &Metrics,
    exhausted: &mut bool,
) -> Result<()> {
    let doc = store.pool(pool).await?;
    if doc.cursor >= doc.space && doc.generating.is_none() {
        if !*exhausted {
            tracing::error!(pool, space = doc.space, "pool exhausted: every key of the key space has been handed out or reserved; create a pool with longer keys or recycle keys");
            metrics.pool_exhausted.set(1);
        }
        *exhausted = true;
    }
    Ok(())
}

/// The partitions the next batches go to, one entry per batch: each
/// partition that is `filling` gets batches up to `high` (its backlog
/// counted), the emptiest first, at most `max` in all.
fn fill_plan(
    backlog: &[PartitionBacklog],
    filling: &HashSet<i32>,
    high: u64,
    max: usize,
) -> Vec<i32> {
    let mut counts: Vec<(u64, i32)> = backlog
        .iter()
        .filter(|b| filling.contains(&b.partition) && b.batches < high)
        .map(|b| (b.batches, b.partition))
        .collect();
    let mut plan = Vec::new();
    while plan.len() < max {
        let Some(next) = counts.iter_mut().filter(|(n, _)| *n < high).min() else {
            break;
        };
        next.0 += 1;
        plan.push(next.1);
    }
    plan
}

/// Sets the pool gauges from the pool document: unused keys = positions
/// generated and not yet passed by the batch window; used = positions
/// passed plus reservations ahead of the cursor (both exact but for keys
/// reserved after generation). If `count`, `used_keys` is counted instead.
async fn refresh_gauges(store: &Store, pool: &str, metrics: &Metrics, count: bool) -> Result<()> {
    let pk = store.pool_keys(pool);
    let doc = store.pool(pool).await?;
    let keys = unused_keys(&pk, &doc).await?;
    let used = match doc.moved_to {
        Some(moved) if !count => moved + doc.reserved_ahead.len() as u64,
        _ => pk
            .used
            .estimated_document_count()
            .await
            .map_err(Error::store("count used keys"))?,
    };
    metrics.keys_in_pool.set(keys as i64);
    metrics.keys_generated.set(doc.cursor as i64);
    metrics.keys_used.set(used as i64);
    metrics
        .space_used_ppm
        .set((used as f64 / doc.space as f64 * 1e6) as i64);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn backlog(batches: &[u64]) -> Vec<PartitionBacklog> {
        batches
            .iter()
            .enumerate()
            .map(|(p, &b)| PartitionBacklog {
                partition: p as i32,
                end: 0,
                committed: None,
                start: 0,
                batches: b,
            })
            .collect()
    }

    #[test]
    fn a_fill_plan_tops_up_the_emptiest_filling_partitions_to_high() {
        let all: HashSet<i32> = [0, 1, 2].into();
        // 0 needs 3, 1 needs 1, 2 is full: emptiest first, then evenly.
        let plan = fill_plan(&backlog(&[7, 9, 10]), &all, 10, 64);
        assert_eq!(plan, vec![0, 0, 0, 1]);
        // A partition not filling (between the watermarks) gets nothing.
        let some: HashSet<i32> = [1].into();
        assert_eq!(fill_plan(&backlog(&[0, 8, 0]), &some, 10, 64), vec![1, 1]);
        // Bounded by `max`, shared out evenly.
        let plan = fill_plan(&backlog(&[0, 0, 0]), &all, 10, 4);
        assert_eq!(plan, vec![0, 1, 2, 0]);
        assert!(fill_plan(&backlog(&[10, 12, 10]), &all, 10, 64).is_empty());
    }
}
