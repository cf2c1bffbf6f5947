//! The consumer's MongoDB side: reading the pool document and the
//! producer's batch records (to verify a batch before claiming it), writing
//! claim records (`claims`, `_id` = batch id), recycle requests
//! (`recycles`) and the pool's collection statistics.
//!
//! Every query and update names the exact `_id`, so MongoDB serves it from
//! the primary-key index. Claim writes use `w: majority, j: true`: a claim
//! must survive a primary failover before the batch's offset is committed.

use bson::doc;
use bson::Document;
use kgs_schemas::docs::{
    used_keys_collection, ClaimDoc, ClaimState, PoolDoc, RecycleDoc, UsedKeyDoc, BATCHES, CLAIMS,
    POOLS, RECYCLES,
};
use kgs_schemas::mongo::is_duplicate_key;
use kgs_schemas::BatchProof;
use mongodb::options::{Acknowledgment, CollectionOptions, WriteConcern};
use mongodb::{Collection, Database};

use crate::error::{Error, Result};

/// Result of trying to claim a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClaimOutcome {
    /// The claim is ours: hand the batch out once its offset is committed.
    Claimed,
    /// Someone (or an earlier attempt of ours that gave the batch up) holds
    /// it: never hand it out.
    AlreadyClaimed {
        /// Instance holding the claim.
        holder: String,
    },
}

/// Handles on the collections the consumer uses.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    db: Database,
    pools: Collection<PoolDoc>,
    batches: Collection<BatchProof>,
    claims: Collection<ClaimDoc>,
    recycles: Collection<RecycleDoc>,
    vanity: Collection<kgs_schemas::docs::VanityDoc>,
}

impl Store {
    pub fn new(db: &Database) -> Self {
        let durable = WriteConcern::builder()
            .w(Acknowledgment::Majority)
            .journal(true)
            .build();
        Self {
            db: db.clone(),
            pools: db.collection(POOLS),
            batches: db.collection(BATCHES),
            claims: db.collection_with_options(
                CLAIMS,
                CollectionOptions::builder()
                    .write_concern(durable.clone())
                    .build(),
            ),
            // A request is acknowledged to the app only once it is durable.
            recycles: db.collection_with_options(
                RECYCLES,
                CollectionOptions::builder()
                    .write_concern(durable.clone())
                    .build(),
            ),
            vanity: db.collection_with_options(
                kgs_schemas::docs::VANITY,
                CollectionOptions::builder().write_concern(durable).build(),
            ),
        }
    }

    /// The pool's document.
    pub async fn pool(&self, name: &str) -> Result<PoolDoc> {
        self.pools
            .find_one(doc! { "_id": name })
            .await
            .map_err(|source| Error::PoolLookup {
                pool: name.to_owned(),
                source,
            })?
            .ok_or_else(|| Error::PoolNotFound(name.to_owned()))
    }

    /// The pool's topic generation alone (exact `_id`, one field).
    pub async fn topic_generation(&self, name: &str) -> Result<u64> {
        let doc = self
            .pools
            .clone_with_type::<bson::Document>()
            .find_one(doc! { "_id": name })
            .projection(doc! { "topic_generation": 1 })
            .await
            .map_err(|source| Error::PoolLookup {
                pool: name.to_owned(),
                source,
            })?
            .ok_or_else(|| Error::PoolNotFound(name.to_owned()))?;
        Ok(match doc.get("topic_generation") {
            Some(bson::Bson::Int64(n)) => *n as u64,
            Some(bson::Bson::Int32(n)) => *n as u64,
            _ => 0,
        })
    }

    /// The producer's record of `batch` without its key lists (exact `_id`),
    /// to verify a message against before claiming it.
    pub async fn batch_proof(&self, batch: &str) -> Result<Option<BatchProof>> {
        self.batches
            .find_one(doc! { "_id": batch })
            .projection(BatchProof::projection())
            .await
            .map_err(|source| Error::Verify {
                batch: batch.to_owned(),
                source,
            })
    }

    /// Records `claim` (state `open`). The `_id` is the batch id, so a batch
    /// is claimed once only. A duplicate-key error means it is claimed
    /// already; if that claim is this process's own open one (same token,
    /// group, partition and offset: a write retried across a server
    /// restart, or the batch redelivered to us before its commit), it is
    /// still ours: its keys were never handed out, since hand-out happens
    /// only after the commit (the caller never claims again a batch whose
    /// ending it has queued: that claim is on its way back, not ours to
    /// resume). The instance id alone never makes a claim
    /// ours: it is configurable, and another process (a restart, another
    /// group) with the same id may have handed the keys out.
    pub async fn claim(&self, claim: &ClaimDoc) -> Result<ClaimOutcome> {
        let err = match self.claims.insert_one(claim).await {
            Ok(_) => return Ok(ClaimOutcome::Claimed),
            Err(e) if is_duplicate_key(&e) => e,
            Err(source) => {
                return Err(Error::Claim {
                    batch: claim.batch_id.clone(),
                    source,
                })
            }
        };
        let existing = self
            .claims
            .find_one(doc! { "_id": &claim.batch_id })
            .await
            .map_err(|source| Error::Claim {
                batch: claim.batch_id.clone(),
                source,
            })?;
        match existing {
            Some(c)
                if c.token == claim.token
                    && c.group == claim.group
                    && c.state == ClaimState::Open
                    && c.partition == claim.partition
                    && c.offset == claim.offset =>
            {
                Ok(ClaimOutcome::Claimed)
            }
            Some(c) => Ok(ClaimOutcome::AlreadyClaimed { holder: c.instance }),
            // Duplicate key but no document: cannot happen; refuse to be safe.
            None => Err(Error::Claim {
                batch: claim.batch_id.clone(),
                source: err,
            }),
        }
    }

