//! Tests of `kgs-consumer` against real Kafka and the MongoDB-wire server:
//! disjoint hand-out through the consumer group, claim-then-commit, rebalance,
//! graceful return, bad input and backpressure.
//!
//! The batches come from a minimal publisher written here ([`Pool`]), which
//! does what the producer does for a batch: a batch record (`batches`,
//! state `published`, this pool incarnation, the partition chosen before
//! sending, the digest of the keys), the keys into `used_keys.<pool>`
//! (reason `batch`), then the `KeyBatch` JSON on that partition of the
//! pool's topic. Without the record the consumer would refuse the batch.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bson::doc;
use chrono::Utc;
use futures::TryStreamExt;
use kgs_consumer::{KeyConsumer, KeyConsumerBuilder};
use kgs_schemas::docs::{
    used_keys_collection, BatchRecord, BatchState, ClaimDoc, ClaimState, PoolDoc, UsedKeyDoc,
    UsedReason, BATCHES, CLAIMS, POOLS,
};
use kgs_schemas::format::KeyFormatSpec;
use kgs_schemas::{KeyBatch, KeyFormat};
use kgs_tests::{
    create_topic, http_get, kafka_brokers, kafka_config, mongo_client, mongodb_uri, unique,
    wait_for,
};
use prometheus::Registry;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

const WAIT: Duration = Duration::from_secs(60);
const KEY_LEN: u32 = 6;

/// A test pool: its own database, topic and key sequence, and a publisher.
struct Pool {
    db_name: String,
    db: mongodb::Database,
    name: String,
    /// The pool incarnation every batch record carries.
    incarnation: String,
    topic: String,
    format: KeyFormat,
    producer: FutureProducer,
    next_index: Mutex<u64>,
}

impl Pool {
    /// Creates the pool document and a topic of `partitions` partitions.
    async fn create(partitions: i32) -> Result<Self> {
        Self::create_named(partitions, unique("kgs-consumer"), unique("p")).await
    }

    /// Like [`Pool::create`], with given database and pool names.
    async fn create_named(partitions: i32, db_name: String, name: String) -> Result<Self> {
        let incarnation = kgs_schemas::docs::new_incarnation();
        let topic = kgs_schemas::docs::topic_name(&name, &incarnation);
        create_topic(&topic, partitions).await?;
        let db = mongo_client().await?.database(&db_name);
        let format = KeyFormat::base62(KEY_LEN)?;
        // Written as a plain document with only the fields the consumer
        // reads (and the required ones), so new optional fields of PoolDoc
        // do not break this publisher; read back as PoolDoc to check it.
        let spec = KeyFormatSpec::from(&format);
        db.collection::<bson::Document>(POOLS)
            .insert_one(doc! {
                "_id": &name,
                "incarnation": &incarnation,
                "format": { "alphabet": &spec.alphabet, "length": i64::from(spec.length) },
                "space": format.space() as i64,
                "secret": "00",
                "cursor": 0_i64,
                "topic": &topic,
                "partitions": i64::from(partitions),
                "created_at": bson::DateTime::now(),
            })
            .await?;
        db.collection::<PoolDoc>(POOLS)
            .find_one(doc! { "_id": &name })
            .await?
            .context("pool document reads back as PoolDoc")?;
        let producer = kafka_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .context("creating producer")?;
        Ok(Self {
            db_name,
            db,
            name,
            incarnation,
            topic,
            format,
            producer,
            next_index: Mutex::new(0),
        })
    }

    /// `n` fresh keys of the pool.
    fn fresh_keys(&self, n: usize) -> Vec<String> {
        let mut next = self.next_index.lock().unwrap();
        let keys: Vec<String> = (0..n as u64)
            .map(|i| self.format.key_at(*next + i).unwrap())
            .collect();
        *next += n as u64;
        keys
    }

    /// Publishes a good batch of `n` new keys to `partition`: recorded and
    /// moved first, as the producer does (the partition is chosen before
    /// sending and named in the record, never left to Kafka).
    async fn publish(&self, n: usize, partition: i32) -> Result<KeyBatch> {
        let batch = KeyBatch::new(unique("b"), self.name.clone(), 1, self.fresh_keys(n));
        self.record_batch(&batch, partition).await?;
        self.record_used(&batch).await?;
        self.send(&batch.encode(), partition).await?;
        Ok(batch)
    }

