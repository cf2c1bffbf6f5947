//! Provenance against hostile writers, with the real `kgs-producer` and the
//! real consumer (the library, or the `kgs-app-server` binary): a key is handed
//! out only if this pool incarnation's producer durably moved it for exactly
//! the batch that carries it (issue 10).
//!
//! Anyone who can write to the pool's topic writes here what a real
//! deployment meets: well-formed forged batches (keys already handed out,
//! keys still in `keys.<pool>`, keys never generated), another pool's real
//! batch, another installation's real batch, an earlier incarnation's batch
//! after the database was dropped and re-initialised, replays, a message
//! carrying the id of a batch the producer moved but had not published when
//! it crashed, odd batch ids, a `returning` claim of no batch; and consumers
//! that share an instance id across groups and across an offset reset.
//! Every test asserts that no key is handed out
//! twice, that every handed-out key is in `used_keys.<pool>` under a batch
//! whose record (this pool, this incarnation, holding the key) and claim
//! exist ([`check_provenance`]), and that the pool keeps handing out keys.
//!
//! Pools are small for the slow MongoDB-wire test server: 3 decimal digits
//! (1,000 keys), 120 of them generated, batches of 10.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bson::doc;
use futures::TryStreamExt;
use kgs_consumer::{KeyConsumer, KeyConsumerBuilder};
use kgs_schemas::docs::{
    keys_collection, used_keys_collection, BatchRecord, BatchState, ClaimDoc, ClaimState, KeyDoc,
    PoolDoc, UsedKeyDoc, UsedReason, BATCHES, CLAIMS, POOLS,
};
use kgs_schemas::KeyBatch;
use kgs_tests::kafka::{commit_offsets, CommitAt};
use kgs_tests::metrics::first_value;
use kgs_tests::{
    free_addr, http_get, kafka_brokers, kafka_config, mongo_client, mongodb_uri, registry_value,
    take, take_until, terminate, unique, wait_for, AppServer, AppServerCmd, ProducerCmd,
};
use prometheus::Registry;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::process::Child;

/// Bound of every wait for keys, metrics or processes.
const WAIT: Duration = Duration::from_secs(90);
/// 10^3 = 1,000 keys in the space.
const ALPHABET: &str = "0123456789";
const LENGTH: u32 = 3;
/// Keys kept generated: most of the space is never generated in a test.
const TARGET_SIZE: &str = "120";
/// Keys per batch.
const BATCH_SIZE: usize = 10;

/// One pool in a database, with the consumer group its producer watches.
struct Setup {
    db: String,
    pool: String,
    group: String,
    partitions: u32,
    /// One client for all of the test's reads and writes.
    client: tokio::sync::OnceCell<mongodb::Client>,
}

impl Setup {
    /// A new pool in its own database.
    fn new(partitions: u32) -> Self {
        Self::in_db(unique("kgs-prov"), unique("p"), partitions)
    }

    /// A new pool, initialised, with its producer running ([`Setup::run`]).
    async fn running(partitions: u32) -> Result<(Self, Child)> {
        let s = Self::new(partitions);
        s.init().await?;
        let run = s.run(None)?;
        Ok((s, run))
    }

    /// Pool `pool` in database `db` (another pool may share either).
    fn in_db(db: String, pool: String, partitions: u32) -> Self {
        Self {
            db,
            pool,
            group: unique("g"),
            partitions,
            client: tokio::sync::OnceCell::new(),
        }
    }

    /// `kgs-producer` for this pool, with `KGS_FAILPOINT` set if given.
    fn producer(&self, args: &[&str], failpoint: Option<&str>) -> Result<ProducerCmd> {
        Ok(ProducerCmd::new(&self.db, &self.pool)?
            .args(args)
            .env("KGS_TARGET_SIZE", TARGET_SIZE)
            .failpoint(failpoint))
    }

    /// `init`: 3 decimal digits, 120 keys generated.
    async fn init(&self) -> Result<()> {
        self.producer(&[], None)?
            .init(LENGTH, self.partitions)
            .args(["--alphabet", ALPHABET])
            .success()
            .await?;
        Ok(())
    }

    /// Spawns `run` (batches of 10, at most 2 waiting per partition for
    /// this setup's group); its log goes to the temp dir.
    fn run(&self, failpoint: Option<&str>) -> Result<Child> {
        self.run_serving(failpoint, None)
    }

    /// [`Setup::run`], serving `/metrics` on `http` if given.
    fn run_serving(&self, failpoint: Option<&str>, http: Option<&str>) -> Result<Child> {
        let mut c = self
            .producer(&[], failpoint)?
            .run(BATCH_SIZE, 2)
            .args(["--group", &self.group]);
        if let Some(addr) = http {
            c = c.env("KGS_HTTP_ADDR", addr);
        }
        c.log_to_temp(&self.pool)?.spawn()
    }

    async fn database(&self) -> Result<mongodb::Database> {
        let client = self.client.get_or_try_init(mongo_client).await?;
        Ok(client.database(&self.db))
    }

    async fn pool_doc(&self) -> Result<PoolDoc> {
        self.database()
            .await?
            .collection::<PoolDoc>(POOLS)
            .find_one(doc! { "_id": &self.pool })
            .await?
            .context("pool document")
    }

