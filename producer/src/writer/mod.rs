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

pub mod batch;
pub mod blocked;
pub mod generate;
pub mod publish;
pub mod put_back;
pub mod recover;
pub mod recycles;
pub mod returns;
pub mod vanity;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bson::doc;
use chrono::Utc;
use kgs_schemas::docs::{BatchRecord, BatchState, GenerationRange, PoolDoc};
use kgs_schemas::keys_digest;

use crate::error::{Error, Result};
use crate::failpoint;
use crate::kafka::PoolKafka;
use crate::leader::lease::LeaseCheck;
use crate::metrics::Metrics;
use crate::store::{by_id, KeyCollections, Store};

/// Concurrent `_id` reads when checking which keys a re-batch took.
const READ_BACKS: usize = 32;

/// [`Writer::next_n`] before the pool document was read.
const UNKNOWN: u64 = u64::MAX;

/// Moves and publishes the batches of one pool while this process leads.
#[derive(Debug)]
pub struct Writer<'a> {
    /// The database.
    pub store: &'a Store,
    /// The pool's key collections.
    pub colls: KeyCollections,
    /// Pool name.
    pub pool: &'a str,
    /// The pool's incarnation, carried by every batch record.
    pub incarnation: &'a str,
    /// Lease check before every step.
    pub lease: &'a LeaseCheck,
    /// The leader's Kafka clients.
    pub kafka: &'a PoolKafka,
    /// Metrics.
    pub metrics: &'a Metrics,
    /// The topic generation batches are published into now
    /// ([`kgs_schemas::docs::PoolDoc::topic_generation`]).
    pub topic_generation: AtomicU64,
    /// Per partition, the highest offset a batch of this generation is
    /// recorded at: a topic whose end is not past it has lost its batches
    /// (deleted and created again), see [`Writer::topic_recreated`].
    pub last_offsets: Mutex<HashMap<i32, i64>>,
    /// The next generation position a window of new keys starts at, as far
    /// as this leader knows ([`UNKNOWN`] until the pool document is read).
    pub next_n: AtomicU64,
    /// The pool's cursor as last read: windows end there (positions below
    /// it are fully generated).
    pub generated_to: AtomicU64,
}

impl<'a> Writer<'a> {
    /// The mover of pool `doc` for a leader of `lease`'s lease, publishing
    /// into topic generation `topic_generation`.
    pub fn new(
        store: &'a Store,
        doc: &'a PoolDoc,
        topic_generation: u64,
        lease: &'a LeaseCheck,
        kafka: &'a PoolKafka,
        metrics: &'a Metrics,
    ) -> Self {
        Self {
            store,
            colls: store.key_collections(&doc.name),
            pool: &doc.name,
            incarnation: &doc.incarnation,
            lease,
            kafka,
            metrics,
            topic_generation: topic_generation.into(),
            last_offsets: Default::default(),
            next_n: UNKNOWN.into(),
            generated_to: 0.into(),
        }
    }
}

impl Writer<'_> {
    /// Step 1: a new `moving` record of this pool and epoch, inserted (the
    /// durable intent every later step and recovery works from).
    pub(super) async fn start_record(
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
        self.lease.check()?;
        self.store
            .batches
            .insert_one(&record)
            .await
            .map_err(Error::store("insert batch record"))?;
        Ok(record)
    }

    /// Steps 2–4: idempotent, so recovery calls it again for a `moving` batch.
    pub(super) async fn finish_move(&self, record: &mut BatchRecord) -> Result<()> {
        let foreign = match record.from.clone() {
            None => self.take_from_keys(record).await?,
            Some(from) => self.take_from_batch(record, &from).await?,
        };
        let dropped = !foreign.is_empty();
        for i in foreign.into_iter().rev() {
            record.keys.remove(i);
            record.ns.remove(i);
        }
        self.lease.check()?;
        failpoint::hit("checked_mark_moved");
        let done = if record.keys.is_empty() {
            BatchState::Published // nothing left to publish
        } else {
            BatchState::Moved
        };
        let mut set = doc! { "state": done };
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
                doc! { "_id": &record.id, "epoch": record.epoch as i64, "state": BatchState::Moving },
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

    /// After a conditional update of `record` to `state` matched nothing:
    /// fine if the record already is in `state` at our epoch (the server had
    /// applied the update, and the driver retried it after losing the
    /// reply), else another leader changed it: [`Error::LeaseLost`].
    pub(super) async fn already(&self, record: &BatchRecord, state: BatchState) -> Result<()> {
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
}
