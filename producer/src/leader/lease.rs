//! The pool lease: at most one producer moves and publishes a pool's keys.
//!
//! The lease is one [`LeaseDoc`] per pool, renewed with a conditional
//! `update_one` by exact `_id` (`{holder: me, epoch: mine}`). A takeover of an
//! expired lease first inserts a [`LeaseEpochDoc`] for the next epoch, whose
//! unique `_id` lets exactly one taker win, then moves the lease to that
//! epoch; the very first lease is an insert that loses to a concurrent insert
//! with E11000. Only inserts decide races, because a conditional update is
//! not an atomic compare-and-set on every MongoDB-wire server. Every batch carries the epoch, and every
//! protocol step first checks [`LeaseCheck::check`], which fails once the
//! local validity (the last renewal's start + duration − a safety margin) has
//! passed, so a paused process stops before a successor may start.
//!
//! Every lease time is the database server's clock (`hello.localTime`): the
//! holder writes `expires_at` = server time + duration, a taker compares it
//! with the server time, so host clocks never matter. The local validity is
//! measured with the monotonic clock from the start of the renewal, and is a
//! fifth shorter than the lease: the holder stops before the server could
//! call the lease expired, whatever the renewal's round trip took.
//!
//! A holder that sees the next epoch claimed steps down at once: the claim
//! means a taker found the lease expired, and on servers without an atomic
//! compare-and-set this is what keeps a racing renewal from undoing a
//! takeover for good.

use std::time::Duration;

use bson::doc;
use chrono::{DateTime, Utc};
use kgs_schemas::docs::{LeaseDoc, LeaseEpochDoc};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::store::{is_duplicate_key, Store};

/// The `_id` of the claim of `epoch` of `pool`.
fn epoch_id(pool: &str, epoch: u64) -> String {
    format!("{pool}:{epoch}")
}

/// What this process knows about its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Not yet asked, or the database did not answer the last attempt.
    Unknown,
    /// Another producer holds the lease; this one waits.
    Standby,
    /// This process leads until `valid_until` unless renewed.
    Leader {
        /// The lease epoch.
        epoch: u64,
        /// Local deadline after which no step may start.
        valid_until: Instant,
    },
}

/// One attempt to take or renew a pool's lease.
#[derive(Debug, Clone)]
pub struct Lease {
    store: Store,
    pool: String,
    holder: String,
    /// New for every `Lease` (so per process): what renewal, release and a
    /// retried epoch claim match, since instance ids are configurable.
    token: String,
    duration: Duration,
}

impl Lease {
    /// A lease of `pool` for `holder`, lasting `duration` per renewal.
    pub fn new(store: Store, pool: &str, holder: &str, duration: Duration) -> Self {
        Self {
            store,
            pool: pool.to_owned(),
            holder: holder.to_owned(),
            token: uuid::Uuid::new_v4().simple().to_string(),
            duration,
        }
    }

    /// The database server's clock (`hello.localTime`). Every lease time is
    /// the server's, so no two hosts' clocks are ever compared: a producer
    /// whose host clock is off by any amount neither steals a live lease nor
    /// keeps an expired one.
    async fn server_now(&self) -> Result<DateTime<Utc>> {
        self.store.server_now().await
    }