    /// A consumer of this pool in `group` as `instance`, reporting to `registry`.
    fn consumer(&self, group: &str, instance: &str, registry: &Registry) -> KeyConsumerBuilder {
        KeyConsumer::builder()
            .brokers(kafka_brokers())
            .mongodb_uri(mongodb_uri())
            .database(&self.db)
            .pool(&self.pool)
            .group(group)
            .instance_id(instance)
            .registry(registry.clone())
            .watermarks(5, 20)
            .kafka_option("session.timeout.ms", "6000")
            .kafka_option("heartbeat.interval.ms", "500")
    }

    /// The pool's batch records in `state`.
    async fn records(&self, state: &str) -> Result<Vec<BatchRecord>> {
        Ok(self
            .database()
            .await?
            .collection::<BatchRecord>(BATCHES)
            .find(doc! { "pool": &self.pool, "state": state })
            .await?
            .try_collect()
            .await?)
    }

    /// The batch record `id`.
    async fn record(&self, id: &str) -> Result<Option<BatchRecord>> {
        Ok(self
            .database()
            .await?
            .collection::<BatchRecord>(BATCHES)
            .find_one(doc! { "_id": id })
            .await?)
    }

    /// Every claim of the database.
    async fn claims(&self) -> Result<Vec<ClaimDoc>> {
        Ok(self
            .database()
            .await?
            .collection::<ClaimDoc>(CLAIMS)
            .find(doc! {})
            .await?
            .try_collect()
            .await?)
    }

    /// The `n` keys of `keys.<pool>` with the smallest `n`: the next ones a
    /// batch will move.
    async fn next_unmoved(&self, n: i64) -> Result<Vec<String>> {
        let keys: Vec<KeyDoc> = self
            .database()
            .await?
            .collection::<KeyDoc>(&keys_collection(&self.pool))
            .find(doc! {})
            .sort(doc! { "n": 1 })
            .limit(n)
            .await?
            .try_collect()
            .await?;
        ensure!(keys.len() as i64 == n, "only {} keys left", keys.len());
        Ok(keys.into_iter().map(|k| k.key).collect())
    }

    /// Which of `keys` are in `keys.<pool>` or `used_keys.<pool>`.
    async fn generated_among(&self, keys: &[String]) -> Result<HashSet<String>> {
        let db = self.database().await?;
        let mut found = HashSet::new();
        for coll in [
            keys_collection(&self.pool),
            used_keys_collection(&self.pool),
        ] {
            let docs: Vec<bson::Document> = db
                .collection::<bson::Document>(&coll)
                .find(doc! { "_id": { "$in": keys } })
                .await?
                .try_collect()
                .await?;
            found.extend(
                docs.iter()
                    .filter_map(|d| d.get_str("_id").ok().map(str::to_owned)),
            );
        }
        Ok(found)
    }

    async fn drop_db(&self) {
        if let Ok(db) = self.database().await {
            let _ = db.drop().await;
        }
    }
}

/// A writer to a pool's topic that is not its producer: plain,
/// non-transactional, partition chosen by the caller.
struct Forger {
    producer: FutureProducer,
}

impl Forger {
    fn new() -> Result<Self> {
        let producer = kafka_config()
            .set("message.timeout.ms", "30000")
            .create()
            .context("creating the forging producer")?;
        Ok(Self { producer })
    }

