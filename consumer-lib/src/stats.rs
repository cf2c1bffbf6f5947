//! Pool statistics for the application: the `collStats` figures of the
//! pool's `keys` and `used_keys` collections (the original design's
//! `GET /keys/config`) and the number of keys left (`GET /keys/count`), both
//! from collection metadata, never a scan.

use kgs_schemas::docs::{keys_collection, used_keys_collection};
pub use kgs_schemas::stats::CollStats;
use serde::Serialize;

use crate::error::Result;
use crate::KeyConsumer;

/// Both key collections of the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// Pool name.
    pub pool: String,
    /// `keys.<pool>`: keys not handed out yet.
    pub keys: CollStats,
    /// `used_keys.<pool>`: keys moved for hand-out, and reserved keys.
    pub used_keys: CollStats,
}

impl KeyConsumer {
    /// The `collStats` figures of `keys.<pool>` and `used_keys.<pool>`.
    pub async fn pool_stats(&self) -> Result<PoolStats> {
        let mut both = Vec::with_capacity(2);
        for ns in [
            keys_collection(&self.pool),
            used_keys_collection(&self.pool),
        ] {
            let reply = self.store.coll_stats(&ns).await?;
            both.push(CollStats::from_reply(ns, &reply));
        }
        let used_keys = both.pop().expect("two collections");
        let keys = both.pop().expect("two collections");
        Ok(PoolStats {
            pool: self.pool.clone(),
            keys,
            used_keys,
        })
    }

    /// Keys left in the pool (`keys.<pool>`, not counting keys already moved
    /// for hand-out, in the topic or in buffers), from the collection's
    /// metadata count.
    pub async fn keys_left(&self) -> Result<u64> {
        self.store
            .estimated_count(&keys_collection(&self.pool))
            .await
    }
}