    /// Renews the lease held at `epoch`, or takes it if it is free.
    /// Returns the epoch held, or `None` if another producer holds it.
    pub async fn acquire(&self, held: Option<u64>) -> Result<Option<u64>> {
        let now = self.server_now().await?;
        let expires_at = bson::DateTime::from_chrono(now + self.duration);
        let leases = &self.store.leases;
        if let Some(epoch) = held {
            let r = leases
                .update_one(
                    doc! { "_id": &self.pool, "token": &self.token, "epoch": epoch as i64 },
                    doc! { "$set": { "expires_at": expires_at } },
                )
                .await
                .map_err(Error::store("renew lease"))?;
            if r.matched_count == 0 {
                return Ok(None);
            }
            // A claim of the next epoch means a taker found this lease
            // expired and is taking over (on a server whose conditional
            // update is no atomic compare-and-set, this renewal may even
            // have written over its takeover): step down, so the pool never
            // has two leaders for long and never stalls on a lease document
            // that names an epoch older than the newest claim.
            if let Some(next) = self.epoch_claim(epoch + 1).await? {
                if next.token != self.token {
                    tracing::warn!(pool = %self.pool, epoch, taker = %next.holder, "a newer epoch is claimed; stepping down");
                    // Released, not left to expire: the taker goes on at once.
                    self.release(epoch).await?;
                    return Ok(None);
                }
            }
            return Ok(Some(epoch));
        }
        let current = leases
            .find_one(doc! { "_id": &self.pool })
            .await
            .map_err(Error::store("read lease"))?;
        if let Some(current) = current {
            if current.expires_at >= now {
                return Ok(None); // held by someone else
            }
            // Take over an expired (or released) lease. The next epoch is
            // claimed by inserting its document first: a unique `_id` lets
            // exactly one taker win on any MongoDB-wire server, whereas a
            // conditional `update_one` is an atomic compare-and-set on
            // MongoDB but not on every compatible server (FerretDB v1 let
            // two takers both "match" and both get the same epoch).
            let mut epoch = current.epoch + 1;
            loop {
                let claim = LeaseEpochDoc {
                    id: epoch_id(&self.pool, epoch),
                    pool: self.pool.clone(),
                    epoch,
                    holder: self.holder.clone(),
                    token: self.token.clone(),
                    taken_at: now,
                };
                match self.store.lease_epochs.insert_one(&claim).await {
                    Ok(_) => break,
                    Err(e) if is_duplicate_key(&e) => {}
                    Err(e) => return Err(Error::store("claim lease epoch")(e)),
                }
                let other = self.epoch_claim(epoch).await?;
                match other {
                    // Ours: an earlier attempt (or the driver's retry of
                    // this insert) landed; carry on with it.
                    Some(o) if o.token == self.token => break,
                    // Claimed more than a lease ago and the lease never
                    // moved to it: its taker died between its two writes.
                    // Skip past it; there is no cap, so any number of
                    // abandoned claims never blocks a takeover.
                    Some(o) if o.taken_at + self.duration < now => epoch += 1,
                    // Another taker is taking over now and wins.
                    _ => return Ok(None),
                }
            }
            // Only the owner of `epoch` moves the lease to it, and only if
            // the lease is still the expired one read above (a renewal that
            // landed meanwhile changed `expires_at`: on MongoDB the filter
            // then matches nothing and the live holder keeps its lease; it
            // sees this epoch's claim at its next renewal and steps down,
            // after which the claim is taken up again by this process).
            let r = leases
                .update_one(
                    doc! {
                        "_id": &self.pool,
                        "epoch": current.epoch as i64,
                        "expires_at": bson::DateTime::from_chrono(current.expires_at),
                    },
                    doc! { "$set": {
                        "holder": &self.holder,
                        "token": &self.token,
                        "epoch": epoch as i64,
                        "expires_at": expires_at,
                    } },
                )
                .await
                .map_err(Error::store("take lease"))?;
            if r.matched_count == 1 {
                return Ok(Some(epoch));
            }
            // A retried update already applied shows as our lease.
            return Ok(self.holds(epoch).await?.then_some(epoch));
        }
        let first = LeaseDoc {
            pool: self.pool.clone(),
            holder: self.holder.clone(),
            token: self.token.clone(),
            epoch: 1,
            expires_at: now + self.duration,
        };
        match leases.insert_one(&first).await {
            Ok(_) => Ok(Some(1)),
            // The lease exists and is held, or another producer won the
            // race, or our own insert was retried after it landed.
            Err(e) if is_duplicate_key(&e) => Ok(self.holds(1).await?.then_some(1)),
            Err(e) => Err(Error::store("create lease")(e)),
        }
    }

    /// The claim of `epoch`, if any (exact `_id`).
    async fn epoch_claim(&self, epoch: u64) -> Result<Option<LeaseEpochDoc>> {
        self.store
            .lease_epochs
            .find_one(doc! { "_id": epoch_id(&self.pool, epoch) })
            .await
            .map_err(Error::store("read lease epoch"))
    }

    /// Whether the lease document names this process at `epoch`.
    async fn holds(&self, epoch: u64) -> Result<bool> {
        let lease = self
            .store
            .leases
            .find_one(doc! { "_id": &self.pool })
            .await
            .map_err(Error::store("read lease"))?;
        Ok(lease.is_some_and(|l| l.token == self.token && l.epoch == epoch))
    }

