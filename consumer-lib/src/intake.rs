//! The consume loop: reads batches from the pool's topic, claims them in
//! MongoDB, commits their offsets, and only then puts their keys in the
//! buffer. Also pauses/resumes the partitions around the watermarks, and
//! runs the shutdown that hands unused keys back.
//!
//! # Why this order is safe
//! Nothing read from Kafka is trusted: before a batch is claimed, its
//! producer's durable record (`batches`, exact `_id`) must exist and match it
//! (this pool incarnation, keys moved, the same keys, this partition; see
//! [`KeyBatch::verify`]). Anyone able to write to the topic can therefore
//! only make the consumer skip messages, never hand out a key that the
//! producer did not move into `used_keys` for exactly this batch.
//!
//! A key is handed out only from a verified batch whose claim is recorded
//! (`_id` = batch id, so once only) *and* whose offset is committed. A crash or a
//! rebalance therefore cannot make a batch's keys reachable twice: its next
//! reader starts after every committed batch, and a batch it does re-read
//! (claimed but not committed) is refused by the claim's unique `_id`.
//! Bad messages are committed past, so they never block a partition.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use kgs_schemas::docs::{ClaimDoc, ClaimState};
use kgs_schemas::{BatchCheck, KeyBatch, KeyFormat};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::buffer::KeyBuffer;
use crate::error::Error;
use crate::metrics::{self, Metrics, Position};
use crate::store::{ClaimOutcome, Store};

/// How often the loop updates metrics, marks drained claims and checks the
/// low watermark: often enough that a paused consumer resumes well before
/// a busy app drains the low watermark.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(20);

/// First and longest wait between retries of a failed claim write.
const CLAIM_RETRY_FIRST: Duration = Duration::from_millis(100);
const CLAIM_RETRY_MAX: Duration = Duration::from_secs(5);

/// How often claim endings that could not be written (the database was
/// away) are tried again.
const UNFINISHED_RETRY: Duration = Duration::from_secs(1);

/// State shared by the [`crate::KeyConsumer`] handle and the loop.
#[derive(Debug)]
pub(crate) struct Shared {
    pub buffer: KeyBuffer,
    pub metrics: Metrics,
    /// Woken whenever a batch is buffered (and at shutdown).
    pub arrived: Notify,
}

/// What [`crate::KeyConsumer::shutdown`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Claims set to `returning` (some keys unused).
    pub batches_returning: usize,
    /// Claims set to `drained` (every key handed out).
    pub batches_drained: usize,
    /// Keys handed back (in `return_keys` of the `returning` claims).
    pub keys_returned: usize,
    /// Batches whose claim could not be updated before the deadline; they
    /// stay `open`, as after a crash.
    pub failed: Vec<String>,
}

/// librdkafka callbacks: rebalances are logged and counted, and a new
/// assignment is flagged so the loop re-applies a pause to it.
pub(crate) struct Context {
    metrics: Metrics,
    assignment_changed: AtomicBool,
    /// Mirrors the loop's paused state, so partitions assigned while paused
    /// are paused in the rebalance callback itself, before anything is
    /// fetched from them (the buffer then never exceeds its high watermark
    /// by more than the one batch that crossed it: the documented bound).
    paused: AtomicBool,
}

impl Context {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            assignment_changed: AtomicBool::new(false),
            paused: AtomicBool::new(false),
        }
    }
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                metrics::rebalance(&self.metrics, "assign", &partitions(tpl));
                if self.paused.load(Ordering::Acquire) {
                    if let Err(e) = consumer.pause(tpl) {
                        warn!(cause = %e, "could not pause newly assigned partitions; the loop retries");
                    }
                }
                self.assignment_changed.store(true, Ordering::Release);
            }
            // Nothing to drop here: the loop handles one message at a time and
            // hands it out only after a successful commit, and librdkafka
            // discards messages prefetched from revoked partitions.
            Rebalance::Revoke(tpl) => metrics::rebalance(&self.metrics, "revoke", &partitions(tpl)),
            Rebalance::Error(e) => {
                self.metrics.rebalances.with_label_values(&["error"]).inc();
                warn!(cause = %e, "rebalance error");
            }
        }
    }
}

