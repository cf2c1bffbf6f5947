//! Claim, then commit, then hand out: a claimed batch belongs to the
//! process that claimed it, a dead instance's batches never come again, and
//! a batch whose commit failed is given back, through a MongoDB outage too.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use chrono::Utc;
use kgs_consumer::metrics::{
    BATCHES_CLAIMED_TOTAL, CLAIM_ENDS_PENDING, CLAIM_END_ERRORS_TOTAL, CLAIM_ERRORS_TOTAL,
    COMMIT_FAILURES_TOTAL, KEYS_RETURNED_TOTAL, REPLAYS_TOTAL,
};
use kgs_schemas::docs::{ClaimDoc, ClaimState, CLAIMS};
use kgs_schemas::KeyBatch;
use kgs_tests::proxy::{proxied_mongodb_uri, Mode};
use kgs_tests::{mongodb_uri, registry_value, take, take_until, unique, wait_for};
use prometheus::Registry;

use super::publisher::{assigned, buffered_at_least, Pool, WAIT};

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

/// Each way through the consumer's MongoDB proxy in the first phase of
/// [`a_failed_commits_give_back_survives_a_mongodb_outage`]: four of them
/// (the batch record read, the claim write) keep the consume loop from
/// polling Kafka well past `max.poll.interval.ms` (6 s).
const SLOW_MONGODB: Duration = Duration::from_millis(2_500);

