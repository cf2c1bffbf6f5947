//! Every metric of the producer, named in one place (the constants), and
//! the event methods that pair each log line with its metric update: the
//! rest of the producer updates metrics only through them.
//!
//! Labels are bounded: `partition` (the topic's partition count) and `kind`
//! (the fixed [`crate::Error::kind`] labels). Nothing is updated per key.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Gauge: keys in `keys.<pool>` (refreshed periodically).
pub const KEYS_IN_POOL: &str = "kgs_producer_keys_in_pool";
/// Gauge: keys in `used_keys.<pool>` (refreshed periodically).
pub const KEYS_USED: &str = "kgs_producer_keys_used";
/// Gauge: keys generated so far (the pool cursor).
pub const KEYS_GENERATED: &str = "kgs_producer_keys_generated";
/// Gauge: generation positions skipped because their key holds a blocked word.
pub const BLOCKED_POSITIONS: &str = "kgs_producer_blocked_positions";
/// Gauge: keys taken out of `keys` for words added to the blocklist later.
pub const BLOCKLIST_REMOVED: &str = "kgs_producer_blocklist_removed_keys";
/// Gauge: keys matching added words handed out before they were added.
pub const BLOCKLIST_HANDED_OUT: &str = "kgs_producer_blocklist_handed_out_keys";
/// Gauge: length of the new keys handed out now (the tier in use).
pub const TIER_LENGTH: &str = "kgs_producer_tier_length";
/// Gauge: keys of the tier in use not yet moved into batches.
pub const TIER_KEYS_LEFT: &str = "kgs_producer_tier_keys_left";
/// Gauge: size of the key space.
pub const KEY_SPACE: &str = "kgs_producer_key_space";
/// Gauge: used / space, in parts per million.
pub const SPACE_USED_PPM: &str = "kgs_producer_space_used_ppm";
/// Counter: batches published to Kafka by this process.
pub const BATCHES_PUBLISHED_TOTAL: &str = "kgs_producer_batches_published_total";
/// Counter: keys in those batches.
pub const KEYS_PUBLISHED_TOTAL: &str = "kgs_producer_keys_published_total";
/// Counter: batches moved from `keys` to `used_keys` by this process.
pub const BATCHES_MOVED_TOTAL: &str = "kgs_producer_batches_moved_total";
/// Counter: keys returned unused by consumers and put into new batches.
pub const KEYS_RETURNED_TOTAL: &str = "kgs_producer_keys_returned_total";
/// Counter: claims that matched no batch record of this pool incarnation,
/// set aside (`rejected`) instead of being put back.
pub const CLAIMS_REJECTED_TOTAL: &str = "kgs_producer_claims_rejected_total";
/// Counter: keys recycled (handed-out keys put into new batches on request).
pub const KEYS_RECYCLED_TOTAL: &str = "kgs_producer_keys_recycled_total";
/// Counter, label `reason` ([`kgs_schemas::recycle::Refusal::KINDS`]):
/// recycle requests the leader refused.
pub const RECYCLES_REFUSED_TOTAL: &str = "kgs_producer_recycles_refused_total";
/// Counter: vanity key requests decided, by outcome (`taken`, `refused`).
pub const VANITY_KEYS_TOTAL: &str = "kgs_producer_vanity_keys_total";
/// Counter: unfinished batches finished by recovery.
pub const BATCHES_RECOVERED_TOTAL: &str = "kgs_producer_batches_recovered_total";
/// Histogram: seconds to move one batch (record, used_keys, delete, state).
pub const MOVE_SECONDS: &str = "kgs_producer_move_seconds";
/// Histogram: seconds to publish one batch in a Kafka transaction.
pub const PUBLISH_SECONDS: &str = "kgs_producer_publish_seconds";
/// Gauge, label `partition`: batches not yet consumed.
pub const BACKLOG_BATCHES: &str = "kgs_producer_backlog_batches";
/// Gauge: 1 while the leader finds the whole key space used.
pub const POOL_EXHAUSTED: &str = "kgs_producer_pool_exhausted";
/// Gauge: 1 while this process holds the pool's lease.
pub const LEASE_LEADER: &str = "kgs_producer_lease_leader";
/// Gauge: keys per batch the leader moves now ([`crate::leader::sizer`]).
pub const BATCH_SIZE: &str = "kgs_producer_batch_size";
/// Gauge: keys consumed per second, as the leader measures it from the backlog.
pub const DEMAND_KEYS_PER_SECOND: &str = "kgs_producer_demand_keys_per_second";
/// Gauge: the lease epoch this process last held.
pub const LEASE_EPOCH: &str = "kgs_producer_lease_epoch";
/// Counter, label `kind` ([`crate::Error::KINDS`]): errors.
pub const ERRORS_TOTAL: &str = "kgs_producer_errors_total";

