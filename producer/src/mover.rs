//! The batch protocol: moving keys from `keys` to `used_keys` and publishing
//! them to Kafka exactly once, without multi-document transactions.
//!
//! Steps, each idempotent and each preceded by a lease check:
//! 1. insert a [`BatchRecord`] `moving` with the keys and their `n`;
//! 2. insert a `UsedKeyDoc {reason: batch, batch: id}` per key (E11000 is
//!    fine if the existing document names this batch; if it names anything
//!    else, e.g. a reservation, the key is dropped from the batch);
//! 3. delete every key from `keys` by exact `_id`;
//! 4. set `moved` (with the final key list) — conditional on `{epoch, state}`;
//! 5. record the partition and its current end offset;
//! 6. publish in a Kafka transaction;
//! 7. set `published` with the batch's offset.
//!
//! Recovery adopts unfinished records of older epochs (conditional update of
//! their epoch, which fences the old leader's later record updates), redoes
//! steps 2–4 of a `moving` batch, and for a `moved` batch with a recorded
//! partition searches the topic from the recorded offset (read_committed,
//! after `init_transactions` aborted any open transaction of the old leader)
//! and publishes only if the batch is absent.

use std::time::Instant;

use bson::doc;
use chrono::Utc;
use futures::TryStreamExt;
use kgs_schemas::docs::{
    BatchRecord, BatchState, ClaimDoc, ClaimState, KeyDoc, UsedKeyDoc, UsedReason,
};
use kgs_schemas::KeyBatch;

use crate::error::{Error, Result};
use crate::failpoint;
use crate::kafka::PoolKafka;
use crate::lease::LeaseGuard;
use crate::metrics::Metrics;
use crate::store::{
    by_id, delete_by_ids, insert_ignoring_duplicates, is_duplicate, PoolKeys, Store,
};

/// Moves and publishes the batches of one pool while this process leads.
#[derive(Debug)]
pub struct Mover<'a> {
    /// The database.
    pub store: &'a Store,
    /// The pool's key collections.
    pub pk: PoolKeys,
    /// Pool name.
    pub pool: &'a str,
    /// Lease check before every step.
    pub guard: &'a LeaseGuard,
    /// The leader's Kafka clients.
    pub kafka: &'a PoolKafka,
    /// Metrics.
    pub metrics: &'a Metrics,
}

