//! Fixtures shared by the integration tests (`tests/tests/`) and the
//! `kgs-chaos` bin: server addresses from the environment, unique names,
//! the one way to start each kgs process, the one HTTP client, bounded
//! waits, and plain reads of Kafka and MongoDB.
//!
//! Every test gets its own topic, group and database (random suffix), so tests
//! never share state and can run in parallel against the same servers.
//!
//! # Layout
//! - [`env`](mod@env): server addresses, unique names, free ports, built binaries.
//! - [`wait`]: [`wait_for`] a condition, bounded, saying what it waited for.
//! - [`http`](mod@http): the HTTP client ([`http`](fn@http), [`http_get`]).
//! - [`metrics`]: values from `/metrics` text and from a consumer's registry.
//! - [`process`]: signals, and stopping a child with a bounded wait ([`terminate`]).
//! - [`producer`]: [`ProducerCmd`], a `kgs-producer` command for a pool.
//! - [`app_server`]: [`AppServerCmd`] and the running [`AppServer`].
//! - [`consumer`]: taking keys from an embedded `KeyConsumer`.
//! - [`kafka`]: client config, topics, reading a pool topic's batches.
//! - [`mongo`]: client, documents and ids of a collection.
//! - [`proxy`]: a loopback TCP proxy that delays, stalls or cuts a connection.

pub mod app_server;
pub mod consumer;
pub mod env;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod mongo;
pub mod process;
pub mod producer;
pub mod proxy;
pub mod wait;

pub use app_server::{AppServer, AppServerCmd};
pub use consumer::{take, take_until};
pub use env::{free_addr, kafka_brokers, mongodb_uri, unique, workspace_binary};
pub use http::{http, http_get};
pub use kafka::{create_topic, kafka_config, read_topic_batches};
pub use metrics::registry_value;
pub use mongo::{find_docs, mongo_client, pool_doc, string_ids};
pub use process::{terminate, Signal};
pub use producer::ProducerCmd;
pub use proxy::{Mode, Proxy};
pub use wait::{wait_for, wait_healthy};
