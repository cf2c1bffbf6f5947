//! Recycle requests, performed by the leader: every `requested`
//! [`RecycleDoc`] of its pool (in the run loop beside the moves) puts its key
//! back through [`super::put_back`]: the key goes into a new batch without
//! ever leaving `used_keys` (its document moves from the batch that handed
//! it out to the new one), which is published and handed out once, and the
//! request is set `done`. The requests are made by `kgs-producer recycle`
//! (`cmd/recycle.rs`) and by the consumer library. A request of a pool with
//! a recycle cooldown is *quarantined* until its `due_at`: the leader takes
//! only the due ones (`{pool, state, due_at}` index), so the key stays in
//! `used_keys` under the batch that handed it out until then.
//!
//! A crash anywhere is finished by the next pass: the `requested` document
//! is the durable record; a key still in its old batch is re-batched, a key
//! already in a re-batch of exactly this key from exactly that batch is
//! `done`, anything else is refused (`changed`). The key is in `used_keys`
//! throughout, so `keys ∪ used_keys` is the generated set at every step.

use std::collections::{BTreeMap, HashSet};

use bson::doc;
use kgs_schemas::docs::{RecycleDoc, RecycleState, UsedReason};
use kgs_schemas::recycle::Refusal;

use super::Writer;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::store::{by_id, find_all};

impl Writer<'_> {
    /// Performs every `requested` recycle of the pool (see the module docs):
    /// the keys still in the batch their request names are re-batched
    /// ([`Writer::put_back`], grouped by that batch, at most `size` keys per
    /// new batch, published to `partition`) and their requests set `done`.
    /// A request whose key's `used_keys` document names something else is
    /// refused (`changed`), changing nothing — unless that is a re-batch of
    /// exactly this key from exactly this batch, which a crashed pass made:
    /// then it is `done`. Returns the number of keys recycled.
    pub async fn put_back_recycles(&self, size: usize, partition: i32) -> Result<u64> {
        self.lease.check()?;
        // Served by the `{pool, state, due_at}` index (`null`: no
        // quarantine, or a request made before it existed).
        // The server's clock, as the requester's `due_at` is.
        let now = bson::DateTime::from_chrono(self.store.server_now().await?);
        let requests: Vec<RecycleDoc> = find_all(
            &self.store.recycles,
            doc! {
                "pool": self.pool, "state": RecycleState::Requested,
                "$or": [{ "due_at": null }, { "due_at": { "$lte": now } }],
            },
            "find recycle requests",
        )
        .await?;
        let mut recycled = 0;
        let mut by_batch: BTreeMap<String, Vec<RecycleDoc>> = BTreeMap::new();
        for r in requests {
            self.lease.check()?;
            let used = self
                .colls
                .used
                .find_one(by_id(&r.key))
                .await
                .map_err(Error::store("read used key"))?;
            match used {
                Some(u)
                    if u.reason == UsedReason::Batch && u.batch.as_deref() == Some(&r.batch) =>
                {
                    by_batch.entry(r.batch.clone()).or_default().push(r);
                }
                Some(u) if self.rebatched_by_request(u.batch.as_deref(), &r).await? => {
                    self.finish_recycle(&r, None).await?;
                    recycled += 1;
                }
                _ => self.finish_recycle(&r, Some(Refusal::Changed)).await?,
            }
        }
        for (from, requests) in by_batch {
            for chunk in requests.chunks(size.max(1)) {
                let keys: Vec<(String, u64)> = chunk.iter().map(|r| (r.key.clone(), r.n)).collect();
                let taken: HashSet<String> = self
                    .put_back(&from, &keys, partition)
                    .await?
                    .into_iter()
                    .collect();
                failpoint::hit("recycle_after_rebatch");
                for r in chunk {
                    if taken.contains(&r.key) {
                        self.finish_recycle(r, None).await?;
                        failpoint::hit("recycle_after_done");
                        recycled += 1;
                    } else {
                        self.finish_recycle(r, Some(Refusal::Changed)).await?;
                    }
                }
            }
        }
        Ok(recycled)
    }

    /// Whether `batch` (where the key's `used_keys` document now is) is a
    /// re-batch of the key of request `r` out of `r`'s batch: made by a pass
    /// that crashed before it marked `r` done.
    async fn rebatched_by_request(&self, batch: Option<&str>, r: &RecycleDoc) -> Result<bool> {
        let Some(batch) = batch else {
            return Ok(false);
        };
        let record = self
            .store
            .batches
            .find_one(by_id(batch))
            .await
            .map_err(Error::store("read batch record"))?;
        Ok(record.is_some_and(|b| {
            b.from.as_deref() == Some(r.batch.as_str()) && b.keys.iter().any(|k| k == &r.key)
        }))
    }

    /// Marks a request `done`, or `refused` with the reason; logs and counts.
    async fn finish_recycle(&self, r: &RecycleDoc, refusal: Option<Refusal>) -> Result<()> {
        self.lease.check()?;
        failpoint::hit("checked_recycle_done");
        let state = if refusal.is_some() {
            RecycleState::Refused
        } else {
            RecycleState::Done
        };
        let mut set = doc! {
            "state": state,
            "done_at": bson::DateTime::now(),
        };
        if let Some(refusal) = &refusal {
            set.insert("reason", refusal.to_string());
        }
        let updated = self
            .store
            .recycles
            .update_one(
                doc! { "_id": &r.id, "state": RecycleState::Requested },
                doc! { "$set": set },
            )
            .await
            .map_err(Error::store("mark recycle finished"))?;
        if updated.modified_count == 0 {
            return Ok(()); // finished by another pass meanwhile
        }
        match refusal {
            None => self.metrics.key_recycled(&r.key, &r.batch, &r.requested_by),
            Some(refusal) => self.metrics.recycle_refused(&r.key, &r.batch, &refusal),
        }
        Ok(())
    }
}
