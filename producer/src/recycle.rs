//! Recycling: putting a handed-out key back into its pool so it is handed
//! out again later, exactly once.
//!
//! Two halves, like the consumers' key return:
//! - a **request** (this module's [`Requester`], used by `kgs-producer
//!   recycle`; the consumer library has its own) checks the key with
//!   [`kgs_schemas::recycle`] and inserts a [`RecycleDoc`] `requested`
//!   (`_id` = `<pool>:<key>:<batch>`, so a second request for the same
//!   hand-out is a duplicate-key error: "already recycled");
//! - the **leader**, the only writer of `keys.<pool>`, performs every
//!   `requested` document of its pool ([`Mover::process_recycles`], in the
//!   run loop before any new batch is moved): delete `{_id: key, batch}` from
//!   `used_keys`, insert the key into `keys` with its old `n` (so it is among
//!   the next keys handed out; E11000 = inserted before a crash), set `done`.
//!
//! A crash between the delete and the insert leaves the key in neither
//! collection, but the `requested` document is the durable record the next
//! pass finishes it from: a request whose `used_keys` document is gone was
//! deleted by an earlier pass (only returns and recycles delete from
//! `used_keys`, and the request proved the key is not being returned).

use bson::doc;
use chrono::Utc;
use futures::TryStreamExt;
use kgs_schemas::docs::{
    recycle_id, KeyDoc, PoolDoc, RecycleDoc, RecycleState, UsedKeyDoc, UsedReason,
};
use kgs_schemas::recycle::{check_claim, check_used, ClaimVerdict, Refusal};
use kgs_schemas::{FormatError, KeyFormat};

use crate::error::{Error, Result};
use crate::failpoint;
use crate::mover::Mover;
use crate::store::{by_id, is_duplicate, Store};

/// What became of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecycleOutcome {
    /// Recorded (`_id` given); the leader puts the key back.
    Accepted(String),
    /// Not a key of the pool (length or alphabet).
    BadKey(FormatError),
    /// Refused; nothing changed.
    Refused(Refusal),
}

/// Checks and records recycle requests for one pool.
#[derive(Debug)]
pub struct Requester<'a> {
    store: &'a Store,
    pool: PoolDoc,
    format: KeyFormat,
    by: String,
}

impl<'a> Requester<'a> {
    /// A requester of `pool`, recording `by` as who asked.
    pub async fn new(store: &'a Store, pool: &str, by: String) -> Result<Self> {
        let pool = store.pool(pool).await?;
        let format = KeyFormat::try_from(&pool.format)?;
        Ok(Self {
            store,
            pool,
            format,
            by,
        })
    }

    /// Checks `key` and records the request. Every read is by exact `_id`.
    /// A batch still open in any instance is refused: the command line
    /// cannot see a buffer.
    pub async fn request(&self, key: &str) -> Result<RecycleOutcome> {
        if let Err(e) = self.format.check(key) {
            return Ok(RecycleOutcome::BadKey(e));
        }
        let pk = self.store.pool_keys(&self.pool.name);
        let used: Option<UsedKeyDoc> = pk
            .used
            .find_one(by_id(key))
            .await
            .map_err(Error::store("read used key"))?;
        let (batch, n) = match check_used(used.as_ref()) {
            Ok((batch, n)) => (batch.to_owned(), n),
            Err(r) => return Ok(RecycleOutcome::Refused(r)),
        };
        let claim = self
            .store
            .claims
            .find_one(by_id(&batch))
            .await
            .map_err(Error::store("read claim"))?;
        match check_claim(claim.as_ref(), key, &batch, None) {
            Ok(ClaimVerdict::HandedOut) => {}
            // Only a consumer asks about its own buffer; `None` never gets here.
            Ok(ClaimVerdict::AskBuffer) => {
                return Ok(RecycleOutcome::Refused(Refusal::InBuffer { batch }))
            }
            Err(r) => return Ok(RecycleOutcome::Refused(r)),
        }
        let doc = RecycleDoc {
            id: recycle_id(&self.pool.name, key, &batch),
            pool: self.pool.name.clone(),
            key: key.to_owned(),
            batch,
            n,
            state: RecycleState::Requested,
            reason: None,
            requested_by: self.by.clone(),
            requested_at: Utc::now(),
            done_at: None,
        };
        match self.store.recycles.insert_one(&doc).await {
            Ok(_) => {
                tracing::info!(pool = %self.pool.name, key, batch = %doc.batch, "recycle requested");
                Ok(RecycleOutcome::Accepted(doc.id))
            }
            Err(e) if is_duplicate(&e) => Ok(RecycleOutcome::Refused(Refusal::AlreadyRecycled)),
            Err(e) => Err(Error::store("insert recycle request")(e)),
        }
    }
}

