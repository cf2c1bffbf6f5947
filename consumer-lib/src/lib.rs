//! `kgs-consumer`: the library an app server embeds to get unique keys from
//! a kgs pool out of local memory, with no database or network round trip
//! per key and no lock shared between instances.
//!
//! Every instance joins the pool topic's consumer group, so Kafka's partition
//! assignment gives each one disjoint batches. For each batch the consumer
//! validates it, records a claim in MongoDB, commits the offset, and only
//! then makes the keys available to [`KeyConsumer::next_key`].
//!
//! # Example
//! ```no_run
//! use std::time::Duration;
//! use kgs_consumer::KeyConsumer;
//!
//! # async fn example() -> kgs_consumer::Result<()> {
//! let registry = prometheus::Registry::new();
//! let keys = KeyConsumer::builder()
//!     .brokers("127.0.0.1:9092")
//!     .mongodb_uri("mongodb://127.0.0.1:27017")
//!     .pool("urls")
//!     .watermarks(10_000, 50_000)
//!     .registry(registry.clone())
//!     .build()
//!     .await?;
//!
//! // Hot path: non-blocking, lock-free, allocation-free.
//! match keys.next_key() {
//!     Ok(key) => println!("new short URL id: {key}"),
//!     Err(kgs_consumer::Error::Empty) => {
//!         // Or wait a little for the next batch.
//!         let key = keys.next_key_wait(Duration::from_millis(100)).await?;
//!         println!("after a wait: {key}");
//!     }
//!     Err(e) => return Err(e),
//! }
//!
//! // On SIGTERM: stop hand-out and give the unused keys back.
//! let report = keys.shutdown().await?;
//! println!("returned {} keys", report.keys_returned);
//! # Ok(())
//! # }
//! ```
//!
//! # Shutdown and key return
//! [`KeyConsumer::shutdown`] stops hand-out, then for every batch still in
//! the buffer updates its claim (exact `_id`, only if still `open` and this
//! instance's): to `returning` with `return_keys` = exactly the keys never
//! handed out, or to `drained` if all were. The producer leader puts the
//! returned keys into new batches (they never leave `used_keys.<pool>`: each
//! key's document moves from the old batch to the new one) and marks the
//! claim `returned`. Offsets need no final
//! commit (each was committed before its keys were buffered); the consumer
//! then leaves the group.
//!
//! Dropping the [`KeyConsumer`] without calling `shutdown` starts the same
//! shutdown in the background, which completes only if the Tokio runtime
//! keeps running; if the runtime is dropped too (or the process crashes), the
//! buffered keys are lost (never handed out twice) and their claims stay
//! `open`, showing which batches they were. Call `shutdown().await` before
//! the runtime ends to return keys reliably.
//!
//! # Layout
//! The consumer's part of a key's life, and the file of each step (the
//! producer's part is in the `kgs-producer` crate):
//! - **consume**: `consume.rs`, the loop that reads the pool topic (and
//!   pauses it around the watermarks).
//! - **claim**: `claim.rs`, verify a batch against the producer's record,
//!   claim it, commit its offset; `store.rs` holds the MongoDB side.
//! - **buffer**: [`buffer`], the lock-free key buffer; [`key`]: the inline
//!   [`Key`].
//! - **hand out**: `hand_out.rs`, [`KeyConsumer::next_key`] and
//!   [`KeyConsumer::next_key_wait`], in bulk [`KeyConsumer::next_keys`] and
//!   [`KeyConsumer::next_keys_wait`].
//! - **return**: `returns.rs`, ending claims (`drained`, or `returning`
//!   with the unused keys) and the shutdown that returns what is buffered.
//! - **recycle**: [`recycle`], [`KeyConsumer::recycle`], a request to put a
//!   handed-out key back.
//!
//! Around them: [`KeyConsumer`] (this file), the handle apps use;
//! [`config`]: the builder, defaults and the rdkafka configuration;
//! [`stats`]: [`KeyConsumer::pool_stats`] and [`KeyConsumer::keys_left`];
//! [`metrics`]: metric names and events; [`error`]: the [`Error`] type.
#![deny(missing_docs)]

pub mod buffer;
mod claim;
pub mod config;
mod consume;
pub mod error;
mod hand_out;
pub mod key;
pub mod metrics;
pub mod recycle;
mod returns;
pub mod stats;
mod store;
mod vanity;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kgs_schemas::kafka::MetadataError;
use kgs_schemas::KeyFormat;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use buffer::KeyBuffer;
pub use config::KeyConsumerBuilder;
pub use error::{Error, Result};
pub use hand_out::MAX_KEYS_PER_CALL;
pub use key::Key;
pub use recycle::RecycleOutcome;
pub use returns::ShutdownReport;
pub use stats::{CollStats, PoolStats};
pub use vanity::VanityOutcome;

use consume::{ConsumeLoop, Context, Refused, Shared};
use store::Store;