impl Mover<'_> {
    /// Takes the next `size` keys (smallest `n`), moves them and publishes
    /// them to `partition`. Returns `false` if `keys` is empty.
    pub async fn next_batch(&self, size: usize, partition: i32) -> Result<bool> {
        let epoch = self.guard.check()?;
        let started = Instant::now();
        // An index scan of `{n: 1}` on MongoDB: no sort in memory.
        let picked: Vec<KeyDoc> = self
            .pk
            .keys
            .find(doc! {})
            .sort(doc! { "n": 1 })
            .limit(size as i64)
            // All in the first reply: no getMore round trips (a server that
            // re-runs the query per getMore would pay for each).
            .batch_size(size as u32)
            .await
            .map_err(Error::store("pick keys"))?
            .try_collect()
            .await
            .map_err(Error::store("pick keys"))?;
        if picked.is_empty() {
            return Ok(false);
        }
        tracing::trace!(
            pick_ms = started.elapsed().as_millis() as u64,
            "keys picked"
        );
        let mut record = BatchRecord {
            id: format!("{}-{}-{}", self.pool, epoch, uuid::Uuid::new_v4().simple()),
            pool: self.pool.to_owned(),
            epoch,
            state: BatchState::Moving,
            keys: picked.iter().map(|k| k.key.clone()).collect(),
            ns: picked.iter().map(|k| k.n).collect(),
            partition: None,
            offset: None,
            created_at: Utc::now(),
        };
        self.guard.check()?;
        self.store
            .batches
            .insert_one(&record)
            .await
            .map_err(Error::store("insert batch record"))?;
        tracing::trace!(
            at_ms = started.elapsed().as_millis() as u64,
            "record inserted"
        );
        failpoint::hit("move_after_record");
        self.finish_move(&mut record).await?;
        self.metrics
            .batch_moved(&record.id, record.keys.len(), started.elapsed());
        if !record.keys.is_empty() {
            self.publish(&mut record, partition).await?;
        }
        Ok(true)
    }

    /// Steps 2–4: idempotent, so recovery calls it again for a `moving` batch.
    async fn finish_move(&self, record: &mut BatchRecord) -> Result<()> {
        self.guard.check()?;
        let started = Instant::now();
        let at = Utc::now();
        let used: Vec<UsedKeyDoc> = record
            .keys
            .iter()
            .zip(&record.ns)
            .map(|(key, n)| UsedKeyDoc {
                key: key.clone(),
                n: *n,
                reason: UsedReason::Batch,
                batch: Some(record.id.clone()),
                at,
            })
            .collect();
        let outcome = insert_ignoring_duplicates(&self.pk.used, &used, "insert used keys").await?;
        // A duplicate is a retry of this batch, or a key taken by something
        // else (a reservation): `used_keys` wins, the key leaves this batch.
        let mut foreign = Vec::new();
        for i in outcome.duplicates {
            let key = &record.keys[i];
            let existing = self
                .pk
                .used
                .find_one(by_id(key))
                .await
                .map_err(Error::store("read used key"))?;
            if existing.and_then(|u| u.batch).as_deref() != Some(record.id.as_str()) {
                tracing::warn!(batch = %record.id, key = %key, "key already used elsewhere; dropped from batch");
                foreign.push(i);
            }
        }
        tracing::trace!(
            at_ms = started.elapsed().as_millis() as u64,
            "used keys inserted"
        );
        failpoint::hit("move_after_used");
        self.guard.check()?;
        // Every key leaves `keys`, the dropped ones too: they are used.
        delete_by_ids(
            &self.store.db,
            self.pk.keys.name(),
            &record.keys,
            "delete moved keys",
        )
        .await?;
        tracing::trace!(at_ms = started.elapsed().as_millis() as u64, "keys deleted");
        failpoint::hit("move_after_delete");
        for i in foreign.into_iter().rev() {
            record.keys.remove(i);
            record.ns.remove(i);
        }
        self.guard.check()?;
        let done = if record.keys.is_empty() {
            BatchState::Published // nothing left to publish
        } else {
            BatchState::Moved
        };
        let r = self
            .store
            .batches
            .update_one(
                doc! { "_id": &record.id, "epoch": record.epoch as i64, "state": "moving" },
                doc! { "$set": {
                    "state": bson::to_bson(&done).expect("state serializes"),
                    "keys": &record.keys,
                    "ns": record.ns.iter().map(|n| *n as i64).collect::<Vec<_>>(),
                } },
            )
            .await
            .map_err(Error::store("mark batch moved"))?;
        if r.matched_count == 0 {
            return Err(Error::LeaseLost(self.pool.to_owned()));
        }
        record.state = done;
        failpoint::hit("move_after_moved");
        Ok(())
    }

    /// Steps 5–7 for a `moved` batch.
    async fn publish(&self, record: &mut BatchRecord, partition: i32) -> Result<()> {
        self.guard.check()?;
        let started = Instant::now();
        let end = self.kafka.end_offset(partition).await?;
        self.guard.check()?;
        let r = self
            .store
            .batches
            .update_one(
                doc! { "_id": &record.id, "epoch": record.epoch as i64, "state": "moved" },
                doc! { "$set": { "partition": partition, "offset": end } },
            )
            .await
            .map_err(Error::store("record publish offset"))?;
        if r.matched_count == 0 {
            return Err(Error::LeaseLost(self.pool.to_owned()));
        }
        record.partition = Some(partition);
        record.offset = Some(end);
        failpoint::hit("publish_after_offset");
        self.guard.check()?;
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

    async fn mark_published(
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
                doc! { "_id": &record.id, "epoch": record.epoch as i64, "state": "moved" },
                doc! { "$set": { "state": "published", "partition": partition, "offset": offset } },
            )
            .await
            .map_err(Error::store("mark batch published"))?;
        if r.matched_count == 0 {
            return Err(Error::LeaseLost(self.pool.to_owned()));
        }
        record.state = BatchState::Published;
        record.offset = Some(offset);
        failpoint::hit("publish_after_record");
        Ok(())
    }

    /// Finishes every unfinished batch of the pool; `partition` is where a
    /// batch that never got one is published. Returns how many were finished.
    pub async fn recover(&self, partition: i32) -> Result<u64> {
        let epoch = self.guard.check()?;
        let unfinished: Vec<BatchRecord> = self
            .store
            .batches
            .find(doc! { "pool": self.pool, "state": { "$in": ["moving", "moved"] } })
            .await
            .map_err(Error::store("find unfinished batches"))?
            .try_collect()
            .await
            .map_err(Error::store("find unfinished batches"))?;
        let mut finished = 0;
        for mut record in unfinished {
            if record.epoch > epoch {
                // A newer leader exists: this process must stop.
                return Err(Error::LeaseLost(self.pool.to_owned()));
            }
            if record.epoch < epoch {
                self.guard.check()?;
                let adopted = self
                    .store
                    .batches
                    .update_one(
                        doc! { "_id": &record.id, "epoch": record.epoch as i64 },
                        doc! { "$set": { "epoch": epoch as i64 } },
                    )
                    .await
                    .map_err(Error::store("adopt batch"))?;
                if adopted.matched_count == 0 {
                    continue; // changed meanwhile; the next pass sees it
                }
                record.epoch = epoch;
            }
            tracing::info!(batch = %record.id, state = ?record.state, "recovering batch");
            if record.state == BatchState::Moving {
                self.finish_move(&mut record).await?;
            }
            if record.state == BatchState::Moved {
                match (record.partition, record.offset) {
                    (Some(p), Some(from)) => {
                        match self.kafka.find_batch(p, from, &record.id).await? {
                            Some(offset) => {
                                tracing::info!(batch = %record.id, partition = p, offset, "batch already in the topic");
                                self.mark_published(&mut record, p, offset).await?;
                            }
                            None => self.publish(&mut record, p).await?,
                        }
                    }
                    _ => self.publish(&mut record, partition).await?,
                }
            }
            self.metrics.batches_recovered.inc();
            finished += 1;
        }
        Ok(finished)
    }

    /// Puts the unused keys of consumers' `returning` claims back into
    /// `keys`. Per key: delete `{_id: key, batch: claim}` from `used_keys`,
    /// then insert the key with its old `n` (E11000 is fine). A key whose
    /// used document belongs to something else is left alone. Finally the
    /// claim becomes `returned`. Returns the number of keys put back.
    pub async fn process_returns(&self) -> Result<u64> {
        self.guard.check()?;
        let claims: Vec<ClaimDoc> = self
            .store
            .claims
            .find(doc! { "pool": self.pool, "state": "returning" })
            .await
            .map_err(Error::store("find returning claims"))?
            .try_collect()
            .await
            .map_err(Error::store("find returning claims"))?;
        let mut returned = 0;
        for claim in claims {
            let record = self
                .store
                .batches
                .find_one(by_id(&claim.batch_id))
                .await
                .map_err(Error::store("read batch of claim"))?
                .ok_or_else(|| {
                    Error::Corrupt(format!("claim {} has no batch record", claim.batch_id))
                })?;
            for key in &claim.return_keys {
                let Some(pos) = record.keys.iter().position(|k| k == key) else {
                    tracing::warn!(batch = %claim.batch_id, key = %key, "returned key is not in its batch; ignored");
                    continue;
                };
                self.guard.check()?;
                let deleted = self
                    .pk
                    .used
                    .delete_one(doc! { "_id": key, "batch": &claim.batch_id })
                    .await
                    .map_err(Error::store("delete returned key from used_keys"))?;
                failpoint::hit("return_after_delete");
                if deleted.deleted_count == 0 {
                    // Deleted before a crash, or never ours: put it back only
                    // if no one uses it now.
                    let used = self
                        .pk
                        .used
                        .find_one(by_id(key))
                        .await
                        .map_err(Error::store("read used key"))?;
                    if used.is_some() {
                        continue;
                    }
                }
                let doc = KeyDoc {
                    key: key.clone(),
                    n: record.ns[pos],
                };
                match self.pk.keys.insert_one(&doc).await {
                    Ok(_) => returned += 1,
                    Err(e) if is_duplicate(&e) => {}
                    Err(e) => return Err(Error::store("put returned key back")(e)),
                }
                failpoint::hit("return_after_insert");
            }
            self.guard.check()?;
            self.store
                .claims
                .update_one(
                    doc! { "_id": &claim.batch_id, "state": "returning" },
                    doc! { "$set": { "state": bson::to_bson(&ClaimState::Returned).expect("serializes") } },
                )
                .await
                .map_err(Error::store("mark claim returned"))?;
            tracing::info!(batch = %claim.batch_id, keys = claim.return_keys.len(), "returned keys put back");
        }
        self.metrics.keys_returned.inc_by(returned);
        Ok(returned)
    }
}
