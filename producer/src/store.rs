//! MongoDB access: connecting with a bounded retry, the typed collections of
//! one pool, and the duplicate-key helpers every idempotent step relies on.
//!
//! All writes use write concern `majority` with journaling: a step is only
//! considered done (and the next one, e.g. publishing, only starts) once it
//! would survive a failover or a crash of the server.

use std::time::Duration;

use bson::{doc, Document};
use futures::TryStreamExt;
use kgs_schemas::docs::{
    self, BatchRecord, ClaimDoc, KeyDoc, LeaseDoc, LeaseEpochDoc, PoolDoc, RecycleDoc, UsedKeyDoc,
};
use kgs_schemas::mongo::DUPLICATE_KEY;
pub use kgs_schemas::mongo::{code_of, is_duplicate_key};
use kgs_schemas::mongo::{connect_failure, ConnectFailure};
use mongodb::error::ErrorKind;
use mongodb::options::{Acknowledgment, ClientOptions, WriteConcern};
use mongodb::{Client, Collection, Database};

use crate::config::Config;
use crate::error::{Error, Result};

/// The database of kgs and its shared collections.
#[derive(Debug, Clone)]
pub struct Store {
    /// The database, with majority + journaled writes.
    pub db: Database,
    /// `pools`.
    pub pools: Collection<PoolDoc>,
    /// `leases`.
    pub leases: Collection<LeaseDoc>,
    /// `lease_epochs`.
    pub lease_epochs: Collection<LeaseEpochDoc>,
    /// `batches`.
    pub batches: Collection<BatchRecord>,
    /// `claims`.
    pub claims: Collection<ClaimDoc>,
    /// `recycles`.
    pub recycles: Collection<RecycleDoc>,
    /// `vanity`.
    pub vanity: Collection<kgs_schemas::docs::VanityDoc>,
}

/// The two key collections of one pool.
#[derive(Debug, Clone)]
pub struct KeyCollections {
    /// `keys.<pool>`: unused keys.
    pub keys: Collection<KeyDoc>,
    /// `used_keys.<pool>`: moved and reserved keys.
    pub used: Collection<UsedKeyDoc>,
}