    /// Writes `payload` with Kafka key `key` to `partition` of `topic`;
    /// returns its offset.
    async fn send(&self, topic: &str, partition: i32, key: &[u8], payload: &[u8]) -> Result<i64> {
        let delivery = self
            .producer
            .send(
                FutureRecord::to(topic)
                    .partition(partition)
                    .key(key)
                    .payload(payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .context("writing a forged message")?;
        Ok(delivery.offset)
    }

    /// Writes `batch` as the producer would (its id as the Kafka key).
    async fn batch(&self, topic: &str, partition: i32, batch: &KeyBatch) -> Result<i64> {
        self.send(topic, partition, batch.batch_id.as_bytes(), &batch.encode())
            .await
    }
}

/// A well-formed batch of `pool` under a new id that no producer moved.
fn forged(pool: &str, keys: Vec<String>) -> KeyBatch {
    KeyBatch::new(unique("forged"), pool.to_owned(), 1, keys)
}

/// `kgs_consumer_bad_messages_total{kind}`.
fn bad(registry: &Registry, kind: &str) -> f64 {
    registry_value(
        registry,
        kgs_consumer::metrics::BAD_MESSAGES_TOTAL,
        Some(("kind", kind)),
    )
}

/// `kgs_consumer_replays_total`.
fn replays(registry: &Registry) -> f64 {
    registry_value(registry, kgs_consumer::metrics::REPLAYS_TOTAL, None)
}

/// The provenance invariants for every key `handed` out by the consumers
/// of `s`'s pool: none twice; each in `used_keys.<pool>` (reason `batch`)
/// under a batch whose record exists, is this pool's and this
/// incarnation's, holds the key and is moved or published, and whose claim
/// exists for this pool.
async fn check_provenance(s: &Setup, handed: &[String]) -> Result<()> {
    let mut seen = HashSet::new();
    let twice: Vec<&String> = handed.iter().filter(|k| !seen.insert(*k)).collect();
    ensure!(twice.is_empty(), "keys handed out twice: {twice:?}");
    ensure!(!handed.is_empty(), "no key handed out: nothing proved");
    let db = s.database().await?;
    let incarnation = s.pool_doc().await?.incarnation;
    let used: HashMap<String, UsedKeyDoc> = db
        .collection::<UsedKeyDoc>(&used_keys_collection(&s.pool))
        .find(doc! { "_id": { "$in": handed } })
        .await?
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .map(|u| (u.key.clone(), u))
        .collect();
    let mut batch_of = HashMap::new();
    for k in handed {
        let u = used
            .get(k)
            .with_context(|| format!("handed-out key {k} is not in used_keys"))?;
        ensure!(
            u.reason == UsedReason::Batch,
            "handed-out key {k} is reserved"
        );
        let batch = u
            .batch
            .clone()
            .with_context(|| format!("handed-out key {k} is in used_keys under no batch"))?;
        batch_of.insert(k.clone(), batch);
    }
    let ids: Vec<&String> = batch_of
        .values()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let records: HashMap<String, BatchRecord> = db
        .collection::<BatchRecord>(BATCHES)
        .find(doc! { "_id": { "$in": &ids } })
        .await?
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    let claims: HashMap<String, ClaimDoc> = db
        .collection::<ClaimDoc>(CLAIMS)
        .find(doc! { "_id": { "$in": &ids } })
        .await?
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .map(|c| (c.batch_id.clone(), c))
        .collect();
    for (k, batch) in &batch_of {
        let r = records
            .get(batch)
            .with_context(|| format!("{k}: batch {batch} has no record"))?;
        ensure!(
            r.pool == s.pool && r.incarnation == incarnation,
            "{k}: batch {batch} is of pool {} incarnation {}",
            r.pool,
            r.incarnation
        );
        ensure!(r.keys.contains(k), "{k}: not among batch {batch}'s keys");
        ensure!(
            r.state != BatchState::Moving,
            "{k}: batch {batch} still moving"
        );
        let c = claims
            .get(batch)
            .with_context(|| format!("{k}: batch {batch} has no claim"))?;
        ensure!(
            c.pool == s.pool,
            "{k}: claim of {batch} is of pool {}",
            c.pool
        );
    }
    Ok(())
}

/// No claim exists for any of `ids` (a refused batch is never claimed).
async fn never_claimed(s: &Setup, ids: &[&str]) -> Result<()> {
    let claims = s
        .database()
        .await?
        .collection::<ClaimDoc>(CLAIMS)
        .count_documents(doc! { "_id": { "$in": ids } })
        .await?;
    ensure!(claims == 0, "a refused batch was claimed: {ids:?}");
    Ok(())
}

/// A forged batch (well-formed, a new batch id, this pool, on each
/// partition) whose keys were already handed out is refused as unverified,
/// never claimed, and none of its keys is handed out again; the pool keeps
/// handing out keys.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_batch_of_handed_out_keys_is_refused() -> Result<()> {
    let (s, run) = Setup::running(2).await?;
    let reg = Registry::new();
    let c = s.consumer(&s.group, "a", &reg).build().await?;
    let mut handed = take(&c, 25, WAIT).await?;
    let topic = s.pool_doc().await?.topic;
    let forger = Forger::new()?;
    let mut ids = Vec::new();
    for p in 0..2 {
        let batch = forged(&s.pool, handed[p * 10..p * 10 + 10].to_vec());
        forger.batch(&topic, p as i32, &batch).await?;
        ids.push(batch.batch_id);
    }
    handed.extend(
        take_until(&c, "both forged batches refused", WAIT, |_| {
            bad(&reg, "unverified") >= 2.0
        })
        .await?,
    );
    handed.extend(take(&c, 30, WAIT).await?);
    assert_eq!(bad(&reg, "unverified"), 2.0);
    assert_eq!(replays(&reg), 0.0, "a forged batch is not a replay");
    never_claimed(&s, &ids.iter().map(String::as_str).collect::<Vec<_>>()).await?;
    check_provenance(&s, &handed).await?;
    c.shutdown().await?;
    assert!(terminate(run).await?.success());
    s.drop_db().await;
    Ok(())
}

/// A forged batch of keys still in `keys.<pool>` (never moved) is refused
/// while they are there; when the producer later moves and publishes them,
/// each of them is handed out exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_batch_of_unmoved_keys_is_refused_and_they_come_once_later() -> Result<()> {
    let (s, run) = Setup::running(2).await?;
    let reg = Registry::new();
    let c = s.consumer(&s.group, "a", &reg).build().await?;
    let mut handed = take(&c, 15, WAIT).await?;
    // The producer stops, so the forged keys stay unmoved until it is back.
    assert!(terminate(run).await?.success());
    let unmoved = s.next_unmoved(BATCH_SIZE as i64).await?;
    let topic = s.pool_doc().await?.topic;
    let forger = Forger::new()?;
    let mut ids = Vec::new();
    for p in 0..2 {
        let batch = forged(&s.pool, unmoved.clone());
        forger.batch(&topic, p, &batch).await?;
        ids.push(batch.batch_id);
    }
    handed.extend(
        take_until(&c, "both forged batches refused", WAIT, |_| {
            bad(&reg, "unverified") >= 2.0
        })
        .await?,
    );
    let early: Vec<&String> = handed.iter().filter(|k| unmoved.contains(k)).collect();
    assert!(early.is_empty(), "unmoved keys handed out: {early:?}");
    assert_eq!(
        s.next_unmoved(BATCH_SIZE as i64).await?,
        unmoved,
        "the forged keys are still the next unmoved ones"
    );
    never_claimed(&s, &ids.iter().map(String::as_str).collect::<Vec<_>>()).await?;

