//! `kgs-producer recycle`: requests to put handed-out keys back into their
//! pool, so each is handed out again later, exactly once.
//!
//! A request checks the key with [`kgs_schemas::recycle`] and inserts a
//! [`RecycleDoc`] `requested` (`_id` = `<pool>:<key>:<batch>`, so a second
//! request for the same hand-out is a duplicate-key error: "already
//! recycled"). The leader performs it ([`crate::writer::recycles`]). The
//! consumer library makes the same requests for its app servers.

use kgs_schemas::docs::{PoolDoc, RecycleDoc, UsedKeyDoc};
use kgs_schemas::recycle::{check_claim, check_used, ClaimVerdict, Refusal};
use kgs_schemas::{FormatError, KeyFormat};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::{by_id, is_duplicate_key, Store};

/// `kgs-producer recycle`: one request per key, in order, each outcome
/// given to `outcome` as soon as it is known (so a failure part-way still
/// shows what was recorded before it); who asked is recorded as
/// `kgs-producer@<host>`.
pub async fn run(
    config: &Config,
    pool: &str,
    keys: &[String],
    mut outcome: impl FnMut(&str, RecycleOutcome),
) -> Result<()> {
    let store = Store::connect(config).await?;
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".to_owned());
    let requester = Requester::new(&store, pool, format!("kgs-producer@{host}")).await?;
    for key in keys {
        outcome(key, requester.request(key).await?);
    }
    Ok(())
}

/// What became of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecycleOutcome {
    /// Recorded (`_id` given); the leader puts the key back.
    Accepted(String),
    /// Recorded; the leader puts the key back once its quarantine (the
    /// pool's recycle cooldown) ends at the given time.
    Quarantined(String, chrono::DateTime<chrono::Utc>),
    /// Not a key of the pool (length or alphabet).
    BadKey(FormatError),
    /// Refused; nothing changed.
    Refused(Refusal),
}

/// Checks and records recycle requests for one pool.
#[derive(Debug)]
pub struct Requester<'a> {
    store: &'a Store,
    pool: PoolDoc,
    format: KeyFormat,
    by: String,
}

impl<'a> Requester<'a> {
    /// A requester of `pool`, recording `by` as who asked.
    pub async fn new(store: &'a Store, pool: &str, by: String) -> Result<Self> {
        let pool = store.pool(pool).await?;
        let format = KeyFormat::try_from(&pool.format)?;
        Ok(Self {
            store,
            pool,
            format,
            by,
        })
    }

    /// Checks `key` and records the request. Every read is by exact `_id`.
    /// A batch still open in any instance is refused: the command line
    /// cannot see a buffer.
    pub async fn request(&self, key: &str) -> Result<RecycleOutcome> {
        if let Err(e) = self.format.check(key) {
            return Ok(RecycleOutcome::BadKey(e));
        }
        let colls = self.store.key_collections(&self.pool.name);
        let used: Option<UsedKeyDoc> = colls
            .used
            .find_one(by_id(key))
            .await
            .map_err(Error::store("read used key"))?;
        let (batch, n) = match check_used(used.as_ref()) {
            Ok((batch, n)) => (batch.to_owned(), n),
            Err(r) => return Ok(RecycleOutcome::Refused(r)),
        };
        let claim = self
            .store
            .claims
            .find_one(by_id(&batch))
            .await
            .map_err(Error::store("read claim"))?;
        match check_claim(claim.as_ref(), key, &batch, None) {
            Ok(ClaimVerdict::HandedOut) => {}
            // Only a consumer asks about its own buffer; `None` never gets here.
            Ok(ClaimVerdict::AskBuffer) => {
                return Ok(RecycleOutcome::Refused(Refusal::InBuffer { batch }))
            }
            Err(r) => return Ok(RecycleOutcome::Refused(r)),
        }
        let doc = RecycleDoc::request(
            &self.pool.name,
            key,
            &batch,
            n,
            &self.by,
            self.pool.recycle_cooldown_ms,
            self.store.server_now().await?,
        );
        match self.store.recycles.insert_one(&doc).await {
            Ok(_) => {
                tracing::info!(pool = %self.pool.name, key, batch = %doc.batch, "recycle requested");
                Ok(match doc.due_at {
                    Some(until) => RecycleOutcome::Quarantined(doc.id, until),
                    None => RecycleOutcome::Accepted(doc.id),
                })
            }
            Err(e) if is_duplicate_key(&e) => {
                let stored = self
                    .store
                    .recycles
                    .find_one(by_id(&doc.id))
                    .await
                    .map_err(Error::store("read recycle request"))?;
                if stored.is_some_and(|s| doc.is_same_request(&s)) {
                    Ok(RecycleOutcome::Accepted(doc.id))
                } else {
                    Ok(RecycleOutcome::Refused(Refusal::AlreadyRecycled))
                }
            }
            Err(e) => Err(Error::store("insert recycle request")(e)),
        }
    }
}
