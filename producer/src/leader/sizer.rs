//! Batch size that follows demand (as Meituan Leaf's segment step does):
//! small batches while the pool is idle, so a crashed app server loses few
//! keys and a batch record stays small; larger ones when consumers drain
//! fast, so the fixed cost of a batch (its record, a Kafka transaction, a
//! consumer's claim) is spread over more keys and each partition's backlog
//! lasts long enough for the leader to refill it.
//!
//! Demand is measured from what the leader already knows: between two
//! observations, the batches consumed are the backlog before, plus the
//! batches published meanwhile, minus the backlog now.

use std::time::{Duration, Instant};

/// A batch that lasts less than this on one partition at the observed rate
/// doubles the size...
const GROW_BELOW: Duration = Duration::from_secs(10);
/// ...and one that lasts more than this halves it.
const SHRINK_ABOVE: Duration = Duration::from_secs(120);
/// Observations closer together than this are merged (rates of very short
/// intervals are noise).
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// At most one change of size per this interval.
const ADJUST_EVERY: Duration = Duration::from_secs(5);
/// Weight of a new rate sample in the moving average.
const ALPHA: f64 = 0.3;

/// The current batch size of one pool and the demand it is based on.
#[derive(Debug, Clone)]
pub struct BatchSizer {
    min: usize,
    max: usize,
    size: usize,
    partitions: u32,
    /// Keys consumed per second (moving average), once measured.
    rate: Option<f64>,
    /// The last observation: when, and the backlog then, in batches.
    last: Option<(Instant, u64)>,
    /// Batches published since the last observation.
    published: u64,
    /// Keys in those batches.
    published_keys: u64,
    changed: Option<Instant>,
}

impl BatchSizer {
    /// Sizes between `min` and `max` keys (equal: a fixed size), starting at
    /// `min`, for a topic of `partitions` partitions.
    pub fn new(min: usize, max: usize, partitions: u32) -> Self {
        Self {
            min,
            max: max.max(min),
            size: min,
            partitions: partitions.max(1),
            rate: None,
            last: None,
            published: 0,
            published_keys: 0,
            changed: None,
        }
    }

    /// The size of the next batch.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Keys consumed per second, as last measured.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// Counts `batches` batches of `keys` keys in all published.
    pub fn published(&mut self, batches: u64, keys: u64) {
        self.published += batches;
        self.published_keys += keys;
    }

    /// Takes the backlog (batches not consumed, all partitions) at `now`,
    /// updates the rate and, at most every few seconds, the size.
    pub fn observe(&mut self, now: Instant, backlog: u64) {
        let Some((then, before)) = self.last else {
            self.last = Some((now, backlog));
            self.published = 0;
            self.published_keys = 0;
            return;
        };
        let dt = now.saturating_duration_since(then);
        if dt < MIN_INTERVAL {
            return;
        }
        let consumed = (before + self.published).saturating_sub(backlog);
        // Keys per consumed batch: those just published, else the size.
        let per_batch = if self.published > 0 {
            self.published_keys as f64 / self.published as f64
        } else {
            self.size as f64
        };
        let sample = consumed as f64 * per_batch / dt.as_secs_f64();
        let rate = match self.rate {
            Some(r) => r + ALPHA * (sample - r),
            None => sample,
        };
        self.rate = Some(rate);
        self.last = Some((now, backlog));
        self.published = 0;
        self.published_keys = 0;
        if self
            .changed
            .is_some_and(|t| now.saturating_duration_since(t) < ADJUST_EVERY)
        {
            return;
        }
        let per_partition = rate / f64::from(self.partitions);
        let lasts = if per_partition > 0.0 {
            Duration::from_secs_f64((self.size as f64 / per_partition).min(1e9))
        } else {
            Duration::MAX
        };
        let next = if lasts < GROW_BELOW {
            (self.size * 2).min(self.max)
        } else if lasts > SHRINK_ABOVE {
            (self.size / 2).max(self.min)
        } else {
            self.size
        };
        if next != self.size {
            tracing::info!(
                from = self.size,
                to = next,
                keys_per_s = rate as u64,
                "batch size follows demand"
            );
            self.size = next;
            self.changed = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_while_consumers_drain_fast_and_shrinks_when_idle() {
        let t0 = Instant::now();
        let mut s = BatchSizer::new(1_000, 8_000, 2);
        s.observe(t0, 20);
        // 20 batches of 1,000 consumed in 2 s: 10,000 keys/s, 5,000 per
        // partition, a batch lasts 0.2 s: grow.
        s.published(10, 10_000);
        s.observe(t0 + Duration::from_secs(2), 10);
        assert_eq!(s.rate().map(|r| r as u64), Some(10_000));
        assert_eq!(s.size(), 2_000);
        // No second change within ADJUST_EVERY.
        s.published(10, 20_000);
        s.observe(t0 + Duration::from_secs(4), 10);
        assert_eq!(s.size(), 2_000);
        // Then up to the maximum, never past it.
        let mut t = t0 + Duration::from_secs(4);
        for _ in 0..10 {
            t += ADJUST_EVERY;
            s.published(10, 10 * s.size() as u64);
            s.observe(t, 10);
        }
        assert_eq!(s.size(), 8_000);
        // Idle: nothing consumed for minutes, the size halves down to min.
        for _ in 0..60 {
            t += ADJUST_EVERY;
            s.observe(t, 10);
        }
        assert_eq!(s.size(), 1_000);
    }

    #[test]
    fn a_fixed_size_stays_fixed() {
        let t0 = Instant::now();
        let mut s = BatchSizer::new(50, 50, 1);
        s.observe(t0, 0);
        s.published(100, 5_000);
        s.observe(t0 + Duration::from_secs(1), 0);
        assert_eq!(s.size(), 50);
    }

    #[test]
    fn a_backlog_that_grows_is_no_demand() {
        let t0 = Instant::now();
        let mut s = BatchSizer::new(100, 1_000, 1);
        s.observe(t0, 0);
        s.published(5, 500);
        s.observe(t0 + Duration::from_secs(2), 5);
        assert_eq!(s.rate(), Some(0.0));
        assert_eq!(s.size(), 100);
    }
}