    /// Inserts the producer's record of `batch` (state `published`, this
    /// pool incarnation, `partition`, the digest of its keys): what the
    /// consumer verifies a message against before claiming it.
    async fn record_batch(&self, batch: &KeyBatch, partition: i32) -> Result<()> {
        let record = BatchRecord {
            id: batch.batch_id.clone(),
            pool: self.name.clone(),
            incarnation: self.incarnation.clone(),
            epoch: batch.epoch,
            state: BatchState::Published,
            digest: kgs_schemas::keys_digest(&batch.keys),
            keys: batch.keys.clone(),
            ns: batch
                .keys
                .iter()
                .map(|k| self.format.index_of(k).unwrap())
                .collect(),
            partition: Some(partition),
            offset: None,
            topic_generation: 0,
            from: None,
            window: None,
            created_at: Utc::now(),
        };
        self.db
            .collection::<BatchRecord>(BATCHES)
            .insert_one(record)
            .await?;
        Ok(())
    }

    /// Moves the batch's keys to `used_keys`, as the producer does before publishing.
    async fn record_used(&self, batch: &KeyBatch) -> Result<()> {
        let docs: Vec<UsedKeyDoc> = batch
            .keys
            .iter()
            .map(|k| UsedKeyDoc {
                key: k.clone(),
                n: self.format.index_of(k).unwrap(),
                reason: UsedReason::Batch,
                batch: Some(batch.batch_id.clone()),
                at: Utc::now(),
            })
            .collect();
        self.db
            .collection::<UsedKeyDoc>(&used_keys_collection(&self.name))
            .insert_many(docs)
            .await?;
        Ok(())
    }

    /// Sends raw bytes to `partition` of the topic.
    async fn send(&self, payload: &[u8], partition: i32) -> Result<()> {
        let record = FutureRecord::<(), [u8]>::to(&self.topic)
            .payload(payload)
            .partition(partition);
        self.producer
            .send(record, Timeout::After(Duration::from_secs(30)))
            .await
            .map_err(|(e, _)| e)
            .context("publishing")?;
        Ok(())
    }

    /// A consumer builder for this pool with test-friendly settings.
    fn consumer(&self, group: &str, registry: &Registry) -> KeyConsumerBuilder {
        KeyConsumer::builder()
            .brokers(kafka_brokers())
            .mongodb_uri(mongodb_uri())
            .database(&self.db_name)
            .pool(&self.name)
            .group(group)
            .registry(registry.clone())
            .lanes(2)
            // Fast failure detection for members that vanish.
            .kafka_option("session.timeout.ms", "6000")
            .kafka_option("heartbeat.interval.ms", "500")
    }

    async fn claims(&self) -> Result<Vec<ClaimDoc>> {
        Ok(self
            .db
            .collection::<ClaimDoc>(CLAIMS)
            .find(doc! {})
            .await?
            .try_collect()
            .await?)
    }

    async fn claim(&self, batch: &str) -> Result<Option<ClaimDoc>> {
        Ok(self
            .db
            .collection::<ClaimDoc>(CLAIMS)
            .find_one(doc! { "_id": batch })
            .await?)
    }

    async fn drop_db(&self) {
        let _ = self.db.drop().await;
    }
}

/// A metric's value in `registry` (`label` = `(name, value)` to pick one series).
fn metric(registry: &Registry, name: &str, label: Option<(&str, &str)>) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            label.is_none_or(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == k && l.value() == v)
            })
        })
        .map(|m| {
            // Only one of the two is set; the other reads 0.
            m.get_counter().get_value() + m.get_gauge().get_value()
        })
        .sum()
}

/// Takes keys from `c` until `n` were taken or `timeout` passes.
async fn take(c: &KeyConsumer, n: usize, timeout: Duration) -> Result<Vec<String>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut keys = Vec::with_capacity(n);
    while keys.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        ensure!(
            !left.is_zero(),
            "took only {} of {n} keys in {timeout:?}",
            keys.len()
        );
        match c.next_key_wait(left.min(Duration::from_millis(500))).await {
            Ok(k) => keys.push(k.to_string()),
            Err(kgs_consumer::Error::Empty) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(keys)
}

/// Waits until `c` has buffered at least `n` keys.
async fn buffered_at_least(c: &KeyConsumer, n: usize) -> Result<()> {
    wait_for(&format!("{n} keys buffered"), WAIT, || async move {
        Ok((c.buffered() >= n).then_some(()))
    })
    .await
}

