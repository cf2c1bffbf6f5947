//! Claiming one batch read from the topic: decode, verify against the
//! producer's record, record the claim, commit the offset, and only then
//! buffer the keys (why this order is safe: [`super::consume`]). Anything
//! that fails after the claim may have landed ends the claim again
//! ([`super::returns`]), so its keys are handed out by nobody twice and by
//! the producer once more.

use std::future::Future;
use std::sync::Arc;

use chrono::Utc;
use kgs_schemas::docs::{ClaimDoc, ClaimState};
use kgs_schemas::{BatchCheck, KeyBatch};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::warn;

use crate::consume::{stopped, ConsumeLoop, Refused, CLAIM_RETRY_FIRST, CLAIM_RETRY_MAX};
use crate::error::Error;
use crate::metrics::{self, Position};
use crate::store::ClaimOutcome;

impl ConsumeLoop {
    pub(crate) async fn handle(&mut self, m: OwnedMessage, stop: &mut watch::Receiver<bool>) {
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
        // The ending of our claim on this batch is queued (its commit failed
        // and the write giving its keys back did too, MongoDB being away),
        // and the batch is read again (a rebalance re-delivers it: it was
        // never committed). Its claim is still `open` and ours, so claiming
        // it would take it for a batch redelivered before its commit and hand
        // its keys out, while the queued ending gives every key back for the
        // producer to publish again: each key handed out twice. An ending
        // once tried is never called off (a write that reported an error may
        // still land), so skip the batch, as the replay it is, before any
        // MongoDB read: its keys come back through the ending.
        //
        // The same for a batch still in our buffer: a pool topic deleted and
        // created again (offsets start from 0 again) can hold a second copy
        // of a batch we claimed and committed in the old one (a leader that
        // crashed between publishing it and recording that republishes it),
        // even at the same partition and offset, which would pass for the
        // resumable claim of a batch redelivered before its commit. Our open
        // claims that were committed are exactly the batches in the buffer
        // and those whose ending is queued.
        if self.ending(&batch.batch_id) || self.shared.buffer.holds(&batch.batch_id) {
            metrics::replay(&self.shared.metrics, at, &batch.batch_id, &self.instance);
            self.commit_past(at).await;
            return;
        }
        let started = std::time::Instant::now();
        // Verified before anything is written, so a forged batch leaves no
        // claim behind (a claim names a batch as this pool's).
        let Ok(proof) = self
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
        // Published into a re-created topic we have not subscribed to
        // afresh: neither claimed nor committed (a commit at this position
        // would make the group skip the batches before it); the loop makes
        // a new consumer, which reads it again.
        let generation = proof.as_ref().map_or(0, |p| p.topic_generation);
        if generation > self.topic_generation {
            self.recreated = Some(generation);
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
        let outcome = match self
            .retry(stop, &batch.batch_id, || self.store.claim(&claim))
            .await
        {
            Ok(outcome) => outcome,
            Err(uncertain) => {
                // Stopping mid-retry. Not committed, but an earlier attempt
                // may have landed (a write that failed on the way back): its
                // next reader would skip a batch claimed by us, so hand the
                // keys back. Conditional on our token: a no-op if no attempt
                // landed. Not needed when every attempt was refused.
                if uncertain {
                    self.end_claim(&batch.batch_id, batch.keys).await;
                }
                return;
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
            self.end_claim(&batch.batch_id, batch.keys).await;
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
                self.end_claim(&batch.batch_id, batch.keys).await;
            }
        }
        self.apply_backpressure();
    }

    /// Runs `op` until it succeeds, backing off between attempts. If a stop
    /// is requested first, `Err(uncertain)`: whether an attempt may have
    /// been applied (it failed other than by the server refusing it).
    async fn retry<T, F, Fut>(
        &self,
        stop: &mut watch::Receiver<bool>,
        batch: &str,
        mut op: F,
    ) -> Result<T, bool>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = crate::Result<T>>,
    {
        let mut backoff = CLAIM_RETRY_FIRST;
        let mut uncertain = false;
        loop {
            match op().await {
                Ok(v) => {
                    self.admitted(false);
                    return Ok(v);
                }
                Err(e) => {
                    match e.mongo_refusal() {
                        Some(detail) => self.refused(Refused::MongoDB(detail)),
                        None => uncertain = true,
                    }
                    metrics::claim_failed(&self.shared.metrics, batch, &e);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stopped(stop) => return Err(uncertain),
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
}
