//! Returning keys: ending this process's claim on a batch, as `returning`
//! with the keys it never handed out (the producer leader puts them back
//! into circulation) or as `drained` when every key was handed out; the
//! retry of endings a failed write left queued; and the shutdown that ends
//! every claim still in the buffer before leaving the group.

use rdkafka::consumer::Consumer;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::consume::{ConsumeLoop, CLAIM_RETRY_FIRST, UNFINISHED_RETRY};
use crate::metrics;

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

impl ConsumeLoop {
    /// Tries the claim endings queued by failed writes again, every
    /// [`UNFINISHED_RETRY`].
    pub(crate) async fn retry_unfinished(&mut self) {
        if !self.unfinished.is_empty() && Instant::now() >= self.next_unfinished_retry {
            self.next_unfinished_retry = Instant::now() + UNFINISHED_RETRY;
            // Stop at the first failure: while the database is away each
            // attempt waits for server selection, and the loop must go on.
            let mut queued = std::mem::take(&mut self.unfinished).into_iter();
            while let Some((batch, keys)) = queued.next() {
                let before = self.unfinished.len();
                self.end_claim(&batch, keys).await;
                if self.unfinished.len() > before {
                    self.unfinished.extend(queued);
                    break;
                }
            }
            self.pending_changed();
        }
    }

    /// Whether an ending of our claim on `batch` is queued: its write
    /// failed, and it is retried until it lands.
    pub(crate) fn ending(&self, batch: &str) -> bool {
        self.unfinished.iter().any(|(b, _)| b == batch)
    }

    fn pending_changed(&self) {
        self.shared
            .metrics
            .claim_ends_pending
            .set(self.unfinished.len() as i64);
    }

    /// Marks our claim `returning` with `keys` (none handed out), or
    /// `drained` with none; a failed write is queued and retried.
    pub(crate) async fn end_claim(&mut self, batch: &str, keys: Vec<String>) {
        let n = keys.len();
        match self.store.end_claim(batch, &self.token, keys.clone()).await {
            Ok(true) if n > 0 => metrics::keys_returned(&self.shared.metrics, batch, n),
            Ok(_) => {}
            Err(e) => {
                metrics::claim_end_failed(&self.shared.metrics, batch, n, &e);
                self.unfinished.push((batch.to_owned(), keys));
                self.pending_changed();
            }
        }
    }

    /// Stops hand-out, records what each open claim left unused, and leaves
    /// the group. Every buffered batch's offset was committed before its
    /// keys were buffered, so there is nothing left to commit.
    pub(crate) async fn shut_down(mut self) -> ShutdownReport {
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
                let write = self
                    .store
                    .end_claim(&batch_id, &self.token, unhanded.clone());
                match tokio::time::timeout_at(deadline, write).await {
                    // `false`: an earlier attempt that reported an error had landed.
                    Ok(Ok(_)) => done = true,
                    // Refused by the server's roles: no retry can succeed.
                    Ok(Err(e)) if e.mongo_refusal().is_some() => {
                        warn!(batch = %batch_id, cause = %metrics::error_chain(&e), "claim update refused");
                        break;
                    }
                    Ok(Err(e)) => {
                        metrics::claim_end_failed(&self.shared.metrics, &batch_id, n, &e);
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
        // Nothing is retried any more: what failed is in the report.
        self.pending_changed();
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
