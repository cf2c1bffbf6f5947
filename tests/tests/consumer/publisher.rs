//! The test pool: its own database, topic and key sequence, and a minimal
//! publisher that writes batches as the producer does (record, `used_keys`,
//! then the message), so the consumer verifies and hands them out.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use bson::doc;
use chrono::Utc;
use futures::TryStreamExt;
use kgs_consumer::{KeyConsumer, KeyConsumerBuilder};
use kgs_schemas::docs::{
    used_keys_collection, BatchRecord, BatchState, ClaimDoc, PoolDoc, UsedKeyDoc, UsedReason,
    BATCHES, CLAIMS, POOLS,
};
use kgs_schemas::format::KeyFormatSpec;
use kgs_schemas::{KeyBatch, KeyFormat};
use kgs_tests::{
    create_topic, kafka_brokers, kafka_config, mongo_client, mongodb_uri, registry_value, unique,
    wait_for,
};
use prometheus::Registry;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

/// Bound of every wait for keys, claims or processes.
pub const WAIT: Duration = Duration::from_secs(60);
const KEY_LEN: u32 = 6;

/// A test pool: its own database, topic and key sequence, and a publisher.
pub struct Pool {
    pub db_name: String,
    pub db: mongodb::Database,
    pub name: String,
    /// The pool incarnation every batch record carries.
    pub incarnation: String,
    pub topic: String,
    pub format: KeyFormat,
    pub producer: FutureProducer,
    pub next_index: Mutex<u64>,
}

impl Pool {
    /// Creates the pool document and a topic of `partitions` partitions.
    pub async fn create(partitions: i32) -> Result<Self> {
        Self::create_named(partitions, unique("kgs-consumer"), unique("p")).await
    }

    /// Like [`Pool::create`], with given database and pool names.
    pub async fn create_named(partitions: i32, db_name: String, name: String) -> Result<Self> {
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
    pub fn fresh_keys(&self, n: usize) -> Vec<String> {
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
    pub async fn publish(&self, n: usize, partition: i32) -> Result<KeyBatch> {
        let batch = KeyBatch::new(unique("b"), self.name.clone(), 1, self.fresh_keys(n));
        self.record_batch(&batch, partition).await?;
        self.record_used(&batch).await?;
        self.send(&batch.encode(), partition).await?;
        Ok(batch)
    }

    /// Inserts the producer's record of `batch` (state `published`, this
    /// pool incarnation, `partition`, the digest of its keys): what the
    /// consumer verifies a message against before claiming it.
    pub async fn record_batch(&self, batch: &KeyBatch, partition: i32) -> Result<()> {
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
    pub async fn record_used(&self, batch: &KeyBatch) -> Result<()> {
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
    pub async fn send(&self, payload: &[u8], partition: i32) -> Result<()> {
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
    pub fn consumer(&self, group: &str, registry: &Registry) -> KeyConsumerBuilder {
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

    pub async fn claims(&self) -> Result<Vec<ClaimDoc>> {
        Ok(self
            .db
            .collection::<ClaimDoc>(CLAIMS)
            .find(doc! {})
            .await?
            .try_collect()
            .await?)
    }

    pub async fn claim(&self, batch: &str) -> Result<Option<ClaimDoc>> {
        Ok(self
            .db
            .collection::<ClaimDoc>(CLAIMS)
            .find_one(doc! { "_id": batch })
            .await?)
    }

    pub async fn drop_db(&self) {
        let _ = self.db.drop().await;
    }
}

/// Waits until `c` has buffered at least `n` keys.
pub async fn buffered_at_least(c: &KeyConsumer, n: usize) -> Result<()> {
    wait_for(&format!("{n} keys buffered"), WAIT, || async move {
        Ok((c.buffered() >= n).then_some(()))
    })
    .await
}

/// Waits until the consumer behind `registry` has been assigned partitions.
pub async fn assigned(registry: &Registry) -> Result<()> {
    wait_for("a partition assignment", WAIT, || async move {
        Ok((registry_value(
            registry,
            kgs_consumer::metrics::REBALANCES_TOTAL,
            Some(("event", "assign")),
        ) >= 1.0)
            .then_some(()))
    })
    .await
}
