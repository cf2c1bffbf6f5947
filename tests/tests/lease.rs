//! The producer lease against the real MongoDB-wire server: a renewal racing
//! a takeover never undoes it (and the pool never stalls), abandoned epoch
//! claims never block a takeover, and lease times are the server's clock.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bson::doc;
use futures::TryStreamExt;
use kgs_producer::leader::lease::Lease;
use kgs_producer::store::Store;
use kgs_schemas::docs::{LeaseDoc, LeaseEpochDoc};
use kgs_tests::{kafka_brokers, mongo_client, mongodb_uri, unique};

/// A store on a database of its own.
async fn store() -> Result<(Store, String)> {
    let db = unique("kgs-lease");
    let config = kgs_producer::Config {
        kafka_brokers: kafka_brokers(),
        mongodb_uri: mongodb_uri(),
        mongodb_db: db.clone(),
        ..Default::default()
    };
    Ok((Store::connect(&config).await?, db))
}

/// The lease document and the newest epoch claim of pool `p` (none before
/// the first takeover: the first lease is an insert).
async fn lease_state(store: &Store) -> Result<(LeaseDoc, Option<LeaseEpochDoc>)> {
    let lease = store
        .leases
        .find_one(doc! { "_id": "p" })
        .await?
        .context("lease document")?;
    let claims: Vec<LeaseEpochDoc> = store
        .lease_epochs
        .find(doc! { "pool": "p" })
        .await?
        .try_collect()
        .await?;
    Ok((lease, claims.into_iter().max_by_key(|c| c.epoch)))
}

/// Makes the lease look expired to a taker, as if its holder's renewal were
/// late (a pause, a slow network): `expires_at` a second in the past.
async fn expire(db: &str) -> Result<()> {
    let past = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 1_000);
    mongo_client()
        .await?
        .database(db)
        .collection::<bson::Document>("leases")
        .update_one(doc! { "_id": "p" }, doc! { "$set": { "expires_at": past } })
        .await?;
    Ok(())
}

/// Rounds of [`renewal_racing_takeover_never_undoes_it`].
const RACES: usize = 300;

/// A renewal racing a takeover, [`RACES`] times (the holder's lease made to look
/// expired, then its renewal and a taker's attempt sent at once): the
/// takeover is never undone — once the two have each tried again at most a
/// few times, exactly one of them leads, at the newest claimed epoch, and
/// the lease document names it. Before the fix, on FerretDB a renewal
/// could write the old holder back over a takeover, leaving the lease at an
/// epoch older than the newest claim for good.
#[tokio::test(flavor = "multi_thread")]
async fn renewal_racing_takeover_never_undoes_it() -> Result<()> {
    let (store, db) = store().await?;
    let d = Duration::from_secs(5);
    let leases = [
        Lease::new(store.clone(), "p", "a", d),
        Lease::new(store.clone(), "p", "b", d),
    ];
    let mut held: [Option<u64>; 2] = [leases[0].acquire(None).await?, None];
    // Races in which both came out leading: impossible where a conditional
    // update is an atomic compare-and-set (the takeover requires the lease
    // it read to be unchanged); FerretDB v1 has none, so there the next
    // renewal must end it (checked below).
    let mut both = 0;
    ensure!(held[0] == Some(1), "first lease: {held:?}");
    for round in 0..RACES {
        let holder = usize::from(held[1].is_some());
        let taker = 1 - holder;
        expire(&db).await?;
        let (renewed, taken) = tokio::join!(
            leases[holder].acquire(held[holder]),
            leases[taker].acquire(None)
        );
        held[holder] = renewed?;
        held[taker] = taken?;
        if held.iter().all(Option::is_some) {
            both += 1;
        }
        // Each tries again (renew what it has, else take) until one leads
        // alone; a few attempts are allowed for a spurious step-down.
        let mut settled = false;
        for _ in 0..6 {
            for i in [holder, taker] {
                held[i] = leases[i].acquire(held[i]).await?;
            }
            let leaders = held.iter().filter(|h| h.is_some()).count();
            ensure!(
                leaders <= 1,
                "round {round}: two leaders {held:?} after a retry"
            );
            if leaders == 1 {
                settled = true;
                break;
            }
        }
        ensure!(settled, "round {round}: no leader after six attempts each");
        let (lease, newest) = lease_state(&store).await?;
        let (i, epoch) = held
            .iter()
            .enumerate()
            .find_map(|(i, h)| h.map(|e| (i, e)))
            .expect("settled");
        let newest_ok = match &newest {
            Some(c) => c.epoch == epoch && c.token == lease.token,
            None => epoch == 1,
        };
        ensure!(
            lease.epoch == epoch && newest_ok,
            "round {round}: {} leads at {epoch}, lease at {} (holder {}), newest claim {:?}",
            ["a", "b"][i],
            lease.epoch,
            lease.holder,
            newest.map(|c| (c.epoch, c.holder))
        );
    }
    let cas = std::env::var("KGS_MONGO_IMPL").as_deref() != Ok("ferretdb");
    ensure!(
        !cas || both == 0,
        "{both} of {RACES} races left two leaders at once"
    );
    mongo_client().await?.database(&db).drop().await?;
    Ok(())
}

