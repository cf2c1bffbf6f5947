//! `kgs-producer blocklist-add`: words added to a pool's blocklist after
//! `init`.
//!
//! The addition is one update of the pool document, conditional on its
//! cursor and on no generation range pending, that appends the words with
//! that cursor as their `from`: every generation step after it starts at or
//! past `from` and reads the words after marking its range, so it skips
//! their matches; every step before it ended at or before `from`. Which
//! positions a word blocks is therefore a function of the pool document
//! alone, the same for a step finished twice. The keys generated before
//! are the leader's to take out ([`crate::writer::blocked`]).

use std::time::Duration;

use bson::doc;
use chrono::Utc;
use kgs_schemas::docs::BlocklistAddition;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::Store;

/// How long to wait for a pending generation step before giving up.
const ATTEMPTS: u32 = 100;

/// Adds the (folded) `words` not listed yet. Returns how many were added
/// and the position they apply from, or `None` if every word was listed.
pub async fn add(config: &Config, pool: &str, words: &[String]) -> Result<Option<(usize, u64)>> {
    let store = Store::connect(config).await?;
    for _ in 0..ATTEMPTS {
        let doc = store.pool(pool).await?;
        let listed = doc.blocklist_all();
        let mut new: Vec<String> = words
            .iter()
            .filter(|w| !listed.contains(w))
            .cloned()
            .collect();
        new.sort();
        new.dedup();
        if new.is_empty() {
            return Ok(None);
        }
        if doc.generating.is_none() {
            let addition = BlocklistAddition {
                from: doc.cursor,
                words: new.clone(),
                at: Utc::now(),
            };
            let addition = bson::to_bson(&addition)
                .map_err(|e| Error::Corrupt(format!("encoding the addition: {e}")))?;
            let r = store
                .pools
                .update_one(
                    doc! { "_id": pool, "cursor": doc.cursor as i64, "generating": null },
                    doc! { "$push": { "blocklist_added": addition } },
                )
                .await
                .map_err(Error::store("add blocklist words"))?;
            if r.matched_count == 1 {
                tracing::info!(
                    pool,
                    words = new.len(),
                    from = doc.cursor,
                    "blocklist words added"
                );
                return Ok(Some((new.len(), doc.cursor)));
            }
        }
        // A generation step is pending or the cursor moved: read again.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::Config(format!(
        "pool {pool:?} kept generating for {} s; retry blocklist-add later",
        ATTEMPTS / 10
    )))
}
