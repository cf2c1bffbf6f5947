//! The producer's error type: one variant per operation that can fail, so the
//! binary prints one clear line and the run loop can tell a lost lease (step
//! down, stay standby) from a broken server (retry) from a bug (stop).

use kgs_schemas::FormatError;
use rdkafka::error::KafkaError;

/// Everything the producer library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid or contradictory.
    #[error("bad configuration: {0}")]
    Config(String),
    /// A server did not answer within the connect timeout.
    #[error("cannot reach {server} at {address}: {detail}")]
    Unreachable {
        /// `MongoDB` or `Kafka`.
        server: &'static str,
        /// Where it was looked for.
        address: String,
        /// The last error seen.
        detail: String,
    },
    /// A server refused this client: bad credentials, a TLS certificate it
    /// does not trust, or an ACL that does not allow the operation.
    #[error("{server} at {address} refused this client: {detail}")]
    Unauthorized {
        /// `MongoDB` or `Kafka`.
        server: &'static str,
        /// Where it was.
        address: String,
        /// What it said.
        detail: String,
    },
    /// `init` found the pool (or its topic) with other settings.
    #[error("pool {pool:?} already exists with other settings ({detail}); nothing was changed")]
    Conflict {
        /// The pool.
        pool: String,
        /// What differs.
        detail: String,
    },
    /// The pool document does not exist.
    #[error("pool {0:?} does not exist: create it with `kgs-producer init`")]
    NoSuchPool(String),
    /// A key given on the command line is not a key of the pool.
    #[error("bad key: {0}")]
    BadKey(#[from] FormatError),
    /// A MongoDB operation failed.
    // The cause is the error's source: `{:#}` (the binary) and
    // [`chain`] (the logs) print it after the message, once.
    #[error("MongoDB {op} failed")]
    Store {
        /// What was being done.
        op: &'static str,
        /// The driver error.
        source: mongodb::error::Error,
    },
    /// A MongoDB write command answered with write errors or a write
    /// concern error (the command itself went through).
    #[error("MongoDB {op} failed: {detail}")]
    StoreWrite {
        /// What was being done.
        op: &'static str,
        /// The server's errors.
        detail: String,
    },
    /// A Kafka operation failed.
    #[error("Kafka {op} failed")]
    Kafka {
        /// What was being done.
        op: &'static str,
        /// The client error.
        source: KafkaError,
    },
    /// An operation did not finish in time (a slow or stalled server).
    #[error("{op} did not finish within {after:?}")]
    Timeout {
        /// What was being done.
        op: &'static str,
        /// How long it was given.
        after: std::time::Duration,
    },
    /// The lease is not (or no longer certainly) held: a newer producer took
    /// it, or its renewal did not come back in time (slow or unreachable
    /// database). Either way this process must stop writing.
    #[error("lease of pool {0:?} not held: taken by another producer, or not renewed in time (slow or unreachable database)")]
    LeaseLost(String),
    /// Kafka fenced this producer's transactional id (a newer producer with
    /// the same `transactional.id` started).
    #[error("fenced by a newer producer: {0}")]
    Fenced(String),
    /// The pool's topic is gone or has another partition count than the pool.
    #[error("topic {topic} {detail}")]
    Topic {
        /// The topic.
        topic: String,
        /// What is wrong and what to do.
        detail: String,
    },
    /// Some keys given to `recycle` were refused (each is reported on its own line).
    #[error("{0}")]
    Refused(String),
    /// A stored document contradicts the protocol (e.g. a returned key that
    /// was not in its batch); an operator must look.
    #[error("inconsistent data: {0}")]
    Corrupt(String),
}

impl Error {
    /// Every value [`Error::kind`] returns, so the `errors_total{kind}`
    /// series exist (at 0) before the first error and dashboards show them.
    pub const KINDS: [&'static str; 14] = [
        "config",
        "unreachable",
        "unauthorized",
        "conflict",
        "no_such_pool",
        "bad_key",
        "mongodb",
        "kafka",
        "timeout",
        "lease_lost",
        "fenced",
        "topic",
        "corrupt",
        "refused",
    ];

    /// A short, fixed label for the `errors_total{kind}` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Unreachable { .. } => "unreachable",
            Self::Unauthorized { .. } => "unauthorized",
            Self::Conflict { .. } => "conflict",
            Self::NoSuchPool(_) => "no_such_pool",
            Self::BadKey(_) => "bad_key",
            Self::Store { .. } | Self::StoreWrite { .. } => "mongodb",
            Self::Kafka { .. } => "kafka",
            Self::Timeout { .. } => "timeout",
            Self::LeaseLost(_) => "lease_lost",
            Self::Fenced(_) => "fenced",
            Self::Topic { .. } => "topic",
            Self::Corrupt(_) => "corrupt",
            Self::Refused(_) => "refused",
        }
    }

    /// A `map_err` adapter for MongoDB calls.
    pub fn store(op: &'static str) -> impl FnOnce(mongodb::error::Error) -> Self {
        move |source| Self::Store { op, source }
    }

    /// The pool's topic does not exist: the same error at start and while
    /// running.
    pub fn topic_missing(topic: &str) -> Self {
        Self::Topic {
            topic: topic.to_owned(),
            detail: "does not exist (deleted?); recreate it with `kgs-producer init` and the pool's settings".into(),
        }
    }

    /// A `map_err` adapter for Kafka calls.
    pub fn kafka(op: &'static str) -> impl FnOnce(KafkaError) -> Self {
        move |source| Self::Kafka { op, source }
    }
}

/// `err` with its causes, `a: b: c`, for log fields.
pub use kgs_schemas::error_chain as chain;

/// The producer's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