/// Waits until the consumer behind `registry` has been assigned partitions.
async fn assigned(registry: &Registry) -> Result<()> {
    wait_for("a partition assignment", WAIT, || async move {
        Ok((metric(
            registry,
            kgs_consumer::metrics::REBALANCES_TOTAL,
            Some(("event", "assign")),
        ) >= 1.0)
            .then_some(()))
    })
    .await
}

/// Two instances in one group get disjoint keys, both get some, and
/// together exactly the published set; every handed-out key's batch has an
/// open or drained claim by the instance that handed it out.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_get_disjoint_keys() -> Result<()> {
    let pool = Pool::create(4).await?;
    let group = unique("g");
    let (ra, rb) = (Registry::new(), Registry::new());
    let a = pool.consumer(&group, &ra).instance_id("a").build().await?;
    let b = pool.consumer(&group, &rb).instance_id("b").build().await?;
    assigned(&ra).await?;
    assigned(&rb).await?;
    // Let the group settle on a split of the partitions between a and b.
    wait_for("both members in the group", WAIT, || async {
        let total = metric(
            &ra,
            kgs_consumer::metrics::REBALANCES_TOTAL,
            Some(("event", "assign")),
        ) + metric(
            &rb,
            kgs_consumer::metrics::REBALANCES_TOTAL,
            Some(("event", "assign")),
        );
        Ok((total >= 2.0).then_some(()))
    })
    .await?;

    let mut published = HashSet::new();
    let mut batch_of = HashMap::new();
    for i in 0..8 {
        let batch = pool.publish(25, i % 4).await?;
        for k in &batch.keys {
            batch_of.insert(k.clone(), batch.batch_id.clone());
        }
        published.extend(batch.keys);
    }
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    while got_a.len() + got_b.len() < published.len() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "keys missing: {} of {}",
            got_a.len() + got_b.len(),
            published.len()
        );
        let mut progress = false;
        while let Ok(k) = a.next_key() {
            got_a.push(k.to_string());
            progress = true;
        }
        while let Ok(k) = b.next_key() {
            got_b.push(k.to_string());
            progress = true;
        }
        if !progress {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let set_a: HashSet<_> = got_a.iter().cloned().collect();
    let set_b: HashSet<_> = got_b.iter().cloned().collect();
    assert_eq!(set_a.len(), got_a.len(), "a handed a key out twice");
    assert_eq!(set_b.len(), got_b.len(), "b handed a key out twice");
    assert!(set_a.is_disjoint(&set_b), "a key reached both instances");
    assert!(
        !set_a.is_empty() && !set_b.is_empty(),
        "both instances got keys"
    );
    let union: HashSet<_> = set_a.union(&set_b).cloned().collect();
    assert_eq!(union, published);

    let claims: HashMap<String, ClaimDoc> = pool
        .claims()
        .await?
        .into_iter()
        .map(|c| (c.batch_id.clone(), c))
        .collect();
    for (keys, instance) in [(&set_a, "a"), (&set_b, "b")] {
        for k in keys {
            let claim = &claims[&batch_of[k]];
            assert_eq!(claim.instance, instance, "claim of {k}'s batch");
        }
    }
    a.shutdown().await?;
    b.shutdown().await?;
    pool.drop_db().await;
    Ok(())
}

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
    assert_eq!(metric(&rb, kgs_consumer::metrics::REPLAYS_TOTAL, None), 0.0);
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
        metric(&registry, kgs_consumer::metrics::KEYS_RETURNED_TOTAL, None),
        17.0
    );
    assert_eq!(
        metric(
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

/// Every kind of bad input (including a well-formed batch that no batch
/// record backs: `unverified`) is skipped with its metric incremented, none
/// of its keys is handed out, and the partition keeps flowing: the good
/// batch after each bad message is handed out. A replay of a good batch is
/// counted as a replay, not as a bad message.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_skipped_and_the_partition_keeps_flowing() -> Result<()> {
    let pool = Pool::create(1).await?;
    let registry = Registry::new();
    let c = pool.consumer(&unique("g"), &registry).build().await?;
    let good_json = |keys: serde_json::Value, pool_name: &str, version: u32| {
        serde_json::to_vec(&serde_json::json!({
            "schema_version": version,
            "batch_id": unique("bad"),
            "pool": pool_name,
            "epoch": 1,
            "created_at": "2026-11-26T00:00:00Z",
            "keys": keys,
        }))
        .unwrap()
    };
    let fresh = pool.fresh_keys(3);
    let truncated = {
        let bytes = good_json(serde_json::json!(fresh), &pool.name, 1);
        bytes[..bytes.len() / 2].to_vec()
    };
    let many: Vec<String> = (0..kgs_schemas::batch::MAX_BATCH_KEYS as u64 + 1)
        .map(|i| pool.format.key_at(1_000_000 + i).unwrap())
        .collect();
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("not_json", vec![0xff, 0x00, 0x13, 0x37]),
        ("not_json", truncated),
        (
            "unknown_schema_version",
            good_json(serde_json::json!(fresh), &pool.name, 2),
        ),
        (
            "wrong_pool",
            good_json(serde_json::json!(fresh), "another-pool", 1),
        ),
        (
            "bad_key",
            good_json(serde_json::json!(["abc"]), &pool.name, 1),
        ),
        (
            "bad_key",
            good_json(serde_json::json!(["ab-def"]), &pool.name, 1),
        ),
        (
            "duplicate_key",
            good_json(
                serde_json::json!([fresh[0], fresh[1], fresh[0]]),
                &pool.name,
                1,
            ),
        ),
        // Well-formed, but no producer recorded it: refused by verification.
        (
            "unverified",
            good_json(serde_json::json!(fresh), &pool.name, 1),
        ),
        // A message over 1 MiB cannot even be produced to a default topic;
        // the batch-size limit is the oversize case that reaches a consumer.
        (
            "too_many_keys",
            good_json(serde_json::json!(many), &pool.name, 1),
        ),
    ];
    let bad_keys: HashSet<String> = fresh.iter().cloned().chain(many.iter().cloned()).collect();
    let mut good = HashSet::new();
    let mut expected: HashMap<&str, f64> = HashMap::new();
    for (kind, payload) in &bad {
        pool.send(payload, 0).await?;
        *expected.entry(kind).or_default() += 1.0;
        good.extend(pool.publish(5, 0).await?.keys);
    }
    // A replay: the same batch (same id, keys and partition) published a
    // second time. Harmless: counted as a replay, not as a bad message.
    let replayed = pool.publish(5, 0).await?;
    good.extend(replayed.keys.iter().cloned());
    pool.send(&replayed.encode(), 0).await?;
    let last = pool.publish(5, 0).await?;
    good.extend(last.keys);

    let got = take(&c, good.len(), WAIT).await?;
    let got_set: HashSet<String> = got.iter().cloned().collect();
    assert_eq!(got_set.len(), got.len(), "a key was handed out twice");
    assert_eq!(got_set, good);
    assert!(got_set.is_disjoint(&bad_keys));
    for (kind, count) in &expected {
        assert_eq!(
            metric(
                &registry,
                kgs_consumer::metrics::BAD_MESSAGES_TOTAL,
                Some(("kind", kind))
            ),
            *count,
            "bad messages of kind {kind}"
        );
    }
    assert_eq!(
        metric(&registry, kgs_consumer::metrics::REPLAYS_TOTAL, None),
        1.0
    );
    assert!(matches!(
        c.next_key_wait(Duration::from_millis(300)).await,
        Err(kgs_consumer::Error::Empty)
    ));
    c.shutdown().await?;
    pool.drop_db().await;
    Ok(())
}

