//! The consume loop: reads batches from the pool's topic, claims them in
//! MongoDB, commits their offsets, and only then puts their keys in the
//! buffer. Also pauses/resumes the partitions around the watermarks, and
//! runs the shutdown that hands unused keys back.
//!
//! # Why this order is safe
//! A key is handed out only from a batch whose claim is recorded (`_id` =
//! batch id, so once only) *and* whose offset is committed. A crash or a
//! rebalance therefore cannot make a batch's keys reachable twice: its next
//! reader starts after every committed batch, and a batch it does re-read
//! (claimed but not committed) is refused by the claim's unique `_id`.
//! Bad messages are committed past, so they never block a partition.

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
}

impl Context {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            assignment_changed: AtomicBool::new(false),
        }
    }
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                metrics::rebalance(&self.metrics, "assign", &partitions(tpl));
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
    pub format: KeyFormat,
    pub low_watermark: usize,
    pub high_watermark: usize,
    pub shutdown_timeout: Duration,
    pub paused: bool,
    pub reported_handed_out: usize,
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
        let claim = ClaimDoc {
            batch_id: batch.batch_id.clone(),
            pool: self.pool.clone(),
            group: self.group.clone(),
            instance: self.instance.clone(),
            partition: at.partition,
            offset: at.offset,
            keys: batch.keys.len() as u64,
            state: ClaimState::Open,
            return_keys: Vec::new(),
            claimed_at: Utc::now(),
        };
        let mut backoff = CLAIM_RETRY_FIRST;
        let outcome = loop {
            match self.store.claim(&claim).await {
                Ok(outcome) => break outcome,
                Err(e) => {
                    metrics::claim_failed(&self.shared.metrics, &batch.batch_id, &e);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        // Not committed: the batch's next reader gets it (and
                        // sees our claim if the write did land).
                        () = stopped(stop) => return,
                    }
                    backoff = (backoff * 2).min(CLAIM_RETRY_MAX);
                }
            }
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

    /// Marks our claim `returning` with `keys`, none of which was handed out.
    async fn give_back(&self, batch: &str, keys: Vec<String>) {
        let n = keys.len();
        match self.store.finish(batch, &self.instance, keys).await {
            Ok(()) => metrics::keys_returned(&self.shared.metrics, batch, n),
            Err(e) => {
                error!(batch, cause = %metrics::error_chain(&e), "could not record keys to return; the claim stays open")
            }
        }
    }

    async fn housekeeping(&mut self) {
        let drained = self.shared.buffer.take_drained();
        self.report_handed_out();
        for batch in drained {
            if let Err(e) = self.store.finish(&batch, &self.instance, Vec::new()).await {
                warn!(batch = %batch, cause = %metrics::error_chain(&e), "could not mark claim drained");
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
        let reassigned = self
            .consumer
            .context()
            .assignment_changed
            .swap(false, Ordering::AcqRel);
        let pause = if self.paused {
            if depth <= self.low_watermark {
                false
            } else if reassigned {
                true
            } else {
                return;
            }
        } else if depth >= self.high_watermark {
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
        for left in leftovers {
            let n = left.unhanded.len();
            let mut done = false;
            while !done && Instant::now() < deadline {
                let write =
                    self.store
                        .finish(&left.batch_id, &self.instance, left.unhanded.clone());
                match tokio::time::timeout_at(deadline, write).await {
                    Ok(Ok(())) => done = true,
                    Ok(Err(e)) => {
                        warn!(batch = %left.batch_id, cause = %metrics::error_chain(&e), "claim update failed, retrying");
                        tokio::time::sleep(CLAIM_RETRY_FIRST).await;
                    }
                    Err(_) => break,
                }
            }
            if !done {
                error!(batch = %left.batch_id, keys = n, "shutdown deadline passed; the claim stays open and its keys are lost");
                report.failed.push(left.batch_id);
            } else if n == 0 {
                report.batches_drained += 1;
            } else {
                metrics::keys_returned(&self.shared.metrics, &left.batch_id, n);
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