impl Mover<'_> {
    /// Performs every `requested` recycle of the pool (see the module docs).
    /// Each step is idempotent; a request whose key's `used_keys` document
    /// names something else than its batch is refused (`changed`), changing
    /// nothing. Returns the number of keys put back.
    pub async fn process_recycles(&self) -> Result<u64> {
        self.guard.check()?;
        // Served by the `{pool, state}` index.
        let requests: Vec<RecycleDoc> = self
            .store
            .recycles
            .find(doc! { "pool": self.pool, "state": "requested" })
            .await
            .map_err(Error::store("find recycle requests"))?
            .try_collect()
            .await
            .map_err(Error::store("find recycle requests"))?;
        let mut recycled = 0;
        for r in requests {
            self.guard.check()?;
            let used = self
                .pk
                .used
                .find_one(by_id(&r.key))
                .await
                .map_err(Error::store("read used key"))?;
            match used {
                Some(u)
                    if u.reason == UsedReason::Batch && u.batch.as_deref() == Some(&r.batch) =>
                {
                    self.guard.check()?;
                    self.pk
                        .used
                        .delete_one(doc! { "_id": &r.key, "batch": &r.batch })
                        .await
                        .map_err(Error::store("delete recycled key from used_keys"))?;
                    failpoint::hit("recycle_after_delete");
                }
                Some(_) => {
                    self.finish_recycle(&r, Some(Refusal::Changed)).await?;
                    continue;
                }
                // Deleted by a pass that crashed before marking it done.
                None => {}
            }
            self.guard.check()?;
            let doc = KeyDoc {
                key: r.key.clone(),
                n: r.n,
            };
            match self.pk.keys.insert_one(&doc).await {
                Ok(_) => {}
                Err(e) if is_duplicate(&e) => {}
                Err(e) => return Err(Error::store("put recycled key back")(e)),
            }
            failpoint::hit("recycle_after_insert");
            self.finish_recycle(&r, None).await?;
            failpoint::hit("recycle_after_done");
            recycled += 1;
        }
        Ok(recycled)
    }

    /// Marks a request `done`, or `refused` with the reason; logs and counts.
    async fn finish_recycle(&self, r: &RecycleDoc, refusal: Option<Refusal>) -> Result<()> {
        self.guard.check()?;
        let state = if refusal.is_some() {
            RecycleState::Refused
        } else {
            RecycleState::Done
        };
        let mut set = doc! {
            "state": bson::to_bson(&state).expect("state serializes"),
            "done_at": bson::DateTime::now(),
        };
        if let Some(refusal) = &refusal {
            set.insert("reason", refusal.to_string());
        }
        let updated = self
            .store
            .recycles
            .update_one(
                doc! { "_id": &r.id, "state": "requested" },
                doc! { "$set": set },
            )
            .await
            .map_err(Error::store("mark recycle finished"))?;
        if updated.modified_count == 0 {
            return Ok(()); // finished by another pass meanwhile
        }
        match refusal {
            None => {
                self.metrics.keys_recycled.inc();
                tracing::info!(key = %r.key, batch = %r.batch, by = %r.requested_by, "key recycled");
            }
            Some(refusal) => {
                self.metrics
                    .recycles_refused
                    .with_label_values(&[refusal.kind()])
                    .inc();
                tracing::warn!(key = %r.key, batch = %r.batch, reason = %refusal, "recycle refused");
            }
        }
        Ok(())
    }
}