/// At the high watermark the consumer pauses its partitions (claims no more
/// batches), and resumes once hand-out brings the buffer to the low one.
#[tokio::test(flavor = "multi_thread")]
async fn backpressure_pauses_at_the_high_watermark() -> Result<()> {
    let pool = Pool::create(1).await?;
    let registry = Registry::new();
    let c = pool
        .consumer(&unique("g"), &registry)
        .watermarks(15, 40)
        .build()
        .await?;
    let mut all = HashSet::new();
    for _ in 0..12 {
        all.extend(pool.publish(10, 0).await?.keys);
    }
    buffered_at_least(&c, 40).await?;
    wait_for("the paused gauge", WAIT, || async {
        Ok((metric(&registry, kgs_consumer::metrics::PAUSED, None) == 1.0).then_some(()))
    })
    .await?;
    // Paused: nothing more is claimed however long we wait.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let claimed = metric(
        &registry,
        kgs_consumer::metrics::BATCHES_CLAIMED_TOTAL,
        None,
    );
    assert!(
        c.buffered() <= 50,
        "buffered {} past high watermark + one batch",
        c.buffered()
    );
    assert!(claimed <= 5.0, "claimed {claimed} batches while paused");
    assert_eq!(pool.claims().await?.len() as f64, claimed);
    // Draining resumes the flow until every key has been handed out.
    let got: HashSet<String> = take(&c, all.len(), WAIT).await?.into_iter().collect();
    assert_eq!(got, all);
    c.shutdown().await?;
    pool.drop_db().await;
    Ok(())
}