fn partitions(tpl: &TopicPartitionList) -> String {
    let ids: Vec<String> = tpl
        .elements()
        .iter()
        .map(|e| e.partition().to_string())
        .collect();
    ids.join(",")
}

/// The loop's own state.
pub(crate) struct Intake {
    pub consumer: Arc<StreamConsumer<Context>>,
    pub store: Store,
    pub shared: Arc<Shared>,
    pub topic: String,
    pub pool: String,
    pub group: String,
    pub instance: String,
    /// This process's claim token ([`ClaimDoc::token`]).
    pub token: String,
    /// The pool's incarnation, which every verified batch record must carry.
    pub incarnation: String,
    pub format: KeyFormat,
    pub low_watermark: usize,
    pub high_watermark: usize,
    /// Whether the watermarks follow the hand-out rate (see
    /// [`crate::config::DEFAULT_HIGH_WATERMARK`]).
    pub adaptive: bool,
    pub demand: Demand,
    pub shutdown_timeout: Duration,
    pub paused: bool,
    pub reported_handed_out: usize,
    /// Claim endings not written yet (batch, keys to return; none = drained),
    /// retried every [`UNFINISHED_RETRY`] and at shutdown: a failed write
    /// must not leave a claim `open` for good (its keys could then never be
    /// handed out again, nor recycled).
    pub unfinished: Vec<(String, Vec<String>)>,
    pub next_unfinished_retry: Instant,
}

/// The hand-out rate, measured from the buffer's counter over windows of
/// at least a second (moving average).
#[derive(Debug, Default)]
pub(crate) struct Demand {
    last: Option<(Instant, usize)>,
    rate: f64,
}

impl Demand {
    /// Takes the count of keys handed out so far.
    fn observe(&mut self, now: Instant, handed_out: usize) {
        match self.last {
            None => self.last = Some((now, handed_out)),
            Some((then, before)) => {
                let dt = now.duration_since(then).as_secs_f64();
                if dt >= 1.0 {
                    let sample = handed_out.saturating_sub(before) as f64 / dt;
                    self.rate += 0.5 * (sample - self.rate);
                    self.last = Some((now, handed_out));
                }
            }
        }
    }
}

/// The watermarks in force: the configured ones, or (`adaptive`) at least
/// the given seconds of the hand-out `rate`, up to the cap.
pub(crate) fn watermarks(low: usize, high: usize, adaptive: bool, rate: f64) -> (usize, usize) {
    use crate::config::{ADAPTIVE_HIGH_SECONDS, ADAPTIVE_LOW_SECONDS, ADAPTIVE_MAX_FACTOR};
    if !adaptive {
        return (low, high);
    }
    let scaled = |base: usize, secs: f64| {
        ((rate * secs) as usize).clamp(base, base.saturating_mul(ADAPTIVE_MAX_FACTOR))
    };
    (
        scaled(low, ADAPTIVE_LOW_SECONDS),
        scaled(high, ADAPTIVE_HIGH_SECONDS),
    )
}

/// Resolves once a stop is requested or the handle is gone. Safe to call
/// again after it resolved (it checks the current value first).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

