//! [`KeyConsumerBuilder`]: the consumer's settings, their defaults, and the
//! one place that turns them into an rdkafka `ClientConfig`.

use std::time::Duration;

use prometheus::Registry;
use rdkafka::config::ClientConfig;

use crate::error::{Error, Result};

/// Default Kafka bootstrap servers: a local broker.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";
/// Default MongoDB connection string: a local server.
pub const DEFAULT_MONGODB_URI: &str = "mongodb://127.0.0.1:27017";
/// Default database: the one the producer uses by default.
pub const DEFAULT_DATABASE: &str = "kgs";
/// Default low watermark: resume fetching when at most this many keys are
/// buffered. A fifth of the high watermark leaves room for one more batch
/// to arrive before the buffer runs dry at a steady rate.
pub const DEFAULT_LOW_WATERMARK: usize = 10_000;
/// Default high watermark: pause fetching at this many buffered keys. This
/// bounds what a crash can lose (claimed-but-unused keys) to about this plus
/// one batch (at most 50,000 keys, `kgs_schemas::batch::MAX_BATCH_KEYS`).
///
/// Unless the watermarks are set ([`KeyConsumerBuilder::watermarks`]), both
/// follow the hand-out rate: the buffer holds at least
/// [`ADAPTIVE_HIGH_SECONDS`] of it and refetches with
/// [`ADAPTIVE_LOW_SECONDS`] of it left, between these defaults and
/// [`ADAPTIVE_MAX_FACTOR`] times them (a buffer that lasts a fraction of a
/// second at full rate is not a buffer; one that grows without bound would
/// make a crash lose without bound).
pub const DEFAULT_HIGH_WATERMARK: usize = 50_000;
/// See [`DEFAULT_HIGH_WATERMARK`].
pub const ADAPTIVE_HIGH_SECONDS: f64 = 10.0;
/// See [`DEFAULT_HIGH_WATERMARK`].
pub const ADAPTIVE_LOW_SECONDS: f64 = 2.0;
/// See [`DEFAULT_HIGH_WATERMARK`]: at most 500,000 buffered keys by default
/// (about 8 MB), so a crash loses at most that plus one batch.
pub const ADAPTIVE_MAX_FACTOR: usize = 10;
/// How long the start-up check waits for Kafka to answer before
/// [`crate::Error::KafkaUnreachable`] (a refused client fails at once).
pub const KAFKA_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Default time allowed to record returned keys at shutdown before giving
/// up (the claims then stay `open`, as after a crash).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// librdkafka settings the consumer's guarantees depend on; overriding
/// them with [`KeyConsumerBuilder::kafka_option`] is refused.
const FIXED_KAFKA_SETTINGS: [(&str, &str); 5] = [
    // Offsets are committed by hand, only after the claim is recorded.
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    // A batch from an aborted producer transaction must never be seen.
    ("isolation.level", "read_committed"),
    // A new group must start at the oldest batch, not skip the backlog.
    ("auto.offset.reset", "earliest"),
    ("enable.partition.eof", "false"),
];

/// Builds a [`crate::KeyConsumer`]. Every setting has a default except the
/// pool.
#[derive(Debug, Clone)]
pub struct KeyConsumerBuilder {
    pub(crate) brokers: String,
    pub(crate) mongodb_uri: String,
    pub(crate) database: String,
    pub(crate) pool: Option<String>,
    pub(crate) group: Option<String>,
    pub(crate) instance: Option<String>,
    pub(crate) low_watermark: usize,
    pub(crate) high_watermark: usize,
    pub(crate) adaptive_watermarks: bool,
    pub(crate) lanes: usize,
    pub(crate) registry: Option<Registry>,
    pub(crate) kafka_options: Vec<(String, String)>,
    pub(crate) shutdown_timeout: Duration,
}

impl Default for KeyConsumerBuilder {
    fn default() -> Self {
        Self {
            brokers: DEFAULT_BROKERS.to_owned(),
            mongodb_uri: DEFAULT_MONGODB_URI.to_owned(),
            database: DEFAULT_DATABASE.to_owned(),
            pool: None,
            group: None,
            instance: None,
            low_watermark: DEFAULT_LOW_WATERMARK,
            high_watermark: DEFAULT_HIGH_WATERMARK,
            adaptive_watermarks: true,
            lanes: crate::buffer::default_lanes(),
            registry: None,
            kafka_options: Vec::new(),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }
}

impl KeyConsumerBuilder {
    /// Kafka bootstrap servers. Default [`DEFAULT_BROKERS`].
    pub fn brokers(mut self, brokers: impl Into<String>) -> Self {
        self.brokers = brokers.into();
        self
    }

