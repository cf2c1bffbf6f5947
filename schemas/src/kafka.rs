//! The one metadata request both kgs components make before anything else
//! (feature `kafka`): does the pool's topic exist, with how many
//! partitions, and does Kafka let this client in at all. A refused login, an
//! untrusted broker certificate or a missing ACL is a clear error at once
//! (retrying cannot help); a broker that does not answer is retried until a
//! deadline, and the error then names the last reason librdkafka gave.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, ClientContext};

/// Why [`topic_partitions`] gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    /// Kafka refused this client (credentials, TLS, ACLs); not retried.
    #[error("{0}")]
    Refused(String),
    /// No answer before the deadline; the last error seen.
    #[error("{0}")]
    Unreachable(String),
    /// The client could not even be created (a bad setting).
    #[error("{0}")]
    Client(String),
}

/// Whether `err` is the broker refusing this principal (an ACL, or the
/// credentials), which no retry changes until an operator does; both
/// components give up on it with one line.
pub fn is_authorization_failure(err: &KafkaError) -> bool {
    let code = match err {
        KafkaError::Transaction(e) => Some(e.code()),
        e => e.rdkafka_error_code(),
    };
    matches!(
        code,
        Some(
            RDKafkaErrorCode::TransactionalIdAuthorizationFailed
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::SaslAuthenticationFailed
        )
    )
}

/// A client context that keeps the last error librdkafka reported on its
/// own: a failed request only says "transport failure", this says why.
#[derive(Debug, Default)]
struct LastError(Mutex<Option<(RDKafkaErrorCode, String)>>);

impl ClientContext for LastError {
    fn log(&self, _level: RDKafkaLogLevel, fac: &str, message: &str) {
        // Said once, in the error, instead of at every retry.
        tracing::debug!(fac, message, "librdkafka");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(cause = %error, reason, "librdkafka error");
        let code = error.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
        *self.0.lock().expect("not poisoned") = Some((code, reason.to_owned()));
    }
}

impl ConsumerContext for LastError {}

/// The partition count of `topic` (`None` if it does not exist), asked with
/// `config` (a client's own settings: brokers, TLS, SASL). Blocking: call it
/// off the async threads.
pub fn topic_partitions(
    config: &ClientConfig,
    topic: &str,
    deadline: Duration,
) -> Result<Option<u32>, MetadataError> {
    let client: BaseConsumer<LastError> = config
        .create_with_context(LastError::default())
        .map_err(|e| MetadataError::Client(e.to_string()))?;
    let started = Instant::now();
    loop {
        match client.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(md) => {
                return match md.topics().iter().find(|t| t.name() == topic) {
                    Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                        Ok(Some(t.partitions().len() as u32))
                    }
                    Some(t)
                        if t.error().map(RDKafkaErrorCode::from)
                            == Some(RDKafkaErrorCode::TopicAuthorizationFailed) =>
                    {
                        Err(MetadataError::Refused(format!(
                            "not allowed to describe topic {topic} (no ACL for this principal)"
                        )))
                    }
                    _ => Ok(None),
                };
            }
            Err(e) => {
                // Error events reach the context only while the client is polled.
                let _ = client.poll(Duration::from_millis(100));
                let last = client.context().0.lock().expect("not poisoned").take();
                if let Some((RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL, reason)) =
                    &last
                {
                    return Err(MetadataError::Refused(reason.clone()));
                }
                if started.elapsed() >= deadline {
                    return Err(MetadataError::Unreachable(match last {
                        Some((_, reason)) => format!("{e}; {reason}"),
                        None => e.to_string(),
                    }));
                }
                tracing::info!(cause = %e, "Kafka not ready");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