impl Intake {
    /// Runs until `stop` says so (or its sender is dropped), then shuts down.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> ShutdownReport {
        info!(pool = %self.pool, group = %self.group, instance = %self.instance, topic = %self.topic, "consumer started");
        let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let consumer = Arc::clone(&self.consumer);
            tokio::select! {
                biased;
                () = stopped(&mut stop) => break,
                _ = tick.tick() => self.housekeeping().await,
                msg = consumer.recv() => match msg {
                    Ok(m) => {
                        let m = m.detach();
                        self.handle(m, &mut stop).await;
                    }
                    // Broker and transport errors are retried by librdkafka itself.
                    Err(e) => warn!(cause = %e, "kafka consumer error"),
                },
            }
        }
        self.shut_down().await
    }

    async fn handle(&mut self, m: OwnedMessage, stop: &mut watch::Receiver<bool>) {
        let at = Position {
            partition: m.partition(),
            offset: m.offset(),
        };
        let check = BatchCheck {
            pool: &self.pool,
            format: &self.format,
        };
        let batch = match KeyBatch::decode(m.payload().unwrap_or_default(), &check) {
            Ok(b) => b,
            Err(e) => {
                metrics::bad_message(&self.shared.metrics, at, &e);
                self.commit_past(at).await;
                return;
            }
        };
        let started = std::time::Instant::now();
        // Verified before anything is written, so a forged batch leaves no
        // claim behind (a claim names a batch as this pool's).
        let Some(proof) = self
            .retry(stop, &batch.batch_id, || {
                self.store.batch_proof(&batch.batch_id)
            })
            .await
        else {
            // Stopping: nothing written, not committed; the next reader verifies it.
            return;
        };
        if let Err(e) = batch.verify(at.partition, proof.as_ref(), &self.incarnation) {
            metrics::unverified(&self.shared.metrics, at, &batch.batch_id, &e);
            self.commit_past(at).await;
            return;
        }
        let claim = ClaimDoc {
            batch_id: batch.batch_id.clone(),
            pool: self.pool.clone(),
            group: self.group.clone(),
            instance: self.instance.clone(),
            token: self.token.clone(),
            partition: at.partition,
            offset: at.offset,
            keys: batch.keys.len() as u64,
            state: ClaimState::Open,
            return_keys: Vec::new(),
            reason: None,
            claimed_at: Utc::now(),
        };
        let Some(outcome) = self
            .retry(stop, &batch.batch_id, || self.store.claim(&claim))
            .await
        else {
            // Stopping mid-retry. Not committed, but an earlier attempt may
            // have landed (a write that failed on the way back): its next
            // reader would skip a batch claimed by us, so hand the keys back.
            // Conditional on our token: a no-op if no attempt landed.
            self.give_back(&batch.batch_id, batch.keys).await;
            return;
        };
        if let ClaimOutcome::AlreadyClaimed { holder } = outcome {
            metrics::replay(&self.shared.metrics, at, &batch.batch_id, &holder);
            self.commit_past(at).await;
            return;
        }
        if let Err(e) = self.commit(at, &batch.batch_id).await {
            metrics::commit_failed(&self.shared.metrics, at, &batch.batch_id, &e);
            // Not handed out. Whoever reads the batch next finds our claim and
            // skips it, so give its keys back for the producer to republish.
            self.give_back(&batch.batch_id, batch.keys).await;
            return;
        }
        match self.shared.buffer.push(&batch.batch_id, &batch.keys) {
            Ok(()) => {
                metrics::batch_claimed(&self.shared.metrics, batch.keys.len(), started.elapsed());
                self.shared.arrived.notify_waiters();
            }
            Err(e) => {
                // Only `Closed` is possible for a decoded batch.
                warn!(batch = %batch.batch_id, cause = %e, "batch not buffered");
                self.give_back(&batch.batch_id, batch.keys).await;
            }
        }
        self.apply_backpressure();
    }

    /// Runs `op` until it succeeds, backing off between attempts; `None` if
    /// a stop was requested first.
    async fn retry<T, F, Fut>(
        &self,
        stop: &mut watch::Receiver<bool>,
        batch: &str,
        mut op: F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = crate::Result<T>>,
    {
        let mut backoff = CLAIM_RETRY_FIRST;
        loop {
            match op().await {
                Ok(v) => return Some(v),
                Err(e) => {
                    metrics::claim_failed(&self.shared.metrics, batch, &e);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stopped(stop) => return None,
                    }
                    backoff = (backoff * 2).min(CLAIM_RETRY_MAX);
                }
            }
        }
    }

    /// Commits `at.offset + 1` synchronously (off the async threads).
    async fn commit(&self, at: Position, batch: &str) -> crate::Result<()> {
        let mut tpl = TopicPartitionList::new();
        let commit_error = |source| Error::Commit {
            batch: batch.to_owned(),
            source,
        };
        tpl.add_partition_offset(&self.topic, at.partition, Offset::Offset(at.offset + 1))
            .map_err(commit_error)?;
        let consumer = Arc::clone(&self.consumer);
        tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(Error::Task)?
            .map_err(commit_error)
    }

    /// Commits past a skipped message. A failure only means the partition's
    /// next reader skips it again.
    async fn commit_past(&self, at: Position) {
        if let Err(e) = self.commit(at, "<skipped message>").await {
            warn!(partition = at.partition, offset = at.offset, cause = %metrics::error_chain(&e), "commit past a skipped message failed");
        }
    }

    /// Marks our claim `returning` with `keys` (none handed out), or
    /// `drained` with none; a failed write is queued and retried.
    async fn give_back(&mut self, batch: &str, keys: Vec<String>) {
        let n = keys.len();
        match self.store.finish(batch, &self.token, keys.clone()).await {
            Ok(true) if n > 0 => metrics::keys_returned(&self.shared.metrics, batch, n),
            Ok(_) => {}
            Err(e) => {
                warn!(batch, keys = n, cause = %metrics::error_chain(&e), "could not end the claim; retrying");
                self.unfinished.push((batch.to_owned(), keys));
            }
        }
    }

    async fn housekeeping(&mut self) {
        let drained = self.shared.buffer.take_drained();
        self.report_handed_out();
        for batch in drained {
            self.give_back(&batch, Vec::new()).await;
        }
        if !self.unfinished.is_empty() && Instant::now() >= self.next_unfinished_retry {
            self.next_unfinished_retry = Instant::now() + UNFINISHED_RETRY;
            // Stop at the first failure: while the database is away each
            // attempt waits for server selection, and the loop must go on.
            let mut queued = std::mem::take(&mut self.unfinished).into_iter();
            while let Some((batch, keys)) = queued.next() {
                let before = self.unfinished.len();
                self.give_back(&batch, keys).await;
                if self.unfinished.len() > before {
                    self.unfinished.extend(queued);
                    break;
                }
            }
        }
        self.apply_backpressure();
    }

    /// Adds the keys handed out since the last call to the counter. Read
    /// from the buffer's cursors, so the hot path updates no metric.
    fn report_handed_out(&mut self) {
        let total = self.shared.buffer.handed_out();
        let m = &self.shared.metrics;
        m.keys_handed_out
            .inc_by(total.saturating_sub(self.reported_handed_out) as u64);
        self.reported_handed_out = self.reported_handed_out.max(total);
        m.buffered_keys.set(self.shared.buffer.depth() as i64);
        self.demand.observe(Instant::now(), total);
    }

    /// Pauses the assigned partitions at the high watermark, resumes them at
    /// the low one, and pauses partitions assigned while paused.
    fn apply_backpressure(&mut self) {
        if let Ok(tpl) = self.consumer.assignment() {
            self.shared
                .metrics
                .assigned_partitions
                .set(tpl.count() as i64);
        }
        let depth = self.shared.buffer.depth();
        self.shared.metrics.buffered_keys.set(depth as i64);
        let (low, high) = watermarks(
            self.low_watermark,
            self.high_watermark,
            self.adaptive,
            self.demand.rate,
        );
        self.shared.metrics.high_watermark.set(high as i64);
        let reassigned = self
            .consumer
            .context()
            .assignment_changed
            .swap(false, Ordering::AcqRel);
        let pause = if self.paused {
            if depth <= low {
                false
            } else if reassigned {
                true
            } else {
                return;
            }
        } else if depth >= high {
            true
        } else {
            return;
        };
        let result = self.consumer.assignment().and_then(|tpl| {
            if pause {
                self.consumer.pause(&tpl)
            } else {
                self.consumer.resume(&tpl)
            }
        });
        match result {
            Ok(()) => {
                self.paused = pause;
                self.consumer
                    .context()
                    .paused
                    .store(pause, Ordering::Release);
                metrics::backpressure(&self.shared.metrics, pause, depth);
            }
            Err(e) => warn!(pause, cause = %e, "pause/resume failed; retrying on the next tick"),
        }
    }

    /// Stops hand-out, records what each open claim left unused, and leaves
    /// the group. Every buffered batch's offset was committed before its
    /// keys were buffered, so there is nothing left to commit.
    async fn shut_down(mut self) -> ShutdownReport {
        let leftovers = self.shared.buffer.close();
        self.shared.arrived.notify_waiters();
        self.report_handed_out();
        let deadline = Instant::now() + self.shutdown_timeout;
        let mut report = ShutdownReport::default();
        // Claim endings still queued from earlier failures come first.
        let endings: Vec<(String, Vec<String>)> = std::mem::take(&mut self.unfinished)
            .into_iter()
            .chain(leftovers.into_iter().map(|l| (l.batch_id, l.unhanded)))
            .collect();
        for (batch_id, unhanded) in endings {
            let n = unhanded.len();
            let mut done = false;
            while !done && Instant::now() < deadline {
                let write = self.store.finish(&batch_id, &self.token, unhanded.clone());
                match tokio::time::timeout_at(deadline, write).await {
                    // `false`: an earlier attempt that reported an error had landed.
                    Ok(Ok(_)) => done = true,
                    Ok(Err(e)) => {
                        warn!(batch = %batch_id, cause = %metrics::error_chain(&e), "claim update failed, retrying");
                        tokio::time::sleep(CLAIM_RETRY_FIRST).await;
                    }
                    Err(_) => break,
                }
            }
            if !done {
                error!(batch = %batch_id, keys = n, "shutdown deadline passed; the claim stays open and its keys are lost");
                report.failed.push(batch_id);
            } else if n == 0 {
                report.batches_drained += 1;
            } else {
                metrics::keys_returned(&self.shared.metrics, &batch_id, n);
                report.batches_returning += 1;
                report.keys_returned += n;
            }
        }
        self.consumer.unsubscribe();
        // Closing the consumer (leaving the group) blocks in librdkafka.
        let consumer = self.consumer;
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
        info!(
            instance = %self.instance,
            returning = report.batches_returning,
            drained = report.batches_drained,
            keys_returned = report.keys_returned,
            failed = report.failed.len(),
            "consumer stopped"
        );
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermarks_follow_the_rate_between_the_defaults_and_the_cap() {
        // Fixed: as configured, whatever the rate.
        assert_eq!(watermarks(10, 50, false, 1e6), (10, 50));
        // Idle or slow: the configured floor.
        assert_eq!(watermarks(10_000, 50_000, true, 0.0), (10_000, 50_000));
        assert_eq!(watermarks(10_000, 50_000, true, 3_000.0), (10_000, 50_000));
        // 20,000 keys/s: 2 s and 10 s of it.
        assert_eq!(
            watermarks(10_000, 50_000, true, 20_000.0),
            (40_000, 200_000)
        );
        // Capped at ten times the floor: a crash loses a bounded number.
        assert_eq!(watermarks(10_000, 50_000, true, 1e9), (100_000, 500_000));
    }

    #[test]
    fn demand_is_measured_over_windows_of_a_second() {
        let t0 = Instant::now();
        let mut d = Demand::default();
        d.observe(t0, 0);
        d.observe(t0 + Duration::from_millis(500), 5_000);
        assert_eq!(d.rate, 0.0, "a half-second window is not a sample");
        d.observe(t0 + Duration::from_secs(1), 10_000);
        assert_eq!(d.rate, 5_000.0);
        d.observe(t0 + Duration::from_secs(2), 20_000);
        assert_eq!(d.rate, 7_500.0);
    }
}