    // The producer comes back and moves them in a batch of its own.
    let run = s.run(None)?;
    let mut missing: HashSet<String> = unmoved.iter().cloned().collect();
    handed.extend(
        take_until(
            &c,
            "the forged keys handed out by a real batch",
            WAIT,
            |k| {
                if let Some(k) = k {
                    missing.remove(k);
                }
                missing.is_empty()
            },
        )
        .await?,
    );
    handed.extend(take(&c, 20, WAIT).await?);
    for k in &unmoved {
        assert_eq!(
            handed.iter().filter(|h| *h == k).count(),
            1,
            "{k} handed out once"
        );
    }
    assert_eq!(bad(&reg, "unverified"), 2.0);
    check_provenance(&s, &handed).await?;
    c.shutdown().await?;
    assert!(terminate(run).await?.success());
    s.drop_db().await;
    Ok(())
}

/// A forged batch of well-formed keys the pool never generated (the last
/// positions of its generation order, with 120 of 1,000 keys generated) is
/// refused: none of them is handed out, and the pool keeps handing out keys.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_batch_of_never_generated_keys_is_refused() -> Result<()> {
    let s = Setup::new(2);
    s.init().await?;
    let doc = s.pool_doc().await?;
    let (format, perm) = kgs_producer::writer::generate::pool_order(&doc)?;
    let space = format.space();
    let never: Vec<String> = (space - BATCH_SIZE as u64..space)
        .map(|i| format.key_at(perm.apply(i)))
        .collect::<std::result::Result<_, _>>()?;
    let generated = s.generated_among(&never).await?;
    ensure!(generated.is_empty(), "already generated: {generated:?}");

    let run = s.run(None)?;
    let reg = Registry::new();
    let c = s.consumer(&s.group, "a", &reg).build().await?;
    let mut handed = take(&c, 15, WAIT).await?;
    let forger = Forger::new()?;
    let mut ids = Vec::new();
    for p in 0..2 {
        let batch = forged(&s.pool, never.clone());
        forger.batch(&doc.topic, p, &batch).await?;
        ids.push(batch.batch_id);
    }
    handed.extend(
        take_until(&c, "both forged batches refused", WAIT, |_| {
            bad(&reg, "unverified") >= 2.0
        })
        .await?,
    );
    handed.extend(take(&c, 30, WAIT).await?);
    let leaked: Vec<&String> = handed.iter().filter(|k| never.contains(k)).collect();
    assert!(
        leaked.is_empty(),
        "never generated keys handed out: {leaked:?}"
    );
    assert!(
        s.generated_among(&never).await?.is_empty(),
        "generation reached the last positions"
    );
    never_claimed(&s, &ids.iter().map(String::as_str).collect::<Vec<_>>()).await?;
    check_provenance(&s, &handed).await?;
    c.shutdown().await?;
    assert!(terminate(run).await?.success());
    s.drop_db().await;
    Ok(())
}

/// A real batch of another pool of the same database, copied onto this
/// pool's topic (its partition) with the pool field rewritten, is refused
/// (its record names the other pool); copied unchanged it is refused at
/// decode (wrong pool). This pool hands out only its own batches' keys and
/// both pools keep handing out keys.
#[tokio::test(flavor = "multi_thread")]
async fn another_pools_batch_is_refused() -> Result<()> {
    let p = Setup::new(2);
    let q = Setup::in_db(p.db.clone(), unique("q"), 2);
    p.init().await?;
    q.init().await?;
    let (run_p, run_q) = (p.run(None)?, q.run(None)?);
    let (reg_p, reg_q) = (Registry::new(), Registry::new());
    let cp = p.consumer(&p.group, "p", &reg_p).build().await?;
    let cq = q.consumer(&q.group, "q", &reg_q).build().await?;
    let mut handed_p = take(&cp, 15, WAIT).await?;
    let mut handed_q = take(&cq, 15, WAIT).await?;
    let real = wait_for("a published batch of q", WAIT, || async {
        Ok(q.records("published").await?.into_iter().next())
    })
    .await?;
    let partition = real.partition.context("published without a partition")?;
    let topic = p.pool_doc().await?.topic;
    let forger = Forger::new()?;
    let rewritten = KeyBatch::new(
        real.id.clone(),
        p.pool.clone(),
        real.epoch,
        real.keys.clone(),
    );
    forger.batch(&topic, partition, &rewritten).await?;
    let unchanged = KeyBatch::new(
        real.id.clone(),
        q.pool.clone(),
        real.epoch,
        real.keys.clone(),
    );
    forger.batch(&topic, partition, &unchanged).await?;
    handed_p.extend(
        take_until(&cp, "both copies refused", WAIT, |_| {
            bad(&reg_p, "unverified") >= 1.0 && bad(&reg_p, "wrong_pool") >= 1.0
        })
        .await?,
    );
    handed_p.extend(take(&cp, 20, WAIT).await?);
    handed_q.extend(take(&cq, 20, WAIT).await?);
    assert_eq!(bad(&reg_p, "unverified"), 1.0);
    assert_eq!(bad(&reg_p, "wrong_pool"), 1.0);
    assert_eq!(replays(&reg_p), 0.0, "never reached the claim");
    // If q's batch is claimed, it is by q's consumer.
    for c in p.claims().await? {
        if c.batch_id == real.id {
            assert_eq!(c.pool, q.pool, "p claimed q's batch");
        }
    }
    check_provenance(&p, &handed_p).await?;
    check_provenance(&q, &handed_q).await?;
    cp.shutdown().await?;
    cq.shutdown().await?;
    assert!(terminate(run_p).await?.success());
    assert!(terminate(run_q).await?.success());
    p.drop_db().await;
    Ok(())
}

