//! The kgs producer: the only writer of a pool's keys. It generates keys in
//! an unguessable order into `keys.<pool>`, moves batches of them to
//! `used_keys.<pool>` and publishes each batch exactly once to the pool's
//! Kafka topic, as the single leader of the pool.
//!
//! # Layout
//! The life of a key, and the file of each step (the consumer's side is in
//! the `kgs-consumer` crate):
//! - **pool**: [`cmd::init`] creates a pool (document, collections,
//!   indexes, topic); [`cmd::reserve`] takes keys out of circulation.
//! - **generate**: [`writer::generate`], in the keyed order of
//!   [`permutation`].
//! - **move**: [`writer::batch`], a window of keys from `keys` to
//!   `used_keys` as one batch record (the protocol: [`writer`]).
//! - **publish**: [`writer::publish`], in a Kafka transaction
//!   ([`kafka`]); [`writer::recover`] finishes a batch a crash left behind.
//! - *consume, claim, buffer, hand out*: the consumer library.
//! - **return**: [`writer::returns`], the unused keys of a consumer that
//!   stopped, through [`writer::put_back`].
//! - **recycle**: [`cmd::recycle`] records a request, [`writer::recycles`]
//!   performs it, through [`writer::put_back`].
//!
//! Around them: [`leader`] (`run`: the [`leader::lease`], the
//! [`leader::lead`] loop and its [`leader::sizer`]); [`cli`], [`config`],
//! [`kgs_schemas::duration`]: command line and configuration; [`store`]: MongoDB access;
//! [`http`] and [`metrics`]: observability; [`cmd::stats`]: the `stats`
//! command; [`failpoint`]: test-only fault injection (`KGS_FAILPOINT`).

pub mod cli;
pub mod cmd;
pub mod config;
pub mod error;
pub mod failpoint;
pub mod http;
pub mod kafka;
pub mod leader;
pub mod metrics;
pub mod permutation;
pub mod store;
pub mod writer;

pub use cli::{Cli, Command};
pub use config::Config;
pub use error::{Error, Result};
