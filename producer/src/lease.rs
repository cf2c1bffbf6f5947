//! The pool lease: at most one producer moves and publishes a pool's keys.
//!
//! The lease is one [`LeaseDoc`] per pool, renewed with a conditional
//! `update_one` by exact `_id` (`{holder: me, epoch: mine}`). A takeover of an
//! expired lease first inserts a [`LeaseEpochDoc`] for the next epoch, whose
//! unique `_id` lets exactly one taker win, then moves the lease to that
//! epoch; the very first lease is an insert that loses to a concurrent insert
//! with E11000. Only inserts decide races, because a conditional update is
//! not an atomic compare-and-set on every MongoDB-wire server. Every batch carries the epoch, and every
//! protocol step first checks [`LeaseGuard::check`], which fails once the
//! local validity (the last renewal's start + duration − a safety margin) has
//! passed, so a paused process stops before a successor may start.
//!
//! Expiry is compared with the taker's clock: hosts running producers of one
//! pool need clocks within the safety margin (a fifth of the lease).

use std::time::Duration;

use bson::doc;
use chrono::Utc;
use kgs_schemas::docs::{LeaseDoc, LeaseEpochDoc};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::store::{is_duplicate, Store};

/// How many abandoned epoch claims (a taker that died between claiming an
/// epoch and moving the lease to it) one takeover skips before giving up.
const MAX_ABANDONED_EPOCHS: u64 = 8;

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
    duration: Duration,
}

impl Lease {
    /// A lease of `pool` for `holder`, lasting `duration` per renewal.
    pub fn new(store: Store, pool: &str, holder: &str, duration: Duration) -> Self {
        Self {
            store,
            pool: pool.to_owned(),
            holder: holder.to_owned(),
            duration,
        }
    }

    /// Renews the lease held at `epoch`, or takes it if it is free.
    /// Returns the epoch held, or `None` if another producer holds it.
    pub async fn acquire(&self, held: Option<u64>) -> Result<Option<u64>> {
        let now = Utc::now();
        let expires_at = bson::DateTime::from_chrono(now + self.duration);
        let leases = &self.store.leases;
        if let Some(epoch) = held {
            let r = leases
                .update_one(
                    doc! { "_id": &self.pool, "holder": &self.holder, "epoch": epoch as i64 },
                    doc! { "$set": { "expires_at": expires_at } },
                )
                .await
                .map_err(Error::store("renew lease"))?;
            return Ok((r.matched_count == 1).then_some(epoch));
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
                    id: format!("{}:{epoch}", self.pool),
                    pool: self.pool.clone(),
                    epoch,
                    holder: self.holder.clone(),
                    taken_at: now,
                };
                match self.store.lease_epochs.insert_one(&claim).await {
                    Ok(_) => break,
                    Err(e) if is_duplicate(&e) => {}
                    Err(e) => return Err(Error::store("claim lease epoch")(e)),
                }
                // Another taker has this epoch. If it claimed it more than a
                // lease ago and the lease never moved to it, it died between
                // its two writes: skip past its epoch (a bounded number of
                // times); otherwise it is taking over now and wins.
                let other = self
                    .store
                    .lease_epochs
                    .find_one(doc! { "_id": &claim.id })
                    .await
                    .map_err(Error::store("read lease epoch"))?;
                let abandoned = other.is_some_and(|o| o.taken_at + self.duration < now);
                if !abandoned || epoch >= current.epoch + MAX_ABANDONED_EPOCHS {
                    return Ok(None);
                }
                epoch += 1;
            }
            // Only the owner of `epoch` moves the lease from `epoch - 1`;
            // the higher epoch fences the previous holder's conditional writes.
            let r = leases
                .update_one(
                    doc! { "_id": &self.pool, "epoch": current.epoch as i64 },
                    doc! { "$set": {
                        "holder": &self.holder,
                        "epoch": epoch as i64,
                        "expires_at": expires_at,
                    } },
                )
                .await
                .map_err(Error::store("take lease"))?;
            return Ok((r.matched_count == 1).then_some(epoch));
        }
        let first = LeaseDoc {
            pool: self.pool.clone(),
            holder: self.holder.clone(),
            epoch: 1,
            expires_at: now + self.duration,
        };
        match leases.insert_one(&first).await {
            Ok(_) => Ok(Some(1)),
            // The lease exists and is held, or another producer won the race.
            Err(e) if is_duplicate(&e) => Ok(None),
            Err(e) => Err(Error::store("create lease")(e)),
        }
    }

    /// Gives the lease up at `epoch` so a standby can take over at once.
    pub async fn release(&self, epoch: u64) -> Result<()> {
        let past = bson::DateTime::from_chrono(Utc::now() - chrono::Duration::milliseconds(1));
        self.store
            .leases
            .update_one(
                doc! { "_id": &self.pool, "holder": &self.holder, "epoch": epoch as i64 },
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
pub struct LeaseGuard {
    pool: String,
    state: watch::Receiver<LeaseState>,
}

impl LeaseGuard {
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
                        tracing::warn!(cause = %err, pool = %lease.pool, "lease attempt failed");
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

    /// A guard for the protocol steps.
    pub fn guard(&self) -> LeaseGuard {
        LeaseGuard {
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
                    tracing::warn!(cause = %err, "could not release the lease; it expires on its own")
                }
            }
        }
    }
}
