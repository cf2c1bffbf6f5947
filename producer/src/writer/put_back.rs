//! Putting handed-out keys back into circulation (returned unused by a
//! consumer, or recycled): a new batch of keys that never leave
//! `used_keys`; each key's document moves from its old batch to the new
//! one. Shared by [`super::returns`] and [`super::recycles`].

use std::time::Instant;

use bson::doc;
use futures::{StreamExt, TryStreamExt};
use kgs_schemas::docs::{BatchRecord, UsedReason};

use super::{Writer, READ_BACKS};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::store::{by_id, rebatch_used};

impl Writer<'_> {
    /// Puts handed-out keys of batch `from` (returned unused, or recycled),
    /// with their `n`, into a new batch and publishes it to `partition`.
    /// The keys never leave `used_keys` (see [`BatchRecord::from`]): the
    /// record is inserted first (`moving`, with `from`), then each key's
    /// document moves from `from` to it, then it is `moved` with the keys
    /// whose document names it — a key that is no longer in `from` (taken
    /// by an earlier attempt, or changed meanwhile) leaves this batch. Every
    /// step is the ordinary move's, so recovery finishes a crashed one.
    /// Returns the keys the new batch took.
    ///
    /// A key holding a word added to the blocklist since it was moved does
    /// not go round again: its document turns to reason `blocked` (matched
    /// on `{_id, batch: from}`, so a key another writer moved meanwhile is
    /// left alone), and it is not in the new batch.
    pub async fn put_back(
        &self,
        from: &str,
        keys: &[(String, u64)],
        partition: i32,
    ) -> Result<Vec<String>> {
        let epoch = self.lease.check()?;
        let started = Instant::now();
        let keys = self.retire_blocked(from, keys).await?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
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

    /// The keys of `keys` that hold no word of the pool's blocklist; the
    /// others' documents are set to reason `blocked`, out of circulation.
    async fn retire_blocked(
        &self,
        from: &str,
        keys: &[(String, u64)],
    ) -> Result<Vec<(String, u64)>> {
        let doc = self.store.pool(self.pool).await?;
        if doc.blocklist_added.is_empty() {
            // Without later words no key here can hold one: generation
            // skipped every match of the init list.
            return Ok(keys.to_vec());
        }
        let blocklist = crate::writer::generate::pool_blocklist_all(&doc)?;
        let (blocked, kept): (Vec<_>, Vec<_>) =
            keys.iter().cloned().partition(|(k, _)| blocklist.blocks(k));
        for (key, _) in &blocked {
            self.lease.check()?;
            self.colls
                .used
                .update_one(
                    doc! { "_id": key, "batch": from },
                    doc! { "$set": { "reason": UsedReason::Blocked, "batch": null } },
                )
                .await
                .map_err(Error::store("retire a blocked key"))?;
            tracing::info!(pool = self.pool, key = %key, from, "key holds a word added to the blocklist; not handed out again");
        }
        Ok(kept)
    }

    /// Step 2 of a re-batch: each key's `used_keys` document moves from
    /// batch `from` to this one. Returns the positions of keys whose
    /// document does not name this batch afterwards (read back only when
    /// fewer documents matched than there are keys: a retry, or a key that
    /// changed meanwhile).
    pub(super) async fn take_from_batch(
        &self,
        record: &BatchRecord,
        from: &str,
    ) -> Result<Vec<usize>> {
        self.lease.check()?;
        failpoint::hit("checked_rebatch_used");
        let matched = rebatch_used(
            &self.store.db,
            self.colls.used.name(),
            &record.keys,
            from,
            &record.id,
        )
        .await?;
        failpoint::hit("rebatch_after_used");
        if matched as usize == record.keys.len() {
            return Ok(Vec::new());
        }
        let used = &self.colls.used;
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
}
