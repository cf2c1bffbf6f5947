//! Integration tests of kgs against the real servers: Apache Kafka and a
//! MongoDB-wire server, addressed by `KGS_KAFKA_BROKERS` and `KGS_MONGODB_URI`
//! (loopback defaults; `make test` starts local ones).
//!
//! One test binary, one module per area; the fixtures they share (process
//! builders, HTTP client, waits) are the `kgs_tests` library in `tests/src/`.

// The consumer library and the app server: group hand-out, claims, shutdown, bad input, processes.
mod consumer;
// Hostile conditions with the real binaries: one-line start errors, an exhausted pool, the secret.
mod hostile;
// Keys people can live with: the blocklist at generation.
mod keys;
// The producer lease: renewal racing takeover, abandoned epochs, reused ids.
mod lease;
// The Grafana dashboards and alert rules, evaluated by a real Prometheus.
mod observability;
// `kgs-producer`: whole spaces, init, crash at every failpoint, takeover, stale leaders.
mod producer;
// Hostile writers and reused instance ids: only the producer's durably moved batches are handed out.
mod provenance;
// Key recycling: handed out again exactly once, refusals change nothing, crash recovery.
mod recycle;
// Least privilege on the secured Kafka (SASL_SSL, SCRAM, ACLs): end to end, refusals, one-line errors.
mod security;
// The pool topic deleted and re-created under running app servers.
mod topic;
// The servers themselves: consumer groups, committed offsets, transactions, MongoDB round trips.
mod smoke;