/// Buckets for move and publish latency: 1 ms .. ~16 s.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 15).expect("valid buckets")
}

/// The producer's metrics, registered in their own registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Keys in `keys.<pool>` (refreshed periodically).
    keys_in_pool: IntGauge,
    /// Keys in `used_keys.<pool>` (refreshed periodically).
    keys_used: IntGauge,
    /// Keys generated so far (the pool cursor).
    keys_generated: IntGauge,
    blocked_positions: IntGauge,
    blocklist_removed: IntGauge,
    blocklist_handed_out: IntGauge,
    /// Length of the new keys handed out now (the tier in use).
    tier_length: IntGauge,
    /// Positions of that tier not yet moved into batches.
    tier_keys_left: IntGauge,
    /// Size of the key space.
    key_space: IntGauge,
    /// used / space, in parts per million (a gauge of integers).
    space_used_ppm: IntGauge,
    /// Batches published to Kafka by this process.
    batches_published: IntCounter,
    /// Keys in those batches.
    keys_published: IntCounter,
    /// Batches moved from `keys` to `used_keys` by this process.
    batches_moved: IntCounter,
    /// Keys returned unused by consumers and put into new batches.
    keys_returned: IntCounter,
    /// Claims that matched no batch record of this pool incarnation, set
    /// aside (`rejected`) instead of being processed.
    claims_rejected: IntCounter,
    /// Keys recycled (handed-out keys put into new batches on request).
    keys_recycled: IntCounter,
    /// Recycle requests the leader refused, by reason.
    recycles_refused: IntCounterVec,
    vanity_keys: IntCounterVec,
    /// Unfinished batches finished by recovery.
    batches_recovered: IntCounter,
    /// Time to move one batch (record, used_keys, delete, state).
    move_seconds: Histogram,
    /// Time to publish one batch in a Kafka transaction.
    publish_seconds: Histogram,
    /// Batches waiting per partition (end offset − committed offset).
    backlog: IntGaugeVec,
    /// 1 while the leader finds the whole key space used (nothing left to publish).
    pool_exhausted: IntGauge,
    /// 1 while this process holds the pool's lease.
    leader: IntGauge,
    /// Keys per batch the leader moves now ([`crate::sizer`]).
    batch_size: IntGauge,
    /// Keys consumed per second, as the leader measures it from the backlog.
    demand: IntGauge,
    /// The lease epoch this process last held.
    lease_epoch: IntGauge,
    /// Errors by kind.
    errors: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new(pool: &str) -> Self {
        let registry =
            Registry::new_custom(None, Some([("pool".to_owned(), pool.to_owned())].into()))
                .expect("valid registry");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid gauge");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets()))
                .expect("valid histogram");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let backlog = IntGaugeVec::new(
            Opts::new(BACKLOG_BATCHES, "Batches not yet consumed, per partition"),
            &["partition"],
        )
        .expect("valid gauge vec");
        registry
            .register(Box::new(backlog.clone()))
            .expect("unique metric");
        let errors = IntCounterVec::new(Opts::new(ERRORS_TOTAL, "Errors by kind"), &["kind"])
            .expect("valid counter vec");
        registry
            .register(Box::new(errors.clone()))
            .expect("unique metric");
        // Every kind starts at 0, so `increase()` sees the first error and
        // the errors panel has series before anything went wrong.
        for kind in crate::Error::KINDS {
            errors.with_label_values(&[kind]);
        }
        let recycles_refused = IntCounterVec::new(
            Opts::new(
                RECYCLES_REFUSED_TOTAL,
                "Recycle requests refused by the leader, by reason",
            ),
            &["reason"],
        )
        .expect("valid counter vec");
        registry
            .register(Box::new(recycles_refused.clone()))
            .expect("unique metric");
        for reason in kgs_schemas::recycle::Refusal::KINDS {
            recycles_refused.with_label_values(&[reason]);
        }
        let vanity_keys = IntCounterVec::new(
            Opts::new(VANITY_KEYS_TOTAL, "Vanity key requests decided, by outcome"),
            &["outcome"],
        )
        .expect("valid counter vec");
        registry
            .register(Box::new(vanity_keys.clone()))
            .expect("unique metric");
        for outcome in ["taken", "refused"] {
            vanity_keys.with_label_values(&[outcome]);
        }
        Self {
            keys_in_pool: gauge(KEYS_IN_POOL, "Keys in keys.<pool>"),
            keys_used: gauge(KEYS_USED, "Keys in used_keys.<pool>"),
            keys_generated: gauge(KEYS_GENERATED, "Keys generated (pool cursor)"),
            blocked_positions: gauge(
                BLOCKED_POSITIONS,
                "Generation positions skipped: their key holds a blocked word",
            ),
            blocklist_removed: gauge(
                BLOCKLIST_REMOVED,
                "Keys taken out of keys.<pool> for words added to the blocklist later",
            ),
            blocklist_handed_out: gauge(
                BLOCKLIST_HANDED_OUT,
                "Keys holding words added to the blocklist later, handed out before (not recalled)",
            ),
            tier_length: gauge(
                TIER_LENGTH,
                "Length of the new keys handed out now (the tier in use)",
            ),
            tier_keys_left: gauge(
                TIER_KEYS_LEFT,
                "Keys of the tier in use not yet moved into batches; the next length starts after them",
            ),
            key_space: gauge(KEY_SPACE, "Size of the key space"),
            space_used_ppm: gauge(SPACE_USED_PPM, "Fraction of the key space used, in ppm"),
            batches_published: counter(BATCHES_PUBLISHED_TOTAL, "Batches published"),
            keys_published: counter(KEYS_PUBLISHED_TOTAL, "Keys in published batches"),
            batches_moved: counter(BATCHES_MOVED_TOTAL, "Batches moved to used_keys"),
            keys_returned: counter(
                KEYS_RETURNED_TOTAL,
                "Keys returned unused by consumers, handed out again in new batches",
            ),
            claims_rejected: counter(
                CLAIMS_REJECTED_TOTAL,
                "Claims matching no batch record of the pool, set aside",
            ),
            keys_recycled: counter(
                KEYS_RECYCLED_TOTAL,
                "Handed-out keys recycled into new batches",
            ),
            recycles_refused,
            vanity_keys,
            batches_recovered: counter(BATCHES_RECOVERED_TOTAL, "Unfinished batches recovered"),
            move_seconds: histogram(MOVE_SECONDS, "Time to move one batch"),
            publish_seconds: histogram(PUBLISH_SECONDS, "Time to publish one batch"),
            backlog,
            pool_exhausted: gauge(
                POOL_EXHAUSTED,
                "1 while every key of the space is used (nothing left to publish)",
            ),
            leader: gauge(LEASE_LEADER, "1 while this process holds the lease"),
            batch_size: gauge(BATCH_SIZE, "Keys per batch the leader moves now"),
            demand: gauge(
                DEMAND_KEYS_PER_SECOND,
                "Keys consumed per second, measured by the leader from the backlog",
            ),
            lease_epoch: gauge(LEASE_EPOCH, "Lease epoch last held"),
            errors,
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("Prometheus text is UTF-8")
    }

    /// The size of the pool's key space (known to a standby too).
    pub fn key_space(&self, space: u64) {
        self.key_space.set(space as i64);
    }

    /// Keys published by this process so far.
    pub fn keys_published(&self) -> u64 {
        self.keys_published.get()
    }

    /// This process leads the pool at `epoch`.
    pub fn leading(&self, pool: &str, epoch: u64) {
        self.leader.set(1);
        self.lease_epoch.set(epoch as i64);
        tracing::info!(pool, epoch, "leading");
    }

    /// This process no longer leads (shutdown, or stepped down).
    pub fn not_leading(&self) {
        self.leader.set(0);
    }

    /// The leader's batch size and the demand it follows.
    pub fn sizing(&self, batch_size: usize, keys_per_second: f64) {
        self.batch_size.set(batch_size as i64);
        self.demand.set(keys_per_second as i64);
    }

    /// The backlog of one partition, in batches.
    pub fn backlog(&self, partition: i32, batches: u64) {
        self.backlog
            .with_label_values(&[&partition.to_string()])
            .set(batches as i64);
    }

    /// The pool's key figures: `keys` unused, `used`, of `space`, with
    /// `generated` positions.
    pub fn pool_figures(&self, keys: u64, used: u64, generated: u64, space: u64) {
        self.key_space.set(space as i64);
        self.keys_in_pool.set(keys as i64);
        self.keys_generated.set(generated as i64);
        self.keys_used.set(used as i64);
        self.space_used_ppm
            .set((used as f64 / space.max(1) as f64 * 1e6) as i64);
    }

    /// The tier in use: its key length and the positions left in it.
    pub fn tier(&self, length: u8, left: u64) {
        self.tier_length.set(i64::from(length));
        self.tier_keys_left.set(left as i64);
    }

    /// Positions the blocklist kept out so far (`pools.blocked`), and the
    /// keys its later words took out of `keys` or found handed out.
    pub fn blocked_positions(&self, blocked: u64, removed: u64, handed_out: u64) {
        self.blocked_positions.set(blocked as i64);
        self.blocklist_removed.set(removed as i64);
        self.blocklist_handed_out.set(handed_out as i64);
    }

    /// The key space of `pool` is used up: an operator must add a pool or
    /// recycle keys. Said once per exhaustion.
    pub fn pool_exhausted(&self, pool: &str, space: u64) {
        self.pool_exhausted.set(1);
        tracing::error!(pool, space, "pool exhausted: every key of the key space has been handed out or reserved; create a pool with longer keys or recycle keys");
    }

    /// Batches flow again after the pool was exhausted (keys recycled).
    pub fn pool_refilled(&self, pool: &str) {
        self.pool_exhausted.set(0);
        tracing::info!(pool, "pool no longer exhausted");
    }

    /// An unfinished batch was finished by recovery.
    pub fn batch_recovered(&self, batch: &str) {
        self.batches_recovered.inc();
        tracing::info!(batch, "batch recovered");
    }

    /// Recovery of one batch failed; the others went on.
    pub fn batch_not_recovered(&self, batch: &str, err: &crate::Error) {
        self.error(err, "recovering a batch");
        tracing::warn!(
            batch,
            "batch not recovered this pass; the others go on, it is retried at the next pass"
        );
    }

    /// The unused keys of a consumer's claim on `batch` were put back into
    /// circulation (`keys` of them) and the claim set `returned`.
    pub fn keys_returned(&self, batch: &str, keys: u64) {
        self.keys_returned.inc_by(keys);
        tracing::info!(batch, keys, "returned keys handed out again in new batches");
    }

    /// A recycle request was performed: the key is in a new batch.
    pub fn key_recycled(&self, key: &str, batch: &str, by: &str) {
        self.keys_recycled.inc();
        tracing::info!(key, batch, by, "key recycled");
    }

    /// A vanity key was decided: taken for its requester, or refused.
    pub fn vanity_key(&self, key: &str, by: &str, refusal: Option<&str>) {
        match refusal {
            None => {
                self.vanity_keys.with_label_values(&["taken"]).inc();
                tracing::info!(key, by, "vanity key taken");
            }
            Some(reason) => {
                self.vanity_keys.with_label_values(&["refused"]).inc();
                tracing::info!(key, by, reason, "vanity key refused");
            }
        }
    }

    /// A recycle request was refused; nothing changed.
    pub fn recycle_refused(&self, key: &str, batch: &str, refusal: &kgs_schemas::recycle::Refusal) {
        self.recycles_refused
            .with_label_values(&[refusal.kind()])
            .inc();
        tracing::warn!(key, batch, reason = %refusal, "recycle refused");
    }

    /// A batch was moved: log and count.
    pub fn batch_moved(&self, batch: &str, keys: usize, took: Duration) {
        self.batches_moved.inc();
        self.move_seconds.observe(took.as_secs_f64());
        tracing::debug!(
            batch,
            keys,
            took_ms = took.as_millis() as u64,
            "batch moved"
        );
    }

    /// A batch was published: log and count.
    pub fn batch_published(
        &self,
        batch: &str,
        keys: usize,
        partition: i32,
        offset: i64,
        took: Duration,
    ) {
        self.batches_published.inc();
        self.keys_published.inc_by(keys as u64);
        self.publish_seconds.observe(took.as_secs_f64());
        tracing::debug!(
            batch,
            keys,
            partition,
            offset,
            took_ms = took.as_millis() as u64,
            "batch published"
        );
    }

    /// A claim matches no batch record of this pool incarnation: it was set
    /// aside (`rejected`) and nothing of it was put back. Something other
    /// than a kgs consumer of this pool wrote it: an operator must look.
    pub fn claim_rejected(&self, batch: &str, reason: &str) {
        self.claims_rejected.inc();
        tracing::error!(batch = %batch.escape_debug(), reason, "claim set aside: it matches no batch record of this pool");
    }

    /// An error happened in the run loop: log and count by kind.
    pub fn error(&self, err: &crate::Error, during: &'static str) {
        self.errors.with_label_values(&[err.kind()]).inc();
        match err {
            // Nothing heals these by retrying: an operator must act.
            crate::Error::Topic { .. } | crate::Error::Corrupt(_) => {
                tracing::error!(cause = %crate::error::chain(err), during, "operator action needed; publishing paused")
            }
            // The process ends on these, with the error as its last line.
            crate::Error::Unauthorized { .. } => {
                tracing::error!(cause = %crate::error::chain(err), during, "refused by the server; stopping")
            }
            _ => {
                tracing::warn!(cause = %crate::error::chain(err), during, "step failed, will retry")
            }
        }
    }
}
