//! Shared types of kgs, the key generation service: the Kafka message that
//! carries a batch of keys, the MongoDB documents, and a pool's key format.
//!
//! Both the producer and the consumer library depend on this crate, so a
//! change to the wire or storage format is made (and reviewed) in one place.
//! The same formats are published as JSON Schema under `schemas/json/` for
//! consumers written in other languages.
//!
//! # Layout
//! - [`format`]: alphabet + length of a pool's keys, validation, index↔key.
//! - [`batch`]: the key-batch message and its strict decoder.
//! - [`blocklist`]: words no generated key may contain, with folding.
//! - [`docs`]: the MongoDB documents and collection names.
//! - [`stats`]: the `collStats` figures reported for a pool's collections.
//! - [`recycle`]: the checks a request to recycle a key must pass.
//! - [`mongo`]: the duplicate-key rule every idempotent write relies on.
//! - [`duration`]: the one duration grammar of every setting (`250ms`, `10s`).
//! - [`kafka`] (feature `kafka`): the start-up metadata check of both components.
//! - [`process`] (feature `process`): what both binaries share as
//!   processes: the log-filter variable, shutdown signals, `name=value`.
#![deny(missing_docs)]

pub mod batch;
pub mod blocklist;
pub mod docs;
pub mod duration;
pub mod format;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod mongo;
#[cfg(feature = "process")]
pub mod process;
pub mod recycle;
pub mod stats;

pub use batch::{
    keys_digest, BatchCheck, BatchProof, DecodeError, KeyBatch, Unverified, SCHEMA_VERSION,
};
pub use format::{alphabet_preset, FormatError, KeyFormat, ALPHABET_PRESETS, BASE62};

/// `err` with its causes, `a: b: c` (what `{:#}` of anyhow prints), for log
/// fields of both components.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
