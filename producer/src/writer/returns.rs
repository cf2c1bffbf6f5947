//! Returned keys: the unused keys of consumers' `returning` claims go back
//! into circulation through [`super::put_back`], then the claim becomes
//! `returned`.

use std::collections::HashSet;

use bson::doc;
use kgs_schemas::docs::{ClaimDoc, ClaimState};

use super::Writer;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::store::{by_id, find_all};

impl Writer<'_> {
    /// Hands the unused keys of consumers' `returning` claims out again: in
    /// new batches of at most `size` keys ([`Writer::put_back`], published
    /// from `partition` on, one partition after the other), then the claim
    /// becomes `returned`. A crash in between is harmless: a key already
    /// re-batched is no longer in the claim's batch, so the next pass leaves
    /// it where it is. Returns the number of keys re-batched.
    pub async fn put_back_returns(&self, size: usize, partition: i32) -> Result<u64> {
        self.lease.check()?;
        let mut rotate = 0;
        let claims: Vec<ClaimDoc> = find_all(
            &self.store.claims,
            doc! { "pool": self.pool, "state": ClaimState::Returning },
            "find returning claims",
        )
        .await?;
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
                    self.lease.check()?;
                    self.store
                        .claims
                        .update_one(
                            doc! { "_id": &claim.batch_id, "state": ClaimState::Returning },
                            doc! { "$set": {
                                "state": ClaimState::Rejected,
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
            let mut taken = 0;
            for chunk in back.chunks(size.max(1)) {
                let to = (partition + rotate) % self.kafka.partitions();
                rotate += 1;
                taken += self.put_back(&claim.batch_id, chunk, to).await?.len() as u64;
            }
            failpoint::hit("return_after_rebatch");
            self.lease.check()?;
            failpoint::hit("checked_claim_returned");
            self.store
                .claims
                .update_one(
                    doc! { "_id": &claim.batch_id, "state": ClaimState::Returning },
                    doc! { "$set": { "state": ClaimState::Returned } },
                )
                .await
                .map_err(Error::store("mark claim returned"))?;
            self.metrics.keys_returned(&claim.batch_id, taken);
            returned += taken;
        }
        Ok(returned)
    }
}
