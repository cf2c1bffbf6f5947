//! Generation: writing the next keys of a pool's permuted order into
//! `keys.<pool>`, crash-safely, until the pool holds its target size.
//!
//! One step covers positions `from..to` of the order:
//! 1. mark `generating = {from, to}` on the pool (conditional on the cursor);
//! 2. insert `KeyDoc {key: key_at(perm(i)), n: i}` unordered, ignoring E11000;
//! 3. set `cursor = to` and unset `generating`.
//!
//! A crash after 1 or 2 leaves the mark; the next generation first *recovers*
//! the range: it re-inserts only the keys that are not in `used_keys` (checked
//! by exact `_id`), because a batch may have moved some of them already. Only
//! the lease holder generates, in the same task that moves batches, so no move
//! runs while a range is pending. Positions listed in `reserved_ahead` are
//! skipped: their keys were reserved before being generated. So are the
//! positions whose key contains a word of the pool's blocklist; step 3
//! adds their count to `blocked` in the same update that moves the cursor
//! (set from the count read after step 1, so a step finished twice, by a
//! stale leader and by its successor, counts them once).

use std::collections::HashSet;

use bson::doc;
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use kgs_schemas::blocklist::Blocklist;
use kgs_schemas::docs::{GenerationRange, KeyDoc, PoolDoc};
use kgs_schemas::format::Tier;
use kgs_schemas::KeyFormat;

use crate::error::{Error, Result};
use crate::failpoint;
use crate::leader::lease::LeaseCheck;
use crate::permutation::Order;
use crate::store::{insert_ignoring_duplicates, KeyCollections, Store};

/// Documents per `insert_many`: keeps each request well under the 48 MB
/// message limit and gives the progress bar a steady pace.
const INSERT_CHUNK: usize = 5_000;

/// Concurrent `_id` lookups while recovering a range.
const RECOVERY_LOOKUPS: usize = 32;

/// The key format of a pool.
pub fn pool_format(pool: &PoolDoc) -> Result<KeyFormat> {
    KeyFormat::try_from(&pool.format)
        .map_err(|e| Error::Corrupt(format!("pool {:?} has a bad format: {e}", pool.name)))
}

/// The permutation and key format of a pool.
pub fn pool_order(pool: &PoolDoc) -> Result<(KeyFormat, Order)> {
    let format = pool_format(pool)?;
    let secret = hex::decode(&pool.secret.0)
        .map_err(|e| Error::Corrupt(format!("pool {:?} has a bad secret: {e}", pool.name)))?;
    let order = Order::new(&secret, &format);
    Ok((format, order))
}

/// Generates until `keys.<pool>` holds about `target` keys or the space is
/// exhausted, at most `max_keys` in this call. Returns the number generated.
pub async fn top_up(
    store: &Store,
    pool: &str,
    target: u64,
    chunk: u64,
    max_keys: u64,
    lease: &LeaseCheck,
    progress: Option<&ProgressBar>,
) -> Result<u64> {
    let colls = store.key_collections(pool);
    let mut generated = 0;
    loop {
        let doc = store.pool(pool).await?;
        if let Some(range) = doc.generating {
            tracing::info!(
                pool,
                from = range.from,
                to = range.to,
                "recovering an unfinished generation step"
            );
            finish_range(store, &colls, &doc, range, true, lease, progress).await?;
            continue;
        }
        if doc.cursor >= doc.space || generated >= max_keys {
            return Ok(generated);
        }
        let in_keys = unused_keys(&colls, &doc).await?;
        if in_keys >= target {
            return Ok(generated);
        }
        let n = chunk
            .min(target - in_keys)
            .min(doc.space - doc.cursor)
            .min(max_keys - generated);
        let range = GenerationRange {
            from: doc.cursor,
            to: doc.cursor + n,
        };
        lease.check()?;
        // Conditional on the cursor: a concurrent generator (there should be
        // none under the lease) makes this a no-op and the loop re-reads.
        let marked = store
            .pools
            .update_one(
                doc! { "_id": pool, "cursor": range.from as i64, "generating": null },
                doc! { "$set": { "generating": { "from": range.from as i64, "to": range.to as i64 } } },
            )
            .await
            .map_err(Error::store("mark generation range"))?;
        if marked.matched_count == 0 {
            continue;
        }
        failpoint::hit("gen_after_mark");
        // Re-read after marking: `reserve` only adds to `reserved_ahead` while
        // nothing is marked, so this copy has every reservation in the range.
        let doc = store.pool(pool).await?;
        finish_range(store, &colls, &doc, range, false, lease, progress).await?;
        generated += n;
    }
}

/// The tier new keys come from now, and how many of its positions are
/// left: the one holding the batch window's start (`moved_to`). Batches
/// take positions in order, so the next tier starts when these are gone.
pub fn tier_in_use(pool: &PoolDoc) -> Result<(Tier, u64)> {
    let format = pool_format(pool)?;
    let at = pool.moved_to.unwrap_or(0);
    let tier = *format.tier_of(at);
    Ok((tier, tier.end().saturating_sub(at)))
}

/// The blocklist that applies to generation position `n` (empty for a pool
/// without one): the `init` list and the words added at or before `n`
/// ([`PoolDoc::blocklist_at`]).
pub fn pool_blocklist(pool: &PoolDoc, n: u64) -> Result<Blocklist> {
    blocklist_of(pool, pool.blocklist_at(n))
}

fn blocklist_of(pool: &PoolDoc, words: Vec<String>) -> Result<Blocklist> {
    Blocklist::new(&words)
        .map_err(|e| Error::Corrupt(format!("pool {:?} has a bad blocklist: {e}", pool.name)))
}

