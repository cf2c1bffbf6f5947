//! Kafka: the client config of the test broker, topics, and reading a
//! pool topic's batches as a consumer would.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;

use crate::env::{kafka_brokers, unique};

/// A client config pointing at the test broker.
pub fn kafka_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", kafka_brokers());
    config
}

/// Deletes `topic` on the test broker (the broker finishes in the
/// background: the name may still answer for a moment).
pub async fn delete_topic(topic: &str) -> Result<()> {
    delete_topic_at(&kafka_brokers(), topic).await
}

/// Deletes `topic` on the broker at `brokers`.
pub async fn delete_topic_at(brokers: &str, topic: &str) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating Kafka admin client")?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin
        .delete_topics(&[topic], &opts)
        .await
        .context("delete_topics request")?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("deleting topic {t}: {e}"))?;
    }
    Ok(())
}

/// Creates `topic` with `partitions` partitions (replication factor 1) and
/// waits until the broker reports it.
pub async fn create_topic(topic: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = kafka_config()
        .create()
        .context("creating Kafka admin client")?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin
        .create_topics([&new], &opts)
        .await
        .context("create_topics request")?
    {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => bail!("creating topic {t}: {code}"),
        }
    }
    Ok(())
}

/// Every committed batch of `topic` (read_committed), from the beginning to
/// the end of each of its `partitions`: `(partition, offset, batch)`. Fails
/// after `timeout`, or on a message that is not a key batch.
pub async fn read_topic_batches(
    brokers: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Result<Vec<(i32, i64, kgs_schemas::KeyBatch)>> {
    use std::collections::HashSet;

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};

    let brokers = brokers.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", unique("reader"))
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        let mut open = HashSet::new();
        for p in 0..partitions {
            let (_, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(30))?;
            if high > 0 {
                tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
                open.insert(p);
            }
        }
        let mut out = Vec::new();
        if open.is_empty() {
            return Ok(out);
        }
        consumer.assign(&tpl)?;
        let deadline = std::time::Instant::now() + timeout;
        while !open.is_empty() {
            if std::time::Instant::now() >= deadline {
                bail!("reading {topic} timed out after {timeout:?}");
            }
            match consumer.poll(Duration::from_millis(500)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    open.remove(&p);
                }
                Some(Err(e)) => bail!("reading {topic}: {e}"),
                Some(Ok(m)) => {
                    let batch = serde_json::from_slice(m.payload().unwrap_or_default())
                        .with_context(|| format!("batch at {}/{}", m.partition(), m.offset()))?;
                    out.push((m.partition(), m.offset(), batch));
                }
            }
        }
        Ok(out)
    })
    .await?
}

/// Which offset [`commit_offsets`] commits on each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitAt {
    /// Offset 0: the group reads the whole topic again.
    Zero,
    /// The end: the group has read everything (the producer's backlog is empty).
    End,
}

/// Commits offset `at` on every one of the `partitions` of `topic` for
/// `group`, synchronously. Fails while the group has live members.
pub async fn commit_offsets(topic: &str, partitions: i32, group: &str, at: CommitAt) -> Result<()> {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};

    let (topic, group) = (topic.to_owned(), group.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = kafka_config().set("group.id", &group).create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let offset = match at {
                CommitAt::Zero => 0,
                CommitAt::End => {
                    consumer
                        .fetch_watermarks(&topic, p, Duration::from_secs(10))?
                        .1
                }
            };
            tpl.add_partition_offset(&topic, p, Offset::Offset(offset))?;
        }
        consumer
            .commit(&tpl, CommitMode::Sync)
            .with_context(|| format!("committing offsets of {group} on {topic}"))?;
        anyhow::Ok(())
    })
    .await?
}