/// A running consumer of one pool: hands out keys from its local buffer.
///
/// Cheap to share (`Arc<KeyConsumer>`); every method takes `&self`.
#[derive(Debug)]
pub struct KeyConsumer {
    shared: Arc<Shared>,
    /// Sending `true` (or dropping it) stops the consume loop.
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<ShutdownReport>>>,
    pool: String,
    group: String,
    instance: String,
    /// This process's claim token (see [`kgs_schemas::docs::ClaimDoc::token`]).
    token: String,
    /// For recycle requests and pool statistics.
    store: Store,
    /// The pool's key format, to reject bad keys given to `recycle`.
    format: KeyFormat,
    /// The pool's recycle cooldown (ms): how long a recycled key is
    /// quarantined ([`kgs_schemas::docs::PoolDoc::recycle_cooldown_ms`]).
    recycle_cooldown_ms: u64,
    /// Kafka bootstrap servers, for error messages.
    brokers: String,
    /// The MongoDB connection string, password redacted, for error messages.
    mongodb_uri: String,
}

/// How often a call waiting for the producer leader to decide a request
/// (a recycle, a vanity key) looks at it.
const DECISION_POLL: Duration = Duration::from_millis(100);

/// Looks every [`DECISION_POLL`] until `look` finds the request decided
/// (`Some`), for up to `timeout`; `None` if it was not by then.
async fn await_decision<T, F, Fut>(timeout: Duration, mut look: F) -> Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(decided) = look().await? {
            return Ok(Some(decided));
        }
        if tokio::time::Instant::now() + DECISION_POLL > deadline {
            return Ok(None);
        }
        tokio::time::sleep(DECISION_POLL).await;
    }
}

impl KeyConsumer {
    /// A builder with the documented defaults; only the pool is required.
    pub fn builder() -> KeyConsumerBuilder {
        KeyConsumerBuilder::default()
    }

    /// Starts a consumer (see [`KeyConsumerBuilder`]): reads the pool
    /// document, joins the group and spawns the consume loop on the current
    /// Tokio runtime.
    pub(crate) async fn start(config: KeyConsumerBuilder) -> Result<Self> {
        let pool = config.checked_pool()?.to_owned();
        let registry = config.registry.clone().unwrap_or_default();
        let metrics = metrics::Metrics::register(&registry).map_err(Error::Metrics)?;
        let client = mongodb::Client::with_uri_str(&config.mongodb_uri)
            .await
            .map_err(Error::Connect)?;
        // One ping first, so refused credentials or an untrusted certificate
        // are one clear error rather than a failed pool lookup.
        if let Err(e) = client
            .database("admin")
            .run_command(bson::doc! { "ping": 1 })
            .await
        {
            let uri = kgs_schemas::mongo::redact_uri(&config.mongodb_uri);
            return Err(match kgs_schemas::mongo::connect_failure(&e) {
                kgs_schemas::mongo::ConnectFailure::Refused(detail) => {
                    Error::MongoRefused { uri, detail }
                }
                kgs_schemas::mongo::ConnectFailure::Unreachable(detail) => {
                    Error::MongoUnreachable { uri, detail }
                }
            });
        }
        let store = Store::new(&client.database(&config.database));
        let pool_doc = store.pool(&pool).await?;
        let format = KeyFormat::try_from(&pool_doc.format).map_err(|source| Error::PoolFormat {
            pool: pool.clone(),
            source,
        })?;
        let group = config
            .group
            .clone()
            .unwrap_or_else(|| pool_doc.default_group());
        let instance = config.instance.clone().unwrap_or_else(default_instance_id);
        // New at every start: the claims of this process are the ones that
        // carry it (the instance id may be shared or reused).
        let token = uuid::Uuid::new_v4().simple().to_string();
        check_kafka(&config, &group, &instance, &pool_doc.topic).await?;
        let kafka_config = config.kafka_config(&group, &instance)?;
        let recycle_cooldown_ms = pool_doc.recycle_cooldown_ms;
        let consumer: StreamConsumer<Context> = kafka_config
            .create_with_context(Context::new(metrics.clone()))
            .map_err(|source| Error::Subscribe {
                topic: pool_doc.topic.clone(),
                source,
            })?;
        consumer
            .subscribe(&[&pool_doc.topic])
            .map_err(|source| Error::Subscribe {
                topic: pool_doc.topic.clone(),
                source,
            })?;
        let shared = Arc::new(Shared {
            buffer: KeyBuffer::new(config.lanes),
            metrics,
            arrived: tokio::sync::Notify::new(),
            refused: watch::channel(None).0,
        });
        let consume_loop = ConsumeLoop {
            consumer: Arc::new(consumer),
            store: store.clone(),
            shared: Arc::clone(&shared),
            topic: pool_doc.topic,
            pool: pool.clone(),
            group: group.clone(),
            instance: instance.clone(),
            token: token.clone(),
            incarnation: pool_doc.incarnation.clone(),
            format: format.clone(),
            low_watermark: config.low_watermark,
            high_watermark: config.high_watermark,
            adaptive: config.adaptive_watermarks,
            demand: consume::Demand::default(),
            shutdown_timeout: config.shutdown_timeout,
            paused: false,
            reported_handed_out: 0,
            unfinished: Vec::new(),
            next_unfinished_retry: tokio::time::Instant::now(),
            kafka_config,
            topic_generation: pool_doc.topic_generation,
            recreated: None,
            next_topic_check: tokio::time::Instant::now() + consume::TOPIC_CHECK_INTERVAL,
        };
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(consume_loop.run(stop_rx));
        Ok(Self {
            shared,
            stop,
            task: Mutex::new(Some(task)),
            pool,
            group,
            instance,
            token,
            store,
            format,
            recycle_cooldown_ms,
            brokers: config.brokers.clone(),
            mongodb_uri: kgs_schemas::mongo::redact_uri(&config.mongodb_uri),
        })
    }