/// Members join and leave (gracefully) while keys are taken at full speed:
/// no key is handed out twice, and at the end every published key was
/// either handed out or recorded for return, never both.
#[tokio::test(flavor = "multi_thread")]
async fn members_join_and_leave_without_duplicates() -> Result<()> {
    let pool = Arc::new(Pool::create(4).await?);
    let group = unique("g");
    let handed = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));

    // Each member runs with a taker task hammering next_key.
    let start_member = |name: &'static str| {
        let pool = Arc::clone(&pool);
        let handed = Arc::clone(&handed);
        let stop = Arc::clone(&stop);
        let group = group.clone();
        async move {
            let c = Arc::new(
                pool.consumer(&group, &Registry::new())
                    .instance_id(name)
                    .build()
                    .await?,
            );
            let taker = {
                let c = Arc::clone(&c);
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match c.next_key() {
                            Ok(k) => mine.push(k.to_string()),
                            Err(kgs_consumer::Error::ShutDown) => break,
                            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                        }
                    }
                    handed.lock().unwrap().extend(mine);
                })
            };
            anyhow::Ok((c, taker))
        }
    };
    let publisher = {
        let pool = Arc::clone(&pool);
        tokio::spawn(async move {
            let mut published = Vec::new();
            for i in 0..40 {
                published.push(pool.publish(20, i % 4).await?);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(published)
        })
    };
    let (a, ta) = start_member("a").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (b, tb) = start_member("b").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report_a = a.shutdown().await?;
    let (c, tc) = start_member("c").await?;
    let published = publisher.await??;
    let batch_ids: HashSet<String> = published.iter().map(|b| b.batch_id.clone()).collect();
    wait_for("every batch claimed", WAIT, || async {
        let claims = pool.claims().await?;
        Ok((claims
            .iter()
            .filter(|c| batch_ids.contains(&c.batch_id))
            .count()
            == batch_ids.len())
        .then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report_b = b.shutdown().await?;
    let report_c = c.shutdown().await?;
    stop.store(true, Ordering::Relaxed);
    for t in [ta, tb, tc] {
        t.await?;
    }

    let handed = handed.lock().unwrap().clone();
    let handed_set: HashSet<String> = handed.iter().cloned().collect();
    assert_eq!(handed_set.len(), handed.len(), "a key was handed out twice");
    let claims = pool.claims().await?;
    let returned: Vec<String> = claims.iter().flat_map(|c| c.return_keys.clone()).collect();
    let returned_set: HashSet<String> = returned.iter().cloned().collect();
    assert_eq!(returned_set.len(), returned.len());
    assert!(
        handed_set.is_disjoint(&returned_set),
        "a key both handed out and returned"
    );
    let all: HashSet<String> = published.iter().flat_map(|b| b.keys.clone()).collect();
    let accounted: HashSet<String> = handed_set.union(&returned_set).cloned().collect();
    assert_eq!(accounted, all, "every key handed out or returned");
    assert!(
        claims.iter().all(|c| c.state != ClaimState::Open),
        "no claim left open"
    );
    let reported = report_a.keys_returned + report_b.keys_returned + report_c.keys_returned;
    assert!(reported <= returned.len());
    pool.drop_db().await;
    Ok(())
}

/// The example app server serves keys over `GET /keys` (503 `no keys` when
/// empty), exposes `/metrics` and `/healthz`, and on SIGTERM exits cleanly
/// after recording its unserved keys for return.
#[tokio::test(flavor = "multi_thread")]
async fn app_server_serves_keys_and_returns_them_on_sigterm() -> Result<()> {
    let binary = kgs_tests::workspace_binary("app-server")?;
    let pool = Pool::create(1).await?;
    let mut published = HashSet::new();
    for _ in 0..2 {
        published.extend(pool.publish(10, 0).await?.keys);
    }
    let addr = kgs_tests::free_addr()?;
    let mut child = tokio::process::Command::new(binary)
        .env("KGS_KAFKA_BROKERS", kafka_brokers())
        .env("KGS_MONGODB_URI", mongodb_uri())
        .env("KGS_MONGODB_DB", &pool.db_name)
        .env("KGS_POOL", &pool.name)
        .env("KGS_GROUP", unique("g"))
        .env("KGS_HTTP_ADDR", &addr)
        .kill_on_drop(true)
        .spawn()
        .context("spawning app-server")?;
    wait_for("app-server /healthz", WAIT, || async {
        Ok(http_get(&addr, "/healthz")
            .await
            .ok()
            .filter(|(s, _)| *s == 200))
    })
    .await?;
    let mut served = HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while served.len() < 5 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "app-server served no keys"
        );
        let (status, body) = http_get(&addr, "/keys").await?;
        match status {
            200 => assert!(served.insert(body), "key served twice"),
            503 => assert_eq!(body, "no keys\n"),
            other => anyhow::bail!("GET /keys: {other} {body}"),
        }
    }
    assert!(served.is_subset(&published));
    let (status, metrics) = http_get(&addr, "/metrics").await?;
    assert_eq!(status, 200);
    assert!(metrics.contains(kgs_consumer::metrics::BATCHES_CLAIMED_TOTAL));

    // Wait until both batches are buffered, so the return covers 15 keys.
    wait_for("both batches claimed", WAIT, || async {
        Ok((pool.claims().await?.len() == 2).then_some(()))
    })
    .await?;
    let pid = child.id().context("app-server pid")?;
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    ensure!(kill.success(), "kill -TERM failed");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .context("app-server did not exit after SIGTERM")??;
    assert!(status.success(), "app-server exit status {status}");
    let returned: HashSet<String> = pool
        .claims()
        .await?
        .into_iter()
        .flat_map(|c| c.return_keys)
        .collect();
    assert_eq!(returned.len(), published.len() - served.len());
    assert!(returned.is_disjoint(&served));
    pool.drop_db().await;
    Ok(())
}

/// Not a check: seeds a pool for the HTTP benchmark in BENCHMARKS.md.
/// Creates pool `$KGS_BENCH_POOL` in database `$KGS_MONGODB_DB` and publishes
/// `$KGS_BENCH_KEYS` keys (default 1,000,000) in batches of 50,000, each
/// with its batch record (the consumer verifies it) but without the
/// `used_keys` documents (the consumer never reads them).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark fixture, run by hand"]
async fn seed_pool_for_http_benchmark() -> Result<()> {
    let total: usize = std::env::var("KGS_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let pool = Pool::create_named(
        4,
        std::env::var("KGS_MONGODB_DB").context("KGS_MONGODB_DB")?,
        std::env::var("KGS_BENCH_POOL").context("KGS_BENCH_POOL")?,
    )
    .await?;
    for i in 0..total.div_ceil(50_000) {
        let batch = KeyBatch::new(unique("b"), pool.name.clone(), 1, pool.fresh_keys(50_000));
        let partition = (i % 4) as i32;
        pool.record_batch(&batch, partition).await?;
        pool.send(&batch.encode(), partition).await?;
    }
    println!(
        "seeded pool {} in {} with {total} keys",
        pool.name, pool.db_name
    );
    Ok(())
}

/// A running example app server process.
struct AppServer {
    child: tokio::process::Child,
    addr: String,
}

impl AppServer {
    /// Spawns `app-server` for `pool` in `group` and waits for `/healthz`.
    async fn start(pool: &Pool, group: &str, instance: &str) -> Result<Self> {
        let binary = kgs_tests::workspace_binary("app-server")?;
        let addr = kgs_tests::free_addr()?;
        let child = tokio::process::Command::new(binary)
            .env("KGS_KAFKA_BROKERS", kafka_brokers())
            .env("KGS_MONGODB_URI", mongodb_uri())
            .env("KGS_MONGODB_DB", &pool.db_name)
            .env("KGS_POOL", &pool.name)
            .env("KGS_GROUP", group)
            .env("KGS_INSTANCE_ID", instance)
            .env("KGS_HTTP_ADDR", &addr)
            .env("KGS_KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env("KGS_KEY_WAIT_MS", "20")
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .context("spawning app-server")?;
        let server = Self { child, addr };
        wait_for("app-server /healthz", WAIT, || async {
            Ok(http_get(&server.addr, "/healthz")
                .await
                .ok()
                .filter(|(s, _)| *s == 200))
        })
        .await?;
        Ok(server)
    }

    /// One key, or `None` on 503.
    async fn key(&self) -> Result<Option<String>> {
        match http_get(&self.addr, "/keys").await? {
            (200, key) => Ok(Some(key)),
            (503, _) => Ok(None),
            (status, body) => anyhow::bail!("GET /keys: {status} {body}"),
        }
    }

    /// An unlabelled metric from `/metrics`.
    async fn metric(&self, name: &str) -> Result<f64> {
        let (_, text) = http_get(&self.addr, "/metrics").await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0))
    }

    /// SIGTERM (graceful) or SIGKILL (crash), then waits for the exit.
    async fn stop(mut self, signal: &str) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().context("app-server pid")?;
        let sent = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()?;
        ensure!(sent.success(), "kill -{signal} failed");
        Ok(tokio::time::timeout(WAIT, self.child.wait())
            .await
            .context("app-server did not exit")??)
    }
}