    /// Ends our open claim on a batch: `drained` if `return_keys` is empty,
    /// else `returning` with those keys for the producer to move back to
    /// `keys` (ClaimDoc has no other field to set: it denies unknown fields).
    /// Conditional on the claim being this process's (`token`) and open, so
    /// a repeated call changes nothing and another process with the same
    /// instance id cannot end it.
    /// Returns whether this call changed the claim.
    pub async fn end_claim(
        &self,
        batch: &str,
        token: &str,
        return_keys: Vec<String>,
    ) -> Result<bool> {
        let state = if return_keys.is_empty() {
            ClaimState::Drained
        } else {
            ClaimState::Returning
        };
        let r = self
            .claims
            .update_one(
                doc! { "_id": batch, "state": ClaimState::Open, "token": token },
                doc! { "$set": {
                    "state": state,
                    "return_keys": return_keys,
                } },
            )
            .await
            .map_err(|source| Error::Return {
                batch: batch.to_owned(),
                source,
            })?;
        Ok(r.modified_count == 1)
    }
}

impl Store {
    /// The `used_keys.<pool>` document of `key`, by `_id`.
    pub async fn used_key(&self, pool: &str, key: &str) -> Result<Option<UsedKeyDoc>> {
        self.db
            .collection::<UsedKeyDoc>(&used_keys_collection(pool))
            .find_one(doc! { "_id": key })
            .await
            .map_err(|source| Error::Store {
                op: "reading used_keys",
                source,
            })
    }

    /// The claim of `batch`, by `_id`.
    pub async fn claim_of(&self, batch: &str) -> Result<Option<ClaimDoc>> {
        self.claims
            .find_one(doc! { "_id": batch })
            .await
            .map_err(|source| Error::Store {
                op: "reading a claim",
                source,
            })
    }

    /// Records a recycle request; `false` if another request with this
    /// `_id` exists (a retried insert of this very request is `true`).
    pub async fn request_recycle(&self, request: &RecycleDoc) -> Result<bool> {
        match self.recycles.insert_one(request).await {
            Ok(_) => Ok(true),
            Err(e) if is_duplicate_key(&e) => Ok(self
                .recycle(&request.id)
                .await?
                .is_some_and(|stored| request.is_same_request(&stored))),
            Err(source) => Err(Error::Store {
                op: "recording a recycle request",
                source,
            }),
        }
    }

    /// Records a vanity key request. `Some(stored)` if the key was asked
    /// for already (the duplicate's stored request, which may be this very
    /// one, its insert retried), `None` once recorded.
    pub async fn request_vanity(
        &self,
        request: &kgs_schemas::docs::VanityDoc,
    ) -> Result<Option<kgs_schemas::docs::VanityDoc>> {
        match self.vanity.insert_one(request).await {
            Ok(_) => Ok(None),
            Err(e) if is_duplicate_key(&e) => self.vanity_request(&request.id).await,
            Err(source) => Err(Error::Store {
                op: "recording a vanity key request",
                source,
            }),
        }
    }

    /// The server's clock ([`kgs_schemas::mongo::server_now`]); the local
    /// one only if the reply has none (every MongoDB server sends it).
    pub async fn server_now(&self) -> Result<chrono::DateTime<chrono::Utc>> {
        let now = kgs_schemas::mongo::server_now(&self.db)
            .await
            .map_err(|source| Error::Store {
                op: "reading the server clock",
                source,
            })?;
        Ok(now.unwrap_or_else(chrono::Utc::now))
    }

    /// A vanity key request, by `_id`.
    pub async fn vanity_request(&self, id: &str) -> Result<Option<kgs_schemas::docs::VanityDoc>> {
        self.vanity
            .find_one(doc! { "_id": id })
            .await
            .map_err(|source| Error::Store {
                op: "reading a vanity key request",
                source,
            })
    }

    /// A recycle request, by `_id`.
    pub async fn recycle(&self, id: &str) -> Result<Option<RecycleDoc>> {
        self.recycles
            .find_one(doc! { "_id": id })
            .await
            .map_err(|source| Error::Store {
                op: "reading a recycle request",
                source,
            })
    }

    /// The `collStats` reply of a collection.
    pub async fn coll_stats(&self, collection: &str) -> Result<Document> {
        self.db
            .run_command(doc! { "collStats": collection })
            .await
            .map_err(|source| Error::Store {
                op: "collStats",
                source,
            })
    }

    /// The document count of a collection from its metadata (no scan).
    pub async fn estimated_count(&self, collection: &str) -> Result<u64> {
        self.db
            .collection::<Document>(collection)
            .estimated_document_count()
            .await
            .map_err(|source| Error::Store {
                op: "counting documents",
                source,
            })
    }
}
