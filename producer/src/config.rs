//! The producer's configuration: one serde struct read from a TOML file, with
//! every field overridable by a flag or a `KGS_*` environment variable (see
//! `cli.rs`), and the one place that turns it into client configs.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use kgs_schemas::docs::PoolDoc;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// librdkafka's default `message.max.bytes`.
const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// Settings of every `kgs-producer` command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kafka bootstrap servers.
    pub kafka_brokers: String,
    /// MongoDB connection string.
    pub mongodb_uri: String,
    /// Database holding every pool.
    pub mongodb_db: String,
    /// Consumer group whose committed offsets define the backlog
    /// (default `kgs.<pool>.<incarnation>`, the consumer library's default).
    pub group: Option<String>,
    /// Keys per batch (one Kafka message) while demand is low, and the
    /// smallest batch (see [`crate::sizer`]).
    pub batch_size: usize,
    /// The largest batch the size grows to while consumers drain fast
    /// (default 10 × `batch_size`, at most 10,000 and what fits the message
    /// limit; equal to `batch_size`: a fixed size).
    pub max_batch_size: Option<usize>,
    /// A partition whose backlog is at or below this many batches is refilled...
    pub low_watermark: u64,
    /// ...up to this many batches; never more.
    pub high_watermark: u64,
    /// Keys kept in `keys.<pool>` (default min(space, 1,000,000)).
    pub target_size: Option<u64>,
    /// Keys generated per crash-safe generation step.
    pub generate_chunk: u64,
    /// How long a lease lasts without renewal; renewed every third of it.
    #[serde(with = "kgs_schemas::duration")]
    pub lease_duration: Duration,
    /// How often the leader re-checks backlog and returns when idle.
    #[serde(with = "kgs_schemas::duration")]
    pub poll_interval: Duration,
    /// How often the leader looks for unfinished batches of older epochs
    /// and for keys below the batch window (late writes of a stale leader).
    #[serde(with = "kgs_schemas::duration")]
    pub recovery_interval: Duration,
    /// How long a graceful shutdown may take before it is forced.
    #[serde(with = "kgs_schemas::duration")]
    pub shutdown_timeout: Duration,
    /// How long to keep retrying servers at start before giving up.
    #[serde(with = "kgs_schemas::duration")]
    pub connect_timeout: Duration,
    /// Address of the HTTP server (`/metrics`, `/healthz`, `/readyz`); none if absent.
    pub http_addr: Option<SocketAddr>,
    /// This instance's id in the lease (default `<host>-<pid>-<random>`).
    pub instance_id: Option<String>,
    /// Extra librdkafka settings for every Kafka client, e.g. TLS and SASL:
    /// `security.protocol`, `ssl.ca.location`, `sasl.mechanism`,
    /// `sasl.username`, `sasl.password`. Settings kgs's guarantees depend on
    /// are refused (see [`PROTECTED_KAFKA_SETTINGS`]).
    pub kafka_options: KafkaOptions,
}

/// librdkafka settings that `kafka_options` may not override: transactions,
/// idempotence and read_committed reads are what make publishing exactly once.
pub const PROTECTED_KAFKA_SETTINGS: [&str; 9] = [
    "bootstrap.servers",
    "transactional.id",
    "enable.idempotence",
    "acks",
    "isolation.level",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "enable.partition.eof",
];

/// Extra librdkafka settings. `Debug` shows the names only: values may be
/// secrets (`sasl.password`, `ssl.key.password`).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KafkaOptions(pub BTreeMap<String, String>);

impl fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl KafkaOptions {
    /// Parses `name=value` pairs (flags, `KGS_KAFKA_OPTIONS` split on `,`).
    pub fn parse_pair(pair: &str) -> std::result::Result<(String, String), String> {
        kgs_schemas::process::parse_name_value(pair)
    }
}

/// The local test broker, as started by `scripts/servers.sh`.
fn default_kafka_brokers() -> String {
    "127.0.0.1:9092".to_owned()
}

