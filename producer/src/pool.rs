//! Pool administration: `init` (pool document, collections, indexes, topic)
//! and `reserve` (taking keys out of circulation).
//!
//! `init` checks everything before changing anything: a pool document or a
//! topic with other settings is reported in one line and left alone.
//!
//! Each pool created gets a new random incarnation id, and its topic is
//! `kgs.<pool>.<incarnation>` (see [`kgs_schemas::docs::topic_name`]): always
//! a fresh topic, never one holding another installation's or an earlier
//! incarnation's batches. Topics are created with unlimited retention, so a
//! batch waits for its consumers however long they are away.

use std::time::Duration;

use bson::doc;
use chrono::Utc;
use kgs_schemas::docs::{
    new_incarnation, topic_name, validate_pool_name, PoolDoc, PoolSecret, UsedKeyDoc, UsedReason,
};
use kgs_schemas::format::KeyFormatSpec;
use kgs_schemas::KeyFormat;
use rdkafka::admin::{
    AdminClient, AdminOptions, NewTopic, OwnedResourceSpecifier, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::generate::pool_order;
use crate::store::{is_duplicate, Store};

/// What `init` is asked to create.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// Pool name.
    pub name: String,
    /// Key format.
    pub format: KeyFormat,
    /// Partitions of the pool's topic.
    pub partitions: u32,
}

/// What `init` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitOutcome {
    /// The pool was created.
    Created,
    /// The pool existed with the same settings; nothing changed.
    Unchanged,
}

/// Topic settings kgs needs, set when it creates a pool's topic and checked
/// on an existing one: batches are never deleted by time or size (a
/// published, unclaimed batch deleted by retention would be lost: its keys
/// stay in `used_keys`, never handed out), and never compacted away.
const TOPIC_CONFIG: [(&str, &str); 3] = [
    ("retention.ms", "-1"),
    ("retention.bytes", "-1"),
    ("cleanup.policy", "delete"),
];

/// Creates the pool (idempotent; conflicting settings are refused).
pub async fn init(config: &Config, store: &Store, spec: &PoolSpec) -> Result<InitOutcome> {
    validate_pool_name(&spec.name).map_err(Error::Config)?;
    if spec.partitions == 0 {
        return Err(Error::Config("partitions must be at least 1".to_owned()));
    }
    let wanted = KeyFormatSpec::from(&spec.format);
    // 1. Check the existing pool and its topic before writing anything.
    let existing = match store.pool(&spec.name).await {
        Ok(doc) => Some(doc),
        Err(Error::NoSuchPool(_)) => None,
        Err(e) => return Err(e),
    };
    if let Some(doc) = &existing {
        conflicts(spec, &wanted, doc)?;
        check_topic(config, doc).await?;
    } else {
        // Fail before writing if Kafka is unreachable.
        topic_partition_count(config, &topic_name(&spec.name, "check")).await?;
    }
    // 2. Create what is missing: the pool document first (a crash before
    // the topic exists is finished by the next `init`; `run` refuses to
    // start without the topic).
    let mut outcome = InitOutcome::Unchanged;
    let doc = match existing {
        Some(doc) => doc,
        None => {
            let secret: [u8; 32] = rand::random();
            let incarnation = new_incarnation();
            let doc = PoolDoc {
                name: spec.name.clone(),
                topic: topic_name(&spec.name, &incarnation),
                incarnation,
                format: wanted.clone(),
                space: spec.format.space(),
                secret: PoolSecret(hex::encode(secret)),
                cursor: 0,
                generating: None,
                reserved_ahead: Vec::new(),
                partitions: spec.partitions,
                topic_generation: 0,
                moved_to: Some(0),
                created_at: Utc::now(),
            };
            match store.pools.insert_one(&doc).await {
                Ok(_) => {
                    outcome = InitOutcome::Created;
                    doc
                }
                // A concurrent init won: compare with what it wrote.
                Err(e) if is_duplicate(&e) => {
                    let doc = store.pool(&spec.name).await?;
                    conflicts(spec, &wanted, &doc)?;
                    doc
                }
                Err(e) => return Err(Error::store("create pool")(e)),
            }
        }
    };
    store.ensure_collections(&spec.name).await?;
    if topic_partition_count(config, &doc.topic).await?.is_none() {
        create_topic(config, &doc.topic, spec.partitions).await?;
        outcome = InitOutcome::Created;
    }
    check_topic(config, &doc).await?;
    tracing::info!(pool = %spec.name, incarnation = %doc.incarnation, topic = %doc.topic, ?outcome, space = spec.format.space(), "pool ready");
    Ok(outcome)
}

/// Checks an existing topic of `pool`: its partition count and the
/// settings of [`TOPIC_CONFIG`]. A missing topic is fine (init creates it).
async fn check_topic(config: &Config, pool: &PoolDoc) -> Result<()> {
    let topic = &pool.topic;
    let Some(found) = topic_partition_count(config, topic).await? else {
        return Ok(());
    };
    let conflict = |detail: String| Error::Conflict {
        pool: pool.name.clone(),
        detail,
    };
    if found != pool.partitions {
        return Err(conflict(format!(
            "topic {topic} has {found} partitions, the pool {}",
            pool.partitions
        )));
    }
    for (name, wanted) in TOPIC_CONFIG {
        let value = topic_config(config, topic, name).await?;
        if value.as_deref() != Some(wanted) {
            return Err(conflict(format!(
                "topic {topic} has {name}={}, kgs needs {wanted} (set it with kafka-configs.sh --alter --entity-type topics --entity-name {topic} --add-config {name}={wanted})",
                value.as_deref().unwrap_or("<unset>")
            )));
        }
    }
    Ok(())
}

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

