//! Every metric of the producer, named in one place, and the small event
//! functions that pair each log line with its metric update.
//!
//! Labels are bounded: `partition` (the topic's partition count) and `kind`
//! (the fixed [`crate::Error::kind`] labels). Nothing is updated per key.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Buckets for move and publish latency: 1 ms .. ~16 s.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 15).expect("valid buckets")
}

/// The producer's metrics, registered in their own registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Keys in `keys.<pool>` (refreshed periodically).
    pub keys_in_pool: IntGauge,
    /// Keys in `used_keys.<pool>` (refreshed periodically).
    pub keys_used: IntGauge,
    /// Keys generated so far (the pool cursor).
    pub keys_generated: IntGauge,
    /// Size of the key space.
    pub key_space: IntGauge,
    /// used / space, in parts per million (a gauge of integers).
    pub space_used_ppm: IntGauge,
    /// Batches published to Kafka by this process.
    pub batches_published: IntCounter,
    /// Keys in those batches.
    pub keys_published: IntCounter,
    /// Batches moved from `keys` to `used_keys` by this process.
    pub batches_moved: IntCounter,
    /// Keys returned unused by consumers and put into new batches.
    pub keys_returned: IntCounter,
    /// Claims that matched no batch record of this pool incarnation, set
    /// aside (`rejected`) instead of being processed.
    pub claims_rejected: IntCounter,
    /// Keys recycled (handed-out keys put into new batches on request).
    pub keys_recycled: IntCounter,
    /// Recycle requests the leader refused, by reason.
    pub recycles_refused: IntCounterVec,
    /// Unfinished batches finished by recovery.
    pub batches_recovered: IntCounter,
    /// Time to move one batch (record, used_keys, delete, state).
    pub move_seconds: Histogram,
    /// Time to publish one batch in a Kafka transaction.
    pub publish_seconds: Histogram,
    /// Batches waiting per partition (end offset − committed offset).
    pub backlog: IntGaugeVec,
    /// 1 while the leader finds the whole key space used (nothing left to publish).
    pub pool_exhausted: IntGauge,
    /// 1 while this process holds the pool's lease.
    pub leader: IntGauge,
    /// Keys per batch the leader moves now ([`crate::sizer`]).
    pub batch_size: IntGauge,
    /// Keys consumed per second, as the leader measures it from the backlog.
    pub demand: IntGauge,
    /// The lease epoch this process last held.
    pub lease_epoch: IntGauge,
    /// Errors by kind.
    pub errors: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new(pool: &str) -> Self {
        let registry = Registry::new_custom(
            Some("kgs_producer".into()),
            Some([("pool".to_owned(), pool.to_owned())].into()),
        )
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
            Opts::new("backlog_batches", "Batches not yet consumed, per partition"),
            &["partition"],
        )
        .expect("valid gauge vec");
        registry
            .register(Box::new(backlog.clone()))
            .expect("unique metric");
        let errors = IntCounterVec::new(Opts::new("errors_total", "Errors by kind"), &["kind"])
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
                "recycles_refused_total",
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
        Self {
            keys_in_pool: gauge("keys_in_pool", "Keys in keys.<pool>"),
            keys_used: gauge("keys_used", "Keys in used_keys.<pool>"),
            keys_generated: gauge("keys_generated", "Keys generated (pool cursor)"),
            key_space: gauge("key_space", "Size of the key space"),
            space_used_ppm: gauge("space_used_ppm", "Fraction of the key space used, in ppm"),
            batches_published: counter("batches_published_total", "Batches published"),
            keys_published: counter("keys_published_total", "Keys in published batches"),
            batches_moved: counter("batches_moved_total", "Batches moved to used_keys"),
            keys_returned: counter(
                "keys_returned_total",
                "Keys returned unused by consumers, handed out again in new batches",
            ),
            claims_rejected: counter(
                "claims_rejected_total",
                "Claims matching no batch record of the pool, set aside",
            ),
            keys_recycled: counter(
                "keys_recycled_total",
                "Handed-out keys recycled into new batches",
            ),
            recycles_refused,
            batches_recovered: counter("batches_recovered_total", "Unfinished batches recovered"),
            move_seconds: histogram("move_seconds", "Time to move one batch"),
            publish_seconds: histogram("publish_seconds", "Time to publish one batch"),
            backlog,
            pool_exhausted: gauge(
                "pool_exhausted",
                "1 while every key of the space is used (nothing left to publish)",
            ),
            leader: gauge("lease_leader", "1 while this process holds the lease"),
            batch_size: gauge("batch_size", "Keys per batch the leader moves now"),
            demand: gauge(
                "demand_keys_per_second",
                "Keys consumed per second, measured by the leader from the backlog",
            ),
            lease_epoch: gauge("lease_epoch", "Lease epoch last held"),
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
                tracing::error!(cause = %err, during, "operator action needed; publishing paused")
            }
            _ => tracing::warn!(cause = %err, during, "step failed, will retry"),
        }
    }
}
