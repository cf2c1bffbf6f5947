//! Kafka access of a leading producer: the transactional producer that
//! publishes batches, the backlog per partition (end offset − the group's
//! committed offset), and the read_committed search for a batch that may
//! already be in the topic; and the topic administration of `init` and
//! `run` (metadata, settings, creation).
//!
//! Each batch is its own transaction: one data record plus one commit marker,
//! so a partition's offsets advance by two per batch and half the offset
//! difference estimates the backlog in batches. An aborted attempt also takes
//! two offsets, so the leader counts exactly instead, from its batch records
//! (see `leader/lead.rs`); the estimate serves `stats`.

use std::sync::Arc;
use std::time::Duration;

use kgs_schemas::docs::{BatchRecord, PoolDoc};
use kgs_schemas::kafka::{topic_partitions, MetadataError};
use kgs_schemas::{keys_digest, KeyBatch};
use rdkafka::admin::{
    AdminClient, AdminOptions, NewTopic, OwnedResourceSpecifier, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::failpoint;

/// Timeout of each blocking Kafka call (metadata, offsets, transactions).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A leader's Kafka clients for one pool.
#[derive(Clone)]
pub struct PoolKafka {
    producer: FutureProducer,
    reader: Arc<BaseConsumer>,
    config: Config,
    topic: String,
    partitions: i32,
}

impl std::fmt::Debug for PoolKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolKafka")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

/// The backlog of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PartitionBacklog {
    /// Partition number.
    pub partition: i32,
    /// Last stable offset (end of committed data).
    pub end: i64,
    /// The group's committed offset, if any.
    pub committed: Option<i64>,
    /// Where the group resumes: its committed offset, else the earliest.
    pub start: i64,
    /// Batches not yet consumed.
    pub batches: u64,
}

impl PoolKafka {
    /// Creates the clients and calls `init_transactions`, which fences any
    /// previous producer of the pool and aborts its open transaction.
    pub async fn start(config: &Config, pool: &PoolDoc) -> Result<Self> {
        let producer: FutureProducer = config
            .kafka_producer(pool)
            .create()
            .map_err(Error::kafka("create producer"))?;
        let reader = Arc::new(
            config
                .kafka_reader(&config.group_of(pool))
                .create::<BaseConsumer>()
                .map_err(Error::kafka("create offset reader"))?,
        );
        let p = producer.clone();
        blocking(move || p.init_transactions(CALL_TIMEOUT))
            .await
            .map_err(txn_error("init transactions", &config.kafka_brokers))?;
        Ok(Self {
            producer,
            reader,
            config: config.clone(),
            topic: pool.topic.clone(),
            partitions: pool.partitions as i32,
        })
    }

    /// The topic's partition count.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// The end (last stable) offset of `partition`.
    pub async fn end_offset(&self, partition: i32) -> Result<i64> {
        let reader = self.reader.clone();
        let topic = self.topic.clone();
        blocking(move || reader.fetch_watermarks(&topic, partition, CALL_TIMEOUT))
            .await
            .map(|(_, high)| high)
            .map_err(Error::kafka("fetch watermarks"))
    }

