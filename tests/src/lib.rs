//! Helpers shared by the integration tests: server addresses from the
//! environment, unique names per test, Kafka admin and client builders, and
//! bounded waits.
//!
//! Every test gets its own topic, group and database (random suffix), so tests
//! never share state and can run in parallel against the same servers.

use std::future::Future;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;

/// Kafka bootstrap servers: `KGS_KAFKA_BROKERS`, default the local test broker.
pub fn kafka_brokers() -> String {
    std::env::var("KGS_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// MongoDB connection string: `KGS_MONGODB_URI`, default the local test server.
pub fn mongodb_uri() -> String {
    std::env::var("KGS_MONGODB_URI")
        .unwrap_or_else(|_| "mongodb://127.0.0.1:27017/?directConnection=true".to_owned())
}

/// A name unique to this test run: `prefix-<8 random hex digits>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// A client config pointing at the test broker.
pub fn kafka_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", kafka_brokers());
    config
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

/// A MongoDB client for the test server, with a short server-selection timeout
/// so an absent server fails the test quickly and clearly.
pub async fn mongo_client() -> Result<mongodb::Client> {
    let mut opts = mongodb::options::ClientOptions::parse(mongodb_uri())
        .await
        .context("parsing KGS_MONGODB_URI")?;
    opts.server_selection_timeout = Some(Duration::from_secs(10));
    mongodb::Client::with_options(opts).context("creating MongoDB client")
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after
/// `timeout` with a message naming `what` was waited for.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Path of a binary or example built from this workspace (`kgs-producer`,
/// `examples/app-server`), next to the test executable's target folder.
/// `make test` builds them before running the tests.
pub fn workspace_binary(name: &str) -> Result<std::path::PathBuf> {
    // The test binary lives in target/<profile>/deps/.
    let exe = std::env::current_exe().context("locating the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test executable has no target/<profile> folder")?;
    for candidate in [
        profile_dir.join(name),
        profile_dir.join("examples").join(name),
    ] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} not found in {}: build it first (make test does: cargo build --workspace --bins --examples)",
        profile_dir.display()
    )
}

/// A free loopback `host:port`: bound, then released for a child process.
pub fn free_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    Ok(l.local_addr()?.to_string())
}

/// One HTTP/1.0 request to a kgs process (no body): `(status, body)`.
/// Bounded by 10 s, so a hung server fails the test with a clear message.
pub async fn http(addr: &str, method: &str, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut response))
        .await
        .with_context(|| format!("{method} {addr}{path} timed out"))??;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("HTTP status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// `GET path`: `(status, body)`.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    http(addr, "GET", path).await
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

/// Every document of collection `coll` in database `db` matching `filter`.
pub async fn find_docs(
    db: &str,
    coll: &str,
    filter: bson::Document,
) -> Result<Vec<bson::Document>> {
    use futures::TryStreamExt;
    let docs = mongo_client()
        .await?
        .database(db)
        .collection::<bson::Document>(coll)
        .find(filter)
        .await
        .with_context(|| format!("find in {db}.{coll}"))?
        .try_collect()
        .await
        .with_context(|| format!("read {db}.{coll}"))?;
    Ok(docs)
}

/// Every `_id` (all strings in kgs's key collections) of `coll` in `db`.
pub async fn string_ids(db: &str, coll: &str) -> Result<Vec<String>> {
    find_docs(db, coll, bson::doc! {})
        .await?
        .iter()
        .map(|d| {
            d.get_str("_id")
                .map(str::to_owned)
                .with_context(|| format!("{db}.{coll}: _id is not a string"))
        })
        .collect()
}
