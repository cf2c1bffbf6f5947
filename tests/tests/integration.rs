//! Integration tests of kgs against the real servers: Apache Kafka and a
//! MongoDB-wire server, addressed by `KGS_KAFKA_BROKERS` and `KGS_MONGODB_URI`
//! (loopback defaults; `make test` starts local ones).
//!
//! One test binary, one module per area.

mod consumer;
mod hostile;
mod observability;
mod producer;
mod recycle;
mod smoke;
