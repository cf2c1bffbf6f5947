//! The consume loop: reads batches from the pool's topic and claims each
//! ([`super::claim`]: verify, claim in MongoDB, commit the offset, and only
//! then buffer the keys); between messages it ends the claims of drained
//! batches, pauses/resumes the partitions around the watermarks, and at
//! the end runs the shutdown that returns unused keys ([`super::returns`]).
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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kgs_schemas::KeyFormat;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::buffer::KeyBuffer;
use crate::metrics::{self, Metrics};
use crate::returns::ShutdownReport;
use crate::store::Store;

/// How often the loop updates metrics, marks drained claims and checks the
/// low watermark: often enough that a paused consumer resumes well before
/// a busy app drains the low watermark.
pub(crate) const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(20);

/// First and longest wait between retries of a failed claim write.
pub(crate) const CLAIM_RETRY_FIRST: Duration = Duration::from_millis(100);
pub(crate) const CLAIM_RETRY_MAX: Duration = Duration::from_secs(5);

/// How often claim endings that could not be written (the database was
/// away) are tried again.
pub(crate) const UNFINISHED_RETRY: Duration = Duration::from_secs(1);

/// How often the loop reads the pool's topic generation: a re-created
/// topic from which nothing arrives is noticed within this time.
pub(crate) const TOPIC_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How long that read may take before the loop goes on without it.
const TOPIC_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// State shared by the [`crate::KeyConsumer`] handle and the loop.
#[derive(Debug)]
pub(crate) struct Shared {
    pub buffer: KeyBuffer,
    pub metrics: Metrics,
    /// Woken whenever a batch is buffered (and at shutdown).
    pub arrived: Notify,
    /// What a server said while it refuses this client what consuming
    /// needs (a Kafka ACL on the group or topic, a MongoDB role without the
    /// claim writes, credentials); `None` once it admits it.
    pub refused: watch::Sender<Option<Refused>>,
}

/// Which server refuses this client, and what it said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    Kafka(String),
    MongoDB(String),
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
    /// Set on a consumer made for a re-created topic until its first
    /// assignment was read from the beginning.
    rewind: AtomicBool,
}

