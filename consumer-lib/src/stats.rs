//! Pool statistics for the application: the `collStats` figures of the
//! pool's `keys` and `used_keys` collections (the original design's
//! `GET /keys/config`) and the number of keys left (`GET /keys/count`), both
//! from collection metadata, never a scan.

use bson::{Bson, Document};
use kgs_schemas::docs::{keys_collection, used_keys_collection};
use serde::Serialize;

use crate::error::Result;
use crate::KeyConsumer;

/// The `collStats` figures of one collection (names as MongoDB prints them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CollStats {
    /// Collection name.
    pub ns: String,
    /// Documents.
    pub count: i64,
    /// Uncompressed data size in bytes.
    pub size: i64,
    /// Average document size in bytes.
    pub avg_obj_size: i64,
    /// Storage size in bytes.
    pub storage_size: i64,
    /// Size of all indexes in bytes.
    pub total_index_size: i64,
}

impl CollStats {
    fn from_reply(ns: String, reply: &Document) -> Self {
        // Servers differ in the integer type (and some send doubles).
        let num = |k: &str| match reply.get(k) {
            Some(Bson::Int32(v)) => i64::from(*v),
            Some(Bson::Int64(v)) => *v,
            Some(Bson::Double(v)) => *v as i64,
            _ => 0,
        };
        Self {
            ns,
            count: num("count"),
            size: num("size"),
            avg_obj_size: num("avgObjSize"),
            storage_size: num("storageSize"),
            total_index_size: num("totalIndexSize"),
        }
    }
}

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
