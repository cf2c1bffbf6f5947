//! Giving keys back: graceful shutdown and drop record exactly the keys
//! not handed out, and the producer puts them back for a later instance.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result};
use bson::doc;
use futures::TryStreamExt;
use kgs_consumer::KeyConsumer;
use kgs_schemas::docs::{ClaimDoc, ClaimState, CLAIMS};
use kgs_tests::{
    kafka_brokers, mongo_client, mongodb_uri, registry_value, take, terminate, unique, wait_for,
    ProducerCmd,
};
use prometheus::Registry;

use super::publisher::{buffered_at_least, Pool, WAIT};

/// Graceful shutdown records, per buffered batch, exactly the keys not
/// handed out (`returning`), marks fully used batches `drained`, counts the
/// returned keys, and hands nothing out afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_returns_exactly_the_unhanded_keys() -> Result<()> {
    let pool = Pool::create(1).await?;
    let registry = Registry::new();
    let c = pool
        .consumer(&unique("g"), &registry)
        .instance_id("c")
        .lanes(1)
        .build()
        .await?;
    let mut batches = Vec::new();
    for _ in 0..3 {
        batches.push(pool.publish(10, 0).await?);
    }
    buffered_at_least(&c, 30).await?;
    let handed: HashSet<String> = take(&c, 13, WAIT).await?.into_iter().collect();
    let report = c.shutdown().await?;
    assert!(matches!(c.next_key(), Err(kgs_consumer::Error::ShutDown)));
    assert_eq!(report.keys_returned, 17);
    assert!(report.failed.is_empty());
    assert_eq!(
        registry_value(&registry, kgs_consumer::metrics::KEYS_RETURNED_TOTAL, None),
        17.0
    );
    assert_eq!(
        registry_value(
            &registry,
            kgs_consumer::metrics::KEYS_HANDED_OUT_TOTAL,
            None
        ),
        13.0
    );

    let mut returned = HashSet::new();
    for batch in &batches {
        let claim = pool.claim(&batch.batch_id).await?.context("claim")?;
        let unhanded: HashSet<String> = batch
            .keys
            .iter()
            .filter(|k| !handed.contains(*k))
            .cloned()
            .collect();
        let expected_state = if unhanded.is_empty() {
            ClaimState::Drained
        } else {
            ClaimState::Returning
        };
        assert_eq!(claim.state, expected_state, "batch {}", batch.batch_id);
        assert_eq!(
            claim.return_keys.iter().cloned().collect::<HashSet<_>>(),
            unhanded
        );
        assert_eq!(claim.return_keys.len(), unhanded.len());
        returned.extend(claim.return_keys);
    }
    assert_eq!(returned.len(), 17);
    assert!(returned.is_disjoint(&handed));
    pool.drop_db().await;
    Ok(())
}

/// Dropping a `KeyConsumer` without `shutdown` (while the runtime keeps
/// running) still returns its unused keys in the background.
#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_consumer_returns_keys_in_the_background() -> Result<()> {
    let pool = Pool::create(1).await?;
    let batch = pool.publish(10, 0).await?;
    let c = pool
        .consumer(&unique("g"), &Registry::new())
        .build()
        .await?;
    let handed: HashSet<String> = take(&c, 4, WAIT).await?.into_iter().collect();
    drop(c);
    let claim = wait_for("the claim to become returning", WAIT, || async {
        Ok(pool
            .claim(&batch.batch_id)
            .await?
            .filter(|c| c.state == ClaimState::Returning))
    })
    .await?;
    let returned: HashSet<String> = claim.return_keys.into_iter().collect();
    let expected: HashSet<String> = batch
        .keys
        .iter()
        .filter(|k| !handed.contains(*k))
        .cloned()
        .collect();
    assert_eq!(returned, expected);
    pool.drop_db().await;
    Ok(())
}

/// End to end with the real `kgs-producer` over a whole 1,000-key space:
/// an instance shuts down gracefully, the producer puts its unused keys
/// back into `keys` (claims `returned`), and another instance later hands
/// them out: every key of the space is handed out exactly once in total.
#[tokio::test(flavor = "multi_thread")]
async fn returned_keys_are_handed_out_later_exactly_once() -> Result<()> {
    let db_name = unique("kgs-consumer");
    let pool = unique("p");
    let group = unique("g");
    let producer = || {
        Ok::<_, anyhow::Error>(
            ProducerCmd::new(&db_name, &pool)?
                .env("KGS_TARGET_SIZE", "1000")
                .stdout(std::process::Stdio::null()),
        )
    };
    producer()?
        .init(3, 2)
        .args(["--alphabet", "0123456789"])
        .success()
        .await?;
    let run = producer()?
        .run(50, 2)
        .args(["--group", &group])
        .stderr(std::process::Stdio::null())
        .spawn()?;

    let consumer = |instance: &str| {
        KeyConsumer::builder()
            .brokers(kafka_brokers())
            .mongodb_uri(mongodb_uri())
            .database(&db_name)
            .pool(&pool)
            .group(&group)
            .instance_id(instance)
            .registry(Registry::new())
            .watermarks(60, 120)
            .kafka_option("session.timeout.ms", "6000")
            .kafka_option("heartbeat.interval.ms", "500")
            .build()
    };
    let a = consumer("a").await?;
    let from_a = take(&a, 30, WAIT).await?;
    buffered_at_least(&a, 20).await?;
    let report = a.shutdown().await?;
    assert!(report.keys_returned > 0, "a had unused keys to return");

    let db = mongo_client().await?.database(&db_name);
    let claims = db.collection::<ClaimDoc>(CLAIMS);
    wait_for("the producer to return a's keys", WAIT, || async {
        let open: Vec<ClaimDoc> = claims
            .find(doc! { "instance": "a", "state": { "$ne": "returned" }, "return_keys.0": { "$exists": true } })
            .await?
            .try_collect()
            .await?;
        Ok(open.is_empty().then_some(()))
    })
    .await?;

    let b = consumer("b").await?;
    let from_b = take(&b, 1000 - from_a.len(), Duration::from_secs(240)).await?;
    b.shutdown().await?;
    let _ = terminate(run).await;

    let all: Vec<String> = from_a.iter().chain(&from_b).cloned().collect();
    let distinct: HashSet<&String> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "a key was handed out twice");
    assert_eq!(distinct.len(), 1000, "the whole space was handed out");
    let _ = db.drop().await;
    Ok(())
}