impl Store {
    /// Connects, retrying with backoff until `config.connect_timeout`, so a
    /// server that is merely slow to start is waited for, and an absent one
    /// is reported in one line.
    pub async fn connect(config: &Config) -> Result<Self> {
        let unreachable = |detail: String| Error::Unreachable {
            server: "MongoDB",
            address: kgs_schemas::mongo::redact_uri(&config.mongodb_uri),
            detail,
        };
        let mut opts = ClientOptions::parse(&config.mongodb_uri)
            .await
            .map_err(|e| Error::Config(format!("mongodb_uri: {e}")))?;
        opts.server_selection_timeout = Some(Duration::from_secs(5));
        opts.app_name = Some("kgs-producer".to_owned());
        opts.write_concern = Some(
            WriteConcern::builder()
                .w(Acknowledgment::Majority)
                .journal(true)
                .build(),
        );
        let client = Client::with_options(opts).map_err(|e| unreachable(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + config.connect_timeout;
        let mut backoff = Duration::from_millis(200);
        loop {
            let err = match client
                .database("admin")
                .run_command(doc! { "ping": 1 })
                .await
            {
                Ok(_) => break,
                Err(e) => e,
            };
            match connect_failure(&err) {
                // Bad credentials, or a server certificate this client does
                // not trust, stay so: no retry.
                ConnectFailure::Refused(detail) => {
                    return Err(Error::Unauthorized {
                        server: "MongoDB",
                        address: kgs_schemas::mongo::redact_uri(&config.mongodb_uri),
                        detail,
                    });
                }
                ConnectFailure::Unreachable(detail)
                    if tokio::time::Instant::now() + backoff < deadline =>
                {
                    tracing::info!(cause = %detail, retry_in_ms = backoff.as_millis() as u64, "MongoDB not ready");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                ConnectFailure::Unreachable(detail) => return Err(unreachable(detail)),
            }
        }
        let db = client.database(&config.mongodb_db);
        Ok(Self {
            pools: db.collection(docs::POOLS),
            leases: db.collection(docs::LEASES),
            lease_epochs: db.collection(docs::LEASE_EPOCHS),
            batches: db.collection(docs::BATCHES),
            claims: db.collection(docs::CLAIMS),
            recycles: db.collection(docs::RECYCLES),
            vanity: db.collection(docs::VANITY),
            db,
        })
    }

    /// The server's clock ([`kgs_schemas::mongo::server_now`]).
    pub async fn server_now(&self) -> Result<chrono::DateTime<chrono::Utc>> {
        kgs_schemas::mongo::server_now(&self.db)
            .await
            .map_err(Error::store("read the server clock"))?
            .ok_or_else(|| {
                Error::Config(
                    "the MongoDB server's hello reply has no localTime; kgs needs the server clock"
                        .into(),
                )
            })
    }

    /// The key collections of `pool`.
    pub fn key_collections(&self, pool: &str) -> KeyCollections {
        KeyCollections {
            keys: self.db.collection(&docs::keys_collection(pool)),
            used: self.db.collection(&docs::used_keys_collection(pool)),
        }
    }

    /// The pool document, or [`Error::NoSuchPool`].
    pub async fn pool(&self, pool: &str) -> Result<PoolDoc> {
        self.pools
            .find_one(doc! { "_id": pool })
            .await
            .map_err(Error::store("read pool"))?
            .ok_or_else(|| Error::NoSuchPool(pool.to_owned()))
    }

    /// Creates the collections and indexes a pool needs (idempotent).
    pub async fn ensure_collections(&self, pool: &str) -> Result<()> {
        use mongodb::IndexModel;
        let existing = self
            .db
            .list_collection_names()
            .await
            .map_err(Error::store("list collections"))?;
        for name in [
            docs::POOLS.to_owned(),
            docs::LEASES.to_owned(),
            docs::LEASE_EPOCHS.to_owned(),
            docs::BATCHES.to_owned(),
            docs::CLAIMS.to_owned(),
            docs::RECYCLES.to_owned(),
            docs::keys_collection(pool),
            docs::used_keys_collection(pool),
        ] {
            if !existing.contains(&name) {
                match self.db.create_collection(&name).await {
                    // 48 = NamespaceExists: another init created it meanwhile.
                    Err(e) if code_of(&e) == Some(48) => {}
                    r => r.map_err(Error::store("create collection"))?,
                }
            }
        }
        // Batches are taken smallest `n` first: an index scan, not a sort.
        let keys = self.key_collections(pool).keys;
        keys.create_index(IndexModel::builder().keys(doc! { "n": 1 }).build())
            .await
            .map_err(Error::store("create index keys.n"))?;
        // Recovery looks for unfinished batches and returning claims of a pool.
        self.batches
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "pool": 1, "state": 1 })
                    .build(),
            )
            .await
            .map_err(Error::store("create index batches.pool_state"))?;
        // The exact backlog counts published batches at or after an offset.
        self.batches
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "pool": 1, "partition": 1, "offset": 1 })
                    .build(),
            )
            .await
            .map_err(Error::store("create index batches.pool_partition_offset"))?;
        self.claims
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "pool": 1, "state": 1 })
                    .build(),
            )
            .await
            .map_err(Error::store("create index claims.pool_state"))?;
        // The leader looks for the pool's `requested` recycles every pass.
        self.recycles
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "pool": 1, "state": 1 })
                    .build(),
            )
            .await
            .map_err(Error::store("create index recycles.pool_state"))?;
        // ... of them, the due ones (quarantine), and `stats` the next due.
        self.recycles
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "pool": 1, "state": 1, "due_at": 1 })
                    .build(),
            )
            .await
            .map_err(Error::store("create index recycles.pool_state_due"))?;
        // The leader looks for the pool's `requested` vanity keys every pass.
        self.vanity
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "pool": 1, "state": 1 })
                    .build(),
            )
            .await
            .map_err(Error::store("create index vanity.pool_state"))?;
        Ok(())
    }
}

/// The outcome of an unordered `insert_many` where duplicates are expected.
#[derive(Debug, Default)]
pub struct InsertOutcome {
    /// Positions (in the input) of documents that already existed.
    pub duplicates: Vec<usize>,
}

/// Inserts `docs` unordered; documents that already exist are reported, not
/// errors, because every insert of the protocol may be a retry after a crash
/// (or after the driver's own retry across a server restart).
pub async fn insert_ignoring_duplicates<T>(
    coll: &Collection<T>,
    docs: &[T],
    op: &'static str,
) -> Result<InsertOutcome>
where
    T: serde::Serialize + Send + Sync,
{
    if docs.is_empty() {
        return Ok(InsertOutcome::default());
    }
    match coll.insert_many(docs).ordered(false).await {
        Ok(_) => Ok(InsertOutcome::default()),
        Err(e) => match e.kind.as_ref() {
            ErrorKind::InsertMany(m)
                if m.write_concern_error.is_none()
                    && m.write_errors
                        .as_ref()
                        .is_some_and(|w| w.iter().all(|w| w.code == DUPLICATE_KEY)) =>
            {
                let duplicates = m
                    .write_errors
                    .as_ref()
                    .map(|w| w.iter().map(|w| w.index).collect())
                    .unwrap_or_default();
                Ok(InsertOutcome { duplicates })
            }
            _ => Err(Error::Store { op, source: e }),
        },
    }
}