/// The local test server; `directConnection` because it is a single node.
fn default_mongodb_uri() -> String {
    "mongodb://127.0.0.1:27017/?directConnection=true".to_owned()
}

/// 1,000 keys of up to 12 characters is ~16 KB per message, well below
/// Kafka's 1 MiB default, and one database round trip moves a useful amount.
fn default_batch_size() -> usize {
    1_000
}

impl Default for Config {
    fn default() -> Self {
        Self {
            kafka_brokers: default_kafka_brokers(),
            mongodb_uri: default_mongodb_uri(),
            mongodb_db: "kgs".to_owned(),
            group: None,
            batch_size: default_batch_size(),
            max_batch_size: None,
            // Two batches left per partition is the refill signal; ten is
            // enough buffer for a burst while the next batch is moved.
            low_watermark: 2,
            high_watermark: 10,
            target_size: None,
            // 10,000 documents per insert_many: a few hundred KB per request.
            generate_chunk: 10_000,
            // A standby takes over 10 s after a crash at worst.
            lease_duration: Duration::from_secs(10),
            poll_interval: Duration::from_millis(500),
            recovery_interval: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(30),
            http_addr: None,
            instance_id: None,
            kafka_options: KafkaOptions::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file; unknown keys are errors.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))?;
        // toml's Display draws the offending line with a caret over several
        // lines; a config error must be one line, so keep the message and
        // the line number.
        toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| format!(" line {}", text[..s.start].matches('\n').count() + 1))
                .unwrap_or_default();
            let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
            Error::Config(format!("{}{line}: {message}", path.display()))
        })
    }

    /// Rejects contradictory settings.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.batch_size == 0 || self.batch_size > kgs_schemas::batch::MAX_BATCH_KEYS {
            return bad(format!(
                "batch_size must be 1..={}, got {}",
                kgs_schemas::batch::MAX_BATCH_KEYS,
                self.batch_size
            ));
        }
        if self.high_watermark == 0 || self.low_watermark > self.high_watermark {
            return bad(format!(
                "need 0 <= low_watermark ({}) <= high_watermark ({}) and high_watermark >= 1",
                self.low_watermark, self.high_watermark
            ));
        }
        if let Some(max) = self.max_batch_size {
            if max < self.batch_size || max > kgs_schemas::batch::MAX_BATCH_KEYS {
                return bad(format!(
                    "max_batch_size must be batch_size ({})..={}, got {max}",
                    self.batch_size,
                    kgs_schemas::batch::MAX_BATCH_KEYS
                ));
            }
        }
        if self.recovery_interval.is_zero() {
            return bad("recovery_interval must be above zero".to_owned());
        }
        if self.generate_chunk == 0 {
            return bad("generate_chunk must be at least 1".to_owned());
        }
        if self.lease_duration < Duration::from_millis(300) {
            return bad(format!(
                "lease_duration must be at least 300ms, got {:?}",
                self.lease_duration
            ));
        }
        if self.kafka_brokers.trim().is_empty() {
            return bad("kafka_brokers is empty".to_owned());
        }
        if let Some(name) = self
            .kafka_options
            .0
            .keys()
            .find(|k| PROTECTED_KAFKA_SETTINGS.contains(&k.as_str()))
        {
            return bad(format!(
                "kafka option {name} is set by kgs itself (its exactly-once publishing depends on it) and cannot be overridden"
            ));
        }
        Ok(())
    }

    /// Refuses a batch size whose worst-case message for `format` (every
    /// key at its longest, JSON escapes included) would exceed what the
    /// producer may send (`message.max.bytes`, librdkafka's default
    /// 1,000,000 unless set in `kafka_options`) or consumers accept
    /// ([`kgs_schemas::batch::MAX_MESSAGE_BYTES`]): every send of such a
    /// batch would fail, and its record would stay `moved` for good.
    pub fn check_batch_fits(&self, format: &kgs_schemas::KeyFormat) -> Result<()> {
        self.check_fits("batch_size", self.batch_size, format)?;
        if let Some(max) = self.max_batch_size {
            self.check_fits("max_batch_size", max, format)?;
        }
        Ok(())
    }

    /// The largest batch for `format` ([`Config::max_batch_size`], or its
    /// default), after [`Config::check_batch_fits`].
    pub fn max_batch_for(&self, format: &kgs_schemas::KeyFormat) -> usize {
        if let Some(max) = self.max_batch_size {
            return max;
        }
        let limit = self.message_limit();
        let wanted = (self.batch_size * 10).min(10_000).max(self.batch_size);
        (self.batch_size..=wanted)
            .rev()
            .find(|n| kgs_schemas::batch::max_encoded_len(format, *n) <= limit)
            .unwrap_or(self.batch_size)
    }

    fn message_limit(&self) -> usize {
        let producer_limit = self
            .kafka_options
            .0
            .get("message.max.bytes")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(LIBRDKAFKA_MESSAGE_MAX_BYTES);
        producer_limit.min(kgs_schemas::batch::MAX_MESSAGE_BYTES)
    }

    fn check_fits(&self, name: &str, size: usize, format: &kgs_schemas::KeyFormat) -> Result<()> {
        let limit = self.message_limit();
        let worst = kgs_schemas::batch::max_encoded_len(format, size);
        if worst > limit {
            return Err(Error::Config(format!(
                "{name} {size} is too large for keys of {} characters of this alphabet: a batch may encode to {worst} bytes, over the {limit}-byte message limit; use at most {} keys per batch",
                format.lengths(),
                (1..=size)
                    .rev()
                    .find(|n| kgs_schemas::batch::max_encoded_len(format, *n) <= limit)
                    .unwrap_or(0)
            )));
        }
        Ok(())
    }

    /// The consumer group of `pool`'s backlog.
    pub fn group_of(&self, pool: &PoolDoc) -> String {
        self.group.clone().unwrap_or_else(|| pool.default_group())
    }

    /// Base Kafka settings shared by every client.
    pub fn kafka(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        // Fail fast enough that a dead broker is reported at start (an
        // explicit `socket.timeout.ms` in kafka_options wins).
        c.set("socket.timeout.ms", "10000");
        for (name, value) in &self.kafka_options.0 {
            c.set(name, value);
        }
        c.set("bootstrap.servers", &self.kafka_brokers);
        c
    }

    /// The transactional producer of `pool`: one `transactional.id` per pool
    /// incarnation, so a new leader's `init_transactions` fences the previous
    /// one, and two installations with the same pool name on one Kafka
    /// cluster (or a re-created pool) never fence each other.
    pub fn kafka_producer(&self, pool: &PoolDoc) -> ClientConfig {
        let mut c = self.kafka();
        c.set(
            "transactional.id",
            format!("kgs-producer.{}.{}", pool.name, pool.incarnation),
        )
        // Both implied by transactions; set explicitly for readers.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // A transaction holds one batch; a minute is far more than needed,
        // and bounds how long an orphan transaction blocks readers.
        .set("transaction.timeout.ms", "60000")
        .set("message.timeout.ms", "30000");
        c
    }

    /// A consumer that only reads offsets, watermarks and (for recovery)
    /// committed messages; it never joins or commits to `group`.
    pub fn kafka_reader(&self, group: &str) -> ClientConfig {
        let mut c = self.kafka();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Recovery must only see batches of committed transactions.
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "true");
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worst case counts JSON escapes: 50,000 keys of 10 base62
    /// characters fit, 50,000 keys of 12 characters of an alphabet with `"`
    /// and `\` do not.
    #[test]
    fn batch_size_is_checked_against_the_message_limit() {
        let mut c = Config {
            batch_size: 50_000,
            ..Config::default()
        };
        let base62 = kgs_schemas::KeyFormat::base62(10).unwrap();
        c.check_batch_fits(&base62).unwrap();
        let escaped = kgs_schemas::KeyFormat::new("\"\\ab", 12).unwrap();
        let err = c.check_batch_fits(&escaped).unwrap_err().to_string();
        assert!(err.contains("message limit"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        // The suggested size fits.
        let n: usize = err
            .rsplit("use at most ")
            .next()
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        c.batch_size = n;
        c.check_batch_fits(&escaped).unwrap();
        c.batch_size = n + 1;
        assert!(c.check_batch_fits(&escaped).is_err());
        // A smaller producer limit is honoured.
        c.batch_size = 50_000;
        c.kafka_options
            .0
            .insert("message.max.bytes".into(), "100000".into());
        assert!(c.check_batch_fits(&base62).is_err());
    }

    #[test]
    fn kafka_options_reach_every_client_but_never_the_protected_settings() {
        let mut c: Config = toml::from_str(
            r#"
            [kafka_options]
            "security.protocol" = "SASL_SSL"
            "sasl.password" = "hunter2"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        let pool = PoolDoc {
            name: "p".into(),
            incarnation: "0123456789abcdef".into(),
            format: kgs_schemas::format::KeyFormatSpec {
                alphabet: "ab".into(),
                length: 1,
                max_length: None,
            },
            space: 2,
            secret: kgs_schemas::docs::PoolSecret("00".into()),
            cursor: 0,
            generating: None,
            reserved_ahead: Vec::new(),
            blocklist: Vec::new(),
            blocked: 0,
            recycle_cooldown_ms: 0,
            blocklist_added: Vec::new(),
            blocklist_swept: 0,
            blocklist_removed: 0,
            blocklist_handed_out: 0,
            topic: kgs_schemas::docs::topic_name("p", "0123456789abcdef"),
            partitions: 1,
            topic_generation: 0,
            moved_to: Some(0),
            created_at: chrono::Utc::now(),
        };
        let producer = c.kafka_producer(&pool);
        assert_eq!(producer.get("security.protocol"), Some("SASL_SSL"));
        // Scoped by the incarnation: another installation's producer of a
        // pool with the same name never fences this one.
        assert_eq!(
            producer.get("transactional.id"),
            Some("kgs-producer.p.0123456789abcdef")
        );
        assert_eq!(c.group_of(&pool), "kgs.p.0123456789abcdef");
        assert_eq!(c.kafka_reader("g").get("sasl.password"), Some("hunter2"));
        // Values may be secrets: Debug shows names only.
        let shown = format!("{c:?}");
        assert!(
            shown.contains("sasl.password") && !shown.contains("hunter2"),
            "{shown}"
        );

        for protected in PROTECTED_KAFKA_SETTINGS {
            c.kafka_options
                .0
                .insert(protected.to_owned(), "x".to_owned());
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(protected), "{err}");
            c.kafka_options.0.remove(protected);
        }
        assert_eq!(
            KafkaOptions::parse_pair("ssl.ca.location=/etc/ca.pem"),
            Ok(("ssl.ca.location".to_owned(), "/etc/ca.pem".to_owned()))
        );
        assert!(KafkaOptions::parse_pair("no-equals").is_err());
    }

    /// A TOML file overrides defaults, and an unknown key is rejected.
    #[test]
    fn toml_with_durations_and_unknown_keys() {
        let c: Config = toml::from_str("batch_size = 7\nlease_duration = \"2s\"").unwrap();
        assert_eq!(c.batch_size, 7);
        assert_eq!(c.lease_duration, Duration::from_secs(2));
        assert_eq!(c.mongodb_db, "kgs");
        assert!(toml::from_str::<Config>("batch_sise = 7").is_err());
    }

    /// Contradictory watermarks are refused with a message naming both.
    #[test]
    fn rejects_inverted_watermarks() {
        let c = Config {
            low_watermark: 5,
            high_watermark: 2,
            ..Config::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("low_watermark"));
        assert!(Config::default().validate().is_ok());
    }
}