/// Two installations (two databases) with the same pool name on one Kafka
/// cluster get different incarnations and topics and work independently
/// (neither producer fences the other); a real batch of installation B
/// copied onto A's topic (the same partition) is refused by A.
#[tokio::test(flavor = "multi_thread")]
async fn another_installations_batch_is_refused() -> Result<()> {
    let a = Setup::new(2);
    let b = Setup::in_db(unique("kgs-prov"), a.pool.clone(), 2);
    a.init().await?;
    b.init().await?;
    let (doc_a, doc_b) = (a.pool_doc().await?, b.pool_doc().await?);
    assert_ne!(doc_a.incarnation, doc_b.incarnation);
    assert_ne!(doc_a.topic, doc_b.topic);
    let (run_a, run_b) = (a.run(None)?, b.run(None)?);
    let (reg_a, reg_b) = (Registry::new(), Registry::new());
    let ca = a.consumer(&a.group, "app", &reg_a).build().await?;
    let cb = b.consumer(&b.group, "app", &reg_b).build().await?;
    let mut handed_a = take(&ca, 15, WAIT).await?;
    let mut handed_b = take(&cb, 15, WAIT).await?;
    let real = wait_for("a published batch of b", WAIT, || async {
        Ok(b.records("published").await?.into_iter().next())
    })
    .await?;
    let partition = real.partition.context("published without a partition")?;
    let copy = KeyBatch::new(
        real.id.clone(),
        real.pool.clone(),
        real.epoch,
        real.keys.clone(),
    );
    Forger::new()?.batch(&doc_a.topic, partition, &copy).await?;
    handed_a.extend(
        take_until(&ca, "b's batch refused by a", WAIT, |_| {
            bad(&reg_a, "unverified") >= 1.0
        })
        .await?,
    );
    // Both keep working, each on its own topic.
    handed_a.extend(take(&ca, 30, WAIT).await?);
    handed_b.extend(take(&cb, 30, WAIT).await?);
    assert_eq!(bad(&reg_a, "unverified"), 1.0);
    assert_eq!(bad(&reg_b, "unverified"), 0.0);
    never_claimed(&a, &[&real.id]).await?;
    check_provenance(&a, &handed_a).await?;
    check_provenance(&b, &handed_b).await?;
    ca.shutdown().await?;
    cb.shutdown().await?;
    assert!(terminate(run_a).await?.success());
    assert!(terminate(run_b).await?.success());
    a.drop_db().await;
    b.drop_db().await;
    Ok(())
}

/// An app server for `s`'s pool in its group, as `instance`.
async fn app_server(s: &Setup, instance: &str) -> Result<AppServer> {
    AppServerCmd::new(&s.db, &s.pool)?
        .group(&s.group)
        .instance(instance)
        .watermarks(5, 20)
        .stdout(std::process::Stdio::null())
        .start()
        .await
}

/// A real batch written a second time (the same message: id, keys and
/// partition) is handed out once: the app server counts it in
/// `kgs_consumer_replays_total`, not as a bad or unverified message.
#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_real_batch_is_handed_out_once_and_counted_as_replay() -> Result<()> {
    let (s, run) = Setup::running(2).await?;
    let app = app_server(&s, "app").await?;
    let mut handed = app.keys(15, WAIT).await?;
    let doc = s.pool_doc().await?;
    let claimed: HashSet<String> = s.claims().await?.into_iter().map(|c| c.batch_id).collect();
    let topic = kgs_tests::read_topic_batches(&kafka_brokers(), &doc.topic, 2, WAIT).await?;
    let (partition, _, original) = topic
        .into_iter()
        .find(|(_, _, b)| claimed.contains(&b.batch_id))
        .context("a claimed batch in the topic")?;
    Forger::new()?
        .batch(&doc.topic, partition, &original)
        .await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.metric(kgs_consumer::metrics::REPLAYS_TOTAL).await? < 1.0 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the replay was not counted"
        );
        if let Some(k) = app.key().await? {
            handed.push(k);
        }
    }
    handed.extend(app.keys(20, WAIT).await?);
    assert_eq!(app.metric(kgs_consumer::metrics::REPLAYS_TOTAL).await?, 1.0);
    let unverified = format!(
        "{}{{kind=\"unverified\"}}",
        kgs_consumer::metrics::BAD_MESSAGES_TOTAL
    );
    assert_eq!(app.metric(&unverified).await?, 0.0);
    for kind in kgs_schemas::DecodeError::KINDS {
        let series = format!(
            "{}{{kind=\"{kind}\"}}",
            kgs_consumer::metrics::BAD_MESSAGES_TOTAL
        );
        assert_eq!(app.metric(&series).await?, 0.0, "{series}");
    }
    check_provenance(&s, &handed).await?;
    assert!(app.stop(kgs_tests::Signal::Term).await?.success());
    assert!(terminate(run).await?.success());
    s.drop_db().await;
    Ok(())
}

