//! Smoke tests of the test servers themselves: the Kafka features kgs is built
//! on (consumer-group partitioning, committed offsets, transactions with
//! read_committed) and the MongoDB operations it uses, through the same client
//! libraries kgs uses.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bson::{doc, Document};
use futures::TryStreamExt;
use kgs_tests::{create_topic, kafka_config, mongo_client, unique, wait_for};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(60);

fn consumer(group: &str, isolation: &str) -> Result<StreamConsumer> {
    kafka_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", isolation)
        .set("session.timeout.ms", "10000")
        .create()
        .context("creating consumer")
}

fn producer() -> Result<FutureProducer> {
    kafka_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .context("creating producer")
}

async fn send(
    p: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    payload: &str,
) -> Result<()> {
    let mut record = FutureRecord::<(), str>::to(topic).payload(payload);
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    p.send(record, Timeout::After(Duration::from_secs(30)))
        .await
        .map_err(|(e, _)| e)
        .context("producing")?;
    Ok(())
}

/// Feeds every message a consumer receives, with its partition, into a channel.
fn drain(c: Arc<StreamConsumer>, member: usize, tx: mpsc::UnboundedSender<(usize, i32, String)>) {
    tokio::spawn(async move {
        while let Ok(m) = c.recv().await {
            let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
            // Commit so a late rebalance cannot hand the message to the other member.
            let _ = c.commit_message(&m, CommitMode::Sync);
            if tx.send((member, m.partition(), payload)).is_err() {
                break;
            }
        }
    });
}

/// Two members of one group split a 4-partition topic: every message reaches
/// exactly one member, and each member reads only its own partitions.
#[tokio::test(flavor = "multi_thread")]
async fn consumer_group_splits_partitions() -> Result<()> {
    let topic = unique("smoke-split");
    let group = unique("g");
    create_topic(&topic, 4).await?;

    let members: Vec<Arc<StreamConsumer>> = (0..2)
        .map(|_| consumer(&group, "read_committed").map(Arc::new))
        .collect::<Result<_>>()?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    for (i, m) in members.iter().enumerate() {
        m.subscribe(&[&topic])?;
        drain(m.clone(), i, tx.clone());
    }
    // Produce only once the group is stable: both members hold partitions.
    wait_for("both members to be assigned partitions", WAIT, || {
        let counts: Vec<usize> = members
            .iter()
            .map(|m| m.assignment().map(|a| a.count()).unwrap_or(0))
            .collect();
        async move {
            Ok((counts.iter().all(|c| *c > 0) && counts.iter().sum::<usize>() == 4).then_some(()))
        }
    })
    .await?;

    let p = producer()?;
    const N: usize = 200;
    for i in 0..N {
        send(&p, &topic, Some((i % 4) as i32), &format!("m{i}")).await?;
    }

    let mut by_member: Vec<HashSet<String>> = vec![HashSet::new(), HashSet::new()];
    let mut partitions_of: Vec<HashSet<i32>> = vec![HashSet::new(), HashSet::new()];
    let deadline = tokio::time::Instant::now() + WAIT;
    while by_member[0].union(&by_member[1]).count() < N {
        let (member, partition, payload) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .context("waiting for all 200 messages")?
            .context("consumer tasks ended")?;
        by_member[member].insert(payload);
        partitions_of[member].insert(partition);
    }
    assert!(
        by_member.iter().all(|s| !s.is_empty()),
        "both members consumed"
    );
    assert_eq!(
        by_member[0].intersection(&by_member[1]).count(),
        0,
        "a message reached both members"
    );
    assert!(
        partitions_of[0].is_disjoint(&partitions_of[1]),
        "members shared a partition: {partitions_of:?}"
    );
    Ok(())
}

/// Offsets committed by a consumer are where the next consumer of the same
/// group starts.
#[tokio::test(flavor = "multi_thread")]
async fn committed_offsets_survive_a_consumer_restart() -> Result<()> {
    let topic = unique("smoke-commit");
    let group = unique("g");
    create_topic(&topic, 1).await?;
    let p = producer()?;
    for i in 0..10 {
        send(&p, &topic, Some(0), &format!("m{i}")).await?;
    }

    {
        let c = consumer(&group, "read_committed")?;
        c.subscribe(&[&topic])?;
        for expected in 0..5 {
            let m = tokio::time::timeout(WAIT, c.recv())
                .await
                .context("first consumer")??;
            assert_eq!(m.payload(), Some(format!("m{expected}").as_bytes()));
            c.commit_message(&m, CommitMode::Sync)?;
        }
        // Dropping the consumer closes it and leaves the group.
    }

    let c = consumer(&group, "read_committed")?;
    c.subscribe(&[&topic])?;
    let m = tokio::time::timeout(WAIT, c.recv())
        .await
        .context("second consumer")??;
    assert_eq!(m.offset(), 5);
    assert_eq!(m.payload(), Some("m5".as_bytes()));
    Ok(())
}