/// The give-back of a batch whose offset commit failed after its claim
/// landed, through a MongoDB outage: the consumer never hands that batch
/// out, its attempt to give the keys back fails while MongoDB is
/// unreachable and stays queued, and once MongoDB is back it lands: the
/// claim is `returning` with every key of the batch, once each. Only the
/// consumer's own connection goes down (a proxy); the shared server stays up.
///
/// The steps, and why in this order:
/// 1. The consumer's MongoDB is slow ([`SLOW_MONGODB`] each way), then the
///    batch is published: verifying and claiming it keeps the loop from
///    polling Kafka for four delays, past `max.poll.interval.ms`, so
///    librdkafka leaves the group while the claim write is on its way. The
///    claim lands (`open`, ours), and the commit that follows fails: the
///    member is gone. Public behaviour only, nothing in the library is
///    rigged: this is what a claim write slower than the poll interval does.
/// 2. The claim is watched on the server itself. Its answer reaches the
///    consumer one delay after it was written, and the ending the consumer
///    then sends would reach the server one delay later still: MongoDB goes
///    down half-way in between, so the claim is known to the consumer as
///    its own (the commit is tried and fails) and the ending is dropped on
///    the way, never applied.
/// 3. While it is down: the commit failure is counted, nothing was handed
///    out, the claim is still `open`, the ending is queued and its retry
///    failed too. The loop polls again, rejoins the group and reads the
///    uncommitted batch once more; this is waited for before MongoDB comes
///    back, because it is the dangerous moment: the claim is still `open`
///    and this process's, so it would pass for a batch redelivered before
///    its commit, be claimed again and handed out, while the queued ending
///    still gives every key back to the producer (a key handed out twice).
/// 4. MongoDB comes back. A later batch is handed out in full and none of
///    the first batch's keys is (the re-read was skipped, a replay); the
///    queued ending lands: `returning` with exactly the batch's keys.
///
/// Without the queue (an ending tried once and dropped) the claim would
/// stay `open` for good after step 3: its keys never come back, and the
/// re-read batch would pass for ours and be handed out in step 4.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_commits_give_back_survives_a_mongodb_outage() -> Result<()> {
    let pool = Pool::create(1).await?;
    let (proxy, uri) = proxied_mongodb_uri(&mongodb_uri()).await?;
    // While the proxy is down every MongoDB operation fails after half a
    // second (not the default 30 s of server selection), so the loop keeps
    // polling Kafka between the retries of the ending and reads the batch
    // again during the outage (step 3).
    let uri = format!("{uri}&serverSelectionTimeoutMS=500");
    let registry = Registry::new();
    let metric = |name: &str| registry_value(&registry, name, None);
    let c = pool
        .consumer(&unique("g"), &registry)
        .mongodb_uri(&uri)
        .instance_id("c")
        // At least session.timeout.ms (6 s, the broker's minimum).
        .kafka_option("max.poll.interval.ms", "6000")
        .build()
        .await?;
    assigned(&registry).await?;

    // 1. Slow MongoDB, then the batch.
    proxy.set(Mode::Pass {
        delay: SLOW_MONGODB,
    });
    let batch = pool.publish(10, 0).await?;
    let keys: HashSet<String> = batch.keys.iter().cloned().collect();

    // 2. The claim lands; MongoDB goes down before the ending can.
    let seen = tokio::time::Instant::now() + WAIT;
    let claim = loop {
        if let Some(claim) = pool.claim(&batch.batch_id).await? {
            break claim;
        }
        ensure!(tokio::time::Instant::now() < seen, "the claim never landed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let written = tokio::time::Instant::now();
    assert_eq!(
        (claim.instance.as_str(), claim.state),
        ("c", ClaimState::Open)
    );
    tokio::time::sleep_until(written + SLOW_MONGODB * 3 / 2).await;
    proxy.set(Mode::Down);

    // 3. Down: the commit failed, the ending failed and is queued.
    wait_for("the commit to fail", WAIT, || async {
        Ok((metric(COMMIT_FAILURES_TOTAL) + metric(BATCHES_CLAIMED_TOTAL) > 0.0).then_some(()))
    })
    .await?;
    ensure!(
        metric(COMMIT_FAILURES_TOTAL) == 1.0 && metric(BATCHES_CLAIMED_TOTAL) == 0.0,
        "the offset commit did not fail: the batch was handed out"
    );
    // The ending tried in `handle` and its first retry by housekeeping both
    // come before the loop polls again, then the batch is read once more:
    // skipped at once (a replay), or blocked claiming it (claim errors).
    wait_for(
        "two failed endings and the batch read again",
        WAIT,
        || async {
            let reread = metric(REPLAYS_TOTAL) + metric(CLAIM_ERRORS_TOTAL) > 0.0;
            Ok((metric(CLAIM_END_ERRORS_TOTAL) >= 2.0 && reread).then_some(()))
        },
    )
    .await?;
    assert_eq!(metric(CLAIM_ENDS_PENDING), 1.0, "the ending is queued");
    assert_eq!(metric(KEYS_RETURNED_TOTAL), 0.0);
    assert_eq!(c.buffered(), 0, "keys of a batch whose commit failed");
    let claim = pool.claim(&batch.batch_id).await?.context("claim")?;
    assert_eq!(
        (claim.state, claim.return_keys.len()),
        (ClaimState::Open, 0),
        "an ending landed while MongoDB was down"
    );

    // 4. Back: a later batch flows, the first never; the ending lands.
    proxy.set(Mode::OPEN);
    let later = pool.publish(10, 0).await?;
    let mut missing: HashSet<String> = later.keys.iter().cloned().collect();
    let got = take_until(&c, "the later batch", WAIT, |k| {
        if let Some(k) = k {
            missing.remove(k);
        }
        missing.is_empty()
    })
    .await?;
    let handed: HashSet<String> = got.iter().cloned().collect();
    assert!(
        handed.is_disjoint(&keys),
        "the batch whose commit failed was handed out: {:?}",
        handed.intersection(&keys).collect::<Vec<_>>()
    );
    assert_eq!(handed.len(), got.len(), "a key was handed out twice");
    assert_eq!(handed, later.keys.iter().cloned().collect::<HashSet<_>>());
    assert!(matches!(
        c.next_key_wait(Duration::from_millis(500)).await,
        Err(kgs_consumer::Error::Empty)
    ));
    let claim = wait_for("the queued ending to land", WAIT, || async {
        Ok(pool
            .claim(&batch.batch_id)
            .await?
            .filter(|c| c.state != ClaimState::Open))
    })
    .await?;
    assert_eq!(claim.state, ClaimState::Returning);
    assert_eq!(claim.return_keys.len(), keys.len(), "a key returned twice");
    assert_eq!(
        claim.return_keys.iter().cloned().collect::<HashSet<_>>(),
        keys,
        "every key of the batch comes back"
    );
    assert_eq!(metric(KEYS_RETURNED_TOTAL), keys.len() as f64);
    assert_eq!(metric(CLAIM_ENDS_PENDING), 0.0);
    assert_eq!(metric(COMMIT_FAILURES_TOTAL), 1.0);
    assert_eq!(metric(REPLAYS_TOTAL), 1.0, "the re-read batch was skipped");
    assert_eq!(metric(BATCHES_CLAIMED_TOTAL), 1.0, "only the later batch");

    let report = c.shutdown().await?;
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(report.keys_returned, 0);
    assert_eq!(
        pool.claim(&later.batch_id).await?.context("claim")?.state,
        ClaimState::Drained
    );
    assert_eq!(
        pool.claim(&batch.batch_id).await?.context("claim")?.state,
        ClaimState::Returning,
        "shutdown changed the given-back claim"
    );
    pool.drop_db().await;
    Ok(())
}

/// A second copy of a batch this consumer claimed, committed and still
/// buffers, at the very partition and offset, in the pool topic deleted and
/// created again (offsets start from 0 again; a leader that crashed between
/// publishing a batch and recording it publishes it again when it cannot
/// find it in the new topic): skipped as a replay. Before the fix, our open
/// claim (same token, partition, offset) passed for the claim of a batch
/// redelivered before its commit, and its keys were buffered, and handed
/// out, twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_held_batch_copied_into_a_recreated_topic_is_a_replay() -> Result<()> {
    use bson::doc;
    use kgs_schemas::docs::{BATCHES, POOLS};
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let pool = Pool::create(1).await?;
    let batch = pool.publish(20, 0).await?;
    let registry = Registry::new();
    let c = pool.consumer(&unique("g"), &registry).build().await?;
    buffered_at_least(&c, 20).await?;
    let claim = pool.claim(&batch.batch_id).await?.context("claim")?;
    ensure!(claim.partition == 0 && claim.offset == 0, "{claim:?}");

    kgs_tests::kafka::delete_topic(&pool.topic).await?;
    let probe: BaseConsumer = kgs_tests::kafka_config().create()?;
    let topic = pool.topic.clone();
    wait_for("the topic gone and created again, empty", WAIT, || async {
        let gone = probe
            .fetch_watermarks(&topic, 0, Duration::from_secs(5))
            .is_err();
        if gone {
            kgs_tests::create_topic(&topic, 1).await?;
        }
        let fresh = probe.fetch_watermarks(&topic, 0, Duration::from_secs(5)) == Ok((0, 0));
        Ok(fresh.then_some(()))
    })
    .await?;
    // What the producer does on finding the topic re-created: the next
    // topic generation, and the batch published again into it.
    let gen1 = doc! { "$set": { "topic_generation": 1_i64 } };
    pool.db
        .collection::<bson::Document>(POOLS)
        .update_one(doc! { "_id": &pool.name }, gen1.clone())
        .await?;
    pool.db
        .collection::<bson::Document>(BATCHES)
        .update_one(doc! { "_id": &batch.batch_id }, gen1)
        .await?;
    pool.send(&batch.encode(), 0).await?;
    wait_for("the copy read", WAIT, || async {
        let replays = registry_value(&registry, REPLAYS_TOTAL, None);
        let resubscribed = registry_value(
            &registry,
            kgs_consumer::metrics::TOPIC_RECREATIONS_TOTAL,
            None,
        );
        let twice = c.buffered() > 20;
        Ok((resubscribed >= 1.0 && (replays >= 1.0 || twice)).then_some(()))
    })
    .await?;
    ensure!(
        c.buffered() == 20,
        "{} keys buffered: the copy's keys a second time",
        c.buffered()
    );
    let keys = take(&c, 20, WAIT).await?;
    let distinct: HashSet<&String> = keys.iter().collect();
    ensure!(distinct.len() == 20, "a key handed out twice");
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        c.next_key().is_err(),
        "the batch's keys were buffered a second time"
    );
    ensure!(
        registry_value(&registry, BATCHES_CLAIMED_TOTAL, None) == 1.0,
        "the copy was claimed"
    );
    c.shutdown().await?;
    pool.drop_db().await;
    Ok(())
}