    /// MongoDB connection string. Default [`DEFAULT_MONGODB_URI`].
    pub fn mongodb_uri(mut self, uri: impl Into<String>) -> Self {
        self.mongodb_uri = uri.into();
        self
    }

    /// MongoDB database holding `pools` and `claims`. Default [`DEFAULT_DATABASE`].
    pub fn database(mut self, database: impl Into<String>) -> Self {
        self.database = database.into();
        self
    }

    /// The pool to take keys from. Required.
    pub fn pool(mut self, pool: impl Into<String>) -> Self {
        self.pool = Some(pool.into());
        self
    }

    /// Consumer group id. Default the pool topic's name
    /// (`kgs.<pool>.<incarnation>`), the group whose committed offsets the
    /// producer reads to size its backlog; instances sharing a group share
    /// the pool's partitions, and so get disjoint keys.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// This instance's id, recorded in its claims. Default a random UUID
    /// (prefixed by `$HOSTNAME` when set); it must be unique among live instances.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance = Some(id.into());
        self
    }

    /// Resume fetching when at most `low` keys are buffered, pause at `high`:
    /// fixed (the defaults [`DEFAULT_LOW_WATERMARK`] and
    /// [`DEFAULT_HIGH_WATERMARK`] follow the hand-out rate); `low` must be
    /// below `high`.
    pub fn watermarks(mut self, low: usize, high: usize) -> Self {
        self.low_watermark = low;
        self.high_watermark = high;
        self.adaptive_watermarks = false;
        self
    }

    /// Lanes of the key buffer (see [`crate::KeyBuffer::new`]). Default the
    /// number of CPUs.
    pub fn lanes(mut self, lanes: usize) -> Self {
        self.lanes = lanes;
        self
    }

    /// Registry for the consumer's metrics (see [`crate::metrics`]). Default a
    /// private registry. One consumer per registry: the names carry no
    /// instance label.
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// An extra librdkafka setting (e.g. `session.timeout.ms`, security
    /// settings). Settings the guarantees rely on cannot be changed.
    pub fn kafka_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka_options.push((key.into(), value.into()));
        self
    }

    /// Time allowed at shutdown to record the returned keys. Default
    /// [`DEFAULT_SHUTDOWN_TIMEOUT`].
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// The pool name, checked.
    pub(crate) fn checked_pool(&self) -> Result<&str> {
        let pool = self
            .pool
            .as_deref()
            .ok_or_else(|| Error::Config("no pool given".into()))?;
        kgs_schemas::docs::validate_pool_name(pool).map_err(Error::Config)?;
        if self.low_watermark >= self.high_watermark {
            return Err(Error::Config(format!(
                "low watermark {} must be below high watermark {}",
                self.low_watermark, self.high_watermark
            )));
        }
        Ok(pool)
    }

    /// The consumer's librdkafka configuration; refuses extra options that
    /// contradict the fixed settings.
    pub(crate) fn kafka_config(&self, group: &str, instance: &str) -> Result<ClientConfig> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group)
            .set("client.id", instance);
        for (key, value) in &self.kafka_options {
            if let Some((_, fixed)) = FIXED_KAFKA_SETTINGS.iter().find(|(k, _)| k == key) {
                if value != fixed {
                    return Err(Error::Config(format!(
                        "kafka option {key}={value} contradicts the required {key}={fixed}"
                    )));
                }
            }
            if key == "group.id" || key == "bootstrap.servers" {
                return Err(Error::Config(format!(
                    "set {key} with the builder's own method"
                )));
            }
            config.set(key, value);
        }
        for (key, value) in FIXED_KAFKA_SETTINGS {
            config.set(key, value);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixed settings win and contradicting them is an error.
    #[test]
    fn kafka_config_keeps_the_guarantees() {
        let b = KeyConsumerBuilder::default()
            .pool("p")
            .kafka_option("session.timeout.ms", "6000");
        let c = b.kafka_config("g", "i").unwrap();
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("isolation.level"), Some("read_committed"));
        assert_eq!(c.get("session.timeout.ms"), Some("6000"));
        let bad = b.kafka_option("enable.auto.commit", "true");
        assert!(matches!(bad.kafka_config("g", "i"), Err(Error::Config(_))));
    }

    /// A pool is required, must be a valid name, and low < high.
    #[test]
    fn checks_pool_and_watermarks() {
        assert!(KeyConsumerBuilder::default().checked_pool().is_err());
        assert!(KeyConsumerBuilder::default()
            .pool("Bad.Name")
            .checked_pool()
            .is_err());
        assert!(KeyConsumerBuilder::default()
            .pool("p")
            .watermarks(10, 10)
            .checked_pool()
            .is_err());
        assert_eq!(
            KeyConsumerBuilder::default()
                .pool("p")
                .checked_pool()
                .unwrap(),
            "p"
        );
    }
}
