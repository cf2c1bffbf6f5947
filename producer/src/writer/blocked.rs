//! Words added to a pool's blocklist after `init` (`kgs-producer
//! blocklist-add`), applied by the leader to the keys generated before them.
//!
//! The addition itself blocks every later generation position
//! ([`kgs_schemas::docs::BlocklistAddition::from`]); this step, run by the
//! leader beside returns and vanity keys, takes the matching keys already in
//! `keys` out of circulation with the writes of a batch move: first a
//! `used_keys` document of reason `blocked` (its unique `_id` decides
//! against a concurrent move of the same key by a stale leader: whichever
//! document lands first wins, the other side drops the key), then the
//! delete from `keys`. A crash between the two leaves the key in both;
//! the next pass finds it in `keys` again, its insert is a duplicate, and
//! the delete finishes it. Only then, in one update, are the counts recorded
//! and the addition marked swept: a sweep cut short is redone whole.
//!
//! Keys handed out before the words were added are counted
//! (`blocklist_handed_out`), never recalled. A stale generator that writes
//! a swept key back into `keys` finds its `used_keys` document there: the
//! batch that reads it drops it, as any key used elsewhere.

use bson::doc;
use chrono::Utc;
use futures::TryStreamExt;
use kgs_schemas::docs::{KeyDoc, UsedKeyDoc, UsedReason};

use super::Writer;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::store::{delete_by_ids, insert_ignoring_duplicates};
use crate::writer::generate::pool_blocklist_all;

/// Keys moved per round trip.
const CHUNK: usize = 1_000;

impl Writer<'_> {
    /// Sweeps `keys` for the words added since the last sweep (see the
    /// module docs). Returns the keys taken out of `keys`; 0 at once when
    /// no addition is waiting.
    pub async fn sweep_blocklist(&self) -> Result<u64> {
        let doc = self.store.pool(self.pool).await?;
        let additions = doc.blocklist_added.len() as u64;
        if doc.blocklist_swept >= additions {
            return Ok(0);
        }
        self.lease.check()?;
        // Every word: a key of `keys` matching an older word is one a stale
        // generator wrote back, and is taken out the same way.
        let blocklist = pool_blocklist_all(&doc)?;
        let mut cursor = self
            .colls
            .keys
            .find(doc! {})
            .batch_size(CHUNK as u32)
            .await
            .map_err(Error::store("sweep keys for blocked words"))?;
        let mut moved = 0;
        let mut found: Vec<KeyDoc> = Vec::new();
        loop {
            let next = cursor
                .try_next()
                .await
                .map_err(Error::store("sweep keys for blocked words"))?;
            let done = next.is_none();
            if let Some(key) = next.filter(|k| blocklist.blocks(&k.key)) {
                found.push(key);
            }
            if found.len() >= CHUNK || (done && !found.is_empty()) {
                moved += self.take_blocked(std::mem::take(&mut found)).await?;
            }
            if done {
                break;
            }
        }
        // Counted over `used_keys` as it is now, so a sweep redone after a
        // crash counts the same keys once.
        let (mut removed, mut handed_out) = (0u64, 0u64);
        let mut used = self
            .colls
            .used
            .clone_with_type::<bson::Document>()
            .find(doc! {})
            .projection(doc! { "_id": 1, "reason": 1 })
            .batch_size(10 * CHUNK as u32)
            .await
            .map_err(Error::store("count blocked keys"))?;
        while let Some(u) = used
            .try_next()
            .await
            .map_err(Error::store("count blocked keys"))?
        {
            let key = u.get_str("_id").unwrap_or_default();
            match u.get_str("reason").unwrap_or_default() {
                r if r == UsedReason::Blocked.as_str() => removed += 1,
                _ if blocklist.blocks(key) => handed_out += 1,
                _ => {}
            }
        }
        self.lease.check()?;
        failpoint::hit("blocklist_before_swept");
        self.store
            .pools
            .update_one(
                doc! { "_id": self.pool },
                // `$max`: a stale leader's late count never lowers one
                // made after it.
                doc! {
                    "$max": {
                        "blocklist_removed": removed as i64,
                        "blocklist_handed_out": handed_out as i64,
                        "blocklist_swept": additions as i64,
                    },
                },
            )
            .await
            .map_err(Error::store("record the blocklist sweep"))?;
        if handed_out > 0 {
            tracing::warn!(
                pool = self.pool,
                handed_out,
                "keys holding a blocked word were handed out before the word was added; they are not recalled"
            );
        }
        tracing::info!(
            pool = self.pool,
            moved,
            removed,
            handed_out,
            "blocklist sweep done"
        );
        Ok(moved)
    }

    /// `used_keys` first (reason `blocked`), then out of `keys`.
    async fn take_blocked(&self, found: Vec<KeyDoc>) -> Result<u64> {
        self.lease.check()?;
        let at = Utc::now();
        let docs: Vec<UsedKeyDoc> = found
            .iter()
            .map(|k| UsedKeyDoc {
                key: k.key.clone(),
                n: k.n,
                reason: UsedReason::Blocked,
                batch: None,
                at,
            })
            .collect();
        // A duplicate is a retry of this sweep, or a key a stale leader's
        // batch (or a reservation) took first: either way it is used, and
        // leaves `keys` below.
        insert_ignoring_duplicates(&self.colls.used, &docs, "insert blocked keys").await?;
        failpoint::hit("blocklist_after_used");
        self.lease.check()?;
        let ids: Vec<String> = found.into_iter().map(|k| k.key).collect();
        delete_by_ids(
            &self.store.db,
            self.colls.keys.name(),
            &ids,
            "delete blocked keys",
        )
        .await?;
        Ok(ids.len() as u64)
    }
}