    /// Gives the lease up at `epoch` so a standby can take over at once.
    pub async fn release(&self, epoch: u64) -> Result<()> {
        let past = bson::DateTime::from_chrono(
            self.server_now().await? - chrono::Duration::milliseconds(1),
        );
        self.store
            .leases
            .update_one(
                doc! { "_id": &self.pool, "token": &self.token, "epoch": epoch as i64 },
                doc! { "$set": { "expires_at": past } },
            )
            .await
            .map_err(Error::store("release lease"))?;
        Ok(())
    }

    /// How long a fresh lease may be relied on locally: the duration minus a
    /// fifth, for clock skew and the renewal's own latency.
    fn validity(&self) -> Duration {
        self.duration - self.duration / 5
    }
}

/// Checks, before each protocol step, that this process still leads.
#[derive(Debug, Clone)]
pub struct LeaseCheck {
    pool: String,
    state: watch::Receiver<LeaseState>,
}

impl LeaseCheck {
    /// The epoch held, or [`Error::LeaseLost`] if the lease is not (or no
    /// longer certainly) held.
    pub fn check(&self) -> Result<u64> {
        match *self.state.borrow() {
            LeaseState::Leader { epoch, valid_until } if Instant::now() < valid_until => Ok(epoch),
            _ => Err(Error::LeaseLost(self.pool.clone())),
        }
    }

    /// The current state.
    pub fn state(&self) -> LeaseState {
        *self.state.borrow()
    }

    /// Waits until this process leads; returns the epoch.
    pub async fn wait_leader(&mut self) -> u64 {
        loop {
            if let Ok(epoch) = self.check() {
                return epoch;
            }
            if self.state.changed().await.is_err() {
                // The keeper stopped: never leader again.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// A background task that keeps trying to take, then renew, the lease.
#[derive(Debug)]
pub struct LeaseKeeper {
    lease: Lease,
    stop: watch::Sender<bool>,
    state: watch::Receiver<LeaseState>,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    /// Starts the task: attempts every third of the lease duration.
    pub fn spawn(lease: Lease) -> Self {
        let (state_tx, state) = watch::channel(LeaseState::Unknown);
        let (stop, mut stop_rx) = watch::channel(false);
        let task_lease = lease.clone();
        let task = tokio::spawn(async move {
            let lease = task_lease;
            let mut held: Option<u64> = None;
            loop {
                let started = Instant::now();
                let next = match lease.acquire(held).await {
                    Ok(Some(epoch)) => {
                        if held != Some(epoch) {
                            tracing::info!(pool = %lease.pool, epoch, holder = %lease.holder, "lease taken");
                        }
                        held = Some(epoch);
                        LeaseState::Leader {
                            epoch,
                            valid_until: started + lease.validity(),
                        }
                    }
                    Ok(None) => {
                        if let Some(epoch) = held.take() {
                            tracing::warn!(pool = %lease.pool, epoch, "lease lost to another producer");
                        }
                        LeaseState::Standby
                    }
                    Err(err) => {
                        // Keep the old validity: it runs out on its own if the
                        // database stays away.
                        tracing::warn!(cause = %crate::error::chain(&err), pool = %lease.pool, "lease attempt failed");
                        match *state_tx.borrow() {
                            s @ LeaseState::Leader { .. } => s,
                            _ => LeaseState::Unknown,
                        }
                    }
                };
                state_tx.send_replace(next);
                tokio::select! {
                    _ = tokio::time::sleep_until(started + lease.duration / 3) => {}
                    _ = stop_rx.changed() => break,
                }
            }
        });
        Self {
            lease,
            stop,
            state,
            task,
        }
    }

    /// A check of this keeper's lease, for the protocol steps.
    pub fn lease_check(&self) -> LeaseCheck {
        LeaseCheck {
            pool: self.lease.pool.clone(),
            state: self.state.clone(),
        }
    }

    /// Stops renewing and releases the lease if held.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let last = *self.state.borrow();
        if let LeaseState::Leader { epoch, .. } = last {
            match self.lease.release(epoch).await {
                Ok(()) => tracing::info!(pool = %self.lease.pool, epoch, "lease released"),
                Err(err) => {
                    tracing::warn!(cause = %crate::error::chain(&err), "could not release the lease; it expires on its own")
                }
            }
        }
    }
}
