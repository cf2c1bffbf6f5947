//! Moving new keys: a window of generation positions out of `keys` into
//! `used_keys` as one batch record (steps 1–4 of the protocol in
//! [`super`]), pipelined with the publish of the batch before; and the
//! sweep that takes keys found below the window out again.

use std::sync::atomic::Ordering;
use std::time::Instant;

use bson::doc;
use chrono::Utc;
use futures::TryStreamExt;
use kgs_schemas::docs::{BatchRecord, GenerationRange, KeyDoc, UsedKeyDoc, UsedReason};

use super::{Writer, UNKNOWN};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::store::{by_id, delete_by_ids, insert_ignoring_duplicates};

impl Writer<'_> {
    /// Moves the next window of new keys ([`Writer::move_new`]) and publishes
    /// them to `partition`. Returns `false` if no generated key is left.
    pub async fn next_batch(&self, size: usize, partition: i32) -> Result<bool> {
        match self.move_new(size).await? {
            None => Ok(false),
            Some(mut record) => {
                if !record.keys.is_empty() {
                    self.publish(&mut record, partition).await?;
                }
                Ok(true)
            }
        }
    }

    /// Moves and publishes up to one batch of `size` new keys per entry of
    /// `partitions` (published there, in that order) and returns how many
    /// batches it moved and how many keys they hold; fewer if the generated
    /// keys run out or `budget` passes.
    ///
    /// Each move (database only) runs while the batch before it is being
    /// published (Kafka, then one record update), so a batch costs about
    /// the longer of the two instead of their sum. Moves stay one after the
    /// other (each window starts where the last one ended), and so do
    /// publishes (one transaction at a time). A failure leaves at most the
    /// batch in flight `moved` and the next one `moving`: recovery finishes
    /// both, as after a crash.
    pub async fn fill(
        &self,
        size: usize,
        partitions: &[i32],
        budget: std::time::Duration,
    ) -> Result<(usize, u64)> {
        let started = Instant::now();
        let (mut moved, mut keys) = (0, 0);
        let mut in_flight: Option<(BatchRecord, i32)> = None;
        for &partition in partitions {
            if started.elapsed() >= budget {
                break;
            }
            let publish = async {
                match in_flight.take() {
                    Some((mut record, p)) => self.publish(&mut record, p).await,
                    None => Ok(()),
                }
            };
            let (next, published) = tokio::join!(self.move_new(size), publish);
            published?;
            match next? {
                None => break,
                Some(record) => {
                    moved += 1;
                    keys += record.keys.len() as u64;
                    if !record.keys.is_empty() {
                        in_flight = Some((record, partition));
                    }
                }
            }
        }
        if let Some((mut record, p)) = in_flight {
            self.publish(&mut record, p).await?;
        }
        Ok((moved, keys))
    }

    /// Steps 1–4 for a batch of new keys: the documents of `keys` in the
    /// next window of at most `size` generation positions. `None` if no
    /// generated key is left; the caller publishes the record.
    pub async fn move_new(&self, size: usize) -> Result<Option<BatchRecord>> {
        let epoch = self.lease.check()?;
        let started = Instant::now();
        loop {
            let Some(window) = self.next_window(size).await? else {
                return Ok(None);
            };
            // An index range scan of `{n: 1}`: at most one document per
            // position, all in the first reply (no getMore round trips).
            let picked: Vec<KeyDoc> = self
                .colls
                .keys
                .find(doc! { "n": { "$gte": window.from as i64, "$lt": window.to as i64 } })
                .batch_size(size as u32 + 1)
                .await
                .map_err(Error::store("pick keys"))?
                .try_collect()
                .await
                .map_err(Error::store("pick keys"))?;
            if picked.is_empty() {
                // Every key of the window left `keys` already: reserved, or
                // moved by a batch that crashed before raising `moved_to`.
                self.next_n.store(window.to, Ordering::Release);
                continue;
            }
            tracing::trace!(
                pick_ms = started.elapsed().as_millis() as u64,
                from = window.from,
                to = window.to,
                "keys picked"
            );
            let record = self
                .move_found(epoch, picked, Some(window), started)
                .await?;
            self.next_n.store(window.to, Ordering::Release);
            return Ok(Some(record));
        }
    }

    /// The next window of at most `size` positions, below the cursor.
    async fn next_window(&self, size: usize) -> Result<Option<GenerationRange>> {
        let mut from = self.next_n.load(Ordering::Acquire);
        let mut end = self.generated_to.load(Ordering::Acquire);
        if from == UNKNOWN || from >= end {
            let doc = self.store.pool(self.pool).await?;
            end = doc.cursor;
            self.generated_to.store(end, Ordering::Release);
            if from == UNKNOWN {
                from = match doc.moved_to {
                    Some(m) => m,
                    None => self.smallest_n(end).await?,
                };
                self.next_n.store(from, Ordering::Release);
            }
            if from >= end {
                return Ok(None);
            }
        }
        Ok(Some(GenerationRange {
            from,
            to: from.saturating_add(size as u64).min(end),
        }))
    }

    /// The smallest `n` in `keys` (or `end` if it is empty), for a pool made
    /// before `moved_to` existed: read once per leadership, then recorded.
    async fn smallest_n(&self, end: u64) -> Result<u64> {
        let first = self
            .colls
            .keys
            .find_one(doc! {})
            .sort(doc! { "n": 1 })
            .await
            .map_err(Error::store("find the first unused key"))?;
        Ok(first.map_or(end, |k| k.n))
    }

    /// Finds keys in `keys` below the window (positions that every earlier
    /// batch has passed) and moves them as one batch deleted by `_id`,
    /// published to `partition`. Such a document is a key written back by a
    /// stale generator after it was moved (its `used_keys` document wins:
    /// it is dropped from the batch and deleted from `keys`), or an unused
    /// key put back by an older version of kgs (handed out normally).
    /// Goes on, `size` documents per batch, until a batch finds fewer.
    /// Returns how many documents it found.
    pub async fn sweep(&self, size: usize, partition: i32) -> Result<usize> {
        let mut found = 0;
        loop {
            let n = self.sweep_once(size, partition).await?;
            found += n;
            if n < size {
                return Ok(found);
            }
        }
    }

    async fn sweep_once(&self, size: usize, partition: i32) -> Result<usize> {
        let below = self.next_n.load(Ordering::Acquire);
        if below == UNKNOWN {
            return Ok(0);
        }
        let epoch = self.lease.check()?;
        let started = Instant::now();
        let found: Vec<KeyDoc> = self
            .colls
            .keys
            .find(doc! { "n": { "$lt": below as i64 } })
            .limit(size as i64)
            .batch_size(size as u32)
            .await
            .map_err(Error::store("sweep keys"))?
            .try_collect()
            .await
            .map_err(Error::store("sweep keys"))?;
        if found.is_empty() {
            return Ok(0);
        }
        let count = found.len();
        tracing::warn!(
            pool = self.pool,
            found = count,
            below,
            "keys found below the batch window; moving them by id"
        );
        let mut record = self.move_found(epoch, found, None, started).await?;
        if !record.keys.is_empty() {
            self.publish(&mut record, partition).await?;
        }
        Ok(count)
    }

    /// Steps 1–4 for documents `found` in `keys` (a window's, or the
    /// sweep's), in `n` order; `started` is when their move began.
    async fn move_found(
        &self,
        epoch: u64,
        mut found: Vec<KeyDoc>,
        window: Option<GenerationRange>,
        started: Instant,
    ) -> Result<BatchRecord> {
        found.sort_unstable_by_key(|k| k.n);
        let (keys, ns) = found.into_iter().map(|k| (k.key, k.n)).unzip();
        let mut record = self.start_record(epoch, keys, ns, None, window).await?;
        failpoint::hit("move_after_record");
        self.finish_move(&mut record).await?;
        self.metrics
            .batch_moved(&record.id, record.keys.len(), started.elapsed());
        Ok(record)
    }

    /// Steps 2–3 of a batch of new keys: into `used_keys`, out of `keys`.
    /// Returns the positions of keys that are used by something else.
    pub(super) async fn take_from_keys(&self, record: &BatchRecord) -> Result<Vec<usize>> {
        self.lease.check()?;
        failpoint::hit("checked_insert_used");
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
        let outcome =
            insert_ignoring_duplicates(&self.colls.used, &used, "insert used keys").await?;
        // A duplicate is a retry of this batch, or a key taken by something
        // else (a reservation): `used_keys` wins, the key leaves this batch.
        let mut foreign = Vec::new();
        for i in outcome.duplicates {
            let key = &record.keys[i];
            let existing = self
                .colls
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
        self.lease.check()?;
        failpoint::hit("checked_delete_keys");
        // Every key leaves `keys`, the dropped ones too: they are used.
        match record.window {
            Some(window) => {
                // Everything in the window is in `used_keys` by now (see
                // `BatchRecord::window`): one range statement on `{n: 1}`.
                self.colls
                    .keys
                    .delete_many(doc! {
                        "n": { "$gte": window.from as i64, "$lt": window.to as i64 },
                    })
                    .await
                    .map_err(Error::store("delete moved keys"))?;
                failpoint::hit("move_after_delete");
                // After the delete, never before: `moved_to` must not pass a
                // key still in `keys`. `$max`: a late or repeated write (a
                // recovery of an older window, a stale leader) never lowers it.
                self.store
                    .pools
                    .update_one(
                        doc! { "_id": self.pool },
                        doc! { "$max": { "moved_to": window.to as i64 } },
                    )
                    .await
                    .map_err(Error::store("record moved_to"))?;
            }
            None => {
                delete_by_ids(
                    &self.store.db,
                    self.colls.keys.name(),
                    &record.keys,
                    "delete moved keys",
                )
                .await?;
                failpoint::hit("move_after_delete");
            }
        }
        tracing::trace!(at_ms = started.elapsed().as_millis() as u64, "keys deleted");
        Ok(foreign)
    }
}