    /// Checks that the pool's topic still exists with the partition count the
    /// pool was created with. A deleted topic (auto-creation would bring it
    /// back empty, or not at all) or a changed partition count (batches on
    /// new partitions would miss the backlog, and the offsets recorded for
    /// recovery would no longer mean the same) stops publishing with
    /// [`Error::Topic`] until an operator repairs it.
    pub async fn check_topic(&self) -> Result<()> {
        let reader = self.reader.clone();
        let topic = self.topic.clone();
        let metadata = blocking(move || reader.fetch_metadata(Some(&topic), CALL_TIMEOUT))
            .await
            .map_err(Error::kafka("fetch topic metadata"))?;
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len() as i32);
        match found {
            Some(n) if n == self.partitions => Ok(()),
            Some(n) => Err(Error::Topic {
                topic: self.topic.clone(),
                detail: format!(
                    "has {n} partitions, the pool was created with {}; restore the partition count or create a new pool",
                    self.partitions
                ),
            }),
            None => Err(Error::topic_missing(&self.topic)),
        }
    }

    /// The backlog of every partition.
    pub async fn backlog(&self) -> Result<Vec<PartitionBacklog>> {
        backlog(&self.reader, &self.topic, self.partitions).await
    }

    /// Publishes `batch` to `partition` in its own transaction; returns its offset.
    pub async fn publish(&self, partition: i32, batch: &KeyBatch) -> Result<i64> {
        let p = self.producer.clone();
        blocking(move || p.begin_transaction())
            .await
            .map_err(txn_error("begin transaction", &self.config.kafka_brokers))?;
        let payload = batch.encode();
        let record = FutureRecord::to(&self.topic)
            .partition(partition)
            .key(batch.batch_id.as_bytes())
            .payload(&payload);
        let sent = self.producer.send(record, CALL_TIMEOUT).await;
        let offset = match sent {
            Ok(delivery) => delivery.offset,
            Err((err, _)) => {
                self.abort().await;
                return Err(txn_error("send batch", &self.config.kafka_brokers)(err));
            }
        };
        failpoint::hit("publish_after_send");
        let p = self.producer.clone();
        if let Err(err) = blocking(move || p.commit_transaction(CALL_TIMEOUT)).await {
            self.abort().await;
            return Err(txn_error("commit transaction", &self.config.kafka_brokers)(
                err,
            ));
        }
        failpoint::hit("publish_after_commit");
        Ok(offset)
    }

    async fn abort(&self) {
        let p = self.producer.clone();
        if let Err(err) = blocking(move || p.abort_transaction(CALL_TIMEOUT)).await {
            tracing::warn!(cause = %err, "abort transaction failed");
        }
    }

    /// Looks for the batch of `record` in `partition` from offset `from` to
    /// the current end, reading only committed transactions. Returns its
    /// offset if found. A message counts only if it carries the batch's id
    /// as its key *and* its payload is this batch (same id, pool and keys):
    /// the Kafka key alone could be anyone's, and a forged message with it
    /// must not make an unpublished batch count as published.
    pub async fn find_batch(
        &self,
        partition: i32,
        from: i64,
        record: &BatchRecord,
    ) -> Result<Option<i64>> {
        let end = self.end_offset(partition).await?;
        if from >= end {
            return Ok(None);
        }
        // A fresh consumer outside any group: it only reads.
        let consumer: BaseConsumer = self
            .config
            .kafka_reader("kgs-producer.recovery")
            .create()
            .map_err(Error::kafka("create recovery reader"))?;
        let topic = self.topic.clone();
        let id = record.id.clone();
        let pool = record.pool.clone();
        let digest = record.digest.clone();
        let is_the_batch = move |payload: &[u8]| {
            serde_json::from_slice::<KeyBatch>(payload)
                .is_ok_and(|b| b.batch_id == id && b.pool == pool && keys_digest(&b.keys) == digest)
        };
        let id = record.id.clone();
        blocking(move || -> Result<Option<i64>> {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, partition, Offset::Offset(from))
                .map_err(Error::kafka("assign"))?;
            consumer.assign(&tpl).map_err(Error::kafka("assign"))?;
            let deadline = std::time::Instant::now() + CALL_TIMEOUT;
            while std::time::Instant::now() < deadline {
                match consumer.poll(Duration::from_millis(200)) {
                    None => {}
                    Some(Err(KafkaError::PartitionEOF(_))) => return Ok(None),
                    Some(Err(e)) => return Err(Error::kafka("read topic")(e)),
                    Some(Ok(m))
                        if m.key() == Some(id.as_bytes())
                            && m.payload().is_some_and(&is_the_batch) =>
                    {
                        return Ok(Some(m.offset()))
                    }
                    Some(Ok(m)) if m.key() == Some(id.as_bytes()) => {
                        tracing::warn!(batch = %id, partition, offset = m.offset(), "a message with this batch's id but other content is in the topic (not from this producer); ignored");
                    }
                    Some(Ok(_)) => {}
                }
                // Aborted records and transaction markers are skipped without
                // a message (and the EOF event may go to the main queue): the
                // position says when the end has been passed.
                let position = consumer.position().map_err(Error::kafka("read position"))?;
                if let Some(Offset::Offset(o)) =
                    position.find_partition(&topic, partition).map(|e| e.offset())
                {
                    if o >= end {
                        return Ok(None);
                    }
                }
            }
            Err(Error::Timeout {
                op: "reading the partition a batch may be in",
                after: CALL_TIMEOUT,
            })
        })
        .await
    }
}

/// The backlog of every partition of `topic` for the reader's group.
pub async fn backlog(
    reader: &Arc<BaseConsumer>,
    topic: &str,
    partitions: i32,
) -> Result<Vec<PartitionBacklog>> {
    let reader = reader.clone();
    let topic = topic.to_owned();
    blocking(move || {
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        // A group coordinator that is loading or moving (a broker just
        // started, a leader elected) answers with a retriable error for a
        // moment: ask again until the call's deadline.
        let deadline = std::time::Instant::now() + CALL_TIMEOUT;
        let committed = loop {
            match reader.committed_offsets(tpl.clone(), CALL_TIMEOUT) {
                Err(KafkaError::MetadataFetch(code) | KafkaError::OffsetFetch(code))
                    if matches!(
                        code,
                        RDKafkaErrorCode::NotCoordinator
                            | RDKafkaErrorCode::CoordinatorLoadInProgress
                            | RDKafkaErrorCode::CoordinatorNotAvailable
                    ) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                r => break r.map_err(Error::kafka("fetch committed offsets"))?,
            }
        };
        (0..partitions)
            .map(|p| {
                let (low, end) = reader
                    .fetch_watermarks(&topic, p, CALL_TIMEOUT)
                    .map_err(Error::kafka("fetch watermarks"))?;
                let committed =
                    committed
                        .find_partition(&topic, p)
                        .and_then(|e| match e.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        });
                // Without a commit the group starts at the earliest offset.
                let start = committed.unwrap_or(low).max(low);
                Ok(PartitionBacklog {
                    partition: p,
                    end,
                    committed,
                    start,
                    batches: ((end - start).max(0) / 2) as u64,
                })
            })
            .collect()
    })
    .await
}