/// Statements per `delete` command: MongoDB accepts up to 100,000 per batch;
/// 1,000 keeps each request small and the server's work per request bounded.
const DELETES_PER_COMMAND: usize = 1_000;

/// Deletes the documents with these `_id`s from `collection` with one
/// `delete` command per 1,000 ids, each statement `{q: {_id}, limit: 1}`:
/// served by the `_id` index on any MongoDB-wire server, one round trip and
/// one journal commit per command (single `delete_one`s cost one each).
/// Returns how many were deleted; ids already gone are not errors.
pub async fn delete_by_ids(
    db: &Database,
    collection: &str,
    ids: &[String],
    op: &'static str,
) -> Result<u64> {
    let mut deleted = 0;
    for chunk in ids.chunks(DELETES_PER_COMMAND) {
        let deletes: Vec<Document> = chunk
            .iter()
            .map(|id| doc! { "q": { "_id": id }, "limit": 1 })
            .collect();
        let reply = db
            .run_command(doc! {
                "delete": collection,
                "deletes": deletes,
                "ordered": false,
                "writeConcern": { "w": "majority", "j": true },
            })
            .await
            .map_err(Error::store(op))?;
        deleted += affected(&reply, op)?;
    }
    Ok(deleted)
}

/// Moves the `used_keys` documents of `ids` from batch `from` to batch `to`
/// (a re-batch, see [`kgs_schemas::docs::BatchRecord::from`]) with one
/// `update` command per 1,000 ids, each statement `{q: {_id, batch: from},
/// u: {$set: {batch: to, at}}}`: served by the `_id` index, one round trip
/// and one journal commit per command. Returns how many documents matched;
/// a document no longer in `from` (moved by an earlier attempt, or taken by
/// something else) is not an error, and the caller reads back which.
pub async fn rebatch_used(
    db: &Database,
    collection: &str,
    ids: &[String],
    from: &str,
    to: &str,
) -> Result<u64> {
    const OP: &str = "re-batch used keys";
    let mut matched = 0;
    let at = bson::DateTime::now();
    for chunk in ids.chunks(DELETES_PER_COMMAND) {
        let updates: Vec<Document> = chunk
            .iter()
            .map(|id| {
                doc! {
                    "q": { "_id": id, "batch": from, "reason": "batch" },
                    "u": { "$set": { "batch": to, "at": at } },
                }
            })
            .collect();
        let reply = db
            .run_command(doc! {
                "update": collection,
                "updates": updates,
                "ordered": false,
                "writeConcern": { "w": "majority", "j": true },
            })
            .await
            .map_err(Error::store(OP))?;
        matched += affected(&reply, OP)?;
    }
    Ok(matched)
}

/// The `n` of a `delete` or `update` command's reply (documents deleted /
/// matched); write errors and write concern errors are errors.
fn affected(reply: &Document, op: &'static str) -> Result<u64> {
    if let Ok(errors) = reply.get_array("writeErrors") {
        if !errors.is_empty() {
            return Err(Error::StoreWrite {
                op,
                detail: format!("{} write errors, first {:?}", errors.len(), errors[0]),
            });
        }
    }
    if let Ok(wce) = reply.get_document("writeConcernError") {
        return Err(Error::StoreWrite {
            op,
            detail: format!("write concern error {wce}"),
        });
    }
    Ok(match reply.get("n") {
        Some(bson::Bson::Int32(n)) => *n as u64,
        Some(bson::Bson::Int64(n)) => *n as u64,
        _ => 0,
    })
}

/// Every document of `coll` matching `filter` (the caller makes sure an
/// index serves it), read to the end; `op` names the read in errors.
pub async fn find_all<T>(coll: &Collection<T>, filter: Document, op: &'static str) -> Result<Vec<T>>
where
    T: serde::de::DeserializeOwned + Send + Sync,
{
    coll.find(filter)
        .await
        .map_err(Error::store(op))?
        .try_collect()
        .await
        .map_err(Error::store(op))
}

/// `{ _id: id }`.
pub fn by_id(id: &str) -> Document {
    doc! { "_id": id }
}