/// A message whose Kafka key and batch id are those of a batch the producer
/// moved but had not published when it crashed (failpoint
/// `publish_after_offset`: the record is `moved` with its partition), with
/// other keys, on that partition: the consumer refuses it; the restarted
/// producer does not take it for the batch (recovery identifies a batch by
/// content) and publishes the real one; the real keys are handed out, the
/// forged ones never from the forgery.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_message_with_a_moved_batchs_id_does_not_stand_in_for_it() -> Result<()> {
    let s = Setup::new(2);
    s.init().await?;
    let mut crashed = s.run(Some("publish_after_offset"))?;
    let status = tokio::time::timeout(WAIT, crashed.wait())
        .await
        .context("publish_after_offset did not fire")??;
    assert!(!status.success(), "publish_after_offset did not fire");
    let moved = s.records("moved").await?;
    ensure!(moved.len() == 1, "{} moved batches", moved.len());
    let record = moved.into_iter().next().unwrap();
    let partition = record
        .partition
        .context("moved batch without a partition")?;
    ensure!(
        s.records("published").await?.is_empty(),
        "a batch was published before the crash"
    );

    // Other keys (still in `keys`) under the moved batch's id, on its partition.
    let other = s.next_unmoved(BATCH_SIZE as i64).await?;
    assert!(other.iter().all(|k| !record.keys.contains(k)));
    let impostor = KeyBatch::new(
        record.id.clone(),
        s.pool.clone(),
        record.epoch,
        other.clone(),
    );
    let topic = s.pool_doc().await?.topic;
    let forged_at = Forger::new()?.batch(&topic, partition, &impostor).await?;

    let reg = Registry::new();
    let c = s.consumer(&s.group, "a", &reg).build().await?;
    let mut handed = take_until(&c, "the impostor refused", WAIT, |_| {
        bad(&reg, "unverified") >= 1.0
    })
    .await?;
    assert!(
        handed.is_empty(),
        "keys handed out before any publish: {handed:?}"
    );
    never_claimed(&s, &[&record.id]).await?;

    let run = s.run(None)?;
    let mut missing: HashSet<String> = record.keys.iter().cloned().collect();
    handed.extend(
        take_until(&c, "the real batch's keys", WAIT, |k| {
            if let Some(k) = k {
                missing.remove(k);
            }
            missing.is_empty()
        })
        .await?,
    );
    handed.extend(take(&c, 20, WAIT).await?);
    let after = s.record(&record.id).await?.context("record")?;
    assert_eq!(after.state, BatchState::Published);
    assert_eq!(after.keys, record.keys);
    assert_eq!(after.partition, Some(partition));
    assert!(
        after.offset.is_some_and(|o| o > forged_at),
        "published at {:?}, the impostor is at {forged_at}",
        after.offset
    );
    // In the topic: the impostor and the real batch under one id, once each.
    let in_topic: Vec<KeyBatch> = kgs_tests::read_topic_batches(&kafka_brokers(), &topic, 2, WAIT)
        .await?
        .into_iter()
        .filter(|(_, _, b)| b.batch_id == record.id)
        .map(|(_, _, b)| b)
        .collect();
    assert_eq!(in_topic.len(), 2, "impostor + the real batch");
    assert_eq!(in_topic.iter().filter(|b| b.keys == record.keys).count(), 1);
    assert_eq!(bad(&reg, "unverified"), 1.0);
    // The impostor's keys come, if at all, from batches of their own.
    let used: HashMap<String, Option<String>> = s
        .database()
        .await?
        .collection::<UsedKeyDoc>(&used_keys_collection(&s.pool))
        .find(doc! { "_id": { "$in": &other } })
        .await?
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .map(|u| (u.key, u.batch))
        .collect();
    for k in handed.iter().filter(|k| other.contains(k)) {
        assert_ne!(used.get(k), Some(&Some(record.id.clone())), "{k}");
    }
    check_provenance(&s, &handed).await?;
    c.shutdown().await?;
    assert!(terminate(run).await?.success());
    s.drop_db().await;
    Ok(())
}

/// Batch ids with a NUL byte (appended to a real batch's id, with its keys
/// on its partition; and inside a new id) are refused as unverified, one of
/// 129 characters (a real batch's id padded) at decode, one of 128 (the
/// longest accepted) with no record as unverified; none is claimed, no key
/// comes twice, and the pool keeps handing out keys.
#[tokio::test(flavor = "multi_thread")]
async fn batch_ids_with_nul_bytes_or_129_characters_are_refused() -> Result<()> {
    let (s, run) = Setup::running(2).await?;
    let reg = Registry::new();
    let c = s.consumer(&s.group, "a", &reg).build().await?;
    let mut handed = take(&c, 15, WAIT).await?;
    let real = wait_for("a published batch", WAIT, || async {
        Ok(s.records("published").await?.into_iter().next())
    })
    .await?;
    let partition = real.partition.context("published without a partition")?;
    let topic = s.pool_doc().await?.topic;
    let pad = |id: &str, len: usize| format!("{id}{}", "x".repeat(len - id.len()));
    let with = |id: String, keys: Vec<String>| KeyBatch::new(id, s.pool.clone(), real.epoch, keys);
    let odd = [
        with(format!("{}\0", real.id), real.keys.clone()),
        with(format!("forged\0{}", real.id), handed[..5].to_vec()),
        with(pad(&real.id, 128), real.keys.clone()),
        with(pad(&real.id, 129), real.keys.clone()),
    ];
    let forger = Forger::new()?;
    for b in &odd {
        forger.batch(&topic, partition, b).await?;
    }
    handed.extend(
        take_until(&c, "every odd batch id refused", WAIT, |_| {
            bad(&reg, "unverified") >= 3.0 && bad(&reg, "malformed") >= 1.0
        })
        .await?,
    );
    handed.extend(take(&c, 30, WAIT).await?);
    assert_eq!(bad(&reg, "unverified"), 3.0);
    assert_eq!(bad(&reg, "malformed"), 1.0);
    let ids: Vec<&str> = odd.iter().map(|b| b.batch_id.as_str()).collect();
    never_claimed(&s, &ids).await?;
    for claim in s.claims().await? {
        assert!(
            !claim.batch_id.contains('\0') && claim.batch_id.len() <= 128,
            "claim {:?}",
            claim.batch_id
        );
    }
    check_provenance(&s, &handed).await?;
    c.shutdown().await?;
    assert!(terminate(run).await?.success());
    s.drop_db().await;
    Ok(())
}