/// Ten abandoned epoch claims (takers that died between claiming an epoch
/// and moving the lease to it) do not block a takeover: the next taker skips
/// them all. Before the fix, a takeover gave up after eight.
#[tokio::test]
async fn abandoned_epoch_claims_never_block_a_takeover() -> Result<()> {
    let (store, db) = store().await?;
    let d = Duration::from_secs(2);
    let first = Lease::new(store.clone(), "p", "first", d);
    let epoch = first.acquire(None).await?.context("first lease")?;
    first.release(epoch).await?;
    let long_ago = chrono::Utc::now() - chrono::Duration::minutes(10);
    for e in epoch + 1..=epoch + 10 {
        store
            .lease_epochs
            .insert_one(LeaseEpochDoc {
                id: format!("p:{e}"),
                pool: "p".into(),
                epoch: e,
                holder: "dead".into(),
                token: format!("dead-{e}"),
                taken_at: long_ago,
            })
            .await?;
    }
    let taker = Lease::new(store.clone(), "p", "taker", d);
    let got = taker.acquire(None).await?;
    ensure!(
        got == Some(epoch + 11),
        "takeover got {got:?}, expected {}",
        epoch + 11
    );
    let (lease, newest) = lease_state(&store).await?;
    ensure!(
        lease.holder == "taker" && newest.is_some_and(|c| c.epoch == epoch + 11),
        "lease {lease:?}"
    );
    mongo_client().await?.database(&db).drop().await?;
    Ok(())
}

/// Two processes given the same instance id never share a lease: the
/// second cannot renew or release the first one's lease (renewal matches
/// the per-process token, not the configurable id).
#[tokio::test]
async fn a_reused_instance_id_does_not_share_the_lease() -> Result<()> {
    let (store, db) = store().await?;
    let d = Duration::from_secs(30);
    let one = Lease::new(store.clone(), "p", "same-id", d);
    let two = Lease::new(store.clone(), "p", "same-id", d);
    let epoch = one.acquire(None).await?.context("first lease")?;
    ensure!(two.acquire(None).await?.is_none(), "a live lease was taken");
    ensure!(
        two.acquire(Some(epoch)).await?.is_none(),
        "another process with the same id renewed the lease"
    );
    two.release(epoch).await?;
    ensure!(
        one.acquire(Some(epoch)).await? == Some(epoch),
        "the holder lost its lease to another process's release"
    );
    let lease = store
        .leases
        .find_one(doc! { "_id": "p" })
        .await?
        .context("lease document")?;
    ensure!(
        lease.expires_at > chrono::Utc::now() + chrono::Duration::seconds(10),
        "the lease was released by another process: {lease:?}"
    );
    mongo_client().await?.database(&db).drop().await?;
    Ok(())
}