impl Context {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            assignment_changed: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            rewind: AtomicBool::new(false),
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
pub(crate) struct ConsumeLoop {
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
    /// What the Kafka consumer was made with, to make it again.
    pub kafka_config: rdkafka::ClientConfig,
    /// The topic generation ([`kgs_schemas::docs::PoolDoc::topic_generation`])
    /// of the topic the consumer subscribed to.
    pub topic_generation: u64,
    /// A newer generation seen in a batch's record, not acted on yet.
    pub recreated: Option<u64>,
    pub next_topic_check: Instant,
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
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}
impl ConsumeLoop {
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
                _ = tick.tick() => {
                    // Housekeeping may replace the consumer: the old one is
                    // then closed off the async threads, by its last owner.
                    drop(consumer);
                    self.housekeeping().await;
                }
                msg = consumer.recv() => match msg {
                    Ok(borrowed) => {
                        let m = borrowed.detach();
                        drop(borrowed);
                        self.admitted(true);
                        self.handle(m, &mut stop).await;
                        if let Some(generation) = self.recreated.take() {
                            drop(consumer);
                            self.resubscribe(generation);
                        }
                    }
                    Err(e) if kgs_schemas::kafka::is_authorization_failure(&e) => self.refused(Refused::Kafka(e.to_string())),
                    // Broker and transport errors are retried by librdkafka itself.
                    Err(e) => warn!(cause = %e, "kafka consumer error"),
                },
            }
        }
        self.shut_down().await
    }

    /// A server refuses this client (librdkafka keeps retrying the join, the
    /// claim is retried: harmless, nothing is claimed). Reported once, and
    /// to the app through [`crate::KeyConsumer::refusal`], which may stop.
    pub(crate) fn refused(&self, refusal: Refused) {
        let first = self.shared.refused.borrow().as_ref() != Some(&refusal);
        let detail = match &refusal {
            Refused::Kafka(d) | Refused::MongoDB(d) => d.clone(),
        };
        metrics::refused(&self.shared.metrics, first, &detail);
        if first {
            self.shared.refused.send_replace(Some(refusal));
        }
    }

    /// The server that refused this client (`kafka`: any message arrived;
    /// else a MongoDB write went through) admits it again.
    pub(crate) fn admitted(&self, kafka: bool) {
        let clear = matches!(
            (self.shared.refused.borrow().as_ref(), kafka),
            (Some(Refused::Kafka(_)), true) | (Some(Refused::MongoDB(_)), false)
        );
        if clear {
            self.shared.refused.send_replace(None);
            metrics::admitted(&self.shared.metrics);
        }
    }

    async fn housekeeping(&mut self) {
        if Instant::now() >= self.next_topic_check {
            self.next_topic_check = Instant::now() + TOPIC_CHECK_INTERVAL;
            // Bounded: a MongoDB outage must not hold up the loop.
            let read = self.store.topic_generation(&self.pool);
            match tokio::time::timeout(TOPIC_CHECK_TIMEOUT, read).await {
                Ok(Ok(generation)) if generation > self.topic_generation => {
                    self.resubscribe(generation)
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    warn!(cause = %metrics::error_chain(&e), "reading the pool's topic generation failed")
                }
                Err(_) => warn!("reading the pool's topic generation timed out"),
            }
        }
        self.rewind_after_resubscribe();
        let drained = self.shared.buffer.take_drained();
        self.report_handed_out();
        for batch in drained {
            self.end_claim(&batch, Vec::new()).await;
        }
        self.retry_unfinished().await;
        self.apply_backpressure();
    }

    /// The pool topic was deleted and created again (the producer counts
    /// topic generations): librdkafka keeps fetching the old topic's
    /// positions from the new one, so it either waits past the new topic's
    /// end for good or skips its first batches (those the producer
    /// published again), without an error either way. A new Kafka consumer
    /// joins the group afresh and reads the new topic from the group's
    /// offsets in it. Those are the new topic's only: Kafka dropped the old
    /// topic's with it, and no consumer commits a batch of a newer
    /// generation than it subscribed to (the claim checks the record's
    /// generation first; a batch read again is only a replay). Claims of
    /// buffered keys are unaffected: they were committed before.
    pub(crate) fn resubscribe(&mut self, generation: u64) {
        let made: Result<StreamConsumer<Context>, _> = self
            .kafka_config
            .create_with_context(Context::new(self.shared.metrics.clone()));
        let subscribed = made.and_then(|c| c.subscribe(&[&self.topic]).map(|()| c));
        match subscribed {
            Ok(fresh) => {
                fresh.context().rewind.store(true, Ordering::Release);
                let old = std::mem::replace(&mut self.consumer, Arc::new(fresh));
                old.unsubscribe();
                // Closing may wait on the broker: off the async threads.
                tokio::task::spawn_blocking(move || drop(old));
                warn!(
                    topic = %self.topic,
                    from = self.topic_generation,
                    to = generation,
                    "the pool topic was re-created: consuming it with a new Kafka consumer"
                );
                self.shared.metrics.topic_recreations.inc();
                self.topic_generation = generation;
                self.paused = false;
                self.shared.metrics.paused.set(0);
            }
            // Tried again at the next check or batch.
            Err(e) => {
                warn!(topic = %self.topic, cause = %e, "making a new Kafka consumer for the re-created topic failed")
            }
        }
    }

    /// After [`ConsumeLoop::resubscribe`], once partitions are assigned:
    /// reads them from the beginning. The group's offsets in the new topic
    /// may be an old consumer's, committed by the topic's name at old-topic
    /// positions before it noticed (a batch in flight, a skipped message),
    /// and would skip the batches the producer published again. Reading a
    /// batch twice is harmless: its claim (or our buffer) refuses it.
    fn rewind_after_resubscribe(&mut self) {
        if !self.consumer.context().rewind.load(Ordering::Acquire) {
            return;
        }
        let Ok(assigned) = self.consumer.assignment() else {
            return;
        };
        if assigned.count() == 0 {
            return;
        }
        let mut all = true;
        for e in assigned.elements() {
            let seek = self.consumer.seek(
                e.topic(),
                e.partition(),
                rdkafka::Offset::Beginning,
                Duration::from_secs(1),
            );
            if let Err(err) = seek {
                all = false;
                warn!(partition = e.partition(), cause = %err, "rewinding a partition of the re-created topic failed; retrying");
            }
        }
        if all {
            self.consumer
                .context()
                .rewind
                .store(false, Ordering::Release);
            info!(topic = %self.topic, partitions = assigned.count(), "reading the re-created topic from its beginning");
        }
    }

    /// Adds the keys handed out since the last call to the counter. Read
    /// from the buffer's cursors, so the hot path updates no metric.
    pub(crate) fn report_handed_out(&mut self) {
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
    pub(crate) fn apply_backpressure(&mut self) {
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
