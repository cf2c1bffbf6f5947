//! One leadership of a pool, as a loop of named steps: check the topic,
//! publish again what a re-created topic lost, recover unfinished batches,
//! put returned and recycled keys back, refresh the gauges, refill the
//! partitions below the low watermark, top the pool up. Each step is
//! crash-safe on its own (the protocol is in [`crate::writer`]), so the
//! order only decides what waits for what: recovery comes before new
//! batches, and a broken topic stops everything but the check.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kgs_schemas::docs::{BatchState, PoolDoc};
use tokio::sync::watch;

use super::lease::LeaseCheck;
use super::sizer::BatchSizer;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::kafka::{PartitionBacklog, PoolKafka};
use crate::metrics::Metrics;
use crate::store::Store;
use crate::writer::generate::{top_up, unused_keys};
use crate::writer::Writer;

/// How often the pool gauges are refreshed from the pool document, and the
/// topic is checked.
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

/// After this many failed iterations in a row the leadership ends (and
/// `run` starts a new one, with fresh clients).
const MAX_ERRORS_IN_A_ROW: u32 = 10;

/// One leadership: returns `Ok` on shutdown, an error when it must end.
/// Batches grow up to `max_batch` keys while demand is high.
pub(super) async fn lead(
    config: &Config,
    store: &Store,
    doc: &PoolDoc,
    max_batch: usize,
    lease: &LeaseCheck,
    metrics: &Metrics,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let kafka = PoolKafka::start(config, doc).await?;
    let mut lead = Lead::start(config, store, doc, max_batch, lease, &kafka, metrics).await?;
    let mut errors_in_a_row = 0u32;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        match lead.step().await {
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
                lead.last_recovery = None;
                errors_in_a_row += 1;
                if errors_in_a_row >= MAX_ERRORS_IN_A_ROW {
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

/// The state one leadership keeps between the iterations of its loop.
struct Lead<'a> {
    config: &'a Config,
    store: &'a Store,
    pool: &'a str,
    metrics: &'a Metrics,
    writer: Writer<'a>,
    /// The pool's target size in unused keys.
    target: u64,
    sizer: BatchSizer,
    /// Partitions being refilled: from the low watermark up to the high one.
    filling: HashSet<i32>,
    /// A topic generation whose unclaimed batches are still to be published
    /// again (after a re-creation).
    republish: Option<u64>,
    /// Whether the last topic check passed.
    topic_ok: bool,
    /// Whether the pool was found exhausted (said once).
    exhausted: bool,
    last_topic_check: Option<Instant>,
    last_recovery: Option<Instant>,
    last_gauges: Option<Instant>,
    last_count: Option<Instant>,
}

impl<'a> Lead<'a> {
    async fn start(
        config: &'a Config,
        store: &'a Store,
        doc: &'a PoolDoc,
        max_batch: usize,
        lease: &'a LeaseCheck,
        kafka: &'a PoolKafka,
        metrics: &'a Metrics,
    ) -> Result<Self> {
        let pool = doc.name.as_str();
        // The topic generation may have moved on since `run` started.
        let generation = store.pool(pool).await?.topic_generation;
        let writer = Writer::new(store, doc, generation, lease, kafka, metrics);
        writer.load_last_offsets().await?;
        Ok(Self {
            config,
            store,
            pool,
            metrics,
            writer,
            target: config.target_size.unwrap_or(doc.space.min(1_000_000)),
            sizer: BatchSizer::new(config.batch_size, max_batch, doc.partitions),
            filling: HashSet::new(),
            // A re-publish after a topic re-creation that a previous leader
            // did not finish (cheap when there is nothing left: no
            // old-generation record without a claim).
            republish: (generation > 0).then_some(generation),
            topic_ok: false,
            exhausted: false,
            last_topic_check: None,
            last_recovery: None,
            last_gauges: None,
            last_count: None,
        })
    }

    /// One iteration; `true` if it moved or generated anything (the loop
    /// goes on at once), `false` if idle.
    async fn step(&mut self) -> Result<bool> {
        if !self.check_topic().await? {
            // Broken topic: idle until the next check.
            return Ok(false);
        }
        self.republish().await?;
        let mut backlog = self.backlog().await?;
        self.sizer
            .observe(Instant::now(), backlog.iter().map(|b| b.batches).sum());
        self.metrics
            .sizing(self.sizer.size(), self.sizer.rate().unwrap_or(0.0));
        let size = self.sizer.size();
        let smallest = backlog
            .iter()
            .min_by_key(|b| (b.batches, b.partition))
            .map(|b| b.partition)
            .unwrap_or(0);
        let published = self.recover(size, smallest).await? + self.put_back(size, smallest).await?;
        if published > 0 {
            // Those batches are in the backlog now: the fill plan below
            // must count them, or it overfills.
            backlog = self.backlog().await?;
        }
        self.refresh_gauges().await?;
        let (wanted, moved) = self.refill(&backlog, size).await?;
        // One generation chunk per iteration, after the move: a pool being
        // filled (a fresh `init --initial-keys`, or top-up after a burst)
        // keeps publishing between chunks instead of making consumers wait
        // for the whole target size.
        let generated = self.top_up().await?;
        if wanted && !moved && generated == 0 {
            self.pool_empty().await?;
        } else if moved && self.exhausted {
            self.exhausted = false;
            self.metrics.pool_refilled(self.pool);
        }
        Ok(moved || generated > 0)
    }

    /// Checks the topic (every [`GAUGE_INTERVAL`]) and notices a topic that
    /// was deleted and created again. Whether the topic is usable.
    async fn check_topic(&mut self) -> Result<bool> {
        if self
            .last_topic_check
            .is_none_or(|t| t.elapsed() >= GAUGE_INTERVAL)
        {
            self.last_topic_check = Some(Instant::now());
            self.topic_ok = false;
            self.writer.kafka.check_topic().await?;
            if self.writer.topic_recreated().await? {
                self.republish = Some(self.next_topic_generation().await?);
            }
            self.topic_ok = true;
        }
        Ok(self.topic_ok)
    }

    /// Publishes again, into the new topic, the unclaimed batches of the
    /// old one (after a re-creation).
    async fn republish(&mut self) -> Result<()> {
        if let Some(generation) = self.republish {
            let n = self.writer.republish_unclaimed(generation, 0).await?;
            if n > 0 {
                tracing::warn!(
                    pool = self.pool,
                    generation,
                    batches = n,
                    "unclaimed batches of the old topic published again"
                );
            }
            self.republish = None;
        }
        Ok(())
    }

    /// Every [`Config::recovery_interval`] (and first thing in a
    /// leadership): finishes unfinished batches and sweeps keys left below
    /// the batch window. Returns the batches published.
    async fn recover(&mut self, size: usize, partition: i32) -> Result<u64> {
        if self
            .last_recovery
            .is_some_and(|t| t.elapsed() < self.config.recovery_interval)
        {
            return Ok(0);
        }
        let published = self.writer.recover(partition).await?
            + self.writer.sweep(size, partition).await? as u64;
        self.last_recovery = Some(Instant::now());
        Ok(published)
    }

    /// Puts returned and recycled keys back into circulation. Returns the
    /// keys published.
    async fn put_back(&self, size: usize, partition: i32) -> Result<u64> {
        // Vanity keys first: they publish nothing, and a user waits on each.
        // Their own errors end here: the batches must not wait on them.
        match self.writer.take_vanity_keys().await {
            Ok(_) => {}
            Err(e @ (Error::LeaseLost(_) | Error::Fenced(_))) => return Err(e),
            Err(e) => self.metrics.error(&e, "vanity keys"),
        }
        match self.writer.sweep_blocklist().await {
            Ok(_) => {}
            Err(e @ (Error::LeaseLost(_) | Error::Fenced(_))) => return Err(e),
            Err(e) => self.metrics.error(&e, "blocklist sweep"),
        }
        Ok(self.writer.put_back_returns(size, partition).await?
            + self.writer.put_back_recycles(size, partition).await?)
    }

    /// The backlog of the current topic generation, see [`exact_backlog`].
    async fn backlog(&self) -> Result<Vec<PartitionBacklog>> {
        let generation = self.writer.topic_generation.load(Ordering::Acquire);
        exact_backlog(self.writer.kafka, self.store, self.pool, generation).await
    }

    /// Every [`GAUGE_INTERVAL`]: the pool gauges (counting `used_keys`
    /// every [`COUNT_INTERVAL`]).
    async fn refresh_gauges(&mut self) -> Result<()> {
        if self
            .last_gauges
            .is_some_and(|t| t.elapsed() < GAUGE_INTERVAL)
        {
            return Ok(());
        }
        let count = self
            .last_count
            .is_none_or(|t| t.elapsed() >= COUNT_INTERVAL);
        refresh_gauges(self.store, self.pool, self.metrics, count).await?;
        self.last_gauges = Some(Instant::now());
        if count {
            self.last_count = self.last_gauges;
        }
        Ok(())
    }

    /// Moves and publishes new batches into every partition that fell to
    /// the low watermark, until it reaches the high one. Returns whether
    /// batches were wanted, and whether any was moved.
    async fn refill(&mut self, backlog: &[PartitionBacklog], size: usize) -> Result<(bool, bool)> {
        let (low, high) = (self.config.low_watermark, self.config.high_watermark);
        for b in backlog {
            self.metrics.backlog(b.partition, b.batches);
            if b.batches <= low {
                self.filling.insert(b.partition);
            }
            if b.batches >= high {
                self.filling.remove(&b.partition);
            }
        }
        let plan = fill_plan(backlog, &self.filling, high, MAX_FILL);
        if plan.is_empty() {
            self.sizer.published(0, 0);
            return Ok((false, false));
        }
        let (batches, keys) = self.writer.fill(size, &plan, FILL_BUDGET).await?;
        self.sizer.published(batches as u64, keys);
        Ok((true, batches > 0))
    }

    /// One generation chunk towards the target size. Returns the keys
    /// generated.
    async fn top_up(&self) -> Result<u64> {
        let chunk = self.config.generate_chunk;
        top_up(
            self.store,
            self.pool,
            self.target,
            chunk,
            chunk,
            self.writer.lease,
            None,
        )
        .await
    }

    /// The topic was re-created: moves the pool to the next topic generation
    /// (conditional on the current one, by the leader only) and returns it.
    async fn next_topic_generation(&self) -> Result<u64> {
        let (store, pool) = (self.store, self.pool);
        let current = self
            .writer
            .topic_generation
            .load(std::sync::atomic::Ordering::Acquire);
        self.writer.lease.check()?;
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
    async fn pool_empty(&mut self) -> Result<()> {
        let doc = self.store.pool(self.pool).await?;
        if doc.cursor >= doc.space && doc.generating.is_none() {
            if !self.exhausted {
                self.metrics.pool_exhausted(self.pool, doc.space);
            }
            self.exhausted = true;
        }
        Ok(())
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
                "state": BatchState::Published,
                "topic_generation": generation as i64,
            })
            .await
            .map_err(Error::store("count backlog"))?;
        b.batches = n;
    }
    Ok(backlog)
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
    let colls = store.key_collections(pool);
    let doc = store.pool(pool).await?;
    let keys = unused_keys(&colls, &doc).await?;
    let used = match doc.moved_to {
        // Blocked positions are in neither collection; nearly all of them
        // lie below the window, which trails the cursor closely.
        Some(moved) if !count => {
            (moved + doc.reserved_ahead.len() as u64).saturating_sub(doc.blocked)
        }
        _ => colls
            .used
            .estimated_document_count()
            .await
            .map_err(Error::store("count used keys"))?,
    };
    metrics.pool_figures(keys, used, doc.cursor, doc.space);
    metrics.blocked_positions(doc.blocked, doc.blocklist_removed, doc.blocklist_handed_out);
    let (tier, left) = crate::writer::generate::tier_in_use(&doc)?;
    metrics.tier(tier.length, left);
    Ok(())
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