/// Messages of an aborted transaction are invisible to a read_committed
/// consumer (and visible to read_uncommitted, so the check can fail).
#[tokio::test(flavor = "multi_thread")]
async fn aborted_transactions_are_invisible_to_read_committed() -> Result<()> {
    let topic = unique("smoke-txn");
    create_topic(&topic, 1).await?;
    let p: FutureProducer = kafka_config()
        .set("transactional.id", unique("txn"))
        .create()?;
    let t = Duration::from_secs(30);
    p.init_transactions(t)?;
    p.begin_transaction()?;
    for i in 0..3 {
        send(&p, &topic, Some(0), &format!("aborted{i}")).await?;
    }
    p.abort_transaction(t)?;
    p.begin_transaction()?;
    for i in 0..3 {
        send(&p, &topic, Some(0), &format!("committed{i}")).await?;
    }
    p.commit_transaction(t)?;

    let read = |isolation: &'static str, want: usize| {
        let topic = topic.clone();
        async move {
            let c = consumer(&unique("g"), isolation)?;
            c.subscribe(&[&topic])?;
            let mut got = Vec::new();
            while got.len() < want {
                let m = tokio::time::timeout(WAIT, c.recv())
                    .await
                    .context(isolation)??;
                got.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
            }
            anyhow::Ok(got)
        }
    };
    let committed = read("read_committed", 3).await?;
    assert_eq!(committed, ["committed0", "committed1", "committed2"]);
    let uncommitted = read("read_uncommitted", 6).await?;
    assert_eq!(
        uncommitted
            .iter()
            .filter(|m| m.starts_with("aborted"))
            .count(),
        3
    );
    Ok(())
}

/// insert_many, find with sort/limit, a unique-index violation (E11000),
/// delete_many with $in, and the collStats command, through the official driver.
#[tokio::test(flavor = "multi_thread")]
async fn mongodb_round_trips() -> Result<()> {
    let client = mongo_client().await?;
    let db = client.database(&unique("kgs-smoke"));
    let coll = db.collection::<Document>("keys");
    let docs: Vec<Document> = (0..100)
        .map(|i| doc! { "_id": format!("k{i:03}"), "n": i })
        .collect();
    coll.insert_many(docs).await?;

    let first: Vec<Document> = coll
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .limit(3)
        .await?
        .try_collect()
        .await?;
    let ids: Vec<&str> = first.iter().map(|d| d.get_str("_id").unwrap()).collect();
    assert_eq!(ids, ["k000", "k001", "k002"]);

    let dup = coll.insert_one(doc! { "_id": "k000", "n": 0 }).await;
    let code = match dup.as_ref().map_err(|e| e.kind.as_ref()) {
        Err(mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w))) => {
            w.code
        }
        other => panic!("expected a duplicate-key error, got {other:?}"),
    };
    assert_eq!(code, 11000);

    let deleted = coll
        .delete_many(doc! { "_id": { "$in": ["k000", "k001", "k050", "nope"] } })
        .await?;
    assert_eq!(deleted.deleted_count, 3);
    assert_eq!(coll.count_documents(doc! {}).await?, 97);
    assert!(coll.find_one(doc! { "_id": "k050" }).await?.is_none());

    let stats = db.run_command(doc! { "collStats": "keys" }).await?;
    let count = stats.get("count").and_then(bson::Bson::as_i64_lossy);
    assert_eq!(count, Some(97), "collStats: {stats}");
    let size = stats
        .get("size")
        .and_then(bson::Bson::as_i64_lossy)
        .unwrap_or(0);
    assert!(size > 0, "collStats size: {stats}");
    db.drop().await?;
    Ok(())
}

/// Helper trait: numeric BSON values of any width as i64.
trait AsI64Lossy {
    fn as_i64_lossy(&self) -> Option<i64>;
}

impl AsI64Lossy for bson::Bson {
    fn as_i64_lossy(&self) -> Option<i64> {
        match self {
            bson::Bson::Int32(v) => Some(i64::from(*v)),
            bson::Bson::Int64(v) => Some(*v),
            bson::Bson::Double(v) => Some(*v as i64),
            _ => None,
        }
    }
}
