//! Publishing a moved batch (steps 5–7 of the protocol in [`super`]), the
//! offsets each partition has reached, and what follows a topic that was
//! deleted and created again.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bson::doc;
use kgs_schemas::docs::{BatchRecord, BatchState};
use kgs_schemas::KeyBatch;

use super::Writer;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::store::{by_id, find_all};

impl Writer<'_> {
    /// Steps 5–7 for a `moved` batch.
    pub(super) async fn publish(&self, record: &mut BatchRecord, partition: i32) -> Result<()> {
        self.lease.check()?;
        let started = Instant::now();
        let end = self.kafka.end_offset(partition).await?;
        self.lease.check()?;
        let r = self
            .store
            .batches
            .update_one(
                doc! { "_id": &record.id, "epoch": record.epoch as i64, "state": BatchState::Moved },
                doc! { "$set": {
                    "partition": partition,
                    "offset": end,
                    "topic_generation": self.topic_generation.load(Ordering::Acquire) as i64,
                } },
            )
            .await
            .map_err(Error::store("record publish offset"))?;
        if r.matched_count == 0 {
            return Err(Error::LeaseLost(self.pool.to_owned()));
        }
        record.partition = Some(partition);
        record.offset = Some(end);
        failpoint::hit("publish_after_offset");
        self.lease.check()?;
        let batch = KeyBatch::new(
            record.id.clone(),
            record.pool.clone(),
            record.epoch,
            record.keys.clone(),
        );
        let offset = self.kafka.publish(partition, &batch).await?;
        self.mark_published(record, partition, offset).await?;
        self.metrics.batch_published(
            &record.id,
            record.keys.len(),
            partition,
            offset,
            started.elapsed(),
        );
        Ok(())
    }

    pub(super) async fn mark_published(
        &self,
        record: &mut BatchRecord,
        partition: i32,
        offset: i64,
    ) -> Result<()> {
        // Not guarded by the local lease check: the batch *is* in the topic,
        // and the epoch condition still stops a fenced leader.
        let r = self
            .store
            .batches
            .update_one(
                doc! { "_id": &record.id, "epoch": record.epoch as i64, "state": BatchState::Moved },
                doc! { "$set": { "state": BatchState::Published, "partition": partition, "offset": offset } },
            )
            .await
            .map_err(Error::store("mark batch published"))?;
        if r.matched_count == 0 {
            self.already(record, BatchState::Published).await?;
        }
        record.state = BatchState::Published;
        record.offset = Some(offset);
        let mut last = self.last_offsets.lock().expect("not poisoned");
        let at = last.entry(partition).or_insert(offset);
        *at = (*at).max(offset);
        drop(last);
        failpoint::hit("publish_after_record");
        Ok(())
    }

    /// Loads [`Writer::last_offsets`] from the batch records of the current
    /// generation (one indexed, sorted read per partition), at the start of
    /// a leadership.
    pub async fn load_last_offsets(&self) -> Result<()> {
        let generation = self.topic_generation.load(Ordering::Acquire) as i64;
        let mut last = HashMap::new();
        for p in 0..self.kafka.partitions() {
            let newest = self
                .store
                .batches
                .find_one(doc! {
                    "pool": self.pool, "partition": p, "state": BatchState::Published,
                    "topic_generation": generation,
                })
                .sort(doc! { "offset": -1 })
                .await
                .map_err(Error::store("read the newest batch record"))?;
            if let Some(offset) = newest.and_then(|r| r.offset) {
                last.insert(p, offset);
            }
        }
        *self.last_offsets.lock().expect("not poisoned") = last;
        Ok(())
    }

    /// Whether the topic lost batches this generation published: some
    /// partition ends at or before the offset of a batch recorded in it.
    /// Kafka offsets only grow and the topic keeps every batch (unlimited
    /// retention), so that happens only when the topic was deleted and
    /// created again (an operator following the `topic` error's advice, or
    /// a broker's auto-creation).
    pub async fn topic_recreated(&self) -> Result<bool> {
        let last = self.last_offsets.lock().expect("not poisoned").clone();
        for (partition, offset) in last {
            if self.kafka.end_offset(partition).await? <= offset {
                tracing::warn!(
                    partition,
                    recorded = offset,
                    "the topic ends before a batch published into it: it was re-created"
                );
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// After the topic was re-created: starts generation `generation` and
    /// publishes again, into the new topic, every batch of an earlier
    /// generation that no consumer claimed (its message went with the old
    /// topic). Each goes back to `moved` at this epoch first, so a crash
    /// part-way is finished by recovery. A batch claimed meanwhile from a
    /// message read before the deletion is a replay on the consumers' side:
    /// never handed out twice. Returns how many were published again.
    pub async fn republish_unclaimed(&self, generation: u64, partition: i32) -> Result<u64> {
        let epoch = self.lease.check()?;
        self.topic_generation.store(generation, Ordering::Release);
        self.last_offsets.lock().expect("not poisoned").clear();
        let old: Vec<BatchRecord> = find_all(
            &self.store.batches,
            doc! {
                "pool": self.pool, "state": BatchState::Published,
                "topic_generation": { "$lt": generation as i64 },
            },
            "find batches of the old topic",
        )
        .await?;
        let mut republished = 0;
        for mut record in old {
            if record.keys.is_empty() {
                continue;
            }
            let claimed = self
                .store
                .claims
                .find_one(by_id(&record.id))
                .await
                .map_err(Error::store("read claim"))?;
            if claimed.is_some() {
                continue;
            }
            self.lease.check()?;
            let r = self
                .store
                .batches
                .update_one(
                    doc! { "_id": &record.id, "state": BatchState::Published, "epoch": record.epoch as i64 },
                    doc! { "$set": { "state": BatchState::Moved, "epoch": epoch as i64, "offset": null } },
                )
                .await
                .map_err(Error::store("re-open a batch of the old topic"))?;
            if r.matched_count == 0 {
                continue; // changed meanwhile; recovery sees it
            }
            record.state = BatchState::Moved;
            record.epoch = epoch;
            record.offset = None;
            let to = record.partition.unwrap_or(partition);
            self.publish(&mut record, to).await?;
            republished += 1;
        }
        Ok(republished)
    }
}