/// Runs a blocking librdkafka call off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking Kafka call does not panic")
}

/// Classifies a transactional error: a refusal by the broker's authorizer
/// (this principal may not use the transactional id or write the topic) is
/// [`Error::Unauthorized`], which ends the process with one line, since no
/// retry can succeed; fencing (a newer producer with the same
/// `transactional.id`) and fatal errors end this leadership; the rest are
/// retried by the run loop.
fn txn_error(op: &'static str, brokers: &str) -> impl FnOnce(KafkaError) -> Error {
    let brokers = brokers.to_owned();
    move |err| {
        if kgs_schemas::kafka::is_authorization_failure(&err) {
            return Error::Unauthorized {
                server: "Kafka",
                address: brokers,
                detail: format!("{op}: {err}"),
            };
        }
        let fenced = match &err {
            KafkaError::Transaction(e) => {
                e.is_fatal()
                    || e.code() == RDKafkaErrorCode::InvalidProducerEpoch
                    || e.code() == RDKafkaErrorCode::ProducerFenced
            }
            e => matches!(
                e.rdkafka_error_code(),
                Some(
                    RDKafkaErrorCode::ProducerFenced
                        | RDKafkaErrorCode::InvalidProducerEpoch
                        | RDKafkaErrorCode::Fatal
                )
            ),
        };
        if fenced {
            Error::Fenced(format!("{op}: {err}"))
        } else {
            Error::Kafka { op, source: err }
        }
    }
}

/// Topic settings kgs needs, set when it creates a pool's topic and checked
/// on an existing one: batches are never deleted by time or size (a
/// published, unclaimed batch deleted by retention would be lost: its keys
/// stay in `used_keys`, never handed out), and never compacted away.
pub const TOPIC_CONFIG: [(&str, &str); 3] = [
    ("retention.ms", "-1"),
    ("retention.bytes", "-1"),
    ("cleanup.policy", "delete"),
];

/// The value of one setting of `topic`, as the broker reports it.
pub async fn topic_config(config: &Config, topic: &str, name: &str) -> Result<Option<String>> {
    let admin: AdminClient<DefaultClientContext> = config
        .kafka()
        .create()
        .map_err(Error::kafka("create admin client"))?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
        .await
        .map_err(Error::kafka("describe topic config"))?;
    for r in results {
        let resource = r.map_err(|code| Error::Kafka {
            op: "describe topic config",
            source: rdkafka::error::KafkaError::AdminOp(code),
        })?;
        if resource.specifier == OwnedResourceSpecifier::Topic(topic.to_owned()) {
            return Ok(resource.get(name).and_then(|e| e.value.clone()));
        }
    }
    Ok(None)
}

/// The partition count of `topic`, or `None` if it does not exist.
///
/// A refused login or TLS handshake fails at once (retrying cannot help);
/// a broker that does not answer is retried for the connect timeout, and the
/// error then names the last reason librdkafka gave (e.g. a listener that
/// speaks another `security.protocol`).
pub async fn topic_partition_count(config: &Config, topic: &str) -> Result<Option<u32>> {
    let client = config.kafka();
    let topic = topic.to_owned();
    let deadline = config.connect_timeout;
    let brokers = config.kafka_brokers.clone();
    tokio::task::spawn_blocking(move || {
        topic_partitions(&client, &topic, deadline).map_err(|e| match e {
            MetadataError::Refused(detail) => Error::Unauthorized {
                server: "Kafka",
                address: brokers,
                detail,
            },
            MetadataError::Unreachable(detail) => Error::Unreachable {
                server: "Kafka",
                address: brokers,
                detail,
            },
            MetadataError::Client(detail) => Error::Config(format!("Kafka client: {detail}")),
        })
    })
    .await
    .expect("metadata task does not panic")
}

/// Creates `topic` with `partitions` and [`TOPIC_CONFIG`], and waits until
/// the metadata shows it.
pub async fn create_topic(config: &Config, topic: &str, partitions: u32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = config
        .kafka()
        .create()
        .map_err(Error::kafka("create admin client"))?;
    // Replication 1 suits the single-broker setups kgs is tested on; a
    // production cluster pre-creates the topic (init then only checks it).
    let mut new = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(1));
    for (name, value) in TOPIC_CONFIG {
        new = new.set(name, value);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics([&new], &opts)
        .await
        .map_err(Error::kafka("create topic"))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => {
                tracing::debug!(topic = %t, "topic creation failed");
                return Err(Error::Kafka {
                    op: "create topic",
                    source: rdkafka::error::KafkaError::AdminOp(code),
                });
            }
        }
    }
    // Wait until the metadata shows it, so `run` finds every partition.
    for _ in 0..50 {
        if topic_partition_count(config, topic).await? == Some(partitions) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(Error::Config(format!(
        "topic {topic} was created but does not show up in metadata"
    )))
}
