//! The crate's error type: one variant per operation that can fail, so a
//! caller can branch on what happened. (Bad messages on the topic are not
//! errors of any call: they are skipped, logged and counted; see `metrics`.)

use kgs_schemas::recycle::Refusal;
use kgs_schemas::FormatError;
use rdkafka::error::KafkaError;

/// The result of the crate's operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in `kgs-consumer`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The builder's settings are missing or contradict each other.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The MongoDB client could not be created (bad URI).
    #[error("connecting to MongoDB")]
    Connect(#[source] mongodb::error::Error),
    /// MongoDB refused this client at start: bad credentials, or a server
    /// certificate it does not trust. Not retried.
    #[error("MongoDB at {uri} refused this client: {detail}")]
    MongoRefused {
        /// The connection string, password redacted.
        uri: String,
        /// What the driver said.
        detail: String,
    },
    /// MongoDB did not answer at start (within the driver's server
    /// selection timeout, 30 s unless the URI sets `serverSelectionTimeoutMS`).
    #[error("cannot reach MongoDB at {uri}: {detail}")]
    MongoUnreachable {
        /// The connection string, password redacted.
        uri: String,
        /// What the driver said.
        detail: String,
    },
    /// Reading the pool document failed.
    #[error("reading pool {pool:?}")]
    PoolLookup {
        /// The pool.
        pool: String,
        /// The MongoDB error.
        #[source]
        source: mongodb::error::Error,
    },
    /// The pool does not exist (no document in `pools`): the producer has not created it.
    #[error("pool {0:?} not found in the pools collection")]
    PoolNotFound(String),
    /// The pool document holds an invalid key format.
    #[error("pool {pool:?} has an invalid key format")]
    PoolFormat {
        /// The pool.
        pool: String,
        /// What is wrong with the format.
        #[source]
        source: FormatError,
    },
    /// Creating the Kafka consumer or subscribing to the pool's topic failed.
    #[error("subscribing to topic {topic:?}")]
    Subscribe {
        /// The pool's topic.
        topic: String,
        /// The Kafka error.
        #[source]
        source: KafkaError,
    },
    /// Kafka refused this client at start: bad credentials, a broker
    /// certificate it does not trust, or no ACL allowing it to describe the
    /// pool's topic. Not retried: it stays so until the configuration changes.
    #[error("Kafka at {brokers} refused this client: {detail}")]
    KafkaRefused {
        /// The bootstrap servers.
        brokers: String,
        /// What it said.
        detail: String,
    },
    /// Kafka did not answer within [`crate::config::KAFKA_CHECK_TIMEOUT`] at start.
    #[error("cannot reach Kafka at {brokers}: {detail}")]
    KafkaUnreachable {
        /// The bootstrap servers.
        brokers: String,
        /// The last error seen.
        detail: String,
    },
    /// Registering the metrics in the app's registry failed (e.g. registered twice).
    #[error("registering metrics")]
    Metrics(#[source] prometheus::Error),
    /// Reading a batch's record, to verify the batch before claiming it,
    /// failed (retried: the batch is neither claimed nor skipped meanwhile).
    #[error("reading the batch record of {batch:?}")]
    Verify {
        /// The batch id.
        batch: String,
        /// The MongoDB error.
        #[source]
        source: mongodb::error::Error,
    },
    /// Recording a claim in MongoDB failed.
    #[error("claiming batch {batch:?}")]
    Claim {
        /// The batch id.
        batch: String,
        /// The MongoDB error.
        #[source]
        source: mongodb::error::Error,
    },
    /// Committing a batch's offset failed; its keys are not handed out.
    #[error("committing the offset of batch {batch:?}")]
    Commit {
        /// The batch id.
        batch: String,
        /// The Kafka error.
        #[source]
        source: KafkaError,
    },
    /// Recording a claim as drained or returning failed.
    #[error("updating the claim of batch {batch:?}")]
    Return {
        /// The batch id.
        batch: String,
        /// The MongoDB error.
        #[source]
        source: mongodb::error::Error,
    },
    /// A key given to [`crate::KeyConsumer::recycle`] is not a key of the
    /// pool (wrong length or a character outside its alphabet).
    #[error("bad key {key:?}: {source}")]
    BadKey {
        /// The key as given.
        key: String,
        /// What is wrong with it.
        #[source]
        source: FormatError,
    },
    /// A key cannot be recycled; nothing was changed. `refusal` says why
    /// ([`Refusal::is_not_found`]: not a handed-out key at all).
    #[error("key {key:?} cannot be recycled: {refusal}")]
    NotRecyclable {
        /// The key.
        key: String,
        /// Why.
        refusal: Refusal,
    },
    /// A vanity key that cannot be taken: handed out, reserved, blocked, or
    /// asked for by another request already.
    #[error("key {key:?} cannot be taken: {reason}")]
    KeyTaken {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// Reading or writing MongoDB for a recycle request or pool statistics failed.
    #[error("MongoDB {op}")]
    Store {
        /// What was being done.
        op: &'static str,
        /// The MongoDB error.
        #[source]
        source: mongodb::error::Error,
    },
    /// No key is buffered right now (or none arrived before the wait's timeout).
    #[error("no key available")]
    Empty,
    /// The consumer has been shut down; no more keys will be handed out.
    #[error("the consumer is shut down")]
    ShutDown,
    /// A bulk call asked for no key or for more than one call may take.
    #[error("{requested} keys asked for at once; from 1 to {max} may be")]
    Count {
        /// What was asked for.
        requested: usize,
        /// [`crate::MAX_KEYS_PER_CALL`].
        max: usize,
    },
    /// The consume loop task panicked or was cancelled.
    #[error("the consume loop task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// MongoDB's code for a command the user's roles do not allow.
const MONGO_UNAUTHORIZED: i32 = 13;

impl Error {
    /// What MongoDB said, if this error is MongoDB refusing the operation to
    /// this user (its roles lack the action): no retry changes that.
    pub(crate) fn mongo_refusal(&self) -> Option<String> {
        let source = match self {
            Error::Verify { source, .. }
            | Error::Claim { source, .. }
            | Error::Return { source, .. }
            | Error::Store { source, .. } => source,
            _ => return None,
        };
        (kgs_schemas::mongo::code_of(source) == Some(MONGO_UNAUTHORIZED))
            .then(|| format!("{self}: {}", kgs_schemas::mongo::error_detail(source)))
    }
}
