//! `kgs-producer stats`: the original design's collStats figures of a pool's
//! `keys` and `used_keys`, its generation progress, per-partition backlog and
//! leader.

use std::sync::Arc;

use bson::{doc, Document};
use kgs_schemas::docs::{self, LeaseDoc, PoolDoc};
pub use kgs_schemas::stats::CollStats;
use rdkafka::consumer::BaseConsumer;
use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::kafka::{backlog, PartitionBacklog};
use crate::store::{find_all, Store};

/// Everything `stats` reports about a pool.
#[derive(Debug, Clone, Serialize)]
pub struct PoolStats {
    /// Pool name.
    pub pool: String,
    /// Size of the key space.
    pub space: u64,
    /// Positions generated (cursor).
    pub generated: u64,
    /// The pool's key lengths: `3`, or `3 to 7`.
    pub lengths: String,
    /// The length of the new keys handed out now (the tier in use).
    pub tier_length: u8,
    /// Keys of that length not yet moved into batches (blocked and
    /// reserved ones included); the next length starts after them.
    pub tier_left: u64,
    /// The next length, if the pool has a longer one.
    pub next_length: Option<u8>,
    /// Keys in `keys`.
    pub in_keys: i64,
    /// Keys in `used_keys` (batches and reserved).
    pub used: i64,
    /// Of which reserved.
    pub reserved: u64,
    /// Generated positions skipped: their key holds a blocked word.
    pub blocked: u64,
    /// Words in the pool's blocklist (added ones included).
    pub blocklist_words: usize,
    /// Words added after `init`.
    pub blocklist_added_words: usize,
    /// Additions the leader has not swept `keys` for yet.
    pub blocklist_unswept: u64,
    /// Keys the sweeps took out of `keys` for added words.
    pub blocklist_removed: u64,
    /// Keys matching added words handed out before they were added.
    pub blocklist_handed_out: u64,
    /// The pool's recycle cooldown, in milliseconds.
    pub recycle_cooldown_ms: u64,
    /// Recycled keys in quarantine (requests not yet due).
    pub quarantined: u64,
    /// When the first of them goes back into circulation.
    pub next_release: Option<chrono::DateTime<chrono::Utc>>,
    /// used / space.
    pub fraction_used: f64,
    /// collStats of `keys.<pool>`.
    pub keys: CollStats,
    /// collStats of `used_keys.<pool>`.
    pub used_keys: CollStats,
    /// Backlog per partition for the group.
    pub group: String,
    /// Per-partition backlog.
    pub partitions: Vec<PartitionBacklog>,
    /// Lease holder, if any.
    pub leader: Option<String>,
    /// Lease epoch.
    pub epoch: Option<u64>,
    /// Whether the lease is currently held (not expired).
    pub lease_live: bool,
}

/// Stats of `pool`, or of every pool.
pub async fn stats(config: &Config, pool: Option<&str>) -> Result<Vec<PoolStats>> {
    let store = Store::connect(config).await?;
    let pools: Vec<PoolDoc> = match pool {
        Some(p) => vec![store.pool(p).await?],
        None => find_all(&store.pools, doc! {}, "list pools").await?,
    };
    let mut out = Vec::new();
    for p in pools {
        out.push(pool_stats(config, &store, &p).await?);
    }
    Ok(out)
}