fn conflicts(spec: &PoolSpec, wanted: &KeyFormatSpec, doc: &PoolDoc) -> Result<()> {
    let mut diffs = Vec::new();
    if doc.format.length != wanted.length {
        diffs.push(format!(
            "length {} (asked {})",
            doc.format.length, wanted.length
        ));
    }
    if doc.format.alphabet != wanted.alphabet {
        diffs.push(format!(
            "alphabet {:?} (asked {:?})",
            doc.format.alphabet, wanted.alphabet
        ));
    }
    if doc.partitions != spec.partitions {
        diffs.push(format!(
            "{} partitions (asked {})",
            doc.partitions, spec.partitions
        ));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(Error::Conflict {
            pool: spec.name.clone(),
            detail: format!("it has {}", diffs.join(", ")),
        })
    }
}

/// The partition count of `topic`, or `None` if it does not exist.
pub async fn topic_partition_count(config: &Config, topic: &str) -> Result<Option<u32>> {
    let consumer: BaseConsumer = config
        .kafka()
        .create()
        .map_err(Error::kafka("create metadata client"))?;
    let topic = topic.to_owned();
    let brokers = config.kafka_brokers.clone();
    let deadline = config.connect_timeout;
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        loop {
            match consumer.fetch_metadata(Some(&topic), Duration::from_secs(5)) {
                Ok(md) => {
                    let t = md.topics().iter().find(|t| t.name() == topic);
                    return Ok(match t {
                        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                            Some(t.partitions().len() as u32)
                        }
                        _ => None,
                    });
                }
                Err(e) if started.elapsed() < deadline => {
                    tracing::info!(cause = %e, "Kafka not ready");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => {
                    return Err(Error::Unreachable {
                        server: "Kafka",
                        address: brokers,
                        detail: e.to_string(),
                    })
                }
            }
        }
    })
    .await
    .expect("metadata task does not panic")
}

async fn create_topic(config: &Config, topic: &str, partitions: u32) -> Result<()> {
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
                tracing::error!(topic = %t, "topic creation failed");
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

/// What happened to one key given to `reserve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// Taken out of `keys` (or out of the future generation) and recorded.
    Reserved,
    /// It was already reserved.
    AlreadyReserved,
    /// It was already handed out in a batch; it cannot be reserved any more.
    AlreadyUsed {
        /// The batch that took it.
        batch: Option<String>,
    },
}

/// Reserves `key` in `pool`: it is recorded in `used_keys` with reason
/// `reserved` and never handed out.
///
/// A key not yet generated is first added to the pool's `reserved_ahead`
/// (only while no generation range is pending and the cursor is below it),
/// then recorded in `used_keys`; generation skips it. A generated key is
/// recorded in `used_keys` (which wins over a concurrent batch move, see
/// `mover.rs`) and deleted from `keys`. Re-running finishes a crashed run.
pub async fn reserve(store: &Store, pool: &str, key: &str) -> Result<ReserveOutcome> {
    let doc = store.pool(pool).await?;
    let (format, perm) = pool_order(&doc)?;
    let n = perm.invert(format.index_of(key)?);
    let pk = store.pool_keys(pool);
    if n >= doc.cursor {
        // Not generated yet (unless a range is pending: then wait for it).
        for attempt in 0..50 {
            let r = store
                .pools
                .update_one(
                    doc! { "_id": pool, "generating": null, "cursor": { "$lte": n as i64 } },
                    doc! { "$addToSet": { "reserved_ahead": n as i64 } },
                )
                .await
                .map_err(Error::store("reserve ahead"))?;
            if r.matched_count == 1 {
                break;
            }
            let now = store.pool(pool).await?;
            if now.cursor > n {
                break; // generated meanwhile: handled below as a generated key
            }
            if attempt == 49 {
                return Err(Error::Config(format!(
                    "pool {pool:?} is generating; retry reserve later"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let used = UsedKeyDoc {
        key: key.to_owned(),
        n,
        reason: UsedReason::Reserved,
        batch: None,
        at: Utc::now(),
    };
    match pk.used.insert_one(&used).await {
        Ok(_) => {}
        Err(e) if is_duplicate(&e) => {
            let existing = pk
                .used
                .find_one(doc! { "_id": key })
                .await
                .map_err(Error::store("read used key"))?;
            match existing {
                Some(u) if u.reason == UsedReason::Reserved => {
                    // Finish a crashed reserve: it must not stay in keys.
                    delete_key(store, pool, key).await?;
                    return Ok(ReserveOutcome::AlreadyReserved);
                }
                Some(u) => return Ok(ReserveOutcome::AlreadyUsed { batch: u.batch }),
                None => return Err(Error::Corrupt(format!("used key {key:?} vanished"))),
            }
        }
        Err(e) => return Err(Error::store("insert reserved key")(e)),
    }
    delete_key(store, pool, key).await?;
    tracing::info!(pool, key, n, "key reserved");
    Ok(ReserveOutcome::Reserved)
}

async fn delete_key(store: &Store, pool: &str, key: &str) -> Result<()> {
    store
        .pool_keys(pool)
        .keys
        .delete_one(doc! { "_id": key })
        .await
        .map_err(Error::store("delete reserved key from keys"))?;
    Ok(())
}
