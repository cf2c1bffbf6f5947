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
use kgs_schemas::docs::{UsedReason, VanityDoc, VanityState};

use super::Writer;
use crate::cmd::reserve::{reserve_as, ReserveOutcome};
use crate::error::{Error, Result};
use crate::store::find_all;

impl Writer<'_> {
    /// Decides every `requested` vanity key of the pool (see the module
    /// docs). Returns how many were taken.
    pub async fn take_vanity_keys(&self) -> Result<u64> {
        self.lease.check()?;
        // Served by the `{pool, state}` index.
        let requests: Vec<VanityDoc> = find_all(
            &self.store.vanity,
            doc! { "pool": self.pool, "state": VanityState::Requested },
            "find vanity requests",
        )
        .await?;
        let mut taken = 0;
        for r in requests {
            self.lease.check()?;
            let refusal = match reserve_as(self.store, self.pool, &r.key, UsedReason::Vanity).await
            {
                Ok(ReserveOutcome::Reserved | ReserveOutcome::AlreadyReserved) => None,
                Ok(ReserveOutcome::AlreadyUsed { batch: Some(_) }) => Some("already handed out"),
                Ok(ReserveOutcome::AlreadyUsed { batch: None }) => Some("reserved"),
                Ok(ReserveOutcome::Blocked) => Some("it holds a blocked word"),
                // Not a key of the pool: the requester checked the format,
                // so only a forged request gets here.
                Err(Error::BadKey(_)) => Some("not a key of the pool"),
                // The pool is generating: decided at a later pass.
                Err(Error::Config(_)) => continue,
                Err(e) => return Err(e),
            };
            self.finish_vanity(&r, refusal).await?;
            taken += u64::from(refusal.is_none());
        }
        Ok(taken)
    }

    /// Marks a request `taken`, or `refused` with the reason.
    async fn finish_vanity(&self, r: &VanityDoc, refusal: Option<&str>) -> Result<()> {
        self.lease.check()?;
        let mut set = doc! {
            "state": if refusal.is_some() { VanityState::Refused } else { VanityState::Taken },
            "done_at": bson::DateTime::now(),
        };
        if let Some(reason) = refusal {
            set.insert("reason", reason);
        }
        let updated = self
            .store
            .vanity
            .update_one(
                doc! { "_id": &r.id, "state": VanityState::Requested },
                doc! { "$set": set },
            )
            .await
            .map_err(Error::store("mark vanity request decided"))?;
        if updated.modified_count == 1 {
            self.metrics.vanity_key(&r.key, &r.requested_by, refusal);
        }
        Ok(())
    }
}