async fn pool_stats(config: &Config, store: &Store, p: &PoolDoc) -> Result<PoolStats> {
    let keys = coll_stats(store, &docs::keys_collection(&p.name)).await?;
    let used_keys = coll_stats(store, &docs::used_keys_collection(&p.name)).await?;
    // An operator command: a filtered count is acceptable here.
    let reserved = store
        .key_collections(&p.name)
        .used
        .count_documents(doc! { "reason": "reserved" })
        .await
        .map_err(Error::store("count reserved keys"))?;
    // Both served by the `{pool, state, due_at}` index.
    let not_due = doc! {
        "pool": &p.name, "state": "requested",
        "due_at": { "$gt": bson::DateTime::from_chrono(store.server_now().await?) },
    };
    let quarantined = store
        .recycles
        .count_documents(not_due.clone())
        .await
        .map_err(Error::store("count quarantined keys"))?;
    let next_release = store
        .recycles
        .find_one(not_due)
        .sort(doc! { "due_at": 1 })
        .await
        .map_err(Error::store("read the next quarantined key"))?
        .and_then(|r| r.due_at);
    let group = config.group_of(p);
    let reader: BaseConsumer = config
        .kafka_reader(&group)
        .create()
        .map_err(Error::kafka("create offset reader"))?;
    let partitions = backlog(&Arc::new(reader), &p.topic, p.partitions as i32).await?;
    let lease: Option<LeaseDoc> = store
        .leases
        .find_one(doc! { "_id": &p.name })
        .await
        .map_err(Error::store("read lease"))?;
    let (tier, tier_left) = crate::writer::generate::tier_in_use(p)?;
    Ok(PoolStats {
        pool: p.name.clone(),
        space: p.space,
        generated: p.cursor,
        lengths: p.format.lengths(),
        tier_length: tier.length,
        tier_left,
        next_length: (u32::from(tier.length) < p.format.longest()).then_some(tier.length + 1),
        in_keys: keys.count,
        used: used_keys.count,
        reserved,
        blocked: p.blocked,
        blocklist_words: p.blocklist_all().len(),
        blocklist_added_words: p.blocklist_added.iter().map(|a| a.words.len()).sum(),
        blocklist_unswept: (p.blocklist_added.len() as u64).saturating_sub(p.blocklist_swept),
        blocklist_removed: p.blocklist_removed,
        blocklist_handed_out: p.blocklist_handed_out,
        recycle_cooldown_ms: p.recycle_cooldown_ms,
        quarantined,
        next_release,
        fraction_used: used_keys.count as f64 / p.space as f64,
        keys,
        used_keys,
        group,
        partitions,
        lease_live: lease
            .as_ref()
            .is_some_and(|l| l.expires_at > chrono::Utc::now()),
        leader: lease.as_ref().map(|l| l.holder.clone()),
        epoch: lease.map(|l| l.epoch),
    })
}

async fn coll_stats(store: &Store, name: &str) -> Result<CollStats> {
    let reply: Document = store
        .db
        .run_command(doc! { "collStats": name })
        .await
        .map_err(Error::store("collStats"))?;
    Ok(CollStats::from_reply(name.to_owned(), &reply))
}

/// The human-readable form of `stats`.
pub fn render(s: &PoolStats) -> String {
    let mut out = format!(
        "pool {}: space {}, generated {} ({:.2}%), in keys {}, used {} ({:.4}% of space), reserved {}, blocked {} ({} words)\n",
        s.pool,
        s.space,
        s.generated,
        s.generated as f64 / s.space as f64 * 100.0,
        s.in_keys,
        s.used,
        s.fraction_used * 100.0,
        s.reserved,
        s.blocked,
        s.blocklist_words
    );
    if s.blocklist_added_words > 0 {
        out += &format!(
            "  blocklist: {} words added later, {} additions waiting for the leader's sweep, {} keys taken out of keys, {} handed out before (not recalled)\n",
            s.blocklist_added_words, s.blocklist_unswept, s.blocklist_removed, s.blocklist_handed_out
        );
    }
    out += &format!(
        "  lengths {}: handing out length {}, {} left of it{}\n",
        s.lengths,
        s.tier_length,
        s.tier_left,
        s.next_length
            .map(|l| format!(", then length {l}"))
            .unwrap_or_else(|| " (the longest)".to_owned())
    );
    out += &format!(
        "  recycling: cooldown {} s, {} keys quarantined{}\n",
        s.recycle_cooldown_ms / 1000,
        s.quarantined,
        s.next_release
            .map(|t| format!(
                ", next back at {}",
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ))
            .unwrap_or_default()
    );
    for c in [&s.keys, &s.used_keys] {
        out += &format!(
            "  {}: count {}, size {}, avgObjSize {}, storageSize {}, totalIndexSize {}\n",
            c.ns, c.count, c.size, c.avg_obj_size, c.storage_size, c.total_index_size
        );
    }
    for b in &s.partitions {
        out += &format!(
            "  partition {}: end offset {}, committed {}, backlog {} batches (group {})\n",
            b.partition,
            b.end,
            b.committed.map_or("-".to_owned(), |c| c.to_string()),
            b.batches,
            s.group
        );
    }
    out += &format!(
        "  leader: {} (epoch {}, {})\n",
        s.leader.as_deref().unwrap_or("none"),
        s.epoch.map_or("-".to_owned(), |e| e.to_string()),
        if s.lease_live { "live" } else { "expired" }
    );
    out
}
