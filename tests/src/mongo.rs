//! MongoDB: a client of the test server and plain reads of kgs's collections.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::env::mongodb_uri;

/// A MongoDB client for the test server, with a short server-selection timeout
/// so an absent server fails the test quickly and clearly.
pub async fn mongo_client() -> Result<mongodb::Client> {
    let mut opts = mongodb::options::ClientOptions::parse(mongodb_uri())
        .await
        .context("parsing KGS_MONGODB_URI")?;
    opts.server_selection_timeout = Some(Duration::from_secs(10));
    mongodb::Client::with_options(opts).context("creating MongoDB client")
}

/// The pool document of `pool` in database `db`.
pub async fn pool_doc(db: &str, pool: &str) -> Result<kgs_schemas::docs::PoolDoc> {
    mongo_client()
        .await?
        .database(db)
        .collection::<kgs_schemas::docs::PoolDoc>(kgs_schemas::docs::POOLS)
        .find_one(bson::doc! { "_id": pool })
        .await?
        .with_context(|| format!("no pool document {pool:?} in {db}"))
}

/// Every document of collection `coll` in database `db` matching `filter`.
pub async fn find_docs(
    db: &str,
    coll: &str,
    filter: bson::Document,
) -> Result<Vec<bson::Document>> {
    use futures::TryStreamExt;
    let docs = mongo_client()
        .await?
        .database(db)
        .collection::<bson::Document>(coll)
        .find(filter)
        .await
        .with_context(|| format!("find in {db}.{coll}"))?
        .try_collect()
        .await
        .with_context(|| format!("read {db}.{coll}"))?;
    Ok(docs)
}

/// Every `_id` (all strings in kgs's key collections) of `coll` in `db`.
pub async fn string_ids(db: &str, coll: &str) -> Result<Vec<String>> {
    find_docs(db, coll, bson::doc! {})
        .await?
        .iter()
        .map(|d| {
            d.get_str("_id")
                .map(str::to_owned)
                .with_context(|| format!("{db}.{coll}: _id is not a string"))
        })
        .collect()
}
