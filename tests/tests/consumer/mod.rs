//! Tests of `kgs-consumer` against real Kafka and the MongoDB-wire server:
//! disjoint hand-out through the consumer group, claim-then-commit, rebalance,
//! graceful return, bad input and backpressure, and the app server binary.
//!
//! The batches come from a minimal publisher written here
//! ([`publisher::Pool`]), which does what the producer does for a batch: a
//! batch record (`batches`, state `published`, this pool incarnation, the
//! partition chosen before sending, the digest of the keys), the keys into
//! `used_keys.<pool>` (reason `batch`), then the `KeyBatch` JSON on that
//! partition of the pool's topic. Without the record the consumer would
//! refuse the batch.
//!
//! # Layout
//! - `publisher.rs`: the test pool and its publisher.
//! - `group.rs`: disjoint keys across the members of a group.
//! - `claim.rs`: claim-then-commit, foreign claims, dead instances, the
//!   give-back of a batch whose commit failed, through a MongoDB outage.
//! - `shutdown.rs`: returning unused keys, and handing them out again.
//! - `flow.rs`: bad input skipped, backpressure at the watermarks.
//! - `app_server.rs`: the app server as separate processes.

mod app_server;
mod claim;
mod flow;
mod group;
mod publisher;
mod shutdown;