/// Three app-server processes in one group each own one partition and hand
/// out disjoint keys, together exactly the published set, every one of them
/// in `used_keys`.
#[tokio::test(flavor = "multi_thread")]
async fn three_app_server_processes_hand_out_disjoint_keys() -> Result<()> {
    let pool = Pool::create(3).await?;
    let group = unique("g");
    let mut servers = Vec::new();
    for i in 0..3 {
        servers.push(AppServer::start(&pool, &group, &format!("app{i}")).await?);
    }
    wait_for("one partition per app server", WAIT, || async {
        for s in &servers {
            if s.metric(kgs_consumer::metrics::ASSIGNED_PARTITIONS).await? != 1.0 {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await?;
    let mut published = HashSet::new();
    for i in 0..9 {
        published.extend(pool.publish(15, i % 3).await?.keys);
    }
    let mut served: Vec<HashSet<String>> = vec![HashSet::new(); 3];
    let deadline = tokio::time::Instant::now() + WAIT;
    while served.iter().map(HashSet::len).sum::<usize>() < published.len() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "served only {} keys",
            served.iter().map(HashSet::len).sum::<usize>()
        );
        for (s, mine) in servers.iter().zip(served.iter_mut()) {
            if let Some(k) = s.key().await? {
                assert!(mine.insert(k), "a server handed a key out twice");
            }
        }
    }
    for (i, a) in served.iter().enumerate() {
        assert_eq!(a.len(), 45, "app{i} serves its own partition's 3 batches");
        for b in &served[i + 1..] {
            assert!(a.is_disjoint(b), "a key reached two app servers");
        }
    }
    let all: HashSet<String> = served.iter().flatten().cloned().collect();
    assert_eq!(all, published);
    let keys: Vec<&String> = all.iter().collect();
    let used = pool
        .db
        .collection::<UsedKeyDoc>(&used_keys_collection(&pool.name))
        .count_documents(doc! { "_id": { "$in": keys } })
        .await?;
    assert_eq!(
        used as usize,
        all.len(),
        "every handed-out key is in used_keys"
    );
    for s in servers {
        assert!(s.stop("TERM").await?.success());
    }
    pool.drop_db().await;
    Ok(())
}

/// SIGKILL of an app server mid-stream: no key is ever served twice, the
/// survivor takes over its partition, and the only keys neither served nor
/// returned are in the dead instance's claims, which stay `open`.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_stream_loses_at_most_the_buffer() -> Result<()> {
    let pool = Pool::create(2).await?;
    let group = unique("g");
    let doomed = AppServer::start(&pool, &group, "doomed").await?;
    let survivor = AppServer::start(&pool, &group, "survivor").await?;
    wait_for("one partition per app server", WAIT, || async {
        Ok((doomed
            .metric(kgs_consumer::metrics::ASSIGNED_PARTITIONS)
            .await?
            == 1.0
            && survivor
                .metric(kgs_consumer::metrics::ASSIGNED_PARTITIONS)
                .await?
                == 1.0)
            .then_some(()))
    })
    .await?;
    let mut published = Vec::new();
    for i in 0..6 {
        published.push(pool.publish(20, i % 2).await?);
    }
    // Take keys from both until the doomed one has served some.
    let mut served = Vec::new();
    let mut from_doomed = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while from_doomed < 10 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "doomed served no keys"
        );
        if let Some(k) = doomed.key().await? {
            served.push(k);
            from_doomed += 1;
        }
        if let Some(k) = survivor.key().await? {
            served.push(k);
        }
    }
    assert!(!doomed.stop("KILL").await?.success());
    // More batches on both partitions: the survivor gets the dead one's
    // partition after the session timeout and serves the new batches.
    for i in 0..4 {
        published.push(pool.publish(20, i % 2).await?);
    }
    let ids: HashSet<String> = published.iter().map(|b| b.batch_id.clone()).collect();
    wait_for("every batch claimed", WAIT, || async {
        let claimed = pool
            .claims()
            .await?
            .iter()
            .filter(|c| ids.contains(&c.batch_id))
            .count();
        Ok((claimed == ids.len()).then_some(()))
    })
    .await?;
    while let Some(k) = survivor.key().await? {
        served.push(k);
    }
    assert!(survivor.stop("TERM").await?.success());

    let served_set: HashSet<String> = served.iter().cloned().collect();
    assert_eq!(served_set.len(), served.len(), "a key was served twice");
    let claims = pool.claims().await?;
    let returned: HashSet<String> = claims.iter().flat_map(|c| c.return_keys.clone()).collect();
    assert!(returned.is_disjoint(&served_set));
    let batch_keys: HashMap<String, &Vec<String>> = published
        .iter()
        .map(|b| (b.batch_id.clone(), &b.keys))
        .collect();
    let lost_allowed: HashSet<String> = claims
        .iter()
        .filter(|c| c.instance == "doomed" && c.state == ClaimState::Open)
        .flat_map(|c| batch_keys[&c.batch_id].iter().cloned())
        .collect();
    assert!(
        !lost_allowed.is_empty(),
        "the dead instance's claims stay open"
    );
    for key in published.iter().flat_map(|b| &b.keys) {
        assert!(
            served_set.contains(key) || returned.contains(key) || lost_allowed.contains(key),
            "key {key} neither served, returned, nor in an open claim of the dead instance"
        );
    }
    assert!(claims
        .iter()
        .all(|c| c.instance == "doomed" || c.state != ClaimState::Open));
    pool.drop_db().await;
    Ok(())
}

