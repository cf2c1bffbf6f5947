//! Metric names (all in one place) and the events that update them together
//! with their log line.
//!
//! Per-key counters are never updated on the hot path: the consume loop
//! reads the buffer's exact handed-out count on each housekeeping tick and
//! adds the difference.

use std::time::Duration;

use kgs_schemas::{DecodeError, Unverified};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tracing::{error, info, warn};

/// Gauge: keys buffered, not yet handed out.
pub const BUFFERED_KEYS: &str = "kgs_consumer_buffered_keys";
/// Counter: keys put into the buffer (claimed and committed).
pub const KEYS_BUFFERED_TOTAL: &str = "kgs_consumer_keys_buffered_total";
/// Counter: keys handed out.
pub const KEYS_HANDED_OUT_TOTAL: &str = "kgs_consumer_keys_handed_out_total";
/// Counter: batches claimed and committed.
pub const BATCHES_CLAIMED_TOTAL: &str = "kgs_consumer_batches_claimed_total";
/// Histogram: seconds from the start of the claim write to the end of the commit.
pub const CLAIM_COMMIT_SECONDS: &str = "kgs_consumer_claim_commit_seconds";
/// Counter: `next_key` calls that found the buffer empty.
pub const EMPTY_TOTAL: &str = "kgs_consumer_empty_total";
/// Counter: `next_key_wait` calls that had to wait for a batch.
pub const WAITS_TOTAL: &str = "kgs_consumer_waits_total";
/// Counter: `next_key_wait` calls that timed out empty.
pub const WAIT_TIMEOUTS_TOTAL: &str = "kgs_consumer_wait_timeouts_total";
/// Counter, label `kind`: skipped messages ([`DecodeError::kind`], or
/// `unverified` for a well-formed batch that matches no batch record of
/// this pool incarnation: something other than its producer wrote it).
pub const BAD_MESSAGES_TOTAL: &str = "kgs_consumer_bad_messages_total";
/// Counter: batches read again that are already claimed (a crash between
/// claim and commit, a rebalance, a re-delivered copy): skipped, harmless.
pub const REPLAYS_TOTAL: &str = "kgs_consumer_replays_total";
/// Counter: keys handed back at shutdown (claims set to `returning`).
pub const KEYS_RETURNED_TOTAL: &str = "kgs_consumer_keys_returned_total";
/// Counter: offset commits that failed (their batch is not handed out).
pub const COMMIT_FAILURES_TOTAL: &str = "kgs_consumer_commit_failures_total";
/// Counter: failed claim writes (retried).
pub const CLAIM_ERRORS_TOTAL: &str = "kgs_consumer_claim_errors_total";
/// Counter: failed writes ending a claim (`returning` or `drained`): the
/// ending is queued and retried every second, and at shutdown.
pub const CLAIM_END_ERRORS_TOTAL: &str = "kgs_consumer_claim_end_errors_total";
/// Gauge: claim endings queued by a failed write, not written yet (MongoDB
/// unreachable); their keys come back once they are.
pub const CLAIM_ENDS_PENDING: &str = "kgs_consumer_claim_ends_pending";
/// Counter, label `event` (`assign`, `revoke`, `error`): rebalance events.
pub const REBALANCES_TOTAL: &str = "kgs_consumer_rebalances_total";
/// Counter, label `outcome` (`accepted`, `bad_key`, `error`, or a refusal
/// kind from [`kgs_schemas::recycle::Refusal::KINDS`]): recycle requests.
pub const RECYCLE_REQUESTS_TOTAL: &str = "kgs_consumer_recycle_requests_total";
/// Gauge: partitions of the pool topic currently assigned to this instance.
pub const ASSIGNED_PARTITIONS: &str = "kgs_consumer_assigned_partitions";
/// Gauge: 1 while the assigned partitions are paused (buffer above the high watermark).
pub const PAUSED: &str = "kgs_consumer_paused";
/// Gauge: 1 while Kafka or MongoDB refuses this client what the consume
/// loop needs (a Kafka ACL on the group or topic, a MongoDB role without
/// the claim writes, or the credentials); see [`crate::KeyConsumer::refusal`].
pub const REFUSED: &str = "kgs_consumer_refused";
/// Gauge: the high watermark in force (it follows the hand-out rate unless
/// fixed with `KeyConsumerBuilder::watermarks`).
pub const HIGH_WATERMARK: &str = "kgs_consumer_buffer_high_watermark_keys";
/// Counter: times the pool topic was found re-created and the Kafka
/// consumer was made again.
pub const TOPIC_RECREATIONS_TOTAL: &str = "kgs_consumer_topic_recreations_total";

