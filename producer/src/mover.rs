//! The batch protocol: moving keys from `keys` to `used_keys` and publishing
//! them to Kafka exactly once, without multi-document transactions.
//!
//! Handed-out keys that go round again (a consumer's unused keys, recycled
//! keys) are re-batched the same way, except that they never leave
//! `used_keys`: step 2 moves each key's document from its old batch to the
//! new one, and step 3 is skipped (see [`BatchRecord::from`]). `keys` is
//! therefore written only by generation (each key inserted once) and by the
//! first move of a key (deleted once).
//!
//! New keys are read by *window*: the documents of `keys` whose `n` lies in
//! the next `[from, to)` of generation positions, starting at the pool's
//! `moved_to` and ending at its cursor (an index range scan of `{n: 1}`
//! with nothing deleted in it, so no sort and no stepping over the index
//! entries of earlier batches; see [`BatchRecord::window`]).
//!
//! Steps, each idempotent and each preceded by a lease check:
//! 1. insert a [`BatchRecord`] `moving` with the keys, their `n`, their
//!    digest, the window and the pool incarnation (consumers verify every
//!    message against this record before claiming it, so nothing but this
//!    protocol can make a key reachable);
//! 2. insert a `UsedKeyDoc {reason: batch, batch: id}` per key (E11000 is
//!    fine if the existing document names this batch; if it names anything
//!    else, e.g. a reservation, the key is dropped from the batch);
//! 3. delete the window from `keys` with one range statement (a batch
//!    without a window: every key by exact `_id`), then raise the pool's
//!    `moved_to` to the window's end;
//! 4. set `moved` (with the final key list and its digest, if a key was
//!    dropped) — conditional on `{epoch, state}`;
//! 5. record the partition and its current end offset;
//! 6. publish in a Kafka transaction;
//! 7. set `published` with the batch's offset.
//!
//! Recovery adopts unfinished records of older epochs (conditional update of
//! their epoch, which fences the old leader's later record updates), redoes
//! steps 2–4 of a `moving` batch, and for a `moved` batch with a recorded
//! partition searches the topic from the recorded offset (read_committed,
//! after `init_transactions` aborted any open transaction of the old leader)
//! for a message with the batch's id *and* exactly its keys (anyone able to
//! write to the topic can forge the id), and publishes only if none is there.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use bson::doc;
use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use kgs_schemas::docs::{
    BatchRecord, BatchState, ClaimDoc, ClaimState, GenerationRange, KeyDoc, PoolDoc, UsedKeyDoc,
    UsedReason,
};
use kgs_schemas::{keys_digest, KeyBatch};

use crate::error::{Error, Result};
use crate::failpoint;
use crate::kafka::PoolKafka;
use crate::lease::LeaseGuard;
use crate::metrics::Metrics;
use crate::store::{
    by_id, delete_by_ids, insert_ignoring_duplicates, rebatch_used, PoolKeys, Store,
};

/// Concurrent `_id` reads when checking which keys a re-batch took.
const READ_BACKS: usize = 32;

/// [`Mover::next_n`] before the pool document was read.
const UNKNOWN: u64 = u64::MAX;

/// Moves and publishes the batches of one pool while this process leads.
#[derive(Debug)]
pub struct Mover<'a> {
    /// The database.
    pub store: &'a Store,
    /// The pool's key collections.
    pub pk: PoolKeys,
    /// Pool name.
    pub pool: &'a str,
    /// The pool's incarnation, carried by every batch record.
    pub incarnation: &'a str,
    /// Lease check before every step.
    pub guard: &'a LeaseGuard,
    /// The leader's Kafka clients.
    pub kafka: &'a PoolKafka,
    /// Metrics.
    pub metrics: &'a Metrics,
    /// The topic generation batches are published into now
    /// ([`kgs_schemas::docs::PoolDoc::topic_generation`]).
    pub topic_generation: AtomicU64,
    /// Per partition, the highest offset a batch of this generation is
    /// recorded at: a topic whose end is not past it has lost its batches
    /// (deleted and created again), see [`Mover::topic_recreated`].
    pub last_offsets: Mutex<HashMap<i32, i64>>,
    /// The next generation position a window of new keys starts at, as far
    /// as this leader knows ([`UNKNOWN`] until the pool document is read).
    pub next_n: AtomicU64,
    /// The pool's cursor as last read: windows end there (positions below
    /// it are fully generated).
    pub generated_to: AtomicU64,
}

