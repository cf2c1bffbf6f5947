//! Claim, then commit, then hand out: a claimed batch belongs to the
//! process that claimed it, and a dead instance's batches never come again.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::Utc;
use kgs_schemas::docs::{ClaimDoc, ClaimState, CLAIMS};
use kgs_schemas::KeyBatch;
use kgs_tests::{registry_value, take, unique};
use prometheus::Registry;

use super::publisher::{buffered_at_least, Pool, WAIT};

/// The claim and the offset commit come before hand-out: once an instance
/// handed out a key, its batch is claimed and committed, so after the
/// instance dies without returning anything, a new member of the group
/// neither re-reads nor re-hands those batches.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_instances_batches_are_never_handed_out_again() -> Result<()> {
    let pool = Pool::create(1).await?;
    let group = unique("g");
    let ra = Registry::new();
    let a = pool.consumer(&group, &ra).instance_id("a").build().await?;
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(pool.publish(10, 0).await?);
    }
    let handed = take(&a, 5, WAIT).await?;
    buffered_at_least(&a, 25).await?;
    for batch in &first {
        let claim = pool
            .claim(&batch.batch_id)
            .await?
            .context("claim recorded before hand-out")?;
        assert_eq!(
            (claim.instance.as_str(), claim.state),
            ("a", ClaimState::Open)
        );
    }
    // Crash: nothing is returned, claims stay open.
    a.abandon().await;
    assert!(
        a.next_key().is_err(),
        "an abandoned instance hands nothing out"
    );

    let rb = Registry::new();
    let b = pool.consumer(&group, &rb).instance_id("b").build().await?;
    let later = pool.publish(10, 0).await?;
    let got = take(&b, 10, WAIT).await?;
    let got: HashSet<String> = got.into_iter().collect();
    assert_eq!(got, later.keys.iter().cloned().collect::<HashSet<_>>());
    assert!(handed.iter().all(|k| !got.contains(k)));
    // Committed offsets, not only claims, kept b off a's batches: it did
    // not even read them again.
    assert_eq!(
        registry_value(&rb, kgs_consumer::metrics::REPLAYS_TOTAL, None),
        0.0
    );
    for batch in &first {
        assert_eq!(
            pool.claim(&batch.batch_id).await?.unwrap().state,
            ClaimState::Open
        );
    }
    b.shutdown().await?;
    pool.drop_db().await;
    Ok(())
}

/// A claim that already exists for a batch belongs to the process that
/// wrote it (its token), not to an instance id: an open claim with this
/// consumer's instance id, group, partition and offset, written by another
/// process (a restart with a fixed id, a second process given the same id),
/// is never resumed. Like a claim of another instance, it makes the batch a
/// replay (counted as such, not as a bad message); only the unclaimed batch
/// is handed out.
#[tokio::test(flavor = "multi_thread")]
async fn an_open_claim_with_our_instance_id_from_another_process_is_a_replay() -> Result<()> {
    let pool = Pool::create(1).await?;
    let group = unique("g");
    let same_id = KeyBatch::new(unique("b"), pool.name.clone(), 1, pool.fresh_keys(5));
    let foreign = KeyBatch::new(unique("b"), pool.name.clone(), 1, pool.fresh_keys(5));
    let claim = |batch: &KeyBatch, instance: &str, offset: i64| ClaimDoc {
        batch_id: batch.batch_id.clone(),
        pool: pool.name.clone(),
        group: group.clone(),
        instance: instance.into(),
        token: "an-earlier-process".into(),
        partition: 0,
        offset,
        keys: 5,
        state: ClaimState::Open,
        return_keys: Vec::new(),
        reason: None,
        claimed_at: Utc::now(),
    };
    pool.db
        .collection::<ClaimDoc>(CLAIMS)
        .insert_many([claim(&same_id, "me", 0), claim(&foreign, "someone-else", 1)])
        .await?;
    for batch in [&same_id, &foreign] {
        pool.record_batch(batch, 0).await?;
        pool.record_used(batch).await?;
        pool.send(&batch.encode(), 0).await?;
    }
    let last = pool.publish(5, 0).await?;
    let registry = Registry::new();
    let c = pool
        .consumer(&group, &registry)
        .instance_id("me")
        .build()
        .await?;
    let got: HashSet<String> = take(&c, 5, WAIT).await?.into_iter().collect();
    assert_eq!(got, last.keys.iter().cloned().collect::<HashSet<_>>());
    assert!(matches!(
        c.next_key_wait(Duration::from_millis(500)).await,
        Err(kgs_consumer::Error::Empty)
    ));
    assert_eq!(
        registry_value(&registry, kgs_consumer::metrics::REPLAYS_TOTAL, None),
        2.0
    );
    assert_eq!(
        registry_value(&registry, kgs_consumer::metrics::BAD_MESSAGES_TOTAL, None),
        0.0
    );
    // Neither pre-existing claim was taken over or ended by this process.
    for batch in [&same_id, &foreign] {
        let claim = pool.claim(&batch.batch_id).await?.context("claim")?;
        assert_eq!(
            (claim.token.as_str(), claim.state),
            ("an-earlier-process", ClaimState::Open)
        );
    }
    c.shutdown().await?;
    for batch in [&same_id, &foreign] {
        let claim = pool.claim(&batch.batch_id).await?.context("claim")?;
        assert_eq!(
            claim.state,
            ClaimState::Open,
            "shutdown ended a foreign claim"
        );
    }
    pool.drop_db().await;
    Ok(())
}