/// The consumer's metrics, registered in the app's registry.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    pub buffered_keys: IntGauge,
    pub high_watermark: IntGauge,
    pub keys_buffered: IntCounter,
    pub keys_handed_out: IntCounter,
    pub batches_claimed: IntCounter,
    pub claim_commit_seconds: Histogram,
    pub empty: IntCounter,
    pub waits: IntCounter,
    pub wait_timeouts: IntCounter,
    pub bad_messages: IntCounterVec,
    pub replays: IntCounter,
    pub keys_returned: IntCounter,
    pub commit_failures: IntCounter,
    pub claim_errors: IntCounter,
    pub claim_end_errors: IntCounter,
    pub claim_ends_pending: IntGauge,
    pub rebalances: IntCounterVec,
    pub recycle_requests: IntCounterVec,
    pub paused: IntGauge,
    pub assigned_partitions: IntGauge,
    pub refused: IntGauge,
    pub topic_recreations: IntCounter,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        fn reg<C: prometheus::core::Collector + Clone + 'static>(
            r: &Registry,
            c: C,
        ) -> prometheus::Result<C> {
            r.register(Box::new(c.clone()))?;
            Ok(c)
        }
        let counter = |name: &str, help: &str| reg(registry, IntCounter::new(name, help)?);
        let m = Self {
            buffered_keys: reg(
                registry,
                IntGauge::new(BUFFERED_KEYS, "Keys buffered, not yet handed out.")?,
            )?,
            high_watermark: reg(
                registry,
                IntGauge::new(
                    HIGH_WATERMARK,
                    "The buffer's high watermark in force, in keys.",
                )?,
            )?,
            keys_buffered: counter(KEYS_BUFFERED_TOTAL, "Keys claimed and put in the buffer.")?,
            keys_handed_out: counter(KEYS_HANDED_OUT_TOTAL, "Keys handed out.")?,
            batches_claimed: counter(BATCHES_CLAIMED_TOTAL, "Batches claimed and committed.")?,
            claim_commit_seconds: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        CLAIM_COMMIT_SECONDS,
                        "Seconds from claim write start to offset commit end.",
                    )
                    .buckets(prometheus::exponential_buckets(0.001, 2.0, 14)?),
                )?,
            )?,
            empty: counter(EMPTY_TOTAL, "next_key calls that found the buffer empty.")?,
            waits: counter(WAITS_TOTAL, "next_key_wait calls that waited for a batch.")?,
            wait_timeouts: counter(WAIT_TIMEOUTS_TOTAL, "next_key_wait calls that timed out.")?,
            bad_messages: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(BAD_MESSAGES_TOTAL, "Messages skipped, by kind."),
                    &["kind"],
                )?,
            )?,
            replays: counter(
                REPLAYS_TOTAL,
                "Already claimed batches read again (skipped).",
            )?,
            keys_returned: counter(KEYS_RETURNED_TOTAL, "Keys handed back at shutdown.")?,
            commit_failures: counter(COMMIT_FAILURES_TOTAL, "Offset commits that failed.")?,
            claim_errors: counter(CLAIM_ERRORS_TOTAL, "Claim writes that failed (retried).")?,
            claim_end_errors: counter(
                CLAIM_END_ERRORS_TOTAL,
                "Writes ending a claim that failed (queued and retried).",
            )?,
            topic_recreations: counter(
                TOPIC_RECREATIONS_TOTAL,
                "Times the pool topic was found re-created (the Kafka consumer was made again).",
            )?,
            claim_ends_pending: reg(
                registry,
                IntGauge::new(
                    CLAIM_ENDS_PENDING,
                    "Claim endings queued by a failed write, not written yet.",
                )?,
            )?,
            rebalances: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(REBALANCES_TOTAL, "Rebalance events, by event."),
                    &["event"],
                )?,
            )?,
            recycle_requests: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(RECYCLE_REQUESTS_TOTAL, "Recycle requests, by outcome."),
                    &["outcome"],
                )?,
            )?,
            paused: reg(
                registry,
                IntGauge::new(PAUSED, "1 while the assigned partitions are paused.")?,
            )?,
            assigned_partitions: reg(
                registry,
                IntGauge::new(ASSIGNED_PARTITIONS, "Partitions assigned to this instance.")?,
            )?,
            refused: reg(
                registry,
                IntGauge::new(
                    REFUSED,
                    "1 while Kafka or MongoDB refuses this client what consuming needs (ACL, role, credentials).",
                )?,
            )?,
        };
        // Start every labelled series at 0: `increase()` then sees the first
        // event, and dashboards have series before anything went wrong.
        for kind in DecodeError::KINDS.into_iter().chain(["unverified"]) {
            m.bad_messages.with_label_values(&[kind]);
        }
        for event in ["assign", "revoke", "error"] {
            m.rebalances.with_label_values(&[event]);
        }
        for outcome in ["accepted", "bad_key", "error"]
            .into_iter()
            .chain(kgs_schemas::recycle::Refusal::KINDS)
        {
            m.recycle_requests.with_label_values(&[outcome]);
        }
        Ok(m)
    }
}

