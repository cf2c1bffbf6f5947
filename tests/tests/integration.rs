//! Integration tests of kgs against the real servers: Apache Kafka and a
//! MongoDB-wire server, addressed by `KGS_KAFKA_BROKERS` and `KGS_MONGODB_URI`
//! (loopback defaults; `make test` starts local ones).
//!
//! One test binary, one module per area.

mod consumer;
mod hostile;
// The producer lease: renewal racing takeover, abandoned epochs, reused ids.
mod lease;
mod observability;
mod producer;
// Hostile writers and reused instance ids: only the producer's durably moved batches are handed out.
mod provenance;
mod recycle;
mod smoke;