/// End to end with the real `kgs-producer` over a whole 1,000-key space:
/// an instance shuts down gracefully, the producer puts its unused keys
/// back into `keys` (claims `returned`), and another instance later hands
/// them out: every key of the space is handed out exactly once in total.
#[tokio::test(flavor = "multi_thread")]
async fn returned_keys_are_handed_out_later_exactly_once() -> Result<()> {
    let producer_bin = kgs_tests::workspace_binary("kgs-producer")?;
    let db_name = unique("kgs-consumer");
    let pool = unique("p");
    let group = unique("g");
    let producer = |args: &[&str]| {
        let mut c = tokio::process::Command::new(&producer_bin);
        c.args(args)
            .env("KGS_KAFKA_BROKERS", kafka_brokers())
            .env("KGS_MONGODB_URI", mongodb_uri())
            .env("KGS_MONGODB_DB", &db_name)
            .env("KGS_POOL", &pool)
            .env("KGS_TARGET_SIZE", "1000")
            .env("KGS_LEASE_DURATION", "3s")
            .env("KGS_CONNECT_TIMEOUT", "10s")
            .env_remove("KGS_FAILPOINT")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        c
    };
    let init = producer(&[
        "init",
        "--length",
        "3",
        "--alphabet",
        "0123456789",
        "--partitions",
        "2",
    ])
    .output()
    .await?;
    ensure!(
        init.status.success(),
        "kgs-producer init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let run = producer(&[
        "run",
        "--group",
        &group,
        "--batch-size",
        "50",
        "--low-watermark",
        "1",
        "--high-watermark",
        "2",
        "--poll-interval",
        "100ms",
    ])
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
    let mut run = run;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &run.id().unwrap_or_default().to_string()])
        .status();
    let _ = tokio::time::timeout(WAIT, run.wait()).await;

    let all: Vec<String> = from_a.iter().chain(&from_b).cloned().collect();
    let distinct: HashSet<&String> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "a key was handed out twice");
    assert_eq!(distinct.len(), 1000, "the whole space was handed out");
    let _ = db.drop().await;
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
        metric(&registry, kgs_consumer::metrics::REPLAYS_TOTAL, None),
        2.0
    );
    assert_eq!(
        metric(&registry, kgs_consumer::metrics::BAD_MESSAGES_TOTAL, None),
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
