//! The `collStats` figures kgs reports for a pool's key collections (the
//! original design's `GET /keys/config`), shared by `kgs-producer stats` and
//! the consumer library, so both read a server's reply the same way.

use bson::{Bson, Document};
use serde::Serialize;

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
    /// The figures of a `collStats` command reply for collection `ns`; a
    /// figure the server does not report is 0.
    pub fn from_reply(ns: String, reply: &Document) -> Self {
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

#[cfg(test)]
mod tests {
    use bson::doc;

    use super::*;

    #[test]
    fn reads_every_integer_type_and_defaults_to_zero() {
        let reply = doc! { "count": 3_i32, "size": 90_i64, "avgObjSize": 30.0, "ok": 1 };
        let s = CollStats::from_reply("keys.p".into(), &reply);
        assert_eq!(
            s,
            CollStats {
                ns: "keys.p".into(),
                count: 3,
                size: 90,
                avg_obj_size: 30,
                storage_size: 0,
                total_index_size: 0,
            }
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["avgObjSize"], 30);
        assert_eq!(json["totalIndexSize"], 0);
    }
}