/// Two consumers with the same instance id in two groups both read every
/// batch of the topic: each batch is handed out by at most one of them (for
/// the other its claim is another process's: a replay), so no key comes
/// twice across both, and keys keep coming.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_instance_id_in_two_groups_hands_out_no_key_twice() -> Result<()> {
    let (s, run) = Setup::running(2).await?;
    let (reg_a, reg_b) = (Registry::new(), Registry::new());
    let a = s.consumer(&s.group, "same", &reg_a).build().await?;
    let other_group = unique("g2");
    let b = s.consumer(&other_group, "same", &reg_b).build().await?;
    let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    // Until both have read the same batches (replays) and 60 keys came.
    while from_a.len() + from_b.len() < 60 || replays(&reg_a) + replays(&reg_b) < 1.0 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{} + {} keys, {} + {} replays",
            from_a.len(),
            from_b.len(),
            replays(&reg_a),
            replays(&reg_b)
        );
        let mut progress = false;
        while let Ok(k) = a.next_key() {
            from_a.push(k.to_string());
            progress = true;
        }
        while let Ok(k) = b.next_key() {
            from_b.push(k.to_string());
            progress = true;
        }
        if !progress {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let handed: Vec<String> = from_a.iter().chain(&from_b).cloned().collect();
    check_provenance(&s, &handed).await?;
    // Every claim names the group (and process) that really handed it out.
    let claims = s.claims().await?;
    let group_of: HashMap<&str, &str> = claims
        .iter()
        .map(|c| (c.batch_id.as_str(), c.group.as_str()))
        .collect();
    let used = s
        .database()
        .await?
        .collection::<UsedKeyDoc>(&used_keys_collection(&s.pool))
        .find(doc! { "_id": { "$in": &handed } })
        .await?
        .try_collect::<Vec<_>>()
        .await?;
    let batch_of: HashMap<String, String> = used
        .into_iter()
        .filter_map(|u| Some((u.key, u.batch?)))
        .collect();
    for (keys, group) in [(&from_a, s.group.as_str()), (&from_b, other_group.as_str())] {
        for k in keys {
            assert_eq!(group_of.get(batch_of[k].as_str()), Some(&group), "{k}");
        }
    }
    a.shutdown().await?;
    b.shutdown().await?;
    assert!(terminate(run).await?.success());
    s.drop_db().await;
    Ok(())
}

/// Commits offset 0 on every partition of `topic` for `group`, retrying
/// until the group is empty (a dead member's session has expired).
async fn reset_offsets_to_zero(topic: &str, partitions: u32, group: &str) -> Result<()> {
    wait_for(&format!("offsets of {group} reset to 0"), WAIT, || async {
        // Refused while the dead member's session lasts.
        let done = commit_offsets(topic, partitions as i32, group, CommitAt::Zero)
            .await
            .is_ok();
        Ok(done.then_some(()))
    })
    .await
}

/// A consumer with a fixed instance id crashes with open claims whose keys
/// it partly handed out. Then (1) a new process with the same instance id
/// in a fresh group (which starts at offset 0), and (2) after the offsets
/// of the first group are reset to 0, a new process with the same id in
/// that group, read every batch again: neither resumes the crashed
/// process's claims (they stay its own, open), no key is handed out twice,
/// and both keep handing out new keys.
#[tokio::test(flavor = "multi_thread")]
async fn an_offset_reset_with_a_stable_instance_id_hands_out_no_key_twice() -> Result<()> {
    let (s, run) = Setup::running(2).await?;
    let reg_a = Registry::new();
    let a = s.consumer(&s.group, "stable", &reg_a).build().await?;
    let mut handed = take(&a, 12, WAIT).await?;
    wait_for("a's buffer filled", WAIT, || async {
        Ok((a.buffered() >= 5).then_some(()))
    })
    .await?;
    a.abandon().await;
    let open_before: Vec<ClaimDoc> = s
        .claims()
        .await?
        .into_iter()
        .filter(|c| c.state == ClaimState::Open)
        .collect();
    ensure!(!open_before.is_empty(), "a left no open claim");

    // (1) The same id in a fresh group: offset 0.
    let reg_c = Registry::new();
    let c = s
        .consumer(&unique("g-fresh"), "stable", &reg_c)
        .build()
        .await?;
    let mut from_c = take_until(&c, "a's batches read again by c", WAIT, |_| {
        replays(&reg_c) >= open_before.len() as f64
    })
    .await?;
    // The producer tops up the backlog of the first group, not of c's: c
    // gets only the batches published for the first group and not claimed
    // yet (two per partition), part of which it may have taken above. A few
    // new keys are always there.
    if from_c.len() < 5 {
        from_c.extend(take(&c, 5 - from_c.len(), WAIT).await?);
    }
    handed.extend(from_c);
    c.shutdown().await?;

    // (2) The first group's offsets back to 0, the same id joins it again.
    let doc = s.pool_doc().await?;
    reset_offsets_to_zero(&doc.topic, doc.partitions, &s.group).await?;
    let reg_d = Registry::new();
    let d = s.consumer(&s.group, "stable", &reg_d).build().await?;
    handed.extend(
        take_until(&d, "a's batches read again by d", WAIT, |_| {
            replays(&reg_d) >= open_before.len() as f64
        })
        .await?,
    );
    handed.extend(take(&d, 20, WAIT).await?);

    for before in &open_before {
        let now = s
            .claims()
            .await?
            .into_iter()
            .find(|c| c.batch_id == before.batch_id)
            .context("claim")?;
        assert_eq!(
            (now.state, &now.token),
            (ClaimState::Open, &before.token),
            "claim {} of the crashed process was taken over",
            before.batch_id
        );
    }
    assert_eq!(bad(&reg_c, "unverified") + bad(&reg_d, "unverified"), 0.0);
    check_provenance(&s, &handed).await?;
    d.shutdown().await?;
    assert!(terminate(run).await?.success());
    s.drop_db().await;
    Ok(())
}

