//! `kgs-producer reserve`: taking keys out of circulation for good (a
//! reserved key is never handed out).

use std::time::Duration;

use bson::doc;
use chrono::Utc;
use kgs_schemas::docs::{UsedKeyDoc, UsedReason};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::{is_duplicate_key, Store};
use crate::writer::generate::pool_order;

/// `kgs-producer reserve`: reserves each key, in order, each outcome given
/// to `outcome` as soon as it is known.
pub async fn run(
    config: &Config,
    pool: &str,
    keys: &[String],
    mut outcome: impl FnMut(&str, ReserveOutcome),
) -> Result<()> {
    let store = Store::connect(config).await?;
    for key in keys {
        outcome(key, reserve(&store, pool, key).await?);
    }
    Ok(())
}

/// What happened to one key given to `reserve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// Taken out of `keys` (or out of the future generation) and recorded.
    Reserved,
    /// It was already reserved.
    AlreadyReserved,
    /// It was already handed out in a batch; it cannot be reserved any more.
    AlreadyUsed {
        /// The batch that took it.
        batch: Option<String>,
    },
    /// It holds a word of the pool's blocklist: it is never generated, so
    /// there is nothing to reserve (and nothing is written).
    Blocked,
}

/// Reserves `key` in `pool`: it is recorded in `used_keys` with reason
/// `reserved` and never handed out.
///
/// A key not yet generated is first added to the pool's `reserved_ahead`
/// (only while no generation range is pending and the cursor is below it),
/// then recorded in `used_keys`; generation skips it. A generated key is
/// recorded in `used_keys` (which wins over a concurrent batch move, see
/// `writer/batch.rs`) and deleted from `keys`. Re-running finishes a crashed run.
pub async fn reserve(store: &Store, pool: &str, key: &str) -> Result<ReserveOutcome> {
    reserve_as(store, pool, key, UsedReason::Reserved, 50).await
}

/// [`reserve`], recording `reason` (`reserved`, or `vanity` for a key taken
/// for a user): `AlreadyReserved` means a document of that reason exists.
/// A key not generated yet is tried `attempts` times 200 ms apart while a
/// generation range is pending (the leader, which is the generator, tries
/// once and comes back at its next pass).
pub async fn reserve_as(
    store: &Store,
    pool: &str,
    key: &str,
    reason: UsedReason,
    attempts: u32,
) -> Result<ReserveOutcome> {
    let attempts = attempts.max(1);
    let doc = store.pool(pool).await?;
    let (format, perm) = pool_order(&doc)?;
    let n = perm.invert(format.index_of(key)?);
    // Recorded, it would be a key in `used_keys` that was never generated
    // (or will never be): blocked at its position. A key generated before
    // words that match it were added is in `keys` or `used_keys`, and is
    // handled as any generated key.
    if crate::writer::generate::pool_blocklist(&doc, n)?.blocks(key) {
        return Ok(ReserveOutcome::Blocked);
    }
    let colls = store.key_collections(pool);
    if n >= doc.cursor {
        // Not generated yet (unless a range is pending: then wait for it).
        let mut additions = doc.blocklist_added.len();
        for attempt in 0..attempts {
            // Conditional on the blocklist additions read too: a word added
            // meanwhile may block the position, which must then stay out of
            // `used_keys`.
            let r = store
                .pools
                .update_one(
                    doc! {
                        "_id": pool, "generating": null, "cursor": { "$lte": n as i64 },
                        format!("blocklist_added.{additions}"): { "$exists": false },
                    },
                    doc! { "$addToSet": { "reserved_ahead": n as i64 } },
                )
                .await
                .map_err(Error::store("reserve ahead"))?;
            if r.matched_count == 1 {
                break;
            }
            let now = store.pool(pool).await?;
            if crate::writer::generate::pool_blocklist(&now, n)?.blocks(key) {
                return Ok(ReserveOutcome::Blocked);
            }
            additions = now.blocklist_added.len();
            if now.cursor > n {
                break; // generated meanwhile: handled below as a generated key
            }
            if attempt + 1 == attempts {
                return Err(Error::Config(format!(
                    "pool {pool:?} is generating; retry reserve later"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let used = UsedKeyDoc {
        key: key.to_owned(),
        n,
        reason,
        batch: None,
        at: Utc::now(),
    };
    match colls.used.insert_one(&used).await {
        Ok(_) => {}
        Err(e) if is_duplicate_key(&e) => {
            let existing = colls
                .used
                .find_one(doc! { "_id": key })
                .await
                .map_err(Error::store("read used key"))?;
            match existing {
                Some(u) if u.reason == reason => {
                    // Finish a crashed reserve: it must not stay in keys.
                    delete_key(store, pool, key).await?;
                    return Ok(ReserveOutcome::AlreadyReserved);
                }
                Some(u) => return Ok(ReserveOutcome::AlreadyUsed { batch: u.batch }),
                None => return Err(Error::Corrupt(format!("used key {key:?} vanished"))),
            }
        }
        Err(e) => return Err(Error::store("insert reserved key")(e)),
    }
    delete_key(store, pool, key).await?;
    tracing::info!(pool, key, n, reason = reason.as_str(), "key reserved");
    Ok(ReserveOutcome::Reserved)
}

async fn delete_key(store: &Store, pool: &str, key: &str) -> Result<()> {
    store
        .key_collections(pool)
        .keys
        .delete_one(doc! { "_id": key })
        .await
        .map_err(Error::store("delete reserved key from keys"))?;
    Ok(())
}
