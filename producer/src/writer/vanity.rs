//! Vanity keys, decided by the leader: every `requested` [`VanityDoc`] of
//! its pool (in the run loop beside returns and recycles) takes its key with
//! the writes of `kgs-producer reserve`, reason `vanity`: the key's
//! `used_keys` document is inserted (its unique `_id` decides against a
//! concurrent batch move, which then drops the key), then the key leaves
//! `keys` (or, not generated yet, its position joins `reserved_ahead`, which
//! generation skips). A key handed out, reserved or blocked already is
//! refused. The requests are made by the consumer library (`POST
//! /keys/{key}` of the app server), whose role may not write the key
//! collections.
//!
//! A crash anywhere is finished by the next pass: the `requested` document
//! is the durable record, and a `used_keys` document of reason `vanity`
//! for its key is one this request made (one request per key ever), so it
//! is `taken`. A stale leader's late writes are the reserve's, fenced by
//! the unique `_id` of the key's document and by the conditional update of
//! `reserved_ahead`; its late decision is conditional on `requested`.

use bson::doc;
use futures::TryStreamExt;
use kgs_schemas::docs::{vanity_id, UsedReason, VanityDoc, VanityState};

use super::Writer;
use crate::cmd::reserve::{reserve_as, ReserveOutcome};
use crate::error::{Error, Result};

/// Requests decided per pass at most: a flood of them must not hold up
/// the batches (the rest wait for the next passes).
const PER_PASS: i64 = 100;

impl Writer<'_> {
    /// Decides up to [`PER_PASS`] `requested` vanity keys of the pool (see
    /// the module docs). Returns how many were taken. A request that cannot
    /// be read or decided is refused or left for a later pass, never an
    /// error of the pass: only losing the lease ends it.
    pub async fn take_vanity_keys(&self) -> Result<u64> {
        self.lease.check()?;
        // Served by the `{pool, state}` index. Read as plain documents so
        // that one malformed request (anyone with the app servers' role can
        // insert one) is refused alone instead of failing every pass.
        let requests: Vec<bson::Document> = self
            .store
            .vanity
            .clone_with_type::<bson::Document>()
            .find(doc! { "pool": self.pool, "state": VanityState::Requested })
            .limit(PER_PASS)
            .await
            .map_err(Error::store("find vanity requests"))?
            .try_collect()
            .await
            .map_err(Error::store("read vanity requests"))?;
        let mut taken = 0;
        for raw in requests {
            self.lease.check()?;
            let id = raw.get("_id").cloned().unwrap_or(bson::Bson::Null);
            let request: VanityDoc = match bson::from_document(raw) {
                Ok(r) => r,
                Err(e) => {
                    self.refuse_malformed(&id, &e.to_string()).await?;
                    continue;
                }
            };
            if request.id != vanity_id(&request.pool, &request.key) {
                // Not the one request of its key: two could both be "taken".
                self.refuse_malformed(&id, "its _id is not <pool>:<key>")
                    .await?;
                continue;
            }
            match self.decide(&request).await {
                Ok(true) => taken += 1,
                Ok(false) => {}
                Err(e @ (Error::LeaseLost(_) | Error::Fenced(_))) => return Err(e),
                // Left `requested`: tried again at the next pass.
                Err(e) => self.metrics.error(&e, "vanity key"),
            }
        }
        Ok(taken)
    }

    /// Decides one request; whether its key was taken. `Ok(false)` also
    /// when it is left for a later pass (a generation range pending).
    async fn decide(&self, r: &VanityDoc) -> Result<bool> {
        let refusal = match reserve_as(self.store, self.pool, &r.key, UsedReason::Vanity, 1).await {
            Ok(ReserveOutcome::Reserved | ReserveOutcome::AlreadyReserved) => None,
            Ok(ReserveOutcome::AlreadyUsed { batch: Some(_) }) => Some("already handed out"),
            Ok(ReserveOutcome::AlreadyUsed { batch: None }) => Some("reserved"),
            Ok(ReserveOutcome::Blocked) => Some("it holds a blocked word"),
            // Not a key of the pool: the requester checked the format, so
            // only a forged request gets here.
            Err(Error::BadKey(_)) => Some("not a key of the pool"),
            // The pool is generating: decided at a later pass.
            Err(Error::Config(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        self.finish_vanity(&r.id, &r.key, &r.requested_by, refusal)
            .await?;
        Ok(refusal.is_none())
    }

    /// Refuses a request that is not a well-formed vanity request.
    async fn refuse_malformed(&self, id: &bson::Bson, why: &str) -> Result<()> {
        tracing::warn!(%id, why, "malformed vanity key request refused");
        self.mark(id.clone(), Some("malformed request")).await?;
        Ok(())
    }

    /// Marks a request `taken`, or `refused` with the reason; logs and counts.
    async fn finish_vanity(
        &self,
        id: &str,
        key: &str,
        by: &str,
        refusal: Option<&str>,
    ) -> Result<()> {
        if self.mark(id.into(), refusal).await? {
            self.metrics.vanity_key(key, by, refusal);
        }
        Ok(())
    }

    /// Sets request `id` `taken`, or `refused` with the reason, if it is
    /// still `requested`; whether it was.
    async fn mark(&self, id: bson::Bson, refusal: Option<&str>) -> Result<bool> {
        self.lease.check()?;
        let mut set = doc! { "done_at": bson::DateTime::now() };
        match refusal {
            None => set.insert("state", VanityState::Taken),
            Some(reason) => {
                set.insert("reason", reason);
                set.insert("state", VanityState::Refused)
            }
        };
        let updated = self
            .store
            .vanity
            .update_one(
                doc! { "_id": id, "state": VanityState::Requested },
                doc! { "$set": set },
            )
            .await
            .map_err(Error::store("mark vanity request decided"))?;
        Ok(updated.modified_count == 1)
    }
}