/// Where a message sits on the topic, for log lines.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// A message that is not an acceptable batch was skipped.
pub(crate) fn bad_message(m: &Metrics, at: Position, err: &DecodeError) {
    m.bad_messages.with_label_values(&[err.kind()]).inc();
    error!(
        kind = err.kind(),
        cause = %err,
        partition = at.partition,
        offset = at.offset,
        "skipping a bad message on the pool topic"
    );
}

/// A well-formed batch failed verification against the producer's record:
/// something else writes to the pool topic (or it is another installation's
/// or incarnation's batch). Skipped, never claimed; an operator must look.
pub(crate) fn unverified(m: &Metrics, at: Position, batch: &str, err: &Unverified) {
    m.bad_messages.with_label_values(&["unverified"]).inc();
    error!(
        kind = "unverified",
        reason = err.reason(),
        cause = %err,
        batch = %batch.escape_debug(),
        partition = at.partition,
        offset = at.offset,
        "skipping a batch not moved by this pool's producer"
    );
}

/// A batch that is already claimed came again; it is skipped. Normal after
/// a crash between claim and commit, or a rebalance.
pub(crate) fn replay(m: &Metrics, at: Position, batch: &str, holder: &str) {
    m.replays.inc();
    info!(
        batch,
        holder,
        partition = at.partition,
        offset = at.offset,
        "skipping a batch that is already claimed"
    );
}

/// A batch was claimed, committed and buffered.
pub(crate) fn batch_claimed(m: &Metrics, keys: usize, took: Duration) {
    m.batches_claimed.inc();
    m.keys_buffered.inc_by(keys as u64);
    m.claim_commit_seconds.observe(took.as_secs_f64());
}

/// A claim write failed and will be retried.
pub(crate) fn claim_failed(m: &Metrics, batch: &str, err: &crate::Error) {
    m.claim_errors.inc();
    warn!(batch, cause = %error_chain(err), "claim write failed, retrying");
}

/// A write ending a claim failed; the ending is retried.
pub(crate) fn claim_end_failed(m: &Metrics, batch: &str, keys: usize, err: &crate::Error) {
    m.claim_end_errors.inc();
    warn!(batch, keys, cause = %error_chain(err), "could not end the claim; retrying");
}

/// An offset commit failed: the batch is not handed out and its keys are
/// marked for return.
pub(crate) fn commit_failed(m: &Metrics, at: Position, batch: &str, err: &crate::Error) {
    m.commit_failures.inc();
    warn!(
        batch,
        partition = at.partition,
        offset = at.offset,
        cause = %error_chain(err),
        "offset commit failed, the batch is not handed out"
    );
}

/// A rebalance event happened.
pub(crate) fn rebalance(m: &Metrics, event: &'static str, partitions: &str) {
    m.rebalances.with_label_values(&[event]).inc();
    info!(event, partitions, "consumer group rebalance");
}

/// The buffer reached the high watermark (`paused`) or fell to the low one.
/// A server refused the consume loop (an ACL, a role or the credentials):
/// ERROR once per refusal (librdkafka retries the join every few seconds,
/// the claim is retried, and either would repeat it), the gauge set while
/// it lasts.
pub(crate) fn refused(m: &Metrics, first: bool, detail: &str) {
    m.refused.set(1);
    if first {
        error!(
            cause = detail,
            "refused what consuming needs; an operator must grant it (README: Security)"
        );
    }
}

/// The refusal is over.
pub(crate) fn admitted(m: &Metrics) {
    m.refused.set(0);
    info!("admitted again");
}

pub(crate) fn backpressure(m: &Metrics, paused: bool, depth: usize) {
    m.paused.set(i64::from(paused));
    tracing::debug!(paused, depth, "backpressure");
}

/// Keys of a batch were handed back at shutdown.
pub(crate) fn keys_returned(m: &Metrics, batch: &str, keys: usize) {
    m.keys_returned.inc_by(keys as u64);
    info!(batch, keys, "claim set to returning");
}

/// A recycle request ended (`outcome`: `accepted`, `bad_key`, `error` or a
/// refusal kind).
pub(crate) fn recycle_request(m: &Metrics, key: &str, outcome: &'static str) {
    m.recycle_requests.with_label_values(&[outcome]).inc();
    info!(key, outcome, "recycle request");
}

/// Formats an error with its causes, `a: b: c`.
pub(crate) use kgs_schemas::error_chain;