/// The keys of generation positions `0..pool.cursor`, in order, without
/// the blocked ones: what `keys ∪ used_keys` must hold (reserved keys
/// included; keys a sweep took out for words added later are in
/// `used_keys`). For checkers of small pools.
pub fn generated_keys(pool: &PoolDoc) -> Result<Vec<String>> {
    let (format, perm) = pool_order(pool)?;
    // The list changes only where words were added.
    let mut lists: Vec<(u64, Blocklist)> = vec![(0, pool_blocklist(pool, 0)?)];
    for added in &pool.blocklist_added {
        lists.push((added.from, pool_blocklist(pool, added.from)?));
    }
    lists.sort_by_key(|(from, _)| *from);
    let mut keys = Vec::new();
    for n in 0..pool.cursor {
        let key = format
            .key_at(perm.apply(n))
            .map_err(|e| Error::Corrupt(format!("pool {:?}: {e}", pool.name)))?;
        let (_, blocklist) = lists
            .iter()
            .rev()
            .find(|(from, _)| *from <= n)
            .expect("the first list starts at 0");
        if !blocklist.blocks(&key) {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// Every word of the pool's blocklist, the added ones included.
pub fn pool_blocklist_all(pool: &PoolDoc) -> Result<Blocklist> {
    blocklist_of(pool, pool.blocklist_all())
}

/// Keys in `keys.<pool>`: the positions generated and not yet passed by the
/// batch window (no collection count, which is a scan on some MongoDB-wire
/// servers); counted only in a pool made before `moved_to` existed.
pub async fn unused_keys(colls: &KeyCollections, doc: &PoolDoc) -> Result<u64> {
    match doc.moved_to {
        Some(moved) => Ok(doc.cursor.saturating_sub(moved)),
        None => colls
            .keys
            .estimated_document_count()
            .await
            .map_err(Error::store("count keys")),
    }
}

/// Inserts the keys of `range` (all of them, or in recovery only those not
/// in `used_keys`) and advances the cursor past it.
async fn finish_range(
    store: &Store,
    colls: &KeyCollections,
    doc: &PoolDoc,
    range: GenerationRange,
    recovering: bool,
    lease: &LeaseCheck,
    progress: Option<&ProgressBar>,
) -> Result<()> {
    let (format, perm) = pool_order(doc)?;
    // The words added at or before the start of the range: an addition's
    // `from` is a cursor at which no range was pending, so no range
    // straddles it, and a range finished twice (by a stale leader and its
    // successor) skips the same positions both times.
    let blocklist = pool_blocklist(doc, range.from)?;
    let skip: HashSet<u64> = doc.reserved_ahead.iter().copied().collect();
    let mut blocked = 0;
    let mut from = range.from;
    while from < range.to {
        let to = (from + INSERT_CHUNK as u64).min(range.to);
        let mut docs: Vec<KeyDoc> = (from..to)
            .filter(|i| !skip.contains(i))
            .map(|n| {
                let key = format
                    .key_at(perm.apply(n))
                    .expect("perm stays in the space");
                KeyDoc { key, n }
            })
            .filter(|d| {
                let block = blocklist.blocks(&d.key);
                blocked += u64::from(block);
                !block
            })
            .collect();
        if recovering {
            docs = not_used(colls, docs).await?;
        }
        lease.check()?;
        failpoint::hit("checked_insert_generated");
        insert_ignoring_duplicates(&colls.keys, &docs, "insert generated keys").await?;
        if let Some(bar) = progress {
            bar.inc(to - from);
        }
        from = to;
    }
    failpoint::hit("gen_after_insert");
    lease.check()?;
    store
        .pools
        .update_one(
            doc! {
                "_id": &doc.name,
                "generating.from": range.from as i64,
                "generating.to": range.to as i64,
            },
            {
                let mut set = doc! { "cursor": range.to as i64 };
                // Only in a pool with a blocklist: a pool document without
                // the field stays readable by versions before it.
                if !blocklist.is_empty() {
                    set.insert("blocked", (doc.blocked + blocked) as i64);
                }
                let mut update = doc! { "$set": set, "$unset": { "generating": "" } };
                // Reservations the cursor passed are done with (their keys
                // are in `used_keys`; generation skipped them), so the list
                // holds only positions ahead. Nothing is added to it while
                // a range is marked, so this drops nothing new.
                if doc.reserved_ahead.iter().any(|&n| n < range.to) {
                    update.insert(
                        "$pull",
                        doc! { "reserved_ahead": { "$lt": range.to as i64 } },
                    );
                }
                update
            },
        )
        .await
        .map_err(Error::store("advance cursor"))?;
    failpoint::hit("gen_after_cursor");
    tracing::debug!(pool = %doc.name, from = range.from, to = range.to, "generated");
    Ok(())
}

/// The documents whose key is not in `used_keys` (exact `_id` lookups).
async fn not_used(colls: &KeyCollections, docs: Vec<KeyDoc>) -> Result<Vec<KeyDoc>> {
    // Only the `_id` is fetched, so read plain documents.
    let used_ids = colls.used.clone_with_type::<bson::Document>();
    let used_ids = &used_ids;
    futures::stream::iter(docs)
        .map(|d| async move {
            let used = used_ids
                .find_one(doc! { "_id": &d.key })
                .projection(doc! { "_id": 1 })
                .await
                .map_err(Error::store("look up used key"))?;
            Ok::<_, Error>(used.is_none().then_some(d))
        })
        .buffer_unordered(RECOVERY_LOOKUPS)
        .try_filter_map(|d| async move { Ok(d) })
        .try_collect()
        .await
}

/// A progress bar on a terminal (hidden otherwise) for `total` keys.
pub fn progress_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} keys ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}