impl<'a> Mover<'a> {
    /// The mover of pool `doc` for a leader of `guard`'s lease, publishing
    /// into topic generation `topic_generation`.
    pub fn new(
        store: &'a Store,
        doc: &'a PoolDoc,
        topic_generation: u64,
        guard: &'a LeaseGuard,
        kafka: &'a PoolKafka,
        metrics: &'a Metrics,
    ) -> Self {
        Self {
            store,
            pk: store.pool_keys(&doc.name),
            pool: &doc.name,
            incarnation: &doc.incarnation,
            guard,
            kafka,
            metrics,
            topic_generation: topic_generation.into(),
            last_offsets: Default::default(),
            next_n: UNKNOWN.into(),
            generated_to: 0.into(),
        }
    }
}

impl Mover<'_> {
    /// Moves the next window of new keys ([`Mover::move_new`]) and publishes
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
        let epoch = self.guard.check()?;
        let started = Instant::now();
        loop {
            let Some(window) = self.next_window(size).await? else {
                return Ok(None);
            };
            // An index range scan of `{n: 1}`: at most one document per
            // position, all in the first reply (no getMore round trips).
            let picked: Vec<KeyDoc> = self
                .pk
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
            .pk
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
        let epoch = self.guard.check()?;
        let started = Instant::now();
        let found: Vec<KeyDoc> = self
            .pk
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

    /// Step 1: a new `moving` record of this pool and epoch, inserted (the
    /// durable intent every later step and recovery works from).
    async fn start_record(
        &self,
        epoch: u64,
        keys: Vec<String>,
        ns: Vec<u64>,
        from: Option<String>,
        window: Option<GenerationRange>,
    ) -> Result<BatchRecord> {
        let record = BatchRecord {
            id: format!("{}-{}-{}", self.pool, epoch, uuid::Uuid::new_v4().simple()),
            pool: self.pool.to_owned(),
            incarnation: self.incarnation.to_owned(),
            epoch,
            state: BatchState::Moving,
            digest: keys_digest(&keys),
            keys,
            ns,
            partition: None,
            offset: None,
            topic_generation: self.topic_generation.load(Ordering::Acquire),
            from,
            window,
            created_at: Utc::now(),
        };
        self.guard.check()?;
        self.store
            .batches
            .insert_one(&record)
            .await
            .map_err(Error::store("insert batch record"))?;
        Ok(record)
    }

    /// Puts handed-out keys of batch `from` (returned unused, or recycled),
    /// with their `n`, into a new batch and publishes it to `partition`.
    /// The keys never leave `used_keys` (see [`BatchRecord::from`]): the
    /// record is inserted first (`moving`, with `from`), then each key's
    /// document moves from `from` to it, then it is `moved` with the keys
    /// whose document names it — a key that is no longer in `from` (taken
    /// by an earlier attempt, or changed meanwhile) leaves this batch. Every
    /// step is the ordinary move's, so recovery finishes a crashed one.
    /// Returns the keys the new batch took.
    pub async fn rebatch(
        &self,
        from: &str,
        keys: &[(String, u64)],
        partition: i32,
    ) -> Result<Vec<String>> {
        let epoch = self.guard.check()?;
        let started = Instant::now();
        let mut record = self
            .start_record(
                epoch,
                keys.iter().map(|(k, _)| k.clone()).collect(),
                keys.iter().map(|(_, n)| *n).collect(),
                Some(from.to_owned()),
                None,
            )
            .await?;
        failpoint::hit("rebatch_after_record");
        self.finish_move(&mut record).await?;
        self.metrics
            .batch_moved(&record.id, record.keys.len(), started.elapsed());
        if !record.keys.is_empty() {
            self.publish(&mut record, partition).await?;
        }
        Ok(record.keys)
    }

    /// Steps 2–4: idempotent, so recovery calls it again for a `moving` batch.
    async fn finish_move(&self, record: &mut BatchRecord) -> Result<()> {
        let foreign = match record.from.clone() {
            None => self.take_from_keys(record).await?,
            Some(from) => self.take_from_batch(record, &from).await?,
        };
        let dropped = !foreign.is_empty();
        for i in foreign.into_iter().rev() {
            record.keys.remove(i);
            record.ns.remove(i);
        }
        self.guard.check()?;
        failpoint::hit("checked_mark_moved");
        let done = if record.keys.is_empty() {
            BatchState::Published // nothing left to publish
        } else {
            BatchState::Moved
        };
        let mut set = doc! { "state": bson::to_bson(&done).expect("state serializes") };
        if dropped {
            // The keys were written at step 1; only a change is written again.
            record.digest = keys_digest(&record.keys);
            set.insert("digest", &record.digest);
            set.insert("keys", &record.keys);
            set.insert(
                "ns",
                record.ns.iter().map(|n| *n as i64).collect::<Vec<_>>(),
            );
        }
        let r = self
            .store
            .batches
            .update_one(
                doc! { "_id": &record.id, "epoch": record.epoch as i64, "state": "moving" },
                doc! { "$set": set },
            )
            .await
            .map_err(Error::store("mark batch moved"))?;
        if r.matched_count == 0 {
            self.already(record, done).await?;
        }
        record.state = done;
        failpoint::hit("move_after_moved");
        Ok(())
    }

    /// Steps 2–3 of a batch of new keys: into `used_keys`, out of `keys`.
    /// Returns the positions of keys that are used by something else.
    async fn take_from_keys(&self, record: &BatchRecord) -> Result<Vec<usize>> {
        self.guard.check()?;
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
        failpoint::hit("checked_delete_keys");
        // Every key leaves `keys`, the dropped ones too: they are used.
        match record.window {
            Some(window) => {
                // Everything in the window is in `used_keys` by now (see
                // `BatchRecord::window`): one range statement on `{n: 1}`.
                self.pk
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
                    self.pk.keys.name(),
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

    /// Step 2 of a re-batch: each key's `used_keys` document moves from
    /// batch `from` to this one. Returns the positions of keys whose
    /// document does not name this batch afterwards (read back only when
    /// fewer documents matched than there are keys: a retry, or a key that
    /// changed meanwhile).
    async fn take_from_batch(&self, record: &BatchRecord, from: &str) -> Result<Vec<usize>> {
        self.guard.check()?;
        failpoint::hit("checked_rebatch_used");
        let matched = rebatch_used(
            &self.store.db,
            self.pk.used.name(),
            &record.keys,
            from,
            &record.id,
        )
        .await?;
        failpoint::hit("rebatch_after_used");
        if matched as usize == record.keys.len() {
            return Ok(Vec::new());
        }
        let used = &self.pk.used;
        let id = record.id.as_str();
        let foreign: Vec<usize> = futures::stream::iter(record.keys.iter().enumerate())
            .map(|(i, key)| async move {
                let doc = used
                    .find_one(by_id(key))
                    .await
                    .map_err(Error::store("read used key"))?;
                let ours = doc.is_some_and(|u| u.batch.as_deref() == Some(id));
                if !ours {
                    tracing::warn!(batch = %id, key = %key, from, "key no longer in its batch; dropped from the re-batch");
                }
                Ok::<_, Error>((!ours).then_some(i))
            })
            .buffered(READ_BACKS)
            .try_filter_map(|i| async move { Ok(i) })
            .try_collect()
            .await?;
        Ok(foreign)
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

    /// Loads [`Mover::last_offsets`] from the batch records of the current
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
                    "pool": self.pool, "partition": p, "state": "published",
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
        let epoch = self.guard.check()?;
        self.topic_generation.store(generation, Ordering::Release);
        self.last_offsets.lock().expect("not poisoned").clear();
        let old: Vec<BatchRecord> = self
            .store
            .batches
            .find(doc! {
                "pool": self.pool, "state": "published",
                "topic_generation": { "$lt": generation as i64 },
            })
            .await
            .map_err(Error::store("find batches of the old topic"))?
            .try_collect()
            .await
            .map_err(Error::store("find batches of the old topic"))?;
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
            self.guard.check()?;
            let r = self
                .store
                .batches
                .update_one(
                    doc! { "_id": &record.id, "state": "published", "epoch": record.epoch as i64 },
                    doc! { "$set": { "state": "moved", "epoch": epoch as i64, "offset": null } },
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

    /// After a conditional update of `record` to `state` matched nothing:
    /// fine if the record already is in `state` at our epoch (the server had
    /// applied the update, and the driver retried it after losing the
    /// reply), else another leader changed it: [`Error::LeaseLost`].
    async fn already(&self, record: &BatchRecord, state: BatchState) -> Result<()> {
        let now = self
            .store
            .batches
            .find_one(by_id(&record.id))
            .await
            .map_err(Error::store("re-read batch record"))?;
        match now {
            Some(r) if r.epoch == record.epoch && r.state == state => Ok(()),
            _ => Err(Error::LeaseLost(self.pool.to_owned())),
        }
    }

    /// Finishes every unfinished batch of the pool; `partition` is where a
    /// batch that never got one is published. Returns how many were finished.
    ///
    /// A batch that fails (other than by losing the lease) is logged and
    /// counted, and the others are still finished: one record that cannot
    /// be published never blocks the pool. It is tried again at the next
    /// recovery pass.
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
        for record in unfinished {
            if record.epoch > epoch {
                // A newer leader exists: this process must stop.
                return Err(Error::LeaseLost(self.pool.to_owned()));
            }
            let id = record.id.clone();
            match self.recover_one(record, epoch, partition).await {
                Ok(true) => finished += 1,
                Ok(false) => {}
                Err(e @ (Error::LeaseLost(_) | Error::Fenced(_))) => return Err(e),
                Err(e) => {
                    self.metrics.error(&e, "recovering a batch");
                    tracing::warn!(batch = %id, "batch not recovered this pass; the others go on, it is retried at the next pass");
                }
            }
        }
        Ok(finished)
    }

    /// Recovers one unfinished record (see [`Mover::recover`]); `false` if
    /// it changed meanwhile and the next pass sees it.
    async fn recover_one(
        &self,
        mut record: BatchRecord,
        epoch: u64,
        partition: i32,
    ) -> Result<bool> {
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
                return Ok(false); // changed meanwhile; the next pass sees it
            }
            record.epoch = epoch;
        }
        tracing::info!(batch = %record.id, state = ?record.state, "recovering batch");
        if record.state == BatchState::Moving {
            self.finish_move(&mut record).await?;
        }
        if record.state == BatchState::Moved {
            match (record.partition, record.offset) {
                (Some(p), Some(from)) => match self.kafka.find_batch(p, from, &record).await? {
                    Some(offset) => {
                        tracing::info!(batch = %record.id, partition = p, offset, "batch already in the topic");
                        self.mark_published(&mut record, p, offset).await?;
                    }
                    None => self.publish(&mut record, p).await?,
                },
                _ => self.publish(&mut record, partition).await?,
            }
        }
        self.metrics.batches_recovered.inc();
        Ok(true)
    }

    /// Hands the unused keys of consumers' `returning` claims out again: in
    /// new batches of at most `size` keys ([`Mover::rebatch`], published
    /// from `partition` on, one partition after the other), then the claim
    /// becomes `returned`. A crash in between is harmless: a key already
    /// re-batched is no longer in the claim's batch, so the next pass leaves
    /// it where it is. Returns the number of keys re-batched.
    pub async fn process_returns(&self, size: usize, partition: i32) -> Result<u64> {
        self.guard.check()?;
        let mut rotate = 0;
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
                .map_err(Error::store("read batch of claim"))?;
            // A claim names a batch of this pool only if the record agrees;
            // anything else (a forged claim, another incarnation's) is set
            // aside so that it never blocks the returns and batches after it.
            let mismatch = match &record {
                None => Some("no batch record".to_owned()),
                Some(r) if r.pool != self.pool => {
                    Some(format!("batch record of pool {:?}", r.pool))
                }
                Some(r) if r.incarnation != self.incarnation => {
                    Some(format!("batch record of incarnation {:?}", r.incarnation))
                }
                Some(_) => None,
            };
            let record = match (record, mismatch) {
                (Some(record), None) => record,
                (_, reason) => {
                    let reason = reason.unwrap_or_default();
                    self.guard.check()?;
                    self.store
                        .claims
                        .update_one(
                            doc! { "_id": &claim.batch_id, "state": "returning" },
                            doc! { "$set": {
                                "state": bson::to_bson(&ClaimState::Rejected).expect("serializes"),
                                "reason": &reason,
                            } },
                        )
                        .await
                        .map_err(Error::store("set claim aside"))?;
                    self.metrics.claim_rejected(&claim.batch_id, &reason);
                    continue;
                }
            };
            // The batch's keys the claim gives back, in the batch's order.
            let wanted: HashSet<&str> = claim.return_keys.iter().map(String::as_str).collect();
            let back: Vec<(String, u64)> = record
                .keys
                .iter()
                .zip(&record.ns)
                .filter(|(k, _)| wanted.contains(k.as_str()))
                .map(|(k, n)| (k.clone(), *n))
                .collect();
            if back.len() < wanted.len() {
                tracing::warn!(batch = %claim.batch_id, ignored = wanted.len() - back.len(), "returned keys that are not in the batch are ignored");
            }
            for chunk in back.chunks(size.max(1)) {
                let to = (partition + rotate) % self.kafka.partitions();
                rotate += 1;
                returned += self.rebatch(&claim.batch_id, chunk, to).await?.len() as u64;
            }
            failpoint::hit("return_after_rebatch");
            self.guard.check()?;
            failpoint::hit("checked_claim_returned");
            self.store
                .claims
                .update_one(
                    doc! { "_id": &claim.batch_id, "state": "returning" },
                    doc! { "$set": { "state": bson::to_bson(&ClaimState::Returned).expect("serializes") } },
                )
                .await
                .map_err(Error::store("mark claim returned"))?;
            tracing::info!(batch = %claim.batch_id, keys = back.len(), "returned keys handed out again in new batches");
        }
        self.metrics.keys_returned.inc_by(returned);
        Ok(returned)
    }
}