    /// Whether a server refuses this client what consuming needs (Kafka: no
    /// ACL for the group or topic; MongoDB: a role without the claim writes;
    /// either: credentials that stopped working): the consumer then gets no
    /// batches. [`Error::KafkaRefused`] or [`Error::MongoRefused`] while it
    /// does, `Ok` once it admits it again (the loop keeps retrying on its
    /// own). Also the gauge `kgs_consumer_refused`.
    pub fn refusal(&self) -> Result<()> {
        match self.shared.refused.borrow().as_ref() {
            None => Ok(()),
            Some(Refused::Kafka(detail)) => Err(Error::KafkaRefused {
                brokers: self.brokers.clone(),
                detail: detail.clone(),
            }),
            Some(Refused::MongoDB(detail)) => Err(Error::MongoRefused {
                uri: self.mongodb_uri.clone(),
                detail: detail.clone(),
            }),
        }
    }

    /// Resolves with the error of [`KeyConsumer::refusal`] as soon as a
    /// server refuses this client; an app that cannot work without keys may
    /// stop on it with that one line.
    pub async fn refused(&self) -> Error {
        let mut rx = self.shared.refused.subscribe();
        loop {
            if let Err(e) = self.refusal() {
                return e;
            }
            if rx.changed().await.is_err() {
                // The consumer is gone: wait for ever, like a healthy one.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Keys buffered and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.shared.buffer.depth()
    }

    /// The pool served.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// This instance's id, as recorded in its claims.
    pub fn instance_id(&self) -> &str {
        &self.instance
    }

    /// Stops hand-out, records the unused keys of every buffered batch for
    /// return (see the crate docs), and leaves the group. Waits for the
    /// consume loop to finish; a second call returns an empty report.
    pub async fn shutdown(&self) -> Result<ShutdownReport> {
        let _ = self.stop.send(true);
        let task = self.task.lock().expect("task lock poisoned").take();
        match task {
            Some(task) => task.await.map_err(Error::Task),
            None => Ok(ShutdownReport::default()),
        }
    }

    /// Stops the consumer *without* returning its keys, the way a crash
    /// would: the buffered keys are never handed out and their claims stay
    /// `open`. For tests of crash behaviour, and for apps that must exit now.
    pub async fn abandon(&self) {
        let task = self.task.lock().expect("task lock poisoned").take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        // Nothing more may be handed out from this instance.
        let _ = self.shared.buffer.close();
    }
}

impl Drop for KeyConsumer {
    fn drop(&mut self) {
        // The loop sees the stop and shuts down in the background (see the
        // crate docs on what that can and cannot guarantee).
        let _ = self.stop.send(true);
    }
}

/// `$HOSTNAME-<uuid>`, or a bare UUID.
/// Before joining the group: one metadata request for the pool's topic with
/// the consumer's own settings, so a refused login, an untrusted broker
/// certificate or a missing ACL is one clear error at start rather than a
/// warning the consume loop repeats forever. A topic that does not exist
/// (yet) is only logged: the subscription waits for it.
async fn check_kafka(
    config: &KeyConsumerBuilder,
    group: &str,
    instance: &str,
    topic: &str,
) -> Result<()> {
    let client = config.kafka_config(group, instance)?;
    let name = topic.to_owned();
    let found = tokio::task::spawn_blocking(move || {
        kgs_schemas::kafka::topic_partitions(&client, &name, config::KAFKA_CHECK_TIMEOUT)
    })
    .await
    .map_err(Error::Task)?;
    let brokers = config.brokers.clone();
    match found {
        Ok(Some(_)) => Ok(()),
        Ok(None) => {
            tracing::warn!(topic, "the pool's topic does not exist yet; waiting for it");
            Ok(())
        }
        Err(MetadataError::Refused(detail)) => Err(Error::KafkaRefused { brokers, detail }),
        Err(MetadataError::Unreachable(detail)) => Err(Error::KafkaUnreachable { brokers, detail }),
        Err(MetadataError::Client(detail)) => Err(Error::Config(format!("Kafka client: {detail}"))),
    }
}

fn default_instance_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    match std::env::var("HOSTNAME") {
        Ok(host) if !host.is_empty() => format!("{host}-{id}"),
        _ => id,
    }
}

impl KeyConsumerBuilder {
    /// Connects and starts the consumer. Must be called inside a Tokio
    /// runtime, which then runs the consume loop.
    pub async fn build(self) -> Result<KeyConsumer> {
        KeyConsumer::start(self).await
    }
}