/// A database dropped and re-initialised (same database and pool name)
/// while the old topic is kept: the new pool gets a new incarnation and a
/// new topic, a batch of the old incarnation copied onto the new topic is
/// refused, and the new pool hands out only its own batches' keys.
#[tokio::test(flavor = "multi_thread")]
async fn a_reinitialised_pool_never_hands_out_the_old_incarnations_batches() -> Result<()> {
    let s = Setup::new(2);
    s.init().await?;
    let old = s.pool_doc().await?;
    let run = s.run(None)?;
    let reg = Registry::new();
    let c = s.consumer(&s.group, "a", &reg).build().await?;
    take(&c, 15, WAIT).await?;
    c.shutdown().await?;
    assert!(terminate(run).await?.success());
    let old_batches = kgs_tests::read_topic_batches(&kafka_brokers(), &old.topic, 2, WAIT).await?;
    let (partition, _, old_batch) = old_batches.first().cloned().context("old batches")?;

    s.drop_db().await;
    s.init().await?;
    let new = s.pool_doc().await?;
    assert_ne!(new.incarnation, old.incarnation);
    assert_ne!(new.topic, old.topic, "a new incarnation gets a fresh topic");
    Forger::new()?
        .batch(&new.topic, partition, &old_batch)
        .await?;
    let run = s.run(None)?;
    // The same group name as before: only the topic changed.
    let reg = Registry::new();
    let c = s.consumer(&s.group, "a", &reg).build().await?;
    let mut handed = take_until(&c, "the old batch refused", WAIT, |_| {
        bad(&reg, "unverified") >= 1.0
    })
    .await?;
    handed.extend(take(&c, 30, WAIT).await?);
    assert_eq!(bad(&reg, "unverified"), 1.0);
    never_claimed(&s, &[&old_batch.batch_id]).await?;
    check_provenance(&s, &handed).await?;
    c.shutdown().await?;
    assert!(terminate(run).await?.success());
    s.drop_db().await;
    Ok(())
}

/// A `returning` claim that matches no batch record of the pool (what a
/// forged batch claimed by an unverifying consumer would leave, or a
/// hand-written one), giving back keys that were already handed out, does
/// not stop the producer: it is set aside (`rejected`, with a reason,
/// counted in `kgs_producer_claims_rejected_total`), none of its keys goes
/// round again, and the pool keeps handing out keys.
#[tokio::test(flavor = "multi_thread")]
async fn a_returning_claim_of_no_batch_is_set_aside_and_the_pool_keeps_flowing() -> Result<()> {
    let s = Setup::new(2);
    s.init().await?;
    let http = free_addr()?;
    let run = s.run_serving(None, Some(&http))?;
    let reg = Registry::new();
    let c = s.consumer(&s.group, "a", &reg).build().await?;
    let mut handed = take(&c, 15, WAIT).await?;
    let ghost = unique("forged");
    s.database()
        .await?
        .collection::<ClaimDoc>(CLAIMS)
        .insert_one(ClaimDoc {
            batch_id: ghost.clone(),
            pool: s.pool.clone(),
            group: s.group.clone(),
            instance: "ghost".into(),
            token: "ghost".into(),
            partition: 0,
            offset: 0,
            keys: 5,
            state: ClaimState::Returning,
            return_keys: handed[..5].to_vec(),
            reason: None,
            claimed_at: chrono::Utc::now(),
        })
        .await?;
    let claim = wait_for("the ghost claim set aside", WAIT, || async {
        Ok(s.claims()
            .await?
            .into_iter()
            .find(|c| c.batch_id == ghost && c.state == ClaimState::Rejected))
    })
    .await?;
    assert!(
        claim.reason.as_deref().is_some_and(|r| !r.is_empty()),
        "no reason: {claim:?}"
    );
    handed.extend(take(&c, 40, WAIT).await?);
    // `kgs_producer_claims_rejected_total{pool="…"} N`.
    let (_, metrics) = http_get(&http, "/metrics").await?;
    let rejected = first_value(&metrics, "kgs_producer_claims_rejected_total")
        .context("kgs_producer_claims_rejected_total on /metrics")?;
    assert_eq!(rejected, 1.0);
    check_provenance(&s, &handed).await?;
    c.shutdown().await?;
    assert!(terminate(run).await?.success());
    s.drop_db().await;
    Ok(())
}
