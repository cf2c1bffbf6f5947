//! Vanity keys: [`KeyConsumer::take_key`] takes one specific key for a user
//! (a custom short link) if, and only if, it was never handed out. The
//! consumer records a request (`vanity`, `_id` = `<pool>:<key>`, one per key
//! ever: of two concurrent requests exactly one is recorded); the producer
//! leader, the only writer of the key collections, decides it with the
//! writes of `kgs-producer reserve` (reason `vanity`), so a vanity key can
//! never collide with a generated one: whichever of the request and a batch
//! move inserts the key's `used_keys` document first wins, the other drops
//! it.

use std::time::Duration;

use chrono::Utc;
use kgs_schemas::docs::{vanity_id, VanityDoc, VanityState};

use crate::error::{Error, Result};
use crate::KeyConsumer;

/// What became of a vanity key request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VanityOutcome {
    /// The key is the requester's: in `used_keys` with reason `vanity`,
    /// never to be handed out.
    Taken,
    /// Recorded durably, not decided within the wait; the leader decides it
    /// (the request's `_id` tells where to look).
    Accepted {
        /// The request's `_id` in `vanity`.
        id: String,
    },
}

impl KeyConsumer {
    /// Takes `key` for a user if it was never handed out, reserved or
    /// asked for, waiting up to `timeout` for the producer leader to decide:
    /// [`VanityOutcome::Taken`], or `Accepted` if not decided yet.
    /// [`Error::BadKey`] for a key not of the pool's format,
    /// [`Error::KeyTaken`] with the reason otherwise (nothing changed).
    pub async fn take_key(&self, key: &str, timeout: Duration) -> Result<VanityOutcome> {
        self.format.check(key).map_err(|source| Error::BadKey {
            key: key.to_owned(),
            source,
        })?;
        let taken = |reason: &str| Error::KeyTaken {
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        // A key in `used_keys` is gone already: no request for it.
        if self.store.used_key(&self.pool, key).await?.is_some() {
            return Err(taken("already handed out or reserved"));
        }
        let request = VanityDoc {
            id: vanity_id(&self.pool, key),
            pool: self.pool.clone(),
            key: key.to_owned(),
            state: VanityState::Requested,
            reason: None,
            requested_by: self.instance.clone(),
            token: uuid::Uuid::new_v4().simple().to_string(),
            requested_at: Utc::now(),
            done_at: None,
        };
        if let Some(stored) = self.store.request_vanity(&request).await? {
            // Our own insert, applied and retried, is ours; anything else
            // is another request's.
            if stored.token != request.token {
                return Err(taken(match stored.state {
                    VanityState::Requested => "asked for by another request",
                    VanityState::Taken => "taken by another request",
                    VanityState::Refused => stored.reason.as_deref().unwrap_or("refused"),
                }));
            }
        }
        let decided = crate::await_decision(timeout, || async {
            Ok(self
                .store
                .vanity_request(&request.id)
                .await?
                .filter(|r| r.state != VanityState::Requested))
        })
        .await?;
        match decided {
            Some(r) if r.state == VanityState::Taken => Ok(VanityOutcome::Taken),
            Some(r) => Err(taken(r.reason.as_deref().unwrap_or("refused"))),
            None => Ok(VanityOutcome::Accepted { id: request.id }),
        }
    }
}
