//! Recycling a key the application no longer uses (e.g. the id of a deleted
//! short URL): [`KeyConsumer::recycle`] checks it and records a request; the
//! producer leader, the only writer of `keys.<pool>`, moves the key from
//! `used_keys.<pool>` back to `keys.<pool>`, where it waits to be handed out
//! again, once.
//!
//! The checks are [`kgs_schemas::recycle`]'s, with one addition only a
//! consumer process can make: a key of a batch this process still holds open
//! (its claim carries this process's token) is recyclable only if this
//! process's buffer handed it out ([`crate::KeyBuffer::key_state`]). A batch
//! open in any other process — even one with the same instance id — is
//! refused, since that process may still hand the key out.

use std::time::Duration;

use kgs_schemas::docs::{RecycleDoc, RecycleState};
use kgs_schemas::recycle::{check_claim, check_used, ClaimVerdict, Refusal};

use crate::buffer::KeyState;
use crate::error::{Error, Result};
use crate::{metrics, KeyConsumer};

/// What became of an accepted recycle request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecycleOutcome {
    /// Recorded durably; the producer leader will put the key back.
    Accepted {
        /// The request's `_id` in `recycles` (`<pool>:<key>:<batch>`).
        id: String,
    },
    /// The key is back in `keys.<pool>`.
    Done {
        /// The request's `_id`.
        id: String,
    },
    /// Recorded durably; the key is quarantined (the pool's recycle
    /// cooldown) and the producer leader puts it back at `until`.
    Quarantined {
        /// The request's `_id`.
        id: String,
        /// When it goes back into circulation.
        until: chrono::DateTime<chrono::Utc>,
    },
}

impl KeyConsumer {
    /// Asks for `key` (handed out earlier by any instance of the pool) to go
    /// back into the pool. Returns once the request is durable:
    /// [`RecycleOutcome::Accepted`]. Errors, each changing nothing:
    /// [`Error::BadKey`] (not a key of the pool), [`Error::NotRecyclable`]
    /// (not handed out, reserved, still in a buffer, already recycled, …),
    /// [`Error::Store`]. Every read is by exact `_id`.
    pub async fn recycle(&self, key: &str) -> Result<RecycleOutcome> {
        let m = &self.shared.metrics;
        let result = self.request_recycle(key).await;
        let outcome = match &result {
            Ok(_) => "accepted",
            Err(Error::BadKey { .. }) => "bad_key",
            Err(Error::NotRecyclable { refusal, .. }) => refusal.kind(),
            Err(_) => "error",
        };
        metrics::recycle_request(m, key, outcome);
        result
    }

    /// [`KeyConsumer::recycle`], then waits up to `timeout` for the producer
    /// to finish it: [`RecycleOutcome::Done`], or `Accepted` if it has not
    /// yet (it still will). A request the producer refuses on its own
    /// re-check is [`Error::NotRecyclable`] ([`Refusal::Changed`]). A
    /// quarantined key ([`RecycleOutcome::Quarantined`]) is answered at once.
    pub async fn recycle_wait(&self, key: &str, timeout: Duration) -> Result<RecycleOutcome> {
        let id = match self.recycle(key).await? {
            RecycleOutcome::Accepted { id } => id,
            other => return Ok(other),
        };
        let decided = crate::await_decision(timeout, || async {
            Ok(match self.store.recycle(&id).await?.map(|r| r.state) {
                Some(RecycleState::Done) => Some(true),
                Some(RecycleState::Refused) => Some(false),
                _ => None,
            })
        })
        .await?;
        match decided {
            Some(true) => Ok(RecycleOutcome::Done { id }),
            Some(false) => Err(Error::NotRecyclable {
                key: key.to_owned(),
                refusal: Refusal::Changed,
            }),
            None => Ok(RecycleOutcome::Accepted { id }),
        }
    }

    async fn request_recycle(&self, key: &str) -> Result<RecycleOutcome> {
        let refused = |refusal: Refusal| Error::NotRecyclable {
            key: key.to_owned(),
            refusal,
        };
        self.format.check(key).map_err(|source| Error::BadKey {
            key: key.to_owned(),
            source,
        })?;
        let used = self.store.used_key(&self.pool, key).await?;
        let (batch, n) = check_used(used.as_ref()).map_err(refused)?;
        let claim = self.store.claim_of(batch).await?;
        match check_claim(claim.as_ref(), key, batch, Some(&self.token)).map_err(refused)? {
            ClaimVerdict::HandedOut => {}
            ClaimVerdict::AskBuffer => match self.shared.buffer.key_state(batch, key) {
                KeyState::HandedOut => {}
                // Untracked: not pushed yet (claim written, commit pending),
                // or retired a moment before its claim becomes `drained`;
                // either way the claim says open, so refuse (a retry works).
                KeyState::Waiting | KeyState::Untracked => {
                    return Err(refused(Refusal::InBuffer {
                        batch: batch.to_owned(),
                    }))
                }
            },
        }
        let request = RecycleDoc::request(
            &self.pool,
            key,
            batch,
            n,
            &self.instance,
            self.recycle_cooldown_ms,
            self.store.server_now().await?,
        );
        if !self.store.request_recycle(&request).await? {
            return Err(refused(Refusal::AlreadyRecycled));
        }
        Ok(match request.due_at {
            Some(until) => RecycleOutcome::Quarantined {
                id: request.id,
                until,
            },
            None => RecycleOutcome::Accepted { id: request.id },
        })
    }
}
