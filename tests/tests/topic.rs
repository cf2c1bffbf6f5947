//! The pool topic's life cycle with app servers running: deleted and
//! created again by `init` while they consume it.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bson::doc;
use kgs_schemas::docs::{ClaimDoc, PoolDoc, CLAIMS, POOLS};
use kgs_tests::{mongo_client, terminate, unique, wait_for, AppServerCmd, ProducerCmd, Signal};

/// An app server consuming the pool topic when it is deleted and created
/// again (`init`), producer running: keys flow again from batches claimed
/// after the re-creation, without a restart, and none twice. librdkafka
/// keeps fetching a re-created topic at the old topic's positions, without
/// an error: before the fix the app server either waited past the new
/// topic's end for good (a 10-minute chaos run saw 128 s without a key, until
/// an app server restart) or skipped the batches the producer published
/// again, stranding their keys. It now sees the newer topic generation (in
/// a batch's record, or in the pool document within 5 s) and consumes with
/// a new Kafka consumer (`kgs_consumer_topic_recreations_total`).
#[tokio::test(flavor = "multi_thread")]
async fn app_servers_follow_a_recreated_topic() -> Result<()> {
    let (db, pool) = (unique("kgs"), unique("p"));
    ProducerCmd::new(&db, &pool)?.init(2, 2).success().await?;
    let producer = ProducerCmd::new(&db, &pool)?
        .run(20, 2)
        .log_to_temp(&pool)?
        .spawn()?;
    // A small buffer: keys after the re-creation must come from new claims.
    let app = AppServerCmd::new(&db, &pool)?
        .watermarks(20, 40)
        .start()
        .await?;
    let mut received: Vec<String> = app.keys(60, Duration::from_secs(60)).await?;
    let database = mongo_client().await?.database(&db);
    let topic = database
        .collection::<PoolDoc>(POOLS)
        .find_one(doc! { "_id": &pool })
        .await?
        .context("pool document")?
        .topic;
    kgs_tests::kafka::delete_topic(&topic).await?;
    let recreated = wait_for(
        "the topic re-created by init",
        Duration::from_secs(60),
        || async {
            let out = ProducerCmd::new(&db, &pool)?.init(2, 2).success().await?;
            let said = String::from_utf8_lossy(&out.stdout).into_owned();
            Ok(said.contains(": created;").then(bson::DateTime::now))
        },
    )
    .await?;
    // Far more than the buffer and the old topic held.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let claims = database.collection::<ClaimDoc>(CLAIMS);
    loop {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no keys from batches claimed after the re-creation within 90 s ({} keys in all)",
            received.len()
        );
        match app.key().await? {
            Some(k) => received.push(k),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
        if received.len() % 20 != 0 {
            continue;
        }
        let fresh = claims
            .count_documents(doc! { "pool": &pool, "claimed_at": { "$gt": recreated } })
            .await?;
        if fresh >= 5 && received.len() >= 300 {
            break;
        }
    }
    let resubscribed = app
        .metric(kgs_consumer::metrics::TOPIC_RECREATIONS_TOTAL)
        .await?;
    ensure!(resubscribed >= 1.0, "the app server never resubscribed");
    let distinct: HashSet<&String> = received.iter().collect();
    ensure!(distinct.len() == received.len(), "a key handed out twice");
    let status = app.stop(Signal::Term).await?;
    ensure!(status.success(), "app server exit {status}");
    ensure!(terminate(producer).await?.success(), "producer exit");
    database.drop().await?;
    Ok(())
}
